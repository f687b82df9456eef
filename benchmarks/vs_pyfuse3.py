#!/usr/bin/env python3
"""afuse's passthroughfs against pyfuse3's and libfuse's passthrough examples, like for like, one run.

    python benchmarks/vs_pyfuse3.py [--quick] [--rounds N] [--no-ext4] [--base DIR] [--pin CPU] [--json FILE]

Sets itself up on first use, in a cache directory outside the repository (``--cache``, default
``~/.cache/afuse-bench``): apt-get installs Debian's libfuse3-dev (and gcc, pkg-config,
python3-dev); pyfuse3 3.5 is pip-installed into its own venv there, built against that
libfuse, and its ``examples/passthroughfs.py`` taken from its source distribution; libfuse's
``passthrough_ll`` is compiled from the C example Debian ships in
/usr/share/doc/libfuse3-dev/examples. Nothing of either is part of afuse.

Then, in one invocation, every workload runs on each of (rows of the table's columns):

* ``afuse``   — ``python -m afuse.examples.passthroughfs SRC MNT --timeout 0 --no-passthrough
  --keep-cache -o default_permissions``: pyfuse3's configuration (the HEADLINE ratio);
* ``pyfuse3`` — pyfuse3's ``examples/passthroughfs.py SRC MNT``, unchanged: entry/attr timeouts 0,
  no directory cache, ``default_permissions``, every open FOPEN_KEEP_CACHE (pyfuse3's
  ``FileInfo`` default), reads and writes served by the daemon;
* ``libfuse`` — ``passthrough_ll -o source=SRC,timeout=0,default_permissions`` (cache=auto:
  no keep_cache, reads and writes through the daemon, splice);
* ``afuse-default`` — ``python -m afuse.examples.passthroughfs SRC MNT``, as users run it
  (timeouts 0, no directory cache, no keep_cache, FUSE passthrough for regular files);
* ``native`` — the source directory itself.

Workloads (on a tmpfs source, ``--tmpdir``, default /dev/shm): create, stat, rename, unlink of
N files; small files (4 KiB) written, then read back; os.listdir of a 2,000-entry directory;
sequential write (1 MiB blocks, fsync), read of the file just written (a fresh open: what the
page cache keeps is each side's own configuration), read after dropping the mount's cached
pages (POSIX_FADV_DONTNEED: every byte from the daemon), and an O_DIRECT read (1 MiB blocks).

The kernel's own tracepoint ``fuse:fuse_request_send`` (a private tracing instance) counts the
requests each mount received during each workload's first round: the table of requests per
operation shows each side's configuration as the kernel sees it. Each mount's options and its
bdi read_ahead_kb are printed too.

Finally (``--no-ext4`` skips it) FUSE passthrough on the root (ext4) filesystem: a 512 MiB file
read in 1 MiB blocks after ``echo 3 > /proc/sys/vm/drop_caches``, unpinned, median of 5, natively
and through afuse's passthroughfs (default configuration).

Prints figures, ratios afuse ÷ pyfuse3 (target >= 1.5) and afuse ÷ native; asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("afuse_bench", os.path.join(HERE, "bench.py"))
assert _spec is not None and _spec.loader is not None
bench: Any = importlib.util.module_from_spec(_spec)
sys.modules["afuse_bench"] = bench
_spec.loader.exec_module(bench)

MiB = 1 << 20
PYFUSE3_VERSION = "3.5.0"
LIBFUSE_EXAMPLES = "/usr/share/doc/libfuse3-dev/examples"
APT_PACKAGES = ("libfuse3-dev", "pkg-config", "gcc", "python3-dev", "fuse3")
TARGET = 1.5  # afuse ÷ pyfuse3, every row
EXT4_TARGET = 0.95  # passthrough ÷ native on ext4
clock = time.perf_counter


# --------------------------------------------------------------------------------------------
# setting up the baselines (outside the repository)


def _run(cmd: list[str], log: Callable[[str], None], **kw: Any) -> None:
    log("  $ " + " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}): {(proc.stdout + proc.stderr)[-3000:]}")


def _apt_missing() -> list[str]:
    missing = []
    for pkg in APT_PACKAGES:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True)
        if "install ok installed" not in out.stdout:
            missing.append(pkg)
    return missing


def setup(cache: str, log: Callable[[str], None]) -> dict[str, str]:
    """Install what the baselines need; paths of pyfuse3's python, its example, passthrough_ll."""
    os.makedirs(cache, exist_ok=True)
    missing = _apt_missing()
    if missing:
        log(f"installing Debian packages {' '.join(missing)}")
        lock = ["-o", "DPkg::Lock::Timeout=600"]
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        try:
            _run(["apt-get", *lock, "install", "-y", "-q", *missing], log, env=env)
        except RuntimeError:
            _run(["apt-get", *lock, "update", "-q"], log, env=env)
            _run(["apt-get", *lock, "install", "-y", "-q", *missing], log, env=env)
    venv = os.path.join(cache, "pyfuse3-venv")
    py = os.path.join(venv, "bin", "python")
    check = [py, "-c", f"import pyfuse3, trio; assert pyfuse3.__version__ == {PYFUSE3_VERSION!r}"]
    if not os.path.exists(py) or subprocess.run(check, capture_output=True).returncode:
        log(f"installing pyfuse3 {PYFUSE3_VERSION} into {venv} (builds against libfuse3-dev)")
        _run([sys.executable, "-m", "venv", venv], log)
        _run([py, "-m", "pip", "install", "-q", f"pyfuse3=={PYFUSE3_VERSION}", "trio"], log)
    example = os.path.join(cache, f"pyfuse3-{PYFUSE3_VERSION}-passthroughfs.py")
    if not os.path.exists(example):
        log("fetching pyfuse3's examples/passthroughfs.py from its source distribution")
        sdist = os.path.join(cache, "sdist")
        _run([py, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
              f"pyfuse3=={PYFUSE3_VERSION}", "-d", sdist], log)
        import tarfile

        with tarfile.open(os.path.join(sdist, f"pyfuse3-{PYFUSE3_VERSION}.tar.gz")) as tf:
            member = tf.extractfile(f"pyfuse3-{PYFUSE3_VERSION}/examples/passthroughfs.py")
            assert member is not None
            with open(example + ".tmp", "wb") as f:
                f.write(member.read())
        os.replace(example + ".tmp", example)
    ll = os.path.join(cache, "passthrough_ll")
    src = os.path.join(LIBFUSE_EXAMPLES, "passthrough_ll.c")
    if not os.path.exists(ll) or os.path.getmtime(ll) < os.path.getmtime(src):
        log(f"compiling libfuse's {src}")
        flags = subprocess.run(["pkg-config", "--cflags", "--libs", "fuse3"], capture_output=True, text=True,
                               check=True).stdout.split()
        _run(["gcc", "-O2", "-Wall", "-I", LIBFUSE_EXAMPLES, src, *flags, "-lpthread", "-o", ll], log)
    return {"python": py, "example": example, "passthrough_ll": ll}


