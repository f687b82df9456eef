#!/usr/bin/env python3
"""What serving from asyncio costs per request: the same handlers on trio and on afuse.asyncio.

    python benchmarks/asyncio_overhead.py [--quick] [--json FILE]

A filesystem with one file and ``attr_timeout = entry_timeout = 0`` is served twice from this
process: with ``afuse.testing.mounted`` (trio, in a thread) and with ``afuse.asyncio.mount``
(trio as a guest of an asyncio loop, each handler an asyncio task). A child process calls
``os.stat`` on the file N times (one LOOKUP and one GETATTR each) and reports the mean time per
call. Handlers that do nothing but return show the bridge's own cost; real handlers (network
round trips) dwarf it. Nothing is asserted about speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
from typing import Any

import afuse.asyncio
from afuse import testing
from afuse.examples.hello_asyncio import HelloAsyncioFS


class Uncached(HelloAsyncioFS):
    """hello, without kernel caching of names and attributes."""

    attr_timeout = 0.0
    entry_timeout = 0.0


_CLIENT = """
import os, sys, time
path, n = sys.argv[1], int(sys.argv[2])
os.stat(path)
t = time.perf_counter()
for _ in range(n):
    os.stat(path)
print((time.perf_counter() - t) / n * 1e6)
"""


def stat_us(mountpoint: str, n: int) -> float:
    """Mean microseconds per os.stat of the mount's file, measured by a child process."""
    out = subprocess.check_output([sys.executable, "-c", _CLIENT, os.path.join(mountpoint, "hello"), str(n)])
    return float(out)


async def on_asyncio(n: int) -> float:
    path = tempfile.mkdtemp(prefix="afuse-bench-")
    try:
        async with afuse.asyncio.mount(Uncached(), path):
            return await asyncio.to_thread(stat_us, path, n)
    finally:
        os.rmdir(path)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(prog="benchmarks/asyncio_overhead.py", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer calls, one round")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = p.parse_args(argv)
    n, rounds = (300, 1) if args.quick else (3000, 3)
    trio_us: list[float] = []
    asyncio_us: list[float] = []
    for _ in range(rounds):
        with testing.mounted(Uncached()) as m:
            trio_us.append(stat_us(m.path, n))
        asyncio_us.append(asyncio.run(on_asyncio(n)))
    best_trio, best_asyncio = min(trio_us), min(asyncio_us)
    result: dict[str, Any] = {
        "calls": n, "rounds": rounds,
        "trio_us_per_stat": best_trio, "asyncio_us_per_stat": best_asyncio,
        "overhead_us_per_request": (best_asyncio - best_trio) / 2,  # LOOKUP + GETATTR
    }
    print(f"os.stat (LOOKUP + GETATTR), best of {rounds} x {n} calls:")
    print(f"  trio handlers          {best_trio:8.1f} us")
    print(f"  afuse.asyncio handlers {best_asyncio:8.1f} us")
    print(f"  bridge cost per request {result['overhead_us_per_request']:7.1f} us")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
