#!/usr/bin/env python3
"""Run a command inside a Debian kernel booted under qemu, with this machine's root shared read-only.

    python tools/guest.py --kernel 6.12 -- .venv/bin/python -m pytest -q tests/guest/guest_cuse.py
    python tools/guest.py --kernel 6.1 --prepare        # only download and build (cached)

Set-up is the harness's own (root needed, Debian 12 host): it installs qemu-system-x86,
busybox-static, kmod, xz-utils, cpio (and gcc, libc6-dev for the tests' C client) with apt
``--no-install-recommends`` if they are missing; downloads the newest Debian
kernel package of the chosen series with a private apt configuration (its own sources list, lists
and cache under the cache dir; the host's apt state is untouched); unpacks it; and builds a busybox
initramfs that loads the modules the guest needs (virtio 9p, overlay, fuse, cuse, loop). Everything is
cached in ``$AFUSE_GUEST_CACHE`` (default ``~/.cache/afuse-guest``).

The guest (TCG: ``-machine q35,accel=tcg -cpu max``, no KVM) mounts the host's ``/`` over
virtio-9p read-only under an overlay with a tmpfs upper (writes succeed and are discarded), mounts
fresh ``/proc``, ``/sys``, ``/dev`` (devtmpfs: CUSE device nodes appear there), fusectl and
tracefs (``/tmp`` is the host's, through the overlay), and runs the command with ``/bin/sh`` in
the given directory as root, with ``AFUSE_GUEST`` set to the guest's kernel release. Its stdout,
stderr and exit status come back through a small writable 9p share. Use a venv's ``bin/python``
or ``/usr/bin/python3`` inside, not pyenv-style shims (they take ~30 s to start under TCG).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

#: Kernel series -> the Debian suite whose ``linux-image-amd64`` provides it.
KERNELS = {
    "6.1": "bookworm",              # FUSE 7.38
    "6.12": "bookworm-backports",   # FUSE 7.41
}
#: Modules the guest loads, in this order after their dependencies (those built in are skipped).
MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay", "fuse", "cuse", "loop")
#: Host packages the harness (and the tests' C client: gcc, libc6-dev) needs.
HOST_PACKAGES = ("qemu-system-x86", "busybox-static", "kmod", "xz-utils", "cpio", "gcc", "libc6-dev")
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class GuestError(RuntimeError):
    """The guest could not be set up or did not report an exit status."""


@dataclass
class GuestResult:
    """What a command run in the guest left behind."""

    returncode: int
    stdout: str
    stderr: str
    console: str
    seconds: float
    kernel: str


def cache_dir() -> Path:
    """Where downloads, unpacked kernels and initramfs images are kept."""
    env = os.environ.get("AFUSE_GUEST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "afuse-guest"


def _log(msg: str) -> None:
    print(f"[guest] {msg}", file=sys.stderr, flush=True)


def _run(cmd: Sequence[str], **kw: object) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(list(cmd), check=True, text=True, capture_output=True, **kw)  # type: ignore[call-overload, no-any-return]
    except subprocess.CalledProcessError as e:
        raise GuestError(f"{shlex.join(cmd)} failed ({e.returncode}):\n{e.stdout}{e.stderr}") from None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (concurrent runs share the cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


# ----------------------------------------------------------------------------- host packages


def ensure_host_packages() -> None:
    """Install the host programs the harness uses with apt, if any is missing."""
    missing = [pkg for pkg in HOST_PACKAGES if not _installed(pkg)]
    if not missing:
        return
    if os.geteuid() != 0:
        raise GuestError(f"missing host packages {missing}; run as root so the harness can install them")
    _log(f"installing {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        _run(["apt-get", "update", "-q"], env=env)
        _run(cmd, env=env)


def _installed(package: str) -> bool:
    q = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
    return q.stdout.strip() == "install ok installed"


def _which(prog: str) -> str | None:
    return shutil.which(prog, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/bin:/usr/bin")


# ----------------------------------------------------------------------------- kernel packages


def _host_mirror() -> str:
    """The Debian mirror the host's apt sources name (security and ports excluded)."""
    texts = []
    for p in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        if p.suffix in (".list", ".sources") or p.name == "sources.list":
            with contextlib.suppress(OSError):
                texts.append(p.read_text())
    for text in texts:
        for m in re.finditer(r"(?:^deb\s+(?:\[[^]]*\]\s+)?|^URIs:\s*)(\S+)", text, re.M):
            uri = m.group(1)
            if "debian" in uri and "security" not in uri and "ports" not in uri:
                return uri.rstrip("/")
    return DEFAULT_MIRROR


