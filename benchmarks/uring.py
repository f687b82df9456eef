"""/dev/fuse against FUSE over io_uring, in the same run: ``python benchmarks/uring.py``.

Both transports serve the same filesystem (:class:`BenchFS`: attributes never cached, so each
``stat`` is one GETATTR round trip; a 4 KiB file opened with direct I/O, so each ``pread`` is one
READ) from a child process, with the same session settings; only ``io_uring`` differs. Workloads,
each run for ``--seconds`` per round, rounds interleaved (dev, uring, dev, uring, ...):

* ``stat 1 client`` / ``stat 8 clients`` — GETATTR round trips per second, one client process or
  eight in parallel (unpinned);
* ``read 1 client`` / ``read 8 clients`` — 4 KiB direct-I/O READs per second;
* ``GETATTR pinned`` — microseconds per round trip with daemon and client on CPU 0.

The table gives the median over rounds and the ratio io_uring ÷ /dev/fuse (> 1: io_uring does
more per second, or for latency takes longer). Needs root: turns the fuse module parameter
``enable_uring`` on for the run and restores it afterwards.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import trio

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from afuse import Attr, DirEntry, Entry, FOpen, FUSEError, Handle, Operations, device  # noqa: E402
from afuse.running import serve_until_signalled  # noqa: E402
from afuse.session import mount  # noqa: E402
from afuse.uring import uring_parameter  # noqa: E402
from afuse.wire import requests as r  # noqa: E402
from afuse.wire.constants import ROOT_ID  # noqa: E402

NAME = b"f"
SIZE = 4096
FILE_ID = 2
TRANSPORTS = ("/dev/fuse", "io_uring")


class BenchFS(Operations):
    """One 4 KiB file; attributes never cached, reads never cached (direct I/O)."""

    attr_timeout = 0.0
    entry_timeout = 3600.0

    def __init__(self) -> None:
        now = time.time_ns()
        self._root = Attr(ino=ROOT_ID, mode=stat.S_IFDIR | 0o755, nlink=2, atime_ns=now, mtime_ns=now, ctime_ns=now)
        self._file = Attr(ino=FILE_ID, mode=stat.S_IFREG | 0o444, nlink=1, size=SIZE,
                          atime_ns=now, mtime_ns=now, ctime_ns=now)
        self._data = b"x" * SIZE

    async def getattr(self, req: r.GetattrRequest) -> Attr:
        if req.nodeid == ROOT_ID:
            return self._root
        if req.nodeid == FILE_ID:
            return self._file
        raise FUSEError(errno.ENOENT)

    async def lookup(self, req: r.LookupRequest) -> Entry:
        if req.nodeid != ROOT_ID or req.name != NAME:
            raise FUSEError(errno.ENOENT)
        return Entry(FILE_ID, self._file)

    async def open(self, req: r.OpenRequest) -> Handle:
        return Handle(0, FOpen.DIRECT_IO)

    async def read(self, req: r.ReadRequest) -> bytes:
        return self._data[req.offset:req.offset + req.size]

    async def readdir(self, req: r.ReaddirRequest) -> Iterator[DirEntry]:
        return iter([DirEntry(NAME, 1, self._file)][req.offset:])


def serve_main(transport: str, mnt: str) -> None:
    """The daemon: serve BenchFS on ``mnt`` over ``transport``, print ``ready``, stop on SIGTERM."""

    async def main() -> None:
        async with mount(BenchFS(), mnt, io_uring=transport == "io_uring") as session, \
                trio.open_nursery() as nursery:
            await nursery.start(partial(serve_until_signalled, session, signals=(signal.SIGTERM, signal.SIGINT)))
            print("ready", session.transport, flush=True)

    trio.run(main)


@contextmanager
def daemon(transport: str, cpu: int | None) -> Iterator[str]:
    mnt = tempfile.mkdtemp(prefix="afuse-uring-bench-")
    pin = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None
    proc = subprocess.Popen([sys.executable, __file__, "--serve", transport, mnt], stdout=subprocess.PIPE,
                            text=True, preexec_fn=pin)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        if line != ["ready", transport]:
            raise RuntimeError(f"daemon for {transport} did not start: {line}")
        yield mnt
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if os.path.ismount(mnt):
            device.unmount(mnt, lazy=True)
        os.rmdir(mnt)


_CLIENT = """
import os, sys, time
kind, path, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
if len(sys.argv) > 4:
    os.sched_setaffinity(0, {int(sys.argv[4])})
