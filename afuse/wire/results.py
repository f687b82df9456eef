"""Handler results to reply bytes, checked against each reply shape's rules.

One function per :class:`~afuse.wire.opcodes.Shape`: ``encode(conn, req, value, what)`` checks
``value`` (what the handler ``what`` returned for ``req``) and returns the complete reply, or
raises :class:`~afuse.wire.errors.HandlerResultError` before any bytes exist. ``conn`` (a
:class:`ReplyState`: the connection) supplies the negotiated state and the default timeouts.
:data:`ENCODERS` maps shapes to them.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable
from typing import Any, Protocol

from . import replies
from . import requests as r
from .constants import FOpen, InitFlag
from .errors import HandlerResultError
from .opcodes import Shape
from .types import Attr, DirEntry, DirSlice, Entry, FsStats, Handle, IoctlReply, Lock, Statx

__all__ = ["ENCODERS", "PASSTHROUGH_COMPATIBLE", "DirWriter", "ReplyState", "check_handle", "passthrough_flags_problem"]

_BYTES = (bytes, bytearray, memoryview)
_PASSTHROUGH = int(FOpen.PASSTHROUGH)
_U64 = 1 << 64

#: The FOPEN flags allowed together with ``FOpen.PASSTHROUGH``.
PASSTHROUGH_COMPATIBLE = FOpen.DIRECT_IO | FOpen.PARALLEL_DIRECT_WRITES | FOpen.NOFLUSH

class ReplyState(Protocol):
    """What encoders read of a connection (:class:`~afuse.wire.connection.Connection` is one)."""

    entry_timeout: float
    attr_timeout: float

    def has(self, flag: InitFlag) -> bool:
        """True if ``flag`` was negotiated."""
        ...


Encoder = Callable[[ReplyState, Any, Any, str], bytes]


def _check(value: Any, cls: type | tuple[type, ...], what: str) -> None:
    """Raise HandlerResultError unless ``value`` is a ``cls``."""
    if not isinstance(value, cls) or isinstance(value, bool):
        want = cls.__name__ if isinstance(cls, type) else "bytes"
        raise HandlerResultError(f"{what} must return {want}, not {type(value).__name__}")


def passthrough_flags_problem(flags: int) -> str | None:
    """Why ``flags`` (with PASSTHROUGH) would make the kernel fail the open, or None."""
    bad = int(flags) & ~(int(PASSTHROUGH_COMPATIBLE) | _PASSTHROUGH)
    if not bad:
        return None
    names = "|".join(f.name or "?" for f in FOpen if f & bad) or hex(bad)
    return (f"FOpen.PASSTHROUGH may only be combined with DIRECT_IO, PARALLEL_DIRECT_WRITES and NOFLUSH, "
            f"not {names} (the kernel would fail the open with EIO)")


def check_handle(conn: ReplyState, h: Any, what: str, directory: bool = False) -> None:
    """Check an open's :class:`Handle`, including its passthrough request against the negotiation."""
    if type(h) is not Handle:
        raise HandlerResultError(f"{what} must return a Handle, not {type(h).__name__}")
    flags = int(h.flags)
    if not flags & _PASSTHROUGH:
        if h.backing_id:
            raise HandlerResultError(f"{what} returned backing_id {h.backing_id} without FOpen.PASSTHROUGH")
        return
    if directory:
        raise HandlerResultError(f"{what} cannot answer FOpen.PASSTHROUGH (files only)")
    why = passthrough_flags_problem(flags)
    if why is not None:
        raise HandlerResultError(f"{what}: {why}")
    if not conn.has(InitFlag.PASSTHROUGH):
        raise HandlerResultError(f"{what} returned FOpen.PASSTHROUGH, but FUSE_PASSTHROUGH is not negotiated "
                                 "(InitConfig(passthrough=True), and the kernel must offer it)")


_S_IFMT = 0o170000


def _check_attr(a: Attr, what: str) -> None:
    """An inode's attributes must say what it is: the kernel marks an inode without a file type bad (EIO)."""
    if not a.mode & _S_IFMT:
        raise HandlerResultError(
            f"{what} returned an Attr whose mode {a.mode:#o} has no file type: add stat.S_IFREG, "
            "S_IFDIR, S_IFLNK, ... (e.g. mode=stat.S_IFREG | 0o644); the kernel would answer EIO")


def _empty(conn: ReplyState, req: r.Request, value: Any, what: str) -> bytes:
    return replies.empty(req.unique)


def _entry(conn: ReplyState, req: r.Request, e: Any, what: str) -> bytes:
    if type(e) is not Entry:
        raise HandlerResultError(f"{what} must return an Entry, not {type(e).__name__}")
    if e.nodeid:
        _check_attr(e.attr, what)
    return replies.entry(req.unique, e, conn.entry_timeout, conn.attr_timeout)


