"""passthroughfs against the real kernel: every operation through real system calls, compared
with the source directory; stable inode numbers; several users; handler-level escape checks."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
import trio

from afuse.errors import FUSEError
from afuse.examples.passthroughfs import PassthroughFS
from afuse.pytest_plugin import fuse_unavailable_reason
from afuse.testing import MountedFS, mounted
from afuse.wire import notify
from afuse.wire import requests as r
from afuse.wire.init import InitConfig
from afuse.wire.types import Handle, Lock

R = TypeVar("R", bound=r.Request)
#: The ``locker`` fixture: ``locker(path, "posix" | "flock")`` starts a child holding a lock there.
Locker = Callable[[str, str], subprocess.Popen[str]]

pytestmark = pytest.mark.skipif(fuse_unavailable_reason() is not None or os.geteuid() != 0,
                                reason="needs root and /dev/fuse")

libc = ctypes.CDLL(None, use_errno=True)
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2
STATX_BTIME = 0x800
NOBODY = 65534
FLOCK = struct.Struct("hhxxxxqqixxxx")


class PT:
    """A mounted passthrough of a fresh source directory."""

    def __init__(self, base: str, src: str, m: MountedFS, ops: PassthroughFS) -> None:
        self.base, self.src, self.m, self.ops = base, src, m, ops
        self.mnt = m.path

    def s(self, *p: str) -> str:
        return os.path.join(self.src, *p)

    def p(self, *p: str) -> str:
        return os.path.join(self.mnt, *p)


@pytest.fixture
def base() -> Iterator[str]:
    # pytest's tmp_path is 0700 under /tmp/pytest-of-root: other users could not reach it.
    d = tempfile.mkdtemp(prefix="afuse-pt-", dir="/tmp")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def source(base: str) -> str:
    src = os.path.join(base, "src")
    os.mkdir(src)
    os.chmod(src, 0o755)
    return src


@contextlib.contextmanager
def _mount(base: str, src: str, ops: PassthroughFS | None = None, **kw: Any) -> Iterator[PT]:
    ops = ops or PassthroughFS(src)
    try:
        with mounted(ops, **kw) as m:
            yield PT(base, src, m, ops)
    finally:
        ops.close()


@pytest.fixture
def pt(base: str, source: str) -> Iterator[PT]:
    with _mount(base, source) as m:
        yield m


def same_stat(a: os.stat_result, b: os.stat_result) -> None:
    for f in ("st_ino", "st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_mtime_ns", "st_rdev"):
        assert getattr(a, f) == getattr(b, f), f


def write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def oserr(fn: Callable[..., object], *args: Any, **kw: Any) -> int:
    """The errno ``fn`` fails with (0 if it succeeds)."""
    try:
        fn(*args, **kw)
    except OSError as e:
        return e.errno or -1
    return 0


# -- files ------------------------------------------------------------------------------------------


def test_create_read_write_truncate(pt: PT) -> None:
    write(pt.p("f"), b"hello world")
    assert read(pt.s("f")) == b"hello world"
    assert read(pt.p("f")) == b"hello world"
    with open(pt.p("f"), "r+b") as f:
        f.seek(6)
        f.write(b"there")
    assert read(pt.s("f")) == b"hello there"
    with open(pt.p("f"), "ab") as f:
        f.write(b"!")
    assert read(pt.s("f")) == b"hello there!"
    os.truncate(pt.p("f"), 5)
    assert read(pt.s("f")) == b"hello"
    fd = os.open(pt.p("f"), os.O_RDWR)
    try:
        os.ftruncate(fd, 2)
        assert os.fstat(fd).st_size == 2
    finally:
        os.close(fd)
    assert read(pt.s("f")) == b"he"
    with open(pt.p("f"), "wb"):  # O_TRUNC
        pass
    assert os.stat(pt.s("f")).st_size == 0
    # O_EXCL on an existing file
    assert oserr(os.open, pt.p("f"), os.O_CREAT | os.O_EXCL | os.O_WRONLY) == errno.EEXIST
    # creation mode is exact (the daemon's umask plays no part)
    old = os.umask(0)
    try:
        os.close(os.open(pt.p("g"), os.O_CREAT | os.O_WRONLY, 0o671))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(pt.s("g")).st_mode) == 0o671
    os.close(os.open(pt.p("h"), os.O_CREAT | os.O_WRONLY, 0o666))
    assert stat.S_IMODE(os.stat(pt.s("h")).st_mode) == 0o666 & ~old
    same_stat(os.stat(pt.p("g")), os.stat(pt.s("g")))
    os.unlink(pt.p("g"))
    assert not os.path.exists(pt.s("g"))
    assert oserr(os.unlink, pt.p("g")) == errno.ENOENT


def test_big_writes(pt: PT) -> None:
    data = os.urandom(1 << 20) * 3
    fd = os.open(pt.p("big"), os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        assert os.write(fd, data[: 1 << 20]) == 1 << 20
        assert os.pwrite(fd, data[1 << 20 :], 1 << 20) == 2 << 20
        os.fsync(fd)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    assert read(pt.s("big")) == data
    assert read(pt.p("big")) == data
    with open(pt.p("big"), "rb", buffering=0) as f:
        f.seek(12345)
        assert f.read(1 << 20) == data[12345 : 12345 + (1 << 20)]
    same_stat(os.stat(pt.p("big")), os.stat(pt.s("big")))


def test_mkdir_rmdir(pt: PT) -> None:
    os.mkdir(pt.p("d"), 0o750)
    assert stat.S_ISDIR(os.stat(pt.s("d")).st_mode)
    same_stat(os.stat(pt.p("d")), os.stat(pt.s("d")))
    os.makedirs(pt.p("d", "e", "f"))
    assert os.path.isdir(pt.s("d", "e", "f"))
    assert oserr(os.rmdir, pt.p("d")) == errno.ENOTEMPTY
    assert oserr(os.mkdir, pt.p("d")) == errno.EEXIST
    assert oserr(os.rmdir, pt.p("nope")) == errno.ENOENT
    write(pt.p("d", "file"), b"")
    assert oserr(os.rmdir, pt.p("d", "file")) == errno.ENOTDIR
    shutil.rmtree(pt.p("d"))
    assert os.listdir(pt.src) == []
    assert os.listdir(pt.mnt) == []


@pytest.mark.parametrize("plus", [True, False], ids=["readdirplus", "readdir"])
def test_big_directory(base: str, source: str, plus: bool) -> None:
    os.mkdir(os.path.join(source, "big"))
    names = {f"entry-{i:05d}-{'x' * (i % 50)}" for i in range(10_000)}
    for n in names:
        os.close(os.open(os.path.join(source, "big", n), os.O_CREAT | os.O_WRONLY, 0o644))
    with _mount(base, source, config=InitConfig(readdirplus=plus, readdirplus_auto=False)) as pt:
        assert set(os.listdir(pt.p("big"))) == names
        seen = {}
        with os.scandir(pt.p("big")) as it:
            for e in it:
                seen[e.name] = (e.inode(), e.stat(follow_symlinks=False).st_ino, e.is_file())
        assert set(seen) == names
        for n, (dino, ino, isfile) in list(seen.items())[:500]:
            assert dino == ino == os.stat(os.path.join(source, "big", n)).st_ino and isfile
        # changes through the mount show in the next listing
        for i in range(0, 10_000, 20):
            os.unlink(pt.p("big", f"entry-{i:05d}-{'x' * (i % 50)}"))
        for i in range(300):
            os.close(os.open(pt.p("big", f"new-{i}"), os.O_CREAT | os.O_WRONLY, 0o600))
        listed = os.listdir(pt.p("big"))
        assert len(listed) == len(set(listed))
        assert set(listed) == set(os.listdir(pt.s("big")))
        assert len(listed) == 10_000 - 500 + 300
        # "." and ".." come through
        fd = os.open(pt.p("big"), os.O_RDONLY | os.O_DIRECTORY)
        os.close(fd)


def test_symlinks_are_never_followed_by_the_daemon(base: str, source: str) -> None:
    class Recording(PassthroughFS):
        def __init__(self, src: str) -> None:
            super().__init__(src)
            self.opened: list[int] = []

        async def open(self, req: r.OpenRequest) -> Handle:
            self.opened.append(req.nodeid)
            return await super().open(req)

    os.makedirs(os.path.join(source, "a", "b"))
    ops = Recording(source)
    with _mount(base, source, ops) as pt:
        os.symlink("../../etc", pt.p("a", "b", "up"))
        assert os.readlink(pt.p("a", "b", "up")) == "../../etc"
        assert os.readlink(pt.s("a", "b", "up")) == "../../etc"
        assert stat.S_ISLNK(os.lstat(pt.p("a", "b", "up")).st_mode)
        same_stat(os.lstat(pt.p("a", "b", "up")), os.lstat(pt.s("a", "b", "up")))
        # An absolute escape, resolved through the mount: the client's namespace resolves it.
        os.symlink("/etc/hostname", pt.s("esc"))
        link_ino = os.lstat(pt.p("esc")).st_ino
        node = ops._by_key[(os.lstat(pt.s("esc")).st_dev, link_ino)]
        mnt_dev = os.stat(pt.mnt).st_dev
        if os.path.exists("/etc/hostname"):
            with open(pt.p("esc"), "rb") as f:
                assert os.fstat(f.fileno()).st_dev != mnt_dev  # not a file of the mount
        assert node.nodeid not in ops.opened
        # O_NOFOLLOW through the mount refuses the link
        assert oserr(os.open, pt.p("esc"), os.O_RDONLY | os.O_NOFOLLOW) == errno.ELOOP
        # symlink to a file in the tree; lchown/utime of the link itself
        write(pt.p("target"), b"t")
        os.symlink("target", pt.p("rel"))
        assert read(pt.p("rel")) == b"t"
        os.chown(pt.p("rel"), 1234, 4321, follow_symlinks=False)
        os.utime(pt.p("rel"), ns=(10**9, 2 * 10**9), follow_symlinks=False)
        sl = os.lstat(pt.s("rel"))
        assert (sl.st_uid, sl.st_gid, sl.st_mtime_ns) == (1234, 4321, 2 * 10**9)
        assert os.stat(pt.s("target")).st_uid == 0
        same_stat(os.lstat(pt.p("rel")), sl)


def test_handlers_refuse_escapes(source: str, base: str) -> None:
    """Handler-level: names with "/", "." and ".."; creating through a dangling symlink;
    opening a symlink node."""
    outside = os.path.join(base, "outside")
    os.symlink(outside, os.path.join(source, "dangling"))
    os.symlink("/etc", os.path.join(source, "etc"))
    ops = PassthroughFS(source)

    def req(cls: type[R], nodeid: int = 1, **kw: Any) -> R:
        return cls(1, nodeid, 0, 0, os.getpid(), **kw)

    async def main() -> None:
        for name in (b"a/b", b"..", b".", b"../src", b"/etc"):
            with pytest.raises(FUSEError) as ei:
                await ops.lookup(req(r.LookupRequest, name=name))
            assert ei.value.errno == errno.EINVAL
        with pytest.raises(OSError) as oi:
            await ops.create(req(r.CreateRequest, name=b"dangling", flags=os.O_WRONLY | os.O_CREAT,
                                 mode=stat.S_IFREG | 0o644))
        assert oi.value.errno == errno.ELOOP
        assert not os.path.lexists(outside)
        with pytest.raises(FUSEError):
            await ops.mkdir(req(r.MkdirRequest, name=b"x/y", mode=0o755))
        e = await ops.lookup(req(r.LookupRequest, name=b"etc"))
        assert stat.S_ISLNK(e.attr.mode)
        with pytest.raises(OSError) as oi:
            await ops.open(req(r.OpenRequest, e.nodeid, flags=os.O_RDONLY, open_flags=0))
        assert oi.value.errno == errno.ELOOP
        with pytest.raises(OSError) as oi:
            await ops.opendir(req(r.OpendirRequest, e.nodeid, flags=os.O_RDONLY, open_flags=0))
        assert oi.value.errno in (errno.ELOOP, errno.ENOTDIR)
        assert await ops.listxattr(req(r.ListxattrRequest, e.nodeid, size=0)) == []
        with pytest.raises(OSError) as oi:
            await ops.getxattr(req(r.GetxattrRequest, e.nodeid, name=b"user.x", size=0))
        assert oi.value.errno == errno.ENODATA
        assert await ops.readlink(req(r.ReadlinkRequest, e.nodeid)) == b"/etc"
        with pytest.raises(FUSEError) as ei:  # a symlink node is not a directory to look in
            await ops.lookup(req(r.LookupRequest, e.nodeid, name=b"passwd"))
        assert ei.value.errno == errno.ENOTDIR
        with pytest.raises(FUSEError) as ei:
            await ops.mknod(req(r.MknodRequest, e.nodeid, name=b"x", mode=stat.S_IFREG | 0o644))
        assert ei.value.errno == errno.ENOTDIR
        with pytest.raises(FUSEError) as ei:
            await ops.getattr(req(r.GetattrRequest, 12345, fh=None))
        assert ei.value.errno == errno.ESTALE

    try:
        trio.run(main)
    finally:
        ops.close()
    # negative entries only when asked for
    ops = PassthroughFS(source, negative_timeout=5)
    try:
        e = trio.run(ops.lookup, req(r.LookupRequest, name=b"missing"))
        assert e.nodeid == 0 and e.entry_timeout == 5
    finally:
        ops.close()


def test_hard_links(pt: PT) -> None:
    write(pt.p("a"), b"shared")
    os.link(pt.p("a"), pt.p("b"))
    sa, sb = os.stat(pt.p("a")), os.stat(pt.p("b"))
    assert sa.st_ino == sb.st_ino == os.stat(pt.s("b")).st_ino
    assert sb.st_nlink == 2
    with open(pt.p("b"), "ab") as f:
        f.write(b"!")
    assert read(pt.p("a")) == b"shared!"
    assert read(pt.s("a")) == b"shared!"
    # one nodeid for the one source inode
    key = (sa.st_dev, sa.st_ino)
    assert sum(1 for k in pt.ops._by_key if k[1] == sa.st_ino) == 1
    del key
    # a hard link to a symlink stays a symlink
    os.symlink("a", pt.p("sl"))
    os.link(pt.p("sl"), pt.p("sl2"), follow_symlinks=False)
    assert stat.S_ISLNK(os.lstat(pt.s("sl2")).st_mode)
    assert os.readlink(pt.p("sl2")) == "a"
    os.unlink(pt.p("a"))
    assert os.stat(pt.p("b")).st_nlink == 1
    assert read(pt.p("b")) == b"shared!"
    same_stat(os.stat(pt.p("b")), os.stat(pt.s("b")))
    assert oserr(os.link, pt.p("b"), pt.p("b")) == errno.EEXIST


def test_rename(pt: PT) -> None:
    write(pt.p("a"), b"A")
    write(pt.p("b"), b"B")
    os.mkdir(pt.p("d"))
    os.rename(pt.p("a"), pt.p("d", "a2"))
    assert read(pt.s("d", "a2")) == b"A" and not os.path.exists(pt.s("a"))
    os.rename(pt.p("d", "a2"), pt.p("b"))  # replaces
    assert read(pt.s("b")) == b"A"
    write(pt.p("c"), b"C")

    def renameat2(old: str, new: str, flags: int) -> int:
        if libc.renameat2(-100, old.encode(), -100, new.encode(), flags) == 0:
            return 0
        return ctypes.get_errno()

    assert renameat2(pt.p("b"), pt.p("c"), RENAME_NOREPLACE) == errno.EEXIST
    assert renameat2(pt.p("b"), pt.p("c"), RENAME_EXCHANGE) == 0
    assert read(pt.s("b")) == b"C" and read(pt.s("c")) == b"A"
    assert read(pt.p("b")) == b"C" and read(pt.p("c")) == b"A"
    assert renameat2(pt.p("b"), pt.p("new"), RENAME_NOREPLACE) == 0
    assert read(pt.s("new")) == b"C" and not os.path.exists(pt.s("b"))
    assert renameat2(pt.p("c"), pt.p("gone"), RENAME_EXCHANGE) == errno.ENOENT
    ino = os.stat(pt.p("new")).st_ino
    os.rename(pt.p("new"), pt.p("d", "moved"))
    assert os.stat(pt.p("d", "moved")).st_ino == ino == os.stat(pt.s("d", "moved")).st_ino


def test_xattrs(pt: PT) -> None:
    write(pt.p("f"), b"")
    os.setxattr(pt.p("f"), "user.one", b"1")
    os.setxattr(pt.p("f"), "user.two", b"\x00\xff" * 1000)
    assert os.getxattr(pt.s("f"), "user.one") == b"1"
    assert os.getxattr(pt.p("f"), "user.two") == b"\x00\xff" * 1000
    assert sorted(os.listxattr(pt.p("f"))) == sorted(os.listxattr(pt.s("f")))
    assert {"user.one", "user.two"} <= set(os.listxattr(pt.p("f")))
    assert oserr(os.setxattr, pt.p("f"), "user.one", b"x", os.XATTR_CREATE) == errno.EEXIST
    assert oserr(os.setxattr, pt.p("f"), "user.three", b"x", os.XATTR_REPLACE) == errno.ENODATA
    assert oserr(os.getxattr, pt.p("f"), "user.nope") == errno.ENODATA
    os.removexattr(pt.p("f"), "user.one")
    assert oserr(os.getxattr, pt.s("f"), "user.one") == errno.ENODATA
    assert oserr(os.removexattr, pt.p("f"), "user.one") == errno.ENODATA
    os.mkdir(pt.p("d"))
    os.setxattr(pt.p("d"), "user.d", b"dir")
    assert os.getxattr(pt.s("d"), "user.d") == b"dir"
    os.symlink("f", pt.p("l"))
    # user xattrs on a symlink: refused like on the source (and never the target's)
    assert oserr(os.setxattr, pt.p("l"), "user.x", b"1", follow_symlinks=False) == \
        oserr(os.setxattr, pt.s("l"), "user.x", b"1", follow_symlinks=False) == errno.EPERM
    assert oserr(os.getxattr, pt.p("l"), "user.two", follow_symlinks=False) == errno.ENODATA
    assert os.getxattr(pt.p("l"), "user.two") == b"\x00\xff" * 1000  # followed by the client
    os.setxattr(pt.p("f"), "trusted.t", b"root only")
    assert os.getxattr(pt.s("f"), "trusted.t") == b"root only"


def test_chmod_chown_utime(pt: PT) -> None:
    write(pt.p("f"), b"x")
    os.chmod(pt.p("f"), 0o4751)
    assert stat.S_IMODE(os.stat(pt.s("f")).st_mode) == 0o4751
    os.chown(pt.p("f"), 1234, 5678)
    st = os.stat(pt.s("f"))
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    os.chown(pt.p("f"), -1, 42)
    assert (os.stat(pt.s("f")).st_uid, os.stat(pt.s("f")).st_gid) == (1234, 42)
    os.utime(pt.p("f"), ns=(1_000_000_123, 2_000_000_456))
    st = os.stat(pt.s("f"))
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_123, 2_000_000_456)
    same_stat(os.stat(pt.p("f")), st)
    t0 = time.time()
    os.utime(pt.p("f"))
    assert abs(os.stat(pt.s("f")).st_mtime - t0) < 5
    # only mtime (atime omitted)
    before = os.stat(pt.s("f")).st_atime_ns
    fd = os.open(pt.p("f"), os.O_RDONLY)
    try:
        libc_ts = (ctypes.c_long * 4)(0, (1 << 30) - 2, 77, 0)  # UTIME_OMIT, 77 s
        assert libc.futimens(fd, libc_ts) == 0
    finally:
        os.close(fd)
    st = os.stat(pt.s("f"))
    assert st.st_atime_ns == before and st.st_mtime_ns == 77 * 10**9
    # fchmod through an open file
    with open(pt.p("f"), "rb") as f:
        os.fchmod(f.fileno(), 0o600)
    assert stat.S_IMODE(os.stat(pt.s("f")).st_mode) == 0o600


def test_special_files(pt: PT) -> None:
    os.mkfifo(pt.p("fifo"), 0o640)
    assert stat.S_ISFIFO(os.stat(pt.s("fifo")).st_mode)
    same_stat(os.stat(pt.p("fifo")), os.stat(pt.s("fifo")))
    got: list[bytes] = []

    def reader() -> None:
        with open(pt.p("fifo"), "rb") as f:
            got.append(f.read())

    t = threading.Thread(target=reader)
    t.start()
    with open(pt.p("fifo"), "wb") as f:
        f.write(b"through the pipe")
    t.join(10)
    assert got == [b"through the pipe"]
    os.mknod(pt.p("null"), stat.S_IFCHR | 0o666, os.makedev(1, 3))
    assert os.stat(pt.s("null")).st_rdev == os.makedev(1, 3)
    assert os.stat(pt.p("null")).st_rdev == os.makedev(1, 3)
    os.mknod(pt.p("blk"), stat.S_IFBLK | 0o600, os.makedev(259, 70000))
    assert os.stat(pt.p("blk")).st_rdev == os.stat(pt.s("blk")).st_rdev == os.makedev(259, 70000)
    os.mknod(pt.p("reg"), stat.S_IFREG | 0o600)
    assert stat.S_ISREG(os.stat(pt.s("reg")).st_mode)
    import socket

    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(pt.p("sock"))
        assert stat.S_ISSOCK(os.stat(pt.s("sock")).st_mode)
    finally:
        s.close()


def test_fallocate_and_seek_data_hole(pt: PT) -> None:
    fd = os.open(pt.p("sparse"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.pwrite(fd, b"a" * 4096, 0)
        os.pwrite(fd, b"b" * 4096, 1 << 20)
        os.fsync(fd)
        sfd = os.open(pt.s("sparse"), os.O_RDONLY)
        try:
            for whence, off in ((os.SEEK_HOLE, 0), (os.SEEK_DATA, 4096), (os.SEEK_DATA, 0),
                                (os.SEEK_HOLE, 1 << 20)):
                assert os.lseek(fd, off, whence) == os.lseek(sfd, off, whence), (whence, off)
            assert os.lseek(fd, 0, os.SEEK_HOLE) == 4096
            assert os.lseek(fd, 4096, os.SEEK_DATA) == 1 << 20
            assert oserr(os.lseek, fd, (1 << 20) + 8192, os.SEEK_DATA) == errno.ENXIO
            # allocate, then punch a hole
            os.posix_fallocate(fd, 0, 4 << 20)
            assert os.fstat(fd).st_size == 4 << 20
            assert os.fstat(sfd).st_size == 4 << 20
            assert libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                  ctypes.c_long(0), ctypes.c_long(4096)) == 0
            assert os.pread(sfd, 4096, 0) == bytes(4096)
            assert os.pread(fd, 4096, 0) == bytes(4096)
            assert os.lseek(sfd, 0, os.SEEK_HOLE) == 0
            assert os.lseek(fd, 0, os.SEEK_DATA) == os.lseek(sfd, 0, os.SEEK_DATA)
            assert libc.fallocate(fd, FALLOC_FL_KEEP_SIZE, ctypes.c_long(0),
                                  ctypes.c_long(8 << 20)) == 0
            assert os.fstat(sfd).st_size == 4 << 20
            assert os.fstat(sfd).st_blocks * 512 >= 8 << 20
        finally:
            os.close(sfd)
    finally:
        os.close(fd)
    same_stat(os.stat(pt.p("sparse")), os.stat(pt.s("sparse")))


def test_tmpfile(pt: PT) -> None:
    os.mkdir(pt.p("d"))
    fd = os.open(pt.p("d"), os.O_TMPFILE | os.O_RDWR, 0o640)
    try:
        os.write(fd, b"anonymous")
        assert os.listdir(pt.s("d")) == []
        assert os.fstat(fd).st_nlink == 0
        # (os.link would call link(2), which links the /proc symlink itself)
        AT_FDCWD, AT_SYMLINK_FOLLOW = -100, 0x400
        assert libc.linkat(AT_FDCWD, f"/proc/self/fd/{fd}".encode(), AT_FDCWD,
                           pt.p("d", "named").encode(), AT_SYMLINK_FOLLOW) == 0, ctypes.get_errno()
    finally:
        os.close(fd)
    assert read(pt.s("d", "named")) == b"anonymous"
    assert stat.S_IMODE(os.stat(pt.s("d", "named")).st_mode) == 0o640
    same_stat(os.stat(pt.p("d", "named")), os.stat(pt.s("d", "named")))


def test_copy_file_range(pt: PT) -> None:
    data = os.urandom(300_000)
    write(pt.p("in"), data)
    write(pt.p("out"), b"")
    fi = os.open(pt.p("in"), os.O_RDONLY)
    fo = os.open(pt.p("out"), os.O_WRONLY)
    try:
        n = 0
        while n < len(data):
            k = os.copy_file_range(fi, fo, len(data) - n)
            assert k > 0
            n += k
        assert os.copy_file_range(fi, fo, 1000, 100, 500_000) == 1000
    finally:
        os.close(fi)
        os.close(fo)
    out = read(pt.s("out"))
    assert out[: len(data)] == data
    assert out[500_000:] == data[100:1100]


def test_statx_btime_and_statvfs(pt: PT) -> None:
    write(pt.p("f"), b"x")

    def btime(path: str) -> tuple[int, int, int]:
        buf = ctypes.create_string_buffer(256)
        assert libc.statx(-100, path.encode(), 0x100, STATX_BTIME | 0x7FF, buf) == 0, ctypes.get_errno()
        mask = struct.unpack_from("I", buf.raw, 0)[0]
        sec, nsec = struct.unpack_from("qI", buf.raw, 80)
        return mask & STATX_BTIME, sec, nsec

    m, s = btime(pt.p("f")), btime(pt.s("f"))
    assert m == s and m[0] == STATX_BTIME and m[1] > 0
    a, b = os.statvfs(pt.mnt), os.statvfs(pt.src)
    for f in ("f_bsize", "f_frsize", "f_blocks", "f_files", "f_namemax"):
        assert getattr(a, f) == getattr(b, f), f
    assert abs(a.f_bfree - b.f_bfree) < b.f_blocks // 100 + 1000


def test_stat_equivalence_and_stable_inodes(pt: PT) -> None:
    os.makedirs(pt.s("d", "e"))
    write(pt.s("d", "f"), b"12345")
    os.link(pt.s("d", "f"), pt.s("hl"))
    os.symlink("d/f", pt.s("sl"))
    os.mkfifo(pt.s("fifo"))
    os.chown(pt.s("d", "f"), 1000, 2000)
    rels = ["d", "d/e", "d/f", "hl", "sl", "fifo", "."]
    for rel in rels:
        same_stat(os.lstat(pt.p(rel)), os.lstat(pt.s(rel)))
    inos = {rel: os.lstat(pt.p(rel)).st_ino for rel in rels}
    with os.scandir(pt.mnt) as it:
        for e in it:
            assert e.inode() == os.lstat(pt.s(e.name)).st_ino
    # Make the kernel forget everything (drop its dentries, deepest first); inode numbers
    # stay the source's, while the nodeids behind them are new.
    def nodeid(rel: str) -> int:
        st = os.lstat(pt.s(rel))
        return pt.ops._by_key[(st.st_dev, st.st_ino)].nodeid

    old_nodeids = {rel: nodeid(rel) for rel in rels}
    assert pt.ops.inode_count == 6  # root, d, d/e, d/f = hl, sl, fifo
    for parent, name in (("d", "e"), ("d", "f"), (".", "d"), (".", "hl"), (".", "sl"), (".", "fifo")):
        pt.m.session.write_notification(notify.inval_entry(nodeid(parent), name.encode()))
    deadline = time.monotonic() + 10
    while pt.ops.inode_count > 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pt.ops.inode_count == 1  # FORGETs arrived and were honoured: only the root is left
    for rel in rels:
        assert os.lstat(pt.p(rel)).st_ino == inos[rel]
        same_stat(os.lstat(pt.p(rel)), os.lstat(pt.s(rel)))
    assert all(nodeid(rel) != old_nodeids[rel] for rel in rels if rel != ".")
    # the same source inode through two names is one nodeid
    os.stat(pt.p("d", "f"))
    os.stat(pt.p("hl"))
    st = os.stat(pt.s("hl"))
    assert sum(1 for k in pt.ops._by_key if k == (st.st_dev, st.st_ino)) == 1


def test_lookups_forgotten_leave_nothing(source: str) -> None:
    """A million lookups, all forgotten: the inode table and descriptors return to the root."""
    import gc
    import tracemalloc

    for i in range(1000):
        os.close(os.open(os.path.join(source, f"f{i}"), os.O_CREAT | os.O_WRONLY, 0o644))
    ops = PassthroughFS(source)
    names = [f"f{i}".encode() for i in range(1000)]
    fds_at_start = len(os.listdir("/proc/self/fd"))

    async def rounds(n: int) -> None:
        fds_before = len(os.listdir("/proc/self/fd"))  # trio's own descriptors included
        counts: dict[int, int] = {}
        for _ in range(n):
            for name in names:
                e = await ops.lookup(r.LookupRequest(1, 1, 0, 0, 0, name))
                counts[e.nodeid] = counts.get(e.nodeid, 0) + 1
        assert ops.inode_count == 1001
        assert len(os.listdir("/proc/self/fd")) == fds_before + 1000
        items = [r.ForgetItem(n, c) for n, c in counts.items()]
        await ops.forget(r.ForgetRequest(2, 0, 0, 0, 0, items[:500]))
        for it in items[500:]:
            await ops.forget(r.ForgetRequest(3, it.nodeid, 0, 0, 0, [it]))
        assert ops.inode_count == 1
        assert len(os.listdir("/proc/self/fd")) == fds_before

    try:
        trio.run(rounds, 100)  # warm up: 100,000 lookups
        gc.collect()
        tracemalloc.start()
        base_mem = tracemalloc.get_traced_memory()[0]
        for _ in range(9):  # 900,000 more
            trio.run(rounds, 100)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - base_mem
        tracemalloc.stop()
        assert grown < 200_000, grown
        assert len(os.listdir("/proc/self/fd")) == fds_at_start
    finally:
        ops.close()


# -- locks ------------------------------------------------------------------------------------------

LOCKER = textwrap.dedent("""
    import fcntl, os, sys
    path, kind = sys.argv[1], sys.argv[2]
    fd = os.open(path, os.O_RDWR)
    if kind == "posix":
        fcntl.lockf(fd, fcntl.LOCK_EX, 10, 0)
    else:
        fcntl.flock(fd, fcntl.LOCK_EX)
    print("locked", os.getpid(), flush=True)
    sys.stdin.readline()
    if kind == "posix":
        other = os.open(path, os.O_RDONLY)
        os.close(other)  # POSIX: any close drops the process's locks on the file
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
    print("released", flush=True)
    sys.stdin.readline()
