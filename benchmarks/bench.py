#!/usr/bin/env python3
"""afuse benchmarks: figures and ratios against a baseline measured in the same run.

    python benchmarks/bench.py [--quick] [--json FILE]

Every workload runs twice with the same code: on a temporary source directory itself
("native") and on afuse's passthroughfs mirroring that directory ("afuse"). Each filesystem
daemon is a separate process (``python -m afuse.testing FACTORY MOUNTPOINT ...``); this process
only ever touches the mounts from the outside.

Workloads:

1. metadata   create (open O_CREAT|O_WRONLY + close), stat, readdir, rename, unlink of N files
2. sequential write (1 MiB os.write, fsync) then read (caches dropped, fresh open) of one file;
   "afuse" is passthroughfs serving every READ and WRITE itself (passthrough not negotiated), and
   a second section repeats it on passthroughfs with FUSE passthrough (FOPEN_PASSTHROUGH: the
   kernel reads and writes the source file; target >= 0.9 of native)
3. small files write then read back N files of 4 KiB
4. listing    os.listdir of an N-entry directory in a loop
5. latency    os.stat on HelloFS with attr_timeout = 0: one GETATTR round trip per call, daemon and
              client pinned to one CPU, and unpinned
6. pyfuse3    the same latency test on a pyfuse3 filesystem, if pyfuse3 is installed

``--also-fs MODULE:FACTORY`` adds another passthrough filesystem on the same source as columns
"also" for workloads 1-4 (two implementations compared in one run). ``--memfs`` adds afuse's
in-memory MemFS as columns too (afuse's own cost, without a backing filesystem).
``--tmpdir DIR`` puts the source directory (and mountpoints) on DIR's filesystem, e.g. /dev/shm
to take the disk out of the native figures. For reference the latency section also times a
1-byte pipe ping-pong between two Python processes: the floor under any round trip to a daemon
process on this machine.

Nothing here asserts anything about speed: it prints figures (and ``--json`` writes them).
All mounts and temporary directories are removed on exit, Ctrl-C and failure. The figures are
only as steady as the machine: other busy processes skew them (the load average is printed).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from afuse import device  # noqa: E402  (after the path, so a plain checkout works)

PASSTHROUGH = "afuse.examples.passthroughfs:PassthroughFS"
MEMFS = "afuse.examples.memfs:MemFS"
#: Extra columns of workloads 1-4: ``--memfs`` and ``--also-fs``'s filesystem.
EXTRA_COLUMNS = ("memfs", "also")
LATENCY_FS = "benchmarks._latencyfs:ZeroTimeoutHello"
LATENCY_NODES_FS = "benchmarks._latencyfs:ZeroTimeoutNodeHello"
LISTING_TARGET = 500.0  # listings/s, afuse's target for a 2,000-entry directory
LATENCY_TARGET = 15.0  # µs per GETATTR round trip, pinned
PASSTHROUGH_RATIO_TARGET = 0.9  # sequential throughput with FUSE passthrough, of native

MiB = 1 << 20
#: Names of the temporary mountpoints and source directories, and the mounts' fsname.
PREFIX = "fusebench-"
clock = time.perf_counter


class Phase:
    """One timed phase of a workload: its rate, and the CPU the daemon serving the root used per
    operation meanwhile (steadier than wall-clock rates on a busy machine)."""

    #: The CPU seconds of the daemon serving the root the workload runs on now (set by compare(); None: native).
    probe: ClassVar[Callable[[], float] | None] = None
    #: phase -> daemon CPU microseconds per operation, of the workload run that just ended.
    cpu_us: ClassVar[dict[str, float]] = {}

    def __init__(self) -> None:
        self.cpu = Phase.probe() if Phase.probe is not None else 0.0
        self.t = clock()

    def rate(self, name: str, n: int) -> float:
        """``n`` operations per second since the phase began; records the daemon's CPU per operation."""
        elapsed = clock() - self.t
        if Phase.probe is not None:
            Phase.cpu_us[name] = (Phase.probe() - self.cpu) / n * 1e6
        return n / elapsed


@dataclass
class Config:
    files: int = 2000  # metadata, small files and listing
    seq_bytes: int = 256 * MiB
    block: int = MiB
    small_size: int = 4096
    loop_seconds: float = 2.0  # listing and latency loops
    repeat: int = 3  # metadata, small files and sequential: median of this many runs
    quick: bool = False
    #: Another checkout of afuse whose GETATTR round trip is measured beside this one's.
    compare_tree: str | None = None


# --------------------------------------------------------------------------------------------
# mounts and daemons


