"""An in-memory POSIX filesystem: ``python -m afuse.examples.memfs MOUNTPOINT [-o OPTS] [--debug] [--persist DIR]``.

Everything lives in Python objects and vanishes at unmount, unless ``persist`` names a directory:
then every change is journaled there before it is answered, and :meth:`MemFS.load` (or
``MemFS(persist=DIR)`` on a directory holding a journal) restores it — see "Persistence" below.

It supports regular files (stored sparsely in 64 KiB chunks, so holes are real for
SEEK_DATA/SEEK_HOLE and fallocate punches them), directories with stable readdir cookies,
symlinks, hard links, device nodes, fifos and sockets, rename with RENAME_NOREPLACE /
RENAME_EXCHANGE / RENAME_WHITEOUT, extended attributes, owners, modes and nanosecond timestamps,
POSIX record locks and flock(2) locks (both waiting when asked, and cancellable by an
interrupt), O_TMPFILE, copy_file_range, statx with a birth time, and the kernel's lookup
counting: an inode is dropped once it has no name, no kernel reference and no open handle.

Persistence (``persist=DIR``): ``DIR/journal`` is an append-only log of every request that
changed something (with the time it took effect and its request id) plus one record per
READDIRPLUS entry the kernel took (a lookup count). Each record is appended with one plain
``write`` before the handler returns, i.e. before the reply: it survives the daemon being
killed (the page cache is the kernel's), not a machine crash. Restoring replays the requests in
order through the same handlers with the recorded clock, which reproduces contents, attributes,
nodeids, lookup counts and open handles (fh numbers) exactly — so a successor daemon can take
over the live /dev/fuse descriptor (:class:`afuse.session.Takeover`) with the kernel's nodeids and
open files still valid. A resent request whose first attempt is in the journal is answered with
that attempt's result (see :mod:`afuse.resend`); one not in it had no effect and runs anew.
Record and flock locks, atimes set by reads, and pending lock waits are not persisted. This
journal grows with every change and is never compacted (start afresh with an empty DIR). For a
compacted store use :mod:`afuse.state` instead: MemFS implements its ``Persistent`` protocol
(``dump_state`` / ``restore_state``, a JSON snapshot with the data base64-encoded;
``set_journal`` sends the same records as JSON; ``fold_record`` keeps them pending and
``restore_state`` redoes them through the handlers). Without ``persist`` or a journal set,
none of this costs anything: no handler is wrapped.

Permissions are checked here as well (against the caller's uid and primary gid), so the
filesystem behaves without ``-o default_permissions``; with it the kernel checks first and also
knows the caller's supplementary groups.
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
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator, Sequence
from typing import Any

import attrs
import trio

from afuse.errors import FUSEError
from afuse.operations import Operations
from afuse.wire import requests as r
from afuse.wire.constants import FOpen
from afuse.wire.opcodes import STATEFUL_HANDLERS
from afuse.wire.types import Attr, DirEntry, Entry, FsStats, Handle, IoctlReply, Lock, Statx, Timestamp

__all__ = ["MemFS", "main"]

#: Bytes per data chunk of a regular file.
CHUNK = 1 << 16
_ZEROS = memoryview(bytes(CHUNK))
#: Longest name of a directory entry (as NAME_MAX).
NAME_MAX = 255
#: Longest symlink target.
PATH_MAX = 4096
#: Largest xattr value (XATTR_SIZE_MAX).
XATTR_SIZE_MAX = 1 << 16
#: File size limit (the kernel's MAX_LFS_FILESIZE).
MAX_FILE_SIZE = 0x7FFFFFFFFFFFFFFF
#: Bytes in a directory's size per entry, as tmpfs counts.
_DIRENT_SIZE = 20
_BLKSIZE = 4096
#: Caller ids the kernel sends when it has none (idmapped mounts).
_NO_IDS = 0xFFFFFFFF

_R, _W, _X = 4, 2, 1
_O_ACCMODE = 3
_WRITE_CACHE = 1  # FUSE_WRITE_CACHE

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4

XATTR_CREATE = 1
XATTR_REPLACE = 2

FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2

SEEK_DATA = 3
SEEK_HOLE = 4

F_RDLCK = 0
F_WRLCK = 1
F_UNLCK = 2
#: How far deadlock detection follows the chain of waiting lock owners (as Linux).
_MAX_DEADLK_STEPS = 10

POLLIN = 0x1
POLLOUT = 0x4

STATX_BASIC_STATS = 0x7FF
STATX_BTIME = 0x800

_S_IFMT = 0o170000
_S_IFDIR = stat.S_IFDIR
_S_IFREG = stat.S_IFREG
_S_IFLNK = stat.S_IFLNK
_S_ISUID = stat.S_ISUID
_S_ISGID = stat.S_ISGID
_S_ISVTX = stat.S_ISVTX
_SPECIAL_TYPES = frozenset({stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK})

_now = time.time_ns

# A POSIX record lock: (owner, type, start, end inclusive, pid).
_PLock = tuple[int, int, int, int, int]


# ---------------------------------------------------------------------------------------------
# Inodes


class Node:
    """An inode. Subclasses add what their file type needs."""

    __slots__ = ("atime", "blocks", "btime", "ctime", "gid", "ino", "lookups", "mode", "mtime", "nlink",
                 "opens", "rdev", "size", "uid", "xattrs")

    def __init__(self, ino: int, mode: int, uid: int, gid: int, now: int) -> None:
        self.ino = ino
        self.mode = mode
        self.nlink = 1
        self.uid = uid
        self.gid = gid
        self.rdev = 0
        self.size = 0
        #: 512-byte blocks in use; -1 means "recount" (regular files only).
        self.blocks = 0
        self.atime = self.mtime = self.ctime = self.btime = now
        #: The kernel's references (entries replied minus forgotten).
        self.lookups = 0
        #: Open handles.
        self.opens = 0
        self.xattrs: dict[bytes, bytes] | None = None

    def recount(self) -> int:
        """Recompute :attr:`blocks` (only regular files keep it lazily)."""
        return self.blocks


class File(Node):
    """A regular file. Data lives in ``chunks``: chunk index -> bytes of that chunk.

    A chunk's bytearray may be shorter than :data:`CHUNK` (the rest reads as zeros); a None
    chunk is allocated by fallocate but unwritten (reads as zeros, counts as a hole for
    SEEK_DATA). Absent chunks are holes. Bytes at or beyond ``size`` are always zero.
    """

    __slots__ = ("chunks", "flocks", "lock_event", "plocks")

    def __init__(self, ino: int, mode: int, uid: int, gid: int, now: int) -> None:
        super().__init__(ino, mode, uid, gid, now)
        self.chunks: dict[int, bytearray | None] = {}
        #: POSIX record locks.
        self.plocks: list[_PLock] = []
        #: flock(2) locks: open file handle -> F_RDLCK / F_WRLCK.
        self.flocks: dict[int, int] | None = None
        #: Set (and replaced) whenever a lock is dropped, to wake waiters.
        self.lock_event: trio.Event | None = None

    def recount(self) -> int:
        total = 0
        for ba in self.chunks.values():
            total += CHUNK if ba is None else (len(ba) + _BLKSIZE - 1) & ~(_BLKSIZE - 1)
        self.blocks = total >> 9
        return self.blocks


class Dir(Node):
    """A directory.

    ``children`` maps a name to (nodeid, cookie). Every entry gets a cookie, increasing with each
    insertion, so readdir can resume after any cookie however the directory changed since.
    ``by_cookie`` maps live cookies to names; ``cookies`` is the sorted list of cookies, with dead
    ones dropped lazily (the list is rebuilt when more than half is dead).
    """

    __slots__ = ("by_cookie", "children", "cookies", "next_cookie", "parent")

    def __init__(self, ino: int, mode: int, uid: int, gid: int, now: int, parent: int) -> None:
        super().__init__(ino, mode, uid, gid, now)
        self.nlink = 2
        self.size = 2 * _DIRENT_SIZE
        self.parent = parent
        self.children: dict[bytes, tuple[int, int]] = {}
        self.by_cookie: dict[int, bytes] = {}
        self.cookies: list[int] = []
        self.next_cookie = 3  # 1 is ".", 2 is ".."


class Symlink(Node):
    __slots__ = ("target",)

    def __init__(self, ino: int, target: bytes, uid: int, gid: int, now: int) -> None:
        super().__init__(ino, _S_IFLNK | 0o777, uid, gid, now)
        self.target = target
        self.size = len(target)


class Special(Node):
    """A device node, fifo or socket: only attributes."""

    __slots__ = ()


def _attr(n: Node) -> Attr:
    b = n.blocks
    if b < 0:
        b = n.recount()
    return Attr(n.ino, n.mode, n.nlink, n.uid, n.gid, n.rdev, n.size, b, n.atime, n.mtime, n.ctime, _BLKSIZE)


def _may(n: Node, uid: int, gid: int, mask: int) -> bool:
    """May the caller ``uid``/``gid`` access ``n`` for ``mask`` (R 4 / W 2 / X 1)?"""
    mode = n.mode
    if uid == 0 or uid == _NO_IDS:
        # Root may read and write anything, search any directory, execute what has an x bit.
        return not mask & _X or (mode & _S_IFMT) == _S_IFDIR or bool(mode & 0o111)
    if uid == n.uid:
        mode >>= 6
    elif gid == n.gid:
        mode >>= 3
    return (mode & mask) == mask


def _ts(ns: int) -> Timestamp:
    sec, nsec = divmod(ns, 1_000_000_000)
    return Timestamp(sec, nsec)


def _err(code: int) -> FUSEError:
    return FUSEError(code)


_NEGATIVE = Entry(0, Attr())

log = logging.getLogger("afuse.examples.memfs")

# -- the journal (persist=DIR) -------------------------------------------------------------------

#: Operations whose requests are journaled (those that change anything the kernel relies on).
_JOURNALED = tuple(h for h in STATEFUL_HANDLERS if h != "readdirplus")  # readdirplus: see _install_sink
#: Results of restored requests kept for answering their resent copies.
_REPLAYED_KEEP = 4096
_REC_LEN = struct.Struct("<I")


def _journal_path(directory: str) -> str:
    return os.path.join(directory, "journal")


def _append(fd: int, record: tuple[Any, ...]) -> None:
    """Append one record with one write (length-prefixed pickle)."""
    blob = pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL)
    os.write(fd, _REC_LEN.pack(len(blob)) + blob)


def _read_journal(path: str) -> Iterator[tuple[Any, ...]]:
    """The records of a journal; a record cut short at the end (a crash mid-append) ends it."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return
    pos = 0
    while pos + 4 <= len(data):
        (n,) = _REC_LEN.unpack_from(data, pos)
        if pos + 4 + n > len(data):
            log.warning("journal %s: incomplete last record ignored", path)
            return
        rec = pickle.loads(data[pos + 4 : pos + 4 + n])
        pos += 4 + n
        yield rec


