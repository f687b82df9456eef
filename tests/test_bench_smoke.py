"""The benchmark script runs and measures (``--quick``); no assertion about speed."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks" / "bench.py"

# Every figure the quick run must report: (section, phase) -> the keys holding numbers.
EXPECTED = {
    ("metadata", "create"), ("metadata", "stat"), ("metadata", "readdir"), ("metadata", "rename"),
    ("metadata", "unlink"),
    ("sequential", "write"), ("sequential", "read"),
    ("small_files", "write"), ("small_files", "read"),
    ("listing", "listdir"),
    ("latency", "getattr_pinned"), ("latency", "getattr_unpinned"),
}


def _numbers(value: Any, where: str = "") -> Iterator[tuple[str, float]]:
    """Every number in a JSON document (booleans are not numbers here), with its path."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield where, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _numbers(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _numbers(v, f"{where}[{i}]")


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse")
def test_bench_quick_runs_and_measures(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--json", str(out), "--tmpdir", str(work)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    # Nothing left behind: no mount under the work directory, no temporary directory in it.
    with open("/proc/self/mountinfo") as f:
        assert not [line for line in f if str(work) in line]
    assert list(work.iterdir()) == []
    assert "afuse/native" in proc.stdout

    data = json.loads(out.read_text())
    assert data["problems"] == []
    for section, phase in EXPECTED:
        fig = data[section][phase]
        assert fig["afuse"] > 0 and fig["native"] > 0 and fig["ratio"] > 0, (section, phase, fig)
    numbers = list(_numbers(data))
    assert len(numbers) > 3 * len(EXPECTED)
    for where, value in numbers:
        assert math.isfinite(value) and value > 0, f"{where} = {value!r}"

    if data["pyfuse3"]["available"]:
        for phase in ("getattr_pinned", "getattr_unpinned"):
            assert data["pyfuse3"][phase]["pyfuse3"] > 0
    else:
        assert "pyfuse3 not installed: baseline skipped" in proc.stdout