# --------------------------------------------------------------------------------------------
# the filesystems


@dataclass
class Side:
    """One column: a daemon (None for native) and how to make it."""

    name: str
    describe: str
    make: Callable[[str], Any] | None  # source dir -> bench.Daemon


def sides(tools: dict[str, str], with_libfuse: bool, base: str | None = None, poll_us: float = 0.0) -> list[Side]:
    def afuse(label: str, extra: list[str], tree: str = bench.REPO) -> Callable[[str], Any]:
        return lambda src: bench.Daemon(label, lambda mnt: [
            sys.executable, "-m", "afuse.examples.passthroughfs", src, mnt, "-o", f"fsname=fusebench-{label}",
            *extra], ready_line=False, tree=tree)

    out = [
        Side("afuse", "passthroughfs --timeout 0 --no-passthrough --keep-cache -o default_permissions "
                      "(pyfuse3's configuration)",
             afuse("afuse", ["--timeout", "0", "--no-passthrough", "--keep-cache", "-o", "default_permissions"])),
        Side("pyfuse3", f"pyfuse3 {PYFUSE3_VERSION} examples/passthroughfs.py, unchanged",
             lambda src: bench.Daemon("pyfuse3", lambda mnt: [tools["python"], tools["example"], src, mnt],
                                      ready_line=False)),
    ]
    if poll_us:
        out.append(Side("afuse-poll", f"the same as afuse with --poll-us {poll_us:g} (busy polling: a separate "
                        "configuration, a CPU spent while requests come)",
                        afuse("afuse-poll", ["--timeout", "0", "--no-passthrough", "--keep-cache", "-o",
                                             "default_permissions", "--poll-us", f"{poll_us:g}"])))
    if base:
        keep = ["--keep-cache"] if "--keep-cache" in _help(base) else []
        out.append(Side("afuse-base", f"the same from {base}" + ("" if keep else " (it has no --keep-cache)"),
                        afuse("afuse-base", ["--timeout", "0", "--no-passthrough", *keep, "-o",
                                             "default_permissions"], tree=base)))
    if with_libfuse:
        out.append(Side("libfuse", "passthrough_ll -o source=SRC,timeout=0,default_permissions (cache=auto)",
                        lambda src: bench.Daemon("libfuse", lambda mnt: [
                            tools["passthrough_ll"], "-f", "-o",
                            f"source={src},timeout=0,default_permissions,fsname=fusebench-libfuse", mnt],
                            ready_line=False, ok_codes=(0, 1))))
    out += [
        Side("afuse-default", "passthroughfs SRC MNT (its defaults: timeouts 0, FUSE passthrough)",
             afuse("afuse-default", [])),
        Side("native", "the source directory", None),
    ]
    return out


