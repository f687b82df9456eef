"""Encoders of replies: each returns the complete message (``fuse_out_header`` + body) for one write."""

from __future__ import annotations

from collections.abc import Sequence
from struct import Struct
from struct import error as struct_error
from typing import Any

from . import structs as S
from .constants import IOCTL_RETRY
from .types import Attr, Entry, FsStats, Handle, IoctlReply, Lock, Statx

_NS = 1_000_000_000
_HDR = S.OUT_HEADER
_REPLY_ENTRY = Struct("<IiQ" + S.ENTRY_OUT_FULL.format[1:])
_REPLY_ATTR = Struct("<IiQ" + S.ATTR_OUT_FULL.format[1:])
_REPLY_OPEN = Struct("<IiQ" + S.OPEN_OUT.format[1:])
_REPLY_CREATE = Struct("<IiQ" + S.ENTRY_OUT_FULL.format[1:] + S.OPEN_OUT.format[1:])
_REPLY_WRITE = Struct("<IiQ" + S.WRITE_OUT.format[1:])
_REPLY_U64 = Struct("<IiQQ")
_REPLY_STATFS = Struct("<IiQ" + S.KSTATFS.format[1:])
_REPLY_LK = Struct("<IiQ" + S.LK_OUT.format[1:])
_REPLY_POLL = Struct("<IiQ" + S.POLL_OUT.format[1:])
_REPLY_IOCTL = Struct("<IiQ" + S.IOCTL_OUT.format[1:])
_REPLY_STATX = Struct("<IiQ" + S.STATX_OUT_HEAD.format[1:] + S.STATX.format[1:])
_DIRENT = S.DIRENT
_DIRENTPLUS = Struct(S.ENTRY_OUT_FULL.format + S.DIRENT.format[1:])
_PAD = b"\0" * 8

assert _REPLY_ENTRY.size == 144 and _REPLY_CREATE.size == 160 and _REPLY_STATX.size == 304


def split_timeout(t: float) -> tuple[int, int]:
    """Seconds as the kernel's (u64 seconds, u32 nanoseconds); negative (or NaN) counts as 0, inf as the maximum."""
    if not t > 0:
        return 0, 0
    if t >= 1 << 64:
        return (1 << 64) - 1, 0
    sec, ns = divmod(round(t * _NS), _NS)
    return sec, ns


_SPLIT: dict[float, tuple[int, int]] = {}


def _split(t: float) -> tuple[int, int]:
    """:func:`split_timeout`, remembered for the few timeouts a filesystem uses."""
    try:
        return _SPLIT[t]
    except KeyError:
        pass
    except TypeError:  # unhashable: let split_timeout say what is wrong with it
        return split_timeout(t)
    out = split_timeout(t)
    if len(_SPLIT) < 64:
        _SPLIT[t] = out
    return out


def error(unique: int, errno: int) -> bytes:
    """An error reply (header only)."""
    return _HDR.pack(16, -errno, unique)


def empty(unique: int) -> bytes:
    """A success reply with no body."""
    return _HDR.pack(16, 0, unique)


def data(unique: int, payload: bytes | bytearray | memoryview) -> bytes:
    """A reply whose body is ``payload`` (READ, READLINK, GETXATTR/LISTXATTR values)."""
    return _HDR.pack(16 + len(payload), 0, unique) + payload


#: READ replies carrying at least this many bytes are written as ``[header, data]`` with one
#: writev(2) instead of being concatenated (a copy, and for large replies a fresh allocation).
VECTOR_MIN = 16384

#: A reply as buffers to write with one writev(2): the header, then the body.
Vector = list[bytes | bytearray | memoryview]


def data_header(unique: int, size: int) -> bytes:
    """The header of a data reply whose body of ``size`` bytes follows in other buffers."""
    return _HDR.pack(16 + size, 0, unique)


def data_vector(unique: int, payload: bytes | bytearray | memoryview, size: int) -> Vector:
    """A data reply as ``[header, payload]``; ``size`` is ``len(payload)`` in bytes."""
    return [data_header(unique, size), payload]


