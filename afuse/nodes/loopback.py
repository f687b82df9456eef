"""A loopback filesystem on nodes (like go-fuse's ``LoopbackNode``): a host directory, node by node.

Each :class:`LoopbackNode` holds an ``O_PATH | O_NOFOLLOW`` descriptor of its host object and is
keyed by its ``(st_dev, st_ino)``: the bridge gives one host inode one nodeid (hard links are one
node), counts lookups and drops (closing the descriptor) what the kernel forgets. Operations are
``*at()`` system calls on such descriptors with a single name component, or go through
``/proc/self/fd/N``, which reaches the object itself without following a symlink: nothing the
tree contains can make the daemon act on a file outside it.

:class:`LoopbackFS` serves it. Run as root, it carries out each request under the caller's
identity (fsuid, fsgid and supplementary groups of the serving thread, switched around each
system call), so permission checks and new files' owners are the host filesystem's. Regular
files open in FUSE passthrough mode when negotiated and permitted (:class:`LoopbackHandle`),
else the daemon serves their reads and writes. POSIX locks are OFD locks on the host file,
one descriptor per lock owner; SETLKW and blocking flock wait in the host kernel, in a worker
thread. ``afuse.examples.passthroughfs`` is its command line.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import platform
import select
import stat
import struct
import threading
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, cast

import attrs

from ..errors import FUSEError, SessionError
from ..passthrough import unavailable_reason
from ..session import current_session
from ..wire import requests as r
from ..wire.constants import INVALID_UIDGID, FOpen, InitFlag
from ..wire.init import Negotiated
from ..wire.types import Attr, FsStats, Lock, Statx, Timestamp
from .bridge import NodeFS
from .caller import _ids, current_caller
from .locks import OFDLockWaits, flock_wait
from .node import DirItem, FDHandle, FileHandle, Node

if TYPE_CHECKING:
    from ..keeper import KeptDescriptors

__all__ = ["LoopbackFS", "LoopbackHandle", "LoopbackNode", "loopback"]

_libc = ctypes.CDLL(None, use_errno=True)
_NR_SETGROUPS = {"x86_64": 116, "aarch64": 159, "riscv64": 159}.get(platform.machine())
AT_FDCWD, AT_SYMLINK_NOFOLLOW, AT_EACCESS, AT_SYMLINK_FOLLOW, AT_EMPTY_PATH = -100, 0x100, 0x200, 0x400, 0x1000
AT_STATX_SYNC_TYPE, STATX_BASIC_STATS, STATX_BTIME = 0x6000, 0x7FF, 0x800
CLONE_FS, UTIME_NOW, UTIME_OMIT = 0x200, (1 << 30) - 1, (1 << 30) - 2
F_OFD_GETLK, F_OFD_SETLK = 36, 37
OFFSET_MAX = (1 << 63) - 1  #: ``fuse_file_lock.end`` of a lock reaching the end of the file
RENAME_FLAGS = 1 | 2 | 4  # NOREPLACE, EXCHANGE, WHITEOUT
_O_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
#: Open flags never passed on to the source: creation is explicit, O_DIRECT needs aligned buffers.
_STRIP_OPEN = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_NOFOLLOW | os.O_DIRECT | os.O_PATH
_FLOCK = struct.Struct("hhxxxxqqixxxx")  # struct flock on 64-bit Linux
_FLOCK_OP = {fcntl.F_RDLCK: fcntl.LOCK_SH, fcntl.F_WRLCK: fcntl.LOCK_EX}  # a lock's type -> flock(2) op
_STATX = struct.Struct("=IIQIIIHxxQQQQ" + "qIxxxx" * 4 + "IIII")


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


def _fn(name: str, *argtypes: type) -> Callable[..., int]:
    f = getattr(_libc, name)
    f.restype, f.argtypes = ctypes.c_int, list(argtypes)
    return cast("Callable[..., int]", f)


_int, _uint, _str = ctypes.c_int, ctypes.c_uint, ctypes.c_char_p
_setfsuid, _setfsgid, _unshare = _fn("setfsuid", _uint), _fn("setfsgid", _uint), _fn("unshare", _int)
_fchownat = _fn("fchownat", _int, _str, _uint, _uint, _int)
_utimensat = _fn("utimensat", _int, _str, ctypes.POINTER(_Timespec), _int)
_linkat = _fn("linkat", _int, _str, _int, _str, _int)
_renameat2 = _fn("renameat2", _int, _str, _int, _str, _uint)
_faccessat = _fn("faccessat", _int, _str, _int, _int)
_fallocate = _fn("fallocate64", _int, _int, ctypes.c_int64, ctypes.c_int64)
_statx = _fn("statx", _int, _str, _int, _uint, _str)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def _check(rc: int, what: str) -> None:
    """Raise the OSError of a failed libc call (``rc`` -1)."""
    if rc < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), what)


def _proc(fd: int) -> bytes:
    """The magic link reaching the object ``fd`` holds (never following a symlink it is)."""
    return b"/proc/self/fd/%d" % fd


def _check_name(name: bytes) -> None:
    if not name or b"/" in name or name in (b".", b".."):
        raise FUSEError(errno.EINVAL, f"invalid name {name!r}")


def _attr(st: os.stat_result) -> Attr:
    a = Attr.from_stat(st)
    if st.st_rdev:  # fuse_attr.rdev is in the kernel's "new" encoding
        major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
        a.rdev = (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)
    return a


def _timespec(ns: int | None, now: bool) -> _Timespec:
    if now:
        return _Timespec(0, UTIME_NOW)
    return _Timespec(0, UTIME_OMIT) if ns is None else _Timespec(ns // 10**9, ns % 10**9)


def _flock_bytes(lock: Lock) -> bytes:
    length = 0 if lock.end >= OFFSET_MAX else lock.end - lock.start + 1
    return _FLOCK.pack(lock.type, os.SEEK_SET, lock.start, length, 0)


def _raise_fd_limit() -> None:
    """Every known inode holds a descriptor: allow as many as the hard limit does."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    hard = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    with contextlib.suppress(ValueError, OSError):
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class _Credentials:
    """Switches the calling thread's fsuid, fsgid and supplementary groups (all per-thread)."""

    def __init__(self, enabled: bool) -> None:
        self.uid, self.gid, self.groups = os.geteuid(), os.getegid(), os.getgroups()
        self.enabled = enabled and _NR_SETGROUPS is not None

    def _setgroups(self, groups: Sequence[int]) -> None:
        # setgroups(2) itself: glibc's wrapper would change every thread of the process.
        arr = (ctypes.c_uint * max(len(groups), 1))(*groups)
        _check(int(_syscall(ctypes.c_long(_NR_SETGROUPS or -1), ctypes.c_long(len(groups)), arr)), "setgroups")

    def caller(self) -> contextlib.AbstractContextManager[None]:
        """A context running its block as the current request's caller (no ``await`` inside!)."""
        c = _ids()
        if not self.enabled or c.uid == INVALID_UIDGID or (c.uid == self.uid and c.gid == self.gid):
            return _AS_IS
        return self._as(c.uid, c.gid, current_caller().groups)

    @contextlib.contextmanager
    def _as(self, uid: int, gid: int, groups: Sequence[int]) -> Iterator[None]:
        try:
            self._setgroups(groups)
            _setfsgid(gid)
            _setfsuid(uid)
            if _setfsuid(0xFFFFFFFF) != uid:  # setfsuid reports failure only this way
                raise PermissionError(errno.EPERM, "cannot switch to the caller's credentials")
            yield
        finally:  # fsuid first: it restores the capabilities
            _setfsuid(self.uid)
            _setfsgid(self.gid)
            with contextlib.suppress(OSError):
                self._setgroups(self.groups)


