"""The experimental, unmerged FUSE iomap codecs and dispatch, byte for byte without a kernel.

No released kernel sends IOMAP_BEGIN/IOMAP_END; golden bytes below are written out from the
2026 series' layouts (``fuse_iomap_io`` 32, ``fuse_iomap_begin_in`` 32, ``fuse_iomap_begin_out``
64, ``fuse_iomap_end_in`` 72 bytes), independently of afuse's Struct formats.
"""

from __future__ import annotations

import errno
import subprocess
import sys

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

import afuse
from afuse.dispatch import Reply
from afuse.errors import FUSEError
from afuse.iomap import IomapOperations, install
from afuse.wire import iomap as w
from afuse.wire import structs as S
from afuse.wire.decoder import Decoder
from afuse.wire.iomap import (
    IomapBeginReply,
    IomapBeginRequest,
    IomapEndRequest,
    IomapFlag,
    IomapMapping,
    IomapOp,
    IomapType,
)
from afuse.wire.kernel import split_reply
from afuse.wire.requests import ProtocolError, UnknownOpcode


def le(n: int, size: int, signed: bool = False) -> bytes:
    return n.to_bytes(size, "little", signed=signed)


def in_header(length: int, opcode: int, unique: int, nodeid: int, pid: int) -> bytes:
    return le(length, 4) + le(opcode, 4) + le(unique, 8) + le(nodeid, 8) + le(0, 4) + le(0, 4) \
        + le(pid, 4) + le(0, 2) + le(0, 2)


def io(offset: int, length: int, addr: int, typ: int, flags: int, dev: int) -> bytes:
    return le(offset, 8) + le(length, 8) + le(addr, 8) + le(typ, 2) + le(flags, 2) + le(dev, 4)


BEGIN_GOLDEN = in_header(72, 4094, 2, 5, 7) + le(0x11, 4) + le(0, 4) + le(5, 8) + le(4096, 8) + le(8192, 8)
MAP = IomapMapping(offset=4096, length=8192, type=IomapType.MAPPED, addr=1 << 20,
                   flags=IomapFlag.WANT_IOMAP_END | IomapFlag.DIRTY, dev=1)
MAP_GOLDEN = io(4096, 8192, 1 << 20, 2, 0x82, 1)
END_GOLDEN = in_header(112, 4095, 4, 5, 7) + le(0x11, 4) + le(0, 4) + le(5, 8) + le(4096, 8) \
    + le(8192, 8) + le(-1, 8, signed=True) + MAP_GOLDEN


def test_sizes() -> None:
    assert (S.IOMAP_IO.size, S.IOMAP_BEGIN_IN.size, S.IOMAP_BEGIN_OUT.size, S.IOMAP_END_IN.size) \
        == (32, 32, 64, 72)
    assert int(afuse.Opcode.IOMAP_BEGIN) == 4094 and int(afuse.Opcode.IOMAP_END) == 4095


def test_request_encoders_golden() -> None:
    assert w.encode_begin_request(2, 5, IomapOp.WRITE | IomapOp.DIRECT, 5, 4096, 8192, pid=7) \
        == BEGIN_GOLDEN
    assert w.encode_end_request(4, 5, IomapOp.WRITE | IomapOp.DIRECT, 5, 4096, 8192, -1, MAP, pid=7) \
        == END_GOLDEN


def _iomap_decoder() -> Decoder:
    d = Decoder()
    w.enable(d)
    return d


def test_decoders() -> None:
    d = _iomap_decoder()
    assert w.enabled(d)
    req = d.decode(BEGIN_GOLDEN)
    assert req == IomapBeginRequest(2, 5, 0, 0, 7, IomapOp.WRITE | IomapOp.DIRECT, 5, 4096, 8192)
    end = d.decode(END_GOLDEN)
    assert isinstance(end, IomapEndRequest)
    assert (end.unique, end.nodeid, end.opflags, end.pos, end.count, end.written) \
        == (4, 5, IomapOp.WRITE | IomapOp.DIRECT, 4096, 8192, -1)
    assert end.map == MAP and end.map.type is IomapType.MAPPED
    # Malformed: short body, non-zero reserved field.
    with pytest.raises(ProtocolError):
        d.decode(in_header(64, 4094, 2, 5, 7) + bytes(24))
    bad = bytearray(BEGIN_GOLDEN)
    bad[44] = 1
    with pytest.raises(ProtocolError) as e:
        d.decode(bytes(bad))
    assert e.value.unique == 2


