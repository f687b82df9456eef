"""Export control: file handles (name_to_handle_at / open_by_handle_at) on an afuse mount.

Observed on 6.18 and asserted below:

* FUSE file handles are nodeid + generation (+ the parent's for connectable handles); encoding
  one needs no request. Decoding one whose inode the kernel still has needs none either.
* Once the kernel has forgotten the inode (``echo 2 > /proc/sys/vm/drop_caches``), decoding
  sends LOOKUP with ``nodeid`` = the handle's nodeid and name "." — for files too — and, for a
  directory, LOOKUP of ".." to reconnect it. Only with FUSE_EXPORT_SUPPORT: without it the
  kernel answers ESTALE itself. memfs answers both (``MemFS._lookup_dot``).
* With FUSE_NO_EXPORT_SUPPORT, name_to_handle_at fails with EOPNOTSUPP before any request.
"""

from __future__ import annotations

import ctypes
import errno
import os
import time

import pytest

import afuse
from afuse.examples.memfs import MemFS
from afuse.pytest_plugin import fuse_unavailable_reason
from afuse.testing import MountedFS, MountFactory

pytestmark = [
    pytest.mark.skipif(fuse_unavailable_reason() is not None, reason=str(fuse_unavailable_reason())),
    pytest.mark.skipif(os.geteuid() != 0, reason="open_by_handle_at and drop_caches need root"),
    pytest.mark.timeout(60),
]

_libc = ctypes.CDLL(None, use_errno=True)
MAX_HANDLE_SZ = 128
AT_FDCWD = -100
FILEID_INO32_GEN = 1
#: The kernel's FILEID_INVALID; fuse uses type 0x81 (nodeid+generation) and 0x82 (+ parent).
FUSE_FILEID = 0x81


class FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint32), ("handle_type", ctypes.c_int32),
                ("f_handle", ctypes.c_ubyte * MAX_HANDLE_SZ)]


def name_to_handle(path: str) -> FileHandle:
    h = FileHandle(MAX_HANDLE_SZ, 0)
    mount_id = ctypes.c_int()
    if _libc.name_to_handle_at(AT_FDCWD, os.fsencode(path), ctypes.byref(h), ctypes.byref(mount_id), 0) < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), path)
    return h


def open_by_handle(mount_fd: int, h: FileHandle, flags: int = os.O_RDONLY) -> int:
    fd: int = _libc.open_by_handle_at(mount_fd, ctypes.byref(h), flags | os.O_CLOEXEC)
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return fd


def drop_caches() -> None:
    """Make the kernel forget unused dentries and inodes (it sends FORGETs)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2\n")


class Recording(MemFS):
    """memfs that records lookups."""

    def __init__(self) -> None:
        super().__init__()
        self.lookups: list[tuple[int, bytes]] = []

    async def lookup(self, req: afuse.LookupRequest) -> afuse.Entry:
        self.lookups.append((req.nodeid, req.name))
        return await super().lookup(req)

    def forgotten(self, nodeid: int) -> bool:
        """The kernel holds no reference to ``nodeid`` (memfs's own lookup count is 0)."""
        n = self._nodes.get(nodeid)
        return n is None or n.lookups == 0


def _setup(m: MountedFS) -> tuple[int, int]:
    """Create d/f; return their nodeids (inode numbers in memfs)."""
    os.mkdir(m.join("d"))
    with open(m.join("d", "f"), "w") as f:
        f.write("hello")
    return os.stat(m.join("d")).st_ino, os.stat(m.join("d", "f")).st_ino


def _wait_forgotten(fs: Recording, *nodeids: int) -> None:
    deadline = time.monotonic() + 10
    while not all(fs.forgotten(i) for i in nodeids):
        assert time.monotonic() < deadline, f"kernel did not forget {nodeids}"
        drop_caches()
        time.sleep(0.05)


def test_handles_with_export_support(fuse_mount: MountFactory) -> None:
    fs = Recording()
    m = fuse_mount(fs, config=afuse.InitConfig(export_support=True))
    assert m.session.has(afuse.InitFlag.EXPORT_SUPPORT)
    d_id, f_id = _setup(m)
    hf = name_to_handle(m.join("d", "f"))
    hd = name_to_handle(m.join("d"))
    assert hf.handle_type == FUSE_FILEID
    # nodeid (u64, as two u32 halves: high then low) and generation.
    assert int.from_bytes(bytes(hf.f_handle[:4]), "little") << 32 \
        | int.from_bytes(bytes(hf.f_handle[4:8]), "little") == f_id
    mfd = os.open(m.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        # The kernel still knows the inode: no request.
        fs.lookups.clear()
        fd = open_by_handle(mfd, hf)
        try:
            assert os.read(fd, 10) == b"hello"
        finally:
            os.close(fd)
        assert fs.lookups == []
        # Forgotten: decoding asks the filesystem for "." of the handle's nodeid.
        _wait_forgotten(fs, d_id, f_id)
        fs.lookups.clear()
        fd = open_by_handle(mfd, hf)
        try:
            assert os.read(fd, 10) == b"hello"
        finally:
            os.close(fd)
        assert (f_id, b".") in fs.lookups
        # A directory is reconnected to the tree through "..".
        _wait_forgotten(fs, d_id)
        fs.lookups.clear()
        fd = open_by_handle(mfd, hd, os.O_RDONLY | os.O_DIRECTORY)
        try:
            assert os.readlink(f"/proc/self/fd/{fd}") == os.path.realpath(m.join("d"))
            assert sorted(os.listdir(fd)) == ["f"]
        finally:
            os.close(fd)
        assert (d_id, b".") in fs.lookups and (d_id, b"..") in fs.lookups
        # A handle of a deleted file is stale.
        os.unlink(m.join("d", "f"))
        deadline = time.monotonic() + 10
        while f_id in fs._nodes:  # memfs drops it once unlinked and forgotten
            assert time.monotonic() < deadline, "the unlinked file was never forgotten"
            drop_caches()
            time.sleep(0.05)
        with pytest.raises(OSError) as e:
            open_by_handle(mfd, hf)
        assert e.value.errno == errno.ESTALE
    finally:
        os.close(mfd)


def test_handles_without_export_support(fuse_mount: MountFactory) -> None:
    fs = Recording()
    m = fuse_mount(fs)
    assert not m.session.has(afuse.InitFlag.EXPORT_SUPPORT)
    _d_id, f_id = _setup(m)
    hf = name_to_handle(m.join("d", "f"))  # encoding works; decoding a forgotten inode cannot
    mfd = os.open(m.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _wait_forgotten(fs, f_id)
        fs.lookups.clear()
        with pytest.raises(OSError) as e:
            open_by_handle(mfd, hf)
        assert e.value.errno == errno.ESTALE
        assert fs.lookups == []  # the kernel does not ask
    finally:
        os.close(mfd)


def test_no_export_support(fuse_mount: MountFactory) -> None:
    fs = Recording()
    m = fuse_mount(fs, config=afuse.InitConfig(no_export_support=True))
    assert m.session.has(afuse.InitFlag.NO_EXPORT_SUPPORT)
    _setup(m)
    fs.lookups.clear()
    with pytest.raises(OSError) as e:
        name_to_handle(m.join("d", "f"))
    assert e.value.errno == errno.EOPNOTSUPP
    assert fs.lookups == []
