"""EXPERIMENTAL, UNMERGED: codecs of the proposed FUSE iomap operations.

Darrick J. Wong's FUSE iomap series (RFC 2025-06; postings 2025-09, 2025-10, 2026-02, with
libfuse patches into 2026) lets a FUSE server hand the kernel file-to-block mappings so that
the kernel does the I/O to a block device itself. **No released kernel sends these requests**
(6.18 has none of it), and the series' numbers are placeholders the author says will change at
merge: FUSE_IOMAP_BEGIN = 4094, FUSE_IOMAP_END = 4095, INIT flag FUSE_IOMAP = 1 << 43 (a bit
another 2026 proposal also claims). Layouts here are the 2026 form:

* ``fuse_iomap_io`` (32): offset, length, addr (u64 each), type, flags (u16 each), dev (u32).
* ``fuse_iomap_begin_in`` (32): opflags, reserved (u32), attr_ino, pos, count (u64).
* ``fuse_iomap_begin_out`` (64): the read mapping, then the write mapping (``fuse_iomap_io``).
* ``fuse_iomap_end_in`` (72): opflags, reserved, attr_ino, pos, count, written (s64), map.

Nothing here is active by default: :func:`enable` adds :data:`OPCODES` to one connection's
(or decoder's) table, and :func:`afuse.iomap.install` routes them to a filesystem's
``iomap_begin``/``iomap_end``. INIT never asks for FUSE_IOMAP unless a filesystem passes the bit
in ``InitConfig.extra_flags`` (useless on any released kernel, which does not offer it).
"""

from __future__ import annotations

import enum
from struct import Struct

import attrs

from . import structs as S
from .connection import Connection
from .constants import Opcode
from .decoder import Decoder
from .opcodes import OpSpec, Shape
from .requests import ProtocolError, Request

__all__ = [
    "DEV_NULL", "INIT_FLAG_IOMAP", "NULL_ADDR", "IomapBeginReply", "IomapBeginRequest",
    "IomapEndRequest", "IomapFlag", "IomapMapping", "IomapOp", "IomapType",
    "decode_begin_reply", "enable", "enabled", "encode_begin_reply", "encode_begin_request",
    "encode_end_request",
]

#: The proposed INIT flag (placeholder; not offered by any released kernel).
INIT_FLAG_IOMAP = 1 << 43
#: ``FUSE_IOMAP_NULL_ADDR``: no disk address (holes, delalloc).
NULL_ADDR = 0xFFFFFFFFFFFFFFFF
#: ``FUSE_IOMAP_DEV_NULL``: no device.
DEV_NULL = 0


class IomapType(enum.IntEnum):
    """``FUSE_IOMAP_TYPE_*``: what a mapping describes."""

    HOLE = 0
    DELALLOC = 1
    MAPPED = 2
    UNWRITTEN = 3
    INLINE = 4
    NOCACHE = 253
    RETRY_CACHE = 254
    #: Only as the write mapping: writes use the read mapping.
    PURE_OVERWRITE = 255


class IomapFlag(enum.IntFlag):
    """``FUSE_IOMAP_F_*`` (u16) mapping flags; SIZE_CHANGED and STALE only in IOMAP_END."""

    NEW = 1 << 0
    DIRTY = 1 << 1
    SHARED = 1 << 2
    MERGED = 1 << 3
    BOUNDARY = 1 << 4
    ANON_WRITE = 1 << 5
    ATOMIC_BIO = 1 << 6
    #: Ask the kernel to send IOMAP_END for this mapping.
    WANT_IOMAP_END = 1 << 7
    SIZE_CHANGED = 1 << 8
    STALE = 1 << 9


class IomapOp(enum.IntFlag):
    """``FUSE_IOMAP_OP_*`` (u32): why the kernel asks."""

    WRITE = 1 << 0
    ZERO = 1 << 1
    REPORT = 1 << 2
    FAULT = 1 << 3
    DIRECT = 1 << 4
    NOWAIT = 1 << 5
    OVERWRITE_ONLY = 1 << 6
    UNSHARE = 1 << 7
    DAX = 1 << 8
    ATOMIC = 1 << 9
    DONTCACHE = 1 << 10
    SWAPFILE = 1 << 30
    WRITEBACK = 1 << 31


@attrs.define(slots=True, frozen=True)
class IomapMapping:
    """One mapping (``struct fuse_iomap_io``): file range ``offset``/``length`` at disk ``addr``
    of backing device ``dev`` (an id from the extended BACKING_OPEN)."""

    offset: int = 0
    length: int = 0
    type: IomapType | int = IomapType.HOLE
    addr: int = NULL_ADDR
    flags: IomapFlag | int = 0
    dev: int = DEV_NULL

    def pack(self) -> tuple[int, int, int, int, int, int]:
        """The fields in wire order."""
        return (self.offset, self.length, self.addr, int(self.type), int(self.flags), self.dev)

    @classmethod
    def unpack(cls, f: tuple[int, ...]) -> IomapMapping:
        """From six wire-order fields."""
        offset, length, addr, typ, flags, dev = f
        try:
            t: IomapType | int = IomapType(typ)
        except ValueError:
            t = typ
        return cls(offset, length, t, addr, IomapFlag(flags), dev)


#: The write mapping of a reply that has none: writes use the read mapping.
PURE_OVERWRITE = IomapMapping(type=IomapType.PURE_OVERWRITE)


@attrs.define(slots=True, frozen=True)
class IomapBeginReply:
    """The reply to IOMAP_BEGIN (``struct fuse_iomap_begin_out``).

    ``write`` None sends a PURE_OVERWRITE mapping: writes go where ``read`` says.
    """

    read: IomapMapping
    write: IomapMapping | None = None


