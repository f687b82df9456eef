"""passthroughfs on the low-level :class:`afuse.Operations` API, in the manner of libfuse's
passthrough_hp: the reference the node-based :mod:`afuse.examples.passthroughfs` (and
failoverfs, which is that with failover on) is benchmarked against.

Every inode the kernel knows is an ``O_PATH | O_NOFOLLOW`` descriptor of the source object,
keyed by its ``(st_dev, st_ino)``, so one source inode always has one nodeid. All operations are
``*at()`` system calls relative to such descriptors with a single path component, or go through
``/proc/self/fd/N``, which reaches the object the descriptor holds without following a symlink:
nothing the source tree contains can make the daemon act on a file outside it.

Run as root, each request is carried out under the caller's identity: the serving thread's
fsuid, fsgid and supplementary groups are switched to the caller's for the system call (these are
per-thread credentials; the switch is synchronous, without an ``await`` inside). Files are created
owned by the caller, and permission checks (EACCES, EPERM, sticky directories) are the source
filesystem's, with or without ``-o default_permissions``. Mount with ``-o allow_other`` to let
other users in. Run as another user, everything happens with that user's rights.

Attributes report the source's inode numbers, so ``stat`` through the mount and on the source
agree. Directory offsets are the source's own ``d_off`` cookies.

The mount is coherent with the source by default: names, attributes and listings are not cached
by the kernel (entry and attribute timeouts 0, no directory cache), so a change made directly in
SOURCE shows in the mount at once. ``--timeout SECONDS`` and ``--cache-dir`` trade that
coherence for speed: the kernel then keeps names and attributes for that long, and directory
listings until the directory's mtime changes, and may show stale results meanwhile.

Regular files are opened in FUSE passthrough mode where the kernel and privileges allow it
(FUSE_PASSTHROUGH negotiated, which the command line asks for unless ``--no-passthrough``, and
BACKING_OPEN permitted: CAP_SYS_ADMIN in the initial user namespace): the kernel then reads,
writes and maps them on the source file itself, without READ or WRITE requests. Otherwise one
log line says why and the daemon serves reads and writes itself. An inode is open either in
passthrough mode or not, never both: every open of a regular file uses passthrough (with the
inode's one backing registration) while it is available, other files never do.
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
import time
from collections.abc import Callable, Iterator, Sequence
from typing import cast

from afuse.errors import FUSEError, SessionError
from afuse.nodes.locks import OFDLockWaits, flock_wait
from afuse.operations import DirEntries, Operations
from afuse.passthrough import BackingFile, unavailable_reason
from afuse.session import Session, current_session
from afuse.splice import FileRange
from afuse.wire import requests as r
from afuse.wire.constants import ROOT_ID, FOpen, InitFlag
from afuse.wire.init import Negotiated
from afuse.wire.types import Attr, DirEntry, Entry, FsStats, Handle, IoctlReply, Lock, Statx, Timestamp

log = logging.getLogger("afuse.passthroughfs")

# -- system interface ----------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)

#: Raw system call numbers this module needs, per architecture.
_SYSCALLS: dict[str, dict[str, int]] = {
    "x86_64": {"getdents64": 217, "setgroups": 116},
    "aarch64": {"getdents64": 61, "setgroups": 159},
    "riscv64": {"getdents64": 61, "setgroups": 159},
}
_SYS = _SYSCALLS.get(platform.machine(), {})

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_EACCESS = 0x200
AT_SYMLINK_FOLLOW = 0x400
AT_EMPTY_PATH = 0x1000
AT_STATX_SYNC_TYPE = 0x6000
CLONE_FS = 0x200
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
STATX_BASIC_STATS = 0x7FF
STATX_BTIME = 0x800
F_OFD_GETLK = 36
F_OFD_SETLK = 37
#: ``fuse_file_lock.end`` of a lock reaching the end of the file.
OFFSET_MAX = (1 << 63) - 1
RENAME_FLAGS = 1 | 2 | 4  # NOREPLACE, EXCHANGE, WHITEOUT

_O_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
#: Open flags never passed on to the source: creation is explicit, O_DIRECT needs aligned buffers.
_STRIP_OPEN = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_NOFOLLOW | os.O_DIRECT | os.O_PATH
_FLOCK = struct.Struct("hhxxxxqqixxxx")  # struct flock on 64-bit Linux
_DIRENT64 = struct.Struct("=QqHB")  # linux_dirent64 up to d_type; the name follows at 19
_STATX = struct.Struct("=IIQIIIHxxQQQQ" + "qIxxxx" * 4 + "IIII")


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


def _fn(name: str, restype: type, *argtypes: type) -> Callable[..., int]:
    f = getattr(_libc, name)
    f.restype = restype
    f.argtypes = list(argtypes)
    return cast("Callable[..., int]", f)


_c_int, _c_uint, _c_char_p = ctypes.c_int, ctypes.c_uint, ctypes.c_char_p
_setfsuid = _fn("setfsuid", _c_int, _c_uint)
_setfsgid = _fn("setfsgid", _c_int, _c_uint)
_unshare = _fn("unshare", _c_int, _c_int)
_fchownat = _fn("fchownat", _c_int, _c_int, _c_char_p, _c_uint, _c_uint, _c_int)
_utimensat = _fn("utimensat", _c_int, _c_int, _c_char_p, ctypes.POINTER(_Timespec), _c_int)
_linkat = _fn("linkat", _c_int, _c_int, _c_char_p, _c_int, _c_char_p, _c_int)
_renameat2 = _fn("renameat2", _c_int, _c_int, _c_char_p, _c_int, _c_char_p, _c_uint)
_faccessat = _fn("faccessat", _c_int, _c_int, _c_char_p, _c_int, _c_int)
_fallocate = _fn("fallocate64", _c_int, _c_int, _c_int, ctypes.c_int64, ctypes.c_int64)
_statx = _fn("statx", _c_int, _c_int, _c_char_p, _c_int, _c_uint, ctypes.c_char_p)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def _check(rc: int, what: str = "") -> None:
    """Raise the OSError of a failed libc call (``rc`` -1)."""
    if rc < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), what or None)


def _proc(fd: int) -> bytes:
    """The magic link that reaches the object ``fd`` holds (never following a symlink it is)."""
    return b"/proc/self/fd/%d" % fd


def _encode_dev(dev: int) -> int:
    """A device number in the kernel's "new" encoding, as fuse_attr.rdev carries it."""
    major, minor = os.major(dev), os.minor(dev)
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def _decode_dev(dev: int) -> int:
    """The kernel's "new" device encoding (MKNOD's rdev) as an ``os.makedev`` number."""
    return os.makedev((dev & 0xFFF00) >> 8, (dev & 0xFF) | ((dev >> 12) & 0xFFF00))