class PrivateApt:
    """apt-get/apt-cache against one suite, with every state and cache path under ``root``."""

    def __init__(self, root: Path, suite: str) -> None:
        self.root = root
        self.suite = suite
        for d in ("lists/partial", "cache/archives/partial", "sources.list.d", "preferences.d"):
            (root / d).mkdir(parents=True, exist_ok=True)
        (root / "sources.list").write_text(f"deb [signed-by={KEYRING}] {_host_mirror()} {suite} main\n")
        self.options = [
            "-o", f"Dir::Etc::SourceList={root / 'sources.list'}",
            "-o", f"Dir::Etc::SourceParts={root / 'sources.list.d'}",
            "-o", f"Dir::Etc::PreferencesParts={root / 'preferences.d'}",
            "-o", f"Dir::Etc::Preferences={root / 'preferences'}",
            "-o", f"Dir::State::Lists={root / 'lists'}",
            "-o", f"Dir::Cache={root / 'cache'}",
            "-o", "Dir::State::status=/dev/null",
            "-o", "APT::Sandbox::User=root",
            "-o", "Debug::NoLocking=1",
        ]

    def update(self) -> None:
        _run(["apt-get", *self.options, "-q", "update"])

    def depends_of(self, package: str) -> list[str]:
        out = _run(["apt-cache", *self.options, "show", package]).stdout
        m = re.search(r"^Depends:\s*(.*)$", out, re.M)
        if not m:
            raise GuestError(f"{package} in {self.suite} has no Depends")
        return [d.strip().split()[0] for d in m.group(1).split(",")]

    def download(self, package: str, into: Path) -> Path:
        into.mkdir(parents=True, exist_ok=True)
        _run(["apt-get", *self.options, "-q", "download", package], cwd=into)
        debs = sorted(into.glob(f"{package}_*.deb"))
        if not debs:
            raise GuestError(f"apt-get download {package} left no .deb in {into}")
        return debs[-1]


@dataclass
class Kernel:
    """An unpacked kernel and the initramfs that boots it."""

    series: str
    release: str
    vmlinuz: Path
    initramfs: Path


def prepare(series: str) -> Kernel:
    """Download, unpack and build what booting kernel ``series`` (e.g. "6.12") needs; cached."""
    if series not in KERNELS:
        raise GuestError(f"unknown kernel series {series!r}; choose one of {', '.join(KERNELS)}")
    ensure_host_packages()
    base = cache_dir() / series
    with _locked(cache_dir() / f"{series}.lock"):
        ready = base / "ready"
        stamp = _build_stamp()
        if ready.exists():
            release, _, built = ready.read_text().partition("\n")
            k = Kernel(series, release, base / "vmlinuz", base / "initramfs.cpio")
            if built.strip() == stamp and k.vmlinuz.exists() and k.initramfs.exists():
                return k
        t0 = time.monotonic()
        debs = sorted((base / "debs").glob("linux-image-*.deb"))
        if debs:  # downloaded before: rebuild from it (delete the cache dir for a newer kernel)
            deb = debs[-1]
        else:
            suite = KERNELS[series]
            _log(f"fetching the newest {series} kernel from Debian {suite}")
            apt = PrivateApt(cache_dir() / "apt" / suite, suite)
            apt.update()
            images = [d for d in apt.depends_of("linux-image-amd64") if d.startswith("linux-image-")]
            if not images:
                raise GuestError(f"linux-image-amd64 in {suite} depends on no linux-image-* package")
            deb = apt.download(images[0], base / "debs")
        root = base / "root"
        shutil.rmtree(root, ignore_errors=True)
        _run(["dpkg-deb", "-x", str(deb), str(root)])
        vmlinuz = sorted((root / "boot").glob("vmlinuz-*"))
        if not vmlinuz:
            raise GuestError(f"{deb.name} has no boot/vmlinuz-*")
        release = vmlinuz[-1].name.removeprefix("vmlinuz-")
        shutil.copy(vmlinuz[-1], base / "vmlinuz")
        _build_initramfs(root, release, base / "initramfs.cpio")
        # The unpacked tree is only needed for the build; the .deb stays for a rebuild.
        shutil.rmtree(root, ignore_errors=True)
        ready.write_text(f"{release}\n{stamp}\n")
        _log(f"kernel {release} ready in {time.monotonic() - t0:.0f} s")
        return Kernel(series, release, base / "vmlinuz", base / "initramfs.cpio")


