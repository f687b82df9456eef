"""The kernel's side of the protocol, for tests and the fake kernel.

:func:`encode_request` is the exact inverse of :meth:`afuse.wire.decoder.Decoder.decode`; the
``decode_*`` functions are the inverses of the encoders in :mod:`.replies`, :mod:`.init` and
:mod:`.notify`. They are strict: a body of the wrong size, a name without its NUL or non-zero
padding raises :class:`~afuse.wire.requests.ProtocolError`, so tests notice malformed replies
that the real kernel might silently reject.

Per-shape reply decoders take the reply *body* (the bytes after the 16-byte ``fuse_out_header``);
:func:`split_reply` separates the two.
"""

from __future__ import annotations

import stat
from typing import Any

import attrs

from . import requests as r
from . import structs as S
from .constants import (
    EXPIRE_ONLY,
    IOCTL_RETRY,
    FOpen,
    InitFlag,
    NotifyCode,
    Opcode,
)
from .opcodes import BY_CLASS
from .requests import ProtocolError
from .types import Attr, DirEntry, Entry, FsStats, Handle, IoctlReply, Lock, Statx, Timestamp

Buffer = bytes | bytearray | memoryview

_NS = 1_000_000_000
_LOW32 = 0xFFFFFFFF

__all__ = [
    "CuseInitReply", "InitReply", "decode_attr", "decode_create", "decode_cuse_init_reply",
    "decode_direntplus", "decode_dirents", "decode_entry", "decode_init_reply", "decode_ioctl",
    "decode_lk", "decode_notification", "decode_open", "decode_poll", "decode_reply_header",
    "decode_statfs", "decode_statx", "decode_u64", "decode_write", "decode_xattr_size",
    "encode_request", "split_reply",
]


# ---------------------------------------------------------------------------------------------
# Requests


def _opcode(req: r.Request) -> int:
    if isinstance(req, r.RenameRequest):
        return Opcode.RENAME2 if req.flags else Opcode.RENAME
    if isinstance(req, r.SetlkRequest):
        return Opcode.SETLKW if req.sleep else Opcode.SETLK
    if isinstance(req, r.CopyFileRangeRequest):
        return Opcode.COPY_FILE_RANGE_64 if req.wide else Opcode.COPY_FILE_RANGE
    return type(req).opcode