def _attr_fields(a: Attr) -> tuple[int, ...]:
    asec, ans = divmod(a.atime_ns, _NS)
    msec, mns = divmod(a.mtime_ns, _NS)
    csec, cns = divmod(a.ctime_ns, _NS)
    return (a.ino, a.size, a.blocks, asec, msec, csec, ans, mns, cns, a.mode, a.nlink,
            a.uid, a.gid, a.rdev, a.blksize, a.flags)


def entry(unique: int, e: Entry, entry_timeout: float, attr_timeout: float) -> bytes:
    """The reply to LOOKUP, MKNOD, MKDIR, SYMLINK, LINK (``fuse_entry_out``)."""
    a = e.attr
    t = e.entry_timeout
    ev, evn = _split(entry_timeout if t is None else t)
    t = a.timeout
    av, avn = _split(attr_timeout if t is None else t)
    at, mt, ct = a.atime_ns, a.mtime_ns, a.ctime_ns  # one pack, no intermediate tuple (the hot path)
    return _REPLY_ENTRY.pack(144, 0, unique, e.nodeid, e.generation, ev, av, evn, avn,
                             a.ino, a.size, a.blocks, at // _NS, mt // _NS, ct // _NS, at % _NS, mt % _NS,
                             ct % _NS, a.mode, a.nlink, a.uid, a.gid, a.rdev, a.blksize, a.flags)


def attr(unique: int, a: Attr, attr_timeout: float) -> bytes:
    """The reply to GETATTR and SETATTR (``fuse_attr_out``)."""
    t = a.timeout
    av, avn = _split(attr_timeout if t is None else t)
    at, mt, ct = a.atime_ns, a.mtime_ns, a.ctime_ns
    return _REPLY_ATTR.pack(120, 0, unique, av, avn, 0, a.ino, a.size, a.blocks, at // _NS, mt // _NS, ct // _NS,
                            at % _NS, mt % _NS, ct % _NS, a.mode, a.nlink, a.uid, a.gid, a.rdev, a.blksize, a.flags)


def open_(unique: int, h: Handle) -> bytes:
    """The reply to OPEN and OPENDIR (``fuse_open_out``)."""
    return _REPLY_OPEN.pack(32, 0, unique, h.fh, int(h.flags), h.backing_id)


def create(unique: int, e: Entry, h: Handle, entry_timeout: float, attr_timeout: float) -> bytes:
    """The reply to CREATE and TMPFILE (``fuse_entry_out`` + ``fuse_open_out``)."""
    a = e.attr
    ev, evn = split_timeout(entry_timeout if e.entry_timeout is None else e.entry_timeout)
    av, avn = split_timeout(attr_timeout if a.timeout is None else a.timeout)
    return _REPLY_CREATE.pack(160, 0, unique, e.nodeid, e.generation, ev, av, evn, avn,
                              *_attr_fields(a), h.fh, int(h.flags), h.backing_id)


def write(unique: int, size: int) -> bytes:
    """The reply to WRITE and COPY_FILE_RANGE (``fuse_write_out``)."""
    return _REPLY_WRITE.pack(24, 0, unique, size, 0)


def u64(unique: int, value: int) -> bytes:
    """A reply whose body is one u64: BMAP, LSEEK, COPY_FILE_RANGE_64."""
    return _REPLY_U64.pack(24, 0, unique, value)


def xattr_size(unique: int, size: int) -> bytes:
    """The reply to GETXATTR/LISTXATTR with size 0 (``fuse_getxattr_out``)."""
    return _REPLY_WRITE.pack(24, 0, unique, size, 0)


def statfs(unique: int, st: FsStats) -> bytes:
    """The reply to STATFS (``fuse_statfs_out``)."""
    return _REPLY_STATFS.pack(96, 0, unique, st.blocks, st.bfree, st.bavail, st.files, st.ffree,
                              st.bsize, st.namelen, st.frsize, 0)


