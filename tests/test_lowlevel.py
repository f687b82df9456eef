"""The low-level tutorial's filesystem (docs/examples/lowlevelfs.py) against the real kernel.

The module is loaded from its path, so what docs/lowlevel.md shows is what runs here.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import signal
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio
from doc_helpers import ROOT, load_example, mounted, python_blocks, read, wait

import afuse
import afuse.notify
from afuse import device, testing
from afuse.testing import MountFactory, ProcessMountFactory

EXAMPLE = ROOT / "docs" / "examples" / "lowlevelfs.py"




if TYPE_CHECKING:
    from lowlevelfs import LowLevelFS  # docs/examples is on mypy's path (pyproject.toml)
else:
    LowLevelFS = load_example(EXAMPLE).LowLevelFS


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask










@pytest.mark.parametrize("doc", ["lowlevel.md", "testing.md", "asyncio.md"])
def test_python_blocks_are_verbatim(doc: str) -> None:
    """Each Python block of the page is copied from lowlevelfs.py, this file, or (asyncio) the
    asyncio example and its tests."""
    sources = EXAMPLE.read_text() + Path(__file__).read_text() + (ROOT / "tests" / "test_asyncio.py").read_text() \
        + (ROOT / "afuse" / "examples" / "hello_asyncio.py").read_text()
    blocks = python_blocks(ROOT / "docs" / doc)
    assert blocks
    for block in blocks:
        assert block in sources, f"{doc}: not verbatim in lowlevelfs.py or test_lowlevel.py:\n{block}"


# -- the fuse_mount fixture: plain synchronous tests ------------------------------------------


def test_hello(fuse_mount: MountFactory) -> None:
    m = fuse_mount(LowLevelFS())
    with open(m.join("hello"), "w") as f:
        f.write("Hello, world!\n")
    with open(m.join("hello")) as f:
        assert f.read() == "Hello, world!\n"
    assert os.listdir(m.path) == ["hello"]


def test_create_write_read_getattr(fuse_mount: MountFactory) -> None:
    ops = LowLevelFS()
    m = fuse_mount(ops)
    with open(m.join("notes.txt"), "wb") as f:  # LOOKUP (ENOENT), CREATE, WRITE, RELEASE
        f.write(b"hello\n")
    assert read(m.join("notes.txt")) == b"hello\n"  # LOOKUP, OPEN, READ
    st = os.stat(m.join("notes.txt"))
    assert stat.S_ISREG(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o666 & ~_umask()
    assert (st.st_size, st.st_nlink, st.st_uid, st.st_gid) == (6, 1, os.getuid(), os.getgid())
    assert st.st_ino == ops.names[b"notes.txt"]
    root = os.stat(m.path)
    assert stat.S_ISDIR(root.st_mode) and root.st_ino == 1
    with pytest.raises(FileNotFoundError):
        os.stat(m.join("missing"))
    with pytest.raises(FileExistsError):
        os.open(m.join("notes.txt"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)


def test_writes_at_offsets_and_large_files(fuse_mount: MountFactory) -> None:
    m = fuse_mount(LowLevelFS())
    path = m.join("f")
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        assert os.pwrite(fd, b"tail", 10) == 4  # past the end: a hole of zeros
        assert os.pwrite(fd, b"head", 0) == 4
        assert os.pread(fd, 100, 0) == b"head" + bytes(6) + b"tail"
        assert os.pread(fd, 4, 12) == b"il"
        assert os.pread(fd, 4, 100) == b""
    finally:
        os.close(fd)
    with open(path, "ab") as f:
        f.write(b"+")
    assert read(path) == b"head" + bytes(6) + b"tail+"
    big = os.urandom(3 * 1024 * 1024 + 123)  # several WRITE and READ requests
    with open(m.join("big"), "wb") as f:
        f.write(big)
    assert read(m.join("big")) == big
    assert os.stat(m.join("big")).st_blocks == (len(big) + 511) // 512


def test_open_with_o_trunc_empties_the_file(fuse_mount: MountFactory) -> None:
    m = fuse_mount(LowLevelFS())
    path = m.join("f")
    with open(path, "wb") as f:
        f.write(b"a long first version")
    with open(path, "wb") as f:  # OPEN with O_TRUNC (atomic_o_trunc): no SETATTR
        f.write(b"v2")
    assert read(path) == b"v2"
    assert os.stat(path).st_size == 2


def test_setattr_truncate_and_chmod(fuse_mount: MountFactory) -> None:
    m = fuse_mount(LowLevelFS())
    path = m.join("f")
    with open(path, "wb") as f:
        f.write(b"0123456789")
    os.truncate(path, 4)  # SETATTR size
    assert read(path) == b"0123"
    os.truncate(path, 6)
    assert read(path) == b"0123\0\0"
    with open(path, "r+b") as f:
        os.ftruncate(f.fileno(), 1)  # SETATTR size with the handle
    assert read(path) == b"0"
    os.chmod(path, 0o600)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_ISREG(os.stat(path).st_mode)
    os.utime(path, ns=(1, 2))  # accepted, ignored
    with pytest.raises(FileNotFoundError):
        os.truncate(m.join("missing"), 0)


def test_readdir_lists_everything_once_while_files_go(fuse_mount: MountFactory) -> None:
    ops = LowLevelFS()
    m = fuse_mount(ops)
    names = [f"file-{i:04d}-{'x' * 30}" for i in range(1500)]  # many READDIR replies
    for name in names:
        with open(m.join(name), "wb"):
            pass
    assert sorted(os.listdir(m.path)) == names
    listing = subprocess.run(["ls", "-a1", m.path], capture_output=True, text=True, check=True).stdout.split()
    assert listing[:2] == [".", ".."] and sorted(listing[2:]) == names
    # Unlink each entry as it is listed (what rm -r does): cookies stay valid.
    seen = []
    with os.scandir(m.path) as it:
        for entry in it:
            seen.append(entry.name)
            os.unlink(entry.path)
    assert sorted(seen) == names
    assert os.listdir(m.path) == []
    assert ops.names == {}


def test_unlink(fuse_mount: MountFactory) -> None:
    ops = LowLevelFS()
    m = fuse_mount(ops)
    for name in ("a", "b"):
        with open(m.join(name), "wb") as f:
            f.write(name.encode())
    os.unlink(m.join("a"))
    assert os.listdir(m.path) == ["b"]
    with pytest.raises(FileNotFoundError):
        os.stat(m.join("a"))
    with pytest.raises(FileNotFoundError):
        os.unlink(m.join("a"))
    # An unlinked file lives on while it is open: the kernel still knows its nodeid.
    nodeid = ops.names[b"b"]
    fd = os.open(m.join("b"), os.O_RDWR)
    try:
        os.unlink(m.join("b"))
        assert ops.nodes[nodeid].attr.nlink == 0
        os.pwrite(fd, b"still here", 0)
        assert os.pread(fd, 100, 0) == b"still here"
        assert os.fstat(fd).st_size == 10
    finally:
        os.close(fd)
    # Closing drops the kernel's inode, which sends FORGET: the file is freed.
    assert wait(lambda: nodeid not in ops.nodes)


def test_debug_log_has_a_line_per_request(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="afuse")
    with testing.mounted(LowLevelFS()) as m:
        with open(m.join("f"), "wb") as f:
            f.write(b"x")
        with pytest.raises(FileNotFoundError):
            os.stat(m.join("missing"))
    lines = [r.getMessage() for r in caplog.records if r.name == "afuse"]
    assert any(line.startswith("INIT: kernel 7.") for line in lines)
    assert any(line.startswith("-> CREATE unique=") and "nodeid=1 " in line and "name=b'f'" in line for line in lines)
    assert any(line.startswith("<- CREATE unique=") and ": OK, 144 bytes in " in line for line in lines)
    assert any(line.startswith("-> WRITE unique=") and "offset=0 data=b'x'" in line for line in lines)
    assert any(line.startswith("<- WRITE unique=") and ": OK, 8 bytes in " in line for line in lines)
    assert any(line.startswith("<- LOOKUP unique=") and ": ENOENT in " in line for line in lines)


# -- fuse_mount_process: the filesystem in a child process, for mmap ---------------------------


def test_mmap(fuse_mount_process: ProcessMountFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(EXAMPLE.parent))  # the child imports lowlevelfs
    m = fuse_mount_process("lowlevelfs:LowLevelFS")
    with open(m.join("f"), "wb") as f:
        f.write(b"0123456789")
    with open(m.join("f"), "r+b") as rw, mmap.mmap(rw.fileno(), 0) as mm:
        assert mm[:4] == b"0123"  # a page fault, answered by READ in the child
        mm[:4] = b"abcd"
        mm.flush()  # WRITE of the dirty page
    assert read(m.join("f")) == b"abcd456789"


# -- afuse.testing.trio_mount: trio tests touch the mount only from threads ---------------------


@pytest.mark.trio
async def test_hello_trio() -> None:
    async with testing.trio_mount(LowLevelFS()) as session:
        path = trio.Path(session.mountpoint, "hello")
        await path.write_text("Hello, world!\n")
        assert await path.read_text() == "Hello, world!\n"


@pytest.mark.trio
async def test_trio_mount_and_lookup_counts() -> None:
    ops = LowLevelFS()
    async with testing.trio_mount(ops) as session:
        path = trio.Path(session.mountpoint, "f")
        await path.write_bytes(b"from trio")
        assert await path.read_bytes() == b"from trio"
        assert await trio.to_thread.run_sync(os.listdir, session.mountpoint) == ["f"]
        nodeid = ops.names[b"f"]
        assert ops.nodes[nodeid].lookups >= 1  # CREATE counted one
        if session.negotiated is None or session.negotiated.minor < 45:
            pytest.skip("FUSE_NOTIFY_PRUNE needs protocol 7.45")
        # Ask the kernel to drop the inode: its FORGET brings the count back to 0 ...
        await afuse.notify.prune(session, [nodeid])
        with trio.fail_after(10):
            while ops.nodes[nodeid].lookups:
                await trio.sleep(0.01)
        # ... the file stays (it has a name), and the next LOOKUP counts again.
        st = await path.stat()
        assert st.st_ino == nodeid and ops.nodes[nodeid].lookups == 1


# -- running it: trio.run + afuse.mount, and the command line ---------------------------------


async def serve_until_unmounted(mountpoint: str) -> None:
    """The tutorial's ``trio.run`` form."""
    async with afuse.mount(LowLevelFS(), mountpoint) as session:
        await session.wait_closed()


