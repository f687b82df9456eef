#!/usr/bin/env python3
"""Handler cost of the node passthroughfs against the low-level one, in process, no kernel.

    python benchmarks/nodes_handlers.py [--rounds 8] [--files 200]

Both filesystems mirror their own directory on /dev/shm; requests are built here and handed to
each one's :class:`afuse.dispatch.Dispatcher` (handler, reply encoding), the way a session would,
without /dev/fuse, the kernel or trio's I/O: what the node layer adds per request, steady even on
a busy machine. Each round creates ``files`` files on A and on B (LOOKUP of the missing name,
CREATE, FLUSH, RELEASE, as ``open(O_CREAT)`` + ``close`` makes the kernel send) and unlinks them,
alternating which side goes first; the table gives each request's median time, B - A and B/A.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import trio  # noqa: E402

from afuse.dispatch import Dispatcher  # noqa: E402
from afuse.examples.lowlevel_passthroughfs import PassthroughFS as LowLevel  # noqa: E402
from afuse.examples.passthroughfs import PassthroughFS as OnNodes  # noqa: E402
from afuse.wire import requests as r  # noqa: E402

OPS = ("lookup", "create", "flush", "release", "unlink")


async def run(rounds: int, files: int) -> dict[tuple[str, str], list[int]]:
    tmp = "/dev/shm" if os.path.isdir("/dev/shm") else None
    srcs = {side: tempfile.mkdtemp(prefix="afuse-handlers-", dir=tmp) for side in "AB"}
    disp = {"A": Dispatcher(LowLevel(srcs["A"])), "B": Dispatcher(OnNodes(srcs["B"]))}
    times: dict[tuple[str, str], list[int]] = defaultdict(list)
    unique = 0

    async def call(side: str, op: str, cls: type[r.Request], nodeid: int, **fields: Any) -> bytes:
        nonlocal unique
        unique += 2
        req = cls(unique=unique, nodeid=nodeid, uid=os.getuid(), gid=os.getgid(), pid=os.getpid(), **fields)
        t = time.perf_counter_ns()
        out = await disp[side].handle(req)
        times[side, op].append(time.perf_counter_ns() - t)
        return bytes(out or b"")

    try:
        for rnd in range(rounds):
            for side in "AB" if rnd % 2 == 0 else "BA":
                for i in range(files):
                    name = f"r{rnd}-{i}".encode()
                    await call(side, "lookup", r.LookupRequest, 1, name=name)
                    out = await call(side, "create", r.CreateRequest, 1, name=name,
                                     flags=os.O_CREAT | os.O_WRONLY, mode=0o100644, umask=0)
                    nodeid = int.from_bytes(out[16:24], "little")
                    fh = int.from_bytes(out[16 + 128:16 + 136], "little")  # fuse_entry_out, then fuse_open_out
                    await call(side, "flush", r.FlushRequest, nodeid, fh=fh, lock_owner=0)
                    await call(side, "release", r.ReleaseRequest, nodeid, fh=fh, flags=0, release_flags=0,
                               lock_owner=0)
                for i in range(files):
                    await call(side, "unlink", r.UnlinkRequest, 1, name=f"r{rnd}-{i}".encode())
    finally:
        for src in srcs.values():
            shutil.rmtree(src, ignore_errors=True)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--files", type=int, default=200)
    args = p.parse_args(argv)
    times = trio.run(run, args.rounds, args.files)
    print(f"A = afuse.examples.lowlevel_passthroughfs, B = afuse.examples.passthroughfs (nodes); "
          f"{args.rounds} rounds x {args.files} files, median us per request, "
          f"1-min load average {os.getloadavg()[0]:.2f}\n")
    print(f"{'request':<10} {'A us':>7} {'B us':>7} {'B-A':>6} {'B/A':>6}")
    total = {"A": 0.0, "B": 0.0}
    for op in OPS:
        a, b = (statistics.median(times[side, op]) / 1000 for side in "AB")
        total["A"] += a
        total["B"] += b
        print(f"{op:<10} {a:7.2f} {b:7.2f} {b - a:6.2f} {b / a:6.3f}")
    print(f"{'sum':<10} {total['A']:7.2f} {total['B']:7.2f} {total['B'] - total['A']:6.2f} "
          f"{total['B'] / total['A']:6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
