"""An in-memory POSIX filesystem on nodes: ``python -m afuse.examples.memfs MOUNTPOINT [-o OPTS] [--debug]
[--persist DIR] [--keeper SOCKET --state-dir DIR [--upgrade]]``.

Each inode is a node (:mod:`afuse.nodes`); the bridge keeps nodeids, lookup counts, handles and the
tree. Regular files hold their data sparsely in 64 KiB chunks (holes are real for
SEEK_DATA/SEEK_HOLE, fallocate punches them); there are directories, symlinks, hard links, device
nodes, fifos, sockets, rename with RENAME_NOREPLACE / RENAME_EXCHANGE / RENAME_WHITEOUT, extended
attributes, owners, modes and nanosecond times, POSIX record locks and flock(2) locks (waiting when
asked, cancellable by an interrupt, with deadlock detection), O_TMPFILE, copy_file_range and statx
with a birth time. Permissions are checked here too — against the caller's uid, gid and
supplementary groups (:func:`afuse.nodes.current_caller`) — so the filesystem behaves the same
with or without ``-o default_permissions``.

Persistence (``persist=DIR``): ``DIR/journal`` is an append-only log of every request that changed
something (with the time it took effect), plus one record per READDIRPLUS entry the kernel took,
each appended with one ``write`` before the reply. Restoring redoes the requests through the same
handlers with the recorded clock and callers, which reproduces contents, attributes, nodeids,
lookup counts and open handles, so a successor can take over the live connection. A resent request
whose first attempt is in the journal gets that attempt's result. Locks and read atimes are not
kept. For a compacted store (:mod:`afuse.state`, failover) MemFS is ``Persistent``: a JSON snapshot
of the inodes and the bridge's tables, with the journal's records redone by :meth:`restore_state`.
"""

from __future__ import annotations

import base64
import errno
import logging
import os
import pickle
import stat
import struct
import sys
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from typing import Any

import attrs
import trio

from afuse.errors import FUSEError
from afuse.nodes import Caller, FileHandle, Node, NodeFS, current_caller
from afuse.wire import requests as r
from afuse.wire.opcodes import STATEFUL_HANDLERS
from afuse.wire.types import Attr, DirEntry, Entry, FsStats, Handle, IoctlReply, Lock, Statx, Timestamp

__all__ = ["CHUNK", "File", "MemFS", "main"]

CHUNK = 1 << 16  #: bytes per data chunk of a regular file
_ZEROS = memoryview(bytes(CHUNK))
NAME_MAX, PATH_MAX, XATTR_SIZE_MAX, MAX_FILE_SIZE = 255, 4096, 1 << 16, 0x7FFFFFFFFFFFFFFF
_DIRENT, _BLK, _NO_IDS = 20, 4096, 0xFFFFFFFF  # dir size per entry (as tmpfs), block size, "no caller ids"
_R, _W, _X = 4, 2, 1
F_RDLCK, F_WRLCK, F_UNLCK = 0, 1, 2
_MAX_DEADLK_STEPS = 10
log = logging.getLogger("afuse.examples.memfs")
_now = time.time_ns  # replaced by the recorded clock while a journal is redone
_replay_caller: Caller | None = None  # the recorded caller while a journal is redone


def _err(code: int) -> FUSEError:
    return FUSEError(code)


def _who() -> Caller:
    return _replay_caller or current_caller()


def _privileged(c: Caller) -> bool:
    return c.uid in (0, _NO_IDS)


def _may(n: MNode, mask: int, c: Caller | None = None) -> bool:
    """May the caller access ``n`` for ``mask`` (R 4 / W 2 / X 1), honouring supplementary groups?"""
    c = c or _who()
    if _privileged(c):
        return not mask & _X or n.is_dir or bool(n.perm & 0o111)
    bits = n.perm >> 6 if c.uid == n.uid else n.perm >> 3 if c.in_group(n.gid) else n.perm
    return bits & mask == mask


def _need(n: MNode, mask: int) -> None:
    if not _may(n, mask):
        raise _err(errno.EACCES)


