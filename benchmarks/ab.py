"""Two passthrough filesystems compared in one run, interleaved: A/B figures robust to a busy machine.

    python benchmarks/ab.py [--rounds N] [MODULE:FACTORY_A MODULE:FACTORY_B]

Both daemons (separate processes, ``afuse.testing``'s) mirror one source directory (on
/dev/shm). Each round runs every workload once on A and once on B, alternating which goes first,
workload by workload (A and B back to back), so load from other processes hits both alike; the
report gives each side's median time per operation, B/A, and the median of the per-round B/A.
Defaults: the low-level passthroughfs (A) and the node-based one (B).
With ``--cpu N`` (default: the last CPU; ``--cpu -1`` for none) this process and both daemons
run on that one CPU: on machines where waking an idle CPU is slow (VMs), a daemon that happens to
run on another CPU than the client pays tens of microseconds per request, which would swamp
the difference measured. Workloads: create (open O_CREAT + close), stat, listdir of 200 entries, 4 KiB file read
(open, read, close) and write, GETATTR round trip (fstat of an open file), unlink.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from afuse.testing import mounted_process  # noqa: E402

N = 200


def _create(d: str) -> None:
    for i in range(N):
        os.close(os.open(os.path.join(d, f"f{i}"), os.O_CREAT | os.O_WRONLY, 0o644))


def _stat(d: str) -> None:
    for i in range(N):
        os.stat(os.path.join(d, f"f{i}"))


def _listdir(d: str) -> None:
    for _ in range(20):
        os.listdir(d)


def _write(d: str) -> None:
    data = b"x" * 4096
    for i in range(N):
        fd = os.open(os.path.join(d, f"f{i}"), os.O_WRONLY)
        os.write(fd, data)
        os.close(fd)


def _read(d: str) -> None:
    for i in range(N):
        fd = os.open(os.path.join(d, f"f{i}"), os.O_RDONLY)
        os.read(fd, 8192)
        os.close(fd)


def _getattr(d: str) -> None:
    fd = os.open(os.path.join(d, "f0"), os.O_RDONLY)
    try:
        for _ in range(N):
            os.fstat(fd)
    finally:
        os.close(fd)


def _unlink(d: str) -> None:
    for i in range(N):
        os.unlink(os.path.join(d, f"f{i}"))


#: (name, workload, operations per call), in the order they run on a fresh directory.
WORKLOADS: list[tuple[str, Callable[[str], None], int]] = [
    ("create", _create, N), ("stat", _stat, N), ("listdir", _listdir, 20), ("write 4 KiB", _write, N),
    ("read 4 KiB", _read, N), ("getattr", _getattr, N), ("unlink", _unlink, N),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", nargs="?", default="afuse.examples.lowlevel_passthroughfs:PassthroughFS")
    p.add_argument("b", nargs="?", default="afuse.examples.passthroughfs:PassthroughFS")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--cpu", type=int, default=max(os.sched_getaffinity(0)))
    args = p.parse_args(argv)
    src = tempfile.mkdtemp(prefix="afuse-ab-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    times: dict[str, dict[str, list[float]]] = {name: {"A": [], "B": []} for name, _, _ in WORKLOADS}
    try:
        with mounted_process(args.a, [src]) as ma, mounted_process(args.b, [src]) as mb:
            mounts = {"A": ma.path, "B": mb.path}
            if args.cpu >= 0:
                for pid in (0, ma.proc.pid, mb.proc.pid):
                    for tid in os.listdir(f"/proc/{pid or os.getpid()}/task"):  # every thread of it
                        os.sched_setaffinity(int(tid), {args.cpu})
            for rnd in range(args.rounds):
                order = ("A", "B") if rnd % 2 == 0 else ("B", "A")
                dirs = {side: os.path.join(mounts[side], f"r{rnd}{side}") for side in order}
                for d in dirs.values():
                    os.mkdir(d)
                for name, fn, ops in WORKLOADS:  # A and B back to back: a burst of load hits both
                    for side in order:
                        t = time.perf_counter()
                        fn(dirs[side])
                        times[name][side].append((time.perf_counter() - t) / ops * 1e6)
                for d in dirs.values():
                    os.rmdir(d)
    finally:
        shutil.rmtree(src, ignore_errors=True)
    where = f"on CPU {args.cpu}" if args.cpu >= 0 else "unpinned"
    print(f"A = {args.a}\nB = {args.b}\n{args.rounds} interleaved rounds {where}, median us per operation, "
          f"1-min load average {os.getloadavg()[0]:.2f}\n")
    print(f"{'workload':<12} {'A us':>8} {'B us':>8} {'B/A':>6}  {'median of pair ratios':>21}")
    for name, _, _ in WORKLOADS:
        a, b = statistics.median(times[name]["A"]), statistics.median(times[name]["B"])
        pairs = statistics.median(y / x for x, y in zip(times[name]["A"], times[name]["B"], strict=True))
        print(f"{name:<12} {a:8.1f} {b:8.1f} {b / a:6.3f}  {pairs:21.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