def _read_journal_header(path: str) -> tuple[int, int, int, int, int] | None:
    """(uid, gid, mode, capacity, birth time) of the root from the journal's first record, or None."""
    for rec in _read_journal(path):
        if rec[0] == "h":
            return int(rec[1]), int(rec[2]), int(rec[3]), int(rec[4]), int(rec[5])
        break
    return None


def _run_now(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a handler coroutine that does not block (the journaled ones never do)."""
    try:
        coro.send(None)
    except StopIteration as e:
        return e.value
    coro.close()
    raise RuntimeError("a journaled handler blocked while being replayed")


def _b64(b: bytes | bytearray) -> str:
    return base64.b64encode(b).decode("ascii")


def _unb64(s: str) -> bytes:
    return base64.b64decode(s)


def _to_json(v: Any) -> Any:
    """Requests (attrs classes of afuse.wire.requests) and their values as JSON data."""
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
            return _unb64(v["b"])
        cls = getattr(r, v["c"])
        return cls(**{k: _from_json(x) for k, x in v["f"].items()})
    return v


def _record_to_json(rec: tuple[Any, ...]) -> list[Any]:
    if rec[0] == "r":
        return ["r", rec[1], rec[2], _to_json(rec[3])]
    return list(rec)


def _record_from_json(rec: list[Any]) -> tuple[Any, ...]:
    if rec[0] == "r":
        return ("r", rec[1], rec[2], _from_json(rec[3]))
    return tuple(rec)


# ---------------------------------------------------------------------------------------------
# The filesystem


class MemFS(Operations):
    """An in-memory filesystem. ``uid``/``gid``/``mode`` describe the root directory."""

    entry_timeout = 1.0
    attr_timeout = 1.0

    def __init__(self, uid: int | None = None, gid: int | None = None, mode: int = 0o755,
                 capacity: int | None = None, persist: str | os.PathLike[str] | None = None) -> None:
        self._journal_fd: int | None = None
        self._sink: Callable[[tuple[Any, ...]], None] | None = None
        #: request_id -> result of journaled requests (filled by a restore, for resent requests).
        self._replayed: OrderedDict[int, Any] = OrderedDict()
        self.persist = None if persist is None else os.fspath(persist)
        born: int | None = None
        if self.persist is not None:
            header = _read_journal_header(_journal_path(self.persist))
            if header is not None:
                uid, gid, mode, capacity, born = header
        self._setup(uid, gid, mode, capacity, born)
        if self.persist is not None:
            self._open_journal(self.persist)

    def _setup(self, uid: int | None, gid: int | None, mode: int, capacity: int | None, born: int | None) -> None:
        now = _now() if born is None else born
        root = Dir(1, _S_IFDIR | (mode & 0o7777), os.getuid() if uid is None else uid,
                   os.getgid() if gid is None else gid, now, parent=1)
        self._nodes: dict[int, Node] = {1: root}
        self._next_ino = 2
        self._handles: dict[int, Node] = {}
        self._next_fh = 1
        if capacity is None:
            try:
                capacity = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            except (ValueError, OSError):
                capacity = 1 << 32
        #: Chunks the filesystem may hold (statfs's size; fallocate answers ENOSPC beyond it).
        self._capacity_chunks = max(1, capacity // CHUNK)
        self._used_chunks = 0
        #: Lock owners blocked in setlk: owner -> (file, type, start, end), for EDEADLK.
        self._waiting: dict[int, tuple[File, int, int, int]] = {}

    # -- persistence ---------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike[str], **kwargs: Any) -> MemFS:
        """A MemFS restored from the journal in directory ``path`` (which it keeps journaling to).

        Raises FileNotFoundError if there is no journal there.
        """
        if _read_journal_header(_journal_path(os.fspath(path))) is None:
            raise FileNotFoundError(errno.ENOENT, "no MemFS journal", _journal_path(os.fspath(path)))
        return cls(persist=path, **kwargs)

    def _open_journal(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        path = _journal_path(directory)
        fresh = _read_journal_header(path) is None
        if not fresh:
            self._replay_file(path)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if fresh:
            os.ftruncate(fd, 0)
            root = self._nodes[1]
            _append(fd, ("h", root.uid, root.gid, root.mode & 0o7777, self._capacity_chunks * CHUNK, root.btime))
        self._journal_fd = fd
        self._install_sink(lambda rec: _append(fd, rec))

    def _install_sink(self, sink: Callable[[tuple[Any, ...]], None] | None) -> None:
        """Send a record of every change to ``sink`` (None: stop).

        The changing operations become instance attributes wrapping the class's methods, so a
        MemFS without a sink runs the plain methods.
        """
        self._sink = sink
        for name in (*_JOURNALED, "readdirplus"):
            self.__dict__.pop(name, None)
        if sink is None:
            return
        for name in _JOURNALED:
            setattr(self, name, self._journaled(name, getattr(self, name)))
        setattr(self, "readdirplus", self._journaled_readdirplus)  # noqa: B010

    def close_journal(self) -> None:
        """Stop journaling (close the file); the filesystem keeps working in memory."""
        if self._journal_fd is not None:
            os.close(self._journal_fd)
            self._journal_fd = None
            self._install_sink(None)

    def _journaled(self, name: str, handler: Callable[[Any], Coroutine[Any, Any, Any]]
                   ) -> Callable[[Any], Awaitable[Any]]:
        replayed = self._replayed
        only_positive = name == "lookup"

        async def run(req: r.Request) -> Any:
            global _now
            if req.is_resend and req.request_id in replayed:
                return replayed[req.request_id]  # the first attempt's result, restored
            ts = time.time_ns()
            saved = _now
            _now = lambda: ts  # noqa: E731 - one clock reading per request: replays reproduce it
            try:
                result = await handler(req)
            finally:
                _now = saved
            sink = self._sink
            if sink is not None and not (only_positive and not result.nodeid):
                sink(("r", ts, name, req))
            return result
        return run

    async def _journaled_readdirplus(self, req: r.ReaddirplusRequest) -> Iterator[DirEntry]:
        return self._count_taken(await type(self).readdirplus(self, req))

    def _count_taken(self, entries: Iterator[DirEntry]) -> Iterator[DirEntry]:
        for de in entries:
            yield de
            # Resumed only when the kernel took the entry: one lookup to journal.
            sink = self._sink
            if de.name != b"." and de.name != b".." and de.entry is not None and sink is not None:
                sink(("i", de.entry.nodeid))

    def _apply(self, rec: Sequence[Any]) -> bool:
        """Redo one journal record (while restoring); True if it was a request."""
        global _now
        kind = rec[0]
        if kind == "r":
            _, ts, name, req = rec
            saved = _now
            _now = lambda: ts  # noqa: E731
            try:
                result = _run_now(getattr(type(self), name)(self, req))
            except FUSEError as e:  # pragma: no cover - a journal from another version
                log.warning("journal replay: %s of request %d failed: %s", name, req.request_id, e)
                return False
            finally:
                _now = saved
            self._replayed[req.request_id] = result
            if len(self._replayed) > _REPLAYED_KEEP:
                self._replayed.popitem(last=False)
            return True
        if kind == "i":
            n = self._nodes.get(rec[1])
            if n is not None:
                n.lookups += 1
        return False

    def _replay_file(self, path: str) -> None:
        count = sum(self._apply(rec) for rec in _read_journal(path))
        log.info("restored MemFS from %s: %d requests, %d inodes, %d open handles",
                 path, count, len(self._nodes), len(self._handles))

    # -- afuse.state.Persistent (for afuse.failover and its FileStateStore) ---------------------

    def dump_state(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot of the whole filesystem (data included, base64)."""
        nodes: list[list[Any]] = []
        for n in self._nodes.values():
            common = [n.ino, n.mode, n.nlink, n.uid, n.gid, n.rdev, n.size, n.atime, n.mtime, n.ctime, n.btime,
                      n.lookups, n.opens,
                      None if n.xattrs is None else {_b64(k): _b64(v) for k, v in n.xattrs.items()}]
            if type(n) is File:
                extra: Any = {str(k): None if v is None else _b64(v) for k, v in n.chunks.items()}
            elif type(n) is Dir:
                extra = [n.parent, n.next_cookie, [[_b64(name), ino, c] for name, (ino, c) in n.children.items()]]
            elif type(n) is Symlink:
                extra = _b64(n.target)
            else:
                extra = None
            nodes.append([type(n).__name__, common, extra])
        return {
            "version": 1, "next_ino": self._next_ino, "next_fh": self._next_fh,
            "capacity_chunks": self._capacity_chunks, "nodes": nodes,
            "handles": {str(fh): n.ino for fh, n in self._handles.items()},
        }

    def restore_state(self, state: dict[str, Any]) -> None:
        """Become the filesystem of ``state`` (from :meth:`dump_state`, records folded in)."""
        nodes: dict[int, Node] = {}
        used = 0
        for kind, common, extra in state["nodes"]:
            ino, mode, nlink, uid, gid, rdev, size, atime, mtime, ctime, btime, lookups, opens, xattrs = common
            n: Node
            if kind == "File":
                f = File(ino, mode, uid, gid, btime)
                f.chunks = {int(k): None if v is None else bytearray(_unb64(v)) for k, v in extra.items()}
                f.blocks = -1
                used += len(f.chunks)
                n = f
            elif kind == "Dir":
                parent, next_cookie, children = extra
                d = Dir(ino, mode, uid, gid, btime, parent)
                d.next_cookie = next_cookie
                for name_s, child, cookie in sorted(children, key=lambda c: c[2]):
                    name = _unb64(name_s)
                    d.children[name] = (child, cookie)
                    d.by_cookie[cookie] = name
                    d.cookies.append(cookie)
                n = d
            elif kind == "Symlink":
                n = Symlink(ino, _unb64(extra), uid, gid, btime)
            else:
                n = Special(ino, mode, uid, gid, btime)
            n.mode, n.nlink, n.rdev, n.size = mode, nlink, rdev, size
            n.atime, n.mtime, n.ctime, n.btime = atime, mtime, ctime, btime
            n.lookups, n.opens = lookups, opens
            n.xattrs = None if xattrs is None else {_unb64(k): _unb64(v) for k, v in xattrs.items()}
            nodes[ino] = n
        self._nodes = nodes
        self._used_chunks = used
        self._capacity_chunks = int(state["capacity_chunks"])
        self._next_ino = int(state["next_ino"])
        self._next_fh = int(state["next_fh"])
        self._handles = {int(fh): nodes[ino] for fh, ino in state["handles"].items()}
        self._waiting.clear()
        for rec in state.get("pending", ()):
            self._apply(_record_from_json(rec))

    def fold_record(self, state: dict[str, Any], record: Any) -> None:
        """Fold one journal record into a snapshot: kept as pending, redone by :meth:`restore_state`
        through the handlers (pure data here)."""
        state.setdefault("pending", []).append(record)

    def set_journal(self, journal: Callable[[Any], None] | None) -> None:
        """Send a JSON-serialisable record of every change to ``journal`` (None: stop)."""
        if journal is None:
            self._install_sink(None)
            return
        sink = journal
        self._install_sink(lambda rec: sink(_record_to_json(rec)))

    # -- helpers -------------------------------------------------------------------------------

    @property
    def inode_count(self) -> int:
        """Inodes alive (for tests: forgotten, unlinked inodes must go away)."""
        return len(self._nodes)

    def _node(self, nodeid: int) -> Node:
        n = self._nodes.get(nodeid)
        if n is None:
            raise _err(errno.ENOENT)
        return n

    def _dir(self, nodeid: int) -> Dir:
        n = self._nodes.get(nodeid)
        if type(n) is not Dir:
            raise _err(errno.ENOENT if n is None else errno.ENOTDIR)
        return n

    def _handle(self, fh: int, nodeid: int) -> Node:
        n = self._handles.get(fh)
        if n is None:
            n = self._nodes.get(nodeid)
            if n is None:
                raise _err(errno.EBADF)
        return n

    def _file(self, fh: int, nodeid: int) -> File:
        n = self._handle(fh, nodeid)
        if type(n) is not File:
            raise _err(errno.EISDIR if type(n) is Dir else errno.EINVAL)
        return n

    def _open_handle(self, n: Node) -> int:
        fh = self._next_fh
        self._next_fh = fh + 1
        self._handles[fh] = n
        n.opens += 1
        return fh

    def _new_ino(self) -> int:
        ino = self._next_ino
        self._next_ino = ino + 1
        return ino

    def _owner_ids(self, d: Dir, req: r.Request, mode: int) -> tuple[int, int, int]:
        """uid, gid and mode of a new inode in ``d`` (setgid directories hand down their group)."""
        gid = req.gid
        if d.mode & _S_ISGID:
            gid = d.gid
            if (mode & _S_IFMT) == _S_IFDIR:
                mode |= _S_ISGID
        if (mode & (_S_ISGID | 0o010)) == (_S_ISGID | 0o010) and (mode & _S_IFMT) != _S_IFDIR \
                and gid != req.gid and req.uid != 0:
            mode &= ~_S_ISGID
        return req.uid, gid, mode

    def _check_create(self, d: Dir, req: r.Request, name: bytes) -> None:
        """Errors of creating ``name`` in ``d``, in the order Linux reports them."""
        if len(name) > NAME_MAX:
            raise _err(errno.ENAMETOOLONG)
        uid = req.uid
        if uid and not _may(d, uid, req.gid, _X):
            raise _err(errno.EACCES)
        if name in d.children:
            raise _err(errno.EEXIST)
        if d.nlink == 0:
            raise _err(errno.ENOENT)
        if uid and not _may(d, uid, req.gid, _W | _X):
            raise _err(errno.EACCES)

    def _check_delete(self, d: Dir, child: Node, req: r.Request) -> None:
        uid = req.uid
        if uid and uid != _NO_IDS:
            if not _may(d, uid, req.gid, _W | _X):
                raise _err(errno.EACCES)
            if d.mode & _S_ISVTX and uid != child.uid and uid != d.uid:
                raise _err(errno.EPERM)

    def _lookup_child(self, d: Dir, name: bytes, req: r.Request) -> Node:
        if len(name) > NAME_MAX:
            raise _err(errno.ENAMETOOLONG)
        if req.uid and not _may(d, req.uid, req.gid, _X):
            raise _err(errno.EACCES)
        ent = d.children.get(name)
        if ent is None:
            raise _err(errno.ENOENT)
        return self._nodes[ent[0]]

    @staticmethod
    def _add_entry(d: Dir, name: bytes, n: Node) -> None:
        cookie = d.next_cookie
        d.next_cookie = cookie + 1
        d.children[name] = (n.ino, cookie)
        d.by_cookie[cookie] = name
        d.cookies.append(cookie)
        d.size += _DIRENT_SIZE

    @staticmethod
    def _remove_entry(d: Dir, name: bytes) -> None:
        _, cookie = d.children.pop(name)
        del d.by_cookie[cookie]
        d.size -= _DIRENT_SIZE
        if len(d.cookies) > 2 * len(d.by_cookie) + 64:
            # A new list: a readdir generator still walking the old one stays valid.
            d.cookies = list(d.by_cookie)

    def _maybe_free(self, n: Node) -> None:
        if n.nlink == 0 and n.lookups <= 0 and n.opens <= 0 and n.ino != 1:
            self._free(n)

    def _free(self, n: Node) -> None:
        del self._nodes[n.ino]
        if type(n) is File:
            self._used_chunks -= len(n.chunks)
            n.chunks.clear()
            n.plocks.clear()
            n.flocks = None
        n.xattrs = None

    def _is_ancestor(self, a: Dir, d: Dir) -> bool:
        """Is ``a`` the directory ``d`` or one of its ancestors?"""
        nodes = self._nodes
        while True:
            if d is a:
                return True
            if d.ino == 1:
                return False
            p = nodes.get(d.parent)
            if type(p) is not Dir:
                return False
            d = p

    # -- file data -----------------------------------------------------------------------------

    def _store_piece(self, chunks: dict[int, bytearray | None], idx: int, rel: int,
                     piece: bytes | bytearray | memoryview) -> None:
        """Write ``piece`` at offset ``rel`` of chunk ``idx``, creating or zero-extending it."""
        ba = chunks.get(idx)
        if ba is None:
            if idx not in chunks:
                self._used_chunks += 1
            if rel:
                ba = bytearray(rel)
                ba += piece
            else:
                ba = bytearray(piece)
            chunks[idx] = ba
        else:
            have = len(ba)
            if have < rel:
                ba += _ZEROS[: rel - have]
            ba[rel : rel + len(piece)] = piece

    @staticmethod
    def _read(n: File, off: int, size: int) -> bytes:
        end = off + size
        if end > n.size:
            end = n.size
        if off >= end:
            return b""
        chunks = n.chunks
        idx, rel = divmod(off, CHUNK)
        if rel + (end - off) <= CHUNK:  # one chunk: the usual case
            ba = chunks.get(idx)
            if ba is None:
                return bytes(end - off)
            stop = rel + end - off
            if stop <= len(ba):
                return bytes(memoryview(ba)[rel:stop])
        parts: list[bytes | bytearray | memoryview] = []
        pos = off
        while pos < end:
            idx, rel = divmod(pos, CHUNK)
            take = min(CHUNK - rel, end - pos)
            ba = chunks.get(idx)
            if ba is None:
                parts.append(_ZEROS[:take])
            else:
                have = len(ba) - rel
                if have >= take:
                    parts.append(memoryview(ba)[rel : rel + take])
                elif have > 0:
                    parts.append(memoryview(ba)[rel:])
                    parts.append(_ZEROS[: take - have])
                else:
                    parts.append(_ZEROS[:take])
            pos += take
        out = b"".join(parts)
        parts.clear()  # release the memoryviews: the bytearrays stay resizable
        return out

    def _write(self, n: File, off: int, data: bytes | bytearray | memoryview) -> None:
        size = len(data)
        end = off + size
        if end > MAX_FILE_SIZE:
            raise _err(errno.EFBIG)
        chunks = n.chunks
        idx, rel = divmod(off, CHUNK)
        if rel + size <= CHUNK:  # one chunk: the usual case for small writes
            self._store_piece(chunks, idx, rel, data)
        else:
            mv = memoryview(data)
            pos = 0
            while pos < size:
                idx, rel = divmod(off + pos, CHUNK)
                take = min(CHUNK - rel, size - pos)
                self._store_piece(chunks, idx, rel, mv[pos : pos + take])
                pos += take
        if end > n.size:
            n.size = end
        n.blocks = -1

    def _truncate(self, n: File, size: int) -> None:
        if size < 0:
            raise _err(errno.EINVAL)
        if size > MAX_FILE_SIZE:
            raise _err(errno.EFBIG)
        if size < n.size:
            self._drop_from(n, size)
        n.size = size
        n.blocks = -1

    def _drop_from(self, n: File, size: int) -> None:
        """Forget the data at and after ``size``."""
        chunks = n.chunks
        idx, rel = divmod(size, CHUNK)
        first_gone = idx + 1 if rel else idx
        gone = [k for k in chunks if k >= first_gone]
        for k in gone:
            del chunks[k]
        self._used_chunks -= len(gone)
        if rel:
            ba = chunks.get(idx)
            if ba is not None and len(ba) > rel:
                del ba[rel:]

    def _punch(self, n: File, off: int, end: int) -> None:
        """Make [off, end) read as zeros, freeing whole chunks."""
        if end <= off:
            return
        chunks = n.chunks
        first = off // CHUNK
        last = (end - 1) // CHUNK
        keys: Iterable[int]
        if last - first < len(chunks):
            keys = range(first, last + 1)
        else:
            keys = sorted(k for k in chunks if first <= k <= last)
        for k in keys:
            if k not in chunks:
                continue
            base = k * CHUNK
            a = max(off, base) - base
            b = min(end, base + CHUNK) - base
            ba = chunks[k]
            if a == 0 and b == CHUNK:
                del chunks[k]
                self._used_chunks -= 1
                continue
            if ba is None or a >= len(ba):
                continue
            if b >= len(ba):
                del ba[a:]
            else:
                ba[a:b] = _ZEROS[: b - a]
            if ba.count(0) == len(ba):
                del chunks[k]
                self._used_chunks -= 1
        n.blocks = -1

    # -- locks ---------------------------------------------------------------------------------

    @staticmethod
    def _wake(n: File) -> None:
        ev = n.lock_event
        if ev is not None:
            n.lock_event = None
            ev.set()

    @staticmethod
    async def _wait(n: File) -> None:
        ev = n.lock_event
        if ev is None:
            ev = n.lock_event = trio.Event()
        await ev.wait()

    @staticmethod
    def _pconflict(n: File, owner: int, typ: int, start: int, end: int) -> _PLock | None:
        for lk in n.plocks:
            if lk[0] != owner and lk[2] <= end and start <= lk[3] and (typ == F_WRLCK or lk[1] == F_WRLCK):
                return lk
        return None

    def _deadlock(self, me: int, blocker: int) -> bool:
        for _ in range(_MAX_DEADLK_STEPS):
            if blocker == me:
                return True
            w = self._waiting.get(blocker)
            if w is None:
                return False
            lk = self._pconflict(w[0], blocker, w[1], w[2], w[3])
            if lk is None:
                return False
            blocker = lk[0]
        return False

    @staticmethod
    def _punlock(n: File, owner: int, start: int, end: int) -> bool:
        """Drop ``owner``'s locks in [start, end]; True if anything changed."""
        changed = False
        keep: list[_PLock] = []
        for lk in n.plocks:
            o, t, s, e, pid = lk
            if o != owner or e < start or s > end:
                keep.append(lk)
                continue
            changed = True
            if s < start:
                keep.append((o, t, s, start - 1, pid))
            if e > end:
                keep.append((o, t, end + 1, e, pid))
        if changed:
            n.plocks = keep
        return changed

    @staticmethod
    def _plock(n: File, owner: int, typ: int, start: int, end: int, pid: int) -> None:
        """Give ``owner`` a ``typ`` lock on [start, end], merging with its own locks (no conflict check)."""
        keep: list[_PLock] = []
        for lk in n.plocks:
            o, t, s, e, lpid = lk
            if o != owner or e < start - 1 or s > end + 1:
                keep.append(lk)
            elif t == typ:
                if s < start:
                    start = s
                if e > end:
                    end = e
            elif e < start or s > end:  # adjacent, of the other type: untouched
                keep.append(lk)
            else:
                if s < start:
                    keep.append((o, t, s, start - 1, lpid))
                if e > end:
                    keep.append((o, t, end + 1, e, lpid))
        keep.append((owner, typ, start, end, pid))
        n.plocks = keep

    def _drop_posix_locks(self, n: File, owner: int) -> None:
        if n.plocks and self._punlock(n, owner, 0, MAX_FILE_SIZE):
            self._wake(n)

    # -- lookups and attributes ----------------------------------------------------------------

    def _lookup_dot(self, req: r.LookupRequest) -> Entry | None:
        """Answer LOOKUP of "." and ".." (sent only with ``InitConfig(export_support=True)``).

        Decoding a file handle of a forgotten inode sends "." with that inode's nodeid, whatever
        its type; reconnecting a directory sends "..". Other names return None.
        """
        name = req.name
        if name != b"." and name != b"..":
            return None
        n = self._nodes.get(req.nodeid)
        if n is None:
            raise _err(errno.ESTALE)
        if name == b"..":
            if type(n) is not Dir:
                raise _err(errno.ENOTDIR)
            n = self._nodes.get(n.parent, n)
        n.lookups += 1
        return Entry(n.ino, _attr(n))

    async def lookup(self, req: r.LookupRequest) -> Entry:
        dot = self._lookup_dot(req)
        if dot is not None:
            return dot
        d = self._nodes.get(req.nodeid)
        if type(d) is not Dir:
            raise _err(errno.ENOENT if d is None else errno.ENOTDIR)
        if req.uid and not _may(d, req.uid, req.gid, _X):
            raise _err(errno.EACCES)
        ent = d.children.get(req.name)
        if ent is None:
            name = req.name
            if name == b"." or name == b"..":  # only asked with export support
                n = d if name == b"." else self._nodes.get(d.parent, d)
                n.lookups += 1
                return Entry(n.ino, _attr(n))
            if len(name) > NAME_MAX:
                raise _err(errno.ENAMETOOLONG)
            return _NEGATIVE
        n = self._nodes[ent[0]]
        n.lookups += 1
        return Entry(n.ino, _attr(n))

    async def forget(self, req: r.ForgetRequest) -> None:
        nodes = self._nodes
        for item in req.items:
            n = nodes.get(item.nodeid)
            if n is None or item.nodeid == 1:
                continue
            n.lookups -= item.nlookup
            if n.lookups <= 0:
                n.lookups = 0
                if n.nlink == 0 and n.opens <= 0:
                    self._free(n)

    async def getattr(self, req: r.GetattrRequest) -> Attr:
        n = self._nodes.get(req.nodeid)
        if n is None:
            raise _err(errno.ENOENT)
        return _attr(n)

    async def statx(self, req: r.StatxRequest) -> Statx:
        n = self._node(req.nodeid)
        b = n.blocks
        if b < 0:
            b = n.recount()
        return Statx(
            mask=STATX_BASIC_STATS | STATX_BTIME, blksize=_BLKSIZE, nlink=n.nlink, uid=n.uid, gid=n.gid,
            mode=n.mode, ino=n.ino, size=n.size, blocks=b,
            atime=_ts(n.atime), btime=_ts(n.btime), ctime=_ts(n.ctime), mtime=_ts(n.mtime),
            rdev_major=os.major(n.rdev), rdev_minor=os.minor(n.rdev),
        )

    async def setattr(self, req: r.SetattrRequest) -> Attr:
        n = self._node(req.nodeid)
        uid, gid = req.uid, req.gid
        privileged = uid == 0 or uid == _NO_IDS
        owner = privileged or uid == n.uid
        # Check everything first, then change: a refused setattr changes nothing.
        new_uid = n.uid if req.new_uid is None else req.new_uid
        new_gid = n.gid if req.new_gid is None else req.new_gid
        if (req.new_uid is not None or req.new_gid is not None) and not privileged:
            if uid != n.uid or new_uid != n.uid or (new_gid != n.gid and new_gid != gid):
                raise _err(errno.EPERM)
        new_mode = n.mode
        if req.mode is not None:
            perms = req.mode & 0o7777
            old = n.mode & 0o7777
            if not owner and ((perms ^ old) & ~(_S_ISUID | _S_ISGID) or perms & ~old):
                raise _err(errno.EPERM)  # others may only drop suid/sgid (the kernel's killpriv on write)
            if not privileged and new_gid != gid:
                perms &= ~_S_ISGID
            new_mode = (n.mode & _S_IFMT) | perms
        if req.size is not None:
            if type(n) is not File:
                raise _err(errno.EISDIR if type(n) is Dir else errno.EINVAL)
            if req.fh is None and not _may(n, uid, gid, _W):
                raise _err(errno.EACCES)
            if req.size < 0:
                raise _err(errno.EINVAL)
            if req.size > MAX_FILE_SIZE:
                raise _err(errno.EFBIG)
        if (req.atime_ns is not None or req.mtime_ns is not None) and not owner:
            raise _err(errno.EPERM)
        if (req.atime_now or req.mtime_now) and not owner and not _may(n, uid, gid, _W):
            raise _err(errno.EACCES)

        now = _now()
        changed = False
        if req.new_uid is not None or req.new_gid is not None:
            n.uid, n.gid = new_uid, new_gid
            changed = True
        if req.mode is not None:
            n.mode = new_mode
            changed = True
        if req.size is not None:
            assert type(n) is File
            self._truncate(n, req.size)
            n.mtime = now
            changed = True
        if req.atime_ns is not None:
            n.atime = req.atime_ns
            changed = True
        elif req.atime_now:
            n.atime = now
            changed = True
        if req.mtime_ns is not None:
            n.mtime = req.mtime_ns
            changed = True
        elif req.mtime_now:
            n.mtime = now
            changed = True
        if req.ctime_ns is not None:
            n.ctime = req.ctime_ns
        elif changed:
            n.ctime = now
        return _attr(n)

    async def access(self, req: r.AccessRequest) -> None:
        n = self._node(req.nodeid)
        mask = req.mask & 7
        if mask and not _may(n, req.uid, req.gid, mask):
            raise _err(errno.EACCES)

    async def statfs(self, req: r.StatfsRequest) -> FsStats:
        per_chunk = CHUNK // _BLKSIZE
        blocks = self._capacity_chunks * per_chunk
        free = max(0, blocks - self._used_chunks * per_chunk)
        files = max(self._capacity_chunks, len(self._nodes))
        return FsStats(blocks=blocks, bfree=free, bavail=free, files=files, ffree=files - len(self._nodes),
                       bsize=_BLKSIZE, namelen=NAME_MAX, frsize=_BLKSIZE)

    # -- creating and removing names -----------------------------------------------------------

    def _created(self, d: Dir, name: bytes, n: Node, now: int) -> Entry:
        self._nodes[n.ino] = n
        self._add_entry(d, name, n)
        d.mtime = d.ctime = now
        n.lookups += 1
        return Entry(n.ino, _attr(n))

    async def mknod(self, req: r.MknodRequest) -> Entry:
        d = self._dir(req.nodeid)
        self._check_create(d, req, req.name)
        typ = req.mode & _S_IFMT
        perms = req.mode & 0o7777 & ~req.umask
        uid, gid, mode = self._owner_ids(d, req, (typ or _S_IFREG) | perms)
        now = _now()
        n: Node
        if typ in (0, _S_IFREG):
            n = File(self._new_ino(), mode, uid, gid, now)
        elif typ in _SPECIAL_TYPES:
            n = Special(self._new_ino(), mode, uid, gid, now)
            if typ in (stat.S_IFCHR, stat.S_IFBLK):
                n.rdev = req.rdev
        elif typ == _S_IFDIR:
            raise _err(errno.EPERM)
        else:
            raise _err(errno.EINVAL)
        return self._created(d, req.name, n, now)

    async def mkdir(self, req: r.MkdirRequest) -> Entry:
        d = self._dir(req.nodeid)
        self._check_create(d, req, req.name)
        uid, gid, mode = self._owner_ids(d, req, _S_IFDIR | (req.mode & 0o7777 & ~req.umask))
        now = _now()
        n = Dir(self._new_ino(), mode, uid, gid, now, parent=d.ino)
        d.nlink += 1
        return self._created(d, req.name, n, now)

    async def symlink(self, req: r.SymlinkRequest) -> Entry:
        d = self._dir(req.nodeid)
        self._check_create(d, req, req.name)
        if len(req.target) >= PATH_MAX:
            raise _err(errno.ENAMETOOLONG)
        uid, gid, _ = self._owner_ids(d, req, _S_IFLNK | 0o777)
        now = _now()
        return self._created(d, req.name, Symlink(self._new_ino(), req.target, uid, gid, now), now)

    async def readlink(self, req: r.ReadlinkRequest) -> bytes:
        n = self._node(req.nodeid)
        if type(n) is not Symlink:
            raise _err(errno.EINVAL)
        return n.target

    async def link(self, req: r.LinkRequest) -> Entry:
        n = self._node(req.oldnodeid)
        if type(n) is Dir:
            raise _err(errno.EPERM)
        d = self._dir(req.nodeid)
        self._check_create(d, req, req.newname)
        now = _now()
        n.nlink += 1
        n.ctime = now
        self._add_entry(d, req.newname, n)
        d.mtime = d.ctime = now
        n.lookups += 1
        return Entry(n.ino, _attr(n))

    async def unlink(self, req: r.UnlinkRequest) -> None:
        d = self._dir(req.nodeid)
        n = self._lookup_child(d, req.name, req)
        self._check_delete(d, n, req)
        if type(n) is Dir:
            raise _err(errno.EISDIR)
        now = _now()
        self._remove_entry(d, req.name)
        d.mtime = d.ctime = now
        n.nlink -= 1
        n.ctime = now
        self._maybe_free(n)

    async def rmdir(self, req: r.RmdirRequest) -> None:
        d = self._dir(req.nodeid)
        if req.name == b".":
            raise _err(errno.EINVAL)
        if req.name == b"..":
            raise _err(errno.ENOTEMPTY)
        n = self._lookup_child(d, req.name, req)
        self._check_delete(d, n, req)
        if type(n) is not Dir:
            raise _err(errno.ENOTDIR)
        if n.children:
            raise _err(errno.ENOTEMPTY)
        now = _now()
        self._remove_entry(d, req.name)
        d.nlink -= 1
        d.mtime = d.ctime = now
        n.nlink = 0
        n.ctime = now
        self._maybe_free(n)

    async def rename(self, req: r.RenameRequest) -> None:
        flags = req.flags
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE | RENAME_WHITEOUT) or (
            flags & RENAME_EXCHANGE and flags & (RENAME_NOREPLACE | RENAME_WHITEOUT)
        ):
            raise _err(errno.EINVAL)
        od = self._dir(req.nodeid)
        nd = self._dir(req.newdir)
        name, newname = req.name, req.newname
        src = self._lookup_child(od, name, req)
        if len(newname) > NAME_MAX:
            raise _err(errno.ENAMETOOLONG)
        if req.uid and not _may(nd, req.uid, req.gid, _X):
            raise _err(errno.EACCES)
        dent = nd.children.get(newname)
        dst = None if dent is None else self._nodes[dent[0]]
        self._check_delete(od, src, req)
        if dst is not None:
            self._check_delete(nd, dst, req)
        elif req.uid and req.uid != _NO_IDS and not _may(nd, req.uid, req.gid, _W | _X):
            raise _err(errno.EACCES)
        if flags & RENAME_EXCHANGE:
            if dst is None:
                raise _err(errno.ENOENT)
        elif dst is not None and flags & RENAME_NOREPLACE:
            raise _err(errno.EEXIST)
        if dst is src:
            return  # two names of one inode: POSIX says do nothing
        src_dir = src if type(src) is Dir else None
        dst_dir = dst if type(dst) is Dir else None
        if src_dir is not None and od is not nd:
            if self._is_ancestor(src_dir, nd):
                raise _err(errno.EINVAL)
            if req.uid and req.uid != _NO_IDS and not _may(src_dir, req.uid, req.gid, _W):
                raise _err(errno.EACCES)  # its ".." changes
        if flags & RENAME_EXCHANGE:
            if dst_dir is not None and od is not nd and self._is_ancestor(dst_dir, od):
                raise _err(errno.EINVAL)
        elif dst is not None:
            if src_dir is not None and dst_dir is None:
                raise _err(errno.ENOTDIR)
            if dst_dir is not None:
                if src_dir is None:
                    raise _err(errno.EISDIR)
                if dst_dir.children:
                    raise _err(errno.ENOTEMPTY)
        if od.nlink == 0 or nd.nlink == 0:
            raise _err(errno.ENOENT)

        now = _now()
        if flags & RENAME_EXCHANGE:
            assert dst is not None and dent is not None
            sent = od.children[name]
            od.children[name] = (dst.ino, sent[1])
            nd.children[newname] = (src.ino, dent[1])
            if od is not nd:
                if src_dir is not None:
                    src_dir.parent = nd.ino
                    od.nlink -= 1
                    nd.nlink += 1
                if dst_dir is not None:
                    dst_dir.parent = od.ino
                    nd.nlink -= 1
                    od.nlink += 1
            dst.ctime = now
        else:
            self._remove_entry(od, name)
            if dst is not None:
                self._remove_entry(nd, newname)
                if dst_dir is not None:
                    dst.nlink = 0
                    nd.nlink -= 1
                else:
                    dst.nlink -= 1
                dst.ctime = now
            self._add_entry(nd, newname, src)
            if src_dir is not None and od is not nd:
                src_dir.parent = nd.ino
                od.nlink -= 1
                nd.nlink += 1
            if flags & RENAME_WHITEOUT:
                # As tmpfs: a 0/0 character device takes the old name.
                wo = Special(self._new_ino(), stat.S_IFCHR, req.uid, req.gid, now)
                self._nodes[wo.ino] = wo
                self._add_entry(od, name, wo)
            if dst is not None:
                self._maybe_free(dst)
        src.ctime = now
        od.mtime = od.ctime = nd.mtime = nd.ctime = now

    # -- files ---------------------------------------------------------------------------------

    async def open(self, req: r.OpenRequest) -> Handle:
        n = self._node(req.nodeid)
        if type(n) is Dir:
            raise _err(errno.EISDIR)
        flags = req.flags
        acc = flags & _O_ACCMODE
        mask = _R if acc == os.O_RDONLY else _W if acc == os.O_WRONLY else _R | _W
        if flags & os.O_TRUNC:
            mask |= _W
        if req.uid and not _may(n, req.uid, req.gid, mask):
            raise _err(errno.EACCES)
        if flags & os.O_TRUNC and type(n) is File:
            self._truncate(n, 0)
            n.mtime = n.ctime = _now()
        return Handle(self._open_handle(n))

    async def create(self, req: r.CreateRequest) -> tuple[Entry, Handle]:
        d = self._dir(req.nodeid)
        self._check_create(d, req, req.name)
        uid, gid, mode = self._owner_ids(d, req, _S_IFREG | (req.mode & 0o7777 & ~req.umask))
        now = _now()
        n = File(self._new_ino(), mode, uid, gid, now)
        entry = self._created(d, req.name, n, now)
        return entry, Handle(self._open_handle(n))

    async def tmpfile(self, req: r.TmpfileRequest) -> tuple[Entry, Handle]:
        d = self._dir(req.nodeid)
        if req.uid and not _may(d, req.uid, req.gid, _W | _X):
            raise _err(errno.EACCES)
        if d.nlink == 0:
            raise _err(errno.ENOENT)
        uid, gid, mode = self._owner_ids(d, req, _S_IFREG | (req.mode & 0o7777 & ~req.umask))
        n = File(self._new_ino(), mode, uid, gid, _now())
        n.nlink = 0
        self._nodes[n.ino] = n
        n.lookups += 1
        return Entry(n.ino, _attr(n)), Handle(self._open_handle(n))

    async def read(self, req: r.ReadRequest) -> bytes:
        n = self._handles.get(req.fh)
        if type(n) is not File:
            n = self._file(req.fh, req.nodeid)
        if n.atime <= n.mtime:  # relatime
            n.atime = _now()
        return self._read(n, req.offset, req.size)

    async def write(self, req: r.WriteRequest) -> int:
        n = self._handles.get(req.fh)
        if type(n) is not File:
            n = self._file(req.fh, req.nodeid)
        off = req.offset
        if req.flags & os.O_APPEND and not req.write_flags & _WRITE_CACHE:
            off = n.size
        data = req.data
        self._write(n, off, data)
        n.mtime = n.ctime = _now()
        return len(data)

    async def flush(self, req: r.FlushRequest) -> None:
        # close(2) of any descriptor drops the process's POSIX locks on the file.
        n = self._handles.get(req.fh)
        if type(n) is File and n.plocks:
            self._drop_posix_locks(n, req.lock_owner)

    async def release(self, req: r.ReleaseRequest) -> None:
        n = self._handles.pop(req.fh, None)
        if n is None:
            return
        n.opens -= 1
        if type(n) is File:
            fl = n.flocks
            if fl and fl.pop(req.fh, None) is not None:
                self._wake(n)
            if n.plocks:
                self._drop_posix_locks(n, req.lock_owner)
        self._maybe_free(n)

    async def fsync(self, req: r.FsyncRequest) -> None:
        pass

    async def fallocate(self, req: r.FallocateRequest) -> None:
        n = self._file(req.fh, req.nodeid)
        mode, off, length = req.mode, req.offset, req.length
        if off < 0 or length <= 0:
            raise _err(errno.EINVAL)
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE):
            raise _err(errno.EOPNOTSUPP)
        end = off + length
        if end > MAX_FILE_SIZE:
            raise _err(errno.EFBIG)
        now = _now()
        if mode & FALLOC_FL_PUNCH_HOLE:
            if not mode & FALLOC_FL_KEEP_SIZE:
                raise _err(errno.EOPNOTSUPP)
            self._punch(n, off, end)
            n.mtime = n.ctime = now
            return
        chunks = n.chunks
        first, last = off // CHUNK, (end - 1) // CHUNK
        span = last - first + 1
        free = self._capacity_chunks - self._used_chunks
        if span > free + len(chunks):
            raise _err(errno.ENOSPC)
        missing = [k for k in range(first, last + 1) if k not in chunks]
        if len(missing) > free:
            raise _err(errno.ENOSPC)
        for k in missing:
            chunks[k] = None
        self._used_chunks += len(missing)
        n.blocks = -1
        if not mode & FALLOC_FL_KEEP_SIZE and end > n.size:
            n.size = end
            n.mtime = now
        n.ctime = now

    async def lseek(self, req: r.LseekRequest) -> int:
        n = self._file(req.fh, req.nodeid)
        off, whence, size = req.offset, req.whence, n.size
        if whence not in (SEEK_DATA, SEEK_HOLE):
            raise _err(errno.EINVAL)
        if off < 0 or off >= size:
            raise _err(errno.ENXIO)
        chunks = n.chunks
        k = off // CHUNK
        if whence == SEEK_DATA:
            if chunks.get(k):
                return off
            after = [i for i, ba in chunks.items() if i > k and ba]
            if not after:
                raise _err(errno.ENXIO)
            pos = min(after) * CHUNK
            if pos >= size:
                raise _err(errno.ENXIO)
            return pos
        while chunks.get(k):
            k += 1
        return min(max(off, k * CHUNK), size)

    async def copy_file_range(self, req: r.CopyFileRangeRequest) -> int:
        if req.flags:
            raise _err(errno.EINVAL)
        src = self._file(req.fh_in, req.nodeid)
        dst = self._file(req.fh_out, req.nodeid_out)
        off_in, off_out = req.off_in, req.off_out
        if off_in < 0 or off_out < 0:
            raise _err(errno.EINVAL)
        count = min(req.length, src.size - off_in)
        if count <= 0:
            return 0
        if src is dst and off_in < off_out + count and off_out < off_in + count:
            raise _err(errno.EINVAL)
        if off_out + count > MAX_FILE_SIZE:
            raise _err(errno.EFBIG)
        chunks = src.chunks
        pos = 0
        while pos < count:
            k, rel = divmod(off_in + pos, CHUNK)
            take = min(CHUNK - rel, count - pos)
            at = off_out + pos
            if chunks.get(k):
                self._write(dst, at, self._read(src, off_in + pos, take))
            else:  # a hole stays a hole
                self._punch(dst, at, at + take)
                if at + take > dst.size:
                    dst.size = at + take
            pos += take
        now = _now()
        dst.mtime = dst.ctime = now
        return count

    async def poll(self, req: r.PollRequest) -> int:
        return POLLIN | POLLOUT

    async def ioctl(self, req: r.IoctlRequest) -> IoctlReply:
        raise _err(errno.ENOTTY)

    # -- locks ---------------------------------------------------------------------------------

    async def getlk(self, req: r.GetlkRequest) -> Lock:
        n = self._file(req.fh, req.nodeid)
        lk = req.lock
        if lk.type not in (F_RDLCK, F_WRLCK):
            raise _err(errno.EINVAL)
        c = self._pconflict(n, req.owner, lk.type, lk.start, lk.end)
        if c is None:
            return Lock(lk.start, lk.end, F_UNLCK, 0)
        return Lock(c[2], c[3], c[1], c[4])

    async def setlk(self, req: r.SetlkRequest) -> None:
        n = self._file(req.fh, req.nodeid)
        lk = req.lock
        owner, typ, start, end = req.owner, lk.type, lk.start, lk.end
        if start < 0 or end < start:
            raise _err(errno.EINVAL)
        if typ == F_UNLCK:
            if self._punlock(n, owner, start, end):
                self._wake(n)
            return
        if typ not in (F_RDLCK, F_WRLCK):
            raise _err(errno.EINVAL)
        while True:
            c = self._pconflict(n, owner, typ, start, end)
            if c is None:
                break
            if not req.sleep:
                raise _err(errno.EAGAIN)
            if self._deadlock(owner, c[0]):
                raise _err(errno.EDEADLK)
            self._waiting[owner] = (n, typ, start, end)
            try:
                await self._wait(n)  # an INTERRUPT cancels us here
            finally:
                self._waiting.pop(owner, None)
        self._plock(n, owner, typ, start, end, lk.pid)
        self._wake(n)  # a downgrade may unblock readers

    async def flock(self, req: r.SetlkRequest) -> None:
        n = self._file(req.fh, req.nodeid)
        fh, typ = req.fh, req.lock.type
        fl = n.flocks
        if typ == F_UNLCK:
            if fl and fl.pop(fh, None) is not None:
                self._wake(n)
            return
        if typ not in (F_RDLCK, F_WRLCK):
            raise _err(errno.EINVAL)
        if fl is None:
            fl = n.flocks = {}
        cur = fl.get(fh)
        if cur == typ:
            return
        if cur is not None:  # conversion drops the old lock first, as Linux does
            del fl[fh]
            self._wake(n)
        while any(o != fh and (typ == F_WRLCK or t == F_WRLCK) for o, t in fl.items()):
            if not req.sleep:
                raise _err(errno.EWOULDBLOCK)
            await self._wait(n)
        fl[fh] = typ

    # -- directories ---------------------------------------------------------------------------

    async def opendir(self, req: r.OpendirRequest) -> Handle:
        n = self._node(req.nodeid)
        if type(n) is not Dir:
            raise _err(errno.ENOTDIR)
        if req.uid and not _may(n, req.uid, req.gid, _R):
            raise _err(errno.EACCES)
        # Every change reaches memfs through the kernel, which then drops the cached listing.
        return Handle(self._open_handle(n), FOpen.CACHE_DIR | FOpen.KEEP_CACHE)

    async def releasedir(self, req: r.ReleasedirRequest) -> None:
        n = self._handles.pop(req.fh, None)
        if n is not None:
            n.opens -= 1
            self._maybe_free(n)

    async def fsyncdir(self, req: r.FsyncdirRequest) -> None:
        pass

    def _open_dir(self, fh: int, nodeid: int) -> Dir:
        d = self._handles.get(fh)
        if type(d) is not Dir:
            d = self._dir(nodeid)
        return d

    async def readdir(self, req: r.ReaddirRequest) -> Iterator[DirEntry]:
        return self._entries(self._open_dir(req.fh, req.nodeid), req.offset)

    async def readdirplus(self, req: r.ReaddirplusRequest) -> Iterator[DirEntry]:
        return self._entries_plus(self._open_dir(req.fh, req.nodeid), req.offset)

    def _entries(self, d: Dir, offset: int) -> Iterator[DirEntry]:
        # The entry with cookie c carries offset c: the kernel resumes after it with offset c.
        nodes = self._nodes
        if offset < 1:
            yield DirEntry(b".", 1, Attr(d.ino, d.mode))
        if offset < 2:
            p = nodes.get(d.parent, d)
            yield DirEntry(b"..", 2, Attr(p.ino, p.mode))
        by_cookie, children = d.by_cookie, d.children
        cookies = d.cookies
        i = bisect_right(cookies, offset)
        while i < len(cookies):
            c = cookies[i]
            i += 1
            name = by_cookie.get(c)
            if name is None:
                continue
            n = nodes[children[name][0]]
            yield DirEntry(name, c, Attr(n.ino, n.mode))

    def _entries_plus(self, d: Dir, offset: int) -> Iterator[DirEntry]:
        nodes = self._nodes
        if offset < 1:
            yield DirEntry(b".", 1, entry=Entry(d.ino, _attr(d)))
        if offset < 2:
            p = nodes.get(d.parent, d)
            yield DirEntry(b"..", 2, entry=Entry(p.ino, _attr(p)))
        by_cookie, children = d.by_cookie, d.children
        cookies = d.cookies
        i = bisect_right(cookies, offset)
        while i < len(cookies):
            c = cookies[i]
            i += 1
            name = by_cookie.get(c)
            if name is None:
                continue
            n = nodes[children[name][0]]
            yield DirEntry(name, c, entry=Entry(n.ino, _attr(n)))
            # Only reached when the kernel took the entry: it now holds one more reference.
            n.lookups += 1

    # -- extended attributes -------------------------------------------------------------------

    def _xattr_access(self, n: Node, req: r.Request, name: bytes, mask: int) -> None:
        if not name:
            raise _err(errno.EINVAL)
        if len(name) > 255:
            raise _err(errno.ERANGE)
        uid = req.uid
        if name.startswith(b"user."):
            if uid and not _may(n, uid, req.gid, mask):
                raise _err(errno.EACCES)
        elif name.startswith(b"trusted."):
            if uid and uid != _NO_IDS:
                raise _err(errno.EPERM)

    async def setxattr(self, req: r.SetxattrRequest) -> None:
        n = self._node(req.nodeid)
        name = req.name
        if name.startswith(b"system."):
            raise _err(errno.EOPNOTSUPP)  # no POSIX ACLs here
        self._xattr_access(n, req, name, _W)
        if len(req.value) > XATTR_SIZE_MAX:
            raise _err(errno.E2BIG)
        x = n.xattrs
        exists = x is not None and name in x
        if req.flags & XATTR_CREATE and exists:
            raise _err(errno.EEXIST)
        if req.flags & XATTR_REPLACE and not exists:
            raise _err(errno.ENODATA)
        if x is None:
            x = n.xattrs = {}
        x[name] = req.value
        n.ctime = _now()

    async def getxattr(self, req: r.GetxattrRequest) -> bytes:
        n = self._node(req.nodeid)
        self._xattr_access(n, req, req.name, _R)
        x = n.xattrs
        value = None if x is None else x.get(req.name)
        if value is None:
            raise _err(errno.ENODATA)
        return value

    async def listxattr(self, req: r.ListxattrRequest) -> Iterable[bytes]:
        n = self._node(req.nodeid)
        x = n.xattrs
        if not x:
            return []
        if req.uid and req.uid != _NO_IDS:
            return [k for k in x if not k.startswith(b"trusted.")]
        return list(x)

    async def removexattr(self, req: r.RemovexattrRequest) -> None:
        n = self._node(req.nodeid)
        self._xattr_access(n, req, req.name, _W)
        x = n.xattrs
        if x is None or req.name not in x:
            raise _err(errno.ENODATA)
        del x[req.name]
        if not x:
            n.xattrs = None
        n.ctime = _now()

    async def syncfs(self, req: r.SyncfsRequest) -> None:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Mount a fresh MemFS on the mount point given on the command line, until Ctrl-C or unmount."""
    from afuse.examples._cli import make_parser, run_example

    parser = make_parser("An in-memory POSIX filesystem: everything is gone at unmount "
                         "(unless --persist or --keeper).", prog="python -m afuse.examples.memfs")
    parser.add_argument("--persist", metavar="DIR",
                        help="journal every change in DIR and restore what DIR holds at start")
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
    ops = MemFS()

    interrupted = False  # Ctrl-C: exit 130 (after draining, like SIGTERM and SIGHUP)

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
