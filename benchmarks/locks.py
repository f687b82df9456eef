"""Lock and xattr stressors: stress-ng ``lockf``, ``flock`` and ``xattr`` on passthroughfs, memfs
and the host directory itself (the native baseline), all in one run, plus a fairness check.

    python benchmarks/locks.py [--seconds 5] [--workers 2] [--rounds 3]

Needs root, /dev/fuse and stress-ng (``apt-get install stress-ng``). Prints bogo ops/s per
stressor and filesystem (the median of the rounds, which alternate the filesystems so that
background load hits all alike) and each one's ratio to native and to memfs. ``xattr`` bogo ops are not
comparable across filesystems: one op sets, reads and removes as many xattrs as the file takes
(up to 4096; ext4 refuses after about 100, memfs and tmpfs take all 4096), so its row also shows
xattr system calls per second, which are (``benchmarks/xattr.py`` compares xattrs in detail).
Fairness: three processes take and release one POSIX lock in a loop on each filesystem for the
given time; the table shows each one's count.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator

PY = sys.executable


@contextlib.contextmanager
def mounted(kind: str, base: str) -> Iterator[str]:
    """A directory to stress: the host's (native), or a passthroughfs / memfs mount."""
    if kind == "native":
        d = os.path.join(base, "native")
        os.mkdir(d)
        yield d
        return
    mnt, src = os.path.join(base, kind + "-mnt"), os.path.join(base, kind + "-src")
    os.mkdir(mnt)
    os.mkdir(src)
    args = ["-m", "afuse.examples.memfs", mnt] if kind == "memfs" else \
        ["-m", "afuse.examples.passthroughfs", src, mnt]
    with daemon_mounted(kind, mnt, args):
        yield mnt


@contextlib.contextmanager
def daemon_mounted(kind: str, mnt: str, args: list[str]) -> Iterator[None]:
    """Run ``python ARGS`` (a filesystem daemon mounting ``mnt``) for the block; stop it after."""
    p = subprocess.Popen([PY, *args], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mnt):
            if time.monotonic() > deadline or p.poll() is not None:
                raise RuntimeError(f"{kind} did not mount")
            time.sleep(0.05)
        yield
    finally:
        p.terminate()
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            subprocess.run(["umount", "-l", mnt], check=False)


def stress(where: str, stressor: str, seconds: float, workers: int, ops: int | None = None) -> float:
    """stress-ng bogo ops/s (real time) of ``stressor`` run in ``where`` for ``seconds``, or until
    ``ops`` bogo ops are done (then ``seconds`` is only a time limit)."""
    stop = [] if ops is None else [f"--{stressor}-ops", str(ops)]
    out = subprocess.run(["stress-ng", f"--{stressor}", str(workers), "--timeout", f"{seconds:g}", *stop,
                          "--metrics-brief", "--temp-path", where], capture_output=True, text=True,
                         timeout=seconds * 10 + 60)
    m = re.search(rf"{stressor}\s+(\d+)\s+([\d.]+)\s+[\d.]+\s+[\d.]+\s+([\d.]+)", out.stderr + out.stdout)
    if m is None:
        raise RuntimeError(f"stress-ng {stressor} in {where}: no metrics\n{out.stderr}")
    return float(m.group(3))


def xattr_calls(where: str) -> float:
    """xattr system calls per second, one process: set, get, remove 64 names on one file."""
    p = os.path.join(where, "x")
    open(p, "w").close()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 1.0:
        for i in range(64):
            os.setxattr(p, b"user.v%d" % i, b"value-%d" % i)
        for i in range(64):
            os.getxattr(p, b"user.v%d" % i)
        for i in range(64):
            os.removexattr(p, b"user.v%d" % i)
        n += 192
    os.unlink(p)
    return n / (time.perf_counter() - t0)


FAIR = textwrap.dedent("""
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR)
    end, n = time.monotonic() + float(sys.argv[2]), 0
    while time.monotonic() < end:
        fcntl.lockf(fd, fcntl.LOCK_EX, 10, 0)
        n += 1
        fcntl.lockf(fd, fcntl.LOCK_UN, 10, 0)
    print(n)
""")


def fairness(where: str, seconds: float, procs: int = 3) -> list[int]:
    """Lock acquisitions per process, ``procs`` processes contending for one lock."""
    path = os.path.join(where, "fair")
    with open(path, "wb") as f:
        f.write(b"x" * 10)
    ps = [subprocess.Popen([PY, "-c", FAIR, path, str(seconds)], stdout=subprocess.PIPE, text=True)
          for _ in range(procs)]
    return [int(p.communicate(timeout=seconds * 10 + 30)[0]) for p in ps]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if shutil.which("stress-ng") is None:
        print("needs stress-ng (apt-get install stress-ng)", file=sys.stderr)
        return 2
    base = tempfile.mkdtemp(prefix="afuse-bench-locks-", dir="/tmp")
    kinds = ["native", "memfs", "passthroughfs"]
    runs: dict[str, dict[str, list[float]]] = {}
    fair: dict[str, list[int]] = {}
    try:
        for rnd in range(args.rounds):
            for kind in kinds:
                os.makedirs(os.path.join(base, str(rnd)), exist_ok=True)
                with mounted(kind, os.path.join(base, str(rnd))) as where:
                    for s in ("lockf", "flock", "xattr"):
                        runs.setdefault(s, {}).setdefault(kind, []).append(
                            stress(where, s, args.seconds, args.workers))
                    runs.setdefault("xattr calls/s", {}).setdefault(kind, []).append(xattr_calls(where))
                    if rnd == 0:
                        fair[kind] = fairness(where, min(args.seconds, 3.0))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    rows = {s: {k: statistics.median(v) for k, v in per.items()} for s, per in runs.items()}
    print(f"{'stressor':14s}" + "".join(f"{k:>15s}" for k in kinds) + f"{'pt/native':>11s}{'pt/memfs':>10s}"
          f"{'memfs/native':>13s}")
    for s, v in rows.items():
        print(f"{s:14s}" + "".join(f"{v[k]:15,.1f}" for k in kinds)
              + f"{v['passthroughfs'] / v['native']:11.2f}{v['passthroughfs'] / v['memfs']:10.2f}"
              + f"{v['memfs'] / v['native']:13.2f}")
    print("\nfairness (3 processes, one lock; acquisitions each, min/max):")
    for k, counts in fair.items():
        print(f"  {k:14s} {counts}  min/max {min(counts) / max(max(counts), 1):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