""")


@pytest.fixture
def locker(base: str) -> Iterator[Locker]:
    script = os.path.join(base, "locker.py")
    with open(script, "w") as f:
        f.write(LOCKER)
    procs: list[subprocess.Popen[str]] = []

    def start(path: str, kind: str) -> subprocess.Popen[str]:
        p = subprocess.Popen([sys.executable, script, path, kind], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout is not None
        line = p.stdout.readline().split()
        assert line[0] == "locked", line
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait()


def getlk(fd: int, typ: int, start: int, length: int) -> tuple[int, int, int, int]:
    res = fcntl.fcntl(fd, fcntl.F_GETLK, FLOCK.pack(typ, os.SEEK_SET, start, length, 0))
    t, _, s, n, pid = FLOCK.unpack(res)
    return t, s, n, pid


def test_posix_locks_between_processes(pt: PT, locker: Locker) -> None:
    write(pt.p("f"), b"x" * 100)
    child = locker(pt.p("f"), "posix")
    fd = os.open(pt.p("f"), os.O_RDWR)
    try:
        assert oserr(fcntl.lockf, fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 5, 0) in (errno.EAGAIN, errno.EACCES)
        assert getlk(fd, fcntl.F_WRLCK, 0, 5) == (fcntl.F_WRLCK, 0, 10, child.pid)
        assert getlk(fd, fcntl.F_RDLCK, 20, 5)[0] == fcntl.F_UNLCK
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 20)  # no overlap
        # the locks are on the source file: a lock taken there conflicts too
        sfd = os.open(pt.s("f"), os.O_RDWR)
        try:
            assert oserr(fcntl.lockf, sfd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, 3) in (errno.EAGAIN, errno.EACCES)
            assert oserr(fcntl.lockf, sfd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, 25) in (errno.EAGAIN, errno.EACCES)
        finally:
            os.close(sfd)
        # SETLKW waits until the holder lets go
        done = threading.Event()

        def wait_lock() -> None:
            fcntl.lockf(fd, fcntl.LOCK_EX, 10, 0)
            done.set()

        t = threading.Thread(target=wait_lock)
        t.start()
        assert not done.wait(0.5)
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "released"
        assert done.wait(10)
        t.join()
        fcntl.lockf(fd, fcntl.LOCK_UN, 0, 0)
    finally:
        os.close(fd)


def test_setlkw_is_interruptible(pt: PT, locker: Locker, base: str) -> None:
    write(pt.p("f"), b"x" * 100)
    child = locker(pt.p("f"), "posix")
    script = os.path.join(base, "waiter.py")
    with open(script, "w") as f:
        f.write(textwrap.dedent("""
            import fcntl, os, signal, sys
            class Alarm(Exception): pass
            def on_alarm(*a): raise Alarm()
            signal.signal(signal.SIGALRM, on_alarm)
            fd = os.open(sys.argv[1], os.O_RDWR)
            signal.alarm(1)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX, 10, 0)
                print("locked")
            except Alarm:
                print("interrupted")
        """))
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, script, pt.p("f")], capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "interrupted", out
    assert time.monotonic() - t0 < 10
    # the abandoned wait left no lock behind: once the holder is gone we can lock at once
    child.kill()
    child.wait()
    fd = os.open(pt.p("f"), os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 0, 0)
    finally:
        os.close(fd)


def test_flock_between_processes(pt: PT, locker: Locker) -> None:
    write(pt.p("f"), b"")
    child = locker(pt.p("f"), "flock")
    fd = os.open(pt.p("f"), os.O_RDONLY)
    sfd = os.open(pt.s("f"), os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        with pytest.raises(BlockingIOError):  # held on the source file itself
            fcntl.flock(sfd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        done = threading.Event()

        def wait_lock() -> None:
            fcntl.flock(fd, fcntl.LOCK_EX)
            done.set()

        t = threading.Thread(target=wait_lock)
        t.start()
        assert not done.wait(0.3)
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "released"
        assert done.wait(10)
        t.join()
        with pytest.raises(BlockingIOError):
            fcntl.flock(sfd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        fcntl.flock(sfd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    finally:
        os.close(fd)
        os.close(sfd)


# -- several users ------------------------------------------------------------------------------------

USER_SCRIPT = textwrap.dedent("""
    import errno, json, os, stat, sys
    R, T = sys.argv[1], sys.argv[2]
    res = {}
    def t(name, fn):
        try:
            v = fn()
            res[name] = ["ok", v]
        except OSError as e:
            res[name] = ["err", errno.errorcode.get(e.errno, e.errno)]
    def owner(p):
        st = os.lstat(p)
        return [st.st_uid, st.st_gid, oct(stat.S_IMODE(st.st_mode))]
    def create(p, mode=0o640):
        os.close(os.open(p, os.O_CREAT | os.O_WRONLY | os.O_EXCL, mode))
        return owner(p)
    def read(p):
        with open(p, "rb") as f:
            return f.read().decode()
    def ls(p):  # without what these runs create
        return sorted(n for n in os.listdir(p) if not n.endswith(("ma", "mb", "sa", "sb")))
    def writeto(p):
        with open(p, "ab") as f:
            f.write(b"x")
    os.umask(0o022)
    t("create", lambda: create(f"{R}/pub/new{T}"))
    t("mkdir", lambda: (os.mkdir(f"{R}/pub/dir{T}", 0o777), owner(f"{R}/pub/dir{T}"))[1])
    t("symlink", lambda: (os.symlink("x", f"{R}/pub/sl{T}"), owner(f"{R}/pub/sl{T}")[:2])[1])
    t("mkfifo", lambda: (os.mkfifo(f"{R}/pub/fifo{T}", 0o666), owner(f"{R}/pub/fifo{T}"))[1])
    t("mknod_chr", lambda: os.mknod(f"{R}/pub/chr{T}", stat.S_IFCHR | 0o600, os.makedev(1, 3)))
    t("write_own", lambda: writeto(f"{R}/pub/new{T}"))
    t("chmod_own", lambda: (os.chmod(f"{R}/pub/new{T}", 0o600), owner(f"{R}/pub/new{T}"))[1])
    t("utime_own", lambda: os.utime(f"{R}/pub/new{T}", ns=(10**9, 10**9)))
    t("chown_own_to_root", lambda: os.chown(f"{R}/pub/new{T}", 0, 0))
    t("chgrp_own_4321", lambda: (os.chown(f"{R}/pub/new{T}", -1, 4321), owner(f"{R}/pub/new{T}"))[1])
    t("rename_own", lambda: os.rename(f"{R}/pub/new{T}", f"{R}/pub/renamed{T}"))
    t("setxattr_own", lambda: os.setxattr(f"{R}/pub/renamed{T}", "user.u", b"1"))
    t("write_suid_file", lambda: (writeto(f"{R}/pub/suid{T}"), owner(f"{R}/pub/suid{T}"))[1])
    t("read_rootfile", lambda: read(f"{R}/rootfile"))
    t("write_rootfile", lambda: writeto(f"{R}/rootfile"))
    t("truncate_rootfile", lambda: os.truncate(f"{R}/rootfile", 0))
    t("chmod_rootfile", lambda: os.chmod(f"{R}/rootfile", 0o666))
    t("chown_rootfile", lambda: os.chown(f"{R}/rootfile", 65534, 65534))
    t("utime_rootfile_times", lambda: os.utime(f"{R}/rootfile", ns=(10**9, 10**9)))
    t("utime_rootfile_now", lambda: os.utime(f"{R}/rootfile"))
    t("setxattr_rootfile", lambda: os.setxattr(f"{R}/rootfile", "user.x", b"1"))
    t("getxattr_rootfile", lambda: os.getxattr(f"{R}/rootfile", "user.a").decode())
    t("access_rootfile_w", lambda: os.access(f"{R}/rootfile", os.W_OK))
    t("access_rootfile_r", lambda: os.access(f"{R}/rootfile", os.R_OK))
    t("unlink_rootfile", lambda: os.unlink(f"{R}/rootfile"))
    t("create_in_root", lambda: create(f"{R}/mine{T}"))
    t("link_rootfile", lambda: os.link(f"{R}/rootfile", f"{R}/pub/hl{T}"))
    t("unlink_sticky_other", lambda: os.unlink(f"{R}/sticky/other"))
    t("rename_sticky_other", lambda: os.rename(f"{R}/sticky/other", f"{R}/sticky/o{T}"))
    t("create_sticky", lambda: create(f"{R}/sticky/mine{T}"))
    t("unlink_sticky_own", lambda: os.unlink(f"{R}/sticky/mine{T}"))
    t("listdir_private", lambda: ls(f"{R}/private"))
    t("stat_private_f", lambda: owner(f"{R}/private/f"))
    t("read_private_f", lambda: read(f"{R}/private/f"))
    t("listdir_rdonly", lambda: ls(f"{R}/rdonly"))
    t("stat_rdonly_f", lambda: owner(f"{R}/rdonly/f"))
    t("listdir_grp", lambda: ls(f"{R}/grp"))
    t("read_grp_f", lambda: read(f"{R}/grp/f"))
    t("create_grp", lambda: create(f"{R}/grp/new{T}"))
    t("create_sgid", lambda: create(f"{R}/sgid/new{T}"))
    t("mkdir_sgid", lambda: (os.mkdir(f"{R}/sgid/d{T}"), owner(f"{R}/sgid/d{T}"))[1])
    json.dump(res, sys.stdout)
