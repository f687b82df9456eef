"""Everyday tools on memfs and passthroughfs give the same results as on a native directory."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from afuse import testing

SCRIPT = r"""
set -e
cp -a "$SAMPLE" tree
tar -cf archive.tar tree
mkdir extracted && tar -xf archive.tar -C extracted
diff -r tree extracted/tree
git init -q repo
cp -a tree/. repo/
cd repo
git add -A
git -c user.name=t -c user.email=t@example.com commit -qm first
echo change >> hello.txt
git -c user.name=t -c user.email=t@example.com commit -qam second
git log --format=%s | cat
git status --porcelain | cat
git fsck --no-progress 2>&1 | cat
cd ..
ln -s tree/hello.txt link
ln tree/hello.txt hard.txt
stat -c '%h %F' tree/hello.txt link
find tree extracted repo -not -path '*/.git/*' \( -type d -printf '%y %m %P\n' -o -printf '%y %m %s %P\n' \) | sort
find tree -type f -printf '%s\n' | awk '{s += $1} END {print s}'
rm -rf tree extracted repo archive.tar link hard.txt
ls -A
"""


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small source tree: nested dirs, text and binary files, a symlink, modes."""
    if shutil.which("git") is None:
        pytest.fail("git is required (apt-get install git)")
    root = str(tmp_path_factory.mktemp("sample"))
    os.makedirs(os.path.join(root, "src", "pkg", "deep"))
    with open(os.path.join(root, "hello.txt"), "w") as f:
        f.write("hello\n")
    for i in range(40):
        with open(os.path.join(root, "src", "pkg", f"m{i}.py"), "w") as f:
            f.write(f"X = {i}\n" * (i * 13 + 1))
    with open(os.path.join(root, "src", "blob.bin"), "wb") as f:
        f.write(os.urandom(1 << 20) + b"\0" * 100000)
    os.chmod(os.path.join(root, "src", "blob.bin"), 0o600)
    os.symlink("../hello.txt", os.path.join(root, "src", "hello-link"))
    with open(os.path.join(root, "src", "pkg", "deep", "run.sh"), "w") as f:
        f.write("#!/bin/sh\necho hi\n")
    os.chmod(os.path.join(root, "src", "pkg", "deep", "run.sh"), 0o755)
    return root


def _run(where: str, sample: str) -> str:
    res = subprocess.run(["bash", "-c", SCRIPT], cwd=where, capture_output=True, text=True,
                         timeout=240, env={**os.environ, "SAMPLE": sample, "GIT_CONFIG_NOSYSTEM": "1",
                                           "HOME": where})
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_memfs_matches_native(sample: str, tmp_path: Path) -> None:
    from afuse.examples.memfs import MemFS

    native = tmp_path / "native"
    native.mkdir()
    expected = _run(str(native), sample)
    with testing.mounted(MemFS()) as m:
        assert _run(m.path, sample) == expected
        assert os.listdir(m.path) == []


def test_passthroughfs_matches_native(sample: str, tmp_path: Path) -> None:
    from afuse.examples.passthroughfs import PassthroughFS

    native = tmp_path / "native"
    native.mkdir()
    source = tmp_path / "source"
    source.mkdir()
    expected = _run(str(native), sample)
    with testing.mounted(PassthroughFS(str(source))) as m:
        assert _run(m.path, sample) == expected
        assert os.listdir(m.path) == [] == os.listdir(source)