def _help(tree: str) -> str:
    env = dict(os.environ, PYTHONPATH=tree)
    return subprocess.run([sys.executable, "-m", "afuse.examples.passthroughfs", "--help"], capture_output=True,
                          text=True, cwd=tree, env=env).stdout


def mount_facts(path: str) -> str:
    """The mount's options (mountinfo) and its bdi's read_ahead_kb."""
    st_dev = os.stat(path).st_dev
    opts = "?"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == path:
                opts = fields[5] + " " + line.split(" - ")[1].split()[2]
    ra = "?"
    with contextlib.suppress(OSError):
        with open(f"/sys/class/bdi/{os.major(st_dev)}:{os.minor(st_dev)}/read_ahead_kb") as f:
            ra = f.read().strip()
    return f"{opts}; read_ahead_kb={ra}"


# --------------------------------------------------------------------------------------------
# counting requests with the kernel's tracepoint


class Tracer:
    """A private tracefs instance recording fuse_request_send of one connection."""

    ROOT = "/sys/kernel/tracing"

    def __init__(self) -> None:
        self.path = os.path.join(self.ROOT, "instances", f"afuse-vs-pyfuse3-{os.getpid()}")
        self.ok = False
        self.conn = -1
        try:
            bench.tracefs_root(self.ROOT)
            os.mkdir(self.path)
            self._w("buffer_size_kb", "16384")
            self._w("events/fuse/fuse_request_send/enable", "1")
            self.ok = True
        except OSError as e:
            self.error = str(e)
            self.close()

    def _w(self, name: str, value: str) -> None:
        with open(os.path.join(self.path, name), "w") as f:
            f.write(value)

    def watch(self, mountpoint: str) -> None:
        """Count only requests of the connection mounted at ``mountpoint``."""
        if not self.ok:
            return
        dev = os.stat(mountpoint).st_dev
        self.conn = (os.major(dev) << 20) | os.minor(dev)  # the kernel's dev_t
        self._w("events/fuse/fuse_request_send/filter", f"connection == {self.conn}")
        self.clear()

    def clear(self) -> None:
        if self.ok:
            self._w("trace", "")

    def counts(self) -> Counter[str]:
        """Requests by opcode name since the last clear."""
        out: Counter[str] = Counter()
        if not self.ok:
            return out
        with open(os.path.join(self.path, "trace")) as f:
            for line in f:
                if line.startswith("#"):
                    if "entries-in-buffer/entries-written" in line:
                        a, b = line.split(":")[1].split()[0].split("/")
                        if a != b:
                            out["LOST"] += int(b) - int(a)
                    continue
                i = line.find("(FUSE_")
                if i >= 0 and f"connection {self.conn} " in line:
                    out[line[i + 6:line.index(")", i)]] += 1
        return out

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._w("events/fuse/fuse_request_send/enable", "0")
        with contextlib.suppress(OSError):
            os.rmdir(self.path)