def _getdents(fd: int, size: int) -> list[tuple[bytes, int, int, int]]:
    """Read entries at ``fd``'s position: ``(name, d_ino, d_off, d_type)`` each."""
    nr = _SYS.get("getdents64")
    if nr is None:
        raise FUSEError(errno.ENOSYS, f"getdents64 number unknown on {platform.machine()}")
    buf = ctypes.create_string_buffer(size)
    n = int(_syscall(ctypes.c_long(nr), ctypes.c_long(fd), buf, ctypes.c_long(size)))
    _check(n, "getdents64")
    raw = buf.raw
    out = []
    pos = 0
    while pos < n:
        ino, off, reclen, typ = _DIRENT64.unpack_from(raw, pos)
        end = raw.index(b"\0", pos + 19)
        out.append((raw[pos + 19 : end], ino, off, typ))
        pos += reclen
    return out


def _flock_bytes(lock: Lock) -> bytes:
    length = 0 if lock.end >= OFFSET_MAX else lock.end - lock.start + 1
    return _FLOCK.pack(lock.type, os.SEEK_SET, lock.start, length, 0)


def _raise_fd_limit() -> None:
    """Every known inode holds a descriptor: allow as many as the hard limit does."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = 1 << 20
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


# -- caller credentials ----------------------------------------------------------------------------


class _Credentials:
    """Switches the calling thread's fsuid, fsgid and supplementary groups (all per-thread)."""

    #: How long the supplementary groups read for a pid are reused (seconds).
    GROUPS_TTL = 1.0
    MAX_CACHED = 4096

    def __init__(self, enabled: bool) -> None:
        self.uid = os.geteuid()
        self.gid = os.getegid()
        self.groups = os.getgroups()
        self.enabled = enabled and "setgroups" in _SYS
        self._cache: dict[tuple[int, int, int], tuple[float, list[int]]] = {}
        self._nr_setgroups = ctypes.c_long(_SYS.get("setgroups", -1))

    def groups_of(self, pid: int, uid: int, gid: int) -> list[int]:
        """The supplementary groups of thread ``pid`` (none if it cannot be read)."""
        now = time.monotonic()
        key = (pid, uid, gid)
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        groups: list[int] = []
        if pid > 0:
            try:
                with open(f"/proc/{pid}/status", "rb") as f:
                    for line in f:
                        if line.startswith(b"Groups:"):
                            groups = [int(g) for g in line[7:].split()]
                            break
            except (OSError, ValueError):
                groups = []
        if len(self._cache) >= self.MAX_CACHED:
            self._cache.clear()
        self._cache[key] = (now + self.GROUPS_TTL, groups)
        return groups

    def _setgroups(self, groups: Sequence[int]) -> None:
        # setgroups(2) itself: glibc's wrapper would change every thread of the process.
        arr = (ctypes.c_uint * max(len(groups), 1))(*groups)
        rc = int(_syscall(self._nr_setgroups, ctypes.c_long(len(groups)), arr))
        _check(rc, "setgroups")

    def switch(self, uid: int, gid: int, groups: Sequence[int]) -> None:
        """Become ``uid``/``gid`` with ``groups`` for file access; raises if that did not happen."""
        try:
            self._setgroups(groups)
            _setfsgid(gid)
            _setfsuid(uid)
            # setfsuid reports nothing; given an invalid id it returns the current one.
            if _setfsuid(0xFFFFFFFF) != uid:
                raise PermissionError(errno.EPERM, "cannot switch to the caller's credentials")
        except BaseException:
            self.restore()
            raise

    def restore(self) -> None:
        """Back to the daemon's own credentials (fsuid first: it restores the capabilities)."""
        _setfsuid(self.uid)
        _setfsgid(self.gid)
        with contextlib.suppress(OSError):
            self._setgroups(self.groups)


