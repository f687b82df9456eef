"""An in-memory POSIX filesystem on nodes: ``python -m afuse.examples.memfs MOUNTPOINT [-o OPTS] [--debug]
[--xattr-space BYTES] [--persist DIR] [--keeper SOCKET --state-dir DIR [--upgrade]]``.

Each inode is a node (:mod:`afuse.nodes`: the bridge keeps nodeids, lookup counts, handles, the tree).
Files hold data sparsely in 64 KiB chunks (holes are real for SEEK_DATA/SEEK_HOLE; fallocate punches
them); there are directories, symlinks, hard links, devices, fifos, sockets, rename with NOREPLACE /
EXCHANGE / WHITEOUT, xattrs (128 KiB per inode by default: see :class:`MemFS`), owners, modes,
nanosecond times, POSIX and flock(2) locks (waiting, interruptible, with deadlock detection),
O_TMPFILE, copy_file_range and statx with a birth time.
Permissions are checked here too, against the caller's uid, gid and supplementary groups
(:func:`afuse.nodes.current_caller`), so it behaves alike with or without ``-o default_permissions``.

Persistence: MemFS is :class:`afuse.state.Persistent` — a JSON snapshot of the inodes and the
bridge's tables, then a journal of every request that changed something (with its clock and
caller's groups) and of each READDIRPLUS entry the kernel took, written before the reply; restoring
redoes the journal through the same handlers, reproducing nodeids, lookup counts and open files, so
a successor can take the live connection over (``--keeper``/``--state-dir``, see docs/failover.md).
File contents are not in the snapshot or the journal: they live in a content store
(:mod:`afuse.nodes.filestore`, ``DIR/data``), written through and opened lazily, so a takeover
does not grow with the data. ``persist=DIR`` keeps such a store in DIR. A resent request whose
first attempt is journaled gets that attempt's result. POSIX and flock locks are kept too (in
the snapshot, and an ``L`` record of the file's locks whenever they change); read atimes are not.
"""

from __future__ import annotations

import base64
import errno
import logging
import os
import stat
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from afuse.errors import FUSEError
from afuse.nodes import Caller, FileHandle, Node
from afuse.nodes.filestore import ContentStore, StoredData
from afuse.nodes.journal import JournaledNodeFS, caller
from afuse.nodes.journal import now as _now
from afuse.nodes.locks import FileLocks, LockWaits
from afuse.nodes.node import _Cookies
from afuse.nodes.sparse import CHUNK, MAX_FILE_SIZE, ChunkPool, SparseData
from afuse.state import CONTENT_DIR, SNAPSHOT, FileStateStore
from afuse.wire import requests as r
from afuse.wire.constants import FOpen
from afuse.wire.types import Attr, Entry, FsStats, Handle, IoctlReply, Lock, Statx, Timestamp

__all__ = ["CHUNK", "XATTR_SPACE", "Dir", "File", "MNode", "MemFS", "Special", "Symlink", "main"]

NAME_MAX, PATH_MAX, XATTR_SIZE_MAX, XATTR_LIST_MAX = 255, 4096, 1 << 16, 1 << 16
#: The default xattr space of one inode (bytes; see :class:`MemFS`): a full listxattr(2)'s worth
#: of names (XATTR_LIST_MAX) plus one value of the largest size the kernel passes (XATTR_SIZE_MAX).
XATTR_SPACE = XATTR_LIST_MAX + XATTR_SIZE_MAX
_DIRENT, _BLK, _NO_IDS = 20, 4096, 0xFFFFFFFF  # dir size per entry (as tmpfs), block size, "no caller ids"
_R, _W, _X = 4, 2, 1
log = logging.getLogger("afuse.examples.memfs")


def _err(code: int) -> FUSEError:
    return FUSEError(code)


def _privileged(c: Caller) -> bool:
    return c.uid in (0, _NO_IDS)


def _may(n: MNode, mask: int, c: Caller | None = None) -> bool:
    """May the caller access ``n`` for ``mask`` (R 4 / W 2 / X 1), honouring supplementary groups?"""
    c = c or caller()
    if _privileged(c):
        return not mask & _X or n.is_dir or bool(n.perm & 0o111)
    bits = n.perm >> 6 if c.uid == n.uid else n.perm >> 3 if c.in_group(n.gid) else n.perm
    return bits & mask == mask


def _need(n: MNode, mask: int, c: Caller | None = None) -> None:
    c = c or caller()
    if not _privileged(c) and not _may(n, mask, c):
        raise _err(errno.EACCES)


