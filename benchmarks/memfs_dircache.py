#!/usr/bin/env python3
"""memfs listings with and without the kernel's directory cache, interleaved in one run.

    python benchmarks/memfs_dircache.py [--entries 2000] [--rounds 10]

Two memfs daemons (separate processes): one as shipped (directories answer OPENDIR with
``FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE``: the kernel keeps a listing until the directory changes),
one with the cache off (every listing is READDIR/READDIRPLUS requests). Each round times 20
``os.listdir`` of an N-entry directory on both, alternating which goes first; the table gives
the median milliseconds per listing and the ratio cached/uncached.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from afuse.examples.memfs import Dir, MemFS  # noqa: E402
from afuse.testing import mounted_process  # noqa: E402


def uncached() -> MemFS:
    """memfs with the directory cache off (a factory for ``afuse.testing``)."""
    Dir.fopen = 0  # type: ignore[assignment]  # every directory of this daemon process
    return MemFS()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--entries", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=10)
    args = p.parse_args(argv)
    times: dict[str, list[float]] = {"cached": [], "uncached": []}
    with mounted_process("afuse.examples.memfs:MemFS") as a, \
            mounted_process("benchmarks.memfs_dircache:uncached") as b:
        paths = {"cached": a.path, "uncached": b.path}
        for path in paths.values():
            for i in range(args.entries):
                open(os.path.join(path, f"file-{i:05d}"), "w").close()
        for rnd in range(args.rounds):
            for side in ("cached", "uncached") if rnd % 2 == 0 else ("uncached", "cached"):
                t = time.perf_counter()
                for _ in range(20):
                    if len(os.listdir(paths[side])) != args.entries:
                        raise RuntimeError(f"{side}: wrong listing")
                times[side].append((time.perf_counter() - t) / 20 * 1e3)
    c, u = statistics.median(times["cached"]), statistics.median(times["uncached"])
    print(f"memfs, os.listdir of {args.entries} entries, {args.rounds} interleaved rounds, "
          f"1-min load average {os.getloadavg()[0]:.2f}\n")
    print(f"{'directory cache':<16} {'ms per listing':>14}")
    print(f"{'on (shipped)':<16} {c:14.3f}\n{'off':<16} {u:14.3f}\n\ncached/uncached time ratio {c / u:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
