#!/usr/bin/env python3
"""Handler cost of the node passthroughfs against the low-level one, in process, no kernel.

    python benchmarks/nodes_handlers.py [--rounds 8] [--files 200] [--size 4096]

Both filesystems mirror their own directory on /dev/shm; requests are built here and handed to
each one's :class:`afuse.dispatch.Dispatcher` (handler, reply encoding), the way a session would,
without /dev/fuse, the kernel or trio's I/O: what the node layer adds per request, steady even on
a busy machine. Each round creates ``files`` files on A and on B (LOOKUP of the missing name,
CREATE, GETXATTR security.capability, WRITE of ``--size`` bytes, FLUSH, RELEASE, as
``open(O_CREAT)`` + ``write`` + ``close`` makes the kernel send; ``--size 0`` writes nothing),
reads each back (LOOKUP, OPEN, GETATTR, READ, FLUSH, RELEASE), unlinks them and FORGETs them
(one FORGET each; the FLUSH and RELEASE rows mix both cycles), alternating which
side goes first; the table gives each request's median time, B - A and B/A, and the means
(which include garbage collections and other outliers). Neither side uses
FUSE passthrough (no session), as in bench.py's workloads 1-4.
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

OPS = ("lookup", "create", "getxattr", "write", "flush", "release", "lookup hit", "open", "getattr", "read",
       "unlink", "forget")


async def run(rounds: int, files: int, size: int) -> dict[tuple[str, str], list[int]]:
    tmp = "/dev/shm" if os.path.isdir("/dev/shm") else None
    srcs = {side: tempfile.mkdtemp(prefix="afuse-handlers-", dir=tmp) for side in "AB"}
    disp = {"A": Dispatcher(LowLevel(srcs["A"])), "B": Dispatcher(OnNodes(srcs["B"]))}
    times: dict[tuple[str, str], list[int]] = defaultdict(list)
    unique = 0
    payload = os.urandom(size)
    known: dict[str, list[int]] = {"A": [], "B": []}

    async def call(side: str, op: str, cls: type[r.Request], nodeid: int, **fields: Any) -> bytes:
        nonlocal unique
        unique += 2
        req = cls(unique=unique, nodeid=nodeid, uid=os.getuid(), gid=os.getgid(), pid=os.getpid(), **fields)
        t = time.perf_counter_ns()
        out = await disp[side].handle(req) if cls is not r.ForgetRequest else await disp[side].forget(req)
        times[side, op].append(time.perf_counter_ns() - t)
        return out if isinstance(out, bytes) else b""

    try:
        for rnd in range(rounds):
            for side in "AB" if rnd % 2 == 0 else "BA":
                for i in range(files):
                    name = f"r{rnd}-{i}".encode()
                    await call(side, "lookup", r.LookupRequest, 1, name=name)
                    out = await call(side, "create", r.CreateRequest, 1, name=name,
                                     flags=os.O_CREAT | os.O_WRONLY | os.O_TRUNC, mode=0o100644, umask=0)
                    nodeid = int.from_bytes(out[16:24], "little")
                    fh = int.from_bytes(out[16 + 128:16 + 136], "little")  # fuse_entry_out, then fuse_open_out
                    if size:
                        await call(side, "getxattr", r.GetxattrRequest, nodeid, name=b"security.capability", size=0)
                        await call(side, "write", r.WriteRequest, nodeid, fh=fh, offset=0, data=payload,
                                   write_flags=0, lock_owner=0, flags=os.O_WRONLY)
                    await call(side, "flush", r.FlushRequest, nodeid, fh=fh, lock_owner=0)
                    await call(side, "release", r.ReleaseRequest, nodeid, fh=fh, flags=0, release_flags=0,
                               lock_owner=0)
                for i in range(files):
                    out = await call(side, "lookup hit", r.LookupRequest, 1, name=f"r{rnd}-{i}".encode())
                    nodeid = int.from_bytes(out[16:24], "little")
                    known[side].append(nodeid)
                    out = await call(side, "open", r.OpenRequest, nodeid, flags=os.O_RDONLY, open_flags=0)
                    fh = int.from_bytes(out[16:24], "little")
                    await call(side, "getattr", r.GetattrRequest, nodeid, fh=None)
                    await call(side, "read", r.ReadRequest, nodeid, fh=fh, offset=0, size=max(size, 4096),
                               read_flags=0, lock_owner=0, flags=os.O_RDONLY)
                    await call(side, "flush", r.FlushRequest, nodeid, fh=fh, lock_owner=0)
                    await call(side, "release", r.ReleaseRequest, nodeid, fh=fh, flags=0, release_flags=0,
                               lock_owner=0)
                for i in range(files):
                    await call(side, "unlink", r.UnlinkRequest, 1, name=f"r{rnd}-{i}".encode())
                for nodeid in known[side]:  # the kernel forgets the unlinked inodes (CREATE's and LOOKUP's counts)
                    await call(side, "forget", r.ForgetRequest, 0, items=[r.ForgetItem(nodeid, 2)])
                known[side].clear()
    finally:
        for src in srcs.values():
            shutil.rmtree(src, ignore_errors=True)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--files", type=int, default=200)
    p.add_argument("--size", type=int, default=4096, help="bytes written to each file (default 4096)")
    args = p.parse_args(argv)
    times = trio.run(run, args.rounds, args.files, args.size)
    print(f"A = afuse.examples.lowlevel_passthroughfs, B = afuse.examples.passthroughfs (nodes); "
          f"{args.rounds} rounds x {args.files} files of {args.size} bytes, median us per request, "
          f"1-min load average {os.getloadavg()[0]:.2f}\n")
    print(f"{'request':<10} {'A us':>7} {'B us':>7} {'B-A':>6} {'B/A':>6}   {'mean A':>7} {'mean B':>7} {'B/A':>6}")
    total = {"A": 0.0, "B": 0.0, "mA": 0.0, "mB": 0.0}
    for op in OPS:
        a, b = (statistics.median(times[side, op]) / 1000 for side in "AB")
        ma, mb = (statistics.fmean(times[side, op]) / 1000 for side in "AB")  # GC pauses and outliers included
        total["A"] += a
        total["B"] += b
        total["mA"] += ma
        total["mB"] += mb
        print(f"{op:<10} {a:7.2f} {b:7.2f} {b - a:6.2f} {b / a:6.3f}   {ma:7.2f} {mb:7.2f} {mb / ma:6.3f}")
    print(f"{'sum':<10} {total['A']:7.2f} {total['B']:7.2f} {total['B'] - total['A']:6.2f} "
          f"{total['B'] / total['A']:6.3f}   {total['mA']:7.2f} {total['mB']:7.2f} {total['mB'] / total['mA']:6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
