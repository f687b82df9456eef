"""FOPEN_* reply flags and FUSE_DIRECT_IO_ALLOW_MMAP, observed through a real mount.

What the kernel (6.18) does, as asserted below:

* DIRECT_IO: a MAP_SHARED mmap (read-only or writable) fails with ENODEV unless
  DIRECT_IO_ALLOW_MMAP (7.39, Linux 6.6) was negotiated; MAP_PRIVATE always works.
* KEEP_CACHE: a later open keeps the page cache (no READ on re-read); without it every open
  drops the file's cache.
* CACHE_DIR: listings are cached in the directory's page cache, but a later OPENDIR drops that
  cache unless its reply also has KEEP_CACHE; with both, the second listing sends no READDIR.
* NONSEEKABLE: lseek and pread fail with ESPIPE.
* STREAM: no file position at all: lseek/pread fail with ESPIPE and every read(2) arrives with
  offset 0 (with DIRECT_IO each read(2) is one READ at offset 0).
* NOFLUSH: close(2) sends no FLUSH.
* PARALLEL_DIRECT_WRITES (7.37, with DIRECT_IO): WRITEs within the file's size on one inode are
  in flight at the same time; without it the inode lock serializes them.

mmap clients run in a child process: a page fault on this filesystem holds the GIL.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time

import pytest
import trio

import afuse
from afuse import FOpen
from afuse.examples.memfs import MemFS
from afuse.operations import DirEntries
from afuse.pytest_plugin import fuse_unavailable_reason
from afuse.splice import FileRange
from afuse.testing import MountFactory

pytestmark = [
    pytest.mark.skipif(fuse_unavailable_reason() is not None, reason=str(fuse_unavailable_reason())),
    pytest.mark.timeout(60),
]

FLAGS: dict[bytes, int] = {
    b"dio": FOpen.DIRECT_IO,
    b"keep": FOpen.KEEP_CACHE,
    b"plain": 0,
    b"cachedir": FOpen.CACHE_DIR | FOpen.KEEP_CACHE,
    b"cachedir-only": FOpen.CACHE_DIR,
    b"plaindir": 0,
    b"nonseekable": FOpen.NONSEEKABLE,
    b"stream": FOpen.STREAM | FOpen.DIRECT_IO,
    b"stream-cached": FOpen.STREAM,
    b"noflush": FOpen.NOFLUSH,
    b"parallel": FOpen.DIRECT_IO | FOpen.PARALLEL_DIRECT_WRITES,
    b"serial": FOpen.DIRECT_IO,
}


class FlagFS(MemFS):
    """memfs whose open/opendir/create replies carry the FOPEN flags of FLAGS[name]."""

    def __init__(self) -> None:
        super().__init__()
        self.names: dict[int, bytes] = {}
        self.log: list[tuple[str, bytes, int]] = []
        self.writing = 0
        self.max_writing = 0
        self._both_writing: trio.Event | None = None

    def _flags(self, nodeid: int) -> int:
        return FLAGS.get(self.names.get(nodeid, b""), 0)

    async def lookup(self, req: afuse.LookupRequest) -> afuse.Entry:
        e = await super().lookup(req)
        if e.nodeid:
            self.names[e.nodeid] = req.name
        return e

    async def mkdir(self, req: afuse.MkdirRequest) -> afuse.Entry:
        e = await super().mkdir(req)
        self.names[e.nodeid] = req.name
        return e

    async def create(self, req: afuse.CreateRequest) -> tuple[afuse.Entry, afuse.Handle]:
        e, h = await super().create(req)
        self.names[e.nodeid] = req.name
        h.flags = self._flags(e.nodeid)
        return e, h

    async def open(self, req: afuse.OpenRequest) -> afuse.Handle:
        h = await super().open(req)
        h.flags = self._flags(req.nodeid)
        return h

    async def opendir(self, req: afuse.OpendirRequest) -> afuse.Handle:
        h = await super().opendir(req)
        h.flags = self._flags(req.nodeid)
        return h

    def _note(self, op: str, nodeid: int, offset: int = 0) -> None:
        self.log.append((op, self.names.get(nodeid, b""), offset))

    def ops(self, op: str, name: bytes) -> list[int]:
        """Offsets of the logged ``op`` requests on ``name``."""
        return [off for o, n, off in self.log if o == op and n == name]

    async def read(self, req: afuse.ReadRequest) -> bytes | FileRange:
        self._note("read", req.nodeid, req.offset)
        return await super().read(req)

    async def readdir(self, req: afuse.ReaddirRequest) -> DirEntries:
        self._note("readdir", req.nodeid, req.offset)
        return await super().readdir(req)

    async def readdirplus(self, req: afuse.ReaddirplusRequest) -> DirEntries:
        self._note("readdir", req.nodeid, req.offset)
        return await super().readdirplus(req)

    async def flush(self, req: afuse.FlushRequest) -> None:
        self._note("flush", req.nodeid)
        await super().flush(req)

    async def write(self, req: afuse.WriteRequest) -> int:
        self._note("write", req.nodeid, req.offset)
        if self._both_writing is None:
            return await super().write(req)
        # Yield once before opening a cancel scope: older Session._drive broke handlers that
        # opened one before their first yield (fixed in the session rework; harmless now).
        await trio.lowlevel.checkpoint()
        self.writing += 1
        self.max_writing = max(self.max_writing, self.writing)
        try:
            if self.writing >= 2:
                self._both_writing.set()
            with trio.move_on_after(1.0):  # serialized writers never meet: give up waiting
                await self._both_writing.wait()
            return await super().write(req)
        finally:
            self.writing -= 1

    def count_concurrency(self) -> None:
        self.max_writing = 0
        self._both_writing = trio.Event()


_MMAP_CLIENT = r"""
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
def attempt(flags, prot, write):
    try:
        m = mmap.mmap(fd, 4096, flags, prot)
    except OSError as e:
        return "E%d" % e.errno
    try:
        if write:
            m[0:5] = b"HELLO"
            m.flush()
        return m[0:5].decode()
    finally:
        m.close()