@attrs.define(slots=True)
class IomapBeginRequest(Request):
    """IOMAP_BEGIN (proposed): map ``count`` bytes at ``pos`` of inode ``nodeid`` for ``opflags``."""

    opcode = Opcode.IOMAP_BEGIN
    opflags: IomapOp
    attr_ino: int
    pos: int
    count: int


@attrs.define(slots=True)
class IomapEndRequest(Request):
    """IOMAP_END (proposed): the kernel is done with ``map``; ``written`` bytes were written."""

    opcode = Opcode.IOMAP_END
    opflags: IomapOp
    attr_ino: int
    pos: int
    count: int
    written: int
    map: IomapMapping


# -- request decoders (daemon side) --------------------------------------------------------------

_Head = tuple[int, int, int, int, int]


def _reserved(value: int) -> None:
    if value:
        raise ProtocolError(f"reserved field is {value}, not 0")


def _d_begin(d: Decoder, h: _Head, b: memoryview) -> Request:
    if len(b) != S.IOMAP_BEGIN_IN.size:
        raise ProtocolError(f"iomap_begin_in is {len(b)} bytes, expected {S.IOMAP_BEGIN_IN.size}")
    opflags, reserved, ino, pos, count = S.IOMAP_BEGIN_IN.unpack_from(b)
    _reserved(reserved)
    return IomapBeginRequest(*h, IomapOp(opflags), ino, pos, count)


def _d_end(d: Decoder, h: _Head, b: memoryview) -> Request:
    if len(b) != S.IOMAP_END_IN.size:
        raise ProtocolError(f"iomap_end_in is {len(b)} bytes, expected {S.IOMAP_END_IN.size}")
    f = S.IOMAP_END_IN.unpack_from(b)
    opflags, reserved, ino, pos, count, written = f[:6]
    _reserved(reserved)
    return IomapEndRequest(*h, IomapOp(opflags), ino, pos, count, written, IomapMapping.unpack(f[6:]))


#: The table's records of the proposed opcodes: give them to a connection with :func:`enable`.
OPCODES = (
    OpSpec(Opcode.IOMAP_BEGIN, IomapBeginRequest, _d_begin, None, Shape.CUSTOM, "iomap_begin"),
    OpSpec(Opcode.IOMAP_END, IomapEndRequest, _d_end, None, Shape.CUSTOM, "iomap_end"),
)


def enable(decoder: Decoder | Connection) -> None:
    """Decode IOMAP_BEGIN/IOMAP_END on this decoder (or connection) only."""
    decoder.register(*OPCODES)


def enabled(decoder: Decoder | Connection) -> bool:
    """True once :func:`enable` ran on ``decoder``."""
    d = decoder if isinstance(decoder, Decoder) else decoder.decoder
    return d.spec(Opcode.IOMAP_BEGIN) is not None


# -- reply encoder (daemon side) -----------------------------------------------------------------

_REPLY_BEGIN = Struct("<IiQ" + S.IOMAP_BEGIN_OUT.format[1:])
assert _REPLY_BEGIN.size == 16 + 64


def encode_begin_reply(unique: int, reply: IomapBeginReply) -> bytes:
    """The complete IOMAP_BEGIN reply message (header + ``fuse_iomap_begin_out``)."""
    write = PURE_OVERWRITE if reply.write is None else reply.write
    return _REPLY_BEGIN.pack(_REPLY_BEGIN.size, 0, unique, *reply.read.pack(), *write.pack())


# -- the kernel's side, for tests --------------------------------------------------------------


def _request(opcode: int, unique: int, nodeid: int, body: bytes, uid: int, gid: int, pid: int) -> bytes:
    return S.IN_HEADER.pack(40 + len(body), opcode, unique, nodeid, uid, gid, pid, 0, 0) + body


def encode_begin_request(unique: int, nodeid: int, opflags: int, attr_ino: int, pos: int, count: int,
                         uid: int = 0, gid: int = 0, pid: int = 0) -> bytes:
    """An IOMAP_BEGIN request as the proposed kernel code would write it."""
    body = S.IOMAP_BEGIN_IN.pack(int(opflags), 0, attr_ino, pos, count)
    return _request(Opcode.IOMAP_BEGIN, unique, nodeid, body, uid, gid, pid)


def encode_end_request(unique: int, nodeid: int, opflags: int, attr_ino: int, pos: int, count: int,
                       written: int, mapping: IomapMapping, uid: int = 0, gid: int = 0,
                       pid: int = 0) -> bytes:
    """An IOMAP_END request as the proposed kernel code would write it."""
    body = S.IOMAP_END_IN.pack(int(opflags), 0, attr_ino, pos, count, written, *mapping.pack())
    return _request(Opcode.IOMAP_END, unique, nodeid, body, uid, gid, pid)


def decode_begin_reply(body: bytes | bytearray | memoryview) -> IomapBeginReply:
    """The inverse of :func:`encode_begin_reply`, from the reply body (after the out header).

    A PURE_OVERWRITE write mapping decodes as ``write=None``.
    """
    if len(body) != S.IOMAP_BEGIN_OUT.size:
        raise ProtocolError(f"iomap_begin_out is {len(body)} bytes, expected {S.IOMAP_BEGIN_OUT.size}")
    f = S.IOMAP_BEGIN_OUT.unpack_from(body)
    read, write = IomapMapping.unpack(f[:6]), IomapMapping.unpack(f[6:])
    return IomapBeginReply(read, None if write == PURE_OVERWRITE else write)
