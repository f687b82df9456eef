"""``python -m afuse info`` against the real kernel, run as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from afuse import device
from afuse.pytest_plugin import fuse_unavailable_reason

pytestmark = pytest.mark.timeout(90)

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", "afuse", *args], capture_output=True, text=True,
                          timeout=60, env=env)


@pytest.mark.skipif(fuse_unavailable_reason() is not None, reason=str(fuse_unavailable_reason()))
def test_info_reports_kernel_features() -> None:
    before = {mp for mp, _t, _s in device.find_mounts()}
    r = _run("info")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    facts = {line.split(None, 1)[0]: line.split(None, 1)[1] for line in out.splitlines()
             if line.startswith("  ") and not line[:4].strip().isdigit() and len(line.split()) > 1}
    assert facts["protocol"].startswith("7.45")
    lines = {line.split()[1]: line for line in out.splitlines()
             if line[:4].strip().isdigit() and len(line.split()) > 2}
    assert len(lines) == 43  # bits 0..42
    assert lines["HAS_RESEND"].split()[0] == "39" and " info " in lines["HAS_RESEND"]
    assert lines["PASSTHROUGH"].split()[0] == "37" and "offered" in lines["PASSTHROUGH"]
    assert "InitConfig(passthrough=True)" in out and "CAP_SYS_ADMIN" in out
    assert "negotiated" in lines["MAX_PAGES"]
    assert "default*" in lines["POSIX_LOCKS"]  # the scratch filesystem has no lock handlers
    assert "needs the getlk and setlk handler(s)" in out
    uring = open("/sys/module/fuse/parameters/enable_uring").read().strip()
    if uring != "Y":
        assert "enable_uring is off" in out
    assert "max_pages_limit" in out and "fusectl" in out
    assert facts["passthrough"].startswith(("available", "negotiable", "not", "could not"))
    assert facts["fs.fuse.max_pages_limit"].isdigit()
    # The scratch filesystems are gone.
    assert not [mp for mp, _t, _s in device.find_mounts() if mp not in before and "afuse-info-" in mp]


def test_usage() -> None:
    r = _run("--help")
    assert r.returncode == 0 and "info" in r.stdout
    r = _run("bogus")
    assert r.returncode == 2 and "unknown command" in r.stderr
