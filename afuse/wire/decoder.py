"""From one request's bytes to its :class:`~afuse.wire.requests.Request`, by the opcode table."""

from __future__ import annotations

import struct

from . import structs as S
from .constants import GETATTR_FH, Opcode
from .opcodes import BY_OPCODE, OpSpec
from .requests import GetattrRequest, LookupRequest, ProtocolError, Request, UnknownOpcode, _d_getattr, _d_lookup

__all__ = ["Decoder"]

_HEADER = S.IN_HEADER.unpack_from
_GETATTR_IN = S.GETATTR_IN.unpack_from


class Decoder:
    """Turns one request's bytes into a :class:`Request`, by the opcode table.

    ``setxattr_ext`` must follow the negotiated FUSE_SETXATTR_EXT (it changes setxattr_in's size).
    Each decoder has its own copy of the table (:data:`.opcodes.OPCODES`):
    :meth:`register` adds opcodes to this decoder only.
    """

    __slots__ = ("_decoders", "_specs", "setxattr_ext")

    def __init__(self, setxattr_ext: bool = False) -> None:
        self.setxattr_ext = setxattr_ext
        self._specs: dict[int, OpSpec] = dict(BY_OPCODE)
        self._decoders = {op: spec.decode for op, spec in self._specs.items()}  # the hot path's view

    def register(self, *specs: OpSpec) -> None:
        """Decode these opcodes too (e.g. the experimental :data:`afuse.wire.iomap.OPCODES`)."""
        for spec in specs:
            self._specs[spec.opcode] = spec
            self._decoders[spec.opcode] = spec.decode

    def spec(self, opcode: int) -> OpSpec | None:
        """The table's record for ``opcode`` in this decoder, or None."""
        return self._specs.get(opcode)

    def decode(self, buf: bytes | bytearray | memoryview) -> Request:
        """Decode one complete request; raises :class:`ProtocolError` for malformed input."""
        mv = buf if type(buf) is memoryview else memoryview(buf)
        size = len(mv)
        if size < 40:
            raise ProtocolError(f"request of {size} bytes is shorter than its header")
        length, opcode, unique, nodeid, uid, gid, pid, extlen, _ = _HEADER(mv)
        if length != size:
            raise ProtocolError(f"header says {length} bytes, read {size}", unique, opcode)
        decode = self._decoders.get(opcode)
        if decode is None:
            raise UnknownOpcode(f"unknown opcode {opcode}", unique, opcode)
        if not extlen:
            # The hottest requests, decoded here without slicing or the table's call: the same
            # result as their decoders (which a connection's own registration still replaces).
            if decode is _d_getattr and size == 56:
                flags, _, fh = _GETATTR_IN(mv, 40)
                return GetattrRequest(unique, nodeid, uid, gid, pid, fh if flags & GETATTR_FH else None)
            if decode is _d_lookup:
                name = mv[40:].tobytes()
                end = name.find(b"\0")
                if end >= 0:
                    return LookupRequest(unique, nodeid, uid, gid, pid, name[:end])
        try:
            if extlen:
                end = length - extlen * 8
                if end < 40:
                    raise ProtocolError("extensions longer than the request", unique, opcode)
                if self._specs[opcode].extensions:
                    return decode(self, (unique, nodeid, uid, gid, pid), mv[40:end], mv[end:])
                return decode(self, (unique, nodeid, uid, gid, pid), mv[40:end])
            return decode(self, (unique, nodeid, uid, gid, pid), mv[40:])
        except ProtocolError as e:
            e.unique, e.opcode = unique, opcode
            raise
        except (struct.error, ValueError, IndexError, TypeError) as e:
            raise ProtocolError(f"malformed {_opname(opcode)}: {e}", unique, opcode) from e


def _opname(opcode: int) -> str:
    try:
        return Opcode(opcode).name
    except ValueError:
        return f"opcode {opcode}"
