"""The sans-IO wire layer: golden bytes, struct sizes, round trips and malformed input."""

from __future__ import annotations

import ast
import pathlib
import stat
import struct
from typing import Any, TypeVar

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import afuse.wire
from afuse.wire import kernel as k
from afuse.wire import notify, replies
from afuse.wire import requests as r
from afuse.wire import structs as S
from afuse.wire.connection import Connection
from afuse.wire.constants import (
    GETATTR_FH,
    IOCTL_RETRY,
    FAttr,
    FOpen,
    InitFlag,
    NotifyCode,
    Opcode,
)
from afuse.wire.decoder import Decoder
from afuse.wire.requests import ProtocolError, UnknownOpcode
from afuse.wire.types import Attr, DirEntry, Entry, FsStats, Handle, IoctlReply, Lock, Statx, Timestamp

NS = 1_000_000_000

# -- little-endian field writers, independent of afuse.wire.structs -------------------------------


def h(s: str) -> bytes:
    return bytes.fromhex("".join(s.split()))


def u16(x: int) -> bytes:
    return x.to_bytes(2, "little")


def u32(x: int) -> bytes:
    return x.to_bytes(4, "little")


def s32(x: int) -> bytes:
    return x.to_bytes(4, "little", signed=True)


def u64(x: int) -> bytes:
    return x.to_bytes(8, "little")


def s64(x: int) -> bytes:
    return x.to_bytes(8, "little", signed=True)


def out_header(length: int, error: int, unique: int) -> bytes:
    return u32(length) + s32(error) + u64(unique)


def fuse_attr(a: Attr) -> bytes:
    """struct fuse_attr, field by field (88 bytes)."""
    (asec, ans), (msec, mns), (csec, cns) = (divmod(t, NS) for t in (a.atime_ns, a.mtime_ns, a.ctime_ns))
    return (u64(a.ino) + u64(a.size) + u64(a.blocks) + s64(asec) + s64(msec) + s64(csec) + u32(ans) + u32(mns)
            + u32(cns) + u32(a.mode) + u32(a.nlink) + u32(a.uid) + u32(a.gid) + u32(a.rdev) + u32(a.blksize)
            + u32(a.flags))


# =================================================================================================
# Golden bytes: requests

LOOKUP_X = h("""
    2a000000 01000000 0400000000000000 0100000000000000
    e8030000 e8030000 d2040000 0000 0000
    7800
""")


def test_in_header_golden() -> None:
    raw = S.IN_HEADER.pack(42, 1, 4, 1, 1000, 1000, 1234, 0, 0)
    assert raw == LOOKUP_X[:40]
    assert S.IN_HEADER.unpack(LOOKUP_X[:40]) == (42, 1, 4, 1, 1000, 1000, 1234, 0, 0)


def test_lookup_golden() -> None:
    req = r.LookupRequest(4, 1, 1000, 1000, 1234, b"x")
    assert k.encode_request(req) == LOOKUP_X
    assert Decoder().decode(LOOKUP_X) == req
    # The probe on a real kernel: LOOKUP "x" is 42 bytes.
    assert len(LOOKUP_X) == 42


INIT_7_45 = h("""
    68000000 1a000000 0200000000000000 0000000000000000
    00000000 00000000 00000000 0000 0000
    07000000 2d000000 00000200 fbffff73 fd050000
""") + bytes(44)
HOST_OFFER = InitFlag(0x73FFFFFB | 0x5FD << 32)


def test_init_request_golden() -> None:
    req = r.InitRequest(2, 0, 0, 0, 0, 7, 45, 131072, HOST_OFFER)
    assert len(INIT_7_45) == 104  # as probed
    assert k.encode_request(req) == INIT_7_45
    got = Decoder().decode(INIT_7_45)
    assert got == req
    assert isinstance(got, r.InitRequest)
    assert got.flags & InitFlag.HAS_RESEND and got.flags & InitFlag.SECURITY_CTX
    assert not got.flags & InitFlag.OVER_IO_URING


def test_init_request_old_kernel_is_16_bytes() -> None:
    req = r.InitRequest(2, 0, 0, 0, 0, 7, 31, 65536, InitFlag.ASYNC_READ | InitFlag.BIG_WRITES)
    raw = k.encode_request(req)
    assert raw == h("38000000 1a000000 0200000000000000") + bytes(24) + h("07000000 1f000000 00000100 21000000")
    assert Decoder().decode(raw) == req


def test_mkdir_with_supp_groups_golden() -> None:
    req = r.MkdirRequest(6, 1, 1000, 1000, 1234, name=b"d", mode=0o755, umask=0o22, supp_groups=[100])
    raw = h("""
        42000000 09000000 0600000000000000 0100000000000000
        e8030000 e8030000 d2040000 0200 0000
        ed010000 12000000 6400
        10000000 20000000 01000000 64000000
    """)
    assert k.encode_request(req) == raw
    assert Decoder().decode(raw) == req


def test_create_with_security_context_golden() -> None:
    req = r.CreateRequest(8, 1, 0, 0, 1, name=b"f", flags=0o100101, mode=0o100644, umask=0o22, open_flags=0,
                          security_context=[r.SecurityContext(b"sec.a", b"xyz")])
    body = u32(0o100101) + u32(0o100644) + u32(0o22) + u32(0) + b"f\0"
    ext = u32(32) + u32(1) + u32(3) + u32(0) + b"sec.a\0" + b"xyz" + bytes(7)
    raw = u32(40 + len(body) + len(ext)) + u32(35) + u64(8) + u64(1) + u32(0) + u32(0) + u32(1) + u16(4) + u16(0)
    assert k.encode_request(req) == raw + body + ext
    assert Decoder().decode(raw + body + ext) == req


def test_create_with_empty_security_header() -> None:
    """With FUSE_SECURITY_CTX the kernel sends the header even with no context: an empty list, not None."""
    req = r.CreateRequest(8, 1, 0, 0, 1, name=b"f", security_context=[])
    raw = k.encode_request(req)
    assert raw.endswith(u32(8) + u32(0)) and raw[36:38] == u16(1)
    assert Decoder().decode(raw) == req


def test_forget_and_batch_forget_golden() -> None:
    one = r.ForgetRequest(26, 5, 0, 0, 0, [r.ForgetItem(5, 3)])
    raw = k.encode_request(one)
    assert raw == u32(48) + u32(2) + u64(26) + u64(5) + bytes(16) + u64(3)
    assert Decoder().decode(raw) == one
    batch = r.ForgetRequest(28, 0, 0, 0, 0, [r.ForgetItem(5, 3), r.ForgetItem(6, 1)])
    raw = k.encode_request(batch)
    assert raw == u32(80) + u32(42) + u64(28) + u64(0) + bytes(16) + u32(2) + u32(0) + u64(5) + u64(3) + u64(6) + u64(1)
    assert Decoder().decode(raw) == batch
    with pytest.raises(ValueError):
        k.encode_request(r.ForgetRequest(26, 5, 0, 0, 0, [r.ForgetItem(6, 3)]))


