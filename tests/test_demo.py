"""README's main job, ``python -m afuse.demo``, runs to the end and leaves nothing mounted."""

from __future__ import annotations

import subprocess
import sys

from afuse import device


def test_demo_runs_and_cleans_up(fuse_available: None) -> None:
    res = subprocess.run([sys.executable, "-m", "afuse.demo"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "memfs agrees with the native directory" in res.stdout
    assert "passthroughfs agrees with the native directory" in res.stdout
    assert "all demos passed; everything unmounted" in res.stdout
    assert not [mp for mp, _t, _s in device.find_mounts() if "/afuse-demo-" in mp]