def _attr(conn: ReplyState, req: r.Request, a: Any, what: str) -> bytes:
    if type(a) is not Attr:
        _check(a, Attr, what)
    if not a.mode & _S_IFMT:
        _check_attr(a, what)
    return replies.attr(req.unique, a, conn.attr_timeout)


def _data(conn: ReplyState, req: r.Request, value: Any, what: str) -> bytes:
    _check(value, _BYTES, what)
    return replies.data(req.unique, value)


def _read(conn: ReplyState, req: r.ReadRequest, buf: Any, what: str) -> bytes:
    _check(buf, _BYTES, what)
    if len(buf) > req.size:
        raise HandlerResultError(f"{what} returned {len(buf)} bytes for a request of {req.size}")
    return replies.data(req.unique, buf)


def _write(conn: ReplyState, req: r.WriteRequest, n: Any, what: str) -> bytes:
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= len(req.data):
        raise HandlerResultError(f"{what} must return a count from 0 to {len(req.data)}, not {n!r}")
    return replies.write(req.unique, n)


def _open(conn: ReplyState, req: r.OpenRequest, h: Any, what: str) -> bytes:
    check_handle(conn, h, what, type(req) is r.OpendirRequest)
    return replies.open_(req.unique, h)


def _create(conn: ReplyState, req: r.CreateRequest, res: Any, what: str) -> bytes:
    try:
        e, h = res
    except (TypeError, ValueError):
        raise HandlerResultError(f"{what} must return (Entry, Handle), not {res!r}") from None
    if type(e) is not Entry or type(h) is not Handle:
        raise HandlerResultError(f"{what} must return (Entry, Handle), not {res!r}")
    _check_attr(e.attr, what)
    check_handle(conn, h, what)
    return replies.create(req.unique, e, h, conn.entry_timeout, conn.attr_timeout)


def _statfs(conn: ReplyState, req: r.Request, st: Any, what: str) -> bytes:
    _check(st, FsStats, what)
    return replies.statfs(req.unique, st)


def _xattr(conn: ReplyState, req: r.GetxattrRequest, value: Any, what: str) -> bytes:
    _check(value, _BYTES, what)
    return _sized(req, value)


def _sized(req: r.GetxattrRequest | r.ListxattrRequest, body: bytes | bytearray | memoryview) -> bytes:
    """An xattr reply: its length when asked with size 0, ERANGE when it does not fit."""
    if req.size == 0:
        return replies.xattr_size(req.unique, len(body))
    if len(body) > req.size:
        return replies.error(req.unique, errno.ERANGE)
    return replies.data(req.unique, body)


def _xattr_names(conn: ReplyState, req: r.ListxattrRequest, value: Any, what: str) -> bytes:
    try:
        names = list(value)
    except TypeError:
        raise HandlerResultError(f"{what} must return an iterable of names, not {type(value).__name__}") from None
    for n in names:
        if not isinstance(n, bytes) or not n or b"\0" in n:
            raise HandlerResultError(f"{what} returned an invalid name {n!r}")
    return _sized(req, replies.xattr_names(names))


def _lock(conn: ReplyState, req: r.Request, lock: Any, what: str) -> bytes:
    _check(lock, Lock, what)
    return replies.lk(req.unique, lock)


def _u64(conn: ReplyState, req: r.Request, n: Any, what: str) -> bytes:
    _check(n, int, what)
    if not 0 <= n < _U64:
        raise HandlerResultError(f"{what} returned {n}, out of the u64 range")
    return replies.u64(req.unique, n)


def _ioctl(conn: ReplyState, req: r.IoctlRequest, res: Any, what: str) -> bytes:
    _check(res, IoctlReply, what)
    if len(res.data) > req.out_size and res.in_iovs is None and res.out_iovs is None:
        raise HandlerResultError(f"{what} returned {len(res.data)} bytes; the caller takes {req.out_size}")
    return replies.ioctl(req.unique, res)


def _poll(conn: ReplyState, req: r.Request, revents: Any, what: str) -> bytes:
    _check(revents, int, what)
    return replies.poll(req.unique, revents)


def _copied(conn: ReplyState, req: r.CopyFileRangeRequest, n: Any, what: str) -> bytes:
    _check(n, int, what)
    if not 0 <= n <= req.length:
        raise HandlerResultError(f"{what} returned {n} for a length of {req.length}")
    if req.wide:
        return replies.u64(req.unique, n)
    return replies.write(req.unique, min(n, 0xFFFFFFFF))


def _statx(conn: ReplyState, req: r.Request, sx: Any, what: str) -> bytes:
    _check(sx, Statx, what)
    return replies.statx(req.unique, sx, conn.attr_timeout)


