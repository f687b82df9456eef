"""README's main job, ``python -m afuse.demo``, runs to the end and leaves nothing mounted."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from afuse import device


def test_demo_runs_and_cleans_up(fuse_available: None) -> None:
    res = subprocess.run([sys.executable, "-m", "afuse.demo"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "memfs agrees with the native directory" in res.stdout
    assert "passthroughfs agrees with the native directory" in res.stdout
    assert "all demos passed; everything unmounted" in res.stdout
    assert not [mp for mp, _t, _s in device.find_mounts() if "/afuse-demo-" in mp]


def test_readme_tells_a_new_user_what_they_need() -> None:
    """The set-up starts from a checkout, says how long the tests take, and names the tools."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    setup = readme.split("## Set-up on a fresh Debian 12 machine", 1)[1].split("\n## ", 1)[0]
    assert "git clone" in setup and "cd afuse" in setup
    assert re.search(r"takes about \d+ minutes", setup)
    assert setup.count("```sh") == 2  # exactly the two commands: the main job, the tests
    assert "`python -m afuse info`" in readme
    for name in ("hello", "memfs", "passthroughfs"):
        assert f"python -m afuse.examples.{name} " in readme
    res = subprocess.run([sys.executable, "-m", "afuse", "info"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "protocol" in res.stdout, res.stderr
