"""The request fast path gives the same answers as the general one.

GETATTR and LOOKUP are decoded without the table's call, attr/entry replies are packed in one
call, routes turn handler exceptions into replies themselves (``Dispatcher.call``), and the
session steps a handler's coroutine by hand. Each is checked here against the general code.
"""

from __future__ import annotations

import errno
import math
import stat
import struct

import pytest

from afuse import Attr, Entry, FUSEError, Operations
from afuse.dispatch import Dispatcher
from afuse.wire import kernel as k
from afuse.wire import replies
from afuse.wire import requests as r
from afuse.wire.constants import GETATTR_FH, Opcode
from afuse.wire.decoder import Decoder
from afuse.wire.opcodes import BY_OPCODE
from afuse.wire.requests import ProtocolError

ATTR = Attr(ino=7, mode=stat.S_IFREG | 0o640, nlink=3, uid=11, gid=12, rdev=5, size=1 << 40, blocks=99,
            atime_ns=1_700_000_000_123_456_789, mtime_ns=5, ctime_ns=2_000_000_000, blksize=4096, flags=1)


def _general(data: bytes) -> r.Request:
    """Decode through the opcode table's decoder, as every other opcode is."""
    mv = memoryview(data)
    _, opcode, unique, nodeid, uid, gid, pid, _, _ = struct.unpack_from("<IIQQIIIHH", mv)
    return BY_OPCODE[opcode].decode(Decoder(), (unique, nodeid, uid, gid, pid), mv[40:])


@pytest.mark.parametrize("req", [
    r.GetattrRequest(10, 2, 1000, 1000, 42, None),
    r.GetattrRequest(11, 3, 0, 0, 1, 77),
    r.LookupRequest(12, 1, 5, 6, 7, b"fresh"),
    r.LookupRequest(13, 9, 5, 6, 7, b"a" * 255),
])
def test_fast_decoders_match_the_table(req: r.Request) -> None:
    data = k.encode_request(req)
    fast = Decoder().decode(data)
    assert fast == req == _general(data)
    assert type(fast) is type(req)


def test_getattr_flags_without_fh_flag_ignore_fh() -> None:
    body = struct.pack("<IIQ", 0, 0, 1234)  # fh present but GETATTR_FH not set
    data = struct.pack("<IIQQIIIHH", 56, Opcode.GETATTR, 3, 2, 0, 0, 1, 0, 0) + body
    assert Decoder().decode(data) == r.GetattrRequest(3, 2, 0, 0, 1, None)
    body = struct.pack("<IIQ", GETATTR_FH, 0, 1234)
    data = struct.pack("<IIQQIIIHH", 56, Opcode.GETATTR, 3, 2, 0, 0, 1, 0, 0) + body
    assert Decoder().decode(data) == r.GetattrRequest(3, 2, 0, 0, 1, 1234)


def test_lookup_without_nul_is_still_a_protocol_error() -> None:
    data = struct.pack("<IIQQIIIHH", 45, Opcode.LOOKUP, 4, 1, 0, 0, 1, 0, 0) + b"fresh"
    with pytest.raises(ProtocolError) as e:
        Decoder().decode(data)
    assert e.value.unique == 4 and e.value.opcode == Opcode.LOOKUP


def test_old_kernel_getattr_without_body_takes_the_general_path() -> None:
    data = struct.pack("<IIQQIIIHH", 40, Opcode.GETATTR, 5, 2, 0, 0, 1, 0, 0)
    assert Decoder().decode(data) == r.GetattrRequest(5, 2, 0, 0, 1, None)


def test_a_registered_decoder_replaces_the_fast_path() -> None:
    spec = BY_OPCODE[Opcode.GETATTR]
    seen: list[int] = []

    def mine(d: object, h: tuple[int, int, int, int, int], b: memoryview) -> r.Request:
        seen.append(h[0])
        return r.GetattrRequest(*h, None)

    import attrs
    dec = Decoder()
    dec.register(attrs.evolve(spec, decode=mine))
    dec.decode(k.encode_request(r.GetattrRequest(21, 2, 0, 0, 1, 5)))
    assert seen == [21]


