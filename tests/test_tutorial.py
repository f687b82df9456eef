"""The tutorial's filesystem of nodes (docs/examples/tutorialfs.py) against the real kernel.

The module is loaded from its path, so what docs/tutorial.md shows is what runs here.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio
from doc_helpers import ROOT, load_example, mounted, read, wait

import afuse
import afuse.notify
from afuse import device, testing
from afuse.testing import MountFactory

EXAMPLE = ROOT / "docs" / "examples" / "tutorialfs.py"




if TYPE_CHECKING:
    from tutorialfs import make_fs  # docs/examples is on mypy's path (pyproject.toml)
else:
    make_fs = load_example(EXAMPLE).make_fs








def test_python_blocks_are_verbatim() -> None:
    """Each Python block of docs/tutorial.md is copied from tutorialfs.py or from this file."""
    sources = EXAMPLE.read_text() + Path(__file__).read_text()
    blocks = re.findall(r"^```python\n(.*?)^```$", (ROOT / "docs" / "tutorial.md").read_text(), re.M | re.S)
    assert len(blocks) >= 8
    for block in blocks:
        assert block in sources, f"tutorial.md: not verbatim in tutorialfs.py or test_tutorial.py:\n{block}"


# -- step 1: a tree of plain values, run as the tutorial shows ---------------------------------

STEP_1 = r"""import afuse
from afuse.nodes import Dir

afuse.run(Dir({"hello.txt": "Hello, world!\n", "docs": {"a.txt": b"A\n"}}), "/mnt/hello")
"""


def test_step_1_a_tree_of_plain_values(tmp_path: Path) -> None:
    mp = str(tmp_path / "hello")
    os.mkdir(mp)
    proc = subprocess.Popen([sys.executable, "-c", STEP_1.replace("/mnt/hello", mp)], stderr=subprocess.PIPE)
    try:
        assert wait(lambda: mounted(mp) or proc.poll() is not None)
        assert read(os.path.join(mp, "hello.txt")) == b"Hello, world!\n"
        assert read(os.path.join(mp, "docs", "a.txt")) == b"A\n"
        assert sorted(os.listdir(mp)) == ["docs", "hello.txt"]
        with pytest.raises(PermissionError):
            open(os.path.join(mp, "hello.txt"), "w")
        proc.send_signal(signal.SIGTERM)  # afuse.run unmounts and returns
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if mounted(mp):
            device.unmount(mp, lazy=True)
    assert not mounted(mp)


# -- steps 2 and 3: notes ------------------------------------------------------------------------


def test_notes(fuse_mount: MountFactory) -> None:
    m = fuse_mount(make_fs())
    with open(m.join("notes", "a.txt"), "w") as f:
        f.write("hello\n")
    with open(m.join("notes", "a.txt")) as f:
        assert f.read() == "hello\n"
    assert os.listdir(m.join("notes")) == ["a.txt"]
    with pytest.raises(PermissionError):
        open(m.join("notes", "a.png"), "w")


def test_notes_behave_like_files(fuse_mount: MountFactory) -> None:
    m = fuse_mount(make_fs())
    path = m.join("notes", "n.txt")
    with open(path, "wb") as f:
        f.write(b"0123456789")
        f.seek(20)
        f.write(b"x")  # a hole, filled with zeros
    assert read(path) == b"0123456789" + bytes(10) + b"x"
    os.truncate(path, 4)
    assert read(path) == b"0123"
    with open(path, "w") as f:  # O_TRUNC
        f.write("new")
    assert read(path) == b"new"
    os.chmod(path, 0o600)
    st = os.stat(path)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_size == 3
    assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())  # the creator owns it
    os.utime(path, ns=(1_000_000_000, 2_000_000_000))
    assert os.stat(path).st_mtime_ns == 2_000_000_000
    os.rename(path, m.join("notes", "m.txt"))
    assert os.listdir(m.join("notes")) == ["m.txt"] and read(m.join("notes", "m.txt")) == b"new"
    with pytest.raises(PermissionError):
        os.rename(m.join("notes", "m.txt"), m.join("notes", "m.doc"))  # refused by Notes.rename
    with pytest.raises(FileExistsError):
        os.open(m.join("notes", "m.txt"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # checked by the bridge
    with pytest.raises(PermissionError):
        os.mkdir(m.join("notes", "sub"))  # Notes has no mkdir
    os.unlink(m.join("notes", "m.txt"))
    assert os.listdir(m.join("notes")) == []
    with pytest.raises(FileNotFoundError):
        os.unlink(m.join("notes", "m.txt"))


# -- step 4: squares, looked up on demand ---------------------------------------------------------


def test_squares(fuse_mount: MountFactory) -> None:
    m = fuse_mount(make_fs())
    assert read(m.join("squares", "12")) == b"144\n"
    assert read(m.join("squares", "999999")) == b"999998000001\n"
    assert sorted(os.listdir(m.join("squares")), key=int) == [str(n) for n in range(1, 11)]
    with pytest.raises(FileNotFoundError):
        os.stat(m.join("squares", "twelve"))
    # One file, one node: the same inode number however often it is looked up.
    assert os.stat(m.join("squares", "5")).st_ino == os.stat(m.join("squares", "5")).st_ino
    with pytest.raises(OSError) as e:
        open(m.join("squares", "5"), "w")
    assert e.value.errno in (errno.EACCES, errno.EPERM, errno.EROFS)


@pytest.mark.trio
async def test_forgotten_squares_are_dropped() -> None:
    fs = make_fs()
    async with testing.trio_mount(fs) as session:
        base = len(fs.nodes)
        for n in range(200):
            await trio.Path(session.mountpoint, "squares", str(n)).stat()
        assert len(fs.nodes) >= base + 190
        if session.negotiated is None or session.negotiated.minor < 45:
            pytest.skip("FUSE_NOTIFY_PRUNE needs protocol 7.45")
        squares = [nid for nid, node in fs.nodes.items() if type(node).__name__ == "Square"]
        await afuse.notify.prune(session, squares)
        with trio.fail_after(10):
            while len(fs.nodes) > base:
                await trio.sleep(0.01)
        assert len(fs.nodes) == base  # the kernel forgot them; so did the bridge


# -- step 5: the clock ------------------------------------------------------------------------------


def test_now_is_read_anew(fuse_mount: MountFactory) -> None:
    m = fuse_mount(make_fs())
    first = read(m.join("now"))
    assert re.fullmatch(rb"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\n", first)
    time.sleep(1.1)
    assert read(m.join("now")) != first  # no page cache in the way
    assert read(m.join("README")).startswith(b"Notes go in notes/")


# -- running it ------------------------------------------------------------------------------------


async def serve_until_unmounted(mountpoint: str) -> None:
    """The tutorial's ``trio.run`` form."""
    async with afuse.mount(make_fs(), mountpoint) as session:
        await session.wait_closed()