class MNode(Node):
    """An inode: attributes and xattrs. ``key`` is a serial number (its identity in snapshots);
    the inode number is the nodeid."""

    def __init__(self, fs: MemFS, mode: int, uid: int, gid: int, serial: int = 0) -> None:
        super().__init__(mode, key=serial or fs._new_serial())
        self.fs, self.perm, self.uid, self.gid, self.rdev, self.size, self.nlink, self.opens = (
            fs, mode, uid, gid, 0, 0, 1, 0)
        self.atime = self.mtime = self.ctime = self.btime = _now()
        self.xattrs: dict[bytes, bytes] = {}
        #: The xattr space in use: each name with its NUL, plus its value (see :class:`MemFS`).
        self.xattr_used = 0

    @property
    def blocks(self) -> int:
        """512-byte blocks in use."""
        return 0

    async def getattr(self) -> Attr:
        """The attributes."""
        return Attr(self.nodeid, self.perm, self.nlink, self.uid, self.gid, self.rdev, self.size, self.blocks,
                    self.atime, self.mtime, self.ctime, _BLK)

    async def access(self, mask: int) -> None:
        """access(2)."""
        if mask & 7 and not _may(self, mask & 7):
            raise _err(errno.EACCES)

    async def setattr(self, req: r.SetattrRequest) -> Attr:
        """chmod, chown, truncate, utimes: all checked first, so a refusal changes nothing."""
        c = caller()
        priv = _privileged(c)
        owner = priv or c.uid == self.uid
        uid = self.uid if req.new_uid is None else req.new_uid
        gid = self.gid if req.new_gid is None else req.new_gid
        chown = req.new_uid is not None or req.new_gid is not None
        if chown and not priv and (c.uid != self.uid or uid != self.uid or (gid != self.gid and not c.in_group(gid))):
            raise _err(errno.EPERM)
        perm = self.perm
        if req.mode is not None:
            bits, old = req.mode & 0o7777, self.perm & 0o7777
            if not owner and ((bits ^ old) & ~0o6000 or bits & ~old):
                raise _err(errno.EPERM)  # others may only drop suid/sgid (the kernel's killpriv)
            perm = stat.S_IFMT(self.perm) | (bits if priv or c.in_group(gid) else bits & ~stat.S_ISGID)
        if req.size is not None:
            if not isinstance(self, File):
                raise _err(errno.EISDIR if self.is_dir else errno.EINVAL)
            if req.fh is None and not _may(self, _W, c):
                raise _err(errno.EACCES)
            if not 0 <= req.size <= MAX_FILE_SIZE:
                raise _err(errno.EFBIG if req.size > 0 else errno.EINVAL)
        if (req.atime_ns is not None or req.mtime_ns is not None) and not owner:
            raise _err(errno.EPERM)
        if (req.atime_now or req.mtime_now) and not owner and not _may(self, _W, c):
            raise _err(errno.EACCES)
        now, changed = _now(), chown or req.mode is not None
        self.uid, self.gid, self.perm = uid, gid, perm
        if req.size is not None:
            assert isinstance(self, File)
            self.data.truncate(req.size)
            self.mtime, changed = now, True
        for name in ("atime", "mtime"):
            ns = getattr(req, name + "_ns")
            if ns is not None or getattr(req, name + "_now"):
                setattr(self, name, now if ns is None else ns)
                changed = True
        if req.ctime_ns is not None or changed:
            self.ctime = now if req.ctime_ns is None else req.ctime_ns
        return await self.getattr()

    def _xattr(self, name: bytes, mask: int) -> None:
        c = caller()
        if not name or len(name) > 255:
            raise _err(errno.ERANGE if name else errno.EINVAL)
        if name.startswith(b"user.") and c.uid and not _may(self, mask, c):
            raise _err(errno.EACCES)
        if name.startswith(b"trusted.") and not _privileged(c):
            raise _err(errno.EPERM)

    async def setxattr(self, name: bytes, value: bytes, flags: int) -> None:
        """Set ``name`` (XATTR_CREATE 1 / XATTR_REPLACE 2); no POSIX ACLs (``system.``)."""
        if name.startswith(b"system."):
            raise _err(errno.EOPNOTSUPP)
        self._xattr(name, _W)
        if len(value) > XATTR_SIZE_MAX:
            raise _err(errno.E2BIG)
        old = self.xattrs.get(name)
        if (flags & 1 and old is not None) or (flags & 2 and old is None):
            raise _err(errno.EEXIST if flags & 1 else errno.ENODATA)
        used = self.xattr_used + len(value) + (len(name) + 1 if old is None else -len(old))
        if used > self.fs.xattr_space and used > self.xattr_used:
            raise _err(errno.ENOSPC)  # as ext4 and tmpfs answer when an inode's xattrs are full
        self.xattrs[name], self.ctime, self.xattr_used = value, _now(), used

    async def getxattr(self, name: bytes) -> bytes:
        """The value of ``name``."""
        self._xattr(name, _R)
        if name not in self.xattrs:
            raise _err(errno.ENODATA)
        return self.xattrs[name]

    async def listxattr(self) -> list[bytes]:
        """Names (``trusted.`` ones for privileged callers only)."""
        priv = _privileged(caller())
        return [k for k in self.xattrs if priv or not k.startswith(b"trusted.")]

    async def removexattr(self, name: bytes) -> None:
        """Remove ``name``."""
        self._xattr(name, _W)
        if (old := self.xattrs.pop(name, None)) is None:
            raise _err(errno.ENODATA)
        self.ctime, self.xattr_used = _now(), self.xattr_used - len(name) - 1 - len(old)


