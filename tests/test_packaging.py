"""Packaging: ``python -m build`` makes an sdist and a wheel that install into a fresh virtualenv
and work there (import, metadata, mounting an example filesystem)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import afuse
from afuse import device

SOURCE = Path(__file__).resolve().parent.parent
TIMEOUT = 240.0


def run(*args: str | Path, cwd: Path) -> str:
    """Run a command outside the source tree (so it cannot import afuse from there)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_build_install_and_mount_from_a_fresh_venv(tmp_path: Path) -> None:
    version = afuse.__version__
    dist = tmp_path / "dist"
    run(sys.executable, "-m", "build", "--outdir", dist, SOURCE, cwd=tmp_path)
    sdist = dist / f"afuse-{version}.tar.gz"
    wheel = dist / f"afuse-{version}-py3-none-any.whl"
    assert sorted(p.name for p in dist.iterdir()) == sorted([sdist.name, wheel.name])

    with tarfile.open(sdist) as tar:
        in_sdist = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    for name in ("README.md", "CHANGELOG.md", "pyproject.toml", "MANIFEST.in", "docs/asyncio.md",
                 "docs/tutorial.md", "docs/examples/tutorialfs.py", "tests/conftest.py",
                 "tests/test_packaging.py", "tools/opcode_coverage.py", "benchmarks/bench.py",
                 "afuse/py.typed", "afuse/asyncio.py"):
        assert name in in_sdist, name
    with zipfile.ZipFile(wheel) as whl:
        in_wheel = set(whl.namelist())
        metadata = whl.read(f"afuse-{version}.dist-info/METADATA").decode()
    for name in ("afuse/py.typed", "afuse/asyncio.py", "afuse/wire/requests.py",
                 "afuse/examples/hello.py", "afuse/examples/hello_asyncio.py"):
        assert name in in_wheel, name
    assert not any(n.startswith(("tests/", "docs/")) for n in in_wheel)
    assert f"\nVersion: {version}\n" in metadata
    assert "Requires-Dist: trio" in metadata and "Requires-Dist: attrs" in metadata

    venv = tmp_path / "venv"
    try:
        run(sys.executable, "-m", "venv", venv, cwd=tmp_path)  # no system site-packages
        python = venv / "bin" / "python"
        run(python, "-m", "pip", "install", "-q", wheel, cwd=tmp_path)
        out = run(python, "-c", "import afuse, importlib.metadata as m; "
                  "print(afuse.__file__, afuse.__version__, m.version('afuse'))", cwd=tmp_path)
        where, v1, v2 = out.split()
        assert where.startswith(str(venv)) and v1 == v2 == version
        assert "usage: python -m afuse info" in run(python, "-m", "afuse", "--help", cwd=tmp_path)
        assert_mounts_hello(python, tmp_path)
    finally:
        shutil.rmtree(venv, ignore_errors=True)
    assert not venv.exists()


def assert_mounts_hello(python: Path, tmp_path: Path) -> None:
    """The installed afuse serves its hello example; SIGTERM unmounts it."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    resolved = device.resolve_mountpoint(str(mnt))

    def mounted() -> bool:
        return any(mp == resolved for mp, _t, _s in device.find_mounts())

    proc = subprocess.Popen([python, "-m", "afuse.examples.hello", mnt], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not mounted():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "hello did not mount"
            time.sleep(0.02)
        assert (mnt / "hello").read_bytes() == b"Hello, world!\n"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if mounted():
            device.unmount(str(mnt), lazy=True)
            raise AssertionError("hello stayed mounted")