def test_opcode_pairs() -> None:
    hd = (10, 1, 0, 0, 0)

    def op(req: r.Request) -> int:
        return int(struct.unpack_from("<I", k.encode_request(req), 4)[0])

    assert op(r.RenameRequest(*hd, b"a", 2, b"b", 0)) == Opcode.RENAME
    assert op(r.RenameRequest(*hd, b"a", 2, b"b", 1)) == Opcode.RENAME2
    lock = Lock(0, 10, 1, 5)
    assert op(r.SetlkRequest(*hd, 1, 2, lock, 0, False)) == Opcode.SETLK
    assert op(r.SetlkRequest(*hd, 1, 2, lock, 0, True)) == Opcode.SETLKW
    assert op(r.CopyFileRangeRequest(*hd, 1, 0, 2, 3, 0, 10, 0, False)) == Opcode.COPY_FILE_RANGE
    assert op(r.CopyFileRangeRequest(*hd, 1, 0, 2, 3, 0, 10, 0, True)) == Opcode.COPY_FILE_RANGE_64
    assert op(r.OpendirRequest(*hd, 0, 0)) == Opcode.OPENDIR
    assert op(r.TmpfileRequest(*hd, name=b"/")) == Opcode.TMPFILE
    # RENAME2 with flags 0 (never sent) still decodes to flags 0.
    raw = bytearray(k.encode_request(r.RenameRequest(*hd, b"a", 2, b"b", 0)))
    body = S.RENAME2_IN.pack(2, 0, 0) + b"a\0b\0"
    raw = bytearray(S.IN_HEADER.pack(40 + len(body), Opcode.RENAME2, 10, 1, 0, 0, 0, 0, 0) + body)
    assert Decoder().decode(bytes(raw)) == r.RenameRequest(*hd, b"a", 2, b"b", 0)


def test_getattr_fh_flag() -> None:
    hd = (10, 1, 0, 0, 0)
    raw = k.encode_request(r.GetattrRequest(*hd, None))
    assert raw[40:] == bytes(16)
    raw = k.encode_request(r.GetattrRequest(*hd, 7))
    assert raw[40:] == u32(GETATTR_FH) + u32(0) + u64(7)
    # Very old kernels sent no getattr_in.
    assert Decoder().decode(S.IN_HEADER.pack(40, Opcode.GETATTR, *hd, 0, 0)) == r.GetattrRequest(*hd, None)
    raw = k.encode_request(r.StatxRequest(*hd, None, GETATTR_FH | 2, 0x100, 0xFFF))
    assert raw[40:44] == u32(2)  # fh None: the FH bit is not sent


def test_setattr_valid_from_fields() -> None:
    hd = (12, 3, 0, 0, 0)
    req = r.SetattrRequest(*hd, FAttr.MODE | FAttr.SIZE | FAttr.ATIME | FAttr.ATIME_NOW | FAttr.MTIME,
                           None, 100, None, None, -1_500_000_000, None, 0o644, None, None, True, False, False)
    raw = k.encode_request(req)
    valid = FAttr.MODE | FAttr.SIZE | FAttr.ATIME | FAttr.ATIME_NOW | FAttr.MTIME
    expect = (u32(valid) + u32(0) + u64(0) + u64(100) + u64(0) + s64(0) + s64(-2) + s64(0) + u32(0)
              + u32(500_000_000) + u32(0) + u32(0o644) + u32(0) + u32(0) + u32(0) + u32(0))
    assert raw[40:] == expect
    assert Decoder().decode(raw) == req


def test_setxattr_both_sizes() -> None:
    req = r.SetxattrRequest(14, 1, 0, 0, 0, b"user.a", b"v\0w", 1, 0)
    compat = k.encode_request(req, setxattr_ext=False)
    assert compat[40:] == u32(3) + u32(1) + b"user.a\0v\0w"
    assert Decoder(setxattr_ext=False).decode(compat) == req
    ext = k.encode_request(attrs.evolve(req, setxattr_flags=1), setxattr_ext=True)
    assert ext[40:] == u32(3) + u32(1) + u32(1) + u32(0) + b"user.a\0v\0w"
    assert Decoder(setxattr_ext=True).decode(ext) == attrs.evolve(req, setxattr_flags=1)
    with pytest.raises(ValueError):
        k.encode_request(attrs.evolve(req, setxattr_flags=1), setxattr_ext=False)


# =================================================================================================
# Golden bytes: replies

ATTR_F = Attr(ino=5, mode=0o100644, nlink=1, uid=1000, gid=1000, rdev=0, size=4096, blocks=8,
              atime_ns=1_500_000_001, mtime_ns=-1, ctime_ns=2 * NS, blksize=4096, flags=0)
ATTR_BYTES = (u64(5) + u64(4096) + u64(8) + s64(1) + s64(-1) + s64(2) + u32(500_000_001) + u32(999_999_999)
              + u32(0) + u32(0o100644) + u32(1) + u32(1000) + u32(1000) + u32(0) + u32(4096) + u32(0))


def test_attr_layout_helper_matches_hand_bytes() -> None:
    assert fuse_attr(ATTR_F) == ATTR_BYTES and len(ATTR_BYTES) == 88


def test_entry_reply_golden() -> None:
    e = Entry(5, ATTR_F, generation=3, entry_timeout=1.5)
    raw = replies.entry(4, e, 9.0, 0.25)
    body = u64(5) + u64(3) + u64(1) + u64(0) + u32(500_000_000) + u32(250_000_000) + ATTR_BYTES
    assert raw == out_header(144, 0, 4) + body
    assert k.decode_entry(body) == Entry(5, attrs.evolve(ATTR_F, timeout=0.25), 3, 1.5)


def test_negative_entry_golden() -> None:
    raw = replies.entry(4, Entry(0, Attr(), entry_timeout=10.0), 1.0, 1.0)
    assert raw[16:48] == u64(0) + u64(0) + u64(10) + u64(1)
    assert k.decode_entry(raw[16:]).nodeid == 0


def test_attr_reply_golden() -> None:
    raw = replies.attr(6, attrs.evolve(ATTR_F, timeout=2.000000003), 1.0)
    body = u64(2) + u32(3) + u32(0) + ATTR_BYTES
    assert raw == out_header(120, 0, 6) + body
    assert k.decode_attr(body) == attrs.evolve(ATTR_F, timeout=2 + 3 / NS)


def test_open_reply_golden() -> None:
    raw = replies.open_(8, Handle(0x1122334455667788, FOpen.DIRECT_IO | FOpen.KEEP_CACHE, 7))
    assert raw == out_header(32, 0, 8) + h("8877665544332211 03000000 07000000")
    assert k.decode_open(raw[16:]) == Handle(0x1122334455667788, FOpen.DIRECT_IO | FOpen.KEEP_CACHE, 7)


def test_create_reply_golden() -> None:
    e = Entry(5, ATTR_F, generation=1)
    raw = replies.create(10, e, Handle(9, FOpen.PASSTHROUGH, -1), 0.0, 0.0)
    body = u64(5) + u64(1) + bytes(24) + ATTR_BYTES + u64(9) + u32(0x80) + s32(-1)
    assert raw == out_header(160, 0, 10) + body
    assert k.decode_create(body) == (Entry(5, attrs.evolve(ATTR_F, timeout=0.0), 1, 0.0), Handle(9, 0x80, -1))


def test_write_reply_golden() -> None:
    assert replies.write(12, 4096) == out_header(24, 0, 12) + u32(4096) + u32(0)
    assert k.decode_write(u32(4096) + u32(0)) == 4096


def test_statfs_golden() -> None:
    raw = replies.statfs(14, FsStats(1000, 500, 400, 100, 50, 4096, 255, 1024))
    body = u64(1000) + u64(500) + u64(400) + u64(100) + u64(50) + u32(4096) + u32(255) + u32(1024) + u32(0) + bytes(24)
    assert raw == out_header(96, 0, 14) + body
    assert k.decode_statfs(body) == FsStats(1000, 500, 400, 100, 50, 4096, 255, 1024)


def test_getxattr_size_golden() -> None:
    assert replies.xattr_size(16, 10) == out_header(24, 0, 16) + u32(10) + u32(0)
    assert k.decode_xattr_size(u32(10) + u32(0)) == 10


def test_error_and_empty_golden() -> None:
    assert replies.error(18, 2) == out_header(16, -2, 18)
    assert k.decode_reply_header(replies.error(18, 2)) == (-2, 18)
    assert replies.empty(18) == out_header(16, 0, 18)
    assert replies.data(18, b"abc") == out_header(19, 0, 18) + b"abc"


