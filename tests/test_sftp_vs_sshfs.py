"""The sftpfs-vs-sshfs benchmark runs end to end (``--quick``): figures, command lines, the delay line.

Nothing here is about speed. It checks that every workload produced a figure on both sides in both
phases, that both command lines are printed, that the 20 ms phase really goes through the delay
line (a round trip there takes at least the 20 ms it adds), and that nothing is left behind.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks" / "sftp_vs_sshfs.py"
SIDES = {"sshfs", "sftpfs"}
WORKLOADS = {"seq_write", "seq_read", "create_small", "read_small", "list", "list_l", "stat", "parallel_read"}


def _mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(str(path) + "/")]


def test_sftp_vs_sshfs_quick(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.Popen(
        [sys.executable, str(BENCH), "--quick", "--json", str(out), "--tmpdir", str(work)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the benchmark unmounts, stops sshd and removes its files on SIGTERM
        try:
            stdout, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        raise AssertionError(f"the quick benchmark took over 240 s\nstdout:\n{stdout}\nstderr:\n{stderr}") from None
    finally:
        left = _mounts_under(work)
        for mnt in left:
            subprocess.run(["umount", "-l", mnt], check=False)
    assert proc.returncode == 0, f"stdout:\n{stdout}\nstderr:\n{stderr}"
    assert not left, f"left mounted: {left}"
    assert list(work.iterdir()) == []

    data = json.loads(out.read_text())
    assert set(data["rates"]) == {"0 ms", "20 ms"}
    for phase, by_workload in data["rates"].items():
        assert set(by_workload) == set(WORKLOADS), phase
        for wl, by_side in by_workload.items():
            assert set(by_side) == set(SIDES), (phase, wl)
            for side, runs in by_side.items():
                assert len(runs) == 1 and all(math.isfinite(r) and r > 0 for r in runs), (phase, wl, side, runs)

    # Both command lines are printed, and both clients reach the server through the delay line at
    # 20 ms: a round trip cannot be shorter than the delay it crosses (and is far shorter without it).
    assert "\nsshfs: sshfs -f " in stdout
    assert "\nsftpfs: " in stdout and "afuse.examples.sftpfs" in stdout
    assert "no netem" in stdout
    rtt = data["rtt_ms"]["20 ms"]
    assert rtt["echo through the delay line"] >= 19.0
    for side in SIDES:
        assert rtt[f"SFTP round trip via {side}"] >= 19.0, rtt
        assert rtt[f"SFTP round trip via {side}"] > \
            data["rtt_ms"]["0 ms"][f"SFTP round trip via {side}"]
    assert "ratio" in stdout and "misses:" in stdout