def _attr_reply_the_long_way(unique: int, a: Attr, timeout: float) -> bytes:
    sec, ns = replies.split_timeout(timeout)
    t = [divmod(x, 1_000_000_000) for x in (a.atime_ns, a.mtime_ns, a.ctime_ns)]
    return struct.pack("<IiQQIIQQQQQQIIIIIIIIII", 120, 0, unique, sec, ns, 0, a.ino, a.size, a.blocks,
                       t[0][0], t[1][0], t[2][0], t[0][1], t[1][1], t[2][1], a.mode, a.nlink, a.uid, a.gid,
                       a.rdev, a.blksize, a.flags)


@pytest.mark.parametrize("timeout", [0.0, 1.0, 1.5, 3600.0, -1.0, math.inf, math.nan, 1e-9])
def test_attr_reply_packs_like_the_struct(timeout: float) -> None:
    assert replies.attr(9, ATTR, timeout) == _attr_reply_the_long_way(9, ATTR, timeout)
    assert replies.attr(9, ATTR, timeout) == replies.attr(9, ATTR, timeout)  # remembered split


def test_entry_reply_round_trips() -> None:
    e = Entry(7, ATTR, generation=3, entry_timeout=0.25)
    out = replies.entry(8, e, 1.0, 2.5)
    size, err, unique = struct.unpack_from("<IiQ", out)
    assert (size, err, unique) == (144, 0, 8)
    back = k.decode_entry(out[16:])
    assert back.nodeid == 7 and back.generation == 3 and back.entry_timeout == 0.25
    assert back.attr.atime_ns == ATTR.atime_ns and back.attr.size == ATTR.size and back.attr.timeout == 2.5


def test_bad_attr_field_is_still_an_error_reply() -> None:
    class Bad(Operations):
        async def getattr(self, req: r.GetattrRequest) -> Attr:
            return Attr(ino=2, mode=stat.S_IFREG, atime_ns="soon")  # type: ignore[arg-type]

    d = Dispatcher(Bad())
    reply = _run(d, r.GetattrRequest(30, 2, 0, 0, 1, None))
    assert struct.unpack_from("<IiQ", reply) == (16, -errno.EIO, 30)
    assert len(d.errors) == 1


def _run(d: Dispatcher, req: r.Request) -> bytes:
    """Step ``d.call(req)`` by hand, as the session does; the handler must not block."""
    coro = d.call(req)
    with pytest.raises(StopIteration) as stop:
        coro.send(None)
    out = stop.value.value
    assert isinstance(out, bytes)
    return out


@pytest.mark.parametrize(("exc", "code"), [
    (FUSEError(errno.ENOENT), errno.ENOENT),
    (PermissionError(errno.EACCES, "no"), errno.EACCES),
    (OSError(0, "zero"), errno.EIO),
    (RuntimeError("bug"), errno.EIO),
])
def test_call_answers_handler_errors(exc: BaseException, code: int) -> None:
    class Raising(Operations):
        async def lookup(self, req: r.LookupRequest) -> Entry:
            raise exc

    d = Dispatcher(Raising())
    reply = _run(d, r.LookupRequest(31, 1, 0, 0, 1, b"x"))
    assert struct.unpack_from("<IiQ", reply) == (16, -code, 31)
    assert len(d.errors) == (1 if isinstance(exc, RuntimeError) else 0)


def test_call_of_an_unrouted_request_is_enosys() -> None:
    d = Dispatcher(Operations())
    reply = _run(d, r.InitRequest(32, 0, 0, 0, 0, 7, 45, 0, 0))  # type: ignore[arg-type]
    assert struct.unpack_from("<IiQ", reply) == (16, -errno.ENOSYS, 32)


def test_registered_route_errors_are_answered() -> None:
    d = Dispatcher(Operations())

    async def broken(req: r.Request) -> bytes:
        raise FUSEError(errno.EROFS)

    d.register(r.GetattrRequest, broken)
    reply = _run(d, r.GetattrRequest(33, 2, 0, 0, 1, None))
    assert struct.unpack_from("<IiQ", reply) == (16, -errno.EROFS, 33)