def test_lk_bmap_poll_lseek_golden() -> None:
    raw = replies.lk(20, Lock(0, 2**63 - 1, 1, 1234))
    assert raw == out_header(40, 0, 20) + u64(0) + u64(2**63 - 1) + u32(1) + u32(1234)
    assert k.decode_lk(raw[16:]) == Lock(0, 2**63 - 1, 1, 1234)
    assert replies.u64(22, 77) == out_header(24, 0, 22) + u64(77)  # bmap
    assert k.decode_u64(u64(77)) == 77
    assert replies.poll(24, 0x5) == out_header(24, 0, 24) + u32(5) + u32(0)
    assert k.decode_poll(u32(5) + u32(0)) == 5
    assert replies.u64(26, 1 << 40) == out_header(24, 0, 26) + u64(1 << 40)  # lseek


def test_ioctl_golden() -> None:
    raw = replies.ioctl(28, IoctlReply(-3, b"abc"))
    assert raw == out_header(35, 0, 28) + s32(-3) + u32(0) + u32(0) + u32(0) + b"abc"
    assert k.decode_ioctl(raw[16:]) == IoctlReply(-3, b"abc")
    retry = IoctlReply(in_iovs=[(0x1000, 16)], out_iovs=[(0x2000, 32), (0x3000, 8)])
    raw = replies.ioctl(30, retry)
    assert raw == (out_header(80, 0, 30) + s32(0) + u32(IOCTL_RETRY) + u32(1) + u32(2)
                   + u64(0x1000) + u64(16) + u64(0x2000) + u64(32) + u64(0x3000) + u64(8))
    assert k.decode_ioctl(raw[16:]) == IoctlReply(0, b"", [(0x1000, 16)], [(0x2000, 32), (0x3000, 8)])
    # Only out iovecs: in_iovs is an empty list.
    raw = replies.ioctl(30, IoctlReply(out_iovs=[(0x2000, 4)]))
    assert k.decode_ioctl(raw[16:]) == IoctlReply(0, b"", [], [(0x2000, 4)])


def test_statx_golden() -> None:
    sx = Statx(mask=0xFFF, blksize=4096, attributes=0x20, nlink=2, uid=1000, gid=1000, mode=0o40755, ino=9,
               size=4096, blocks=8, attributes_mask=0x20, atime=Timestamp(10, 1), btime=Timestamp(-20, 999),
               ctime=Timestamp(30, 3), mtime=Timestamp(40, 4), rdev_major=0, rdev_minor=0, dev_major=0,
               dev_minor=42)
    raw = replies.statx(32, sx, 0.5)
    fuse_statx = (u32(0xFFF) + u32(4096) + u64(0x20) + u32(2) + u32(1000) + u32(1000) + u16(0o40755) + u16(0)
                  + u64(9) + u64(4096) + u64(8) + u64(0x20)
                  + s64(10) + u32(1) + s32(0) + s64(-20) + u32(999) + s32(0) + s64(30) + u32(3) + s32(0)
                  + s64(40) + u32(4) + s32(0) + u32(0) + u32(0) + u32(0) + u32(42) + bytes(112))
    assert len(fuse_statx) == 256
    body = u64(0) + u32(500_000_000) + u32(0) + bytes(16) + fuse_statx
    assert raw == out_header(304, 0, 32) + body
    # btime sits at offset 80 of fuse_statx: 16 + 32 + 80 = 128 in the message.
    assert raw[128:144] == s64(-20) + u32(999) + s32(0)
    assert k.decode_statx(body) == attrs.evolve(sx, timeout=0.5)


# -- directory buffers -----------------------------------------------------------------------------

DIR_NAMES = [(b"a", 0o100644, 8), (b"abcdefg", 0o40755, 4), (b"abcdefgh", 0o120777, 10), (b"abcdefghi", 0o10644, 1)]


def _dirent(ino: int, off: int, name: bytes, typ: int) -> bytes:
    rec = u64(ino) + u64(off) + u32(len(name)) + u32(typ) + name
    return rec + bytes(-len(rec) % 8)


def test_readdir_buffer_golden() -> None:
    buf = replies.DirBuffer(136)
    for i, (name, mode, _) in enumerate(DIR_NAMES):
        assert buf.add(name, i + 1, 10 + i, mode)
    raw = buf.reply(34)
    body = b"".join(_dirent(10 + i, i + 1, name, typ) for i, (name, _, typ) in enumerate(DIR_NAMES))
    assert [len(_dirent(0, 0, n, 0)) for n, _, _ in DIR_NAMES] == [32, 32, 32, 40]
    assert raw == out_header(16 + 136, 0, 34) + body
    # Records start at multiples of 8 and the padding is zero.
    assert raw[16 + 24 : 16 + 32] == b"a" + bytes(7)
    assert raw[16 + 32 + 24 : 16 + 64] == b"abcdefg" + bytes(1)
    assert raw[16 + 64 + 24 : 16 + 96] == b"abcdefgh"
    assert raw[16 + 96 + 24 : 16 + 136] == b"abcdefghi" + bytes(7)
    got = k.decode_dirents(raw[16:])
    assert [(d.name, d.offset, d.attr.ino if d.attr else None) for d in got] == [
        (n, i + 1, 10 + i) for i, (n, _, _) in enumerate(DIR_NAMES)]
    assert [stat.S_IFMT(d.attr.mode) for d in got if d.attr] == [stat.S_IFMT(m) for _, m, _ in DIR_NAMES]


def test_readdir_buffer_stops_exactly_at_size() -> None:
    buf = replies.DirBuffer(135)
    for i, (name, mode, _) in enumerate(DIR_NAMES[:3]):
        assert buf.add(name, i + 1, 10 + i, mode)
    assert not buf.add(b"abcdefghi", 4, 13, 0o10644)  # needs 40, 39 left
    assert buf.add(b"x", 5, 14, 0o100644)  # 32 still fits
    assert not buf.add(b"y", 6, 15, 0o100644)  # 7 left
    raw = buf.reply(36)
    assert len(raw) == 16 + 128
    assert [d.name for d in k.decode_dirents(raw[16:])] == [b"a", b"abcdefg", b"abcdefgh", b"x"]
    empty = replies.DirBuffer(31)
    assert not empty.add(b"a", 1, 1, 0)
    assert empty.reply(38) == out_header(16, 0, 38)


def test_readdirplus_record_golden() -> None:
    a = Attr(ino=42, mode=0o100600, nlink=1, size=3)
    buf = replies.DirBuffer(4096, plus=True, entry_timeout=2.0, attr_timeout=0.5)
    assert buf.add_plus(b"file", 7, Entry(42, a, generation=1))
    assert buf.add_plus(b"nope", 8, Entry(0, Attr(ino=43, mode=0o40755), entry_timeout=5.0))
    raw = buf.reply(40)
    rec1 = (u64(42) + u64(1) + u64(2) + u64(0) + u32(0) + u32(500_000_000) + fuse_attr(a)
            + u64(42) + u64(7) + u32(4) + u32(8) + b"file" + bytes(4))
    # nodeid 0: no attributes, and no timeouts either.
    rec2 = (bytes(40) + fuse_attr(Attr(ino=43, mode=0o40755)) + u64(43) + u64(8) + u32(4) + u32(4) + b"nope"
            + bytes(4))
    assert len(rec1) == 160
    assert raw == out_header(16 + 320, 0, 40) + rec1 + rec2
    got = k.decode_direntplus(raw[16:])
    assert got[0] == DirEntry(b"file", 7, None, Entry(42, attrs.evolve(a, timeout=0.5), 1, 2.0))
    assert got[1].entry is not None and got[1].entry.nodeid == 0
    plus = replies.DirBuffer(159, plus=True)
    assert not plus.add_plus(b"file", 7, Entry(42, a))