if kind == "read":
    fd = os.open(path, os.O_RDONLY)
    op = lambda: os.pread(fd, 4096, 0)
else:
    op = lambda: os.stat(path)
for _ in range(200):
    op()
sys.stdout.write("go\\n"); sys.stdout.flush()
sys.stdin.readline()
n = 0
t0 = time.perf_counter()
end = t0 + seconds
while True:
    for _ in range(100):
        op()
    n += 100
    now = time.perf_counter()
    if now >= end:
        break
print(n, now - t0, flush=True)
"""


def clients(kind: str, path: str, n: int, seconds: float, cpu: int | None = None) -> tuple[float, float]:
    """Run ``n`` client processes at once; (operations per second in total, µs per operation of one)."""
    extra = [str(cpu)] if cpu is not None else []
    procs = [subprocess.Popen([sys.executable, "-c", _CLIENT, kind, path, str(seconds), *extra],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(n)]
    try:
        for p in procs:  # warmed up; start together
            assert p.stdout is not None and p.stdout.readline().strip() == "go"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("\n")
            p.stdin.flush()
        rates, per_op = [], []
        for p in procs:
            out, _ = p.communicate(timeout=seconds + 60)
            count, took = out.split()
            rates.append(int(count) / float(took))
            per_op.append(float(took) / int(count) * 1e6)
        return sum(rates), statistics.mean(per_op)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


WORKLOADS = (
    ("stat 1 client, ops/s", "stat", 1, False),
    ("stat 8 clients, ops/s", "stat", 8, False),
    ("read 4 KiB 1 client, ops/s", "read", 1, False),
    ("read 4 KiB 8 clients, ops/s", "read", 8, False),
    ("GETATTR pinned, µs", "stat", 1, True),
)


def run(rounds: int, seconds: float) -> dict[str, dict[str, list[float]]]:
    results: dict[str, dict[str, list[float]]] = {w[0]: {t: [] for t in TRANSPORTS} for w in WORKLOADS}
    for rnd in range(rounds):
        for transport in TRANSPORTS if rnd % 2 == 0 else TRANSPORTS[::-1]:
            with daemon(transport, None) as mnt:
                path = os.path.join(mnt, NAME.decode())
                for label, kind, n, pinned in WORKLOADS:
                    if not pinned:
                        results[label][transport].append(clients(kind, path, n, seconds)[0])
            with daemon(transport, 0) as mnt:
                path = os.path.join(mnt, NAME.decode())
                for label, kind, n, pinned in WORKLOADS:
                    if pinned:
                        results[label][transport].append(clients(kind, path, n, seconds, cpu=0)[1])
            print(f"round {rnd + 1}/{rounds} {transport} done", file=sys.stderr, flush=True)
    return results


def table(results: dict[str, dict[str, list[float]]]) -> str:
    lines = ["| workload | /dev/fuse | io_uring | io_uring ÷ /dev/fuse |", "|---|---|---|---|"]
    for label, by in results.items():
        dev, ring = statistics.median(by["/dev/fuse"]), statistics.median(by["io_uring"])
        fmt = "{:,.1f}" if "µs" in label else "{:,.0f}"
        lines.append(f"| {label} | {fmt.format(dev)} | {fmt.format(ring)} | {ring / dev:.2f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="rounds per transport (median reported)")
    p.add_argument("--seconds", type=float, default=2.0, help="seconds per workload and round")
    p.add_argument("--serve", nargs=2, metavar=("TRANSPORT", "MOUNTPOINT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve_main(*args.serve)
        return 0
    if os.geteuid() != 0:
        print("needs root (mounting, and the enable_uring module parameter)", file=sys.stderr)
        return 1
    with uring_parameter(True):
        results = run(args.rounds, args.seconds)
    print(f"FUSE over io_uring vs /dev/fuse, {os.cpu_count()} CPUs, {args.rounds} rounds x {args.seconds} s, "
          "median of rounds")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