# --------------------------------------------------------------------------------------------
# workloads: each returns {measure: (figure, operations)}


@dataclass
class Config:
    files: int = 2000
    listing: int = 2000
    seq_bytes: int = 256 * MiB
    block: int = MiB
    small: int = 4096
    loop_seconds: float = 2.0
    rounds: int = 3


Result = dict[str, tuple[float, int]]


def wl_metadata(base: str, cfg: Config, phase: Callable[[str], None]) -> Result:
    d = os.path.join(base, "meta")
    os.mkdir(d)
    n = cfg.files
    old = [os.path.join(d, f"f{i:06d}") for i in range(n)]
    new = [os.path.join(d, f"g{i:06d}") for i in range(n)]
    res: Result = {}
    phase("create")
    t = clock()
    for p in old:
        os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))
    res["create"] = (n / (clock() - t), n)
    phase("stat")
    t = clock()
    for p in old:
        os.stat(p)
    res["stat"] = (n / (clock() - t), n)
    phase("rename")
    t = clock()
    for a, b in zip(old, new, strict=True):
        os.rename(a, b)
    res["rename"] = (n / (clock() - t), n)
    phase("unlink")
    t = clock()
    for p in new:
        os.unlink(p)
    res["unlink"] = (n / (clock() - t), n)
    phase("")
    os.rmdir(d)
    return res