@pytest.mark.trio
async def test_mount_form_serves_until_unmounted(tmp_path: Path) -> None:
    mp = str(tmp_path / "mnt")
    os.mkdir(mp)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_until_unmounted, mp)
            assert await trio.to_thread.run_sync(wait, lambda: mounted(mp))
            await trio.Path(mp, "f").write_bytes(b"data")
            assert await trio.Path(mp, "f").read_bytes() == b"data"
            await trio.run_process(["umount", mp])  # serve_until_unmounted returns
    assert not mounted(mp)


def test_command_line_with_debug(tmp_path: Path) -> None:
    mp = str(tmp_path / "mnt")
    os.mkdir(mp)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, str(EXAMPLE), mp, "--debug", "-o", "fsname=afuse-lowlevel"],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert wait(lambda: mounted(mp) or proc.poll() is not None)
        assert proc.poll() is None
        with open(os.path.join(mp, "f"), "wb") as f:
            f.write(b"cli")
        assert read(os.path.join(mp, "f")) == b"cli"
        assert (os.path.realpath(mp), "fuse", "afuse-lowlevel") in device.find_mounts()
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
    assert " afuse DEBUG -> CREATE unique=" in err and " afuse DEBUG <- CREATE unique=" in err
    assert " afuse DEBUG -> WRITE unique=" in err