def _build_stamp() -> str:
    """Changes whenever what goes into the initramfs changes (then it is rebuilt)."""
    return hashlib.sha256(repr((MODULES, _INIT)).encode()).hexdigest()[:16]


def _module_name(path: str) -> str:
    name = Path(path).name
    for suffix in (".xz", ".zst", ".gz", ".ko"):
        name = name.removesuffix(suffix)
    return name.replace("-", "_")


def _build_initramfs(root: Path, release: str, out: Path) -> None:
    moddir = root / "lib" / "modules" / release
    if not moddir.exists() and (root / "usr" / "lib" / "modules" / release).exists():
        (root / "lib").mkdir(exist_ok=True)
        (root / "lib" / "modules").symlink_to(root / "usr" / "lib" / "modules")
    _run(["depmod", "-b", str(root), release])
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[_module_name(path)] = (path, [_module_name(d) for d in rest.split()])
    builtin = {_module_name(line) for line in (moddir / "modules.builtin").read_text().split()}
    order: list[str] = []

    def add(name: str) -> None:
        if name in order:
            return
        for d in reversed(deps[name][1]):
            add(d)
        order.append(name)

    for name in MODULES:
        if name in deps:
            add(name)
        elif name not in builtin:
            raise GuestError(f"kernel {release} has module {name} neither built in nor as a module")
    with tempfile.TemporaryDirectory() as tmp:
        ir = Path(tmp)
        for d in ("bin", "dev", "proc", "sys", "lower", "rw", "newroot", "modules"):
            (ir / d).mkdir()
        busybox = _which("busybox")
        assert busybox is not None
        shutil.copy(busybox, ir / "bin" / "busybox")
        for i, name in enumerate(order):
            src = moddir / deps[name][0]
            dst = ir / "modules" / f"{i:02d}-{name}.ko"
            if src.suffix == ".xz":
                with open(dst, "wb") as f:
                    subprocess.run(["xz", "-dc", str(src)], stdout=f, check=True)
            else:
                shutil.copy(src, dst)
        init = ir / "init"
        init.write_text(_INIT)
        init.chmod(0o755)
        files = subprocess.run(["find", "."], cwd=ir, capture_output=True, check=True).stdout
        with open(out, "wb") as f:
            subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=ir, input=files, stdout=f, check=True)


# /init of the initramfs. The run directory (a writable 9p share, tag "run") holds cmd.sh and
# receives stdout, stderr and status; its host path is given on the kernel command line.
_INIT = r"""#!/bin/busybox sh
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t sysfs sys /sys
$B mount -t devtmpfs dev /dev
for m in /modules/*.ko; do $B insmod "$m" || echo "guest: insmod $m failed"; done
RUN=$($B sed -n 's/.*afuse.run=\([^ ]*\).*/\1/p' /proc/cmdline)
fail() { echo "guest: $*"; $B poweroff -f; }
i=0
until $B mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 rootfs /lower 2>/dev/null; do
    i=$((i+1)); [ $i -gt 100 ] && fail "cannot mount the host root over 9p"; $B sleep 0.1
done
$B mount -t tmpfs -o mode=755 tmpfs /rw
$B mkdir -p /rw/upper /rw/work
$B mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot || fail "overlay"
N=/newroot
$B mount -t proc proc $N/proc
$B mount -t sysfs sys $N/sys
$B mount -t devtmpfs dev $N/dev
$B mkdir -p $N/dev/pts $N/dev/shm
$B mount -t devpts devpts $N/dev/pts
$B mount -t tmpfs tmpfs $N/dev/shm
$B mount -t tmpfs tmpfs $N/run
$B mount -t fusectl fusectl $N/sys/fs/fuse/connections 2>/dev/null
$B mount -t tracefs tracefs $N/sys/kernel/tracing 2>/dev/null
$B mkdir -p $N$RUN
$B mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 run $N$RUN || fail "cannot mount the run share"
$B hostname afuse-guest
$B chroot $N /bin/sh $RUN/cmd.sh > $N$RUN/stdout 2> $N$RUN/stderr
echo $? > $N$RUN/status
$B sync
$B umount $N$RUN
$B poweroff -f
"""