def test_not_decoded_unless_enabled() -> None:
    # Per connection: enabling iomap on one decoder leaves every other one (and the process) alone.
    code = (
        "from afuse.wire import Decoder, UnknownOpcode\n"
        f"b = {BEGIN_GOLDEN!r}\n"
        "try:\n    Decoder().decode(b)\nexcept UnknownOpcode:\n    print('unknown')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert r.stdout.strip() == "unknown", r.stderr
    enabled = _iomap_decoder()
    other = Decoder()
    assert not w.enabled(other)
    with pytest.raises(UnknownOpcode):
        other.decode(BEGIN_GOLDEN)
    assert isinstance(enabled.decode(BEGIN_GOLDEN), IomapBeginRequest)
    conn = afuse.Dispatcher(MapFS()).connection
    with pytest.raises(UnknownOpcode):
        conn.decode(BEGIN_GOLDEN)


def test_begin_reply_golden() -> None:
    reply = w.encode_begin_reply(2, IomapBeginReply(MAP))
    overwrite = io(0, 0, 0xFFFFFFFFFFFFFFFF, 255, 0, 0)
    assert reply == le(80, 4) + le(0, 4) + le(2, 8) + MAP_GOLDEN + overwrite
    hole = IomapMapping(offset=0, length=4096)
    reply = w.encode_begin_reply(9, IomapBeginReply(hole, MAP))
    assert reply == le(80, 4) + le(0, 4) + le(9, 8) + io(0, 4096, 0xFFFFFFFFFFFFFFFF, 0, 0, 0) + MAP_GOLDEN


_u64 = st.integers(0, (1 << 64) - 1)
_mapping = st.builds(IomapMapping, offset=_u64, length=_u64,
                     type=st.sampled_from(list(IomapType)), addr=_u64,
                     flags=st.integers(0, 0xFFFF).map(IomapFlag), dev=st.integers(0, (1 << 32) - 1))


@given(read=_mapping, write=st.one_of(st.none(), _mapping))
def test_begin_reply_round_trip(read: IomapMapping, write: IomapMapping | None) -> None:
    reply = IomapBeginReply(read, write)
    _err, unique, body = split_reply(w.encode_begin_reply(3, reply))
    assert unique == 3
    back = w.decode_begin_reply(body)
    if write is not None and write == w.PURE_OVERWRITE:
        assert back == IomapBeginReply(read, None)
    else:
        assert back == reply


class MapFS(afuse.Operations, IomapOperations):
    """Maps every file range 1:1 onto device 1; records IOMAP_END."""

    def __init__(self) -> None:
        self.ended: list[IomapEndRequest] = []

    async def iomap_begin(self, req: IomapBeginRequest) -> IomapBeginReply:
        if req.nodeid == 99:
            raise FUSEError(errno.EIO)
        m = IomapMapping(offset=req.pos, length=req.count, type=IomapType.MAPPED, addr=1 << 20,
                         flags=IomapFlag.WANT_IOMAP_END | IomapFlag.DIRTY, dev=1)
        write = m if req.opflags & IomapOp.WRITE else None
        return IomapBeginReply(m, write)

    async def iomap_end(self, req: IomapEndRequest) -> None:
        self.ended.append(req)


def _serve(d: afuse.Dispatcher, message: bytes) -> bytes | None:
    """What a session does with one message: decode, dispatch, return the reply."""
    req = d.connection.decode(message)
    reply: Reply = trio.run(d.handle, req)
    assert reply is None or isinstance(reply, bytes)
    return reply


def test_dispatch_round_trip() -> None:
    fs = MapFS()
    d = afuse.Dispatcher(fs)
    install(d)
    reply = _serve(d, BEGIN_GOLDEN)
    assert reply == le(80, 4) + le(0, 4) + le(2, 8) + MAP_GOLDEN + MAP_GOLDEN
    read_only = w.encode_begin_request(6, 5, IomapOp.REPORT, 5, 4096, 8192)
    _e, _u, body = split_reply(_serve(d, read_only) or b"")
    assert w.decode_begin_reply(body) == IomapBeginReply(MAP, None)
    assert _serve(d, END_GOLDEN) == le(16, 4) + le(0, 4) + le(4, 8)
    assert fs.ended[0].map == MAP and fs.ended[0].written == -1
    # Handler errors answer their errno.
    failing = w.encode_begin_request(8, 99, IomapOp.WRITE, 99, 0, 4096)
    assert _serve(d, failing) == le(16, 4) + le(-errno.EIO, 4, signed=True) + le(8, 8)


def test_dispatch_defaults_and_checks() -> None:
    class Bare(afuse.Operations, IomapOperations):
        pass

    d = afuse.Dispatcher(Bare())
    install(d)
    assert _serve(d, BEGIN_GOLDEN) == le(16, 4) + le(-errno.ENOSYS, 4, signed=True) + le(2, 8)
    with pytest.raises(TypeError):
        install(afuse.Dispatcher(afuse.Operations()))

    class Wrong(afuse.Operations, IomapOperations):
        async def iomap_begin(self, req: IomapBeginRequest) -> IomapBeginReply:
            return MAP  # type: ignore[return-value]

    d = afuse.Dispatcher(Wrong())
    install(d)
    assert _serve(d, BEGIN_GOLDEN) == le(16, 4) + le(-errno.EIO, 4, signed=True) + le(2, 8)
    assert d.errors and "IomapBeginReply" in str(d.errors[0])
