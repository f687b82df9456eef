"""Operations general-purpose filesystem tests rarely make the kernel send, against the real kernel.

Each test mounts a small purpose-built filesystem (a :class:`TinyFS` subclass: an in-memory tree
of a few nodes) and checks the visible effect through real system calls: ACCESS, IOCTL, POLL,
COPY_FILE_RANGE_64 and its 32-bit fallback COPY_FILE_RANGE, SETLKW (and GETLK/SETLK), STATX,
TMPFILE, READDIRPLUS, FSYNCDIR, RENAME and RENAME2, and on a fuseblk mount over a loop device
BMAP, SYNCFS and DESTROY. INTERRUPT is covered by tests/test_session.py.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import select
import shutil
import stat
import struct
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import afuse
from afuse import testing
from afuse.errors import FUSEError
from afuse.operations import DirEntries
from afuse.testing import MountFactory
from afuse.wire.constants import ROOT_ID
from afuse.wire.types import Attr, DirEntry, Entry, Handle, IoctlReply, Lock, Statx, Timestamp

pytestmark = pytest.mark.timeout(120)

libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
AT_SYMLINK_FOLLOW = 0x400
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
F_RDLCK, F_WRLCK, F_UNLCK = 0, 1, 2


def _check_libc(res: int, what: str) -> None:
    if res != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


# --------------------------------------------------------------------------- a tiny in-memory tree


class Node:
    """One inode: attributes, file data, directory children."""

    def __init__(self, ino: int, mode: int, parent: int, data: bytes = b"") -> None:
        now = time.time_ns()
        self.attr = Attr(ino=ino, mode=mode, nlink=2 if stat.S_ISDIR(mode) else 1, atime_ns=now,
                         mtime_ns=now, ctime_ns=now, blksize=4096)
        self.parent = parent
        self.data = bytearray(data)
        self.children: dict[bytes, int] = {}

    @property
    def ino(self) -> int:
        return self.attr.ino

    def get_attr(self) -> Attr:
        if stat.S_ISREG(self.attr.mode):
            self.attr.size = len(self.data)
            self.attr.blocks = (len(self.data) + 511) // 512
        return self.attr


class TinyFS(afuse.Operations):
    """A root directory with a few files and directories, all in memory.

    No caching (timeouts 0): every path walk asks, so each test sees the kernel's requests.
    Lookup counts are not tracked: nodes live as long as the filesystem.
    """

    entry_timeout = 0.0
    attr_timeout = 0.0

    def __init__(self) -> None:
        self.nodes: dict[int, Node] = {ROOT_ID: Node(ROOT_ID, stat.S_IFDIR | 0o755, ROOT_ID)}
        self._next_ino = ROOT_ID + 1
        self._next_fh = 1000
        #: Opened handles: fh -> nodeid.
        self.handles: dict[int, int] = {}
        self.calls: Counter[str] = Counter()

    # -- helpers ---------------------------------------------------------------------------

    def add(self, parent: int, name: bytes, mode: int = stat.S_IFREG | 0o644, data: bytes = b"",
            link: bool = True) -> Node:
        node = Node(self._next_ino, mode, parent, data)
        self._next_ino += 1
        self.nodes[node.ino] = node
        if link:
            self.node(parent).children[name] = node.ino
            if stat.S_ISDIR(mode):
                self.node(parent).attr.nlink += 1
        return node

    def node(self, nodeid: int) -> Node:
        try:
            return self.nodes[nodeid]
        except KeyError:
            raise FUSEError(errno.ENOENT) from None

    def dir(self, nodeid: int) -> Node:
        node = self.node(nodeid)
        if not stat.S_ISDIR(node.attr.mode):
            raise FUSEError(errno.ENOTDIR)
        return node

    def child(self, parent: int, name: bytes) -> Node:
        ino = self.dir(parent).children.get(name)
        if ino is None:
            raise FUSEError(errno.ENOENT)
        return self.nodes[ino]

    def entry(self, node: Node) -> Entry:
        return Entry(node.ino, node.get_attr())

    def path_node(self, *names: bytes) -> Node:
        node = self.nodes[ROOT_ID]
        for name in names:
            node = self.child(node.ino, name)
        return node

    def _handle(self, nodeid: int) -> Handle:
        self._next_fh += 1
        self.handles[self._next_fh] = nodeid
        return Handle(fh=self._next_fh)

    # -- operations ------------------------------------------------------------------------

    async def lookup(self, req: afuse.LookupRequest) -> Entry:
        self.calls["lookup"] += 1
        return self.entry(self.child(req.nodeid, req.name))

    async def forget(self, req: afuse.ForgetRequest) -> None:
        self.calls["forget"] += 1

    async def getattr(self, req: afuse.GetattrRequest) -> Attr:
        self.calls["getattr"] += 1
        return self.node(req.nodeid).get_attr()

    async def setattr(self, req: afuse.SetattrRequest) -> Attr:
        node = self.node(req.nodeid)
        a = node.attr
        if req.size is not None:
            if len(node.data) > req.size:
                del node.data[req.size:]
            else:
                node.data.extend(bytes(req.size - len(node.data)))
        if req.mode is not None:
            a.mode = stat.S_IFMT(a.mode) | (req.mode & 0o7777)
        now = time.time_ns()
        if req.atime_ns is not None or req.atime_now:
            a.atime_ns = now if req.atime_now else req.atime_ns or 0
        if req.mtime_ns is not None or req.mtime_now:
            a.mtime_ns = now if req.mtime_now else req.mtime_ns or 0
        a.ctime_ns = now
        return node.get_attr()

    async def opendir(self, req: afuse.OpendirRequest) -> Handle:
        self.dir(req.nodeid)
        return self._handle(req.nodeid)

    def _dir_entries(self, nodeid: int) -> list[tuple[bytes, Node]]:
        d = self.dir(nodeid)
        return [(b".", d), (b"..", self.nodes[d.parent])] + [
            (name, self.nodes[ino]) for name, ino in d.children.items()
        ]

    async def readdir(self, req: afuse.ReaddirRequest) -> DirEntries:
        self.calls["readdir"] += 1
        entries = self._dir_entries(req.nodeid)
        return [DirEntry(name, i + 1, attr=n.get_attr()) for i, (name, n) in enumerate(entries)][req.offset:]

    async def releasedir(self, req: afuse.ReleasedirRequest) -> None:
        self.handles.pop(req.fh, None)

    async def open(self, req: afuse.OpenRequest) -> Handle:
        node = self.node(req.nodeid)
        if stat.S_ISDIR(node.attr.mode):
            raise FUSEError(errno.EISDIR)
        if req.flags & os.O_TRUNC:
            node.data.clear()
        return self._handle(req.nodeid)

    async def read(self, req: afuse.ReadRequest) -> bytes:
        return bytes(self.node(req.nodeid).data[req.offset : req.offset + req.size])

    async def write(self, req: afuse.WriteRequest) -> int:
        data = self.node(req.nodeid).data
        if req.offset > len(data):
            data.extend(bytes(req.offset - len(data)))
        data[req.offset : req.offset + len(req.data)] = req.data
        return len(req.data)

    async def flush(self, req: afuse.FlushRequest) -> None:
        pass

    async def release(self, req: afuse.ReleaseRequest) -> None:
        self.handles.pop(req.fh, None)

    async def create(self, req: afuse.CreateRequest) -> tuple[Entry, Handle]:
        if req.name in self.dir(req.nodeid).children:
            raise FUSEError(errno.EEXIST)
        node = self.add(req.nodeid, req.name, stat.S_IFREG | (req.mode & 0o7777 & ~req.umask))
        return self.entry(node), self._handle(node.ino)

    async def mkdir(self, req: afuse.MkdirRequest) -> Entry:
        if req.name in self.dir(req.nodeid).children:
            raise FUSEError(errno.EEXIST)
        return self.entry(self.add(req.nodeid, req.name, stat.S_IFDIR | (req.mode & 0o7777 & ~req.umask)))

    async def unlink(self, req: afuse.UnlinkRequest) -> None:
        node = self.child(req.nodeid, req.name)
        if stat.S_ISDIR(node.attr.mode):
            raise FUSEError(errno.EISDIR)
        del self.nodes[req.nodeid].children[req.name]
        node.attr.nlink -= 1

    async def link(self, req: afuse.LinkRequest) -> Entry:
        node = self.node(req.oldnodeid)
        parent = self.dir(req.nodeid)
        if req.newname in parent.children:
            raise FUSEError(errno.EEXIST)
        parent.children[req.newname] = node.ino
        node.attr.nlink += 1
        return self.entry(node)

    async def rename(self, req: afuse.RenameRequest) -> None:
        self.calls[f"rename flags={req.flags}"] += 1
        src_dir, dst_dir = self.dir(req.nodeid), self.dir(req.newdir)
        src = self.child(req.nodeid, req.name)
        target = dst_dir.children.get(req.newname)
        if req.flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise FUSEError(errno.EINVAL)
        if req.flags & RENAME_EXCHANGE:
            if target is None:
                raise FUSEError(errno.ENOENT)
            src_dir.children[req.name], dst_dir.children[req.newname] = target, src.ino
            return
        if target is not None:
            if req.flags & RENAME_NOREPLACE:
                raise FUSEError(errno.EEXIST)
            self.nodes[target].attr.nlink -= 1
        del src_dir.children[req.name]
        dst_dir.children[req.newname] = src.ino
        src.parent = dst_dir.ino


# --------------------------------------------------------------------------- ACCESS


class AccessFS(TinyFS):
    """Denies every access(2) check of the file ``secret`` and of the directory ``locked``."""

    def __init__(self) -> None:
        super().__init__()
        self.open_file = self.add(ROOT_ID, b"open", data=b"x")
        self.secret = self.add(ROOT_ID, b"secret", data=b"y")
        self.subdir = self.add(ROOT_ID, b"dir", stat.S_IFDIR | 0o755)
        self.locked = self.add(ROOT_ID, b"locked", stat.S_IFDIR | 0o755)
        self.checks: list[tuple[int, int]] = []

    async def access(self, req: afuse.AccessRequest) -> None:
        self.checks.append((req.nodeid, req.mask))
        if req.nodeid in (self.secret.ino, self.locked.ino):
            raise FUSEError(errno.EACCES)


def test_access_asks_the_filesystem(fuse_mount: MountFactory) -> None:
    ops = AccessFS()
    m = fuse_mount(ops)  # no default_permissions: the kernel asks the filesystem
    assert os.access(m.join("open"), os.R_OK)
    assert not os.access(m.join("secret"), os.R_OK)
    assert not os.access(m.join("secret"), os.W_OK)
    assert (ops.open_file.ino, os.R_OK) in ops.checks
    assert (ops.secret.ino, os.R_OK) in ops.checks
    assert (ops.secret.ino, os.W_OK) in ops.checks
    # Only access(2) and chdir(2) ask: a plain open of the denied file works.
    with open(m.join("secret"), "rb") as f:
        assert f.read() == b"y"
    old = os.getcwd()
    try:
        os.chdir(m.join("dir"))
        assert os.path.samefile(os.getcwd(), m.join("dir"))
    finally:
        os.chdir(old)
    with pytest.raises(PermissionError):
        os.chdir(m.join("locked"))
    assert os.getcwd() == old
    assert (ops.subdir.ino, os.X_OK) in ops.checks
    assert (ops.locked.ino, os.X_OK) in ops.checks


# --------------------------------------------------------------------------- IOCTL


def _ioc(direction: int, kind: str, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (ord(kind) << 8) | nr


IOC_WRITE, IOC_READ = 1, 2
#: _IOWR('E', 1, 8 bytes): the filesystem answers the 8 bytes reversed.
REVERSE8 = _ioc(IOC_READ | IOC_WRITE, "E", 1, 8)
#: _IOWR('E', 2, 8 bytes): not implemented.
UNKNOWN8 = _ioc(IOC_READ | IOC_WRITE, "E", 2, 8)


class IoctlFS(TinyFS):
    def __init__(self) -> None:
        super().__init__()
        self.file = self.add(ROOT_ID, b"dev")
        self.ioctls: list[tuple[int, int, bytes, int]] = []

    async def ioctl(self, req: afuse.IoctlRequest) -> IoctlReply:
        self.ioctls.append((req.nodeid, req.cmd, req.in_data, req.out_size))
        if req.cmd == REVERSE8:
            return IoctlReply(result=42, data=req.in_data[::-1])
        raise FUSEError(errno.ENOTTY)


def test_ioctl_iowr_round_trip(fuse_mount: MountFactory) -> None:
    ops = IoctlFS()
    m = fuse_mount(ops)
    fd = os.open(m.join("dev"), os.O_RDWR)
    try:
        buf = bytearray(b"abcdefgh")
        assert fcntl.ioctl(fd, REVERSE8, buf, True) == 42
        assert buf == b"hgfedcba"
        with pytest.raises(OSError) as e:
            fcntl.ioctl(fd, UNKNOWN8, bytearray(8), True)
        assert e.value.errno == errno.ENOTTY
        with pytest.raises(OSError) as e:  # isatty's TCGETS goes to the filesystem too
            fcntl.ioctl(fd, 0x5401, bytearray(64), True)
        assert e.value.errno == errno.ENOTTY
    finally:
        os.close(fd)
    assert (ops.file.ino, REVERSE8, b"abcdefgh", 8) in ops.ioctls
    assert any(cmd == UNKNOWN8 for _n, cmd, _d, _s in ops.ioctls)


# --------------------------------------------------------------------------- POLL


class PollFS(TinyFS):
    """``rw`` is readable and writable, ``ro`` only readable, according to POLL."""

    def __init__(self) -> None:
        super().__init__()
        self.rw = self.add(ROOT_ID, b"rw")
        self.ro = self.add(ROOT_ID, b"ro")
        self.polls: list[tuple[int, int]] = []

    async def poll(self, req: afuse.PollRequest) -> int:
        self.polls.append((req.nodeid, req.events))
        if req.nodeid == self.rw.ino:
            return select.POLLIN | select.POLLOUT
        return select.POLLIN


def test_poll_reports_the_filesystems_events(fuse_mount: MountFactory) -> None:
    ops = PollFS()
    m = fuse_mount(ops)
    fds = [os.open(m.join(name), os.O_RDWR) for name in ("rw", "ro")]
    try:
        p = select.poll()
        for fd in fds:
            p.register(fd, select.POLLIN | select.POLLOUT)
        ready = dict(p.poll(5000))
    finally:
        for fd in fds:
            os.close(fd)
    # Without a poll handler the kernel would call both always ready for reading and writing.
    assert ready == {fds[0]: select.POLLIN | select.POLLOUT, fds[1]: select.POLLIN}
    polled = {nodeid for nodeid, _events in ops.polls}
    assert polled == {ops.rw.ino, ops.ro.ino}
    assert all(events & select.POLLIN for _nodeid, events in ops.polls)


# --------------------------------------------------------------------------- COPY_FILE_RANGE(_64)


class CopyFS(TinyFS):
    def __init__(self) -> None:
        super().__init__()
        self.src = self.add(ROOT_ID, b"src")
        self.dst = self.add(ROOT_ID, b"dst")
        #: (wide, length) of each COPY_FILE_RANGE(_64) request.
        self.copies: list[tuple[bool, int]] = []

    async def copy_file_range(self, req: afuse.CopyFileRangeRequest) -> int:
        self.copies.append((req.wide, req.length))
        assert self.handles[req.fh_in] == req.nodeid and self.handles[req.fh_out] == req.nodeid_out
        chunk = bytes(self.node(req.nodeid).data[req.off_in : req.off_in + req.length])
        out = self.node(req.nodeid_out).data
        if req.off_out > len(out):
            out.extend(bytes(req.off_out - len(out)))
        out[req.off_out : req.off_out + len(chunk)] = chunk
        return len(chunk)


class NarrowCopyFS(CopyFS):
    """Refuses COPY_FILE_RANGE_64 with ENOSYS: the kernel falls back to COPY_FILE_RANGE."""

    async def copy_file_range(self, req: afuse.CopyFileRangeRequest) -> int:
        if req.wide:
            self.copies.append((req.wide, req.length))
            raise FUSEError(errno.ENOSYS)
        return await super().copy_file_range(req)


PAYLOAD = bytes(range(256)) * 64


def _copy_on(m: testing.MountedFS, count: int, off_in: int, off_out: int) -> tuple[int, bytes]:
    src = os.open(m.join("src"), os.O_RDWR)
    dst = os.open(m.join("dst"), os.O_RDWR)
    try:
        if os.fstat(src).st_size == 0:
            assert os.write(src, PAYLOAD) == len(PAYLOAD)
        n = os.copy_file_range(src, dst, count, off_in, off_out)
        return n, os.pread(dst, 1 << 20, 0)
    finally:
        os.close(src)
        os.close(dst)


def test_copy_file_range_64(fuse_mount: MountFactory) -> None:
    ops = CopyFS()
    m = fuse_mount(ops)
    n, data = _copy_on(m, 10000, 100, 50)
    assert n == 10000
    assert data == bytes(50) + PAYLOAD[100:10100]
    assert ops.copies == [(True, 10000)]


def test_copy_file_range_falls_back_to_32_bit_opcode(fuse_mount: MountFactory) -> None:
    ops = NarrowCopyFS()
    m = fuse_mount(ops)
    n, data = _copy_on(m, 5000, 7, 0)
    assert n == 5000
    assert data == PAYLOAD[7:5007]
    # 53 was tried once, answered ENOSYS; 47 did the copy and is used from now on.
    assert ops.copies == [(True, 5000), (False, 5000)]
    n, data = _copy_on(m, 3, 0, 5000)
    assert n == 3
    assert data == PAYLOAD[7:5007] + PAYLOAD[:3]
    assert ops.copies[2:] == [(False, 3)]


# --------------------------------------------------------------------------- SETLKW / SETLK / GETLK


class LockFS(TinyFS):
    """POSIX record locks with real state: a table per inode, waiters woken on every change."""

    def __init__(self) -> None:
        super().__init__()
        self.file = self.add(ROOT_ID, b"locked", data=b"contended")
        self.locks: dict[int, list[tuple[int, Lock]]] = {}
        self._changed = trio.Event()
        #: Requests currently waiting in SETLKW.
        self.waiting = 0
        self.requests: list[tuple[str, int, bool]] = []

    def _conflict(self, nodeid: int, owner: int, lock: Lock) -> Lock | None:
        for other, held in self.locks.get(nodeid, []):
            if other != owner and held.start <= lock.end and lock.start <= held.end \
                    and F_WRLCK in (held.type, lock.type):
                return held
        return None

    def _drop(self, nodeid: int, owner: int, start: int = 0, end: int = (1 << 63) - 1) -> None:
        # Simplified: whole locks of ``owner`` overlapping [start, end] go (no splitting).
        held = self.locks.get(nodeid, [])
        self.locks[nodeid] = [(o, lk) for o, lk in held if o != owner or lk.end < start or lk.start > end]
        self._changed.set()
        self._changed = trio.Event()

    async def getlk(self, req: afuse.GetlkRequest) -> Lock:
        self.requests.append(("getlk", req.lock.type, False))
        found = self._conflict(req.nodeid, req.owner, req.lock)
        return found if found is not None else Lock(req.lock.start, req.lock.end, F_UNLCK, 0)

    async def setlk(self, req: afuse.SetlkRequest) -> None:
        self.requests.append(("setlk", req.lock.type, req.sleep))
        lock = req.lock
        if lock.type == F_UNLCK:
            self._drop(req.nodeid, req.owner, lock.start, lock.end)
            return
        while self._conflict(req.nodeid, req.owner, lock) is not None:
            if not req.sleep:
                raise FUSEError(errno.EAGAIN)
            changed = self._changed
            self.waiting += 1
            try:
                await changed.wait()
            finally:
                self.waiting -= 1
        self._drop(req.nodeid, req.owner, lock.start, lock.end)
        self.locks[req.nodeid].append((req.owner, Lock(lock.start, lock.end, lock.type, lock.pid)))

    async def flush(self, req: afuse.FlushRequest) -> None:
        # POSIX locks die with any close by their owner; the kernel says so with FLUSH.
        self._drop(req.nodeid, req.lock_owner)


FLOCK = struct.Struct("hh4xqqi4x")  # struct flock on x86_64 / aarch64

_LOCK_CHILD = textwrap.dedent(
    """
    import errno, fcntl, os, struct, sys, time
    FLOCK = struct.Struct("hh4xqqi4x")
    fd = os.open(sys.argv[1], os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        nonblocking = "acquired"
    except OSError as e:
        nonblocking = errno.errorcode[e.errno]
    got = fcntl.fcntl(fd, fcntl.F_GETLK, FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
    l_type, _whence, _start, _len, l_pid = FLOCK.unpack(got)
    print("waiting", nonblocking, l_type, l_pid, flush=True)
    t0 = time.monotonic()
    fcntl.lockf(fd, fcntl.LOCK_EX)
    print("locked", time.monotonic() - t0, flush=True)
    fcntl.lockf(fd, fcntl.LOCK_UN)
    os.close(fd)
    """
)


def test_setlkw_waits_until_the_holder_unlocks(fuse_mount: MountFactory) -> None:
    ops = LockFS()
    m = fuse_mount(ops)
    assert m.session.has(afuse.InitFlag.POSIX_LOCKS)
    path = m.join("locked")
    fd = os.open(path, os.O_RDWR)
    child: subprocess.Popen[str] | None = None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        child = subprocess.Popen([sys.executable, "-c", _LOCK_CHILD, path], stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None
        first = child.stdout.readline().split()
        assert first[:2] == ["waiting", "EAGAIN"], first
        assert (int(first[2]), int(first[3])) == (F_WRLCK, os.getpid())  # GETLK names the holder
        deadline = time.monotonic() + 10
        while ops.waiting == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ops.waiting == 1, "the child's blocking lock never reached the filesystem"
        time.sleep(0.3)
        assert child.poll() is None  # still blocked in SETLKW
        fcntl.lockf(fd, fcntl.LOCK_UN)
        out, _ = child.communicate(timeout=10)
    finally:
        if child is not None and child.poll() is None:
            child.kill()
            child.wait(10)
        os.close(fd)
    assert child.returncode == 0
    word, waited = out.split()
    assert word == "locked" and float(waited) >= 0.25
    assert ("setlk", F_WRLCK, True) in ops.requests  # SETLKW
    assert ("setlk", F_WRLCK, False) in ops.requests  # SETLK
    assert any(kind == "setlk" and typ == F_UNLCK for kind, typ, _sleep in ops.requests)  # lockf(LOCK_UN)
    assert ("getlk", F_WRLCK, False) in ops.requests
    assert ops.waiting == 0


# --------------------------------------------------------------------------- STATX


BTIME = Timestamp(1_600_000_000, 123_456_789)
STATX_BASIC_STATS = 0x7FF
STATX_BTIME = 0x800


class StatxFS(TinyFS):
    def __init__(self) -> None:
        super().__init__()
        self.file = self.add(ROOT_ID, b"born", data=b"since 2020")
        self.masks: list[int] = []

    async def statx(self, req: afuse.StatxRequest) -> Statx:
        self.masks.append(req.mask)
        a = self.node(req.nodeid).get_attr()

        def ts(ns: int) -> Timestamp:
            return Timestamp(ns // 1_000_000_000, ns % 1_000_000_000)

        return Statx(
            mask=STATX_BASIC_STATS | STATX_BTIME, blksize=4096, nlink=a.nlink, uid=a.uid, gid=a.gid,
            mode=a.mode, ino=a.ino, size=a.size, blocks=a.blocks, atime=ts(a.atime_ns), btime=BTIME,
            ctime=ts(a.ctime_ns), mtime=ts(a.mtime_ns),
        )


def _statx(path: str, mask: int) -> bytes:
    buf = ctypes.create_string_buffer(256)
    libc.statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
    _check_libc(libc.statx(AT_FDCWD, os.fsencode(path), 0, mask, buf), f"statx {path}")
    return buf.raw


def test_statx_btime_comes_from_the_filesystem(fuse_mount: MountFactory) -> None:
    ops = StatxFS()
    m = fuse_mount(ops)
    raw = _statx(m.join("born"), STATX_BASIC_STATS | STATX_BTIME)
    (stx_mask,) = struct.unpack_from("<I", raw, 0)
    (stx_mode,) = struct.unpack_from("<H", raw, 28)
    (stx_size,) = struct.unpack_from("<Q", raw, 40)
    btime = struct.unpack_from("<qI", raw, 80)
    assert stx_mask & STATX_BTIME
    assert btime == (BTIME.sec, BTIME.nsec)
    assert stat.S_ISREG(stx_mode) and stx_size == len(b"since 2020")
    assert ops.masks and all(mask & STATX_BTIME for mask in ops.masks)


# --------------------------------------------------------------------------- TMPFILE


class TmpfileFS(TinyFS):
    def __init__(self) -> None:
        super().__init__()
        self.tmpfiles: list[int] = []

    async def tmpfile(self, req: afuse.TmpfileRequest) -> tuple[Entry, Handle]:
        self.dir(req.nodeid)
        node = self.add(req.nodeid, b"", stat.S_IFREG | (req.mode & 0o7777 & ~req.umask), link=False)
        self.tmpfiles.append(node.ino)
        entry = self.entry(node)  # nlink 1 in the reply: the kernel drops it to 0 itself
        node.attr.nlink = 0
        return entry, self._handle(node.ino)


def _linkat_follow(old: str, new: str) -> None:
    # os.link() calls link(2), which would link the /proc symlink itself; linkat can follow it.
    libc.linkat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    _check_libc(libc.linkat(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), AT_SYMLINK_FOLLOW),
                f"linkat {old} {new}")


def test_o_tmpfile_then_link_it_in(fuse_mount: MountFactory) -> None:
    ops = TmpfileFS()
    m = fuse_mount(ops)
    fd = os.open(m.path, os.O_TMPFILE | os.O_RDWR, 0o600)
    try:
        assert os.listdir(m.path) == []
        assert os.write(fd, b"scratch") == 7
        assert os.pread(fd, 100, 0) == b"scratch"
        st = os.fstat(fd)
        assert stat.S_ISREG(st.st_mode) and st.st_nlink == 0 and st.st_size == 7
        _linkat_follow(f"/proc/self/fd/{fd}", m.join("kept"))  # LINK gives it a name
    finally:
        os.close(fd)
    assert len(ops.tmpfiles) == 1
    assert os.listdir(m.path) == ["kept"]
    assert os.stat(m.join("kept")).st_ino == ops.tmpfiles[0]
    with open(m.join("kept"), "rb") as f:
        assert f.read() == b"scratch"


# --------------------------------------------------------------------------- READDIRPLUS


class PlusFS(TinyFS):
    """Lists with READDIRPLUS; entries and attributes stay valid for a minute."""

    entry_timeout = 60.0
    attr_timeout = 60.0

    def __init__(self) -> None:
        super().__init__()
        for name in (b"alpha", b"beta", b"gamma"):
            self.add(ROOT_ID, name, data=name * 3)
        self.plus_calls = 0
        self.lookups: Counter[int] = Counter()
        self.lookup_names: list[bytes] = []
        self.getattrs: list[int] = []

    async def getattr(self, req: afuse.GetattrRequest) -> Attr:
        self.getattrs.append(req.nodeid)
        return await super().getattr(req)

    async def lookup(self, req: afuse.LookupRequest) -> Entry:
        self.lookup_names.append(req.name)
        entry = await super().lookup(req)
        self.lookups[entry.nodeid] += 1
        return entry

    async def readdirplus(self, req: afuse.ReaddirplusRequest) -> DirEntries:
        self.plus_calls += 1
        return self._plus(req)

    def _plus(self, req: afuse.ReaddirplusRequest) -> Iterator[DirEntry]:
        entries = self._dir_entries(req.nodeid)
        for i, (name, node) in enumerate(entries[req.offset:], req.offset + 1):
            yield DirEntry(name, i, entry=self.entry(node))
            if name not in (b".", b".."):  # taken by the kernel: one lookup
                self.lookups[node.ino] += 1


def test_readdirplus_fills_the_dentry_cache(fuse_mount: MountFactory) -> None:
    ops = PlusFS()
    m = fuse_mount(ops)
    assert m.session.has(afuse.InitFlag.DO_READDIRPLUS)
    assert sorted(os.listdir(m.path)) == ["alpha", "beta", "gamma"]
    # READDIRPLUS_AUTO: the listing starts with READDIRPLUS (the call at EOF may be plain READDIR).
    assert ops.plus_calls >= 1
    # Every name and its attributes came with the listing: no LOOKUP, no GETATTR of them.
    for entry in os.scandir(m.path):
        st = entry.stat()
        assert st.st_size == len(entry.name) * 3
        assert os.stat(m.join(entry.name)).st_ino == st.st_ino
    assert ops.lookup_names == []
    assert set(ops.getattrs) <= {ROOT_ID}  # (reading a directory invalidates its own atime)
    assert all(ops.lookups[n.ino] >= 1 for n in ops.nodes.values() if n.ino != ROOT_ID)


# --------------------------------------------------------------------------- FSYNCDIR


class FsyncdirFS(TinyFS):
    def __init__(self) -> None:
        super().__init__()
        self.sub = self.add(ROOT_ID, b"sub", stat.S_IFDIR | 0o755)
        self.dir_handles: list[int] = []
        self.syncs: list[tuple[int, int, bool]] = []

    async def opendir(self, req: afuse.OpendirRequest) -> Handle:
        h = await super().opendir(req)
        self.dir_handles.append(h.fh)
        return h

    async def fsyncdir(self, req: afuse.FsyncdirRequest) -> None:
        self.syncs.append((req.nodeid, req.fh, req.datasync))


def test_fsync_of_a_directory(fuse_mount: MountFactory) -> None:
    ops = FsyncdirFS()
    m = fuse_mount(ops)
    fd = os.open(m.join("sub"), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    fh = ops.dir_handles[-1]
    assert ops.syncs == [(ops.sub.ino, fh, False), (ops.sub.ino, fh, True)]


# --------------------------------------------------------------------------- RENAME / RENAME2


def _renameat2(old: str, new: str, flags: int) -> None:
    libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    _check_libc(libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags),
                f"renameat2 {old} {new}")


def test_rename_and_rename2(fuse_mount: MountFactory) -> None:
    ops = TinyFS()
    ops.add(ROOT_ID, b"a", data=b"A")
    ops.add(ROOT_ID, b"x", data=b"X")
    sub = ops.add(ROOT_ID, b"sub", stat.S_IFDIR | 0o755)
    m = fuse_mount(ops)
    os.rename(m.join("a"), m.join("b"))  # flags 0: RENAME
    assert sorted(os.listdir(m.path)) == ["b", "sub", "x"]
    assert ops.calls["rename flags=0"] == 1
    _renameat2(m.join("b"), m.join("sub", "c"), RENAME_NOREPLACE)  # RENAME2
    assert os.listdir(m.join("sub")) == ["c"]
    assert ops.nodes[ops.child(sub.ino, b"c").ino].parent == sub.ino
    with pytest.raises(FileExistsError):  # refused by the VFS itself: "x" is a known positive entry
        _renameat2(m.join("sub", "c"), m.join("x"), RENAME_NOREPLACE)
    _renameat2(m.join("sub", "c"), m.join("x"), RENAME_EXCHANGE)
    with open(m.join("x"), "rb") as f:
        assert f.read() == b"A"
    with open(m.join("sub", "c"), "rb") as f:
        assert f.read() == b"X"
    assert ops.calls[f"rename flags={RENAME_NOREPLACE}"] == 1
    assert ops.calls[f"rename flags={RENAME_EXCHANGE}"] == 1
    os.replace(m.join("sub", "c"), m.join("x"))  # replacing an existing name is still plain RENAME
    assert ops.calls["rename flags=0"] == 2
    with open(m.join("x"), "rb") as f:
        assert f.read() == b"X"


# --------------------------------------------------------------------------- fuseblk: BMAP, SYNCFS, DESTROY

FIBMAP = 1


class BlockFS(TinyFS):
    """A fuseblk filesystem: file block n lives in device block 2n + 100."""

    def __init__(self) -> None:
        super().__init__()
        self.file = self.add(ROOT_ID, b"data", data=bytes(64 * 1024))
        self.bmaps: list[tuple[int, int, int]] = []
        self.syncfs_calls = 0
        self.destroyed = False

    async def bmap(self, req: afuse.BmapRequest) -> int:
        self.bmaps.append((req.nodeid, req.block, req.blocksize))
        return req.block * 2 + 100

    async def syncfs(self, req: afuse.SyncfsRequest) -> None:
        self.syncfs_calls += 1

    async def destroy(self, req: afuse.DestroyRequest) -> None:
        self.destroyed = True


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[str]:
    """A 4 MiB loop device, detached afterwards."""
    if os.geteuid() != 0:
        pytest.skip("fuseblk needs root (mount(2) with a block device)")
    losetup = shutil.which("losetup")
    if losetup is None or not os.path.exists("/dev/loop-control"):
        pytest.skip("no losetup or /dev/loop-control")
    image = tmp_path / "fuseblk.img"
    with open(image, "wb") as f:
        f.truncate(4 << 20)
    res = subprocess.run([losetup, "--find", "--show", str(image)], capture_output=True, text=True, timeout=30,
                         check=False)
    if res.returncode != 0:
        pytest.skip(f"losetup failed: {res.stderr.strip()}")
    dev = res.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run([losetup, "-d", dev], capture_output=True, timeout=30, check=False)


def test_fuseblk_bmap_syncfs_destroy(fuse_available: None, loop_device: str) -> None:
    ops = BlockFS()
    with testing.mounted(ops, options=f"blockdev={loop_device},blksize=4096") as m:
        found = [(t, src) for mp, t, src in afuse.device.find_mounts() if mp == os.path.realpath(m.path)]
        assert found == [("fuseblk", loop_device)]
        fd = os.open(m.join("data"), os.O_RDONLY)
        try:
            mapped = fcntl.ioctl(fd, FIBMAP, struct.pack("i", 3))
            assert struct.unpack("i", mapped)[0] == 106
            assert ops.bmaps == [(ops.file.ino, 3, 4096)]
            libc.syncfs.argtypes = [ctypes.c_int]
            _check_libc(libc.syncfs(fd), "syncfs")
            assert ops.syncfs_calls >= 1
        finally:
            os.close(fd)
        assert not ops.destroyed
    assert ops.destroyed  # DESTROY came with the unmount