def test_errors_reach_the_caller(fuse_mount: MountFactory) -> None:
    m = fuse_mount(LowLevelFS())
    for _ in range(2):
        with pytest.raises(OSError) as e:  # no mkdir: ENOSYS, every time
            os.mkdir(m.join("d"))
        assert e.value.errno == errno.ENOSYS
    with pytest.raises(PermissionError):  # node() refuses the root: EPERM
        os.chmod(m.path, 0o700)
    with open(m.join("f"), "wb") as f:  # no flush: the first close answers ENOSYS, then none come
        f.write(b"x")
    assert read(m.join("f")) == b"x"


@pytest.mark.trio
async def test_readdirplus_example_of_the_operations_reference() -> None:
    """docs/operations.md's readdirplus counts exactly the entries the kernel took."""
    (block,) = [b for b in python_blocks(ROOT / "docs" / "operations.md") if "class PlusFS" in b]
    namespace: dict[str, Any] = {  # the block's names: exec'd code is dynamic
        "LowLevelFS": LowLevelFS, "afuse": afuse, "Iterator": Iterator, "AsyncIterator": AsyncIterator}
    exec(block, namespace)
    ops = namespace["PlusFS"]()
    async with testing.trio_mount(ops, config=afuse.InitConfig(readdirplus_auto=False)) as session:
        names = [f"file-{i:03d}-{'y' * 40}" for i in range(400)]  # several READDIRPLUS replies

        def create_and_list() -> list[str]:
            for name in names:
                with open(os.path.join(session.mountpoint, name), "wb"):
                    pass
            return sorted(os.listdir(session.mountpoint))

        assert await trio.to_thread.run_sync(create_and_list) == names
        assert all(node.lookups >= 2 for node in ops.nodes.values())  # CREATE + READDIRPLUS
        if session.negotiated is None or session.negotiated.minor < 45:
            pytest.skip("FUSE_NOTIFY_PRUNE needs protocol 7.45")
        await afuse.notify.prune(session, list(ops.nodes))  # the kernel forgets them all ...
        with trio.fail_after(10):
            while any(node.lookups for node in ops.nodes.values()):
                await trio.sleep(0.01)
        assert all(node.lookups == 0 for node in ops.nodes.values())  # ... and no count went below 0