# -- notifications ---------------------------------------------------------------------------------


def test_notifications_golden() -> None:
    def msg(code: int, body: bytes) -> bytes:
        return out_header(16 + len(body), code, 0) + body

    cases: list[tuple[bytes, bytes, NotifyCode, dict[str, Any]]] = [
        (notify.poll_wakeup(0xABC), msg(1, u64(0xABC)), NotifyCode.POLL, {"kh": 0xABC}),
        (notify.inval_inode(5), msg(2, u64(5) + s64(-1) + s64(0)), NotifyCode.INVAL_INODE,
         {"nodeid": 5, "offset": -1, "length": 0}),
        (notify.inval_inode(5, 4096, 8192), msg(2, u64(5) + s64(4096) + s64(8192)), NotifyCode.INVAL_INODE,
         {"nodeid": 5, "offset": 4096, "length": 8192}),
        (notify.inval_entry(1, b"foo", expire_only=True), msg(3, u64(1) + u32(3) + u32(1) + b"foo\0"),
         NotifyCode.INVAL_ENTRY, {"parent": 1, "name": b"foo", "expire_only": True}),
        (notify.inval_entry(1, b"foo"), msg(3, u64(1) + u32(3) + u32(0) + b"foo\0"),
         NotifyCode.INVAL_ENTRY, {"parent": 1, "name": b"foo", "expire_only": False}),
        (notify.delete(1, 7, b"bar"), msg(6, u64(1) + u64(7) + u32(3) + u32(0) + b"bar\0"), NotifyCode.DELETE,
         {"parent": 1, "child": 7, "name": b"bar"}),
        (notify.store(5, 4096, b"data"), msg(4, u64(5) + u64(4096) + u32(4) + u32(0) + b"data"), NotifyCode.STORE,
         {"nodeid": 5, "offset": 4096, "data": b"data"}),
        (notify.retrieve(99, 5, 0, 8192), msg(5, u64(99) + u64(5) + u64(0) + u32(8192) + u32(0)),
         NotifyCode.RETRIEVE, {"notify_unique": 99, "nodeid": 5, "offset": 0, "size": 8192}),
        (notify.resend(), msg(7, b""), NotifyCode.RESEND, {}),
        (notify.inc_epoch(), msg(8, b""), NotifyCode.INC_EPOCH, {}),
        (notify.prune([5, 6]), msg(9, u32(2) + u32(0) + u64(0) + u64(5) + u64(6)), NotifyCode.PRUNE,
         {"nodeids": [5, 6]}),
    ]
    for encoded, expected, code, fields in cases:
        assert encoded == expected, code
        assert k.decode_notification(encoded) == (code, fields)


def test_notification_decoder_is_strict() -> None:
    with pytest.raises(ProtocolError):
        k.decode_notification(notify.inval_entry(1, b"foo")[:-1] + b"x")  # no NUL
    bad = bytearray(notify.store(5, 0, b"data"))
    bad[32:36] = u32(5)
    with pytest.raises(ProtocolError):
        k.decode_notification(bytes(bad))
    with pytest.raises(ProtocolError):
        k.decode_notification(out_header(16, 77, 0))
    with pytest.raises(ProtocolError):
        k.decode_notification(replies.error(2, 5))


# =================================================================================================
# Struct sizes against the fact sheet's Appendix A

APPENDIX_A = {
    "IN_HEADER": 40, "OUT_HEADER": 16, "ATTR": 88, "SX_TIME": 16, "STATX": 256, "KSTATFS": 80,
    "FILE_LOCK": 24, "FORGET_IN": 8, "FORGET_ONE": 16, "BATCH_FORGET_IN": 8, "GETATTR_IN": 16,
    "STATX_IN": 24, "MKNOD_IN": 16, "MKDIR_IN": 8, "RENAME_IN": 8, "RENAME2_IN": 16, "LINK_IN": 8,
    "SETATTR_IN": 88, "OPEN_IN": 8, "CREATE_IN": 16, "OPEN_OUT": 16, "RELEASE_IN": 24, "FLUSH_IN": 24,
    "READ_IN": 40, "WRITE_IN": 40, "WRITE_OUT": 8, "FSYNC_IN": 16, "SETXATTR_IN": 16, "GETXATTR_IN": 8,
    "GETXATTR_OUT": 8, "LK_IN": 48, "LK_OUT": 24, "ACCESS_IN": 8, "INIT_IN": 64, "INIT_OUT": 64,
    "CUSE_INIT_IN": 16, "CUSE_INIT_OUT": 72, "INTERRUPT_IN": 8, "BMAP_IN": 16, "BMAP_OUT": 8,
    "IOCTL_IN": 32, "IOCTL_IOVEC": 16, "IOCTL_OUT": 16, "POLL_IN": 24, "POLL_OUT": 8,
    "NOTIFY_POLL_WAKEUP_OUT": 8, "FALLOCATE_IN": 32, "DIRENT": 24, "NOTIFY_INVAL_INODE_OUT": 24,
    "NOTIFY_INVAL_ENTRY_OUT": 16, "NOTIFY_DELETE_OUT": 24, "NOTIFY_STORE_OUT": 24,
    "NOTIFY_RETRIEVE_OUT": 32, "NOTIFY_RETRIEVE_IN": 40, "NOTIFY_PRUNE_OUT": 16, "BACKING_MAP": 16,
    "LSEEK_IN": 24, "LSEEK_OUT": 8, "COPY_FILE_RANGE_IN": 56, "COPY_FILE_RANGE_OUT": 8,
    "SETUPMAPPING_IN": 40, "REMOVEMAPPING_IN": 4, "REMOVEMAPPING_ONE": 16, "SYNCFS_IN": 8, "SECCTX": 8,
    "SECCTX_HEADER": 8, "EXT_HEADER": 8, "SUPP_GROUPS": 4,
    # flattened composites: fuse_entry_out, fuse_attr_out, fuse_statx_out's head (+ fuse_statx = 288)
    "ENTRY_OUT_FULL": 128, "ATTR_OUT_FULL": 104, "STATX_OUT_HEAD": 32, "ENTRY_OUT": 40,
    # the 7.36-and-older and pre-SETXATTR_EXT forms
    "INIT_IN_HEAD": 16, "SETXATTR_IN_COMPAT": 8,
}


@pytest.mark.parametrize("name", sorted(APPENDIX_A))
def test_struct_size(name: str) -> None:
    assert getattr(S, name).size == APPENDIX_A[name]


def test_every_struct_is_checked() -> None:
    structs = {n for n, v in vars(S).items() if isinstance(v, struct.Struct) and n not in ("U32", "U64")}
    # The proposed (unmerged) iomap structs are checked byte for byte in tests/test_iomap.py.
    assert {n for n in structs if not n.startswith("IOMAP_")} == set(APPENDIX_A)
    iomap = {"IOMAP_IO", "IOMAP_BEGIN_IN", "IOMAP_BEGIN_OUT", "IOMAP_END_IN"}
    assert {n for n in structs if n.startswith("IOMAP_")} == iomap


def test_composite_sizes() -> None:
    assert S.STATX_OUT_HEAD.size + S.STATX.size == 288
    assert S.ENTRY_OUT.size + S.ATTR.size == S.ENTRY_OUT_FULL.size
    assert S.ENTRY_OUT_FULL.size + S.DIRENT.size == 152  # fuse_direntplus


# =================================================================================================
# Hypothesis: request round trips

U8 = st.integers(0, 2**8 - 1)
U16 = st.integers(0, 2**16 - 1)
U32 = st.integers(0, 2**32 - 1)
S32 = st.integers(-(2**31), 2**31 - 1)
U64 = st.integers(0, 2**64 - 1)
S64 = st.integers(-(2**63), 2**63 - 1)
NS_TIME = st.integers(-(2**63) * NS, 2**63 * NS - 1)
NAMES = st.binary(min_size=1, max_size=40).map(lambda b: b.replace(b"\0", b"n").replace(b"/", b"s"))
XNAMES = st.binary(min_size=1, max_size=40).map(lambda b: b.replace(b"\0", b"n"))
DATA = st.binary(max_size=300)
LOCKS = st.builds(Lock, U64, U64, U32, U32)