_AS_IS = contextlib.nullcontext()


class _LockFd:
    """The descriptor carrying one lock owner's POSIX locks on one inode (as OFD locks); ``kept``:
    its tag in the failover keeper, which keeps a copy so that the locks outlive the daemon."""

    __slots__ = ("fd", "kept", "pid")

    def __init__(self, fd: int, pid: int, kept: str | None = None) -> None:
        self.fd, self.pid, self.kept = fd, pid, kept

    def close(self, keeper: KeptDescriptors | None) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
        if self.kept is not None and keeper is not None:
            keeper.unkeep(self.kept)


class LoopbackNode(Node):
    """A host object of ``fs``, by ``O_PATH`` descriptor ``fd`` (closed when the bridge drops the node);
    ``key`` is ``fs.node_key(fd, st)`` if the caller has it already."""

    __slots__ = ("_fresh", "fd", "fs", "locks")  # one is made per create and lookup: no instance dict needed

    def __init__(self, fs: LoopbackFS, fd: int, st: os.stat_result, key: Hashable | None = None) -> None:
        super().__init__(st.st_mode, key=fs.node_key(fd, st) if key is None else key, ino=st.st_ino)
        self.fs, self.fd = fs, fd
        self._fresh: os.stat_result | None = st  # answers the getattr of the entry being built
        #: Lock owner -> its OFD lock descriptor (None until the first lock).
        self.locks: dict[int, _LockFd] | None = None

    @property
    def fopen(self) -> int:
        """FOPEN flags of OPENDIR: the directory cache, if the filesystem allows it."""
        return self.fs.dir_fopen

    def forgotten(self) -> None:
        """Close the descriptors."""
        if self.locks:
            for lf in self.locks.values():
                lf.close(self.fs.keeper)
        self.locks = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _at(self, name: bytes) -> LoopbackNode:
        """The node of ``name`` in this directory (the live one if the kernel knows the inode)."""
        st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        live = self.fs.node_by_key((st.st_dev, st.st_ino))
        if isinstance(live, LoopbackNode):  # no descriptor to open
            live._fresh = st
            return live
        return self.fs.adopt(os.open(name, _O_PATH, dir_fd=self.fd))

    # -- attributes ------------------------------------------------------------------------

    async def getattr(self) -> Attr:
        """fstat of the descriptor."""
        st, self._fresh = self._fresh, None
        return _attr(st if st is not None else os.fstat(self.fd))

    async def setattr(self, changes: r.SetattrRequest) -> Attr:
        """chmod, chown, truncate, utimes."""
        return self.set(changes, None)

    def set(self, changes: r.SetattrRequest, fd: int | None) -> Attr:
        """SETATTR on the node, through the open file ``fd`` where there is one."""
        as_caller, path = self.fs.creds.caller, _proc(self.fd)
        if changes.mode is not None:
            mode, current = stat.S_IMODE(changes.mode), stat.S_IMODE(os.fstat(self.fd).st_mode)
            # The kernel clears set-id bits itself when someone else writes or truncates
            # (ATTR_KILL_SUID, forced past permission checks): only that is done with the
            # daemon's rights, anything else with the caller's.
            kill_only = mode != current and mode == current & ~(stat.S_ISUID | stat.S_ISGID)
            with contextlib.nullcontext() if kill_only else as_caller():
                os.chmod(path, mode) if fd is None else os.fchmod(fd, mode)
        with as_caller():
            if changes.new_uid is not None or changes.new_gid is not None:
                uid = 0xFFFFFFFF if changes.new_uid is None else changes.new_uid
                gid = 0xFFFFFFFF if changes.new_gid is None else changes.new_gid
                _check(_fchownat(self.fd, b"", uid, gid, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW), "fchownat")
            if changes.size is not None:
                os.truncate(path, changes.size) if fd is None else os.ftruncate(fd, changes.size)
            if changes.atime_ns is not None or changes.mtime_ns is not None or changes.atime_now or changes.mtime_now:
                ts = (_Timespec * 2)(_timespec(changes.atime_ns, changes.atime_now),
                                     _timespec(changes.mtime_ns, changes.mtime_now))
                _check(_utimensat(self.fd, b"", ts, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW), "utimensat")
        return _attr(os.fstat(self.fd))

    async def readlink(self) -> bytes:
        """The symlink's target."""
        return os.readlink(b"", dir_fd=self.fd)

    async def access(self, mask: int) -> None:
        """faccessat as the caller."""
        with self.fs.creds.caller():
            _check(_faccessat(AT_FDCWD, _proc(self.fd), mask, AT_EACCESS), "faccessat")

    async def statfs(self) -> FsStats:
        """statvfs of the host filesystem."""
        return FsStats.from_statvfs(os.fstatvfs(self.fd))

    async def getxattr(self, name: bytes) -> bytes:
        """An extended attribute."""
        if name == b"security.capability":
            # The kernel asks this before every write (to drop file capabilities); its value
            # is the same whoever reads it: skip switching to the caller's credentials.
            return os.getxattr(_proc(self.fd), name)
        with self.fs.creds.caller():
            return os.getxattr(_proc(self.fd), name)

    async def setxattr(self, name: bytes, value: bytes, flags: int) -> None:
        """Set an extended attribute."""
        with self.fs.creds.caller():
            os.setxattr(_proc(self.fd), name, value, flags)

    async def listxattr(self) -> list[bytes]:
        """Extended attribute names."""
        with self.fs.creds.caller():
            return [os.fsencode(n) for n in os.listxattr(_proc(self.fd))]

    async def removexattr(self, name: bytes) -> None:
        """Remove an extended attribute."""
        with self.fs.creds.caller():
            os.removexattr(_proc(self.fd), name)

    # -- directories -----------------------------------------------------------------------

    async def lookup(self, name: bytes) -> Node | None:
        """The child ``name`` (None if there is none)."""
        _check_name(name)
        try:
            with self.fs.creds.caller():
                return self._at(name)
        except FileNotFoundError:
            return None  # the bridge answers ENOENT, or a negative entry

    async def readdir(self) -> list[DirItem]:
        """The host directory's entries."""
        with self.fs.creds.caller(), os.scandir(_proc(self.fd)) as it:  # opened as the caller
            return [DirItem(e.name, _dtype(e), e.inode()) for e in it]

    async def create(self, name: bytes, flags: int, mode: int) -> tuple[Node, FileHandle]:
        """Create and open a regular file (never through a symlink)."""
        _check_name(name)
        flags = (flags & ~_STRIP_OPEN) | (flags & os.O_EXCL) | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        with self.fs.creating():
            fd = os.open(name, flags, stat.S_IMODE(mode), dir_fd=self.fd)
        return self.fs.new_file(fd)

    async def tmpfile(self, flags: int, mode: int) -> tuple[Node, FileHandle]:
        """Create and open an unnamed file (O_TMPFILE)."""
        flags = (flags & ~_STRIP_OPEN) | (flags & os.O_EXCL) | os.O_TMPFILE | os.O_CLOEXEC
        with self.fs.creating():
            fd = os.open(_proc(self.fd), flags, stat.S_IMODE(mode))
        return self.fs.new_file(fd)

    async def mkdir(self, name: bytes, mode: int) -> Node:
        """A new directory."""
        _check_name(name)
        with self.fs.creating():
            os.mkdir(name, stat.S_IMODE(mode), dir_fd=self.fd)
            return self._at(name)

    async def mknod(self, name: bytes, mode: int, rdev: int) -> Node:
        """A new file, fifo, socket or device node (``rdev`` in the kernel's encoding)."""
        _check_name(name)
        dev = os.makedev((rdev & 0xFFF00) >> 8, (rdev & 0xFF) | ((rdev >> 12) & 0xFFF00))
        with self.fs.creating():
            os.mknod(name, mode, dev, dir_fd=self.fd)
            return self._at(name)

    async def symlink(self, name: bytes, target: bytes) -> Node:
        """A new symlink."""
        _check_name(name)
        with self.fs.creating():
            os.symlink(target, name, dir_fd=self.fd)
            return self._at(name)

    async def link(self, name: bytes, node: Node) -> Node:
        """A hard link to ``node``."""
        _check_name(name)
        if not isinstance(node, LoopbackNode):
            raise FUSEError(errno.EXDEV)
        with self.fs.creds.caller():
            # linkat(AT_EMPTY_PATH) needs CAP_DAC_READ_SEARCH; the magic link does not, and
            # following it lands on the object itself (a symlink stays a symlink).
            _check(_linkat(AT_FDCWD, _proc(node.fd), self.fd, name, AT_SYMLINK_FOLLOW), "linkat")
        return node

    async def unlink(self, name: bytes) -> None:
        """Remove a name."""
        _check_name(name)
        with self.fs.creds.caller():
            os.unlink(name, dir_fd=self.fd)

    async def rmdir(self, name: bytes) -> None:
        """Remove an empty directory."""
        _check_name(name)
        with self.fs.creds.caller():
            os.rmdir(name, dir_fd=self.fd)

    async def rename(self, name: bytes, newparent: Node, newname: bytes, flags: int) -> None:
        """rename(2), or renameat2(2) with ``flags``."""
        _check_name(name)
        _check_name(newname)
        if flags & ~RENAME_FLAGS:
            raise FUSEError(errno.EINVAL)
        if not isinstance(newparent, LoopbackNode):
            raise FUSEError(errno.EXDEV)
        with self.fs.creds.caller():
            if flags:
                _check(_renameat2(self.fd, name, newparent.fd, newname, flags), "renameat2")
            else:
                os.rename(name, newname, src_dir_fd=self.fd, dst_dir_fd=newparent.fd)

    async def open(self, flags: int) -> FileHandle:
        """Open the file again as the caller, through the magic link."""
        with self.fs.creds.caller():
            fd = os.open(_proc(self.fd), (flags & ~_STRIP_OPEN) | os.O_CLOEXEC)
        return self.fs.handle_of(fd, self)


