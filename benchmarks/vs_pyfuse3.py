"""afuse's passthroughfs against pyfuse3's passthrough example, same workloads, same run.

    python benchmarks/vs_pyfuse3.py --example PYFUSE3_SOURCE/examples/passthroughfs.py [--quick]

pyfuse3 is not a dependency of afuse: install it yourself (it builds against libfuse3-dev) and
point ``--example`` at ``examples/passthroughfs.py`` of its source distribution. Both daemons run
as child processes; neither uses FUSE passthrough. Prints figures and ratios, asserts nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("afuse_bench", os.path.join(HERE, "bench.py"))
assert _spec is not None and _spec.loader is not None
bench: Any = importlib.util.module_from_spec(_spec)
sys.modules["afuse_bench"] = bench
_spec.loader.exec_module(bench)

# Runs pyfuse3's example Operations class on SOURCE at MOUNTPOINT, printing "ready" once mounted.
_LAUNCH = r"""
import runpy, sys
import pyfuse3, trio
example, source, mountpoint = sys.argv[1:4]
ns = runpy.run_path(example, run_name="pyfuse3_example")
ops = ns["Operations"](source)
options = set(pyfuse3.default_options)
options.add("fsname=fusebench-pyfuse3")
pyfuse3.init(ops, mountpoint, options)
print("ready", flush=True)
try:
    trio.run(pyfuse3.main)
finally:
    pyfuse3.close(unmount=True)
"""

TARGETS = {("metadata", "create"): 1.5, ("metadata", "rename"): 1.5, ("metadata", "unlink"): 1.5,
           ("small files", "write"): 1.5, ("small files", "read"): 1.5}


def measure(daemon: Any, workload: Callable[[str, Any], dict[str, float]], cfg: Any,
            problems: list[str]) -> dict[str, float]:
    """Median of ``cfg.repeat`` runs of ``workload`` on a fresh directory of the mount."""
    runs: list[dict[str, float]] = []
    with bench.serving(daemon, problems):
        for i in range(cfg.repeat):
            base = daemon.join(f"run{i}")
            os.mkdir(base)
            runs.append(workload(base, cfg))
            shutil.rmtree(base)
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--example", required=True, help="pyfuse3's examples/passthroughfs.py")
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    args = p.parse_args(argv)
    try:
        import pyfuse3  # noqa: F401
    except ImportError:
        print("pyfuse3 is not installed: nothing to compare against", file=sys.stderr)
        return 2
    cfg = bench.Config(files=200, repeat=1, loop_seconds=0.5, quick=True) if args.quick else bench.Config()
    problems: list[str] = []
    rows: list[tuple[str, str, float, float]] = []
    tmp = tempfile.mkdtemp(prefix=bench.PREFIX + "vs-")
    try:
        workloads = (("metadata", bench.wl_metadata), ("small files", bench.wl_small),
                     ("listing", bench.wl_listing))
        for name, workload in workloads:
            src_a, src_p = os.path.join(tmp, f"{name}-a"), os.path.join(tmp, f"{name}-p")
            os.mkdir(src_a)
            os.mkdir(src_p)
            afuse = bench.afuse_daemon("afuse passthroughfs",
                                       "afuse.examples.passthroughfs:PassthroughFS", [src_a])
            pyf = bench.Daemon("pyfuse3 passthroughfs", lambda mnt, s=src_p: [
                sys.executable, "-c", _LAUNCH, os.path.abspath(args.example), s, mnt])
            a = measure(afuse, workload, cfg, problems)
            b = measure(pyf, workload, cfg, problems)
            rows += [(name, k, b[k], a[k]) for k in a]
    finally:
        for d in list(bench.Daemon.alive):
            d.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{'workload':<12} {'measure':<8} {'pyfuse3':>12} {'afuse':>12} {'afuse/pyfuse3':>14}  target")
    for name, k, b, a in rows:
        target = TARGETS.get((name, k))
        mark = "" if target is None else f">= {target}: {'met' if a / b >= target else 'MISSED'}"
        print(f"{name:<12} {k:<8} {b:>12,.0f} {a:>12,.0f} {a / b:>14.2f}  {mark}")
    for line in problems:
        print("PROBLEM:", line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