""")


def populate_multiuser(src: str) -> None:
    def mk(rel: str, mode: int, uid: int = 0, gid: int = 0, data: bytes | None = None) -> None:
        p = os.path.join(src, rel)
        if data is None:
            os.mkdir(p)
        else:
            write(p, data)
        os.chown(p, uid, gid)
        os.chmod(p, mode)

    mk("pub", 0o777)
    mk("rootfile", 0o644, data=b"root's")
    os.setxattr(os.path.join(src, "rootfile"), "user.a", b"va")
    mk("sticky", 0o1777)
    mk("sticky/other", 0o666, uid=1234, gid=1234, data=b"")
    mk("private", 0o700)
    mk("private/f", 0o644, data=b"p")
    mk("rdonly", 0o744)
    mk("rdonly/f", 0o644, data=b"r")
    mk("grp", 0o770, gid=4321)
    mk("grp/f", 0o660, gid=4321, data=b"g")
    mk("sgid", 0o2777, gid=4321)
    for tag in ("ma", "mb", "sa", "sb"):  # root's set-uid files that others may write
        mk(f"pub/suid{tag}", 0o4777, data=b"")


def _python_for_others() -> str | None:
    """A Python interpreter other users can run (the test's own may live under /root)."""
    for exe in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        r = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", exe, "-c", ""],
                           capture_output=True, check=False) if shutil.which("setpriv") else None
        if r is not None and r.returncode == 0:
            return exe
    return None