def _header(req: r.Request, opcode: int, body: bytes, ext: bytes = b"") -> bytes:
    if len(ext) % 8 or len(ext) // 8 > 0xFFFF:
        raise ValueError(f"extensions of {len(ext)} bytes")
    return S.IN_HEADER.pack(40 + len(body) + len(ext), opcode, req.unique, req.nodeid, req.uid, req.gid,
                            req.pid, len(ext) // 8, 0) + body + ext


def encode_request(req: r.Request, setxattr_ext: bool = True) -> bytes:
    """The bytes the kernel would send for ``req`` (``fuse_in_header`` included).

    ``setxattr_ext`` selects the 16-byte ``fuse_setxattr_in`` (FUSE_SETXATTR_EXT negotiated) and
    must match the decoder's. The opcode follows the fields where the kernel has two: RENAME
    (flags 0) or RENAME2, SETLK or SETLKW (``sleep``), COPY_FILE_RANGE or _64 (``wide``), FORGET
    (one item for the header's nodeid) or BATCH_FORGET (header nodeid 0). INIT from a kernel
    older than 7.36 has the 16-byte ``fuse_init_in``. Raises ValueError for a request the kernel
    could not send (a name with NUL, counts that disagree with the data, ...).
    """
    if isinstance(req, r.ForgetRequest):
        if req.nodeid:
            if len(req.items) != 1 or req.items[0].nodeid != req.nodeid:
                raise ValueError("FORGET has one item, for the header's nodeid (else use nodeid 0)")
            return _header(req, Opcode.FORGET, S.FORGET_IN.pack(req.items[0].nlookup))
        body = S.BATCH_FORGET_IN.pack(len(req.items), 0) + b"".join(
            S.FORGET_ONE.pack(i.nodeid, i.nlookup) for i in req.items)
        return _header(req, Opcode.BATCH_FORGET, body)
    if isinstance(req, r.SetxattrRequest):
        return _header(req, Opcode.SETXATTR, r._e_setxattr(req, setxattr_ext))
    spec = BY_CLASS.get(type(req))
    if spec is None or spec.encode is None:
        raise TypeError(f"no encoder for {type(req).__name__}")
    ext = r._extensions(req) if isinstance(req, r._Creating) else b""
    return _header(req, _opcode(req), spec.encode(req), ext)


# ---------------------------------------------------------------------------------------------
# Replies


def split_reply(buf: Buffer) -> tuple[int, int, bytes]:
    """``(error, unique, body)`` of one reply; ``error`` is 0, a negative errno or a notify code."""
    mv = memoryview(buf)
    if len(mv) < 16:
        raise ProtocolError(f"reply of {len(mv)} bytes is shorter than its header")
    length, error, unique = S.OUT_HEADER.unpack_from(mv)
    if length != len(mv):
        raise ProtocolError(f"reply header says {length} bytes, got {len(mv)}", unique)
    if error < 0 and length != 16:
        raise ProtocolError(f"error reply ({error}) with a body of {length - 16} bytes", unique)
    if error <= -512:
        raise ProtocolError(f"error {error} out of range", unique)
    if error > 0 and unique:
        raise ProtocolError(f"positive error {error} in a reply", unique)
    return error, unique, mv[16:].tobytes()


def decode_reply_header(buf: Buffer) -> tuple[int, int]:
    """``(error, unique)`` of a complete reply (checked as the kernel does: ``len``, error range)."""
    error, unique, _ = split_reply(buf)
    return error, unique


def _exact(body: Buffer, n: int, what: str) -> memoryview:
    mv = memoryview(body)
    if len(mv) != n:
        raise ProtocolError(f"{what} body is {len(mv)} bytes, expected {n}")
    return mv


def _timeout(sec: int, nsec: int) -> float:
    if nsec >= _NS:
        raise ProtocolError(f"timeout nanoseconds {nsec} out of range")
    return sec + nsec / _NS


def _attr(f: tuple[Any, ...], timeout: float | None) -> Attr:
    """An Attr from the 16 flattened fuse_attr fields."""
    ino, size, blocks, asec, msec, csec, ans, mns, cns, mode, nlink, uid, gid, rdev, blksize, flags = f
    for ns in (ans, mns, cns):
        if ns >= _NS:
            raise ProtocolError(f"attribute nanoseconds {ns} out of range")
    return Attr(ino, mode, nlink, uid, gid, rdev, size, blocks, asec * _NS + ans, msec * _NS + mns,
                csec * _NS + cns, blksize, flags, timeout)


def _entry(f: tuple[Any, ...]) -> Entry:
    nodeid, gen, ev, av, evn, avn = f[:6]
    return Entry(nodeid, _attr(f[6:], _timeout(av, avn)), gen, _timeout(ev, evn))


def decode_entry(body: Buffer) -> Entry:
    """A ``fuse_entry_out`` (LOOKUP, MKNOD, ...); both timeouts come back as float seconds."""
    return _entry(S.ENTRY_OUT_FULL.unpack(_exact(body, 128, "entry")))


def decode_attr(body: Buffer) -> Attr:
    """A ``fuse_attr_out`` (GETATTR, SETATTR); ``timeout`` is attr_valid in seconds."""
    av, avn, _dummy, *f = S.ATTR_OUT_FULL.unpack(_exact(body, 104, "attr"))
    return _attr(tuple(f), _timeout(av, avn))


def _handle(mv: memoryview) -> Handle:
    fh, flags, backing_id = S.OPEN_OUT.unpack(mv)
    return Handle(fh, FOpen(flags), backing_id)


def decode_open(body: Buffer) -> Handle:
    """A ``fuse_open_out`` (OPEN, OPENDIR)."""
    return _handle(_exact(body, 16, "open"))


def decode_create(body: Buffer) -> tuple[Entry, Handle]:
    """``fuse_entry_out`` + ``fuse_open_out`` (CREATE, TMPFILE)."""
    mv = _exact(body, 144, "create")
    return _entry(S.ENTRY_OUT_FULL.unpack(mv[:128])), _handle(mv[128:])


def decode_statfs(body: Buffer) -> FsStats:
    """A ``fuse_statfs_out``."""
    blocks, bfree, bavail, files, ffree, bsize, namelen, frsize, _ = S.KSTATFS.unpack(_exact(body, 80, "statfs"))
    return FsStats(blocks, bfree, bavail, files, ffree, bsize, namelen, frsize)


def decode_write(body: Buffer) -> int:
    """A ``fuse_write_out`` (WRITE, COPY_FILE_RANGE): the byte count."""
    size, _ = S.WRITE_OUT.unpack(_exact(body, 8, "write"))
    return int(size)


def decode_xattr_size(body: Buffer) -> int:
    """A ``fuse_getxattr_out`` (GETXATTR/LISTXATTR with size 0): the length needed."""
    size, _ = S.GETXATTR_OUT.unpack(_exact(body, 8, "getxattr"))
    return int(size)


def decode_u64(body: Buffer) -> int:
    """A one-u64 body (``fuse_bmap_out``, ``fuse_lseek_out``, ``fuse_copy_file_range_out``)."""
    (value,) = S.U64.unpack(_exact(body, 8, "u64"))
    return int(value)


def decode_lk(body: Buffer) -> Lock:
    """A ``fuse_lk_out`` (GETLK)."""
    start, end, typ, pid = S.LK_OUT.unpack(_exact(body, 24, "lk"))
    return Lock(start, end, typ, pid)


def decode_poll(body: Buffer) -> int:
    """A ``fuse_poll_out``: the ready events."""
    revents, _ = S.POLL_OUT.unpack(_exact(body, 8, "poll"))
    return int(revents)


def decode_ioctl(body: Buffer) -> IoctlReply:
    """A ``fuse_ioctl_out`` with its data, or a RETRY with its iovecs (``in_iovs``/``out_iovs``)."""
    mv = memoryview(body)
    if len(mv) < 16:
        raise ProtocolError(f"ioctl body is {len(mv)} bytes, expected at least 16")
    result, flags, n_in, n_out = S.IOCTL_OUT.unpack_from(mv)
    if not flags & IOCTL_RETRY:
        if n_in or n_out:
            raise ProtocolError("iovec counts without IOCTL_RETRY")
        return IoctlReply(result, mv[16:].tobytes())
    iovs = [(int(b), int(n)) for b, n in S.IOCTL_IOVEC.iter_unpack(_exact(mv[16:], 16 * (n_in + n_out), "iovec"))]
    return IoctlReply(result, b"", iovs[:n_in], iovs[n_in:])


def decode_statx(body: Buffer) -> Statx:
    """A ``fuse_statx_out``; ``timeout`` is attr_valid in seconds."""
    mv = _exact(body, 288, "statx")
    av, avn, _flags = S.STATX_OUT_HEAD.unpack_from(mv)
    (mask, blksize, attributes, nlink, uid, gid, mode, ino, size, blocks, attributes_mask,
     asec, ans, _r1, bsec, bns, _r2, csec, cns, _r3, msec, mns, _r4,
     rdev_major, rdev_minor, dev_major, dev_minor) = S.STATX.unpack_from(mv, S.STATX_OUT_HEAD.size)
    return Statx(mask, blksize, attributes, nlink, uid, gid, mode, ino, size, blocks, attributes_mask,
                 Timestamp(asec, ans), Timestamp(bsec, bns), Timestamp(csec, cns), Timestamp(msec, mns),
                 rdev_major, rdev_minor, dev_major, dev_minor, _timeout(av, avn))


def _dirent_name(mv: memoryview, pos: int, head: int, namelen: int) -> tuple[bytes, int]:
    """The name of the record at ``pos`` (fixed part ``head`` bytes) and the next record's offset."""
    start = pos + head
    reclen = (head + namelen + 7) & ~7
    if namelen == 0 or namelen > 4095 or pos + reclen > len(mv):
        raise ProtocolError(f"directory record at {pos}: namelen {namelen}, {len(mv) - pos} bytes left")
    name = mv[start : start + namelen].tobytes()
    if b"/" in name or b"\0" in name:
        raise ProtocolError(f"directory record at {pos}: bad name {name!r}")
    if any(mv[start + namelen : pos + reclen]):
        raise ProtocolError(f"directory record at {pos}: non-zero padding")
    return name, pos + reclen


def decode_dirents(body: Buffer) -> list[DirEntry]:
    """A READDIR body: each record as a DirEntry whose ``attr`` has only ``ino`` and the type bits."""
    mv = memoryview(body)
    out: list[DirEntry] = []
    pos = 0
    while pos < len(mv):
        if pos + 24 > len(mv):
            raise ProtocolError(f"partial directory record at {pos}")
        ino, off, namelen, typ = S.DIRENT.unpack_from(mv, pos)
        name, pos2 = _dirent_name(mv, pos, 24, namelen)
        out.append(DirEntry(name, off, Attr(ino=ino, mode=typ << 12)))
        pos = pos2
    return out


def decode_direntplus(body: Buffer) -> list[DirEntry]:
    """A READDIRPLUS body: each record as a DirEntry with ``entry`` (and ``attr`` None)."""
    mv = memoryview(body)
    out: list[DirEntry] = []
    pos = 0
    while pos < len(mv):
        if pos + 152 > len(mv):
            raise ProtocolError(f"partial directory record at {pos}")
        e = _entry(S.ENTRY_OUT_FULL.unpack_from(mv, pos))
        ino, off, namelen, typ = S.DIRENT.unpack_from(mv, pos + 128)
        if ino != e.attr.ino or typ != stat.S_IFMT(e.attr.mode) >> 12:
            raise ProtocolError(f"direntplus at {pos}: dirent ino/type disagree with the entry's attr")
        name, pos = _dirent_name(mv, pos, 152, namelen)
        out.append(DirEntry(name, off, None, e))
    return out


@attrs.define(slots=True)
class InitReply:
    """A decoded ``fuse_init_out``; ``flags`` includes ``flags2`` only if INIT_EXT is set (as the kernel reads it)."""

    size: int
    major: int
    minor: int
    max_readahead: int
    flags: InitFlag
    max_background: int
    congestion_threshold: int
    max_write: int
    time_gran: int
    max_pages: int
    map_alignment: int
    flags2: int
    max_stack_depth: int
    request_timeout: int


def decode_init_reply(body: Buffer) -> InitReply:
    """A ``fuse_init_out`` of 8 (version only), 24 (before 7.23) or 64 bytes."""
    mv = memoryview(body)
    if len(mv) not in (8, 24, S.INIT_OUT.size):
        raise ProtocolError(f"init reply of {len(mv)} bytes")
    f = S.INIT_OUT.unpack(mv.tobytes() + bytes(S.INIT_OUT.size - len(mv)))
    major, minor, ra, flags, bg, cong, max_write, gran, max_pages, align, flags2, depth, timeout = f
    all_flags = flags | (flags2 << 32 if flags & InitFlag.INIT_EXT else 0)
    return InitReply(len(mv), major, minor, ra, InitFlag(all_flags), bg, cong, max_write, gran, max_pages,
                     align, flags2, depth, timeout)


@attrs.define(slots=True)
class CuseInitReply:
    """A decoded ``cuse_init_out`` and its device-info strings."""

    major: int
    minor: int
    flags: int
    max_read: int
    max_write: int
    dev_major: int
    dev_minor: int
    info: list[bytes]


def decode_cuse_init_reply(body: Buffer) -> CuseInitReply:
    """A ``cuse_init_out`` followed by NUL-terminated ``key=value`` device-info strings."""
    mv = memoryview(body)
    if len(mv) < S.CUSE_INIT_OUT.size:
        raise ProtocolError(f"cuse init reply of {len(mv)} bytes")
    major, minor, _, flags, max_read, max_write, dev_major, dev_minor = S.CUSE_INIT_OUT.unpack_from(mv)
    raw = mv[S.CUSE_INIT_OUT.size :].tobytes()
    if raw and not raw.endswith(b"\0"):
        raise ProtocolError("device info does not end with NUL")
    return CuseInitReply(major, minor, flags, max_read, max_write, dev_major, dev_minor, raw.split(b"\0")[:-1])


# ---------------------------------------------------------------------------------------------
# Notifications



def _named(mv: memoryview, head: int, namelen: int) -> bytes:
    if len(mv) != head + namelen + 1 or mv[head + namelen] != 0:
        raise ProtocolError(f"notification of {len(mv)} bytes for a name of {namelen}")
    name = mv[head : head + namelen].tobytes()
    if b"\0" in name:
        raise ProtocolError("name contains NUL")
    return name


def decode_notification(buf: Buffer) -> tuple[NotifyCode, dict[str, Any]]:
    """A whole notification message: its code and fields named as the :mod:`.notify` encoder's parameters.

    So ``decode_notification(notify.inval_entry(**kw)) == (NotifyCode.INVAL_ENTRY, kw)`` with every
    parameter given.
    """
    code, unique, body = split_reply(buf)
    if unique != 0:
        raise ProtocolError(f"notification with unique {unique}", unique)
    try:
        nc = NotifyCode(code)
    except ValueError:
        raise ProtocolError(f"unknown notification code {code}") from None
    mv = memoryview(body)
    try:
        if nc is NotifyCode.POLL:
            (kh,) = S.NOTIFY_POLL_WAKEUP_OUT.unpack(mv)
            return nc, {"kh": kh}
        if nc is NotifyCode.INVAL_INODE:
            nodeid, off, length = S.NOTIFY_INVAL_INODE_OUT.unpack(mv)
            return nc, {"nodeid": nodeid, "offset": off, "length": length}
        if nc is NotifyCode.INVAL_ENTRY:
            parent, namelen, flags = S.NOTIFY_INVAL_ENTRY_OUT.unpack_from(mv)
            if flags & ~EXPIRE_ONLY:
                raise ProtocolError(f"unknown inval_entry flags {flags:#x}")
            name = _named(mv, S.NOTIFY_INVAL_ENTRY_OUT.size, namelen)
            return nc, {"parent": parent, "name": name, "expire_only": bool(flags & EXPIRE_ONLY)}
        if nc is NotifyCode.DELETE:
            parent, child, namelen, _ = S.NOTIFY_DELETE_OUT.unpack_from(mv)
            name = _named(mv, S.NOTIFY_DELETE_OUT.size, namelen)
            return nc, {"parent": parent, "child": child, "name": name}
        if nc is NotifyCode.STORE:
            nodeid, off, size, _ = S.NOTIFY_STORE_OUT.unpack_from(mv)
            data = mv[S.NOTIFY_STORE_OUT.size :].tobytes()
            if len(data) != size:
                raise ProtocolError(f"STORE of {size} bytes carries {len(data)}")
            return nc, {"nodeid": nodeid, "offset": off, "data": data}
        if nc is NotifyCode.RETRIEVE:
            notify_unique, nodeid, off, size, _ = S.NOTIFY_RETRIEVE_OUT.unpack(mv)
            return nc, {"notify_unique": notify_unique, "nodeid": nodeid, "offset": off, "size": size}
        if nc is NotifyCode.PRUNE:
            count, _, _ = S.NOTIFY_PRUNE_OUT.unpack_from(mv)
            ids = _exact(mv[S.NOTIFY_PRUNE_OUT.size :], 8 * count, "prune")
            return nc, {"nodeids": [int(n) for (n,) in S.U64.iter_unpack(ids)]}
        # RESEND, INC_EPOCH
        _exact(mv, 0, nc.name)
        return nc, {}
    except ProtocolError:
        raise
    except Exception as e:  # struct.error: wrong size
        raise ProtocolError(f"malformed {nc.name} notification: {e}") from e
