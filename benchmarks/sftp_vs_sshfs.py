#!/usr/bin/env python3
"""afuse's sftpfs against Debian's sshfs, same sshd, same workloads, one run; then again at +20 ms RTT.

    python benchmarks/sftp_vs_sshfs.py [--quick] [--repeat N] [--json FILE] [--phases 0,20]

One throw-away OpenSSH server (``tools/sshd.py``) serves a temporary directory; sshfs and sftpfs
each mount their own subdirectory of it, both at once, as child processes. Every workload runs on
both, alternating which goes first (repeat r runs the pair in the other order from repeat r-1),
and the figure is the median over ``--repeat`` runs. Files that are read are made on the server
side (straight into the served directory) just before the run, under names neither mount has
seen: every read is cold for the kernel's and the filesystem's caches on both sides alike, while
the server's own page cache holds them on both sides alike. Workloads:

    seq write      one file, 1 MiB write()s, ``--mib`` MiB, timed to close() (which waits for the data)
    seq read       one file of ``--mib`` MiB in 1 MiB read()s
    create small   ``--files`` files of 4 KiB: open(O_CREAT|O_EXCL), write, close
    read small     ``--files`` files of 4 KiB (made on the server): open, read, close
    list           os.listdir of ``--dirs`` directories of ``--entries`` entries each (one listing
                   takes ~15 ms: a single one is mostly noise)
    list -l        the same directories' names and lstat() of each (``ls -l``)
    stat           lstat() of ``--entries`` files by name, not listed first
    parallel read  8 ``dd`` processes each reading its own ``--mib``/8 MiB file at once

Phase "20 ms" puts a delay line (``benchmarks/_delayline.py``: 10 ms each way, order kept, no
bandwidth cap) between both clients and the same sshd, because this kernel has no netem
(CONFIG_NET_SCH_NETEM unset: ``tc qdisc ... netem`` fails). The round trip it adds is measured
and printed: an echo through the same delay line, and one SFTP round trip through each mount
(the first lstat of a file in a new directory: one LOOKUP, one SSH_FXP_LSTAT).

Figures are rates (higher is better); the ratio is sftpfs / sshfs. Nothing is asserted about
speed. Mounts, processes and temporary directories are removed on exit, failure and Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MiB = 1 << 20
clock = time.perf_counter

_spec = importlib.util.spec_from_file_location("afuse_tools_sshd", os.path.join(REPO, "tools", "sshd.py"))
assert _spec is not None and _spec.loader is not None
sshd_tool: Any = importlib.util.module_from_spec(_spec)
sys.modules["afuse_tools_sshd"] = sshd_tool
_spec.loader.exec_module(sshd_tool)

SIDES = ("sshfs", "sftpfs", "sftpfs-asyncssh", "sftpfs-poll")
DEFAULT_SIDES = ("sshfs", "sftpfs")
SFTP_SERVER = "/usr/lib/openssh/sftp-server"  # Debian's; --count-requests runs it (internal-sftp cannot log)
# workload -> (label, unit, target ratio sftpfs/sshfs or None)
WORKLOADS: dict[str, tuple[str, str, float | None]] = {
    "seq_write": ("seq write", "MiB/s", 0.7),
    "seq_read": ("seq read", "MiB/s", 0.7),
    "create_small": ("create small", "files/s", None),
    "read_small": ("read small", "files/s", None),
    "list": ("list", "entries/s", 1.0),
    "list_l": ("list -l", "entries/s", 1.0),
    "stat": ("stat", "files/s", 1.0),
    "parallel_read": ("parallel read x8", "MiB/s", 1.0),
}
NOT_NETEM = ("this kernel has no netem (CONFIG_NET_SCH_NETEM unset), so the 20 ms are a userspace delay line: "
             "10 ms each way per chunk, order kept, no bandwidth cap (benchmarks/_delayline.py)")


@dataclass
class Config:
    mib: int = 256  # sequential file size, and the parallel readers' total
    files: int = 1000  # small files created, small files read
    entries: int = 2000  # listing's directory size and stat's file count
    dirs: int = 8  # directories listed per run of list and list -l
    small_size: int = 4096
    parallel: int = 8
    repeat: int = 2
    connections: int = 1
    phases: tuple[int, ...] = (0, 20)  # added round trip, ms
    workloads: tuple[str, ...] = tuple(WORKLOADS)
    cipher: str = "aes128-gcm@openssh.com"  # both sides; "" leaves each its own default
    settle: float = 0.0  # seconds idle between the set-up's sync and the timed run


# --------------------------------------------------------------------------------------------
# Mounts


def _mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


@dataclass
class Mount:
    """A FUSE daemon (sshfs or sftpfs) run in the foreground as a child, its mount and its log."""

    side: str
    argv: list[str]
    mountpoint: str
    log_path: str
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while not _mounted(self.mountpoint):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.side} exited with {self.proc.returncode} before mounting:\n{self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.side} did not mount within {timeout} s:\n{self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-4000:]

    def stop(self) -> None:
        """Unmount (lazily if busy) and wait for the daemon; kill it if it lingers."""
        if _mounted(self.mountpoint):
            try:
                r = subprocess.run(["umount", self.mountpoint], capture_output=True, timeout=15)
                busy = r.returncode != 0
            except subprocess.TimeoutExpired:  # a daemon that does not answer
                busy = True
            if busy and _mounted(self.mountpoint):
                subprocess.run(["umount", "-l", self.mountpoint], capture_output=True)
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if _mounted(self.mountpoint):  # the daemon died without unmounting
            subprocess.run(["umount", "-l", self.mountpoint], capture_output=True)


def sshfs_argv(sshd: Any, port: int, known_hosts: str, remote: str, mnt: str, cfg: Config) -> list[str]:
    """sshfs in the foreground; caches as sftpfs's: names and attributes 20 s in sshfs and in the kernel.

    (sshfs's own default tells the kernel 1 s; sftpfs tells the kernel its cache_timeout.)"""
    return ["sshfs", "-f", sshd.target(remote), mnt,
            "-p", str(port),
            "-o", f"IdentityFile={sshd.identity},IdentitiesOnly=yes,UserKnownHostsFile={known_hosts}",
            "-o", "StrictHostKeyChecking=yes,BatchMode=yes",
            "-o", "entry_timeout=20,attr_timeout=20,negative_timeout=0,dir_cache=yes,dcache_timeout=20",
            "-o", f"max_conns={cfg.connections}",
            "-o", "fsname=sftpbench-sshfs"] + (["-o", f"Ciphers={cfg.cipher}"] if cfg.cipher else [])  # fmt: skip


def sftpfs_argv(sshd: Any, port: int, known_hosts: str, remote: str, mnt: str, cfg: Config,
                transport: str = "ssh", extra: tuple[str, ...] = ()) -> list[str]:
    """afuse's sftpfs with the same caches as sshfs where comparable; by default over the same
    ``ssh`` client as sshfs (``--transport ssh``)."""
    return [sys.executable, "-m", "afuse.examples.sftpfs", sshd.target(remote), mnt,
            "-p", str(port), "-i", str(sshd.identity),
            "-o", f"known_hosts={known_hosts},cache_timeout=20" + (f",Ciphers={cfg.cipher}" if cfg.cipher else ""),
            "--connections", str(cfg.connections), "--transport", transport, *extra]  # fmt: skip


ARGV: dict[str, Callable[[Any, int, str, str, str, Config], list[str]]] = {
    "sshfs": sshfs_argv, "sftpfs": sftpfs_argv,
    "sftpfs-asyncssh": functools.partial(sftpfs_argv, transport="asyncssh"),
    "sftpfs-poll": functools.partial(sftpfs_argv, extra=("--poll-us", "50"))}


@dataclass
class Delayline:
    """``benchmarks/_delayline.py`` as a child process: a port that reaches ``target`` with a delay."""

    proc: subprocess.Popen[str]
    port: int

    @classmethod
    @contextlib.contextmanager
    def running(cls, delay: float, target: str | None) -> Iterator[Delayline]:
        cmd = [sys.executable, os.path.join(HERE, "_delayline.py"), "--delay", str(delay)]
        cmd += ["--to", target] if target else ["--echo"]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().split()
            if len(line) != 2 or line[0] != "listening":
                raise RuntimeError(f"delay line did not start: {line}")
            yield cls(proc, int(line[1]))
        finally:
            proc.terminate()
            proc.wait()


def echo_rtt(port: int, n: int = 20) -> float:
    """Median seconds of a 1-byte ping-pong through a delayed echo on ``port``."""
    import socket

    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        times = []
        for _ in range(n):
            t = clock()
            s.sendall(b"x")
            if s.recv(1) != b"x":
                raise RuntimeError("echo through the delay line returned something else")
            times.append(clock() - t)
    return statistics.median(times)


def sftp_rtt(mnt: str, remote: str, n: int = 10) -> float:
    """Median seconds of the first lstat() of a file in a new directory: one LOOKUP, one SSH_FXP_LSTAT.

    The directory is made through the mount and the file on the server, untimed: neither
    filesystem has listed the directory, so neither can answer without asking the server.
    """
    times = []
    for _ in range(n):
        name = "rtt-" + uuid.uuid4().hex
        os.mkdir(os.path.join(mnt, name))
        open(os.path.join(remote, name, "f"), "wb").close()
        t = clock()
        os.lstat(os.path.join(mnt, name, "f"))
        times.append(clock() - t)
        shutil.rmtree(os.path.join(remote, name))
    return statistics.median(times)


# --------------------------------------------------------------------------------------------
# Workloads: prepare(server_dir) untimed, run(mount_dir) timed -> the amount done (MiB, files, ...)

_BLOCK = os.urandom(MiB)


def _make_file(path: str, mib: int) -> None:
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(_BLOCK)


def _make_files(d: str, n: int, size: int) -> None:
    os.mkdir(d)
    data = _BLOCK[:size]
    for i in range(n):
        with open(os.path.join(d, f"f{i:05d}"), "wb") as f:
            f.write(data)


def _read_all(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        n = 0
        while chunk := os.read(fd, MiB):
            n += len(chunk)
        return n
    finally:
        os.close(fd)


@dataclass
class Workload:
    name: str
    prepare: Callable[[str, Config], None]  # on the server's directory (not timed)
    run: Callable[[str, Config], float]  # on the mount's directory (timed): returns the amount done
    check: Callable[[str, Config], None] = lambda d, cfg: None  # on the server's directory, after


def _check_seq_write(d: str, cfg: Config) -> None:
    size = os.stat(os.path.join(d, "w")).st_size
    if size != cfg.mib * MiB:
        raise RuntimeError(f"seq write left {size} bytes on the server, not {cfg.mib * MiB}")


def _run_seq_write(d: str, cfg: Config) -> float:
    fd = os.open(os.path.join(d, "w"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for _ in range(cfg.mib):
            os.write(fd, _BLOCK)
    finally:
        os.close(fd)
    return cfg.mib


def _run_seq_read(d: str, cfg: Config) -> float:
    n = _read_all(os.path.join(d, "r"))
    if n != cfg.mib * MiB:
        raise RuntimeError(f"seq read got {n} bytes, not {cfg.mib * MiB}")
    return cfg.mib


def _run_create_small(d: str, cfg: Config) -> float:
    data = _BLOCK[: cfg.small_size]
    for i in range(cfg.files):
        fd = os.open(os.path.join(d, f"c{i:05d}"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
    return cfg.files


def _check_create_small(d: str, cfg: Config) -> None:
    sizes = [os.stat(os.path.join(d, f"c{i:05d}")).st_size for i in range(cfg.files)]
    if set(sizes) != {cfg.small_size}:
        raise RuntimeError(f"create small left sizes {sorted(set(sizes))} on the server")


def _run_read_small(d: str, cfg: Config) -> float:
    total = sum(_read_all(os.path.join(d, "s", f"f{i:05d}")) for i in range(cfg.files))
    if total != cfg.files * cfg.small_size:
        raise RuntimeError(f"read small got {total} bytes, not {cfg.files * cfg.small_size}")
    return cfg.files


def _make_dirs(d: str, cfg: Config) -> None:
    os.mkdir(d)
    for k in range(cfg.dirs):
        _make_files(os.path.join(d, f"l{k}"), cfg.entries, 0)


def _run_list(d: str, cfg: Config) -> float:
    for k in range(cfg.dirs):
        n = len(os.listdir(os.path.join(d, "l", f"l{k}")))
        if n != cfg.entries:
            raise RuntimeError(f"list found {n} entries, not {cfg.entries}")
    return cfg.entries * cfg.dirs


def _run_list_l(d: str, cfg: Config) -> float:
    for k in range(cfg.dirs):
        n = 0
        with os.scandir(os.path.join(d, "l", f"l{k}")) as it:
            for entry in it:
                if entry.stat(follow_symlinks=False).st_size != 0:
                    raise RuntimeError(f"list -l: {entry.name} is not empty")
                n += 1
        if n != cfg.entries:
            raise RuntimeError(f"list -l found {n} entries, not {cfg.entries}")
    return cfg.entries * cfg.dirs


def _run_stat(d: str, cfg: Config) -> float:
    for i in range(cfg.entries):
        if os.lstat(os.path.join(d, "t", f"f{i:05d}")).st_size != 0:
            raise RuntimeError("stat: a file is not empty")
    return cfg.entries


def _per_reader(cfg: Config) -> int:
    return max(1, cfg.mib // cfg.parallel)


def _prepare_parallel(d: str, cfg: Config) -> None:
    for k in range(cfg.parallel):
        _make_file(os.path.join(d, f"p{k}"), _per_reader(cfg))


def _run_parallel(d: str, cfg: Config) -> float:
    procs = [subprocess.Popen(["dd", f"if={os.path.join(d, f'p{k}')}", "of=/dev/null", "bs=1M", "status=none"])
             for k in range(cfg.parallel)]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise RuntimeError(f"parallel read: dd exit codes {codes}")
    return cfg.parallel * _per_reader(cfg)


WORKLOAD_LIST = [
    Workload("seq_write", lambda d, cfg: None, _run_seq_write, _check_seq_write),
    Workload("seq_read", lambda d, cfg: _make_file(os.path.join(d, "r"), cfg.mib), _run_seq_read),
    Workload("create_small", lambda d, cfg: None, _run_create_small, _check_create_small),
    Workload("read_small", lambda d, cfg: _make_files(os.path.join(d, "s"), cfg.files, cfg.small_size),
             _run_read_small),
    Workload("list", lambda d, cfg: _make_dirs(os.path.join(d, "l"), cfg), _run_list),
    Workload("list_l", lambda d, cfg: _make_dirs(os.path.join(d, "l"), cfg), _run_list_l),
    Workload("stat", lambda d, cfg: _make_files(os.path.join(d, "t"), cfg.entries, 0), _run_stat),
    Workload("parallel_read", _prepare_parallel, _run_parallel),
]


# --------------------------------------------------------------------------------------------
# The run


@dataclass
class Results:
    config: dict[str, Any]
    commands: dict[str, list[str]] = field(default_factory=dict)
    rtt_ms: dict[str, dict[str, float]] = field(default_factory=dict)  # phase -> probe -> ms
    # phase -> workload -> side -> [rate per repeat]
    rates: dict[str, dict[str, dict[str, list[float]]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # --count-requests: phase -> workload -> side -> SFTP request type -> count (and read/write sizes)
    requests: dict[str, dict[str, dict[str, dict[str, int]]]] = field(default_factory=dict)

    def median(self, phase: str, wl: str, side: str) -> float | None:
        runs = self.rates.get(phase, {}).get(wl, {}).get(side)
        return statistics.median(runs) if runs else None


_REQUEST = re.compile(r"request \d+: ([a-z][\w@.-]*)(?: .* off (\d+) len (\d+))?")


def count_requests(log_text: str) -> dict[str, int]:
    """SFTP requests by type in sftp-server's ``-l DEBUG3`` log; ``read bytes``/``write bytes`` too."""
    counts: dict[str, int] = {}
    for m in _REQUEST.finditer(log_text):
        op = m.group(1)
        if op == "sent":
            continue
        counts[op] = counts.get(op, 0) + 1
        if m.group(3) is not None:
            counts[f"{op} bytes"] = counts.get(f"{op} bytes", 0) + int(m.group(3))
    return counts


class RequestLog:
    """Reads what sftp-server logged since the last call (one workload on one side)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.offset = 0

    def since(self) -> str:
        time.sleep(0.3)  # a RELEASE the kernel sends after close() returns lands in this run
        with open(self.path, errors="replace") as f:
            f.seek(self.offset)
            text = f.read()
            self.offset = f.tell()
        return text


def run_phase(rtt_ms: int, sshd: Any, base: str, cfg: Config, sides: list[str], res: Results,
              request_log: RequestLog | None = None) -> None:
    phase = f"{rtt_ms} ms"
    res.rates[phase] = {}
    with contextlib.ExitStack() as stack:
        port = sshd.port
        known_hosts = str(sshd.known_hosts)
        probes: dict[str, float] = {}
        if rtt_ms:
            line = stack.enter_context(Delayline.running(rtt_ms / 2000, f"127.0.0.1:{sshd.port}"))
            port = line.port
            # Same host key, reached on the delay line's port.
            known_hosts = os.path.join(base, f"known_hosts-{port}")
            key = open(sshd.known_hosts).read().split(None, 1)[1]
            with open(known_hosts, "w") as f:
                f.write(f"[127.0.0.1]:{port} {key}")
            with Delayline.running(rtt_ms / 2000, None) as echo:
                probes["echo through the delay line"] = echo_rtt(echo.port) * 1000
        mounts: dict[str, Mount] = {}
        for side in sides:
            remote = os.path.join(base, "remote", side)
            os.makedirs(remote, exist_ok=True)
            mnt = os.path.join(base, "mnt", side)
            os.makedirs(mnt, exist_ok=True)
            argv = ARGV[side](sshd, port, known_hosts, remote, mnt, cfg)
            res.commands[f"{side} @ {phase}"] = argv
            m = Mount(side, argv, mnt, os.path.join(base, f"{side}.log"))
            stack.callback(m.stop)
            m.start()
            mounts[side] = m
        for side in sides:
            probes[f"SFTP round trip via {side}"] = sftp_rtt(
                mounts[side].mountpoint, os.path.join(base, "remote", side)) * 1000
        res.rtt_ms[phase] = probes
        for r in range(cfg.repeat):
            for w_index, wl in enumerate(w for w in WORKLOAD_LIST if w.name in cfg.workloads):
                order = sides if (r + w_index) % 2 == 0 else sides[::-1]
                for side in order:
                    run_id = f"{wl.name}-{r}-{uuid.uuid4().hex[:8]}"
                    server_dir = os.path.join(base, "remote", side, run_id)
                    mount_dir = os.path.join(mounts[side].mountpoint, run_id)
                    # The run's directory is made through the mount (a directory made behind a
                    # filesystem's back may stay unseen while it caches its parent's listing), what
                    # it holds on the server, before the clock starts.
                    os.mkdir(mount_dir)
                    wl.prepare(server_dir, cfg)
                    os.sync()  # neither side pays for the writeback of what came before
                    if cfg.settle:  # nor for the kernel's deferred work after it; the CPUs go idle
                        time.sleep(cfg.settle)
                    if request_log is not None:
                        request_log.since()
                    t = clock()
                    amount = wl.run(mount_dir, cfg)
                    elapsed = clock() - t
                    if request_log is not None:
                        res.requests.setdefault(phase, {}).setdefault(wl.name, {})[side] = count_requests(
                            request_log.since())
                    wl.check(server_dir, cfg)
                    shutil.rmtree(server_dir)
                    res.rates[phase].setdefault(wl.name, {}).setdefault(side, []).append(amount / elapsed)
                    print(f"  {phase:>5} rep {r + 1}/{cfg.repeat} {WORKLOADS[wl.name][0]:<17} {side:<7}"
                          f"{amount / elapsed:10.1f} {WORKLOADS[wl.name][1]:<9} ({elapsed:.2f} s)", flush=True)


def table(res: Results, sides: list[str]) -> str:
    """Each side's median per workload and phase; with sshfs among the sides, each other side's
    ratio to it (the headline is sftpfs's: the targets are checked on that one)."""
    out = []
    others = [s for s in sides if s != "sshfs"] if "sshfs" in sides else []
    width = 10 * len(sides) + 8 * len(others) + 1
    head = f"{'workload':<18}{'unit':<10}" + "".join(f"{p:>{width}}" for p in res.rates)
    side_label = {"sshfs": "sshfs", "sftpfs": "sftpfs", "sftpfs-asyncssh": "asyncssh", "sftpfs-poll": "poll"}
    ratio_label = {"sftpfs": "ratio", "sftpfs-asyncssh": "÷async", "sftpfs-poll": "÷poll"}
    sub = f"{'':<28}" + "".join(("".join(f"{side_label[s]:>10}" for s in sides)
                                 + "".join(f"{ratio_label[s]:>8}" for s in others) + " ")
                                for _ in res.rates)
    out += [head, sub]
    misses = []
    for wl, (label, unit, target) in WORKLOADS.items():
        if not any(wl in by_wl for by_wl in res.rates.values()):
            continue
        row = f"{label:<18}{unit:<10}"
        for phase in res.rates:
            vals = {s: res.median(phase, wl, s) for s in sides}
            row += "".join(f"{vals[s] or 0:10.1f}" for s in sides)
            for s in others:
                a, b = vals["sshfs"], vals[s]
                ratio = (b / a) if a and b else None
                mark = " "
                if s == "sftpfs" and ratio is not None and target is not None and ratio < target:
                    mark = "!"
                    misses.append(f"{label} at {phase}: {ratio:.2f} < {target}")
                row += f"{ratio:7.2f}{mark}" if ratio else f"{'-':>7} "
            row += " "
        out.append(row)
    if "sftpfs" in others:
        out.append("ratio = sftpfs / sshfs (higher is better for sftpfs). Targets: >= 1.0 on list, list -l, stat and "
                   "parallel read; >= 0.7 on seq read/write; '!' marks a miss.")
        if "sftpfs-poll" in others:
            out.append("poll, ÷poll = sftpfs --poll-us 50 (busy polling of /dev/fuse, a CPU spent while idle), "
                       "and its ratio to sshfs: a different configuration, for comparison (no targets).")
        if "sftpfs-asyncssh" in others:
            out.append("asyncssh, ÷async = sftpfs --transport asyncssh (SSH in sftpfs's own process), "
                       "and its ratio to sshfs: a different configuration, for comparison (no targets).")
        out.append("misses: " + ("; ".join(misses) if misses else "none"))
    return "\n".join(out)


def request_table(res: Results, sides: list[str]) -> str:
    """SFTP requests per workload and side, by type (``read``/``write``: count and mean size)."""
    out = ["SFTP requests per workload (from sftp-server's log)"]
    for phase, by_wl in res.requests.items():
        for wl, by_side in by_wl.items():
            for side in sides:
                c = by_side.get(side, {})
                parts = []
                for op, n in sorted(c.items(), key=lambda kv: -kv[1]):
                    if op.endswith(" bytes"):
                        continue
                    size = c.get(f"{op} bytes")
                    parts.append(f"{op} {n}" + (f" (mean {size / n / 1024:.0f} KiB)" if size and n else ""))
                total = sum(n for op, n in c.items() if not op.endswith(" bytes"))
                out.append(f"  {phase:>5} {WORKLOADS[wl][0]:<17} {side:<7} {total:6d}: " + ", ".join(parts))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, one repeat (a smoke test)")
    p.add_argument("--repeat", type=int, help="runs per workload and side (median; default 2, quick 1)")
    p.add_argument("--mib", type=int, help="sequential file size in MiB (default 256)")
    p.add_argument("--files", type=int, help="small files (default 1000)")
    p.add_argument("--entries", type=int, help="directory entries for list and stat (default 2000)")
    p.add_argument("--dirs", type=int, help="directories listed per run of list and list -l (default 8)")
    p.add_argument("--connections", type=int, default=1, help="SSH connections per mount (sshfs max_conns)")
    p.add_argument("--cipher", default=Config.cipher,
                   help="SSH cipher both sides use (default %(default)s; '' leaves each its own default: "
                        "OpenSSH's chacha20-poly1305 for sshfs, AES-GCM first for sftpfs)")
    p.add_argument("--phases", default="0,20", help="added round trips in ms, comma-separated (default 0,20)")
    p.add_argument("--sides", default=",".join(DEFAULT_SIDES),
                   help="which filesystems: sshfs, sftpfs (over the ssh client, as sshfs), sftpfs-asyncssh "
                        "(--transport asyncssh), sftpfs-poll (--poll-us 50); the last two are separate, "
                        "labelled columns; default sshfs,sftpfs")
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help="which workloads, comma-separated (default all: " + ",".join(WORKLOADS) + ")")
    p.add_argument("--settle", type=float, default=0.0,
                   help="seconds to stay idle between each set-up's sync and its timed run (default 0: "
                        "timed right after the sync)")
    p.add_argument("--tmpdir", default=None, help="where the served directory and mountpoints go")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--count-requests", action="store_true",
                   help="profile: sftp-server logs every request, and each workload's SFTP requests are counted "
                        "by type per side (the logging slows the server: timings of such a run are not the figures)")
    args = p.parse_args(argv)
    cfg = Config(mib=8, files=30, entries=100, dirs=2, repeat=1) if args.quick else Config()
    for name in ("repeat", "mib", "files", "entries", "dirs"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    cfg.connections = args.connections
    cfg.cipher = args.cipher
    if args.settle < 0:
        p.error("--settle must be >= 0")
    cfg.settle = args.settle
    cfg.phases = tuple(int(x) for x in args.phases.split(","))
    workloads = [w for w in args.workloads.split(",") if w]
    if not workloads or any(w not in WORKLOADS for w in workloads):
        p.error(f"--workloads: a comma-separated choice of {', '.join(WORKLOADS)}")
    cfg.workloads = tuple(workloads)
    sides = [s for s in args.sides.split(",") if s]
    if not sides or any(s not in SIDES for s in sides):
        p.error(f"--sides: a comma-separated choice of {', '.join(SIDES)}")
    if os.geteuid() != 0:
        print("needs root (sshd as a throw-away server, FUSE mounts)", file=sys.stderr)
        return 2
    for tool, pkg in (("sshfs", "sshfs"), ("dd", "coreutils")):
        if "sshfs" in sides or tool != "sshfs":
            if shutil.which(tool) is None:
                print(f"{tool} not found: apt-get install {pkg}", file=sys.stderr)
                return 2
    if "sftpfs" in sides and importlib.util.find_spec("afuse.examples.sftpfs") is None:
        print("afuse.examples.sftpfs not found (or pass --sides sshfs)", file=sys.stderr)
        return 2

    def terminated(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # SIGTERM cleans up as Ctrl-C does: unmount, stop sshd, remove files

    signal.signal(signal.SIGTERM, terminated)
    res = Results(config=asdict(cfg))
    res.notes.append(NOT_NETEM)
    with open("/proc/loadavg") as f:
        res.notes.append("load average at start: " + " ".join(f.read().split()[:3]))
    res.notes.append(f"each timed run starts {cfg.settle:g} s after the sync that ends its set-up"
                     + (" (--settle)" if cfg.settle else " (right after it; --settle S waits)"))
    base = tempfile.mkdtemp(prefix="sftpbench-", dir=args.tmpdir)
    try:
        request_log = None
        sftp_server = "internal-sftp"
        if args.count_requests:
            res.notes.append("--count-requests: sftp-server logged every request; these timings are not the figures")
            request_log = RequestLog(os.path.join(base, "sftp-server.log"))
            open(request_log.path, "w").close()
            # sshd runs a subsystem's command through the user's shell: the redirection is the shell's.
            sftp_server = f"{SFTP_SERVER} -e -l DEBUG3 2>>{request_log.path}"
        with sshd_tool.running_sshd(sftp_server=sftp_server) as sshd:
            for ms in cfg.phases:
                run_phase(ms, sshd, base, cfg, sides, res, request_log)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    print()
    print(f"sftpfs vs sshfs: same sshd (OpenSSH, internal-sftp) on 127.0.0.1, {cfg.repeat} run(s) per figure "
          f"(median), sides alternating; seq {cfg.mib} MiB, {cfg.files} small files of {cfg.small_size} B, "
          f"{cfg.dirs} directories of {cfg.entries} entries, {cfg.parallel} parallel readers; "
          f"cipher {cfg.cipher or 'each side its default'}; {cfg.connections} SSH connection(s) per mount")
    for note in res.notes:
        print("note:", note)
    for phase, probes in res.rtt_ms.items():
        print(f"round trips at {phase}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in probes.items()))
    seen = set()
    for key, argv_ in res.commands.items():
        side = key.split()[0]
        if side not in seen:
            seen.add(side)
            print(f"{side}: {' '.join(argv_)}")
    print()
    print(table(res, sides))
    if res.requests:
        print()
        print(request_table(res, sides))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(asdict(res), f, indent=1)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted (mounts, sshd and files removed)", file=sys.stderr)
        sys.exit(130)