USER_PYTHON = _python_for_others() or ""


def run_as_nobody(base: str, root: str, tag: str, groups: list[int]) -> dict[str, Any]:
    script = os.path.join(base, "user.py")
    if not os.path.exists(script):
        with open(script, "w") as f:
            f.write(USER_SCRIPT)
        os.chmod(script, 0o644)
    grp = ["--groups=" + ",".join(map(str, groups))] if groups else ["--clear-groups"]
    cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", *grp, USER_PYTHON, "-I", script, root, tag]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd="/")
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    return result


@pytest.mark.skipif(not USER_PYTHON, reason="needs setpriv and a Python that uid 65534 may run")
@pytest.mark.parametrize("options", ["allow_other,default_permissions", "allow_other"])
def test_other_users_get_the_sources_permission_checks(base: str, source: str, options: str) -> None:
    populate_multiuser(source)
    with _mount(base, source, options=options) as pt:
        for groups, tag in (([], "a"), ([4321], "b")):
            via_mount = run_as_nobody(base, pt.mnt, "m" + tag, groups)
            direct = run_as_nobody(base, pt.src, "s" + tag, groups)
            diffs = {k: (via_mount[k], direct.get(k)) for k in via_mount if via_mount[k] != direct.get(k)}
            assert not diffs, f"{options} groups={groups}: mount vs source differ: {diffs}"
            assert set(via_mount) == set(direct)
            res = via_mount
            assert res["create"] == ["ok", [NOBODY, NOBODY, "0o640"]]
            assert res["mkdir"] == ["ok", [NOBODY, NOBODY, "0o755"]]
            assert res["write_rootfile"] == ["err", "EACCES"]
            assert res["truncate_rootfile"] == ["err", "EACCES"]
            assert res["chmod_rootfile"] == ["err", "EPERM"]
            assert res["chown_own_to_root"] == ["err", "EPERM"]
            assert res["unlink_sticky_other"] == ["err", "EPERM"]
            assert res["create_in_root"] == ["err", "EACCES"]
            assert res["listdir_private"] == ["err", "EACCES"]
            assert res["stat_rdonly_f"] == ["err", "EACCES"]
            assert res["link_rootfile"] == ["err", "EPERM"]
            assert res["mknod_chr"] == ["err", "EPERM"]
            assert res["access_rootfile_w"] == ["ok", False]
            assert res["read_rootfile"] == ["ok", "root's"]
            assert res["write_suid_file"] == ["ok", [0, 0, "0o777"]]  # the set-uid bit is gone
            if groups:
                assert res["read_grp_f"] == ["ok", "g"]
                assert res["chgrp_own_4321"] == ["ok", [NOBODY, 4321, "0o600"]]
                assert res["create_grp"] == ["ok", [NOBODY, NOBODY, "0o640"]]
            else:
                assert res["read_grp_f"] == ["err", "EACCES"]
                assert res["chgrp_own_4321"] == ["err", "EPERM"]
            assert res["create_sgid"] == ["ok", [NOBODY, 4321, "0o640"]]
        # what nobody created through the mount is nobody's on the source
        st = os.stat(os.path.join(source, "pub", "renamedma"))
        assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY)
        assert os.getxattr(os.path.join(source, "pub", "renamedma"), "user.u") == b"1"
        # the daemon's own identity is back: root can still do everything through the mount
        write(pt.p("private", "root-again"), b"ok")
        assert os.stat(pt.s("private", "root-again")).st_uid == 0