def lk(unique: int, lock: Lock) -> bytes:
    """The reply to GETLK (``fuse_lk_out``)."""
    return _REPLY_LK.pack(40, 0, unique, lock.start, lock.end, lock.type, lock.pid)


def poll(unique: int, revents: int) -> bytes:
    """The reply to POLL (``fuse_poll_out``)."""
    return _REPLY_POLL.pack(24, 0, unique, revents, 0)


def ioctl(unique: int, r: IoctlReply) -> bytes:
    """The reply to IOCTL: ``fuse_ioctl_out`` + output data, or a RETRY with iovecs."""
    if r.in_iovs is not None or r.out_iovs is not None:
        ins, outs = r.in_iovs or [], r.out_iovs or []
        body = b"".join(S.IOCTL_IOVEC.pack(base, n) for base, n in (*ins, *outs))
        return _REPLY_IOCTL.pack(32 + len(body), 0, unique, 0, IOCTL_RETRY, len(ins), len(outs)) + body
    return _REPLY_IOCTL.pack(32 + len(r.data), 0, unique, r.result, 0, 0, 0) + r.data


def statx(unique: int, sx: Statx, attr_timeout: float) -> bytes:
    """The reply to STATX (``fuse_statx_out``)."""
    av, avn = split_timeout(attr_timeout if sx.timeout is None else sx.timeout)
    return _REPLY_STATX.pack(
        304, 0, unique, av, avn, 0,
        sx.mask, sx.blksize, sx.attributes, sx.nlink, sx.uid, sx.gid, sx.mode & 0xFFFF, sx.ino,
        sx.size, sx.blocks, sx.attributes_mask,
        sx.atime.sec, sx.atime.nsec, 0, sx.btime.sec, sx.btime.nsec, 0,
        sx.ctime.sec, sx.ctime.nsec, 0, sx.mtime.sec, sx.mtime.nsec, 0,
        sx.rdev_major, sx.rdev_minor, sx.dev_major, sx.dev_minor,
    )


_DIRENT_BY_LEN: dict[int, Struct] = {}
_DIRENTPLUS_BY_LEN: dict[int, Struct] = {}


def _dirent_struct(n: int) -> Struct:
    """fuse_dirent followed by an ``n``-byte name and its zero padding, as one Struct."""
    st = _DIRENT_BY_LEN.get(n)
    if st is None:
        pad = ((24 + n + 7) & ~7) - 24 - n
        st = _DIRENT_BY_LEN[n] = Struct(f"{_DIRENT.format}{n}s{pad}x")
    return st


def _direntplus_struct(n: int) -> Struct:
    """fuse_direntplus followed by an ``n``-byte name and its zero padding, as one Struct."""
    st = _DIRENTPLUS_BY_LEN.get(n)
    if st is None:
        pad = ((152 + n + 7) & ~7) - 152 - n
        st = _DIRENTPLUS_BY_LEN[n] = Struct(f"{_DIRENTPLUS.format}{n}s{pad}x")
    return st


def valid_name(name: object) -> bool:
    """Whether ``name`` can be a directory entry's name: bytes, 1 to 4095 long, no ``/`` or NUL."""
    return isinstance(name, bytes) and 0 < len(name) <= 4095 and b"/" not in name and b"\0" not in name


def valid_names(names: Sequence[object]) -> bool:
    """Whether every one of ``names`` passes :func:`valid_name`, checked for the lot at once (in
    C: a listing checks thousands)."""
    if not names:
        return True
    if len(set(map(type, names))) != 1 or type(names[0]) is not bytes:
        return False
    lengths = list(map(len, names))  # type: ignore[arg-type]
    if min(lengths) == 0 or max(lengths) > 4095:
        return False
    joined = b"\0".join(names)  # type: ignore[arg-type]
    return b"/" not in joined and joined.count(b"\0") == len(names) - 1