class MNode(Node):
    """An inode: attributes and extended attributes. ``key`` is a serial number (its identity in
    snapshots); the inode number is the nodeid."""

    def __init__(self, fs: MemFS, mode: int, uid: int, gid: int, serial: int = 0) -> None:
        super().__init__(mode, key=serial or fs._new_serial())
        self.fs, self.perm, self.uid, self.gid, self.rdev, self.size = fs, mode, uid, gid, 0, 0
        self.nlink = 1
        self.atime = self.mtime = self.ctime = self.btime = _now()
        self.xattrs: dict[bytes, bytes] = {}
        self.opens = 0

    @property
    def blocks(self) -> int:
        """512-byte blocks in use."""
        return 0

    async def getattr(self) -> Attr:
        """The inode's attributes."""
        return Attr(self.nodeid, self.perm, self.nlink, self.uid, self.gid, self.rdev, self.size, self.blocks,
                    self.atime, self.mtime, self.ctime, _BLK)

    async def access(self, mask: int) -> None:
        """access(2)."""
        if mask & 7 and not _may(self, mask & 7):
            raise _err(errno.EACCES)

    async def setattr(self, req: r.SetattrRequest) -> Attr:
        """chmod, chown, truncate, utimes: everything checked first, so a refusal changes nothing."""
        c = _who()
        priv = _privileged(c)
        owner = priv or c.uid == self.uid
        new_uid = self.uid if req.new_uid is None else req.new_uid
        new_gid = self.gid if req.new_gid is None else req.new_gid
        if (req.new_uid is not None or req.new_gid is not None) and not priv and (
                c.uid != self.uid or new_uid != self.uid or (new_gid != self.gid and not c.in_group(new_gid))):
            raise _err(errno.EPERM)
        perm = self.perm
        if req.mode is not None:
            bits, old = req.mode & 0o7777, self.perm & 0o7777
            if not owner and ((bits ^ old) & ~0o6000 or bits & ~old):
                raise _err(errno.EPERM)  # others may only drop suid/sgid (the kernel's killpriv)
            if not priv and not c.in_group(new_gid):
                bits &= ~stat.S_ISGID
            perm = stat.S_IFMT(self.perm) | bits
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
        now, changed = _now(), False
        if req.new_uid is not None or req.new_gid is not None:
            self.uid, self.gid, changed = new_uid, new_gid, True
        if req.mode is not None:
            self.perm, changed = perm, True
        if req.size is not None:
            assert isinstance(self, File)
            self.truncate(req.size)
            self.mtime, changed = now, True
        for name in ("atime", "mtime"):
            ns, at_now = getattr(req, name + "_ns"), getattr(req, name + "_now")
            if ns is not None or at_now:
                setattr(self, name, now if ns is None else ns)
                changed = True
        if req.ctime_ns is not None or changed:
            self.ctime = now if req.ctime_ns is None else req.ctime_ns
        return await self.getattr()

    # -- extended attributes

    def _xattr_check(self, name: bytes, mask: int) -> None:
        if not name:
            raise _err(errno.EINVAL)
        if len(name) > 255:
            raise _err(errno.ERANGE)
        c = _who()
        if name.startswith(b"user.") and c.uid and not _may(self, mask, c):
            raise _err(errno.EACCES)
        if name.startswith(b"trusted.") and not _privileged(c):
            raise _err(errno.EPERM)

    async def setxattr(self, name: bytes, value: bytes, flags: int) -> None:
        """Set ``name`` (XATTR_CREATE 1 / XATTR_REPLACE 2); no POSIX ACLs (``system.``)."""
        if name.startswith(b"system."):
            raise _err(errno.EOPNOTSUPP)
        self._xattr_check(name, _W)
        if len(value) > XATTR_SIZE_MAX:
            raise _err(errno.E2BIG)
        if (flags & 1 and name in self.xattrs) or (flags & 2 and name not in self.xattrs):
            raise _err(errno.EEXIST if flags & 1 else errno.ENODATA)
        self.xattrs[name] = value
        self.ctime = _now()

    async def getxattr(self, name: bytes) -> bytes:
        """The value of ``name``."""
        self._xattr_check(name, _R)
        if name not in self.xattrs:
            raise _err(errno.ENODATA)
        return self.xattrs[name]

    async def listxattr(self) -> list[bytes]:
        """Names (``trusted.`` ones for privileged callers only)."""
        priv = _privileged(_who())
        return [k for k in self.xattrs if priv or not k.startswith(b"trusted.")]

    async def removexattr(self, name: bytes) -> None:
        """Remove ``name``."""
        self._xattr_check(name, _W)
        if self.xattrs.pop(name, None) is None:
            raise _err(errno.ENODATA)
        self.ctime = _now()

    def forgotten(self) -> None:
        """Dropped by the bridge (no name, no kernel reference): free the data."""


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
    """A regular file: ``chunks`` maps a chunk index to its bytes (shorter reads as zeros; None:
    allocated, unwritten; absent: a hole)."""

    def __init__(self, fs: MemFS, mode: int, uid: int, gid: int, serial: int = 0) -> None:
        super().__init__(fs, mode, uid, gid, serial)
        self.chunks: dict[int, bytearray | None] = {}
        self.plocks: list[tuple[int, int, int, int, int]] = []  # owner, type, start, end (inclusive), pid
        self.flocks: dict[int, int] = {}  # fh -> F_RDLCK / F_WRLCK
        self.lock_event: trio.Event | None = None

    @property
    def blocks(self) -> int:
        """512-byte blocks in use (written chunks rounded to 4 KiB, allocated ones whole)."""
        return sum(CHUNK if b is None else (len(b) + _BLK - 1) & ~(_BLK - 1) for b in self.chunks.values()) >> 9

    def forgotten(self) -> None:
        """Free the data."""
        self.fs._used_chunks -= len(self.chunks)
        self.chunks.clear()

    def _store(self, idx: int, rel: int, piece: bytes | bytearray | memoryview) -> None:
        ba = self.chunks.get(idx)
        if ba is None:
            self.fs._used_chunks += idx not in self.chunks
            self.chunks[idx] = ba = bytearray(rel)
        elif len(ba) < rel:
            ba += _ZEROS[: rel - len(ba)]
        ba[rel : rel + len(piece)] = piece

    def pread(self, off: int, size: int) -> bytes:
        """The bytes at ``off`` (zeros in holes; nothing past the end)."""
        end = min(off + size, self.size)
        parts: list[bytes | bytearray | memoryview] = []
        while off < end:
            idx, rel = divmod(off, CHUNK)
            take = min(CHUNK - rel, end - off)
            ba = self.chunks.get(idx) or b""
            got = memoryview(ba)[rel : rel + take]
            parts += [got, _ZEROS[: take - len(got)]]
            off += take
        out = b"".join(parts)
        parts.clear()  # release the memoryviews: the bytearrays stay resizable
        return out

    def pwrite(self, off: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``off``."""
        if off + len(data) > MAX_FILE_SIZE:
            raise _err(errno.EFBIG)
        mv, pos = memoryview(data), 0
        while pos < len(data):
            idx, rel = divmod(off + pos, CHUNK)
            take = min(CHUNK - rel, len(data) - pos)
            self._store(idx, rel, mv[pos : pos + take])
            pos += take
        self.size = max(self.size, off + len(data))

    def truncate(self, size: int) -> None:
        """Cut (freeing chunks) or extend with a hole."""
        if size < self.size:
            self.punch(size, max(self.size, size))
        self.size = size

    def punch(self, off: int, end: int) -> None:
        """Make [off, end) read as zeros, freeing chunks that hold nothing else."""
        first, last = off // CHUNK, (end - 1) // CHUNK
        keys = range(first, last + 1) if last - first < len(self.chunks) else sorted(
            k for k in self.chunks if first <= k <= last)
        for k in keys:
            if k not in self.chunks:
                continue
            a, b = max(off - k * CHUNK, 0), min(end - k * CHUNK, CHUNK)
            ba = self.chunks[k]
            if ba is not None and a < len(ba):
                if b >= len(ba):
                    del ba[a:]
                else:
                    ba[a:b] = _ZEROS[: b - a]
            if (a == 0 and b == CHUNK) or (ba is not None and not any(ba)):
                del self.chunks[k]
                self.fs._used_chunks -= 1

    async def open(self, flags: int) -> _Open:
        """Check the access asked for; O_TRUNC empties the file."""
        acc = flags & os.O_ACCMODE
        mask = (_R if acc == os.O_RDONLY else _W if acc == os.O_WRONLY else _R | _W) | (_W if flags & os.O_TRUNC else 0)
        if not _privileged(_who()):
            _need(self, mask)
        if flags & os.O_TRUNC and self.size:
            self.truncate(0)
            self.mtime = self.ctime = _now()
        return _Open(self)

    async def read(self, offset: int, size: int) -> bytes:
        """Read (relatime: atime moves when it is older than mtime)."""
        if self.atime <= self.mtime:
            self.atime = _now()
        return self.pread(offset, size)

    async def fsync(self, datasync: int) -> None:
        """Nothing to do in memory."""

    async def fallocate(self, off: int, length: int, mode: int) -> None:
        """Allocate (1: keep size) or punch a hole (3)."""
        if off < 0 or length <= 0:
            raise _err(errno.EINVAL)
        if mode & ~3 or (mode & 2 and not mode & 1):
            raise _err(errno.EOPNOTSUPP)
        end = off + length
        if end > MAX_FILE_SIZE:
            raise _err(errno.EFBIG)
        now = self.ctime = _now()
        if mode & 2:
            self.punch(off, end)
            self.mtime = now
            return
        missing = [k for k in range(off // CHUNK, (end - 1) // CHUNK + 1) if k not in self.chunks]
        if len(missing) > self.fs._capacity - self.fs._used_chunks:
            raise _err(errno.ENOSPC)
        self.chunks.update(dict.fromkeys(missing))
        self.fs._used_chunks += len(missing)
        if not mode & 1 and end > self.size:
            self.size, self.mtime = end, now

    async def lseek(self, off: int, whence: int) -> int:
        """SEEK_DATA (3) / SEEK_HOLE (4): a chunk with bytes is data."""
        if whence not in (3, 4):
            raise _err(errno.EINVAL)
        if off < 0 or off >= self.size:
            raise _err(errno.ENXIO)
        k = off // CHUNK
        if whence == 3:
            if self.chunks.get(k):
                return off
            after = [i for i, b in self.chunks.items() if i > k and b]
            if not after or min(after) * CHUNK >= self.size:
                raise _err(errno.ENXIO)
            return min(after) * CHUNK
        while self.chunks.get(k):
            k += 1
        return min(max(off, k * CHUNK), self.size)

    async def copy_file_range(self, off: int, out: _Open | None, out_off: int, length: int, flags: int) -> int:
        """Copy bytes; a hole stays a hole."""
        if flags or out is None or off < 0 or out_off < 0:
            raise _err(errno.EINVAL if out is not None else errno.EBADF)
        dst, count = out.node, min(length, self.size - off)
        if count <= 0:
            return 0
        if dst is self and off < out_off + count and out_off < off + count:
            raise _err(errno.EINVAL)
        if out_off + count > MAX_FILE_SIZE:
            raise _err(errno.EFBIG)
        pos = 0
        while pos < count:
            k, rel = divmod(off + pos, CHUNK)
            take, at = min(CHUNK - rel, count - pos), out_off + pos
            if self.chunks.get(k):
                dst.pwrite(at, self.pread(off + pos, take))
            else:
                dst.punch(at, at + take)
                dst.size = max(dst.size, at + take)
            pos += take
        dst.mtime = dst.ctime = _now()
        return count

    # -- locks

    def wake(self) -> None:
        """Wake lock waiters."""
        ev, self.lock_event = self.lock_event, None
        if ev is not None:
            ev.set()

    async def wait(self) -> None:
        """Until a lock is dropped (cancellable: an INTERRUPT)."""
        if self.lock_event is None:
            self.lock_event = trio.Event()
        await self.lock_event.wait()

    def conflict(self, owner: int, typ: int, start: int, end: int) -> tuple[int, int, int, int, int] | None:
        """A POSIX lock of another owner in the way."""
        for lk in self.plocks:
            if lk[0] != owner and lk[2] <= end and start <= lk[3] and (typ == F_WRLCK or lk[1] == F_WRLCK):
                return lk
        return None

    def set_plock(self, owner: int, typ: int, start: int, end: int, pid: int) -> None:
        """Give ``owner`` ``typ`` on [start, end] (F_UNLCK: drop), merging its own locks as Linux."""
        keep = []
        for o, t, s, e, p in self.plocks:
            if o != owner or e < start - 1 or s > end + 1 or (t != typ and (e < start or s > end)):
                keep.append((o, t, s, e, p))
            elif t == typ and typ != F_UNLCK:
                start, end = min(s, start), max(e, end)
            else:
                keep += [(o, t, s, start - 1, p)] * (s < start) + [(o, t, end + 1, e, p)] * (e > end)
        self.plocks = keep + [(owner, typ, start, end, pid)] * (typ != F_UNLCK)
        self.wake()

    def drop_locks(self, owner: int) -> None:
        """close(2) drops the process's POSIX locks on the file."""
        if any(lk[0] == owner for lk in self.plocks):
            self.set_plock(owner, F_UNLCK, 0, MAX_FILE_SIZE, 0)


class _Open(FileHandle):
    """An open file (flock locks belong to it)."""

    def __init__(self, node: File) -> None:
        self.node = node
        node.opens += 1

    async def release(self) -> None:
        """The last close: flock locks go."""
        self.node.opens -= 1
        if self.node.flocks.pop(id(self), None) is not None:
            self.node.wake()

    async def getlk(self, req: r.GetlkRequest) -> Lock:
        """F_GETLK."""
        lk = req.lock
        if lk.type not in (F_RDLCK, F_WRLCK):
            raise _err(errno.EINVAL)
        c = self.node.conflict(req.owner, lk.type, lk.start, lk.end)
        return Lock(lk.start, lk.end, F_UNLCK, 0) if c is None else Lock(c[2], c[3], c[1], c[4])

    async def setlk(self, req: r.SetlkRequest) -> None:
        """F_SETLK / F_SETLKW (EDEADLK when waiting would close a cycle)."""
        n, lk, owner = self.node, req.lock, req.owner
        if lk.start < 0 or lk.end < lk.start or lk.type not in (F_RDLCK, F_WRLCK, F_UNLCK):
            raise _err(errno.EINVAL)
        while lk.type != F_UNLCK and (c := n.conflict(owner, lk.type, lk.start, lk.end)) is not None:
            if not req.sleep:
                raise _err(errno.EAGAIN)
            if n.fs._deadlock(owner, c[0]):
                raise _err(errno.EDEADLK)
            n.fs._waiting[owner] = (n, lk.type, lk.start, lk.end)
            try:
                await n.wait()
            finally:
                n.fs._waiting.pop(owner, None)
        n.set_plock(owner, lk.type, lk.start, lk.end, lk.pid)

    async def flock(self, req: r.SetlkRequest) -> None:
        """flock(2): a conversion drops the old lock first, as Linux does."""
        n, typ, me = self.node, req.lock.type, id(self)
        if typ not in (F_RDLCK, F_WRLCK, F_UNLCK):
            raise _err(errno.EINVAL)
        cur = n.flocks.get(me)
        if cur == typ:
            return
        if cur is not None:
            del n.flocks[me]
            n.wake()
        if typ == F_UNLCK:
            return
        while any(o != me and (typ == F_WRLCK or t == F_WRLCK) for o, t in n.flocks.items()):
            if not req.sleep:
                raise _err(errno.EWOULDBLOCK)
            await n.wait()
        n.flocks[me] = typ

    async def poll(self, req: r.PollRequest) -> int:
        """Always ready."""
        return 0x1 | 0x4

    async def ioctl(self, req: r.IoctlRequest) -> IoctlReply:
        """None."""
        raise _err(errno.ENOTTY)


class Dir(MNode):
    """A directory (the bridge keeps its ``children``; ``parent`` is for ".." and rename checks)."""

    # No FOPEN_CACHE_DIR: a listing cached by one open directory continues, once a change drops the
    # cache, with offsets of its own snapshot on another one (see the bridge's directory offsets).

    def __init__(self, fs: MemFS, mode: int, uid: int, gid: int, parent: Dir | None, serial: int = 0) -> None:
        super().__init__(fs, mode, uid, gid, serial)
        self.nlink, self.parent = 2, parent or self

    async def getattr(self) -> Attr:
        """Attributes; the size grows with the entries, as tmpfs counts."""
        assert self.children is not None
        self.size = (2 + len(self.children)) * _DIRENT
        return await super().getattr()

    async def statfs(self) -> FsStats:
        """Capacity and use."""
        per, fs = CHUNK // _BLK, self.fs
        blocks, free = fs._capacity * per, max(0, (fs._capacity - fs._used_chunks) * per)
        files = max(fs._capacity, len(fs.nodes))
        return FsStats(blocks=blocks, bfree=free, bavail=free, files=files, ffree=files - len(fs.nodes),
                       bsize=_BLK, namelen=NAME_MAX, frsize=_BLK)

    def _new(self, name: bytes, mode: int) -> tuple[int, int, int]:
        """Checks of creating ``name`` (in Linux's order); uid, gid and mode of the new inode."""
        c = _who()
        if len(name) > NAME_MAX:
            raise _err(errno.ENAMETOOLONG)
        if not _privileged(c) and not _may(self, _X, c):
            raise _err(errno.EACCES)
        if self.nlink == 0:
            raise _err(errno.ENOENT)
        if not _privileged(c) and not _may(self, _W | _X, c):
            raise _err(errno.EACCES)
        gid = c.gid
        if self.perm & stat.S_ISGID:  # setgid directories hand down their group (and the bit to directories)
            gid = self.gid
            mode |= stat.S_ISGID if stat.S_ISDIR(mode) else 0
        if mode & 0o2010 == 0o2010 and not stat.S_ISDIR(mode) and not _privileged(c) and not c.in_group(gid):
            mode &= ~stat.S_ISGID
        self.mtime = self.ctime = _now()
        return c.uid, gid, mode

    async def create(self, name: bytes, flags: int, mode: int) -> tuple[File, _Open]:
        """A new file, open."""
        uid, gid, mode = self._new(name, mode)
        f = File(self.fs, mode, uid, gid)
        return f, _Open(f)

    async def mknod(self, name: bytes, mode: int, rdev: int) -> MNode:
        """A regular file, device node, fifo or socket."""
        typ = stat.S_IFMT(mode)
        if typ == stat.S_IFDIR:
            raise _err(errno.EPERM)
        if typ not in (0, stat.S_IFREG, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK):
            raise _err(errno.EINVAL)
        uid, gid, mode = self._new(name, (typ or stat.S_IFREG) | (mode & 0o7777))
        if typ in (0, stat.S_IFREG):
            return File(self.fs, mode, uid, gid)
        n = Special(self.fs, mode, uid, gid)
        n.rdev = rdev if typ in (stat.S_IFCHR, stat.S_IFBLK) else 0
        return n

    async def mkdir(self, name: bytes, mode: int) -> Dir:
        """A new directory."""
        uid, gid, mode = self._new(name, mode)
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
        node.nlink += 1
        node.ctime = self.mtime
        return node

    def _removable(self, child: MNode) -> None:
        c = _who()
        if not _privileged(c):
            _need(self, _W | _X)
            if self.perm & stat.S_ISVTX and c.uid not in (child.uid, self.uid):
                raise _err(errno.EPERM)

    def _child(self, name: bytes) -> MNode:
        assert self.children is not None
        child = self.children[name]
        assert isinstance(child, MNode)
        return child

    async def unlink(self, name: bytes) -> None:
        """Remove a name of a non-directory."""
        child = self._child(name)
        self._removable(child)
        child.nlink -= 1
        child.ctime = self.mtime = self.ctime = _now()

    async def rmdir(self, name: bytes) -> None:
        """Remove an empty directory."""
        child = self._child(name)
        self._removable(child)
        child.nlink, self.nlink = 0, self.nlink - 1
        child.ctime = self.mtime = self.ctime = _now()

    async def rename(self, name: bytes, newparent: Node, newname: bytes, flags: int) -> None:
        """rename(2) / renameat2(2): the checks the bridge leaves to us, then times, link counts,
        parents; RENAME_WHITEOUT (4) leaves a 0/0 character device at the old name."""
        if flags & ~7 or (flags & 2 and flags & 5):
            raise _err(errno.EINVAL)
        assert isinstance(newparent, Dir) and newparent.children is not None
        if len(newname) > NAME_MAX:
            raise _err(errno.ENAMETOOLONG)
        src, dst, c = self._child(name), newparent.children.get(newname), _who()
        assert dst is None or isinstance(dst, MNode)
        if not _privileged(c):
            _need(newparent, _X)
        self._removable(src)
        if dst is not None:
            newparent._removable(dst)
        elif not _privileged(c):
            _need(newparent, _W | _X)
        moving = [n for n in (src, dst if flags & 2 else None) if isinstance(n, Dir)]
        for d, into in ((src, newparent), (dst, self)):
            if isinstance(d, Dir) and self is not newparent and (d is src or flags & 2):
                if into.descends_from(d):
                    raise _err(errno.EINVAL)
                if d is src and not _privileged(c):
                    _need(d, _W)  # its ".." changes
        if self.nlink == 0 or newparent.nlink == 0:
            raise _err(errno.ENOENT)
        now = src.ctime = self.mtime = self.ctime = newparent.mtime = newparent.ctime = _now()
        if dst is not None:
            dst.ctime = now
            if not flags & 2:
                dst.nlink = 0 if isinstance(dst, Dir) else dst.nlink - 1
                newparent.nlink -= isinstance(dst, Dir)
        for d in moving if self is not newparent else ():
            old, new = (self, newparent) if d is src else (newparent, self)
            d.parent, old.nlink, new.nlink = new, old.nlink - 1, new.nlink + 1
        if flags & 4:  # the bridge leaves the tree to us when it changed: do all of it
            newparent.add_child(newname, src)
            self.remove_child(name)
            self.add_child(name, Special(self.fs, stat.S_IFCHR, c.uid, c.gid))

    def descends_from(self, d: Dir) -> bool:
        """Is ``d`` this directory or one of its ancestors?"""
        n: Dir = self
        while n is not d:
            if n.parent is n:
                return False
            n = n.parent
        return True


# -- the journal (persist=DIR): length-prefixed pickles of ("h", root...) then ("r", ts, handler, req,
# groups) per change and ("i", nodeid) per READDIRPLUS entry taken

_JOURNALED = tuple(h for h in STATEFUL_HANDLERS if h != "readdirplus")
_LEN = struct.Struct("<I")


def _records(path: str) -> Iterator[tuple[Any, ...]]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return
    pos = 0
    while pos + 4 <= len(data):
        (n,) = _LEN.unpack_from(data, pos)
        if pos + 4 + n > len(data):
            log.warning("journal %s: incomplete last record ignored", path)
            return
        yield pickle.loads(data[pos + 4 : pos + 4 + n])
        pos += 4 + n


def _header(directory: str) -> tuple[Any, ...] | None:
    return next((rec for rec in _records(os.path.join(directory, "journal")) if rec[0] == "h"), None)


def _run_now(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a handler that does not block (the journaled ones never do)."""
    try:
        coro.send(None)
    except StopIteration as e:
        return e.value
    coro.close()
    raise RuntimeError("a journaled handler blocked while being redone")


def _b64(b: bytes | bytearray) -> str:
    return base64.b64encode(b).decode()


def _to_json(v: Any) -> Any:
    if isinstance(v, bytes | bytearray | memoryview):
        return {"b": _b64(bytes(v))}
    if isinstance(v, list | tuple):
        return [_to_json(x) for x in v]
    if attrs.has(type(v)):
        return {"c": type(v).__name__, "f": {a.name: _to_json(getattr(v, a.name)) for a in attrs.fields(type(v))}}
    return v


def _from_json(v: Any) -> Any:
    if isinstance(v, list):
        return [_from_json(x) for x in v]
    if isinstance(v, dict):
        if "b" in v:
            return base64.b64decode(v["b"])
        return getattr(r, v["c"])(**{k: _from_json(x) for k, x in v["f"].items()})
    return v


class MemFS(NodeFS):
    """An in-memory filesystem; ``uid``/``gid``/``mode`` describe the root directory, ``capacity``
    (bytes, default: the machine's memory) bounds fallocate and statfs, ``persist`` journals."""

    entry_timeout = attr_timeout = negative_timeout = 1.0

    def __init__(self, uid: int | None = None, gid: int | None = None, mode: int = 0o755,
                 capacity: int | None = None, persist: str | os.PathLike[str] | None = None) -> None:
        self.persist = None if persist is None else os.fspath(persist)
        head = None if self.persist is None else _header(self.persist)
        born = None
        if head is not None:
            _, uid, gid, mode, capacity, born = head
        if capacity is None:
            try:
                capacity = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            except (ValueError, OSError):
                capacity = 1 << 32
        self._capacity, self._used_chunks, self._serial = max(1, capacity // CHUNK), 0, 1
        #: Lock owners blocked in setlk: owner -> (file, type, start, end), for EDEADLK.
        self._waiting: dict[int, tuple[File, int, int, int]] = {}
        self._sink: Callable[[tuple[Any, ...]], None] | None = None
        self._journal_fd: int | None = None
        self._replayed: OrderedDict[int, Any] = OrderedDict()  # request_id -> result, for resent requests
        self._restored: dict[int, MNode] = {}
        root = Dir(self, stat.S_IFDIR | (mode & 0o7777), os.getuid() if uid is None else uid,
                   os.getgid() if gid is None else gid, None, serial=1)
        root.btime = born or root.btime
        super().__init__(root, types=[File, Dir, Symlink, Special, _Open])
        if self.persist is not None:
            self._open_journal(self.persist, fresh=head is None)

    def _new_serial(self) -> int:
        self._serial += 1
        return self._serial

    @property
    def inode_count(self) -> int:
        """Inodes alive (forgotten, unlinked, closed ones go away)."""
        return len(self.nodes)

    def _deadlock(self, me: int, blocker: int) -> bool:
        for _ in range(_MAX_DEADLK_STEPS):
            if blocker == me:
                return True
            w = self._waiting.get(blocker)
            lk = None if w is None else w[0].conflict(blocker, *w[1:])
            if lk is None:
                return False
            blocker = lk[0]
        return False

    # -- requests the nodes cannot answer alone

    async def lookup(self, req: r.LookupRequest) -> Entry:
        """Also "." and ".." (asked with export support), and the search permission."""
        if req.name in (b".", b".."):
            n = self.node(req.nodeid)
            if req.name == b"..":
                if not isinstance(n, Dir):
                    raise _err(errno.ENOTDIR)
                n = n.parent
            return await self._entry(n)
        d = self.node(req.nodeid)
        if isinstance(d, Dir) and not _may(d, _X, Caller.of(req)):
            raise _err(errno.EACCES)
        if len(req.name) > NAME_MAX:
            raise _err(errno.ENAMETOOLONG)
        return await super().lookup(req)

    async def opendir(self, req: r.OpendirRequest) -> Handle:
        """Needs read permission."""
        d = self.node(req.nodeid)
        if isinstance(d, Dir) and not _may(d, _R, Caller.of(req)):
            raise _err(errno.EACCES)
        return await super().opendir(req)

    async def write(self, req: r.WriteRequest) -> int:
        """O_APPEND writes go to the end this filesystem knows (without the writeback cache)."""
        n = self.node(req.nodeid)
        if not isinstance(n, File):
            raise _err(errno.EINVAL)
        off = n.size if req.flags & os.O_APPEND and not req.write_flags & 1 else req.offset
        n.pwrite(off, req.data)
        n.mtime = n.ctime = _now()
        return len(req.data)

    def _drop_locks(self, nodeid: int, owner: int) -> None:
        n = self.nodes.get(nodeid)
        if isinstance(n, File):
            n.drop_locks(owner)

    async def flush(self, req: r.FlushRequest) -> None:
        """close(2) of any descriptor drops the process's POSIX locks on the file."""
        self._drop_locks(req.nodeid, req.lock_owner)

    async def release(self, req: r.ReleaseRequest) -> None:
        """Locks of the owner go, then the open file."""
        self._drop_locks(req.nodeid, req.lock_owner)
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
        if not _may(d, _W | _X, c):
            raise _err(errno.EACCES)
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

    # -- persistence ----------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike[str], **kwargs: Any) -> MemFS:
        """A MemFS restored from the journal in directory ``path`` (FileNotFoundError if none)."""
        if _header(os.fspath(path)) is None:
            raise FileNotFoundError(errno.ENOENT, "no MemFS journal", os.path.join(os.fspath(path), "journal"))
        return cls(persist=path, **kwargs)

    def _open_journal(self, directory: str, fresh: bool) -> None:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "journal")
        if not fresh:
            count = sum(self._apply(rec) for rec in _records(path))
            log.info("restored MemFS from %s: %d requests, %d inodes", path, count, len(self.nodes))
        fd = self._journal_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        root = self.root
        assert isinstance(root, Dir)
        if fresh:
            os.ftruncate(fd, 0)
        def append(rec: tuple[Any, ...]) -> None:
            blob = pickle.dumps(rec, protocol=pickle.HIGHEST_PROTOCOL)
            os.write(fd, _LEN.pack(len(blob)) + blob)  # one write: a crash cannot interleave records
        self._install_sink(append)
        if fresh:
            assert self._sink is not None
            self._sink(("h", root.uid, root.gid, root.perm & 0o7777, self._capacity * CHUNK, root.btime))

    def close_journal(self) -> None:
        """Stop journaling (close the file); the filesystem keeps working in memory."""
        if self._journal_fd is not None:
            os.close(self._journal_fd)
            self._journal_fd = None
            self._install_sink(None)

    def _install_sink(self, sink: Callable[[tuple[Any, ...]], None] | None) -> None:
        """Journal every change to ``sink``: the changing handlers become instance attributes
        wrapping the class's (None: the plain handlers again)."""
        self._sink = sink
        for name in (*_JOURNALED, "readdirplus"):
            self.__dict__.pop(name, None)
        if sink is not None:
            for name in _JOURNALED:
                setattr(self, name, self._journaled(name, getattr(self, name)))
            self.readdirplus = self._journaled_readdirplus  # type: ignore[method-assign]

    def _journaled(self, name: str, handler: Callable[[Any], Coroutine[Any, Any, Any]]) -> Callable[[Any], Any]:
        async def run(req: r.Request) -> Any:
            global _now
            if req.is_resend and req.request_id in self._replayed:
                return self._replayed[req.request_id]  # the first attempt's result, restored
            ts, saved = time.time_ns(), _now
            _now = lambda: ts  # noqa: E731 - one clock reading per request: a redo reproduces it
            try:
                result = await handler(req)
            finally:
                _now = saved
            if self._sink is not None and not (name == "lookup" and not result.nodeid):
                self._sink(("r", ts, name, req, tuple(current_caller().groups) if req.pid > 0 else ()))
            return result
        return run

    async def _journaled_readdirplus(self, req: r.ReaddirplusRequest) -> AsyncIterator[DirEntry]:
        entries = await type(self).readdirplus(self, req)
        return self._count_taken(entries)  # type: ignore[arg-type]

    async def _count_taken(self, entries: AsyncIterator[DirEntry]) -> AsyncIterator[DirEntry]:
        async for de in entries:
            yield de  # resumed only when the kernel took the entry: one lookup to journal
            if de.name not in (b".", b"..") and de.entry is not None and self._sink is not None:
                self._sink(("i", de.entry.nodeid))

    def _apply(self, rec: Sequence[Any]) -> bool:
        """Redo one journal record; True if it was a request."""
        global _now, _replay_caller
        if rec[0] == "i":
            n = self.nodes.get(rec[1])
            if n is not None:
                n._lookups += 1
        if rec[0] != "r":
            return False
        _, ts, name, req, groups = rec
        saved, _now, _replay_caller = _now, (lambda: ts), Caller(req.uid, req.gid, req.pid, tuple(groups))
        try:
            self._replayed[req.request_id] = _run_now(getattr(type(self), name)(self, req))
            if len(self._replayed) > 4096:
                self._replayed.popitem(last=False)
        except FUSEError as e:  # pragma: no cover - a journal from another version
            log.warning("journal: %s of request %d failed again: %s", name, req.request_id, e)
        finally:
            _now, _replay_caller = saved, None
        return True

    # -- afuse.state.Persistent: the inodes, the bridge's tables, and pending records ------------

    def dump_state(self) -> dict[str, Any]:
        """A JSON snapshot: every inode (data base64), the tree, the bridge's tables."""
        inodes = []
        for n in {id(n): n for n in (*self.nodes.values(), *self._walk())}.values():
            assert isinstance(n, MNode)
            extra: Any = None
            if isinstance(n, File):
                extra = {str(k): None if v is None else _b64(v) for k, v in n.chunks.items()}
            elif isinstance(n, Dir):
                assert n.children is not None
                extra = [n.parent.key, [[_b64(k), c.key] for k, c in n.children.items()]]
            elif isinstance(n, Symlink):
                extra = _b64(n.target)
            inodes.append([type(n).__name__, n.key, n.perm, n.nlink, n.uid, n.gid, n.rdev, n.size, n.atime,
                           n.mtime, n.ctime, n.btime, {_b64(k): _b64(v) for k, v in n.xattrs.items()}, extra])
        return {"inodes": inodes, "next_serial": self._serial, "capacity": self._capacity, **super().dump_state()}

    def _walk(self) -> Iterator[Node]:
        stack = [self.root]
        while stack:
            n = stack.pop()
            yield n
            stack.extend((n.children or {}).values())

    def restore_state(self, state: dict[str, Any]) -> None:
        """Become the filesystem of ``state`` (from :meth:`dump_state`; records folded in are redone)."""
        made: dict[int, MNode] = {}
        root = self.root
        assert isinstance(root, Dir) and root.children is not None
        for kind, ino, perm, nlink, uid, gid, rdev, size, at, mt, ct, bt, xattrs, extra in state["inodes"]:
            n: MNode
            if kind == "Dir":
                n = root if ino == 1 else Dir(self, perm, uid, gid, None, serial=ino)
            elif kind == "File":
                n = File(self, perm, uid, gid, serial=ino)
                n.chunks = {int(k): None if v is None else bytearray(base64.b64decode(v)) for k, v in extra.items()}
                self._used_chunks += len(n.chunks)
            elif kind == "Symlink":
                n = Symlink(self, base64.b64decode(extra), uid, gid, serial=ino)
            else:
                n = Special(self, perm, uid, gid, serial=ino)
            n.perm, n.nlink, n.rdev, n.size, n.atime, n.mtime, n.ctime, n.btime = (
                perm, nlink, rdev, size, at, mt, ct, bt)
            n.xattrs = {base64.b64decode(k): base64.b64decode(v) for k, v in xattrs.items()}
            made[ino] = n
        for kind, ino, *_, extra in state["inodes"]:
            if kind == "Dir":
                d = made[ino]
                assert isinstance(d, Dir)
                d.parent = made[extra[0]]  # type: ignore[assignment]
                for name, child in extra[1]:
                    d.add_child(base64.b64decode(name), made[child])
        self._serial, self._capacity, self._restored = state["next_serial"], state["capacity"], made
        super().restore_state(state)
        for fh in list(self._pending):  # open files: reopened now (memfs opens never block)
            _run_now(self._reopen(fh))
        for rec in state.get("pending", ()):
            self._apply(("r", rec[1], rec[2], _from_json(rec[3]), rec[4]) if rec[0] == "r" else tuple(rec))

    def restore_node(self, key: Any) -> Node | None:
        """An inode of the snapshot outside the tree (unlinked, still open or looked up)."""
        return self._restored.get(key)

    def fold_record(self, state: dict[str, Any], record: Any) -> None:
        """Keep a record pending: :meth:`restore_state` redoes it through the handlers."""
        state.setdefault("pending", []).append(record)

    def set_journal(self, journal: Callable[[Any], None] | None) -> None:
        """Send a JSON record of every change to ``journal`` (None: stop)."""
        self._install_sink(None if journal is None else lambda rec: journal(
            ["r", rec[1], rec[2], _to_json(rec[3]), list(rec[4])] if rec[0] == "r" else list(rec)))


def main(argv: Sequence[str] | None = None) -> int:
    """Mount a fresh MemFS on the mount point given on the command line, until Ctrl-C or unmount."""
    from afuse.examples._cli import make_parser, run_example

    parser = make_parser("An in-memory POSIX filesystem: everything is gone at unmount "
                         "(unless --persist or --keeper).", prog="python -m afuse.examples.memfs")
    parser.add_argument("--persist", metavar="DIR", help="journal every change in DIR; restore what DIR holds")
    parser.add_argument("--keeper", metavar="SOCKET",
                        help="failover: keep the mount's descriptors in the afuse keeper at SOCKET; a "
                             "restarted memfs takes over the live mount (needs --state-dir)")
    parser.add_argument("--state-dir", metavar="DIR", help="failover: where contents and handles are journaled")
    parser.add_argument("--upgrade", action="store_true", help="failover: take over gracefully from the running one")
    args = parser.parse_args(argv)
    if args.keeper is None and args.state_dir is None:
        return run_example(MemFS(persist=args.persist), args, argv=argv)
    if args.state_dir is None or args.persist is not None:
        parser.error("failover needs --state-dir (and takes no --persist: the state dir holds the journal)")
    return _run_failover(args)


def _run_failover(args: Any) -> int:
    """Serve under :func:`afuse.failover.serve_failover` until SIGTERM/SIGINT (drain) or unmount."""
    import signal
    from functools import partial

    from afuse.device import MountOptions
    from afuse.failover import serve_failover
    from afuse.running import serve_until_signalled

    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s memfs[%(process)d] %(levelname)s %(message)s")
    try:
        options = MountOptions.parse(",".join(args.options))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ops, interrupted = MemFS(), False  # Ctrl-C: exit 130 (after draining, like SIGTERM and SIGHUP)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            session = await nursery.start(lambda task_status: serve_failover(
                ops, args.mountpoint, keeper=args.keeper, state_dir=args.state_dir, options=options,
                upgrade=args.upgrade, task_status=task_status))

            async def drain(signum: signal.Signals) -> None:
                nonlocal interrupted
                interrupted = signum == signal.SIGINT
                await session.drain()  # hand over gracefully; the mount stays

            async with trio.open_nursery() as waiting:
                await waiting.start(partial(serve_until_signalled, session, on_signal=drain))
                print("ready", flush=True)
            nursery.cancel_scope.cancel()

    try:
        trio.run(run)
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 128 + signal.SIGINT if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
