"""stress-ng's xattr stressor on memfs against native ext4 and tmpfs, per bogo op and per xattr.

    python benchmarks/xattr.py [--seconds 10] [--rounds 3] [--native DIR] [--tmpfs DIR] [--unpinned]

Needs root, /dev/fuse and stress-ng. One bogo op of ``stress-ng --xattr`` creates as many xattrs
``user.var_N`` = ``orig-value-N`` as the file takes (up to 4096, stopping at ENOSPC), replaces each
three times, reads each four times, lists them, removes them (about 9 requests per xattr reach a
FUSE daemon), so its bogo ops/s falls with the number of xattrs a file takes: ext4 takes about a
hundred (its xattrs fit in the inode and one block), tmpfs and memfs (128 KiB per inode) all 4096.
The table shows, per filesystem (median of the rounds, which alternate the filesystems):

* ``bogo ops/s``: stress-ng's figure (1 worker), from a run of as many bogo ops as should take
  about ``--seconds`` at the per-call rate (``--xattr-ops``: stress-ng counts only finished ops, and
  one op on memfs takes seconds, so a timed run would round its figure badly);
* ``xattrs/op``: how many of stress-ng's xattrs one file takes (filled here the same way);
* ``xattrs/s``: bogo ops/s x xattrs/op, the work done: comparable across filesystems;
* ``calls/s``: xattr system calls per second of one process setting, reading and removing 64
  names on one file (``locks.xattr_calls``), the per-call rate.

Rows: ``native`` (a directory of the host, ext4 here), ``tmpfs`` (Linux's in-memory filesystem),
``memfs`` (default xattr space) and ``memfs-4k`` (``--xattr-space 4096``, close to ext4's limit).

Everything (this process, stress-ng, the memfs daemons) runs on one CPU unless ``--unpinned``: a
FUSE request is a hand-off between the caller and the daemon, and on two CPUs its cost depends on
whether the other CPU is idle (waking it up costs more than the request), which made memfs's
per-call rate swing between 13,000 and 44,000 calls/s from run to run on a 2-CPU VM.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from locks import daemon_mounted, stress, xattr_calls

KINDS = ("native", "tmpfs", "memfs", "memfs-4k")


@contextlib.contextmanager
def place(kind: str, base: str, tmpfs: str) -> Iterator[str]:
    """A directory of ``kind``: made in ``base`` (native), in ``tmpfs``, or a memfs mount."""
    if kind in ("native", "tmpfs"):
        d = tempfile.mkdtemp(prefix="afuse-bench-xattr-", dir=base if kind == "native" else tmpfs)
        try:
            yield d
        finally:
            shutil.rmtree(d, ignore_errors=True)
        return
    mnt = tempfile.mkdtemp(prefix="afuse-bench-xattr-mnt-", dir=base)
    extra = ["--xattr-space", "4096"] if kind == "memfs-4k" else []
    try:
        with daemon_mounted(kind, mnt, ["-m", "afuse.examples.memfs", mnt, *extra]):
            yield mnt
    finally:
        os.rmdir(mnt)


def capacity(where: str) -> int:
    """How many of stress-ng's xattrs (``user.var_N`` = ``orig-value-N``, N < 4096) one file takes."""
    p = os.path.join(where, "fill")
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        for i in range(4096):
            try:
                os.setxattr(fd, b"user.var_%d" % i, b"orig-value-%d" % i, os.XATTR_CREATE)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.E2BIG):
                    return i
                raise
        return 4096
    finally:
        os.close(fd)
        os.unlink(p)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--native", default="/var/tmp", help="a directory on the host's disk (default /var/tmp)")
    ap.add_argument("--tmpfs", default="/dev/shm", help="a directory on tmpfs (default /dev/shm)")
    ap.add_argument("--unpinned", action="store_true", help="do not run everything on one CPU")
    args = ap.parse_args()
    cpu = "unpinned"
    if not args.unpinned:
        cpu = max(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})  # inherited by stress-ng and the daemons
    if shutil.which("stress-ng") is None:
        print("needs stress-ng (apt-get install stress-ng)", file=sys.stderr)
        return 2
    types = {}
    for kind, d in (("native", args.native), ("tmpfs", args.tmpfs)):
        out = subprocess.run(["stat", "-f", "-c", "%T", d], capture_output=True, text=True, check=True)
        types[kind] = out.stdout.strip()
    runs: dict[str, dict[str, list[float]]] = {k: {} for k in KINDS}
    for _ in range(args.rounds):
        for kind in KINDS:
            with place(kind, args.native, args.tmpfs) as where:
                r = runs[kind]
                n, calls = capacity(where), xattr_calls(where)
                # A run of whole bogo ops lasting about --seconds: stress-ng counts only finished
                # ops, and on memfs one op (4096 xattrs) takes seconds.
                want = max(2, round(args.seconds * calls / (9 * n + 30)))
                ops = stress(where, "xattr", args.seconds * 4 + 30, 1, ops=want)
                r.setdefault("ops", []).append(ops)
                r.setdefault("n", []).append(n)
                r.setdefault("work", []).append(ops * n)
                r.setdefault("calls", []).append(calls)
    med = {k: {m: statistics.median(v) for m, v in r.items()} for k, r in runs.items()}
    print(f"stress-ng --xattr 1 --xattr-ops (about {args.seconds:g} s), {args.rounds} rounds (medians); "
          f"native: {args.native} ({types['native']}), tmpfs: {args.tmpfs} ({types['tmpfs']}); "
          f"CPU {cpu}; 1-min load average {os.getloadavg()[0]:.2f}\n")
    print(f"{'':10s}{'bogo ops/s':>12s}{'xattrs/op':>11s}{'xattrs/s':>12s}{'calls/s':>12s}"
          f"{'ops/native':>12s}{'xattrs/s/native':>17s}{'calls/native':>14s}{'xattrs/s/tmpfs':>16s}")
    nat, tmp = med["native"], med["tmpfs"]
    for kind in KINDS:
        v = med[kind]
        print(f"{kind:10s}{v['ops']:12,.1f}{v['n']:11,.0f}{v['work']:12,.0f}{v['calls']:12,.0f}"
              f"{v['ops'] / nat['ops']:12.3f}{v['work'] / nat['work']:17.3f}{v['calls'] / nat['calls']:14.3f}"
              f"{v['work'] / tmp['work']:16.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