print(attempt(mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, True),
      attempt(mmap.MAP_SHARED, mmap.PROT_READ, False),
      attempt(mmap.MAP_PRIVATE, mmap.PROT_READ, False))
"""


def _mmap_in_child(path: str) -> list[str]:
    r = subprocess.run([sys.executable, "-c", _MMAP_CLIENT, path], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("allow", [False, True])
def test_direct_io_mmap(fuse_mount: MountFactory, allow: bool) -> None:
    fs = FlagFS()
    m = fuse_mount(fs, config=afuse.InitConfig(direct_io_allow_mmap=allow))
    assert m.session.has(afuse.InitFlag.DIRECT_IO_ALLOW_MMAP) == allow
    _write(m.join("dio"), b"x" * 4096)
    shared_rw, shared_ro, private = _mmap_in_child(m.join("dio"))
    if allow:
        assert (shared_rw, shared_ro, private) == ("HELLO", "HELLO", "HELLO")
        with open(m.join("dio"), "rb") as f:
            assert f.read(5) == b"HELLO"  # the shared mapping's writes reached the filesystem
    else:
        enodev = f"E{errno.ENODEV}"
        assert (shared_rw, shared_ro, private) == (enodev, enodev, "xxxxx")


def test_keep_cache(fuse_mount: MountFactory) -> None:
    fs = FlagFS()
    m = fuse_mount(fs)
    for name in ("keep", "plain"):
        _write(m.join(name), b"y" * 100)
    fs.log.clear()
    for name in ("keep", "plain"):
        for _ in range(3):
            with open(m.join(name), "rb") as f:
                assert f.read() == b"y" * 100
    assert fs.ops("read", b"keep") == [0]  # read once, then served from the kept cache
    assert fs.ops("read", b"plain") == [0, 0, 0]  # every open dropped the cache


def test_cache_dir(fuse_mount: MountFactory) -> None:
    fs = FlagFS()
    m = fuse_mount(fs)
    for name in ("cachedir", "cachedir-only", "plaindir"):
        os.mkdir(m.join(name))
        _write(m.join(name, "a"), b"")
    fs.log.clear()
    listings = {}
    for name in ("cachedir", "cachedir-only", "plaindir"):
        counts = []
        for _ in range(3):
            before = len(fs.ops("readdir", name.encode()))
            assert os.listdir(m.join(name)) == ["a"]
            counts.append(len(fs.ops("readdir", name.encode())) - before)
        listings[name] = counts
    assert listings["cachedir"][0] > 0 and listings["cachedir"][1:] == [0, 0]
    assert all(n > 0 for n in listings["cachedir-only"])  # OPENDIR without KEEP_CACHE drops it
    assert all(n > 0 for n in listings["plaindir"])


def test_nonseekable(fuse_mount: MountFactory) -> None:
    fs = FlagFS()
    m = fuse_mount(fs)
    _write(m.join("nonseekable"), b"abcdef")
    fd = os.open(m.join("nonseekable"), os.O_RDONLY)
    try:
        with pytest.raises(OSError) as e:
            os.lseek(fd, 1, os.SEEK_SET)
        assert e.value.errno == errno.ESPIPE
        with pytest.raises(OSError) as e:
            os.pread(fd, 3, 1)
        assert e.value.errno == errno.ESPIPE
        assert os.read(fd, 3) == b"abc"
        assert os.read(fd, 3) == b"def"  # sequential reads still advance
    finally:
        os.close(fd)


def test_stream(fuse_mount: MountFactory) -> None:
    fs = FlagFS()
    m = fuse_mount(fs)
    for name in ("stream", "stream-cached"):
        _write(m.join(name), b"abcdefgh")
    fs.log.clear()
    for name in ("stream", "stream-cached"):
        fd = os.open(m.join(name), os.O_RDONLY)
        try:
            # No position: every read(2) starts at offset 0.
            assert os.read(fd, 3) == b"abc"
            assert os.read(fd, 3) == b"abc"
            with pytest.raises(OSError) as e:
                os.lseek(fd, 1, os.SEEK_SET)
            assert e.value.errno == errno.ESPIPE
            with pytest.raises(OSError) as e:
                os.pread(fd, 3, 1)
            assert e.value.errno == errno.ESPIPE
        finally:
            os.close(fd)
    assert fs.ops("read", b"stream") == [0, 0]  # direct I/O: one READ per read(2), both at 0
    assert fs.ops("read", b"stream-cached") == [0]  # through the page cache: filled once


def test_noflush(fuse_mount: MountFactory) -> None:
    fs = FlagFS()
    m = fuse_mount(fs)
    fs.log.clear()
    _write(m.join("noflush"), b"a")
    _write(m.join("plain"), b"a")
    assert fs.ops("flush", b"noflush") == []
    assert fs.ops("flush", b"plain") == [0]


def test_parallel_direct_writes(fuse_mount: MountFactory) -> None:
    fs = FlagFS()
    m = fuse_mount(fs)
    result = {}
    for name in ("parallel", "serial"):
        # Writes that extend the file always take the inode lock exclusively: stay inside it.
        _write(m.join(name), bytes(65536))
        fs.count_concurrency()
        fds = [os.open(m.join(name), os.O_WRONLY) for _ in range(2)]
        try:
            threads = [threading.Thread(target=os.pwrite, args=(fd, b"z" * 4096, off))
                       for fd, off in zip(fds, (0, 8192), strict=True)]
            t0 = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join(20)
            result[name] = (fs.max_writing, time.monotonic() - t0)
        finally:
            for fd in fds:
                os.close(fd)
        with open(m.join(name), "rb") as f:
            data = f.read()
        assert data[:4096] == data[8192:12288] == b"z" * 4096
    assert result["parallel"][0] == 2
    assert result["serial"][0] == 1