def _not_a_result(conn: ReplyState, req: r.Request, value: Any, what: str) -> bytes:
    raise HandlerResultError(f"{type(req).__name__} is not answered with a handler's result")


#: The encoder of each reply shape.
ENCODERS: dict[Shape, Encoder] = {
    Shape.NONE: _not_a_result,
    Shape.SESSION: _not_a_result,
    Shape.CUSTOM: _not_a_result,
    Shape.EMPTY: _empty,
    Shape.ENTRY: _entry,
    Shape.ATTR: _attr,
    Shape.DATA: _data,
    Shape.READ: _read,
    Shape.WRITE: _write,
    Shape.OPEN: _open,
    Shape.CREATE: _create,
    Shape.STATFS: _statfs,
    Shape.XATTR: _xattr,
    Shape.XATTR_NAMES: _xattr_names,
    Shape.DIRENTS: _not_a_result,  # streamed: see DirWriter
    Shape.LOCK: _lock,
    Shape.U64: _u64,
    Shape.IOCTL: _ioctl,
    Shape.POLL: _poll,
    Shape.COPIED: _copied,
    Shape.STATX: _statx,
}
assert set(ENCODERS) == set(Shape)


class DirWriter:
    """A READDIR/READDIRPLUS reply being filled with checked :class:`DirEntry` items."""

    __slots__ = ("_buf", "_plus", "_what")

    def __init__(self, conn: ReplyState, req: r.ReaddirRequest, what: str) -> None:
        self._plus = plus = type(req) is r.ReaddirplusRequest
        self._buf = replies.DirBuffer(req.size, plus, conn.entry_timeout, conn.attr_timeout)
        self._what = what

    def add(self, d: Any) -> bool:
        """Add one entry; False when the kernel's buffer is full (stop listing).

        Besides :class:`DirEntry`, a READDIR (not READDIRPLUS) entry may be the tuple ``(name,
        offset, ino, mode)``: the node layer's form, without an object per entry."""
        if type(d) is tuple and len(d) == 4 and not self._plus:
            name, offset, ino, mode = d
            if not replies.valid_name(name):
                raise HandlerResultError(f"invalid directory entry name {name!r}")
            if type(offset) is not int or offset <= 0:
                raise HandlerResultError(f"directory entry {name!r} has offset {offset!r}; offsets start at 1")
            try:
                return self._buf.add(name, offset, ino, mode)
            except (struct.error, TypeError):
                raise HandlerResultError(f"directory entry {name!r}: bad ino {ino!r} or mode {mode!r}") from None
        if not isinstance(d, DirEntry):
            raise HandlerResultError(f"{self._what} must yield DirEntry items"
                                     f"{'' if self._plus else ' or (name, offset, ino, mode) tuples'}, "
                                     f"not {f'a {len(d)}-tuple' if type(d) is tuple else type(d).__name__}")
        name = d.name
        if not replies.valid_name(name):
            raise HandlerResultError(f"invalid directory entry name {name!r}")
        if d.offset <= 0:
            raise HandlerResultError(f"directory entry {name!r} has offset {d.offset}; offsets start at 1")
        if self._plus:
            if d.entry is None:
                raise HandlerResultError(f"readdirplus entry {name!r} has no entry")
            if d.entry.nodeid:
                _check_attr(d.entry.attr, f"{self._what} (entry {name!r})")
            return self._buf.add_plus(name, d.offset, d.entry)
        a = d.entry.attr if d.entry is not None else d.attr
        if a is None:
            raise HandlerResultError(f"readdir entry {name!r} has neither attr nor entry")
        return self._buf.add(name, d.offset, a.ino, a.mode)

    def add_slice(self, s: DirSlice) -> None:
        """Add the entries of a :class:`DirSlice` while they fit, each checked as :meth:`add` does."""
        if self._plus:
            raise HandlerResultError(f"{self._what} returned a DirSlice, which answers READDIR, not READDIRPLUS")
        items, start = s.items, s.start
        if type(start) is not int or start < 0:
            raise HandlerResultError(f"{self._what} returned a DirSlice starting at {start!r}")
        try:
            self._buf.add_run(items, start)
        except ValueError as e:
            raise HandlerResultError(str(e)) from None
        except (struct.error, TypeError, IndexError, AttributeError):
            bad = start  # find the item at fault
            for bad in range(start, len(items)):
                try:
                    replies.DirBuffer(4096).add_run(items[bad:bad + 1], 0)
                except (struct.error, TypeError, IndexError, AttributeError):
                    break
            raise HandlerResultError(f"{self._what}: DirSlice item {bad} is not (name, mode, ino, ...) "
                                     f"with int mode and ino: {items[bad]!r}") from None

    def reply(self, unique: int) -> bytes:
        """The complete reply."""
        return self._buf.reply(unique)