def _head(**fields: Any) -> dict[str, Any]:
    return {"unique": U64, "nodeid": U64, "uid": U32, "gid": U32, "pid": U32, **fields}


def _creating(**fields: Any) -> dict[str, Any]:
    return _head(
        security_context=st.none() | st.lists(st.builds(r.SecurityContext, XNAMES, DATA), max_size=3),
        supp_groups=st.none() | st.lists(U32, max_size=5),
        **fields,
    )


@st.composite
def _forget(draw: st.DrawFn) -> r.ForgetRequest:
    unique, nodeid, uid, gid, pid = draw(U64), draw(U64), draw(U32), draw(U32), draw(U32)
    if draw(st.booleans()) and nodeid:  # FORGET: one item, for the header's nodeid
        return r.ForgetRequest(unique, nodeid, uid, gid, pid, [r.ForgetItem(nodeid, draw(U64))])
    items = draw(st.lists(st.builds(r.ForgetItem, U64, U64), max_size=20))  # BATCH_FORGET: nodeid 0
    return r.ForgetRequest(unique, 0, uid, gid, pid, items)


T = TypeVar("T")


def _opt(s: st.SearchStrategy[T]) -> st.SearchStrategy[T | None]:
    return st.none() | s


@st.composite
def _setattr(draw: st.DrawFn) -> r.SetattrRequest:
    fh, size, owner = draw(_opt(U64)), draw(_opt(U64)), draw(_opt(U64))
    atime_now, mtime_now = draw(st.booleans()), draw(st.booleans())
    atime = None if atime_now else draw(_opt(NS_TIME))
    mtime = None if mtime_now else draw(_opt(NS_TIME))
    ctime, mode, uid, gid = draw(_opt(NS_TIME)), draw(_opt(U32)), draw(_opt(U32)), draw(_opt(U32))
    kill = draw(st.booleans())
    valid = draw(st.integers(0, 2**20 - 1)) << 12  # bits the decoder does not interpret pass through
    for value, bit in ((mode, FAttr.MODE), (uid, FAttr.UID), (gid, FAttr.GID), (size, FAttr.SIZE),
                       (atime, FAttr.ATIME), (mtime, FAttr.MTIME), (fh, FAttr.FH), (owner, FAttr.LOCKOWNER),
                       (ctime, FAttr.CTIME)):
        if value is not None:
            valid |= bit
    if atime_now:
        valid |= FAttr.ATIME | FAttr.ATIME_NOW
    if mtime_now:
        valid |= FAttr.MTIME | FAttr.MTIME_NOW
    if kill:
        valid |= FAttr.KILL_SUIDGID
    return r.SetattrRequest(draw(U64), draw(U64), draw(U32), draw(U32), draw(U32), FAttr(valid), fh, size, owner,
                            atime, mtime, ctime, mode, uid, gid, atime_now, mtime_now, kill)


@st.composite
def _init(draw: st.DrawFn) -> r.InitRequest:
    minor = draw(st.integers(0, 2**32 - 1))
    lo = draw(U32)
    hi = draw(U32) if minor >= 36 and lo & InitFlag.INIT_EXT else 0
    return r.InitRequest(draw(U64), draw(U64), draw(U32), draw(U32), draw(U32), draw(U32), minor, draw(U32),
                         InitFlag(lo | hi << 32))


@st.composite
def _ioctl(draw: st.DrawFn) -> r.IoctlRequest:
    data = draw(DATA)
    return draw(st.builds(r.IoctlRequest, **_head(fh=U64, flags=U32, cmd=U32, arg=U64, in_size=st.just(len(data)),
                                                   out_size=U32, in_data=st.just(data))))


@st.composite
def _notify_reply(draw: st.DrawFn) -> r.NotifyReplyRequest:
    data = draw(DATA)
    return draw(st.builds(r.NotifyReplyRequest, **_head(offset=U64, size=st.just(len(data)), data=st.just(data))))


@st.composite
def _statx(draw: st.DrawFn) -> r.StatxRequest:
    fh = draw(_opt(U64))
    gflags = draw(U32) & ~GETATTR_FH | (GETATTR_FH if fh is not None else 0)
    return draw(st.builds(r.StatxRequest, **_head(fh=st.just(fh), getattr_flags=st.just(gflags), sx_flags=U32,
                                                   mask=U32)))


_open = _head(flags=U32, open_flags=U32)
_release = _head(fh=U64, flags=U32, release_flags=U32, lock_owner=U64)
_fsync = _head(fh=U64, datasync=st.booleans())
_readdir = _head(fh=U64, offset=U64, size=U32)
_create = _creating(name=NAMES, flags=U32, mode=U32, umask=U32, open_flags=U32)

REQUESTS: dict[type[r.Request], st.SearchStrategy[r.Request]] = {
    r.LookupRequest: st.builds(r.LookupRequest, **_head(name=NAMES)),
    r.ForgetRequest: _forget(),
    r.GetattrRequest: st.builds(r.GetattrRequest, **_head(fh=_opt(U64))),
    r.SetattrRequest: _setattr(),
    r.ReadlinkRequest: st.builds(r.ReadlinkRequest, **_head()),
    r.SymlinkRequest: st.builds(r.SymlinkRequest, **_creating(name=NAMES, target=XNAMES)),
    r.MknodRequest: st.builds(r.MknodRequest, **_creating(name=NAMES, mode=U32, rdev=U32, umask=U32)),
    r.MkdirRequest: st.builds(r.MkdirRequest, **_creating(name=NAMES, mode=U32, umask=U32)),
    r.UnlinkRequest: st.builds(r.UnlinkRequest, **_head(name=NAMES)),
    r.RmdirRequest: st.builds(r.RmdirRequest, **_head(name=NAMES)),
    r.RenameRequest: st.builds(r.RenameRequest, **_head(name=NAMES, newdir=U64, newname=NAMES,
                                                        flags=st.just(0) | U32)),
    r.LinkRequest: st.builds(r.LinkRequest, **_head(oldnodeid=U64, newname=NAMES)),
    r.OpenRequest: st.builds(r.OpenRequest, **_open),
    r.OpendirRequest: st.builds(r.OpendirRequest, **_open),
    r.ReadRequest: st.builds(r.ReadRequest, **_head(fh=U64, offset=U64, size=U32, read_flags=U32, lock_owner=U64,
                                                    flags=U32)),
    r.WriteRequest: st.builds(r.WriteRequest, **_head(fh=U64, offset=U64, data=DATA, write_flags=U32,
                                                      lock_owner=U64, flags=U32)),
    r.StatfsRequest: st.builds(r.StatfsRequest, **_head()),
    r.ReleaseRequest: st.builds(r.ReleaseRequest, **_release),
    r.ReleasedirRequest: st.builds(r.ReleasedirRequest, **_release),
    r.FsyncRequest: st.builds(r.FsyncRequest, **_fsync),
    r.FsyncdirRequest: st.builds(r.FsyncdirRequest, **_fsync),
    r.SetxattrRequest: st.builds(r.SetxattrRequest, **_head(name=XNAMES, value=DATA, flags=U32,
                                                            setxattr_flags=U32)),
    r.GetxattrRequest: st.builds(r.GetxattrRequest, **_head(name=XNAMES, size=U32)),
    r.ListxattrRequest: st.builds(r.ListxattrRequest, **_head(size=U32)),
    r.RemovexattrRequest: st.builds(r.RemovexattrRequest, **_head(name=XNAMES)),
    r.FlushRequest: st.builds(r.FlushRequest, **_head(fh=U64, lock_owner=U64)),
    r.InitRequest: _init(),
    r.ReaddirRequest: st.builds(r.ReaddirRequest, **_readdir),
    r.ReaddirplusRequest: st.builds(r.ReaddirplusRequest, **_readdir),
    r.GetlkRequest: st.builds(r.GetlkRequest, **_head(fh=U64, owner=U64, lock=LOCKS, lk_flags=U32)),
    r.SetlkRequest: st.builds(r.SetlkRequest, **_head(fh=U64, owner=U64, lock=LOCKS, lk_flags=U32,
                                                      sleep=st.booleans())),
    r.AccessRequest: st.builds(r.AccessRequest, **_head(mask=U32)),
    r.CreateRequest: st.builds(r.CreateRequest, **_create),
    r.TmpfileRequest: st.builds(r.TmpfileRequest, **_create),
    r.InterruptRequest: st.builds(r.InterruptRequest, **_head(target=U64)),
    r.BmapRequest: st.builds(r.BmapRequest, **_head(block=U64, blocksize=U32)),
    r.DestroyRequest: st.builds(r.DestroyRequest, **_head()),
    r.IoctlRequest: _ioctl(),
    r.PollRequest: st.builds(r.PollRequest, **_head(fh=U64, kh=U64, flags=U32, events=U32)),
    r.NotifyReplyRequest: _notify_reply(),
    r.FallocateRequest: st.builds(r.FallocateRequest, **_head(fh=U64, offset=U64, length=U64, mode=U32)),
    r.LseekRequest: st.builds(r.LseekRequest, **_head(fh=U64, offset=U64, whence=U32)),
    r.CopyFileRangeRequest: st.builds(r.CopyFileRangeRequest, **_head(
        fh_in=U64, off_in=U64, nodeid_out=U64, fh_out=U64, off_out=U64, length=U64, flags=U64, wide=st.booleans())),
    r.SetupmappingRequest: st.builds(r.SetupmappingRequest, **_head(fh=U64, foffset=U64, length=U64, flags=U64,
                                                                    moffset=U64)),
    r.RemovemappingRequest: st.builds(r.RemovemappingRequest, **_head(mappings=st.lists(st.tuples(U64, U64),
                                                                                        max_size=10))),
    r.SyncfsRequest: st.builds(r.SyncfsRequest, **_head()),
    r.StatxRequest: _statx(),
    r.CuseInitRequest: st.builds(r.CuseInitRequest, **_head(major=U32, minor=U32, flags=U32)),
}