def tracefs_root(root: str = "/sys/kernel/tracing") -> str:
    """The tracefs root, mounting tracefs there first if it is not (a fresh machine): raises OSError."""
    if not os.path.isdir(os.path.join(root, "events")):
        res = subprocess.run(["mount", "-t", "tracefs", "nodev", root], capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise OSError(f"cannot mount tracefs on {root}: {res.stderr.strip() or res.returncode}")
    return root


def mounted_here(path: str) -> bool:
    """True if ``path`` is a mountpoint (never stats it: a dead FUSE mount root would hang)."""
    return device.resolve_mountpoint(path) in {mp for mp, _t, _s in device.find_mounts("")}


class Daemon:
    """A filesystem served by a child process on a fresh mountpoint."""

    alive: ClassVar[list[Daemon]] = []

    def __init__(self, label: str, cmd_for: Callable[[str], list[str]], cpu: int | None = None,
                 tree: str = REPO, ready_line: bool = True, ok_codes: tuple[int, ...] = (0,)) -> None:
        self.label = label
        #: Exit statuses after SIGTERM that are not failures (libfuse's examples exit 1).
        self.ok_codes = ok_codes
        #: The daemon prints "ready" once mounted (else: mounted once the mountpoint is a mount).
        self.ready_line = ready_line
        self.cpu = cpu
        #: The checkout whose afuse the daemon imports.
        self.tree = tree
        self.path = tempfile.mkdtemp(prefix=PREFIX + "mnt-")
        os.chmod(self.path, 0o755)
        self.cmd = cmd_for(self.path)
        self.log = tempfile.TemporaryFile()
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None
        #: The mount vanished while the daemon still ran: unmounted by someone else.
        self.detached = False
        self.started = False

    def start(self, timeout: float = 30.0) -> Daemon:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (self.tree, env.get("PYTHONPATH")) if p)
        cpu = self.cpu

        def pin() -> None:  # in the child before exec: every thread it starts inherits it
            if cpu is not None:
                os.sched_setaffinity(0, {cpu})

        Daemon.alive.append(self)
        self.proc = subprocess.Popen(
            self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.log, env=env,
            cwd=self.tree, start_new_session=True,  # Ctrl-C reaches us only; we stop it in order
            preexec_fn=pin if cpu is not None else None)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = b"" if self.ready_line else b"ready"
        while self.ready_line and time.monotonic() < deadline and self.proc.poll() is None:
            r, _, _ = select.select([self.proc.stdout], [], [], 0.1)
            if r:
                line = self.proc.stdout.readline()
                break
        while (line.strip() == b"ready" and not mounted_here(self.path) and time.monotonic() < deadline
               and self.proc.poll() is None):
            time.sleep(0.01)
        if line.strip() != b"ready" or not mounted_here(self.path):
            self.stop()
            raise RuntimeError(f"{self.label}: filesystem process did not mount {self.path} "
                               f"(exit {self.returncode}): {self.stderr()[-2000:]}")
        self.started = True
        return self

    def join(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    def cpu_seconds(self) -> float:
        """CPU time the daemon's threads have used so far (schedstat: nanosecond resolution)."""
        if self.proc is None:
            return 0.0
        total = 0
        base = f"/proc/{self.proc.pid}/task"
        with contextlib.suppress(OSError):
            for tid in os.listdir(base):
                with contextlib.suppress(OSError), open(f"{base}/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
        return total / 1e9

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM the daemon (it unmounts), kill it if needed, lazily unmount what is left."""
        proc = self.proc
        if self.started and not mounted_here(self.path):
            self.detached = True  # we have not asked it to stop yet
        self.started = False
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        if proc is not None:
            self.returncode = proc.returncode
            if proc.stdout is not None:
                proc.stdout.close()
        if mounted_here(self.path):
            subprocess.run(["umount", "-l", self.path], check=False, stderr=subprocess.DEVNULL)
        if not mounted_here(self.path):
            with contextlib.suppress(OSError):
                os.rmdir(self.path)
        if self in Daemon.alive:
            Daemon.alive.remove(self)
        return self.returncode

    @property
    def failed(self) -> bool:
        """The daemon exited abnormally (afuse.testing exits 1 if a handler raised)."""
        return self.returncode not in (*self.ok_codes, -signal.SIGTERM, None)


def afuse_daemon(label: str, factory: str, args: list[str], cpu: int | None = None, tree: str = REPO) -> Daemon:
    name = PREFIX + label.split()[0]
    return Daemon(label, lambda mnt: [sys.executable, "-m", "afuse.testing", factory, mnt,
                                      "-o", f"fsname={name}", *args], cpu=cpu, tree=tree)


#: passthroughfs with FUSE passthrough negotiated (``afuse.testing`` serves the default config).
_PASSTHROUGH_DAEMON = """
import signal, sys
from functools import partial
import trio
import afuse
from afuse.examples.passthroughfs import PassthroughFS
from afuse.running import serve_until_signalled
from afuse.wire.init import InitConfig
src, mnt, fsname = sys.argv[1:4]
ops = PassthroughFS(src)
failed = False
async def main():
    global failed
    async with afuse.mount(ops, mnt, options="fsname=" + fsname, config=InitConfig(passthrough=True)) as session:
        if ops.passthrough_unavailable:
            print("passthrough unavailable: " + ops.passthrough_unavailable, file=sys.stderr, flush=True)
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve_until_signalled, session, signals=(signal.SIGTERM, signal.SIGINT)))
            print("ready", flush=True)
    failed = bool(session.errors)