class Special(MNode):
    """A device node, fifo, socket or whiteout: attributes only."""


class Symlink(MNode):
    """A symbolic link."""

    def __init__(self, fs: MemFS, target: bytes, uid: int, gid: int, serial: int = 0) -> None:
        super().__init__(fs, stat.S_IFLNK | 0o777, uid, gid, serial)
        self.target, self.size = target, len(target)

    async def readlink(self) -> bytes:
        """The target."""
        return self.target


class File(MNode):
    """A regular file: its bytes in ``data`` (sparse in memory, or in the filesystem's content store),
    its locks in ``locks``."""

    #: Restored from a content store: mtime is the stored file's if that is later (writes are not journaled).
    _stale_times = False
    _mtime = 0

    @property
    def mtime(self) -> int:
        """Modification time (ns); with a content store, also set on the stored file (what a
        successor reads, since writes are not journaled)."""
        return self._mtime

    @mtime.setter
    def mtime(self, ns: int) -> None:
        self._mtime = ns
        if isinstance(self.data, StoredData):
            self.data.set_mtime(ns)

    def __init__(self, fs: MemFS, mode: int, uid: int, gid: int, serial: int = 0) -> None:
        serial = serial or fs._new_serial()
        self.data: SparseData | StoredData = (
            SparseData(fs.pool) if fs.content is None else StoredData(fs.content, serial, fs.pool))
        self.locks = FileLocks(fs.lock_waits)
        super().__init__(fs, mode, uid, gid, serial)
        self.locks.tag = self
        if fs.content is not None and fs.content.replaying:
            self._stale_times = True

    async def getattr(self) -> Attr:
        """The attributes (after a restore from a content store, with the stored file's mtime)."""
        if self._stale_times:
            assert isinstance(self.data, StoredData)
            self._stale_times = False
            if (m := self.data.mtime_ns()) > self.mtime:
                self.mtime, self.ctime = m, max(self.ctime, m)
        return await super().getattr()

    @property
    def size(self) -> int:
        """The file size."""
        return self.data.size

    @size.setter
    def size(self, size: int) -> None:
        self.data.size = size

    @property
    def blocks(self) -> int:
        """512-byte blocks in use."""
        return self.data.blocks

    def forgotten(self) -> None:
        """Dropped by the bridge (no name, no kernel reference): free the data."""
        self.data.free()

    async def open(self, flags: int) -> _Open:
        """Check the access asked for; O_TRUNC empties the file."""
        _need(self, (_R, _W, _R | _W, _R | _W)[flags & os.O_ACCMODE] | (_W if flags & os.O_TRUNC else 0))
        if flags & os.O_TRUNC and self.size:
            self.data.truncate(0)
            self.mtime = self.ctime = _now()
        return _Open(self)

    async def read(self, offset: int, size: int) -> bytes:
        """Read (relatime: atime moves when it is older than mtime)."""
        if self.atime <= self.mtime:
            self.atime = _now()
        return self.data.read(offset, size)

    async def fsync(self, datasync: int) -> None:
        """Nothing to do in memory."""

    async def fallocate(self, off: int, length: int, mode: int) -> None:
        """Allocate (mode 0, or 1: keep the size) or punch a hole (3)."""
        if off < 0 or length <= 0:
            raise _err(errno.EINVAL)
        if mode & ~3 or mode == 2:
            raise _err(errno.EOPNOTSUPP)
        if off + length > MAX_FILE_SIZE:
            raise _err(errno.EFBIG)
        now = self.ctime = _now()
        if mode & 2:
            self.data.punch(off, off + length)
            self.mtime = now
        elif self.data.allocate(off, off + length, keep_size=bool(mode & 1)):
            self.mtime = now

    async def lseek(self, off: int, whence: int) -> int:
        """SEEK_DATA / SEEK_HOLE."""
        return self.data.seek(off, whence)

    async def copy_file_range(self, off: int, out: _Open | None, out_off: int, length: int, flags: int) -> int:
        """Copy bytes; a hole stays a hole."""
        if flags or out is None or off < 0 or out_off < 0:
            raise _err(errno.EINVAL if out is not None else errno.EBADF)
        count = self.data.copy_to(off, out.node.data, out_off, length)  # type: ignore[arg-type]
        if count:
            out.node.mtime = out.node.ctime = _now()
        return count