def test_every_request_class_has_a_strategy() -> None:
    classes = {c for c in vars(r).values()
               if isinstance(c, type) and issubclass(c, r.Request) and c is not r.Request and "opcode" in vars(c)}
    assert classes == set(REQUESTS)


@pytest.mark.parametrize("cls", list(REQUESTS), ids=lambda c: c.__name__)
@pytest.mark.parametrize("ext", [True, False], ids=["setxattr_ext", "compat"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_request_round_trip(cls: type[r.Request], ext: bool, data: st.DataObject) -> None:
    req = data.draw(REQUESTS[cls])
    if isinstance(req, r.SetxattrRequest) and not ext:
        req = attrs.evolve(req, setxattr_flags=0)
    raw = k.encode_request(req, setxattr_ext=ext)
    assert struct.unpack_from("<I", raw)[0] == len(raw)
    conn = Connection()  # the sans-IO connection a session decodes with
    conn.decoder.setxattr_ext = ext
    got = conn.decode(raw)
    assert type(got) is type(req)
    assert got == req
    assert k.encode_request(got, setxattr_ext=ext) == raw


def test_encode_rejects_what_the_kernel_cannot_send() -> None:
    hd = (2, 1, 0, 0, 0)
    with pytest.raises(ValueError):
        k.encode_request(r.LookupRequest(*hd, b"a\0b"))
    with pytest.raises(ValueError):
        k.encode_request(r.IoctlRequest(*hd, 1, 0, 0, 0, 5, 0, b"abc"))
    with pytest.raises(ValueError):
        k.encode_request(r.InitRequest(*hd, 7, 31, 0, InitFlag.SECURITY_CTX | InitFlag.INIT_EXT))
    with pytest.raises(ValueError):
        k.encode_request(r.InitRequest(*hd, 7, 45, 0, InitFlag.SECURITY_CTX))  # flags2 without INIT_EXT

    @attrs.define
    class Strange(r.Request):
        opcode = Opcode.SETUPMAPPING

    with pytest.raises(TypeError):
        k.encode_request(Strange(*hd))


# =================================================================================================
# Hypothesis: reply round trips

TIMEOUTS = st.floats(min_value=-5.0, max_value=1e6, allow_nan=False) | st.just(0.0)
ATTRS = st.builds(Attr, ino=U64, mode=U32, nlink=U32, uid=U32, gid=U32, rdev=U32, size=U64, blocks=U64,
                  atime_ns=NS_TIME, mtime_ns=NS_TIME, ctime_ns=NS_TIME, blksize=U32, flags=U32,
                  timeout=_opt(TIMEOUTS))
ENTRIES = st.builds(Entry, nodeid=U64, attr=ATTRS, generation=U64, entry_timeout=_opt(TIMEOUTS))


def close_to(got: float | None, want: float) -> bool:
    want = max(want, 0.0)
    return got is not None and abs(got - want) <= 2e-9 + want * 1e-15


def same_attr(got: Attr, want: Attr, default_timeout: float) -> None:
    assert attrs.evolve(got, timeout=None) == attrs.evolve(want, timeout=None)
    assert close_to(got.timeout, default_timeout if want.timeout is None else want.timeout)


def same_entry(got: Entry, want: Entry, et: float, at: float) -> None:
    assert (got.nodeid, got.generation) == (want.nodeid, want.generation)
    assert close_to(got.entry_timeout, et if want.entry_timeout is None else want.entry_timeout)
    same_attr(got.attr, want.attr, at)


@given(e=ENTRIES, unique=U64, et=TIMEOUTS, at=TIMEOUTS)
def test_entry_round_trip(e: Entry, unique: int, et: float, at: float) -> None:
    raw = replies.entry(unique, e, et, at)
    assert k.decode_reply_header(raw) == (0, unique)
    same_entry(k.decode_entry(raw[16:]), e, et, at)


@given(a=ATTRS, unique=U64, at=TIMEOUTS)
def test_attr_round_trip(a: Attr, unique: int, at: float) -> None:
    raw = replies.attr(unique, a, at)
    assert k.decode_reply_header(raw) == (0, unique)
    same_attr(k.decode_attr(raw[16:]), a, at)


HANDLES = st.builds(Handle, fh=U64, flags=U32, backing_id=S32)


@given(e=ENTRIES, hd=HANDLES, et=TIMEOUTS, at=TIMEOUTS)
def test_open_and_create_round_trip(e: Entry, hd: Handle, et: float, at: float) -> None:
    assert k.decode_open(replies.open_(2, hd)[16:]) == hd
    got_e, got_h = k.decode_create(replies.create(2, e, hd, et, at)[16:])
    same_entry(got_e, e, et, at)
    assert got_h == hd


@given(st.builds(FsStats, U64, U64, U64, U64, U64, U32, U32, U32))
def test_statfs_round_trip(fs: FsStats) -> None:
    assert k.decode_statfs(replies.statfs(2, fs)[16:]) == fs


@given(n=U32, big=U64, lock=st.builds(Lock, U64, U64, U32, U32), revents=U32)
def test_small_replies_round_trip(n: int, big: int, lock: Lock, revents: int) -> None:
    assert k.decode_write(replies.write(2, n)[16:]) == n
    assert k.decode_xattr_size(replies.xattr_size(2, n)[16:]) == n
    assert k.decode_u64(replies.u64(2, big)[16:]) == big
    assert k.decode_lk(replies.lk(2, lock)[16:]) == lock
    assert k.decode_poll(replies.poll(2, revents)[16:]) == revents


IOVS = st.lists(st.tuples(U64, U64), max_size=5)


@given(result=S32, data=DATA, ins=_opt(IOVS), outs=_opt(IOVS))
def test_ioctl_round_trip(result: int, data: bytes, ins: list[tuple[int, int]] | None,
                          outs: list[tuple[int, int]] | None) -> None:
    reply = IoctlReply(result, data, ins, outs)
    got = k.decode_ioctl(replies.ioctl(2, reply)[16:])
    if ins is None and outs is None:
        assert got == reply
    else:
        assert got == IoctlReply(0, b"", ins or [], outs or [])


TIMESTAMPS = st.builds(Timestamp, S64, U32)
STATXES = st.builds(Statx, mask=U32, blksize=U32, attributes=U64, nlink=U32, uid=U32, gid=U32, mode=U16, ino=U64,
                    size=U64, blocks=U64, attributes_mask=U64, atime=TIMESTAMPS, btime=TIMESTAMPS,
                    ctime=TIMESTAMPS, mtime=TIMESTAMPS, rdev_major=U32, rdev_minor=U32, dev_major=U32,
                    dev_minor=U32, timeout=_opt(TIMEOUTS))


@given(sx=STATXES, at=TIMEOUTS)
def test_statx_round_trip(sx: Statx, at: float) -> None:
    got = k.decode_statx(replies.statx(2, sx, at)[16:])
    assert attrs.evolve(got, timeout=None) == attrs.evolve(sx, timeout=None)
    assert close_to(got.timeout, at if sx.timeout is None else sx.timeout)


DIR_ENTRY_NAMES = st.binary(min_size=1, max_size=300).map(lambda b: b.replace(b"\0", b"n").replace(b"/", b"s"))


@given(items=st.lists(st.tuples(DIR_ENTRY_NAMES, st.integers(1, 2**64 - 1), U64, U32), max_size=20),
       size=st.integers(0, 4096))
def test_dirbuffer_round_trip(items: list[tuple[bytes, int, int, int]], size: int) -> None:
    buf = replies.DirBuffer(size)
    taken = []
    used = 0
    for name, off, ino, mode in items:
        reclen = (24 + len(name) + 7) // 8 * 8
        fits = used + reclen <= size
        assert buf.add(name, off, ino, mode) == fits
        if fits:
            used += reclen
            taken.append((name, off, ino, stat.S_IFMT(mode)))
    raw = buf.reply(2)
    assert len(raw) == 16 + used <= 16 + size
    got = k.decode_dirents(raw[16:])
    assert [(d.name, d.offset, d.attr.ino if d.attr else -1, d.attr.mode if d.attr else -1) for d in got] == taken


@given(items=st.lists(st.tuples(DIR_ENTRY_NAMES, st.integers(1, 2**64 - 1), ENTRIES), max_size=6),
       et=TIMEOUTS, at=TIMEOUTS)
def test_direntplus_round_trip(items: list[tuple[bytes, int, Entry]], et: float, at: float) -> None:
    buf = replies.DirBuffer(1 << 16, plus=True, entry_timeout=et, attr_timeout=at)
    for name, off, e in items:
        assert buf.add_plus(name, off, e)
    got = k.decode_direntplus(buf.reply(2)[16:])
    assert len(got) == len(items)
    for d, (name, off, e) in zip(got, items, strict=True):
        assert (d.name, d.offset, d.attr) == (name, off, None)
        assert d.entry is not None
        if e.nodeid:
            same_entry(d.entry, e, et, at)
        else:  # no attributes: timeouts are 0
            assert d.entry.entry_timeout == 0 and d.entry.attr.timeout == 0
            assert attrs.evolve(d.entry.attr, timeout=None) == attrs.evolve(e.attr, timeout=None)


@given(kh=U64, nodeid=U64, offset=S64, length=S64, name=NAMES, expire=st.booleans(), data=DATA,
       nodeids=st.lists(U64, max_size=10), size=U32)
def test_notification_round_trip(kh: int, nodeid: int, offset: int, length: int, name: bytes, expire: bool,
                                 data: bytes, nodeids: list[int], size: int) -> None:
    cases: list[tuple[Any, NotifyCode, dict[str, Any]]] = [
        (notify.poll_wakeup, NotifyCode.POLL, {"kh": kh}),
        (notify.inval_inode, NotifyCode.INVAL_INODE, {"nodeid": nodeid, "offset": offset, "length": length}),
        (notify.inval_entry, NotifyCode.INVAL_ENTRY, {"parent": nodeid, "name": name, "expire_only": expire}),
        (notify.delete, NotifyCode.DELETE, {"parent": nodeid, "child": kh, "name": name}),
        (notify.store, NotifyCode.STORE, {"nodeid": nodeid, "offset": kh, "data": data}),
        (notify.retrieve, NotifyCode.RETRIEVE, {"notify_unique": kh, "nodeid": nodeid, "offset": kh, "size": size}),
        (notify.resend, NotifyCode.RESEND, {}),
        (notify.inc_epoch, NotifyCode.INC_EPOCH, {}),
        (notify.prune, NotifyCode.PRUNE, {"nodeids": nodeids}),
    ]
    for fn, code, kw in cases:
        assert k.decode_notification(fn(**kw)) == (code, kw)


# =================================================================================================
# Malformed input


def test_short_and_mismatched_length() -> None:
    with pytest.raises(ProtocolError) as ei:
        Decoder().decode(LOOKUP_X[:39])
    assert ei.value.unique == 0
    with pytest.raises(ProtocolError) as ei:
        Decoder().decode(LOOKUP_X + b"\0")  # one byte more than len says
    assert ei.value.unique == 4 and ei.value.opcode == Opcode.LOOKUP
    with pytest.raises(ProtocolError):
        Decoder().decode(LOOKUP_X[:41])


@pytest.mark.parametrize("opcode", [0, 7, 19, 54, 1000, 4093, 2**32 - 1])
def test_unknown_opcode_keeps_unique(opcode: int) -> None:
    raw = S.IN_HEADER.pack(48, opcode, 0x1234, 1, 0, 0, 0, 0, 0) + bytes(8)
    with pytest.raises(UnknownOpcode) as ei:
        Decoder().decode(raw)
    assert ei.value.unique == 0x1234 and ei.value.opcode == opcode


def _raw(opcode: int, body: bytes, unique: int = 10, extlen: int = 0) -> bytes:
    return S.IN_HEADER.pack(40 + len(body), opcode, unique, 1, 0, 0, 0, extlen, 0) + body


@pytest.mark.parametrize(("opcode", "body"), [
    (Opcode.LOOKUP, b"x"),
    (Opcode.LOOKUP, b""),
    (Opcode.UNLINK, b"abc"),
    (Opcode.SYMLINK, b"name\0target"),
    (Opcode.RENAME, u64(2) + b"a\0b"),
    (Opcode.RENAME2, u64(2) + u32(1) + u32(0) + b"a"),
    (Opcode.LINK, u64(2) + b"new"),
    (Opcode.MKDIR, u32(0o755) + u32(0) + b"d"),
    (Opcode.MKNOD, u32(0o644) + u32(0) + u32(0) + u32(0) + b"n"),
    (Opcode.CREATE, bytes(16) + b"f"),
    (Opcode.GETXATTR, u32(0) + u32(0) + b"user.x"),
    (Opcode.SETXATTR, u32(1) + u32(0) + b"user.xv"),
    (Opcode.REMOVEXATTR, b"user.x"),
])
def test_missing_nul(opcode: int, body: bytes) -> None:
    with pytest.raises(ProtocolError) as ei:
        Decoder().decode(_raw(opcode, body))
    assert ei.value.unique == 10 and ei.value.opcode == opcode


def test_bad_extensions() -> None:
    body = bytes(8) + b"d\0"
    with pytest.raises(ProtocolError):  # extensions longer than the request
        Decoder().decode(_raw(Opcode.MKDIR, body, extlen=2))
    with pytest.raises(ProtocolError):  # extension header size not a multiple of 8
        Decoder().decode(_raw(Opcode.MKDIR, body + u32(12) + u32(32) + u32(0) + u32(0), extlen=2))
    with pytest.raises(ProtocolError):  # extension size past the end
        Decoder().decode(_raw(Opcode.MKDIR, body + u32(24) + u32(32) + u32(0) + u32(0), extlen=2))
    with pytest.raises(ProtocolError):  # 2 groups in a 16-byte extension
        Decoder().decode(_raw(Opcode.MKDIR, body + u32(16) + u32(32) + u32(2) + u32(5) + u32(16) + u32(32)
                              + u32(0) + u32(0), extlen=4))
    with pytest.raises(ProtocolError):  # a context value longer than its extension
        Decoder().decode(_raw(Opcode.MKDIR, body + u32(24) + u32(1) + u32(9) + u32(0) + b"n\0" + bytes(6),
                              extlen=3))
    # Unknown extension types are skipped.
    got = Decoder().decode(_raw(Opcode.MKDIR, body + u32(16) + u32(77) + bytes(8), extlen=2))
    assert isinstance(got, r.MkdirRequest) and got.security_context is None and got.supp_groups is None


# Requests whose every truncation must be refused (fixed parts, NUL-terminated names, sized data).
TRUNCATABLE = [c for c in REQUESTS if c not in (
    r.ReadlinkRequest, r.StatfsRequest, r.DestroyRequest, r.SyncfsRequest,  # body ignored
    r.InitRequest, r.GetattrRequest,  # shorter legacy forms are accepted
)]


@pytest.mark.parametrize("cls", TRUNCATABLE, ids=lambda c: c.__name__)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_truncated_bodies(cls: type[r.Request], data: st.DataObject) -> None:
    req = data.draw(REQUESTS[cls])
    if isinstance(req, r._Creating):
        req.security_context = req.supp_groups = None
    raw = k.encode_request(req)
    cut = data.draw(st.integers(1, len(raw) - 40))
    short = raw[: len(raw) - cut]
    fixed = S.IN_HEADER.pack(len(short), *S.IN_HEADER.unpack_from(short)[1:]) + short[40:]
    with pytest.raises(ProtocolError) as ei:
        Decoder(setxattr_ext=True).decode(fixed)
    assert ei.value.unique == req.unique
    with pytest.raises(ProtocolError):  # and without fixing len
        Decoder(setxattr_ext=True).decode(short)


def test_truncated_init_and_getattr() -> None:
    init = k.encode_request(r.InitRequest(2, 0, 0, 0, 0, 7, 45, 0, InitFlag(0)))
    for n in (0, 4, 7):
        with pytest.raises(ProtocolError):
            Decoder().decode(S.IN_HEADER.pack(40 + n, Opcode.INIT, 2, 0, 0, 0, 0, 0, 0) + init[40 : 40 + n])
    # 8 bytes (major, minor) are enough to answer with our version.
    got = Decoder().decode(S.IN_HEADER.pack(48, Opcode.INIT, 2, 0, 0, 0, 0, 0, 0) + u32(8) + u32(0))
    assert isinstance(got, r.InitRequest) and (got.major, got.minor, got.flags) == (8, 0, 0)


def test_reply_decoders_are_strict() -> None:
    entry_body = replies.entry(2, Entry(1, Attr()), 1.0, 1.0)[16:]
    for fn, body in [(k.decode_entry, entry_body), (k.decode_attr, replies.attr(2, Attr(), 1.0)[16:]),
                     (k.decode_open, bytes(16)), (k.decode_statfs, bytes(80)), (k.decode_write, bytes(8)),
                     (k.decode_u64, bytes(8)), (k.decode_lk, bytes(24)), (k.decode_poll, bytes(8)),
                     (k.decode_statx, bytes(288)), (k.decode_create, bytes(144))]:
        fn(body)
        with pytest.raises(ProtocolError):
            fn(body[:-1])
        with pytest.raises(ProtocolError):
            fn(body + b"\0")
    with pytest.raises(ProtocolError):  # header len disagrees
        k.decode_reply_header(out_header(20, 0, 2))
    with pytest.raises(ProtocolError):  # error with a body
        k.decode_reply_header(out_header(20, -2, 2) + bytes(4))
    with pytest.raises(ProtocolError):  # dirent padding not zero
        k.decode_dirents(_dirent(1, 1, b"a", 8)[:-1] + b"x")
    with pytest.raises(ProtocolError):  # partial record
        k.decode_dirents(_dirent(1, 1, b"a", 8)[:-1])
    with pytest.raises(ProtocolError):  # "/" in a name
        k.decode_dirents(_dirent(1, 1, b"a/b", 8))


# =================================================================================================
# Fuzz: the decoder raises nothing but ProtocolError


@settings(max_examples=300, deadline=None)
@given(buf=st.binary(max_size=256), ext=st.booleans())
def test_fuzz_random_bytes(buf: bytes, ext: bool) -> None:
    try:
        Decoder(ext).decode(buf)
    except ProtocolError:
        pass


@settings(max_examples=1500, deadline=None)
@given(opcode=st.sampled_from([int(o) for o in Opcode]) | U32, body=st.binary(max_size=200),
       extlen=st.integers(0, 8) | U16, unique=U64, ext=st.booleans())
def test_fuzz_well_framed(opcode: int, body: bytes, extlen: int, unique: int, ext: bool) -> None:
    raw = S.IN_HEADER.pack(40 + len(body), opcode, unique, 1, 0, 0, 0, extlen, 0) + body
    try:
        Decoder(ext).decode(raw)
    except ProtocolError as e:
        assert e.unique == unique


@settings(max_examples=500, deadline=None)
@given(req=st.sampled_from([r.MkdirRequest, r.CreateRequest, r.SymlinkRequest, r.MknodRequest]).flatmap(
    lambda c: REQUESTS[c]), noise=st.binary(min_size=8, max_size=64), pos=st.integers(0, 63))
def test_fuzz_extensions(req: r.Request, noise: bytes, pos: int) -> None:
    """Corrupt the extension area of a creating request (keeping the framing)."""
    raw = bytearray(k.encode_request(req))
    extlen = S.IN_HEADER.unpack_from(raw)[7]
    if extlen:
        start = len(raw) - extlen * 8
        p = start + pos % (extlen * 8)
        raw[p : p + len(noise)] = noise[: len(raw) - p]
    try:
        Decoder().decode(bytes(raw))
    except ProtocolError:
        pass


def test_wire_does_no_io() -> None:
    """afuse.wire is sans-IO: no module of it imports trio, os, socket or fcntl, or anything of
    afuse outside afuse.wire (the package's parent imports the rest of afuse, so this reads the
    modules' own imports rather than sys.modules)."""
    checked = 0
    for path in pathlib.Path(afuse.wire.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom) or _under_type_checking(tree, node):
                continue
            if isinstance(node, ast.ImportFrom):
                assert node.level in (0, 1), f"{path.name} imports from outside afuse.wire"
                names = [node.module or ""] if node.level == 0 else []
            else:
                names = [a.name for a in node.names]
            for n in names:
                assert n.split(".")[0] not in {"trio", "os", "socket", "fcntl", "afuse"}, f"{path.name} imports {n}"
            checked += 1
    assert checked > 20


def _under_type_checking(tree: ast.Module, target: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            if any(target is sub for sub in ast.walk(node)):
                return True
    return False