@pytest.mark.trio
async def test_mount_form_serves_until_unmounted(tmp_path: Path) -> None:
    mp = str(tmp_path / "mnt")
    os.mkdir(mp)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_until_unmounted, mp)
            assert await trio.to_thread.run_sync(wait, lambda: mounted(mp))
            assert await trio.Path(mp, "squares", "3").read_bytes() == b"9\n"
            await trio.run_process(["umount", mp])  # serve_until_unmounted returns
    assert not mounted(mp)


def test_command_line_with_debug(tmp_path: Path) -> None:
    mp = str(tmp_path / "mnt")
    os.mkdir(mp)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, str(EXAMPLE), mp, "--debug", "-o", "fsname=afuse-tutorial"],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert wait(lambda: mounted(mp) or proc.poll() is not None)
        assert proc.poll() is None
        with open(os.path.join(mp, "notes", "a.txt"), "w") as f:
            f.write("cli")
        assert read(os.path.join(mp, "notes", "a.txt")) == b"cli"
        assert (os.path.realpath(mp), "fuse", "afuse-tutorial") in device.find_mounts()
        proc.send_signal(signal.SIGTERM)  # unmounts and exits 0
        _out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if mounted(mp):
            device.unmount(mp, lazy=True)
    assert proc.returncode == 0
    assert not mounted(mp)
    assert " afuse DEBUG -> CREATE unique=" in err and "name=b'a.txt'" in err
    assert " afuse DEBUG <- WRITE unique=" in err


def test_debug_log_and_errors(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="afuse")
    with testing.mounted(make_fs()) as m:
        with pytest.raises(FileNotFoundError):
            os.stat(m.join("notes", "missing.txt"))
        with open(m.join("notes", "b.txt"), "wb") as f:
            f.write(b"x")
    lines = [r.getMessage() for r in caplog.records if r.name == "afuse"]
    assert any(line.startswith("-> LOOKUP") and "name=b'missing.txt'" in line for line in lines)
    assert any(line.startswith("<- LOOKUP") and ": ENOENT in " in line for line in lines)
    assert any(line.startswith("<- CREATE") and ": OK, 144 bytes in " in line for line in lines)