# -- the filesystem --------------------------------------------------------------------------------


class _LockFd:
    """The descriptor carrying one lock owner's POSIX locks on one inode (as OFD locks)."""

    __slots__ = ("fd", "pid")

    def __init__(self, fd: int, pid: int) -> None:
        self.fd = fd
        self.pid = pid


class _Inode:
    __slots__ = ("backing", "fd", "key", "locks", "nlookup", "nodeid")

    def __init__(self, fd: int, key: tuple[int, int], nodeid: int) -> None:
        self.fd = fd
        self.key = key
        self.nodeid = nodeid
        self.nlookup = 0
        self.locks: dict[int, _LockFd] | None = None
        #: The passthrough backing registration its open files share (while not closed).
        self.backing: BackingFile | None = None


class PassthroughFS(Operations):
    """Mirror the directory ``source``.

    ``timeout`` is the entry and attribute cache time (seconds); ``negative_timeout`` how long
    the kernel may remember that a name does not exist (0: not at all). ``cache_dir`` lets the
    kernel cache directory listings (FOPEN_CACHE_DIR; it drops them when the directory's mtime
    changes). The defaults (0, 0, False) keep the mount coherent with changes made directly in
    the source; caching trades that coherence for speed. ``switch_credentials`` (default: when
    running as root) performs each request with the caller's fsuid/fsgid/groups.
    ``passthrough`` (default True) opens regular files in FUSE passthrough mode when the session
    negotiated it (``InitConfig(passthrough=True)``) and BACKING_OPEN is permitted;
    :attr:`passthrough_unavailable` then says why not.
    """

    def __init__(
        self,
        source: str | os.PathLike[str],
        *,
        timeout: float = 0.0,
        negative_timeout: float = 0.0,
        cache_dir: bool = False,
        switch_credentials: bool | None = None,
        passthrough: bool = True,
    ) -> None:
        self.source = os.fspath(source)
        self.passthrough = passthrough
        #: The session whose backing files regular files are opened on (None: no passthrough).
        self._pt_session: Session | None = None
        #: Why passthrough is not used (None while it is, or before INIT).
        self.passthrough_unavailable: str | None = None
        self._eloop_logged = False
        self.entry_timeout = self.attr_timeout = float(timeout)
        self.negative_timeout = float(negative_timeout)
        self.cache_dir = cache_dir
        if switch_credentials is None:
            switch_credentials = os.geteuid() == 0
        self._creds = _Credentials(switch_credentials)
        self._lock_waits = OFDLockWaits()
        _raise_fd_limit()
        fd = os.open(self.source, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        st = os.fstat(fd)
        root = _Inode(fd, (st.st_dev, st.st_ino), ROOT_ID)
        root.nlookup = 1
        self._inodes: dict[int, _Inode] = {ROOT_ID: root}
        self._by_key: dict[tuple[int, int], _Inode] = {root.key: root}
        self._next_nodeid = ROOT_ID + 1
        #: ``private`` is set on threads whose umask is their own (and 0).
        self._thread = threading.local()

    # -- passthrough ---------------------------------------------------------------------------

    def init(self, negotiated: Negotiated) -> None:
        self._pt_session = None
        self.passthrough_unavailable = None
        for node in self._inodes.values():
            node.backing = None
        if not self.passthrough:
            self._no_passthrough("disabled (PassthroughFS(passthrough=False))", logging.INFO)
        elif not negotiated.has(InitFlag.PASSTHROUGH):
            if negotiated.offered & InitFlag.PASSTHROUGH:
                self._no_passthrough("not asked for at INIT (InitConfig(passthrough=True) enables it)",
                                     logging.INFO)
            else:
                self._no_passthrough("kernel did not offer FUSE_PASSTHROUGH", logging.WARNING)
        else:
            try:
                session = current_session()
            except SessionError as e:
                self._no_passthrough(str(e), logging.WARNING)
                return
            # Try BACKING_OPEN once, on an anonymous regular file: are we privileged enough?
            try:
                probe = os.memfd_create("afuse-passthrough-probe", os.MFD_CLOEXEC)
            except (OSError, AttributeError):
                self._pt_session = session  # find out at the first open
                return
            try:
                session.open_backing(probe).release()
            except OSError as e:
                self._no_passthrough(unavailable_reason(e), logging.WARNING)
                return
            finally:
                os.close(probe)
            self._pt_session = session
            log.info("passthrough: regular files are read and written by the kernel on the source files")

    def _no_passthrough(self, why: str, level: int) -> None:
        self._pt_session = None
        self.passthrough_unavailable = why
        log.log(level, "passthrough unavailable: %s; serving reads and writes in the daemon", why)

    def _handle(self, fd: int, node: _Inode) -> Handle:
        """The Handle for ``fd``, open on ``node``: passthrough for regular files when available.

        One inode is never open both ways: regular files always use passthrough (sharing the
        inode's backing registration) while it is available; other files never do.
        """
        session = self._pt_session
        if session is None:
            return Handle(fh=fd)
        bf = node.backing
        if bf is None or bf.closed:
            try:
                bf = session.open_backing(fd)
            except OSError as e:
                if e.errno in (errno.EINVAL, errno.EISDIR):  # not a regular file: never passthrough
                    return Handle(fh=fd)
                if e.errno == errno.ELOOP:  # its filesystem is stacked too deep: the same every time
                    if not self._eloop_logged:
                        self._eloop_logged = True
                        log.warning("passthrough unavailable for files on stacked filesystems (ELOOP: "
                                    "raise InitConfig.max_stack_depth to 2); serving their I/O in the daemon")
                    return Handle(fh=fd)
                if e.errno == errno.EPERM:  # not privileged after all (no probe was possible)
                    self._no_passthrough(unavailable_reason(e), logging.WARNING)
                    return Handle(fh=fd)
                raise
            node.backing = bf
        return Handle(fd, FOpen.PASSTHROUGH, backing_id=bf.id)

    # -- bookkeeping -----------------------------------------------------------------------

    def close(self) -> None:
        """Close every descriptor this filesystem holds (after unmounting)."""
        for node in list(self._inodes.values()):
            self._close_node(node)
        self._inodes.clear()
        self._by_key.clear()

    @property
    def inode_count(self) -> int:
        """How many inodes (the root included) the kernel currently holds lookups on."""
        return len(self._inodes)

    def _node(self, nodeid: int) -> _Inode:
        node = self._inodes.get(nodeid)
        if node is None:
            raise FUSEError(errno.ESTALE, f"unknown nodeid {nodeid}")
        return node

    def _close_node(self, node: _Inode) -> None:
        if node.locks:
            for lf in node.locks.values():
                with contextlib.suppress(OSError):
                    os.close(lf.fd)
            node.locks = None
        with contextlib.suppress(OSError):
            os.close(node.fd)

    def _register(self, fd: int, st: os.stat_result) -> _Inode:
        """The inode for O_PATH descriptor ``fd`` (closed if the inode is already known)."""
        key = (st.st_dev, st.st_ino)
        node = self._by_key.get(key)
        if node is not None:
            os.close(fd)
            return node
        node = _Inode(fd, key, self._next_nodeid)
        self._next_nodeid += 1
        self._inodes[node.nodeid] = node
        self._by_key[key] = node
        return node

    def _unref(self, node: _Inode, n: int) -> None:
        if node.nodeid == ROOT_ID:
            return
        node.nlookup -= n
        if node.nlookup <= 0 and self._inodes.get(node.nodeid) is node:
            del self._inodes[node.nodeid]
            del self._by_key[node.key]
            self._close_node(node)

    @staticmethod
    def _check_name(name: bytes) -> None:
        if not name or b"/" in name or name in (b".", b".."):
            raise FUSEError(errno.EINVAL, f"invalid name {name!r}")

    def _lookup_at(self, parent: _Inode, name: bytes) -> tuple[_Inode, os.stat_result]:
        """Open ``name`` in ``parent`` (O_PATH, no symlink following) and register it, uncounted."""
        fd = os.open(name, _O_PATH_FLAGS, dir_fd=parent.fd)
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        return self._register(fd, st), st

    def _entry(self, node: _Inode, st: os.stat_result) -> Entry:
        """An entry reply for ``node``; counts one lookup."""
        node.nlookup += 1
        return Entry(node.nodeid, self._attr(st))

    @staticmethod
    def _attr(st: os.stat_result) -> Attr:
        a = Attr.from_stat(st)
        if st.st_rdev:
            a.rdev = _encode_dev(st.st_rdev)
        return a

    @contextlib.contextmanager
    def _as_caller(self, req: r.Request) -> Iterator[None]:
        """Run the block with the caller's file credentials (no ``await`` inside!)."""
        c = self._creds
        if not c.enabled or not req.has_ids or (req.uid == c.uid and req.gid == c.gid):
            yield
            return
        c.switch(req.uid, req.gid, c.groups_of(req.pid, req.uid, req.gid))
        try:
            yield
        finally:
            c.restore()

    @contextlib.contextmanager
    def _creating(self, req: r.Request) -> Iterator[None]:
        """As :meth:`_as_caller`, with umask 0: the kernel has applied the caller's umask already."""
        private = getattr(self._thread, "private", None)
        if private is None:
            # Give this thread its own umask (and cwd and root) once, and set it to 0.
            private = self._thread.private = _unshare(CLONE_FS) == 0
            if private:
                os.umask(0)
        if private:
            with self._as_caller(req):
                yield
            return
        old = os.umask(0)  # the process-wide umask, briefly
        try:
            with self._as_caller(req):
                yield
        finally:
            os.umask(old)

    # -- names -------------------------------------------------------------------------------

    async def lookup(self, req: r.LookupRequest) -> Entry:
        self._check_name(req.name)
        parent = self._node(req.nodeid)
        try:
            with self._as_caller(req):
                node, st = self._lookup_at(parent, req.name)
        except FileNotFoundError:
            if self.negative_timeout > 0:
                return Entry(0, Attr(), entry_timeout=self.negative_timeout)
            raise
        return self._entry(node, st)

    async def forget(self, req: r.ForgetRequest) -> None:
        for item in req.items:
            node = self._inodes.get(item.nodeid)
            if node is not None:
                self._unref(node, item.nlookup)

    async def getattr(self, req: r.GetattrRequest) -> Attr:
        return self._attr(os.fstat(self._node(req.nodeid).fd))

    async def setattr(self, req: r.SetattrRequest) -> Attr:
        node = self._node(req.nodeid)
        path = _proc(node.fd)
        if req.mode is not None:
            mode = stat.S_IMODE(req.mode)
            current = stat.S_IMODE(os.fstat(node.fd).st_mode)
            # The kernel clears set-id bits itself when someone else writes or truncates
            # (ATTR_KILL_SUID, which it forces past permission checks): only dropping those
            # bits is done with the daemon's rights, anything else with the caller's.
            kill_only = mode != current and mode == current & ~(stat.S_ISUID | stat.S_ISGID)
            with contextlib.nullcontext() if kill_only else self._as_caller(req):
                if req.fh is not None:
                    os.fchmod(req.fh, mode)
                else:
                    os.chmod(path, mode)
        with self._as_caller(req):
            if req.new_uid is not None or req.new_gid is not None:
                uid = 0xFFFFFFFF if req.new_uid is None else req.new_uid
                gid = 0xFFFFFFFF if req.new_gid is None else req.new_gid
                _check(_fchownat(node.fd, b"", uid, gid, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW), "fchownat")
            if req.size is not None:
                if req.fh is not None:
                    os.ftruncate(req.fh, req.size)
                else:
                    os.truncate(path, req.size)
            if req.atime_ns is not None or req.mtime_ns is not None or req.atime_now or req.mtime_now:
                ts = (_Timespec * 2)(
                    _timespec(req.atime_ns, req.atime_now), _timespec(req.mtime_ns, req.mtime_now))
                _check(_utimensat(node.fd, b"", ts, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW), "utimensat")
        return self._attr(os.fstat(node.fd))

    async def readlink(self, req: r.ReadlinkRequest) -> bytes:
        return os.readlink(b"", dir_fd=self._node(req.nodeid).fd)

    async def access(self, req: r.AccessRequest) -> None:
        node = self._node(req.nodeid)
        with self._as_caller(req):
            _check(_faccessat(AT_FDCWD, _proc(node.fd), req.mask, AT_EACCESS), "faccessat")

    # -- creating and removing ------------------------------------------------------------------

    async def mknod(self, req: r.MknodRequest) -> Entry:
        self._check_name(req.name)
        parent = self._node(req.nodeid)
        with self._creating(req):
            os.mknod(req.name, req.mode, _decode_dev(req.rdev), dir_fd=parent.fd)
            node, st = self._lookup_at(parent, req.name)
        return self._entry(node, st)

    async def mkdir(self, req: r.MkdirRequest) -> Entry:
        self._check_name(req.name)
        parent = self._node(req.nodeid)
        with self._creating(req):
            os.mkdir(req.name, stat.S_IMODE(req.mode), dir_fd=parent.fd)
            node, st = self._lookup_at(parent, req.name)
        return self._entry(node, st)

    async def symlink(self, req: r.SymlinkRequest) -> Entry:
        self._check_name(req.name)
        parent = self._node(req.nodeid)
        with self._creating(req):
            os.symlink(req.target, req.name, dir_fd=parent.fd)
            node, st = self._lookup_at(parent, req.name)
        return self._entry(node, st)

    async def link(self, req: r.LinkRequest) -> Entry:
        self._check_name(req.newname)
        old = self._node(req.oldnodeid)
        parent = self._node(req.nodeid)
        with self._as_caller(req):
            # linkat(AT_EMPTY_PATH) needs CAP_DAC_READ_SEARCH; the magic link does not, and
            # following it lands on the object itself (a symlink stays a symlink).
            _check(_linkat(AT_FDCWD, _proc(old.fd), parent.fd, req.newname, AT_SYMLINK_FOLLOW), "linkat")
        return self._entry(old, os.fstat(old.fd))

    async def unlink(self, req: r.UnlinkRequest) -> None:
        self._check_name(req.name)
        parent = self._node(req.nodeid)
        with self._as_caller(req):
            os.unlink(req.name, dir_fd=parent.fd)

    async def rmdir(self, req: r.RmdirRequest) -> None:
        self._check_name(req.name)
        parent = self._node(req.nodeid)
        with self._as_caller(req):
            os.rmdir(req.name, dir_fd=parent.fd)

    async def rename(self, req: r.RenameRequest) -> None:
        self._check_name(req.name)
        self._check_name(req.newname)
        if req.flags & ~RENAME_FLAGS:
            raise FUSEError(errno.EINVAL)
        old, new = self._node(req.nodeid), self._node(req.newdir)
        with self._as_caller(req):
            if req.flags:
                _check(_renameat2(old.fd, req.name, new.fd, req.newname, req.flags), "renameat2")
            else:
                os.rename(req.name, req.newname, src_dir_fd=old.fd, dst_dir_fd=new.fd)

    # -- files ------------------------------------------------------------------------------

    async def open(self, req: r.OpenRequest) -> Handle:
        node = self._node(req.nodeid)
        with self._as_caller(req):
            fd = os.open(_proc(node.fd), (req.flags & ~_STRIP_OPEN) | os.O_CLOEXEC)
        try:
            return self._handle(fd, node)
        except BaseException:
            os.close(fd)
            raise

    async def create(self, req: r.CreateRequest) -> tuple[Entry, Handle]:
        self._check_name(req.name)
        parent = self._node(req.nodeid)
        flags = (req.flags & ~_STRIP_OPEN) | (req.flags & os.O_EXCL) | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        with self._creating(req):
            fd = os.open(req.name, flags, stat.S_IMODE(req.mode), dir_fd=parent.fd)
        return self._opened(fd)

    async def tmpfile(self, req: r.TmpfileRequest) -> tuple[Entry, Handle]:
        parent = self._node(req.nodeid)
        flags = (req.flags & ~_STRIP_OPEN) | (req.flags & os.O_EXCL) | os.O_TMPFILE | os.O_CLOEXEC
        with self._creating(req):
            fd = os.open(_proc(parent.fd), flags, stat.S_IMODE(req.mode))
        return self._opened(fd)

    def _opened(self, fd: int) -> tuple[Entry, Handle]:
        """Entry and Handle of a created file open at ``fd`` (closed on failure)."""
        e = self._opened_entry(fd)
        node = self._inodes[e.nodeid]
        try:
            return e, self._handle(fd, node)
        except BaseException:
            self._unref(node, 1)
            os.close(fd)
            raise

    def _opened_entry(self, fd: int) -> Entry:
        """Register the inode open at ``fd`` (closing ``fd`` on failure); counts one lookup."""
        try:
            pfd = os.open(_proc(fd), os.O_PATH | os.O_CLOEXEC)
            try:
                st = os.fstat(pfd)
            except BaseException:
                os.close(pfd)
                raise
            node = self._register(pfd, st)
        except BaseException:
            os.close(fd)
            raise
        return self._entry(node, st)

    async def read(self, req: r.ReadRequest) -> FileRange:
        # Spliced from the file into the reply by the session: one copy, none through Python.
        return FileRange(req.fh, req.offset, req.size)

    async def write(self, req: r.WriteRequest) -> int:
        return os.pwrite(req.fh, req.data, req.offset)

    async def flush(self, req: r.FlushRequest) -> None:
        # A close() drops the closing process's POSIX locks on the file.
        node = self._inodes.get(req.nodeid)
        if node is not None and node.locks:
            lf = node.locks.pop(req.lock_owner, None)
            if lf is not None:
                os.close(lf.fd)
        # Close a duplicate so the source sees a close (NFS-style close-to-open, errors).
        os.close(os.dup(req.fh))

    async def release(self, req: r.ReleaseRequest) -> None:
        os.close(req.fh)

    async def fsync(self, req: r.FsyncRequest) -> None:
        if req.datasync:
            os.fdatasync(req.fh)
        else:
            os.fsync(req.fh)

    async def fallocate(self, req: r.FallocateRequest) -> None:
        _check(_fallocate(req.fh, req.mode, req.offset, req.length), "fallocate")

    async def lseek(self, req: r.LseekRequest) -> int:
        return os.lseek(req.fh, req.offset, req.whence)

    async def copy_file_range(self, req: r.CopyFileRangeRequest) -> int:
        if req.flags:
            raise FUSEError(errno.EINVAL)
        return os.copy_file_range(req.fh_in, req.fh_out, req.length, req.off_in, req.off_out)

    async def ioctl(self, req: r.IoctlRequest) -> IoctlReply:
        raise FUSEError(errno.ENOTTY)

    async def poll(self, req: r.PollRequest) -> int:
        return select.POLLIN | select.POLLOUT | select.POLLRDNORM | select.POLLWRNORM

    async def statfs(self, req: r.StatfsRequest) -> FsStats:
        return FsStats.from_statvfs(os.fstatvfs(self._node(req.nodeid).fd))

    async def statx(self, req: r.StatxRequest) -> Statx:
        node = self._node(req.nodeid)
        buf = ctypes.create_string_buffer(256)
        flags = AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW | (req.sx_flags & AT_STATX_SYNC_TYPE)
        _check(_statx(node.fd, b"", flags, req.mask | STATX_BASIC_STATS | STATX_BTIME, buf), "statx")
        (mask, blksize, attributes, nlink, uid, gid, mode, ino, size, blocks, attributes_mask,
         a_s, a_n, b_s, b_n, c_s, c_n, m_s, m_n, rmaj, rmin, dmaj, dmin) = _STATX.unpack_from(buf.raw)
        return Statx(mask, blksize, attributes, nlink, uid, gid, mode, ino, size, blocks,
                     attributes_mask, Timestamp(a_s, a_n), Timestamp(b_s, b_n), Timestamp(c_s, c_n),
                     Timestamp(m_s, m_n), rmaj, rmin, dmaj, dmin)

    # -- directories -------------------------------------------------------------------------

    async def opendir(self, req: r.OpendirRequest) -> Handle:
        node = self._node(req.nodeid)
        with self._as_caller(req):
            fd = os.open(_proc(node.fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        flags = FOpen.CACHE_DIR | FOpen.KEEP_CACHE if self.cache_dir else 0
        return Handle(fh=fd, flags=flags)

    async def readdir(self, req: r.ReaddirRequest) -> DirEntries:
        return self._entries(req, None)

    async def readdirplus(self, req: r.ReaddirplusRequest) -> DirEntries:
        return self._entries(req, self._node(req.nodeid))

    def _entries(self, req: r.ReaddirRequest, parent: _Inode | None) -> Iterator[DirEntry]:
        """Entries after cookie ``req.offset``; the cookies are the source's d_off values.

        A generator: the framework stops at the first entry that does not fit, so only what
        the reply takes is looked up and counted (READDIRPLUS counts after the ``yield``).
        """
        offset = req.offset
        taken = False
        bufsize = max(req.size, 4096)
        while True:
            try:
                os.lseek(req.fh, offset, os.SEEK_SET)
                batch = _getdents(req.fh, bufsize)
            except OSError:
                if taken:
                    return  # send what is there; the next READDIR reports the error
                raise
            if not batch:
                return
            for name, ino, off, dtype in batch:
                if off <= 0:
                    return
                if parent is None:
                    yield DirEntry(name, off, attr=Attr(ino=ino, mode=dtype << 12))
                elif name == b"." or name == b"..":
                    yield DirEntry(name, off, entry=Entry(0, Attr(ino=ino, mode=dtype << 12)))
                else:
                    try:
                        with self._as_caller(req):
                            node, st = self._lookup_at(parent, name)
                    except FileNotFoundError:
                        offset = off
                        continue  # gone meanwhile
                    except OSError:
                        # Not searchable for this caller (or out of descriptors): just the name.
                        yield DirEntry(name, off, entry=Entry(0, Attr(ino=ino, mode=dtype << 12)))
                    else:
                        counted = False
                        try:
                            yield DirEntry(name, off, entry=Entry(node.nodeid, self._attr(st)))
                            node.nlookup += 1  # the reply took it
                            counted = True
                        finally:
                            if not counted:
                                self._unref(node, 0)
                taken = True
                offset = off

    async def releasedir(self, req: r.ReleasedirRequest) -> None:
        os.close(req.fh)

    async def fsyncdir(self, req: r.FsyncdirRequest) -> None:
        if req.datasync:
            os.fdatasync(req.fh)
        else:
            os.fsync(req.fh)

    # -- extended attributes ---------------------------------------------------------------------

    async def setxattr(self, req: r.SetxattrRequest) -> None:
        node = self._node(req.nodeid)
        with self._as_caller(req):
            os.setxattr(_proc(node.fd), req.name, req.value, req.flags)

    async def getxattr(self, req: r.GetxattrRequest) -> bytes:
        node = self._node(req.nodeid)
        if req.name == b"security.capability":
            # The kernel asks this before every write (to drop file capabilities); its value
            # is the same whoever reads it, so skip switching to the caller's credentials.
            return os.getxattr(_proc(node.fd), req.name)
        with self._as_caller(req):
            return os.getxattr(_proc(node.fd), req.name)

    async def listxattr(self, req: r.ListxattrRequest) -> list[bytes]:
        node = self._node(req.nodeid)
        with self._as_caller(req):
            return [os.fsencode(n) for n in os.listxattr(_proc(node.fd))]

    async def removexattr(self, req: r.RemovexattrRequest) -> None:
        node = self._node(req.nodeid)
        with self._as_caller(req):
            os.removexattr(_proc(node.fd), req.name)

    # -- locks -----------------------------------------------------------------------------

    def _lock_fd(self, node: _Inode, owner: int, fh: int, pid: int) -> _LockFd:
        """The descriptor holding ``owner``'s POSIX locks on ``node`` (one OFD per owner)."""
        if node.locks is None:
            node.locks = {}
        lf = node.locks.get(owner)
        if lf is None:
            try:
                fd = os.open(_proc(fh), os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                fd = os.open(_proc(fh), (fcntl.fcntl(fh, fcntl.F_GETFL) & os.O_ACCMODE) | os.O_CLOEXEC)
            lf = node.locks[owner] = _LockFd(fd, pid)
        elif pid:
            lf.pid = pid
        return lf

    async def getlk(self, req: r.GetlkRequest) -> Lock:
        node = self._node(req.nodeid)
        lf = self._lock_fd(node, req.owner, req.fh, req.lock.pid)
        query = _flock_bytes(req.lock)
        res = fcntl.fcntl(lf.fd, F_OFD_GETLK, query)
        typ, _, start, length, _ = _FLOCK.unpack(res)
        if typ == fcntl.F_UNLCK:
            return Lock(0, 0, fcntl.F_UNLCK, 0)
        # Which owner holds it? Only the holder does not see it as a conflict itself.
        pid = 0
        assert node.locks is not None
        for owner, other in node.locks.items():
            if owner != req.owner and fcntl.fcntl(other.fd, F_OFD_GETLK, query) != res:
                pid = other.pid
                break
        return Lock(start, start + length - 1 if length else OFFSET_MAX, typ, pid)

    async def setlk(self, req: r.SetlkRequest) -> None:
        node = self._node(req.nodeid)
        if req.lock.type == fcntl.F_UNLCK and (node.locks is None or req.owner not in node.locks):
            return
        self._lock_fd(node, req.owner, req.fh, req.lock.pid)
        assert node.locks is not None
        # SETLKW waits in the host kernel, in a worker thread an INTERRUPT stops; EDEADLK across owners.
        await self._lock_waits.setlk(node.locks, req.owner, _flock_bytes(req.lock), req.sleep)

    async def flock(self, req: r.SetlkRequest) -> None:
        op = {fcntl.F_RDLCK: fcntl.LOCK_SH, fcntl.F_WRLCK: fcntl.LOCK_EX}.get(req.lock.type, fcntl.LOCK_UN)
        if op == fcntl.LOCK_UN:
            fcntl.flock(req.fh, op)
        elif req.sleep:
            await flock_wait(req.fh, op)
        else:
            fcntl.flock(req.fh, op | fcntl.LOCK_NB)


def _timespec(ns: int | None, now: bool) -> _Timespec:
    if now:
        return _Timespec(0, UTIME_NOW)
    if ns is None:
        return _Timespec(0, UTIME_OMIT)
    return _Timespec(ns // 1_000_000_000, ns % 1_000_000_000)