# ----------------------------------------------------------------------------- running


def run(command: Sequence[str] | str, kernel: str = "6.12", *, cwd: str | os.PathLike[str] | None = None,
        env: dict[str, str] | None = None, timeout: float = 1200, memory_mb: int = 1024,
        cpus: int = 2) -> GuestResult:
    """Boot kernel series ``kernel``, run ``command`` (argv list or shell text) as root in ``cwd``.

    ``env`` adds environment variables (the guest starts with PATH, HOME, LANG and AFUSE_GUEST).
    Raises GuestError if the guest gives no exit status within ``timeout`` seconds.
    """
    k = prepare(kernel)
    qemu = _which("qemu-system-x86_64")
    assert qemu is not None
    shell = command if isinstance(command, str) else shlex.join(command)
    workdir = os.path.abspath(cwd if cwd is not None else os.getcwd())
    runs = cache_dir() / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    rundir = Path(tempfile.mkdtemp(prefix="run-", dir=runs))
    try:
        env_lines = "".join(f"export {name}={shlex.quote(value)}\n" for name, value in (env or {}).items())
        (rundir / "cmd.sh").write_text(
            f"export PATH={GUEST_PATH} HOME=/root LANG=C.UTF-8 AFUSE_GUEST=$(uname -r)\n"
            f"{env_lines}cd {shlex.quote(workdir)} || exit 125\n{shell}\n")
        args = [
            qemu, "-machine", "q35,accel=tcg", "-cpu", "max", "-smp", str(cpus), "-m", str(memory_mb),
            "-nodefaults", "-no-reboot", "-display", "none", "-no-user-config",
            "-serial", f"file:{rundir / 'console'}",
            "-kernel", str(k.vmlinuz), "-initrd", str(k.initramfs),
            "-append", f"console=ttyS0 panic=-1 loglevel=4 afuse.run={rundir}",
            "-fsdev", "local,id=rootfs,path=/,readonly=on,security_model=none,multidevs=remap",
            "-device", "virtio-9p-pci,fsdev=rootfs,mount_tag=rootfs",
            "-fsdev", f"local,id=run,path={rundir},security_model=none",
            "-device", "virtio-9p-pci,fsdev=run,mount_tag=run",
        ]
        t0 = time.monotonic()
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        try:
            qemu_out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            qemu_out, _ = proc.communicate()
        finally:
            if proc.poll() is None:  # interrupted (e.g. a test timeout): never leave qemu behind
                proc.kill()
                proc.wait()
        seconds = time.monotonic() - t0

        def text(name: str) -> str:
            p = rundir / name
            return p.read_text(errors="replace") if p.exists() else ""

        console = text("console")
        status = text("status").strip()
        if not status:
            raise GuestError(
                f"the guest (kernel {k.release}) gave no exit status after {seconds:.0f} s"
                f" (timeout {timeout:.0f} s); qemu said: {qemu_out.decode(errors='replace')[-2000:]}\n"
                f"console:\n{console[-4000:]}\nstdout:\n{text('stdout')[-4000:]}\nstderr:\n{text('stderr')[-4000:]}")
        return GuestResult(int(status), text("stdout"), text("stderr"), console, seconds, k.release)
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--kernel", default="6.12", choices=sorted(KERNELS), help="kernel series (default 6.12)")
    p.add_argument("--prepare", action="store_true", help="only download and build, then print the release")
    p.add_argument("--cwd", help="directory to run in (default: the current one)")
    p.add_argument("--timeout", type=float, default=1200, help="seconds before the guest is killed")
    p.add_argument("--memory", type=int, default=1024, help="guest RAM in MiB")
    p.add_argument("command", nargs="*", help="the command (after --)")
    a = p.parse_args(argv)
    try:
        if a.prepare:
            print(prepare(a.kernel).release)
            return 0
        if not a.command:
            p.error("give a command after --")
        res = run(a.command, a.kernel, cwd=a.cwd, timeout=a.timeout, memory_mb=a.memory)
    except GuestError as e:
        print(f"guest: {e}", file=sys.stderr)
        return 124
    sys.stdout.write(res.stdout)
    sys.stderr.write(res.stderr)
    _log(f"kernel {res.kernel}: exit status {res.returncode} after {res.seconds:.1f} s")
    return res.returncode


if __name__ == "__main__":
    sys.exit(main())