class _Open(FileHandle):
    """An open file: I/O goes to the file; flock locks belong to the open file."""

    def __init__(self, node: File) -> None:
        self.node = node
        node.opens += 1

    async def release(self) -> None:
        """The last close: its flock lock goes."""
        self.node.opens -= 1
        self.node.locks.drop_flock(self)

    async def getlk(self, req: r.GetlkRequest) -> Lock:
        """F_GETLK."""
        return await self.node.locks.getlk(req)

    async def setlk(self, req: r.SetlkRequest) -> None:
        """F_SETLK / F_SETLKW."""
        await self.node.locks.setlk(req)

    async def flock(self, req: r.SetlkRequest) -> None:
        """flock(2)."""
        await self.node.locks.flock(req, self)

    async def poll(self, req: r.PollRequest) -> int:
        """Always ready."""
        return 0x1 | 0x4

    async def ioctl(self, req: r.IoctlRequest) -> IoctlReply:
        """None."""
        raise _err(errno.ENOTTY)


class Dir(MNode):
    """A directory: the bridge keeps its ``children``; ``parent`` is for ".." and rename checks.
    The kernel may cache listings (the bridge's directory offsets are the same in every open)."""

    fopen = FOpen.CACHE_DIR | FOpen.KEEP_CACHE

    def __init__(self, fs: MemFS, mode: int, uid: int, gid: int, parent: Dir | None, serial: int = 0) -> None:
        super().__init__(fs, mode, uid, gid, serial)
        self.nlink, self.parent = 2, parent or self

    async def getattr(self) -> Attr:
        """Attributes; the size grows with the entries, as tmpfs counts."""
        self.size = (2 + len(self.children or ())) * _DIRENT
        return await super().getattr()

    async def statfs(self) -> FsStats:
        """Capacity and use."""
        fs, per, pool = self.fs, CHUNK // _BLK, self.fs.pool
        free, files = max(0, (pool.capacity - pool.used) * per), max(pool.capacity, len(fs.nodes))
        return FsStats(blocks=pool.capacity * per, bfree=free, bavail=free, files=files,
                       ffree=files - len(fs.nodes), bsize=_BLK, namelen=NAME_MAX, frsize=_BLK)

    def _new(self, name: bytes, mode: int) -> tuple[int, int, int]:
        """Check creating ``name`` (in Linux's order): uid, gid and mode of the new inode."""
        c = caller()
        if len(name) > NAME_MAX:
            raise _err(errno.ENAMETOOLONG)
        _need(self, _X, c)
        if self.nlink == 0:
            raise _err(errno.ENOENT)
        _need(self, _W | _X, c)
        gid = c.gid
        if self.perm & stat.S_ISGID:  # setgid directories hand down their group (and the bit to directories)
            gid, mode = self.gid, mode | (stat.S_ISGID if stat.S_ISDIR(mode) else 0)
        if mode & 0o2010 == 0o2010 and not stat.S_ISDIR(mode) and not _privileged(c) and not c.in_group(gid):
            mode &= ~stat.S_ISGID
        self.mtime = self.ctime = _now()
        return c.uid, gid, mode

    async def create(self, name: bytes, flags: int, mode: int) -> tuple[File, _Open]:
        """A new file, open."""
        f = File(self.fs, *self._ids(self._new(name, mode)))
        return f, _Open(f)

    @staticmethod
    def _ids(new: tuple[int, int, int]) -> tuple[int, int, int]:
        return new[2], new[0], new[1]  # (mode, uid, gid), as the constructors take them

    async def mknod(self, name: bytes, mode: int, rdev: int) -> MNode:
        """A regular file, device node, fifo or socket."""
        typ = stat.S_IFMT(mode)
        if typ not in (0, stat.S_IFREG, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK):
            raise _err(errno.EPERM if typ == stat.S_IFDIR else errno.EINVAL)
        ids = self._ids(self._new(name, (typ or stat.S_IFREG) | (mode & 0o7777)))
        if typ in (0, stat.S_IFREG):
            return File(self.fs, *ids)
        n = Special(self.fs, *ids)
        n.rdev = rdev if typ in (stat.S_IFCHR, stat.S_IFBLK) else 0
        return n

    async def mkdir(self, name: bytes, mode: int) -> Dir:
        """A new directory."""
        mode, uid, gid = self._ids(self._new(name, mode))
        self.nlink += 1
        return Dir(self.fs, mode, uid, gid, self)

    async def symlink(self, name: bytes, target: bytes) -> Symlink:
        """A new symlink."""
        if len(target) >= PATH_MAX:
            raise _err(errno.ENAMETOOLONG)
        uid, gid, _ = self._new(name, stat.S_IFLNK | 0o777)
        return Symlink(self.fs, target, uid, gid)

    async def link(self, name: bytes, node: Node) -> Node:
        """Another name for ``node``."""
        assert isinstance(node, MNode)
        self._new(name, 0)
        node.nlink, node.ctime = node.nlink + 1, self.mtime
        return node

    def _removable(self, child: MNode, c: Caller) -> None:
        _need(self, _W | _X, c)
        if self.perm & stat.S_ISVTX and not _privileged(c) and c.uid not in (child.uid, self.uid):
            raise _err(errno.EPERM)

    def _child(self, name: bytes) -> MNode:
        child = (self.children or {})[name]
        assert isinstance(child, MNode)
        return child

    async def unlink(self, name: bytes) -> None:
        """Remove a name of a non-directory."""
        child = self._child(name)
        self._removable(child, caller())
        child.nlink -= 1
        child.ctime = self.mtime = self.ctime = _now()

    async def rmdir(self, name: bytes) -> None:
        """Remove an empty directory."""
        child = self._child(name)
        self._removable(child, caller())
        child.nlink, self.nlink = 0, self.nlink - 1
        child.ctime = self.mtime = self.ctime = _now()

    async def rename(self, name: bytes, newparent: Node, newname: bytes, flags: int) -> None:
        """rename(2) / renameat2(2): the checks the bridge leaves to us, then times, link counts and
        parents; RENAME_WHITEOUT (4) leaves a 0/0 character device at the old name."""
        if flags & ~7 or (flags & 2 and flags & 5):
            raise _err(errno.EINVAL)
        if len(newname) > NAME_MAX:
            raise _err(errno.ENAMETOOLONG)
        assert isinstance(newparent, Dir) and newparent.children is not None
        src, dst, c = self._child(name), newparent.children.get(newname), caller()
        assert dst is None or isinstance(dst, MNode)
        _need(newparent, _X, c)
        self._removable(src, c)
        if dst is not None:
            newparent._removable(dst, c)
        _need(newparent, _W | _X, c)
        moved = [(d, into) for d, into in ((src, newparent), (dst, self)) if isinstance(d, Dir)
                 and self is not newparent and (d is src or flags & 2)]
        for d, into in moved:
            if into.descends_from(d):
                raise _err(errno.EINVAL)
            if d is src:
                _need(d, _W, c)  # its ".." changes
        if self.nlink == 0 or newparent.nlink == 0:
            raise _err(errno.ENOENT)
        now = src.ctime = self.mtime = self.ctime = newparent.mtime = newparent.ctime = _now()
        if dst is not None:
            dst.ctime = now
            if not flags & 2:
                dst.nlink = 0 if isinstance(dst, Dir) else dst.nlink - 1
                newparent.nlink -= isinstance(dst, Dir)
        for d, into in moved:
            assert isinstance(d, Dir)
            d.parent.nlink, into.nlink, d.parent = d.parent.nlink - 1, into.nlink + 1, into
        if flags & 4:  # the bridge leaves the tree to a node that changed it: do all of it
            newparent.add_child(newname, src)
            self.remove_child(name)
            self.add_child(name, Special(self.fs, stat.S_IFCHR, c.uid, c.gid))

    def descends_from(self, d: Dir) -> bool:
        """Is ``d`` this directory or one of its ancestors?"""
        n: Dir = self
        while n is not d and n.parent is not n:
            n = n.parent
        return n is d