class DirBuffer:
    """Builds a READDIR or READDIRPLUS reply body without exceeding the kernel's ``size``."""

    __slots__ = ("_atimeout", "_etimeout", "_parts", "_plus", "_room")

    def __init__(self, size: int, plus: bool = False, entry_timeout: float = 0.0,
                 attr_timeout: float = 0.0) -> None:
        self._parts: list[bytes] = []
        self._room = size
        self._plus = plus
        self._etimeout = split_timeout(entry_timeout)
        self._atimeout = split_timeout(attr_timeout)

    def add(self, name: bytes, offset: int, ino: int, mode: int) -> bool:
        """Append a READDIR record; False (and nothing added) when it does not fit."""
        n = len(name)
        reclen = (24 + n + 7) & ~7
        if reclen > self._room:
            return False
        self._room -= reclen
        st = _DIRENT_BY_LEN.get(n) or _dirent_struct(n)
        self._parts.append(st.pack(ino, offset, n, (mode & 0o170000) >> 12, name))
        return True

    def add_run(self, items: Sequence[tuple[Any, ...]], start: int) -> int:
        """Append READDIR records for ``items[start:]`` (each ``(name, mode, ino, ...)``, item ``i``
        at offset ``i + 1``, ino 0 sent as 0xFFFFFFFF) while they fit; the index after the last
        one added. ValueError for a name that is not bytes, is empty, longer than 4095 bytes or
        holds ``/`` or NUL (nothing is added then)."""
        room, parts, by_len = self._room, self._parts, _DIRENT_BY_LEN
        first = len(parts)
        append = parts.append
        i, end = start, len(items)
        name: Any = None
        try:
            while i < end:
                it = items[i]
                name = it[0]
                n = len(name)
                reclen = (24 + n + 7) & ~7
                if reclen > room:
                    break
                st = by_len.get(n) or _dirent_struct(n)
                append(st.pack(it[2] or 0xFFFFFFFF, i + 1, n, (it[1] & 0o170000) >> 12, name))
                i += 1
                room -= reclen
        except BaseException as e:
            del parts[first:]
            if isinstance(e, struct_error) and isinstance(name, str):
                raise ValueError(f"invalid directory entry name {name!r}") from None
            raise
        # The names, checked for the whole run at once (a third of the cost of checking each).
        names = [it[0] for it in items[start:i]]
        if not valid_names(names):
            del parts[first:]
            name = next(name for name in names if not valid_name(name))
            raise ValueError(f"invalid directory entry name {name!r}")
        self._room = room
        return i

    def add_plus(self, name: bytes, offset: int, e: Entry) -> bool:
        """Append a READDIRPLUS record; False (and nothing added) when it does not fit."""
        n = len(name)
        reclen = (152 + n + 7) & ~7
        if reclen > self._room:
            return False
        self._room -= reclen
        a = e.attr
        if e.nodeid:
            ev, evn = self._etimeout if e.entry_timeout is None else split_timeout(e.entry_timeout)
            av, avn = self._atimeout if a.timeout is None else split_timeout(a.timeout)
        else:
            ev = evn = av = avn = 0
        asec, ans = divmod(a.atime_ns, _NS)
        msec, mns = divmod(a.mtime_ns, _NS)
        csec, cns = divmod(a.ctime_ns, _NS)
        self._parts.append(_direntplus_struct(n).pack(
            e.nodeid, e.generation, ev, av, evn, avn,
            a.ino, a.size, a.blocks, asec, msec, csec, ans, mns, cns, a.mode, a.nlink,
            a.uid, a.gid, a.rdev, a.blksize, a.flags,
            a.ino, offset, n, (a.mode & 0o170000) >> 12, name))
        return True

    def reply(self, unique: int) -> bytes:
        """The complete reply message."""
        body = b"".join(self._parts)
        return _HDR.pack(16 + len(body), 0, unique) + body


def xattr_names(names: list[bytes]) -> bytes:
    """A LISTXATTR body: each name NUL-terminated."""
    return b"".join(n + b"\0" for n in names)