trio.run(main)
ops.close()
sys.exit(1 if failed else 0)
"""


def passthrough_daemon(label: str, src: str, cpu: int | None = None) -> Daemon:
    """passthroughfs on ``src`` with FUSE passthrough (regular files: no READ/WRITE requests)."""
    name = PREFIX + label.split()[0]
    return Daemon(label, lambda mnt: [sys.executable, "-c", _PASSTHROUGH_DAEMON, src, mnt, name], cpu=cpu)


def script_daemon(kind: str, label: str, cpu: int | None = None) -> Daemon:
    """``benchmarks/_latencyfs.py KIND MOUNTPOINT``: the pyfuse3 or the bare-loop hello."""
    script = os.path.join(HERE, "_latencyfs.py")
    return Daemon(label, lambda mnt: [sys.executable, script, kind, mnt], cpu=cpu)


#: Things worth a look that do not void the figures (daemons' warnings).
NOTES: list[str] = []


@contextlib.contextmanager
def serving(daemon: Daemon, problems: list[str]) -> Iterator[Daemon]:
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()
        if daemon.detached:
            problems.append(f"{daemon.label}: {daemon.path} was unmounted from outside while the benchmark "
                            "ran; its figures are void")
        text = daemon.stderr().strip()
        if text and not daemon.failed:
            NOTES.append(f"{daemon.label} wrote to stderr: {text[-3000:]}")
        if daemon.failed:
            problems.append(f"{daemon.label}: daemon exited {daemon.returncode}: {daemon.stderr().strip()[-3000:]}")


# --------------------------------------------------------------------------------------------
# workloads (the same code on the native directory and on the mount)


def drop_caches() -> bool:
    """Write back and drop the page, dentry and inode caches; False if not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def wl_metadata(base: str, cfg: Config) -> dict[str, float]:
    d = os.path.join(base, "meta")
    os.mkdir(d)
    n = cfg.files
    old = [os.path.join(d, f"f{i:06d}") for i in range(n)]
    new = [os.path.join(d, f"g{i:06d}") for i in range(n)]
    res: dict[str, float] = {}
    ph = Phase()
    for p in old:
        os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))
    res["create"] = ph.rate("create", n)
    ph = Phase()
    for p in old:
        os.stat(p)
    res["stat"] = ph.rate("stat", n)
    ph = Phase()
    listed = os.listdir(d)
    res["readdir"] = ph.rate("readdir", n)  # entries per second
    if len(listed) != n:
        raise RuntimeError(f"readdir of {d} listed {len(listed)} entries, expected {n}")
    ph = Phase()
    for a, b in zip(old, new, strict=True):
        os.rename(a, b)
    res["rename"] = ph.rate("rename", n)
    ph = Phase()
    for p in new:
        os.unlink(p)
    res["unlink"] = ph.rate("unlink", n)
    os.rmdir(d)
    return res