def _b64(b: bytes | bytearray) -> str:
    return base64.b64encode(b).decode()


class MemFS(JournaledNodeFS):
    """An in-memory filesystem; ``uid``/``gid``/``mode`` describe the root directory, ``capacity``
    (bytes; default: the machine's memory) bounds fallocate and statfs, ``persist`` keeps a state
    store (:class:`afuse.state.FileStateStore`) in that directory: restored at start, then journaled;
    ``content`` (default with ``persist``: its ``data`` subdirectory) keeps file contents on disk,
    one sparse file per inode, written through and opened lazily (:mod:`afuse.nodes.filestore`).

    ``xattr_space`` (bytes; default :data:`XATTR_SPACE`, 128 KiB) bounds the xattrs of one inode:
    each name counts its length plus one (its NUL in a listing) plus its value's length, and a
    setxattr that would go past the bound fails with ENOSPC, as ext4 (whose xattrs must fit in the
    inode and one block: ``xattr_space=4096`` is close to it) and tmpfs (bounded by its inode
    space) answer. A value longer than 64 KiB fails with E2BIG and a name longer than 255 bytes
    with ERANGE, as everywhere on Linux."""

    entry_timeout = attr_timeout = negative_timeout = 1.0

    def __init__(self, uid: int | None = None, gid: int | None = None, mode: int = 0o755,
                 capacity: int | None = None, persist: str | os.PathLike[str] | None = None,
                 content: str | os.PathLike[str] | None = None, xattr_space: int = XATTR_SPACE) -> None:
        if xattr_space < 0:
            raise ValueError(f"xattr_space must be at least 0, not {xattr_space}")
        #: The xattr space of one inode (bytes).
        self.xattr_space = xattr_space
        if capacity is None:
            try:
                capacity = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            except (ValueError, OSError):
                capacity = 1 << 32
        self.pool, self.lock_waits, self._serial = ChunkPool(capacity), LockWaits(), 1
        self.lock_waits.changed = self._locks_changed
        if persist is not None and content is None:
            content = os.path.join(os.fspath(persist), CONTENT_DIR)
        #: Where file contents live (None: in memory).
        self.content = None if content is None else ContentStore(content)
        self._restored: dict[int, MNode] = {}
        root = Dir(self, stat.S_IFDIR | (mode & 0o7777), os.getuid() if uid is None else uid,
                   os.getgid() if gid is None else gid, None, serial=1)
        super().__init__(root, types=[File, Dir, Symlink, Special, _Open])
        self.persist = None if persist is None else os.fspath(persist)
        self._store = None if self.persist is None else FileStateStore(self.persist)
        if self._store is not None:
            if self._store.load_into(self):
                log.info("restored MemFS from %s: %d inodes", self.persist, len(self.nodes))
            elif self.content is not None:
                self.content.clear()  # contents of another filesystem
            self._store.attach(self)  # a snapshot now, then a journal of every change

    def _new_serial(self) -> int:
        self._serial += 1
        return self._serial

    @property
    def inode_count(self) -> int:
        """Inodes alive (forgotten, unlinked, closed ones go away)."""
        return len(self.nodes)

    # -- requests the nodes cannot answer alone

    async def lookup(self, req: r.LookupRequest) -> Entry:
        """Also "." and ".." (asked with export support), and the search permission."""
        d = self.node(req.nodeid)
        if req.name in (b".", b".."):
            if req.name == b".." and not isinstance(d, Dir):
                raise _err(errno.ENOTDIR)
            return await self._entry(d.parent if isinstance(d, Dir) and req.name == b".." else d)
        if isinstance(d, Dir):
            _need(d, _X, Caller.of(req))
        if len(req.name) > NAME_MAX:
            raise _err(errno.ENAMETOOLONG)
        return await super().lookup(req)

    async def opendir(self, req: r.OpendirRequest) -> Handle:
        """Needs read permission."""
        if isinstance(d := self.node(req.nodeid), Dir):
            _need(d, _R, Caller.of(req))
        return await super().opendir(req)

    async def write(self, req: r.WriteRequest) -> int:
        """O_APPEND writes go to the end this filesystem knows (without the writeback cache)."""
        n = self.node(req.nodeid)
        if not isinstance(n, File):
            raise _err(errno.EINVAL)
        n.data.write(n.size if req.flags & os.O_APPEND and not req.write_flags & 1 else req.offset, req.data)
        n.mtime = n.ctime = _now()
        return len(req.data)

    async def flush(self, req: r.FlushRequest) -> None:
        """close(2) of any descriptor drops the process's POSIX locks on the file."""
        if isinstance(n := self.nodes.get(req.nodeid), File):
            n.locks.drop_posix(req.lock_owner)

    async def release(self, req: r.ReleaseRequest) -> None:
        """Locks of the owner go, then the open file."""
        if isinstance(n := self.nodes.get(req.nodeid), File):
            n.locks.drop_posix(req.lock_owner)
        await super().release(req)

    async def fsyncdir(self, req: r.FsyncdirRequest) -> None:
        """Nothing to do."""

    async def statx(self, req: r.StatxRequest) -> Statx:
        """With the birth time."""
        n = self.node(req.nodeid)
        assert isinstance(n, MNode)
        a = await n.getattr()

        def ts(ns: int) -> Timestamp:
            return Timestamp(*divmod(ns, 1_000_000_000))
        return Statx(mask=0xFFF, blksize=_BLK, nlink=a.nlink, uid=a.uid, gid=a.gid, mode=a.mode, ino=a.ino,
                     size=a.size, blocks=a.blocks, atime=ts(a.atime_ns), btime=ts(n.btime), ctime=ts(a.ctime_ns),
                     mtime=ts(a.mtime_ns), rdev_major=os.major(a.rdev), rdev_minor=os.minor(a.rdev))

    async def tmpfile(self, req: r.TmpfileRequest) -> tuple[Entry, Handle]:
        """O_TMPFILE: an open file without a name."""
        d, c = self.node(req.nodeid), Caller.of(req)
        assert isinstance(d, Dir)
        _need(d, _W | _X, c)
        if d.nlink == 0:
            raise _err(errno.ENOENT)
        gid = d.gid if d.perm & stat.S_ISGID else c.gid
        mode = stat.S_IFREG | (req.mode & 0o7777 & ~req.umask)
        if mode & 0o2010 == 0o2010 and not _privileged(c) and not c.in_group(gid):
            mode &= ~stat.S_ISGID
        f = File(self, mode, c.uid, gid)
        f.nlink = 0
        entry = await self._entry(f)
        return entry, self._opened(f, _Open(f), "tmpfile", req.flags)

    # -- persistence: a snapshot of the inodes and tables, then the journaled requests (JournaledNodeFS)

    @classmethod
    def load(cls, path: str | os.PathLike[str], **kwargs: Any) -> MemFS:
        """A MemFS restored from directory ``path`` (FileNotFoundError if it holds no state)."""
        if not os.path.exists(snap := os.path.join(os.fspath(path), SNAPSHOT)):
            raise FileNotFoundError(errno.ENOENT, "no MemFS state", snap)
        return cls(persist=path, **kwargs)

    def set_journal(self, journal: Any) -> None:
        """Journal changes (see :class:`JournaledNodeFS`); with a content store, WRITE is not journaled:
        its bytes are in the store already."""
        super().set_journal(journal)
        if self.content is not None:
            self.__dict__.pop("write", None)

    def close_journal(self) -> None:
        """Stop journaling; the filesystem keeps working in memory."""
        if self._store is not None:
            self._store.close()
            self._store = None
            self.set_journal(None)

    # -- locks are kept state: in the snapshot and journaled as they change -----------------------

    def _fh_of(self, holder: object) -> int | None:
        return next((fh for fh, (_n, h) in self._handles.items() if h is holder), None)

    def _holder_of(self, fh: int) -> object | None:
        got = self._handles.get(fh)
        return None if got is None else got[1]

    def _locks_changed(self, locks: FileLocks) -> None:
        if self._sink is not None and isinstance(n := locks.tag, File):
            self.journal_locks(n.key, locks.dump(self._fh_of))

    def restore_locks(self, locks: Iterable[list[Any]]) -> None:
        """The POSIX and flock locks of files (snapshot, or a journal record)."""
        for key, state in locks:
            n = self._restored.get(key) or self.node_by_key(key)
            if isinstance(n, File):
                n.locks.load(state, self._holder_of)

    def dump_state(self) -> dict[str, Any]:
        """A JSON snapshot: every inode (data base64), the tree, the bridge's tables, the locks."""
        inodes, stack, seen = [], [self.root, *self.nodes.values()], set()
        locks = []
        while stack:
            n = stack.pop()
            if id(n) in seen:
                continue
            seen.add(id(n))
            assert isinstance(n, MNode)
            extra: Any = None
            size: int | None = n.size
            if isinstance(n, File):
                if isinstance(n.data, StoredData):
                    extra, size = "stored", None  # the store has it: read when needed
                else:
                    extra = {str(k): None if v is None else _b64(v) for k, v in n.data.chunks.items()}
                if n.locks.posix or n.locks.flocks:
                    locks.append([n.key, n.locks.dump(self._fh_of)])
            elif isinstance(n, Dir):
                assert n.children is not None
                ck = n._cookies
                # the directory offsets too: a successor answers those its predecessor gave the kernel
                cookies = None if ck is None else [ck.next, [ck.by_name.get(k, 0) for k in n.children]]
                extra = [n.parent.key, [[_b64(k), c.key] for k, c in n.children.items()], cookies]
                stack.extend(n.children.values())
            elif isinstance(n, Symlink):
                extra = _b64(n.target)
            inodes.append([type(n).__name__, n.key, n.perm, n.nlink, n.uid, n.gid, n.rdev, size, n.atime,
                           n.mtime, n.ctime, n.btime, {_b64(k): _b64(v) for k, v in n.xattrs.items()}, extra])
        return {"inodes": inodes, "next_serial": self._serial, "capacity": self.pool.capacity * CHUNK,
                "locks": locks, **super().dump_state()}

    def restore_state(self, state: dict[str, Any]) -> None:
        """Become the filesystem of ``state`` (from :meth:`dump_state`; journal records folded in are
        redone through the handlers)."""
        if self.content is not None:
            self.content.replaying = True  # the stored contents are final: nothing is written again
            try:
                self._restore_state(state)
            finally:
                self.content.replaying = False
        else:
            self._restore_state(state)

    def _restore_state(self, state: dict[str, Any]) -> None:
        made: dict[int, MNode] = {}
        unb64 = base64.b64decode
        for kind, key, perm, nlink, uid, gid, rdev, size, at, mt, ct, bt, xattrs, extra in state["inodes"]:
            n: MNode
            if kind == "File":
                n = File(self, perm, uid, gid, key)
                if isinstance(n.data, SparseData):
                    if extra == "stored":
                        raise ValueError("this state keeps contents in a store: MemFS(content=...) reads them")
                    n.data.chunks = {int(k): None if v is None else bytearray(unb64(v)) for k, v in extra.items()}
                    self.pool.used += len(n.data.chunks)
                elif extra != "stored":
                    raise ValueError("this state holds its contents in the snapshot: MemFS without content")
            elif kind == "Dir":
                n = self.root if key == 1 else Dir(self, perm, uid, gid, None, key)  # type: ignore[assignment]
            else:
                n = Symlink(self, unb64(extra), uid, gid, key) if kind == "Symlink" else \
                    Special(self, perm, uid, gid, key)
            n.perm, n.nlink, n.rdev = perm, nlink, rdev
            if size is not None:
                n.size = size
            n.atime, n.mtime, n.ctime, n.btime = at, mt, ct, bt
            n.xattrs = {unb64(k): unb64(v) for k, v in xattrs.items()}
            n.xattr_used = sum(len(k) + 1 + len(v) for k, v in n.xattrs.items())
            made[key] = n
        for _kind, key, *_, extra in state["inodes"]:
            if isinstance(d := made[key], Dir):
                d.parent = made[extra[0]]  # type: ignore[assignment]
                for name, child in extra[1]:
                    d.add_child(unb64(name), made[child])
                if len(extra) > 2 and extra[2] is not None and all(extra[2][1]):
                    next_cookie, cookies = extra[2]
                    d._cookies = _Cookies.restored(
                        next_cookie, zip((unb64(name) for name, _ in extra[1]), cookies, strict=True))
        self._serial, self._restored = state["next_serial"], made
        self.pool.capacity = state["capacity"] // CHUNK
        super().restore_state(state)

    def restore_node(self, key: Any) -> Node | None:
        """An inode of the snapshot outside the tree (unlinked, still open or looked up)."""
        return self._restored.get(key)