def _in_mount_table(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def test_cli_main_runs_and_unmounts(base: str, source: str) -> None:
    write(os.path.join(source, "hello"), b"hi")
    mnt = os.path.join(base, "mnt")
    os.mkdir(mnt)
    proc = subprocess.Popen([sys.executable, "-m", "afuse.examples.passthroughfs", source, mnt],
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not os.path.ismount(mnt):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert read(os.path.join(mnt, "hello")) == b"hi"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert not _in_mount_table(mnt)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if _in_mount_table(mnt):  # also a dead mount (ENOTCONN), which os.path.ismount misses
            subprocess.run(["umount", "-l", mnt], check=False)


def test_main_rejects_missing_source(base: str) -> None:
    from afuse.examples.passthroughfs import main

    assert main([os.path.join(base, "nope"), base]) == 1


def test_getlk_handler_reports_holder(source: str) -> None:
    """Handler-level: conflicting owners, the holder's pid, unlock, EAGAIN without sleep."""
    write(os.path.join(source, "f"), b"x" * 10)
    ops = PassthroughFS(source)

    async def main() -> None:
        e = await ops.lookup(r.LookupRequest(1, 1, 0, 0, 0, b"f"))
        h = await ops.open(r.OpenRequest(2, e.nodeid, 0, 0, 0, os.O_RDWR, 0))

        def lk(owner: int, typ: int, start: int, end: int, pid: int, sleep: bool = False) -> r.SetlkRequest:
            return r.SetlkRequest(3, e.nodeid, 0, 0, pid, h.fh, owner, Lock(start, end, typ, pid), 0, sleep)

        await ops.setlk(lk(1, fcntl.F_WRLCK, 0, 4, 111))
        await ops.setlk(lk(2, fcntl.F_RDLCK, 6, 2**63 - 1, 222))
        with pytest.raises(FUSEError) as ei:
            await ops.setlk(lk(3, fcntl.F_RDLCK, 3, 3, 333))
        assert ei.value.errno == errno.EAGAIN
        got = await ops.getlk(r.GetlkRequest(4, e.nodeid, 0, 0, 333, h.fh, 3, Lock(0, 100, fcntl.F_WRLCK, 333), 0))
        assert (got.type, got.start, got.end, got.pid) == (fcntl.F_WRLCK, 0, 4, 111)
        got = await ops.getlk(r.GetlkRequest(4, e.nodeid, 0, 0, 333, h.fh, 3, Lock(5, 100, fcntl.F_WRLCK, 333), 0))
        assert (got.type, got.start, got.end, got.pid) == (fcntl.F_RDLCK, 6, 2**63 - 1, 222)
        got = await ops.getlk(r.GetlkRequest(4, e.nodeid, 0, 0, 111, h.fh, 1, Lock(0, 4, fcntl.F_WRLCK, 111), 0))
        assert got.type == fcntl.F_UNLCK  # one's own lock is no conflict
        # a waiting SETLKW is cancellable, then succeeds once the holder unlocks
        with trio.move_on_after(0.2) as scope:
            await ops.setlk(lk(3, fcntl.F_WRLCK, 0, 0, 333, sleep=True))
        assert scope.cancelled_caught
        async with trio.open_nursery() as n:
            n.start_soon(ops.setlk, lk(3, fcntl.F_WRLCK, 0, 0, 333, True))
            await trio.sleep(0.1)
            await ops.setlk(lk(1, fcntl.F_UNLCK, 0, 2**63 - 1, 111))
        # flush by owner 3 drops its locks
        await ops.flush(r.FlushRequest(5, e.nodeid, 0, 0, 333, h.fh, 3))
        await ops.setlk(lk(1, fcntl.F_WRLCK, 0, 4, 111))
        await ops.release(r.ReleaseRequest(6, e.nodeid, 0, 0, 0, h.fh, os.O_RDWR, 0, 0))

    try:
        trio.run(main)
    finally:
        ops.close()


def _coherence_checks(mnt: str, src: str) -> None:
    """Changes made directly in the source show in the mount at once."""
    assert sorted(os.listdir(mnt)) == sorted(os.listdir(src))
    write(os.path.join(src, "new"), b"one")
    assert "new" in os.listdir(mnt)
    assert os.stat(os.path.join(mnt, "new")).st_size == 3
    write(os.path.join(src, "new"), b"longer content")
    st = os.stat(os.path.join(mnt, "new"))
    assert st.st_size == 14 and st.st_mtime_ns == os.stat(os.path.join(src, "new")).st_mtime_ns
    assert read(os.path.join(mnt, "new")) == b"longer content"
    os.chmod(os.path.join(src, "new"), 0o600)
    assert stat.S_IMODE(os.stat(os.path.join(mnt, "new")).st_mode) == 0o600
    os.rename(os.path.join(src, "new"), os.path.join(src, "renamed"))
    assert sorted(os.listdir(mnt)) == sorted(os.listdir(src))
    assert oserr(os.stat, os.path.join(mnt, "new")) == errno.ENOENT
    os.unlink(os.path.join(src, "renamed"))
    assert "renamed" not in os.listdir(mnt)
    assert oserr(os.stat, os.path.join(mnt, "renamed")) == errno.ENOENT
    os.mkdir(os.path.join(src, "d"))
    assert os.listdir(os.path.join(mnt, "d")) == []
    write(os.path.join(src, "d", "f"), b"x")
    assert os.listdir(os.path.join(mnt, "d")) == ["f"]
    os.unlink(os.path.join(src, "d", "f"))
    assert os.listdir(os.path.join(mnt, "d")) == []


def test_coherent_with_source_by_default(pt: PT) -> None:
    write(pt.s("old"), b"x")
    _coherence_checks(pt.mnt, pt.src)


@contextlib.contextmanager
def _cli_mount(base: str, source: str, *extra: str) -> Iterator[str]:
    mnt = os.path.join(base, "mnt")
    os.mkdir(mnt)
    proc = subprocess.Popen([sys.executable, "-m", "afuse.examples.passthroughfs", source, mnt, *extra],
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not os.path.ismount(mnt):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
            assert time.monotonic() < deadline
            time.sleep(0.05)
        yield mnt
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if _in_mount_table(mnt):  # also a dead mount (ENOTCONN), which os.path.ismount misses
            subprocess.run(["umount", "-l", mnt], check=False)


def test_cli_is_coherent_by_default(base: str, source: str) -> None:
    write(os.path.join(source, "old"), b"x")
    with _cli_mount(base, source) as mnt:
        _coherence_checks(mnt, source)


def test_cli_caching_flags_trade_coherence_for_speed(base: str, source: str) -> None:
    write(os.path.join(source, "old"), b"x")
    with _cli_mount(base, source, "--timeout", "60", "--cache-dir") as mnt:
        assert os.listdir(mnt) == ["old"]
        assert os.stat(os.path.join(mnt, "old")).st_size == 1
        write(os.path.join(source, "old"), b"xyz")
        os.rename(os.path.join(source, "old"), os.path.join(source, "moved"))
        # the kernel answers from its caches for 60 s: the name and its attributes are stale
        st = os.stat(os.path.join(mnt, "old"))
        assert st.st_size == 1
