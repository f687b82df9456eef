#!/usr/bin/env python3
"""Memory of a node filesystem over many lookups of distinct names that the kernel later forgets.

    python benchmarks/nodes_memory.py [--count 1000000] [--batch 100000] [--clients 2]

A dynamic-lookup :class:`afuse.nodes.NodeFS` (every name ``nI`` is a file, made on lookup) is
served by this process in a background thread. Child processes stat ``count`` distinct names in
batches; after each batch the kernel is made to forget (``echo 2 > /proc/sys/vm/drop_caches``,
root only), and the figures are printed: nodes the bridge holds and this process's RSS, at the
batch's end (the kernel holding every name of the batch, unless memory pressure made it
evict some already) and after the FORGETs; "objects" counts the objects the garbage collector
tracks (independent of how the allocator returns memory to the system). Flat memory
means forgotten nodes are dropped: the figures after each batch stay where the first one was.
"""

from __future__ import annotations

import argparse
import gc
import os
import stat
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)

import afuse  # noqa: E402
from afuse import testing  # noqa: E402
from afuse.nodes import Node, NodeFS  # noqa: E402

_CLIENT = "import os,sys\np=sys.argv[1]\nfor i in range(int(sys.argv[2]),int(sys.argv[3])):os.stat(f'{p}/n{i}')\n"


class Leaf(Node):
    """File ``nI``: its identity is I."""

    __slots__ = ()

    async def getattr(self) -> afuse.Attr:
        return afuse.Attr(mode=stat.S_IFREG | 0o444, ino=self.key + 2 if isinstance(self.key, int) else 0)


class Names(Node):
    """A directory where every ``nI`` exists."""

    def __init__(self) -> None:
        super().__init__(stat.S_IFDIR | 0o755)

    async def lookup(self, name: bytes) -> Node | None:
        if not name.startswith(b"n") or not name[1:].isdigit():
            return None
        return Leaf(stat.S_IFREG | 0o444, key=int(name[1:]))


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def forget_all(fs: NodeFS, timeout: float = 120.0) -> float:
    """Drop the kernel's dentries and inodes; wait for the FORGETs. Returns the seconds taken."""
    t = time.monotonic()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2\n")
    while len(fs.nodes) > 1 and time.monotonic() - t < timeout:
        time.sleep(0.05)
    return time.monotonic() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=100_000)
    ap.add_argument("--clients", type=int, default=2)
    args = ap.parse_args()
    if os.geteuid() != 0:
        ap.error("needs root (mounting, and drop_caches to make the kernel forget)")
    fs = NodeFS(Names(), types=[Leaf])
    with testing.mounted(fs) as m:
        gc.collect()
        print(f"{'after':>10} {'nodes held':>11} {'RSS MiB':>8} {'objects':>9} {'lookups/s':>10}  (forget wait)")
        print(f"{'start':>10} {len(fs.nodes):>11} {rss_kib() / 1024:>8.1f} {len(gc.get_objects()):>9}")
        done = 0
        t_all = time.monotonic()
        while done < args.count:
            n = min(args.batch, args.count - done)
            t = time.monotonic()
            per = -(-n // args.clients)
            procs = [subprocess.Popen([sys.executable, "-c", _CLIENT, m.path, str(a), str(min(a + per, done + n))])
                     for a in range(done, done + n, per)]
            for p in procs:
                if p.wait() != 0:
                    raise SystemExit("a client failed")
            rate = n / (time.monotonic() - t)
            held, rss = len(fs.nodes), rss_kib()
            done += n
            print(f"{done:>10} {held:>11} {rss / 1024:>8.1f} {len(gc.get_objects()):>9} {rate:>10.0f}", flush=True)
            waited = forget_all(fs)
            gc.collect()
            print(f"{'forgotten':>10} {len(fs.nodes):>11} {rss_kib() / 1024:>8.1f} {len(gc.get_objects()):>9} "
                  f"{'':>10}  ({waited:.1f} s)", flush=True)
        total = time.monotonic() - t_all
        print(f"{done} lookups of distinct names in {total:.0f} s ({done / total:.0f}/s including forgets); "
              f"nodes held at the end: {len(fs.nodes)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