def main(argv: Sequence[str] | None = None) -> int:
    """Mount a fresh MemFS on the mount point given on the command line, until Ctrl-C or unmount."""
    from afuse.examples._cli import Events, add_failover_arguments, make_parser, run_example, run_failover

    parser = make_parser("An in-memory POSIX filesystem: everything is gone at unmount "
                         "(unless --persist or --keeper).", prog="python -m afuse.examples.memfs")
    parser.add_argument("--persist", metavar="DIR", help="journal every change in DIR; restore what DIR holds")
    parser.add_argument("--xattr-space", metavar="BYTES", type=int, default=XATTR_SPACE,
                        help="the xattr space of one inode: names (each +1) and values; more is ENOSPC "
                        f"(default {XATTR_SPACE}; 4096 is close to ext4)")
    add_failover_arguments(parser, "memfs")
    args = parser.parse_args(argv)
    if args.xattr_space < 0:
        parser.error("--xattr-space must be at least 0")
    if args.keeper is None and args.state_dir is None:
        return run_example(MemFS(persist=args.persist, xattr_space=args.xattr_space), args, argv=argv)
    if args.state_dir is None or args.persist is not None:
        parser.error("failover needs --state-dir (and takes no --persist: the state dir holds the journal)")
    events = Events(args.events)
    events("start")
    fs = MemFS(content=os.path.join(args.state_dir, CONTENT_DIR), xattr_space=args.xattr_space)
    try:
        return run_failover(fs, args, "memfs", probe=events.probe if args.events else None,
                            on_drain=lambda: events("drain"), on_serving=lambda: events("serving"),
                            module="afuse.examples.memfs", argv=argv)
    finally:
        events("exit")


if __name__ == "__main__":
    sys.exit(main())