def _dtype(e: os.DirEntry[bytes]) -> int:
    if e.is_file(follow_symlinks=False):
        return stat.S_IFREG
    if e.is_dir(follow_symlinks=False):
        return stat.S_IFDIR
    if e.is_symlink():
        return stat.S_IFLNK
    return stat.S_IFMT(e.stat(follow_symlinks=False).st_mode)


class LoopbackHandle(FDHandle):
    """An open host file of ``node``, descriptor ``fd``: the bridge serves reads, writes and fsync
    with it, or hands it to the kernel (passthrough) when the filesystem negotiated that."""

    __slots__ = ("fd", "kept", "node")  # one is made per open and create

    def __init__(self, node: LoopbackNode, fd: int, fopen: FOpen | int = 0) -> None:
        super().__init__(fd, fopen)
        self.node, self.fd = node, fd
        #: Its tag in the failover keeper while it holds a flock lock (see LoopbackFS.attach_keeper).
        self.kept: str | None = None

    async def release(self) -> None:
        """Close the descriptor (and the keeper's copy)."""
        if self.kept is not None and self.node.fs.keeper is not None:
            self.node.fs.keeper.unkeep(self.kept)
            self.kept = None
        fd = self.backing_fd  # FDHandle.release, without the super() call
        if fd is not None:
            self.backing_fd = None
            os.close(fd)

    async def flush(self) -> None:
        """Close a duplicate, so the source sees a close (NFS-style close-to-open, errors)."""
        os.close(os.dup(self.fd))

    async def setattr(self, changes: r.SetattrRequest) -> Attr:
        """ftruncate, fchmod, ... through this open file."""
        return self.node.set(changes, self.fd)

    async def fallocate(self, offset: int, length: int, mode: int) -> None:
        """fallocate(2)."""
        _check(_fallocate(self.fd, mode, offset, length), "fallocate")

    async def lseek(self, offset: int, whence: int) -> int:
        """SEEK_DATA / SEEK_HOLE."""
        return os.lseek(self.fd, offset, whence)

    async def copy_file_range(self, offset: int, out: FileHandle | None, out_offset: int,
                              length: int, flags: int) -> int:
        """copy_file_range(2) between host files."""
        if flags or not isinstance(out, LoopbackHandle):
            raise FUSEError(errno.EINVAL)
        return os.copy_file_range(self.fd, out.fd, length, offset, out_offset)

    async def ioctl(self, req: r.IoctlRequest) -> Any:
        """No ioctls."""
        raise FUSEError(errno.ENOTTY)

    async def poll(self, req: r.PollRequest) -> int:
        """Host files are always ready."""
        return select.POLLIN | select.POLLOUT | select.POLLRDNORM | select.POLLWRNORM

    def _lock_fd(self, owner: int, pid: int) -> _LockFd:
        """The descriptor holding ``owner``'s POSIX locks on the node (one OFD per owner)."""
        locks = self.node.locks
        if locks is None:
            locks = self.node.locks = {}
        lf = locks.get(owner)
        if lf is None:
            try:
                fd = os.open(_proc(self.fd), os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                fd = os.open(_proc(self.fd), (fcntl.fcntl(self.fd, fcntl.F_GETFL) & os.O_ACCMODE) | os.O_CLOEXEC)
            lf = locks[owner] = _LockFd(fd, pid)
        elif pid:
            lf.pid = pid
        return lf

    async def getlk(self, req: r.GetlkRequest) -> Lock:
        """A conflicting lock and its holder's pid (the owner that does not see it as a conflict)."""
        lf = self._lock_fd(req.owner, req.lock.pid)
        locks = self.node.locks or {}
        query = _flock_bytes(req.lock)
        res = fcntl.fcntl(lf.fd, F_OFD_GETLK, query)
        typ, _, start, length, _ = _FLOCK.unpack(res)
        if typ == fcntl.F_UNLCK:
            return Lock(0, 0, fcntl.F_UNLCK, 0)
        pid = next((o.pid for owner, o in locks.items()
                    if owner != req.owner and fcntl.fcntl(o.fd, F_OFD_GETLK, query) != res), 0)
        return Lock(start, start + length - 1 if length else OFFSET_MAX, typ, pid)

    async def setlk(self, req: r.SetlkRequest) -> None:
        """An OFD lock for the lock owner; SETLKW waits for it in the host kernel (in a worker
        thread, which an INTERRUPT stops)."""
        if req.lock.type == fcntl.F_UNLCK and req.owner not in (self.node.locks or {}):
            return
        lf = self._lock_fd(req.owner, req.lock.pid)
        keeper = self.node.fs.keeper
        if keeper is not None and lf.kept is None and req.lock.type != fcntl.F_UNLCK:
            lf.kept = keeper.tag("p", self.node._nodeid, req.owner, lf.pid)
            await keeper.keep(lf.kept, lf.fd)  # before the lock: it must outlive this daemon
        assert self.node.locks is not None
        await self.node.fs.lock_waits.setlk(self.node.locks, req.owner, _flock_bytes(req.lock), req.sleep)

    async def flock(self, req: r.SetlkRequest) -> None:
        """flock(2) on the open file; a blocking one waits in the host kernel as SETLKW does."""
        op = _FLOCK_OP.get(req.lock.type, fcntl.LOCK_UN)
        keeper = self.node.fs.keeper
        if op == fcntl.LOCK_UN:
            fcntl.flock(self.fd, op)
            if self.kept is not None and keeper is not None:
                keeper.unkeep(self.kept)
                self.kept = None
            return
        if keeper is not None and self.kept is None:
            self.kept = keeper.tag("f", req.fh)
            await keeper.keep(self.kept, self.fd)  # before the lock: it must outlive this daemon
        try:
            fcntl.flock(self.fd, op | fcntl.LOCK_NB)
        except BlockingIOError:
            if not req.sleep:
                raise
            await flock_wait(self.fd, op)  # tries once more, then waits in a worker thread


class LoopbackFS(NodeFS):
    """Mirror the directory ``source`` (``afuse.mount(LoopbackFS(source), path)``).

    ``timeout`` is the entry and attribute cache time (seconds), ``negative_timeout`` how long
    the kernel may remember that a name does not exist, ``cache_dir`` lets it cache listings
    (until the directory's mtime changes), ``keep_cache`` lets it keep a file's cached pages
    across opens (FOPEN_KEEP_CACHE; dropped when the file's mtime or size is seen to change):
    the defaults (0, 0, False, False) keep the mount coherent with changes made directly in the
    source; caching trades that for speed.
    ``switch_credentials`` (default: when running as root) performs each request with the
    caller's fsuid/fsgid/groups. ``passthrough`` (default True) opens regular files in FUSE
    passthrough mode when negotiated (``InitConfig(passthrough=True)``) and BACKING_OPEN is
    permitted; :attr:`passthrough_unavailable` says why not.
    """

    #: Where passthrough's availability is logged.
    log = logging.getLogger("afuse.loopback")
    #: The class of this filesystem's nodes (a subclass may add to what they do).
    node_class: type[LoopbackNode] = LoopbackNode

    def __init__(self, source: str | os.PathLike[str], *, timeout: float = 0.0, negative_timeout: float = 0.0,
                 cache_dir: bool = False, switch_credentials: bool | None = None, passthrough: bool = True,
                 keep_cache: bool = False) -> None:
        self.source = os.fspath(source)
        #: FOPEN flags of every open regular file (KEEP_CACHE with ``keep_cache``).
        self.file_fopen = int(FOpen.KEEP_CACHE) if keep_cache else 0
        self.passthrough = passthrough
        #: Why passthrough is not used (None while it is, or before INIT).
        self.passthrough_unavailable: str | None = None
        self.entry_timeout = self.attr_timeout = float(timeout)
        self.negative_timeout = float(negative_timeout)
        self.dir_fopen = int(FOpen.CACHE_DIR | FOpen.KEEP_CACHE) if cache_dir else 0
        self.creds = _Credentials(os.geteuid() == 0 if switch_credentials is None else switch_credentials)
        #: Lock owners waiting in SETLKW (for EDEADLK).
        self.lock_waits = OFDLockWaits()
        #: Failover: where descriptors holding locks are kept (see :meth:`attach_keeper`).
        self.keeper: KeptDescriptors | None = None
        self._thread = threading.local()  # ``private``: the thread's umask is its own (and 0)
        _raise_fd_limit()
        fd = os.open(self.source, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        root = self.node_class(self, fd, os.fstat(fd))
        root._fresh = None  # its getattr comes later
        super().__init__(root, types=[self.node_class, LoopbackHandle])

    @property
    def inode_count(self) -> int:
        """How many inodes (the root included) the kernel currently holds."""
        return len(self.nodes)

    def close(self) -> None:
        """Close every descriptor the nodes hold (after unmounting)."""
        for node in list(self.nodes.values()):
            if isinstance(node, LoopbackNode):
                node.forgotten()
        self.nodes.clear()

    def adopt(self, fd: int) -> LoopbackNode:
        """The node of the object at O_PATH descriptor ``fd`` (closed if that node is live)."""
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        key = self.node_key(fd, st)
        live = self._by_key.get(key)  # self.node_by_key(key)
        if isinstance(live, LoopbackNode):
            os.close(fd)
            live._fresh = st
            return live
        return self.node_class(self, fd, st, key)

    def reopened(self, fd: int, st: os.stat_result) -> LoopbackNode:
        """A node for the object at O_PATH descriptor ``fd`` (with stat ``st``) found again by
        ``restore_node`` after a restart: its first getattr asks the source (``st`` may be old by then)."""
        node = self.node_class(self, fd, st)
        node._fresh = None
        return node

    def attach_keeper(self, keeper: KeptDescriptors) -> None:
        """Failover (called by ``serve_failover``): keep each descriptor holding locks (a lock
        owner's OFD descriptor, an open file holding a flock lock) in the keeper too, so that the
        locks outlive this daemon; take back those a predecessor kept (after the restore)."""
        self.keeper = keeper
        taken, keeper.taken = keeper.taken, {}
        for tag, fd in taken.items():
            if not self._take_back(tag, fd):
                os.close(fd)
                keeper.unkeep(tag)

    def _take_back(self, tag: str, fd: int) -> bool:
        kind, *rest = tag.split()
        if kind == "p":  # a lock owner's OFD descriptor: "p NODEID OWNER PID ..."
            nodeid, owner, pid = int(rest[0]), int(rest[1]), int(rest[2])
            node = self.nodes.get(nodeid)
            if not isinstance(node, LoopbackNode) or owner in (node.locks or {}):
                return False
            node.locks = node.locks or {}
            node.locks[owner] = _LockFd(fd, pid, tag)
            return True
        if kind == "f":  # an open file holding a flock lock: "f FH ..."; it becomes that fh's handle
            fh = int(rest[0])
            pending = self._pending.get(fh)
            node = None if pending is None else self.nodes.get(pending[0])
            if pending is None or not isinstance(node, LoopbackNode):
                return False
            del self._pending[fh]
            h = self.handle_of(fd, node)
            h.kept = tag
            self._handles[fh], self._fh_flags[fh] = (node, h), pending[1]
            return True
        return False

    def node_key(self, fd: int, st: os.stat_result) -> Hashable:
        """The identity of the object at ``fd``: ``(st_dev, st_ino)``; a failover-capable
        subclass returns one a successor can reopen (e.g. a file handle, see ``restore_node``)."""
        return (st.st_dev, st.st_ino)

    def new_file(self, fd: int) -> tuple[LoopbackNode, LoopbackHandle]:
        """Node and handle of a file just created, open at ``fd`` (closed on failure)."""
        try:
            node = self.adopt(os.open(b"/proc/self/fd/%d" % fd, os.O_PATH | os.O_CLOEXEC))  # _proc(fd)
        except BaseException:
            os.close(fd)
            raise
        return node, self.handle_of(fd, node)

    def handle_of(self, fd: int, node: LoopbackNode) -> LoopbackHandle:
        """The handle of ``node`` open at ``fd`` (passthrough when available)."""
        return LoopbackHandle(node, fd, self.file_fopen)

    def creating(self) -> contextlib.AbstractContextManager[None]:
        """As the caller, with umask 0: the kernel has applied the caller's umask already."""
        private = getattr(self._thread, "private", None)
        if private is None:  # give this thread its own umask (and cwd and root) once, set to 0
            private = self._thread.private = _unshare(CLONE_FS) == 0
            if private:
                os.umask(0)
        return self.creds.caller() if private else self._umask0()

    @contextlib.contextmanager
    def _umask0(self) -> Iterator[None]:
        old = os.umask(0)  # the process-wide umask, briefly
        try:
            with self.creds.caller():
                yield
        finally:
            os.umask(old)

    # -- Operations the bridge leaves to the filesystem ---------------------------------------

    def init(self, negotiated: Negotiated) -> None:
        """Find out whether regular files can be opened in passthrough mode (else the bridge
        is told passthrough was not negotiated: it serves reads and writes itself)."""
        self.passthrough_unavailable = None
        if self._passthrough_usable(negotiated):
            super().init(negotiated)
        else:
            super().init(attrs.evolve(negotiated, flags=negotiated.flags & ~InitFlag.PASSTHROUGH))

    def _passthrough_usable(self, negotiated: Negotiated) -> bool:
        if not self.passthrough:
            return self._no_passthrough("disabled (LoopbackFS(passthrough=False))", logging.INFO)
        if not negotiated.has(InitFlag.PASSTHROUGH):
            if negotiated.offered & InitFlag.PASSTHROUGH:
                return self._no_passthrough("not asked for at INIT (InitConfig(passthrough=True) enables it)",
                                            logging.INFO)
            return self._no_passthrough("kernel did not offer FUSE_PASSTHROUGH", logging.WARNING)
        try:  # try BACKING_OPEN once, on an anonymous regular file: privileged enough?
            session = current_session()
            probe = os.memfd_create("afuse-passthrough-probe", os.MFD_CLOEXEC)
        except SessionError as e:
            return self._no_passthrough(str(e), logging.WARNING)
        try:
            session.open_backing(probe).release()
        except OSError as e:
            return self._no_passthrough(unavailable_reason(e), logging.WARNING)
        finally:
            os.close(probe)
        self.log.info("passthrough: regular files are read and written by the kernel on the host files")
        return True

    def _no_passthrough(self, why: str, level: int) -> bool:
        self.passthrough_unavailable = why
        self.log.log(level, "passthrough unavailable: %s; serving reads and writes in the daemon", why)
        return False

    async def opendir(self, req: r.OpendirRequest) -> Any:
        """OPENDIR: the caller must be able to open the source directory."""
        node = self.node(req.nodeid)
        if isinstance(node, LoopbackNode):
            with self.creds.caller():
                os.close(os.open(_proc(node.fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        return await super().opendir(req)

    async def flush(self, req: r.FlushRequest) -> None:
        """FLUSH: a close() drops the closing process's POSIX locks on the file."""
        node = self._nodes.get(req.nodeid)
        if isinstance(node, LoopbackNode) and node.locks:
            lf = node.locks.pop(req.lock_owner, None)
            if lf is not None:
                lf.close(self.keeper)
        got = self._handles.get(req.fh)
        h = got[1] if got is not None else None
        if type(h) is LoopbackHandle:  # the hot path, straight to the descriptor
            os.close(os.dup(h.fd))
        else:
            await super().flush(req)

    async def getattr(self, req: r.GetattrRequest) -> Attr:
        """GETATTR: fstat of a plain :class:`LoopbackNode`'s descriptor without the bridge's detour."""
        node = self._nodes.get(req.nodeid)
        if type(node) is LoopbackNode:
            node._fresh = None
            return _attr(os.fstat(node.fd))
        return await super().getattr(req)

    async def getxattr(self, req: r.GetxattrRequest) -> bytes:
        """GETXATTR; ``security.capability``, which the kernel asks before every write, is read
        straight away (its value is the same for every caller)."""
        node = self.nodes.get(req.nodeid)
        if req.name == b"security.capability" and isinstance(node, LoopbackNode):
            return os.getxattr(_proc(node.fd), req.name)
        return await super().getxattr(req)

    async def statx(self, req: r.StatxRequest) -> Statx:
        """STATX: statx(2) of the descriptor (btime included)."""
        node = self.node(req.nodeid)
        if not isinstance(node, LoopbackNode):
            raise FUSEError(errno.ESTALE)
        buf = ctypes.create_string_buffer(256)
        flags = AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW | (req.sx_flags & AT_STATX_SYNC_TYPE)
        _check(_statx(node.fd, b"", flags, req.mask | STATX_BASIC_STATS | STATX_BTIME, buf), "statx")
        v = _STATX.unpack_from(buf.raw)
        return Statx(v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9], v[10],
                     Timestamp(v[11], v[12]), Timestamp(v[13], v[14]), Timestamp(v[15], v[16]),
                     Timestamp(v[17], v[18]), v[19], v[20], v[21], v[22])


def loopback(path: str) -> LoopbackFS:
    """A filesystem mirroring directory ``path`` (a factory for ``afuse.testing`` and benchmarks)."""
    return LoopbackFS(path)