def wl_sequential(base: str, cfg: Config) -> dict[str, float]:
    p = os.path.join(base, "seq.bin")
    block = memoryview(os.urandom(cfg.block))
    size = cfg.seq_bytes
    fd = os.open(p, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
        t = clock()
        done = 0
        while done < size:
            done += os.write(fd, block[: min(cfg.block, size - done)])
        os.fsync(fd)
        write_s = clock() - t
    finally:
        os.close(fd)
    dropped = drop_caches()
    if not dropped:  # fall back to evicting just this file's pages
        fd = os.open(p, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    fd = os.open(p, os.O_RDONLY)  # opened fresh after the caches were dropped
    try:
        t = clock()
        total = 0
        while True:
            n = len(os.read(fd, cfg.block))
            if not n:
                break
            total += n
        read_s = clock() - t
    finally:
        os.close(fd)
    os.unlink(p)
    if total != size:
        raise RuntimeError(f"read back {total} bytes of {p}, wrote {size}")
    return {"write": size / write_s / 1e6, "read": size / read_s / 1e6, "caches_dropped": dropped}


def wl_small(base: str, cfg: Config) -> dict[str, float]:
    d = os.path.join(base, "small")
    os.mkdir(d)
    n, size = cfg.files, cfg.small_size
    paths = [os.path.join(d, f"s{i:06d}") for i in range(n)]
    payload = os.urandom(size)
    ph = Phase()
    for p in paths:
        fd = os.open(p, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        os.write(fd, payload)
        os.close(fd)
    write = ph.rate("write", n)
    bad = 0
    ph = Phase()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        if os.read(fd, size) != payload:
            bad += 1
        os.close(fd)
    read = ph.rate("read", n)
    if bad:
        raise RuntimeError(f"{bad} of {n} small files read back different data")
    shutil.rmtree(d)  # not timed
    return {"write": write, "read": read}


def wl_listing(base: str, cfg: Config) -> dict[str, float]:
    d = os.path.join(base, "listing")
    os.mkdir(d)
    n = cfg.files
    for i in range(n):
        os.close(os.open(os.path.join(d, f"entry-{i:06d}"), os.O_CREAT | os.O_WRONLY, 0o644))
    if len(os.listdir(d)) != n:  # also warms the caches
        raise RuntimeError(f"listing of {d} is not {n} entries long")
    count = 0
    t0 = clock()
    while (elapsed := clock() - t0) < cfg.loop_seconds:
        os.listdir(d)
        count += 1
    shutil.rmtree(d)
    return {"listdir": count / elapsed}


def stat_loop_us(path: str, seconds: float) -> float:
    """Microseconds per os.stat(path), over about ``seconds``."""
    st = os.stat
    st(path)
    count = 0
    t0 = clock()
    while (elapsed := clock() - t0) < seconds:
        for _ in range(200):
            st(path)
        count += 200
    return elapsed / count * 1e6


def pipe_roundtrip_us(cpu: int | None, seconds: float) -> float:
    """Microseconds per 1-byte ping-pong with a child process over pipes (both on ``cpu`` if set).

    The floor under any FUSE round trip: two context switches between two Python processes.
    """
    to_child_r, to_child_w = os.pipe()
    to_parent_r, to_parent_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the echo child: never returns into the benchmark
        try:
            if cpu is not None:
                os.sched_setaffinity(0, {cpu})
            os.close(to_child_w)
            os.close(to_parent_r)
            while (b := os.read(to_child_r, 1)) and b != b"q":
                os.write(to_parent_w, b)
        finally:
            os._exit(0)
    os.close(to_child_r)
    os.close(to_parent_w)
    try:
        with pinned(cpu):
            os.write(to_child_w, b"x")
            os.read(to_parent_r, 1)
            count = 0
            t0 = clock()
            while (elapsed := clock() - t0) < seconds:
                for _ in range(200):
                    os.write(to_child_w, b"x")
                    os.read(to_parent_r, 1)
                count += 200
    finally:
        with contextlib.suppress(OSError):
            os.write(to_child_w, b"q")
        os.close(to_child_w)
        os.close(to_parent_r)
        os.waitpid(pid, 0)
    return elapsed / count * 1e6


@contextlib.contextmanager
def pinned(cpu: int | None) -> Iterator[None]:
    """Pin this (client) process to ``cpu`` for the block."""
    if cpu is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


# --------------------------------------------------------------------------------------------
# running and reporting


def figure(native: list[float], afuse: list[float], unit: str, higher_is_better: bool = True,
           **extra: Any) -> dict[str, Any]:
    nat, af = statistics.median(native), statistics.median(afuse)
    out = {"unit": unit, "native": nat, "afuse": af, "ratio": af / nat,
           "higher_is_better": higher_is_better,
           "samples": {"native": native, "afuse": afuse}}
    out.update(extra)
    return out


def compare(workload: Callable[[str, Config], dict[str, float]], name: str, roots: dict[str, str],
            cfg: Config, repeat: int, probes: dict[str, Callable[[], float]] | None = None,
            cpu: dict[str, dict[str, list[float]]] | None = None) -> dict[str, dict[str, list[Any]]]:
    """Run ``workload`` ``repeat`` times on each root in turn; phase -> root label -> samples.
    ``probes``: root label -> its daemon's CPU seconds; the daemon CPU per operation of each
    phase goes to ``cpu`` (phase -> root label -> samples, in microseconds)."""
    samples: dict[str, dict[str, list[Any]]] = {}
    for i in range(repeat):
        for label, root in roots.items():
            base = os.path.join(root, f"{name}-{label}-{i}")
            os.mkdir(base)
            Phase.probe, Phase.cpu_us = (probes or {}).get(label), {}
            try:
                res = workload(base, cfg)
            finally:
                Phase.probe = None
                shutil.rmtree(base, ignore_errors=True)
            for key, value in res.items():
                samples.setdefault(key, {}).setdefault(label, []).append(value)
            if cpu is not None:
                for key, us in Phase.cpu_us.items():
                    cpu.setdefault(key, {}).setdefault(label, []).append(us)
    return samples


def run_filesystems(cfg: Config, factory: str, with_memfs: bool, pin: int | None, results: dict[str, Any],
                    problems: list[str], tmp: str, log: Callable[[str], None], also: str | None = None) -> None:
    src = tempfile.mkdtemp(prefix=PREFIX + "src-", dir=tmp)
    try:
        with contextlib.ExitStack() as stack:
            fs = stack.enter_context(serving(afuse_daemon("passthroughfs", factory, [src], cpu=pin), problems))
            daemons = [fs]
            roots = {"native": src, "afuse": fs.path}
            probes = {"afuse": fs.cpu_seconds}
            if with_memfs:
                mem = stack.enter_context(serving(afuse_daemon("memfs", MEMFS, [], cpu=pin), problems))
                daemons.append(mem)
                roots["memfs"] = mem.path
                probes["memfs"] = mem.cpu_seconds
            if also:
                other = stack.enter_context(serving(afuse_daemon("also", also, [src], cpu=pin), problems))
                daemons.append(other)
                roots["also"] = other.path
                probes["also"] = other.cpu_seconds
            n = cfg.files
            plan: list[tuple[str, str, Callable[[str, Config], dict[str, float]], int, str]] = [
                ("metadata", f"metadata, {n} files", wl_metadata, cfg.repeat, "ops/s"),
                ("sequential", f"sequential {cfg.seq_bytes // MiB} MiB, {cfg.block // 1024} KiB blocks",
                 wl_sequential, cfg.repeat, "MB/s"),
                ("small_files", f"small files, {n} x {cfg.small_size // 1024} KiB", wl_small, cfg.repeat,
                 "files/s"),
                ("listing", f"listing, {n} entries, {cfg.loop_seconds:g} s", wl_listing, 1, "listings/s"),
            ]
            for key, title, workload, repeat, unit in plan:
                log(f"  {title} ...")
                t = clock()
                cpu: dict[str, dict[str, list[float]]] = {}
                try:
                    with pinned(pin):
                        samples = compare(workload, key, roots, cfg, repeat, probes, cpu)
                except Exception as e:  # report it, carry on with the other workloads
                    problems.append(f"{key}: {type(e).__name__}: {e}")
                    traceback.print_exc()
                    dead = [d.label for d in daemons if d.proc is not None and d.proc.poll() is not None]
                    if dead:
                        problems.append(f"{', '.join(dead)} died; skipping the remaining workloads")
                        break
                    continue
                out: dict[str, Any] = {"title": title}
                if cpu:  # phase -> root label -> median daemon CPU us per operation
                    out["daemon_cpu_us"] = {phase: {label: statistics.median(v) for label, v in by_root.items()}
                                            for phase, by_root in cpu.items()}
                for phase, by_root in samples.items():
                    if phase == "caches_dropped":
                        out[phase] = all(all(v) for v in by_root.values())
                        continue
                    unit_here = "entries/s" if phase == "readdir" else unit
                    extra: dict[str, Any] = {"target": LISTING_TARGET} if key == "listing" else {}
                    for col in EXTRA_COLUMNS:
                        if col in by_root:
                            col_fig = statistics.median(by_root[col])
                            extra[col] = col_fig
                            extra[f"{col}_ratio"] = col_fig / statistics.median(by_root["native"])
                    out[phase] = figure(by_root["native"], by_root["afuse"], unit_here, **extra)
                    for col in EXTRA_COLUMNS:
                        if col in by_root:
                            out[phase]["samples"][col] = by_root[col]
                results[key] = out
                log(f"    done in {clock() - t:.1f} s")
        run_passthrough(cfg, src, pin, results, problems, log)
    finally:
        shutil.rmtree(src, ignore_errors=True)


def run_passthrough(cfg: Config, src: str, pin: int | None, results: dict[str, Any], problems: list[str],
                    log: Callable[[str], None]) -> None:
    """Sequential I/O on passthroughfs with FUSE passthrough, against native (a section of its own)."""
    title = f"sequential {cfg.seq_bytes // MiB} MiB, passthroughfs (FUSE passthrough)"
    log(f"  {title} ...")
    t = clock()
    try:
        with serving(passthrough_daemon("passthroughfs-pt", src, cpu=pin), problems) as fs:
            with pinned(pin):
                samples = compare(wl_sequential, "seqpt", {"native": src, "afuse": fs.path}, cfg, cfg.repeat)
            active = "passthrough unavailable" not in fs.stderr()
    except Exception as e:
        problems.append(f"sequential_passthrough: {type(e).__name__}: {e}")
        traceback.print_exc()
        return
    out: dict[str, Any] = {"title": title, "passthrough_active": active}
    for phase, by_root in samples.items():
        if phase == "caches_dropped":
            out[phase] = all(all(v) for v in by_root.values())
            continue
        out[phase] = figure(by_root["native"], by_root["afuse"], "MB/s", ratio_target=PASSTHROUGH_RATIO_TARGET)
    if not active:
        NOTES.append("passthroughfs (FUSE passthrough): passthrough was unavailable, the daemon served the "
                     "I/O itself; those figures are not passthrough figures")
    results["sequential_passthrough"] = out
    log(f"    done in {clock() - t:.1f} s")


def pick_cpu() -> int:
    cpus = os.sched_getaffinity(0)
    return 0 if 0 in cpus else min(cpus)


def run_latency(cfg: Config, results: dict[str, Any], problems: list[str], tmp: str,
                log: Callable[[str], None], have_pyfuse3: bool) -> None:
    cpu = pick_cpu()
    secs = cfg.loop_seconds
    # Native reference: stat of a file on the temporary directory's filesystem.
    ref = tempfile.mkdtemp(prefix=PREFIX + "ref-", dir=tmp)
    try:
        path = os.path.join(ref, "hello")
        with open(path, "wb") as f:
            f.write(b"Hello, world!\n")
        with pinned(cpu):
            native_pinned = stat_loop_us(path, secs / 2)
        native_unpinned = stat_loop_us(path, secs / 2)
    finally:
        shutil.rmtree(ref, ignore_errors=True)
    pipe_pinned = pipe_roundtrip_us(cpu, secs / 2)
    pipe_unpinned = pipe_roundtrip_us(None, secs / 2)

    lookups: dict[str, list[float]] = {}  # FAST's LOOKUP+GETATTR row: label -> [pinned, unpinned]

    def measure(make: Callable[[int | None], Daemon], row: str | None = None) -> tuple[float, float]:
        out = []
        for pin in (cpu, None):
            with serving(make(pin), problems) as fs:
                with pinned(pin):
                    out.append(stat_loop_us(fs.join("hello"), secs))
                    if row is not None and os.path.exists(fs.join("fresh")):  # older trees lack it
                        lookups.setdefault(row, []).append(stat_loop_us(fs.join("fresh"), secs))
        return out[0], out[1]

    log("  GETATTR latency, afuse HelloFS (attr_timeout=0) ...")
    af_pinned, af_unpinned = measure(lambda pin: afuse_daemon(
        f"latency hello (cpu {pin})", LATENCY_FS, [], cpu=pin), "afuse")
    log("  GETATTR latency, the same file on nodes (NodeFS bridge) ...")
    nodes_pinned, nodes_unpinned = measure(lambda pin: afuse_daemon(
        f"nodes hello (cpu {pin})", LATENCY_NODES_FS, [], cpu=pin))
    if cfg.compare_tree:
        log(f"  GETATTR latency, afuse HelloFS from {cfg.compare_tree} ...")
        cmp_pinned, cmp_unpinned = measure(lambda pin: afuse_daemon(
            f"compare hello (cpu {pin})", LATENCY_FS, [], cpu=pin, tree=cfg.compare_tree or REPO), "compare")
        # Measure this tree once more after it, so drift during the run shows.
        again_pinned, again_unpinned = measure(lambda pin: afuse_daemon(
            f"latency hello (cpu {pin})", LATENCY_FS, [], cpu=pin))
    log("  GETATTR latency, bare blocking-loop hello (afuse wire codecs only) ...")
    raw_pinned, raw_unpinned = measure(lambda pin: script_daemon("raw", f"bare-loop hello (cpu {pin})", pin),
                                       "bare_loop")
    results["latency"] = {
        "title": f"GETATTR round trip (os.stat, attr_timeout=0), {secs:g} s",
        "pinned_to": f"cpu{cpu}",
        "getattr_pinned": {"unit": "us", "native": native_pinned, "afuse": af_pinned,
                           "ratio": af_pinned / native_pinned, "higher_is_better": False,
                           "target": LATENCY_TARGET},
        "getattr_unpinned": {"unit": "us", "native": native_unpinned, "afuse": af_unpinned,
                             "ratio": af_unpinned / native_unpinned, "higher_is_better": False},
        "pipe_roundtrip": {"unit": "us", "pinned": pipe_pinned, "unpinned": pipe_unpinned},
        "bare_loop": {"unit": "us", "pinned": raw_pinned, "unpinned": raw_unpinned},
        "nodes": {"unit": "us", "pinned": nodes_pinned, "unpinned": nodes_unpinned},
    }
    if lookups:
        # Beside "latency", not in it: the table reads every dict there with "afuse" as a figure.
        results["lookup_getattr"] = {"unit": "us", **{k: v for k, v in lookups.items() if len(v) == 2}}
    if cfg.compare_tree:
        results["latency"]["compare"] = {
            "unit": "us", "tree": cfg.compare_tree, "pinned": cmp_pinned, "unpinned": cmp_unpinned,
            "this_tree_again": {"pinned": again_pinned, "unpinned": again_unpinned}}
    if not have_pyfuse3:
        results["pyfuse3"] = {"available": False}
        return
    log("  GETATTR latency, pyfuse3 hello (attr_timeout=0) ...")
    try:
        py_pinned, py_unpinned = measure(lambda pin: script_daemon("pyfuse3", f"pyfuse3 hello (cpu {pin})", pin))
    except Exception as e:
        problems.append(f"pyfuse3 baseline: {type(e).__name__}: {e}")
        results["pyfuse3"] = {"available": False, "error": str(e)}
        return
    import pyfuse3  # type: ignore[import-not-found]  # only for its version

    results["pyfuse3"] = {
        "available": True,
        "version": getattr(pyfuse3, "__version__", "?"),
        "getattr_pinned": {"unit": "us", "pyfuse3": py_pinned, "afuse": af_pinned,
                           "ratio": af_pinned / py_pinned, "higher_is_better": False},
        "getattr_unpinned": {"unit": "us", "pyfuse3": py_unpinned, "afuse": af_unpinned,
                             "ratio": af_unpinned / py_unpinned, "higher_is_better": False},
        "passthrough": "skipped: pyfuse3's passthrough example is not shipped in the wheel",
    }


def fmt(value: float) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def report(results: dict[str, Any]) -> str:
    cols = [col for col in EXTRA_COLUMNS
            if any(isinstance(f, dict) and col in f for key in ("metadata", "sequential", "small_files", "listing")
                   for f in (results.get(key) or {}).values())]
    head = ["workload", "measure", "unit", "native", "afuse", "afuse/native"]
    for col in cols:
        head += [col, f"{col}/native"]
    if "also" in cols:  # two implementations in one run: how the first compares with the second
        head.append("afuse/also")
    rows: list[list[str]] = [[*head, "note"]]
    for key in ("metadata", "sequential", "sequential_passthrough", "small_files", "listing", "latency"):
        section = results.get(key)
        if not section:
            continue
        title = section["title"]
        for phase, fig in section.items():
            if not isinstance(fig, dict) or "afuse" not in fig:
                continue
            note = ""
            if "target" in fig:
                cmp = ">=" if fig["higher_is_better"] else "<="
                met = fig["afuse"] >= fig["target"] if fig["higher_is_better"] else fig["afuse"] <= fig["target"]
                note = f"target {cmp} {fig['target']:g}: {'met' if met else 'not met'}"
            elif key.startswith("sequential"):
                note = "caches dropped before read" if section.get("caches_dropped") else "fadvise only"
            if "ratio_target" in fig:
                met = fig["ratio"] >= fig["ratio_target"]
                note = (f"target ratio >= {fig['ratio_target']:g}: {'met' if met else 'not met'}"
                        + ("" if section.get("passthrough_active", True) else " (PASSTHROUGH UNAVAILABLE)")
                        + (f"; {note}" if note else ""))
            if not fig["higher_is_better"]:
                note = (note + "; " if note else "") + "lower is better"
            row = [title, phase.replace("_", " "), fig["unit"], fmt(fig["native"]), fmt(fig["afuse"]),
                   f"{fig['ratio']:.3f}"]
            for col in cols:
                row += [fmt(fig[col]), f"{fig[f'{col}_ratio']:.3f}"] if col in fig else ["", ""]
            if "also" in cols:
                row.append(f"{fig['afuse'] / fig['also']:.3f}" if fig.get("also") else "")
            rows.append([*row, note])
            title = ""
    left = {0, 1, 2, len(head)}
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, r in enumerate(rows):
        cells = [r[i].ljust(widths[i]) if i in left else r[i].rjust(widths[i]) for i in range(len(r))]
        lines.append("  ".join(cells).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("")
    lines.append("afuse/native: afuse's figure divided by native's (throughput: 1.0 = native speed, "
                 "lower = slower; latency in us: how many times native's stat time). "
                 "Native latency = os.stat of a file on the source filesystem.")
    if "also" in cols:
        lines.append("afuse/also: afuse's throughput divided by the --also-fs filesystem's, measured in the "
                     "same run (1.0 = as fast; e.g. node passthroughfs / lowlevel_passthroughfs).")
    cpu_rows = [(results[key]["title"], phase, by_root) for key in ("metadata", "small_files")
                for phase, by_root in ((results.get(key) or {}).get("daemon_cpu_us") or {}).items()]
    if cpu_rows:
        labels = ["afuse", *[c for c in EXTRA_COLUMNS if any(c in b for _t, _p, b in cpu_rows)]]
        lines.append("Daemon CPU per operation, us (median; all the daemon's threads; steadier than the rates "
                     "on a busy machine):")
        lines.append(f"  {'workload':<28} {'measure':<8}" + "".join(f" {lb:>8}" for lb in labels)
                     + ("  afuse/also" if "also" in labels else ""))
        for title, phase, by_root in cpu_rows:
            text = f"  {title:<28} {phase:<8}" + "".join(
                f" {by_root[lb]:8.1f}" if lb in by_root else f" {'':>8}" for lb in labels)
            if "also" in labels and by_root.get("also"):
                text += f"  {by_root['afuse'] / by_root['also']:10.3f}"
            lines.append(text)
    lat = results.get("latency") or {}
    if lat:
        pipe, bare = lat["pipe_roundtrip"], lat["bare_loop"]
        af_p, af_u = lat["getattr_pinned"]["afuse"], lat["getattr_unpinned"]["afuse"]
        lines.append("GETATTR references, us pinned / unpinned:")
        lines.append(f"  1-byte pipe ping-pong between two Python processes  {pipe['pinned']:6.1f} / "
                     f"{pipe['unpinned']:.1f}")
        lines.append(f"  bare blocking-loop daemon (afuse wire codecs only)  {bare['pinned']:6.1f} / "
                     f"{bare['unpinned']:.1f}")
        lines.append(f"  afuse (session, trio, dispatcher)                   {af_p:6.1f} / {af_u:.1f}"
                     f"   -> afuse/bare loop {af_p / bare['pinned']:.2f} / {af_u / bare['unpinned']:.2f}")
        nodes = lat.get("nodes")
        if nodes:
            lines.append(f"  afuse nodes (the same file through NodeFS)          {nodes['pinned']:6.1f} / "
                         f"{nodes['unpinned']:.1f}")
        other = lat.get("compare")
        if other:
            again = other["this_tree_again"]
            lines.append(f"  afuse, this tree measured again after the other     {again['pinned']:6.1f} / "
                         f"{again['unpinned']:.1f}")
            lines.append(f"  afuse from {other['tree']:<40} {other['pinned']:6.1f} / {other['unpinned']:.1f}"
                         f"   -> this/that (mean of both runs) "
                         f"{(af_p + again['pinned']) / 2 / other['pinned']:.2f} / "
                         f"{(af_u + again['unpinned']) / 2 / other['unpinned']:.2f}")
        lk = results.get("lookup_getattr")
        if lk:
            lines.append("LOOKUP+GETATTR references (stat of a name answered with entry_timeout=0: one LOOKUP and "
                         "one GETATTR per call), us pinned / unpinned:")
            tree = (other or {}).get("tree", "?")
            for key, what in (("bare_loop", "bare blocking-loop daemon"),
                              ("afuse", "afuse (session, trio, dispatcher)"), ("compare", f"afuse from {tree}")):
                if key in lk:
                    p_, u_ = lk[key]
                    lines.append(f"  {what:<51} {p_:6.1f} / {u_:.1f}")
    py = results.get("pyfuse3")
    lines.append("")
    if py is None:
        pass
    elif not py.get("available"):
        if "error" in py:
            lines.append(f"pyfuse3 baseline failed: {py['error']}")
        else:
            lines.append("pyfuse3 not installed: baseline skipped")
    else:
        lines.append(f"pyfuse3 {py['version']} baseline (same hello filesystem, attr_timeout=0; "
                     "passthrough part skipped: not shipped in the wheel)")
        lines.append(f"  {'measure':<18} {'pyfuse3 us':>11} {'afuse us':>9} {'afuse/pyfuse3':>14}")
        for phase in ("getattr_pinned", "getattr_unpinned"):
            f = py[phase]
            lines.append(f"  {phase.replace('_', ' '):<18} {fmt(f['pyfuse3']):>11} {fmt(f['afuse']):>9} "
                         f"{f['ratio']:>14.3f}")
    return "\n".join(lines)


def environment(cfg: Config, factory: str) -> dict[str, Any]:
    rev = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True, check=False).stdout.strip()
    return {
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "git": rev or "?",
        "filesystem": factory,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "loadavg_start": os.getloadavg()[0],
    }


def _raise_interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes and short loops (a smoke test, ~20 s)")
    p.add_argument("--json", metavar="FILE", help="also write every figure to FILE")
    p.add_argument("--fs", default=PASSTHROUGH, metavar="MODULE:FACTORY",
                   help=f"passthrough filesystem taking the source directory (default {PASSTHROUGH})")
    p.add_argument("--also-fs", metavar="MODULE:FACTORY",
                   help="also run workloads 1-4 on this passthrough filesystem (same source directory), as extra "
                        "columns \"also\": e.g. afuse.examples.lowlevel_passthroughfs:PassthroughFS")
    p.add_argument("--memfs", action="store_true",
                   help="also run workloads 1-4 on afuse's in-memory MemFS (afuse overhead without a backing "
                        "filesystem), as extra columns")
    p.add_argument("--pin", action="store_true",
                   help="run workloads 1-4 with this process and the daemons pinned to one CPU (steadier "
                        "figures where waking an idle CPU is slow, e.g. in VMs)")
    p.add_argument("--latency-only", action="store_true", help="run only the GETATTR latency workload")
    p.add_argument("--compare-tree", metavar="DIR",
                   help="also measure the GETATTR round trip of the afuse in checkout DIR (e.g. a git worktree "
                        "of an older commit), in the same run")
    p.add_argument("--repeat", type=int, help="runs per workload, median reported (default 3, quick 1)")
    p.add_argument("--tmpdir", help="where to make the temporary source directories and mountpoints "
                                    "(default: the system's temporary directory)")
    args = p.parse_args(argv)

    cfg = Config()
    if args.quick:
        cfg = Config(files=200, seq_bytes=32 * MiB, loop_seconds=0.5, repeat=1, quick=True)
    if args.repeat:
        cfg.repeat = args.repeat
    if args.compare_tree:
        cfg.compare_tree = os.path.abspath(args.compare_tree)
    if args.tmpdir:
        tempfile.tempdir = os.path.abspath(args.tmpdir)  # mountpoints too
    tmp = tempfile.gettempdir()
    have_pyfuse3 = importlib.util.find_spec("pyfuse3") is not None

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    results: dict[str, Any] = {"config": {**asdict(cfg), "memfs": args.memfs, "pinned": args.pin},
                               "environment": environment(cfg, args.fs)}
    problems: list[str] = []
    t0 = clock()
    status = 0
    try:
        log(f"afuse benchmarks ({'quick' if cfg.quick else 'full'}): passthroughfs vs native")
        if not args.latency_only:
            run_filesystems(cfg, args.fs, args.memfs, pick_cpu() if args.pin else None, results, problems, tmp,
                            log, also=args.also_fs)
        log("latency")
        run_latency(cfg, results, problems, tmp, log, have_pyfuse3)
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        status = 130
    except Exception as e:
        traceback.print_exc()
        problems.append(f"{type(e).__name__}: {e}")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for d in list(Daemon.alive):
            d.stop()
    results["elapsed_s"] = clock() - t0
    results["environment"]["loadavg_end"] = os.getloadavg()[0]
    results["problems"] = problems
    results["notes"] = NOTES

    env = results["environment"]
    print(f"afuse benchmarks — {'quick' if cfg.quick else 'full'} run, {env['time']}, git {env['git']}, "
          f"Linux {env['kernel']}, Python {env['python']}, {env['cpus']} CPUs, "
          f"median of {cfg.repeat} run(s) for metadata/sequential/small files"
          + (", workloads 1-4 pinned to one CPU" if args.pin else ""))
    print(f"1-min load average {env['loadavg_start']:.2f} at start, {env['loadavg_end']:.2f} at end "
          "(other processes on the machine skew the figures)")
    print()
    print(report(results))
    print()
    print(f"total {results['elapsed_s']:.1f} s")
    if NOTES:
        print("\nNOTES:")
        for note in NOTES:
            print(f"  - {note}")
    if problems:
        print("\nPROBLEMS:")
        for prob in problems:
            print(f"  - {prob}")
        status = status or 1
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
            f.write("\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