def wl_small(base: str, cfg: Config, phase: Callable[[str], None]) -> Result:
    d = os.path.join(base, "small")
    os.mkdir(d)
    n, size = cfg.files, cfg.small
    paths = [os.path.join(d, f"s{i:06d}") for i in range(n)]
    payload = os.urandom(size)
    phase("small write")
    t = clock()
    for p in paths:
        fd = os.open(p, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        os.write(fd, payload)
        os.close(fd)
    write = n / (clock() - t)
    phase("small read")
    bad = 0
    t = clock()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        if os.read(fd, size) != payload:
            bad += 1
        os.close(fd)
    read = n / (clock() - t)
    phase("")
    if bad:
        raise RuntimeError(f"{bad} of {n} small files read back different data")
    shutil.rmtree(d)
    return {"small write": (write, n), "small read": (read, n)}


def wl_listing(base: str, cfg: Config, phase: Callable[[str], None]) -> Result:
    d = os.path.join(base, "listing")
    os.mkdir(d)
    n = cfg.listing
    for i in range(n):
        os.close(os.open(os.path.join(d, f"entry-{i:06d}"), os.O_CREAT | os.O_WRONLY, 0o644))
    if len(os.listdir(d)) != n:
        raise RuntimeError(f"listing of {d} is not {n} entries long")
    phase("listing")
    count = 0
    t0 = clock()
    while (elapsed := clock() - t0) < cfg.loop_seconds:
        os.listdir(d)
        count += 1
    phase("")
    shutil.rmtree(d)
    return {"listing": (count / elapsed, count)}


def _read_all(fd: int, block: int, buf: mmap.mmap | None = None) -> int:
    total = 0
    if buf is None:
        while n := len(os.read(fd, block)):
            total += n
    else:
        while n := os.readv(fd, [buf]):
            total += n
    return total


def wl_sequential(base: str, cfg: Config, phase: Callable[[str], None]) -> Result:
    p = os.path.join(base, "seq.bin")
    block = memoryview(os.urandom(cfg.block))
    size = cfg.seq_bytes
    ops = size // cfg.block
    phase("seq write")
    fd = os.open(p, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
        t = clock()
        done = 0
        while done < size:
            done += os.write(fd, block)
        os.fsync(fd)
        write_s = clock() - t
    finally:
        os.close(fd)
    res: Result = {"seq write": (size / write_s / MiB, ops)}
    phase("seq read cached")
    fd = os.open(p, os.O_RDONLY)
    try:
        t = clock()
        got = _read_all(fd, cfg.block)
        res["seq read cached"] = (size / (clock() - t) / MiB, ops)
        phase("")
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # the mount's pages (not the source's)
    finally:
        os.close(fd)
    if got != size:
        raise RuntimeError(f"read {got} bytes of {p}, wrote {size}")
    phase("seq read uncached")
    fd = os.open(p, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        t = clock()
        got = _read_all(fd, cfg.block)
        res["seq read uncached"] = (size / (clock() - t) / MiB, ops)
    finally:
        os.close(fd)
    phase("O_DIRECT read")
    buf = mmap.mmap(-1, cfg.block)  # page-aligned
    try:
        fd = os.open(p, os.O_RDONLY | os.O_DIRECT)
        try:
            t = clock()
            got2 = _read_all(fd, cfg.block, buf)
            res["O_DIRECT read"] = (size / (clock() - t) / MiB, ops)
        finally:
            os.close(fd)
    finally:
        buf.close()
    phase("")
    if got != size or got2 != size:
        raise RuntimeError(f"read {got}/{got2} bytes of {p}, wrote {size}")
    os.unlink(p)
    return res


WORKLOADS = (wl_metadata, wl_small, wl_listing, wl_sequential)
ROWS = [("create", "ops/s"), ("stat", "ops/s"), ("rename", "ops/s"), ("unlink", "ops/s"),
        ("small write", "files/s"), ("small read", "files/s"), ("listing", "listings/s"),
        ("seq write", "MiB/s"), ("seq read cached", "MiB/s"), ("seq read uncached", "MiB/s"),
        ("O_DIRECT read", "MiB/s")]


def run_side(side: Side, tmp: str, cfg: Config, tracer: Tracer | None, samples: dict[str, dict[str, list[float]]],
             requests: dict[str, dict[str, str]], facts: dict[str, str], problems: list[str],
             first: bool, log: Callable[[str], None], cpu: dict[str, dict[str, list[float]]]) -> None:
    """One round of every workload on ``side`` (a fresh source directory and mount)."""
    src = tempfile.mkdtemp(prefix=bench.PREFIX + "src-", dir=tmp)
    try:
        with contextlib.ExitStack() as stack:
            daemon = None
            if side.make is None:
                root = src
            else:
                daemon = stack.enter_context(bench.serving(side.make(src), problems))
                root = daemon.path
                if first:
                    facts[side.name] = mount_facts(root)
            trace = tracer if (tracer is not None and first and side.make is not None) else None
            if trace is not None:
                trace.watch(root)
            current: dict[str, Any] = {"name": "", "cpu": 0.0}
            spent: dict[str, float] = {}

            def phase(name: str) -> None:
                now = daemon.cpu_seconds() if daemon is not None else 0.0
                if current["name"]:
                    spent[current["name"]] = now - current["cpu"]
                current["cpu"] = now
                if trace is not None:
                    if current["name"]:
                        counts = trace.counts()
                        requests.setdefault(current["name"], {})[side.name] = counts  # type: ignore[assignment]
                    trace.clear()
                current["name"] = name

            for wl in WORKLOADS:
                base = os.path.join(root, f"{wl.__name__}")
                os.mkdir(base)
                try:
                    res = wl(base, cfg, phase)
                finally:
                    shutil.rmtree(base, ignore_errors=True)
                for key, (value, ops) in res.items():
                    samples.setdefault(key, {}).setdefault(side.name, []).append(value)
                    if key in spent and daemon is not None:
                        cpu.setdefault(key, {}).setdefault(side.name, []).append(spent[key] / ops * 1e6)
                    per = requests.get(key, {}).get(side.name)
                    if isinstance(per, Counter):
                        requests[key][side.name] = _per_op(per, ops)
    finally:
        shutil.rmtree(src, ignore_errors=True)


def _per_op(c: Counter[str], ops: int) -> str:
    lost = c.pop("LOST", 0)
    parts = [f"{name} {n / ops:.3g}" for name, n in c.most_common()]
    return (" ".join(parts) or "none") + (f" (trace lost {lost})" if lost else "")


# --------------------------------------------------------------------------------------------
# FUSE passthrough on ext4


def ext4_passthrough(size: int, runs: int, problems: list[str], log: Callable[[str], None],
                     base: str | None = None) -> dict[str, Any]:
    """Sequential read of a ``size`` file on the root filesystem: native and through passthrough."""
    parent = "/var/tmp"
    fstype = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "--target", parent], capture_output=True,
                            text=True).stdout.strip()
    src = tempfile.mkdtemp(prefix=bench.PREFIX + "ext4-", dir=parent)
    out: dict[str, Any] = {"fstype": fstype, "size_mib": size // MiB, "runs": runs}
    try:
        path = os.path.join(src, "big.bin")
        block = os.urandom(MiB)
        with open(path, "wb") as f:
            for _ in range(size // MiB):
                f.write(block)
            os.fsync(f.fileno())
        def daemon_of(label: str, tree: str) -> Any:
            return bench.Daemon(label, lambda mnt: [
                sys.executable, "-m", "afuse.examples.passthroughfs", src, mnt, "-o", "fsname=fusebench-ext4"],
                ready_line=False, tree=tree)

        daemon = daemon_of("afuse-passthrough", bench.REPO)
        native: list[float] = []
        fuse: list[float] = []
        older: list[float] = []
        with contextlib.ExitStack() as stack:
            stack.enter_context(bench.serving(daemon, problems))
            plan = [("native", path, native), ("afuse", daemon.join("big.bin"), fuse)]
            if base:
                other = stack.enter_context(bench.serving(daemon_of("afuse-base-passthrough", base), problems))
                plan.append(("afuse-base", other.join("big.bin"), older))
            out["mount"] = mount_facts(daemon.path)
            for _ in range(runs):
                for label, p, acc in plan:
                    bench.drop_caches()
                    fd = os.open(p, os.O_RDONLY)
                    try:
                        t = clock()
                        got = _read_all(fd, MiB)
                        acc.append(got / (clock() - t) / MiB)
                    finally:
                        os.close(fd)
                    if got != size:
                        raise RuntimeError(f"{label}: read {got} of {size} bytes")
            stderr = daemon.stderr()
        if "passthrough unavailable" in stderr or "serving their I/O in the daemon" in stderr:
            problems.append("ext4: FUSE passthrough was not used: " + stderr[-500:])
        out.update(native=statistics.median(native), afuse=statistics.median(fuse),
                   samples={"native": native, "afuse": fuse})
        if older:
            out["base"] = statistics.median(older)
            out["samples"]["afuse-base"] = older
        out["ratio"] = out["afuse"] / out["native"]
    finally:
        shutil.rmtree(src, ignore_errors=True)
    return out


# --------------------------------------------------------------------------------------------


def fmt(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def report(names: list[str], samples: dict[str, dict[str, list[float]]], requests: dict[str, dict[str, str]],
           ext4: dict[str, Any] | None, cpu: dict[str, dict[str, list[float]]] | None = None) -> list[str]:
    lines = []
    others = [n for n in ("afuse-default", "afuse-poll", "afuse-base") if n in names]  # labelled rows
    native = "native" in names
    head = ["workload", "unit", *names, "afuse/pyfuse3", "target", *[f"{n}/pyfuse3" for n in others],
            *(["afuse/native"] if native else [])]
    rows = [head]
    for key, unit in ROWS:
        med = {n: statistics.median(samples[key][n]) for n in names if samples.get(key, {}).get(n)}
        row = [key, unit, *[fmt(med[n]) if n in med else "-" for n in names]]
        r = med.get("afuse", 0) / med["pyfuse3"] if med.get("pyfuse3") else 0
        row += [f"{r:.2f}", "met" if r >= TARGET else "MISSED"]
        row += [f"{med.get(n, 0) / med['pyfuse3']:.2f}" if med.get("pyfuse3") else "-" for n in others]
        if native:
            row.append(f"{med.get('afuse', 0) / med['native']:.2f}" if med.get("native") else "-")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for j, r in enumerate(rows):
        lines.append("  ".join(c.ljust(widths[i]) if i < 2 else c.rjust(widths[i]) for i, c in enumerate(r)))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append(f"afuse/pyfuse3 is the headline (same configuration); target >= {TARGET} on every row.")
    if cpu:
        daemons = [n for n in names if n != "native"]
        lines.append("")
        lines.append("Daemon CPU time per operation, us (all its threads; per 1 MiB for the sequential rows; "
                     "less sensitive to a busy machine than the rates above; lower is better):")
        head2 = ["workload", *daemons, "pyfuse3/afuse"]
        rows2 = [head2]
        for key, _unit in ROWS:
            med = {n: statistics.median(cpu[key][n]) for n in daemons if cpu.get(key, {}).get(n)}
            r = med["pyfuse3"] / med["afuse"] if med.get("afuse") and med.get("pyfuse3") else 0
            rows2.append([key, *[fmt(med[n]) if n in med else "-" for n in daemons], f"{r:.2f}"])
        w2 = [max(len(r[i]) for r in rows2) for i in range(len(head2))]
        for j, r in enumerate(rows2):
            lines.append("  ".join(c.ljust(w2[i]) if i == 0 else c.rjust(w2[i]) for i, c in enumerate(r)))
            if j == 0:
                lines.append("  ".join("-" * w for w in w2))
    if requests:
        lines.append("")
        lines.append("FUSE requests per operation (kernel tracepoint fuse_request_send, first round; "
                     "per 1 MiB block for the sequential rows, per listing for listing):")
        for key, _unit in ROWS:
            per = requests.get(key, {})
            for n in names:
                if n in per:
                    lines.append(f"  {key:<18} {n:<14} {per[n]}")
    if ext4:
        lines.append("")
        if "error" in ext4:
            lines.append(f"FUSE passthrough on ext4: failed: {ext4['error']}")
        else:
            lines.append(f"FUSE passthrough, sequential read on the root filesystem ({ext4['fstype']}), "
                         f"{ext4['size_mib']} MiB, 1 MiB blocks, caches dropped, unpinned, median of {ext4['runs']}:")
            lines.append(f"  native {fmt(ext4['native'])} MiB/s   afuse passthrough {fmt(ext4['afuse'])} MiB/s   "
                         f"afuse/native {ext4['ratio']:.3f} (target >= {EXT4_TARGET}: "
                         f"{'met' if ext4['ratio'] >= EXT4_TARGET else 'MISSED'})")
            if "base" in ext4:
                lines.append(f"  afuse-base passthrough {fmt(ext4['base'])} MiB/s   afuse-base/native "
                             f"{ext4['base'] / ext4['native']:.3f}")
            lines.append(f"  samples native {[round(x) for x in ext4['samples']['native']]} "
                         f"afuse {[round(x) for x in ext4['samples']['afuse']]}")
            lines.append(f"  mount: {ext4.get('mount')}")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, one round (a smoke test)")
    p.add_argument("--rounds", type=int, help="rounds per side, median reported (default 3)")
    p.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "afuse-bench"),
                   help="where the baselines are installed (default ~/.cache/afuse-bench)")
    p.add_argument("--tmpdir", default="/dev/shm", help="source directories and mountpoints (default /dev/shm)")
    p.add_argument("--no-libfuse", action="store_true", help="leave out libfuse's passthrough_ll")
    p.add_argument("--no-ext4", action="store_true", help="leave out the FUSE passthrough on ext4 section")
    p.add_argument("--only", help="comma-separated sides to run (afuse,pyfuse3,libfuse,afuse-default,native)")
    p.add_argument("--base", metavar="DIR", help="also run the passthroughfs of the afuse checkout DIR (e.g. "
                   "`git archive` of an older commit) in pyfuse3's configuration: before/after in one run")
    p.add_argument("--json", metavar="FILE", help="also write every figure to FILE")
    p.add_argument("--poll-us", type=float, default=0.0, metavar="US",
                   help="also run afuse in pyfuse3's configuration with --poll-us US (a separate, labelled row)")
    p.add_argument("--pin", type=int, metavar="CPU", help="run this process and every daemon on CPU only (a "
                   "separate, labelled configuration: per-request work counts, cross-CPU wake-ups do not)")
    args = p.parse_args(argv)
    if args.pin is not None:
        os.sched_setaffinity(0, {args.pin})  # daemons and workload children inherit it

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    cfg = Config(files=200, listing=2000, seq_bytes=32 * MiB, loop_seconds=0.5, rounds=1) if args.quick else Config()
    if args.rounds:
        cfg.rounds = args.rounds
    tools = setup(args.cache, log)
    with_libfuse = not args.no_libfuse and os.path.exists(tools["passthrough_ll"])
    all_sides = sides(tools, with_libfuse, os.path.abspath(args.base) if args.base else None, args.poll_us)
    if args.only:
        keep = set(args.only.split(",")) | {"pyfuse3"}
        all_sides = [s for s in all_sides if s.name in keep]
    names = [s.name for s in all_sides]
    tempfile.tempdir = os.path.abspath(args.tmpdir)
    tmp = tempfile.mkdtemp(prefix=bench.PREFIX + "vs-")
    samples: dict[str, dict[str, list[float]]] = {}
    cpu: dict[str, dict[str, list[float]]] = {}
    requests: dict[str, dict[str, str]] = {}
    facts: dict[str, str] = {}
    problems: list[str] = []
    ext4: dict[str, Any] | None = None
    tracer = Tracer()
    if not tracer.ok:
        problems.append(f"no request counts: tracefs instance unavailable ({getattr(tracer, 'error', '?')})")
    t0 = clock()
    load0 = os.getloadavg()[0]
    try:
        for i in range(cfg.rounds):
            for side in all_sides:  # interleaved, so drift spreads over every side
                log(f"round {i + 1}/{cfg.rounds}: {side.name}")
                try:
                    run_side(side, tmp, cfg, tracer, samples, requests, facts, problems, i == 0, log, cpu)
                except Exception as e:
                    traceback.print_exc()
                    problems.append(f"{side.name}: {type(e).__name__}: {e}")
        if not args.no_ext4 and args.pin is not None:
            problems.append("the FUSE passthrough on ext4 section is measured unpinned: run it without --pin")
        elif not args.no_ext4:
            log("FUSE passthrough on ext4")
            size, runs = (64 * MiB, 2) if args.quick else (512 * MiB, 5)
            try:
                ext4 = ext4_passthrough(size, runs, problems, log, os.path.abspath(args.base) if args.base else None)
            except Exception as e:
                traceback.print_exc()
                ext4 = {"error": f"{type(e).__name__}: {e}"}
    except KeyboardInterrupt:
        problems.append("interrupted")
    finally:
        for d in list(bench.Daemon.alive):
            d.stop()
        tracer.close()
        shutil.rmtree(tmp, ignore_errors=True)
    rev = subprocess.run(["git", "-C", bench.REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip()
    pinning = "unpinned" if args.pin is None else f"PINNED: client and every daemon on cpu{args.pin}"
    print(f"afuse vs pyfuse3 {PYFUSE3_VERSION} vs libfuse passthrough_ll — git {rev}, Linux {os.uname().release}, "
          f"{os.cpu_count()} CPUs, source on {args.tmpdir}, {cfg.files} files, {cfg.seq_bytes // MiB} MiB "
          f"sequential, median of {cfg.rounds} round(s), "
          f"{pinning}; load {load0:.2f} -> {os.getloadavg()[0]:.2f}, "
          f"{clock() - t0:.0f} s")
    for s in all_sides:
        print(f"  {s.name:<14} {s.describe}")
        if s.name in facts:
            print(f"  {'':<14} mount: {facts[s.name]}")
    print()
    for line in report(names, samples, requests, ext4, cpu):
        print(line)
    for note in bench.NOTES:
        print("NOTE:", note[-600:])
    for line in problems:
        print("PROBLEM:", line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"samples": samples, "daemon_cpu_us_per_op": cpu, "requests": requests, "mounts": facts,
                       "ext4": ext4, "problems": problems}, f, indent=2, default=str)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
