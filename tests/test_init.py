"""INIT negotiation as a pure function: what is asked, what is offered, what goes back."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from afuse.wire import kernel as k
from afuse.wire import structs as S
from afuse.wire.constants import InitFlag, Opcode
from afuse.wire.decoder import Decoder
from afuse.wire.init import (
    INFORMATIONAL,
    InitConfig,
    InitError,
    Negotiated,
    encode_init_reply,
    encode_version_reply,
    init_reply_size,
    negotiate,
)
from afuse.wire.requests import InitRequest

F = InitFlag
#: What this machine's 6.18 kernel offers (fact sheet §3.1).
HOST_OFFER = F(0x73FFFFFB | 0x5FD << 32)
LOW = 0xFFFFFFFF


def init_req(minor: int = 45, flags: int = HOST_OFFER, major: int = 7, readahead: int = 131072) -> InitRequest:
    return InitRequest(2, 0, 0, 0, 0, major, minor, readahead, F(flags))


def reply_of(n: Negotiated) -> k.InitReply:
    raw = encode_init_reply(2, n)
    error, unique, body = k.split_reply(raw)
    assert (error, unique) == (0, 2)
    return k.decode_init_reply(body)


def test_default_config_against_this_host() -> None:
    n = negotiate(init_req(), InitConfig())
    want = (F.ASYNC_READ | F.POSIX_LOCKS | F.ATOMIC_O_TRUNC | F.BIG_WRITES | F.FLOCK_LOCKS | F.HAS_IOCTL_DIR
            | F.AUTO_INVAL_DATA | F.DO_READDIRPLUS | F.READDIRPLUS_AUTO | F.ASYNC_DIO | F.PARALLEL_DIROPS
            | F.ABORT_ERROR | F.MAX_PAGES | F.SETXATTR_EXT | F.INIT_EXT)
    assert int(want) == 0x6064FC2B
    rep = reply_of(n)
    assert rep.flags == want and rep.flags2 == 0
    assert (rep.major, rep.minor, rep.size) == (7, 45, 64)
    assert (rep.max_readahead, rep.max_write, rep.max_pages, rep.time_gran) == (131072, 1 << 20, 256, 1)
    assert (rep.max_background, rep.congestion_threshold) == (64, 48)
    assert (rep.max_stack_depth, rep.request_timeout, rep.map_alignment) == (0, 0, 0)
    assert n.refused == 0


def test_init_reply_golden_7_45() -> None:
    raw = encode_init_reply(2, negotiate(init_req(), InitConfig()))
    assert raw == bytes.fromhex(
        "50000000 00000000 0200000000000000"
        "07000000 2d000000 00000200 2bfc6460 4000 3000 00001000 01000000 0001 0000 00000000 00000000 0000"
        .replace(" ", "")
    ) + bytes(22)


def test_flags_are_wanted_and_offered() -> None:
    offered = F.ASYNC_READ | F.POSIX_LOCKS | F.BIG_WRITES | F.WRITEBACK_CACHE | F.INIT_EXT
    wanted = F.ASYNC_READ | F.FLOCK_LOCKS | F.BIG_WRITES | F.CACHE_SYMLINKS | F.INIT_EXT
    n = negotiate(init_req(flags=offered), InitConfig(), wanted)
    assert n.flags == F.ASYNC_READ | F.BIG_WRITES | F.INIT_EXT
    assert n.refused == F.FLOCK_LOCKS | F.CACHE_SYMLINKS
    assert n.has(F.ASYNC_READ) and not n.has(F.POSIX_LOCKS) and not n.has(F.WRITEBACK_CACHE)
    assert reply_of(n).flags == F.ASYNC_READ | F.BIG_WRITES | F.INIT_EXT


def test_flags2_only_with_init_ext() -> None:
    offered = HOST_OFFER
    with_ext = negotiate(init_req(flags=offered), InitConfig(security_ctx=True, create_supp_group=True))
    rep = reply_of(with_ext)
    assert rep.flags2 == (F.SECURITY_CTX | F.CREATE_SUPP_GROUP) >> 32
    assert rep.flags & F.SECURITY_CTX and with_ext.has(F.SECURITY_CTX)
    # Asking for high bits without INIT_EXT: the kernel would not read flags2, so they are not agreed.
    wanted = F.SECURITY_CTX | F.CREATE_SUPP_GROUP | F.BIG_WRITES
    without = negotiate(init_req(flags=offered), InitConfig(), wanted)
    assert not without.has(F.SECURITY_CTX) and not without.has(F.CREATE_SUPP_GROUP)
    rep = reply_of(without)
    assert rep.flags2 == 0 and not rep.flags & F.INIT_EXT
    # A kernel that does not offer INIT_EXT sends no flags2 at all.
    old = negotiate(init_req(minor=35, flags=offered & LOW & ~F.INIT_EXT), InitConfig(security_ctx=True))
    assert not old.has(F.SECURITY_CTX) and F.SECURITY_CTX in old.refused
    assert reply_of(old).flags2 == 0


def test_informational_bits_never_echoed() -> None:
    info = (F.SPLICE_READ | F.SPLICE_WRITE | F.SPLICE_MOVE | F.NO_OPEN_SUPPORT | F.NO_OPENDIR_SUPPORT
            | F.HAS_EXPIRE_ONLY | F.HAS_RESEND)
    assert INFORMATIONAL == info
    n = negotiate(init_req(), InitConfig(extra_flags=int(info)))
    assert n.has(F.HAS_RESEND) and n.has(F.NO_OPEN_SUPPORT) and n.has(F.HAS_EXPIRE_ONLY)
    rep = reply_of(n)
    assert not rep.flags & info
    assert rep.flags2 == 0
    # Informational bits are not "refused" when a kernel lacks them.
    n = negotiate(init_req(flags=F.BIG_WRITES | F.INIT_EXT), InitConfig())
    assert not n.refused & info
    assert not n.has(F.HAS_RESEND)


@pytest.mark.parametrize(("max_write", "pages", "effective"), [
    (1 << 20, 256, 1 << 20),
    (4096, 1, 4096),
    (128 * 1024, 32, 128 * 1024),
    (128 * 1024 + 1, 33, 128 * 1024 + 1),
    (16 << 20, 4096, 16 << 20),
])
def test_max_pages_from_max_write(max_write: int, pages: int, effective: int) -> None:
    n = negotiate(init_req(), InitConfig(max_write=max_write))
    assert (n.max_pages, n.max_write) == (pages, effective)
    rep = reply_of(n)
    assert (rep.max_pages, rep.max_write) == (pages, effective)
    assert n.read_buffer_size == max(8192, effective + 4096)


def test_no_max_pages_caps_max_write() -> None:
    n = negotiate(init_req(flags=HOST_OFFER & ~F.MAX_PAGES), InitConfig())
    assert (n.max_pages, n.max_write) == (32, 128 * 1024)
    rep = reply_of(n)
    assert rep.max_pages == 0 and rep.max_write == 128 * 1024 and not rep.flags & F.MAX_PAGES


@pytest.mark.parametrize(("kernel_minor", "minor", "size"), [(31, 31, 64), (36, 36, 64), (45, 45, 64), (50, 45, 64)])
def test_reply_minor_and_size(kernel_minor: int, minor: int, size: int) -> None:
    offer = HOST_OFFER if kernel_minor >= 36 else HOST_OFFER & LOW & ~F.INIT_EXT
    n = negotiate(init_req(minor=kernel_minor, flags=offer), InitConfig())
    assert n.minor == minor and n.kernel_minor == kernel_minor
    raw = encode_init_reply(2, n)
    assert len(raw) == 16 + size
    assert reply_of(n).minor == minor


def test_reply_size_for_old_kernels() -> None:
    assert init_reply_size(4) == 8
    assert init_reply_size(22) == 24
    assert init_reply_size(23) == 64
    n = attrs.evolve(negotiate(init_req(), InitConfig()), kernel_minor=22, minor=22)
    raw = encode_init_reply(2, n)
    assert len(raw) == 16 + 24
    rep = k.decode_init_reply(raw[16:])
    assert rep.size == 24 and (rep.major, rep.minor, rep.max_write) == (7, 22, 1 << 20)
    assert (rep.max_background, rep.congestion_threshold) == (64, 48)
    assert rep.time_gran == 0 and rep.max_pages == 0  # not in the 24-byte form


def test_minor_36_kernel_without_flags2() -> None:
    """A 16-byte fuse_init_in (no flags2): decoded and negotiated without any high bit."""
    body = S.INIT_IN_HEAD.pack(7, 36, 65536, int(F.ASYNC_READ | F.BIG_WRITES | F.MAX_PAGES))
    raw = S.IN_HEADER.pack(40 + len(body), Opcode.INIT, 2, 0, 0, 0, 0, 0, 0) + body
    req = Decoder().decode(raw)
    assert req == init_req(36, F.ASYNC_READ | F.BIG_WRITES | F.MAX_PAGES, readahead=65536)
    assert isinstance(req, InitRequest)
    n = negotiate(req, InitConfig())
    assert n.flags == F.ASYNC_READ | F.BIG_WRITES | F.MAX_PAGES
    assert n.max_readahead == 65536
    rep = reply_of(n)
    assert rep.flags2 == 0 and rep.minor == 36 and rep.size == 64


def test_flags2_ignored_without_init_ext_in_request() -> None:
    body = S.INIT_IN.pack(7, 45, 0, int(F.BIG_WRITES), 0xFFFFFFFF)
    req = Decoder().decode(S.IN_HEADER.pack(40 + len(body), Opcode.INIT, 2, 0, 0, 0, 0, 0, 0) + body)
    assert isinstance(req, InitRequest) and req.flags == F.BIG_WRITES


def test_newer_major_gets_version_reply() -> None:
    with pytest.raises(InitError):
        negotiate(init_req(major=8, minor=0), InitConfig())
    raw = encode_version_reply(2)
    assert raw == bytes.fromhex("18000000 00000000 0200000000000000 07000000 2d000000".replace(" ", ""))
    rep = k.decode_init_reply(k.split_reply(raw)[2])
    assert (rep.size, rep.major, rep.minor) == (8, 7, 45)


@pytest.mark.parametrize("minor", [0, 22, 30])
def test_old_minor_refused(minor: int) -> None:
    with pytest.raises(InitError, match="older"):
        negotiate(init_req(minor=minor, flags=F.BIG_WRITES), InitConfig())


@pytest.mark.parametrize("major", [6, 0])
def test_older_major_refused(major: int) -> None:
    with pytest.raises(InitError):
        negotiate(init_req(major=major), InitConfig())


def test_passthrough_and_writeback_cache() -> None:
    with pytest.raises(ValueError, match="passthrough"):
        InitConfig(passthrough=True, writeback_cache=True)
    n = negotiate(init_req(), InitConfig(passthrough=True, max_stack_depth=2))
    assert n.has(F.PASSTHROUGH) and n.max_stack_depth == 2
    assert reply_of(n).max_stack_depth == 2 and reply_of(n).flags & F.PASSTHROUGH
    # With an explicit wanted set, writeback cache wins and passthrough is dropped.
    both = F.PASSTHROUGH | F.WRITEBACK_CACHE | F.INIT_EXT
    n = negotiate(init_req(), InitConfig(passthrough=True), both)
    assert n.has(F.WRITEBACK_CACHE) and not n.has(F.PASSTHROUGH) and n.max_stack_depth == 0
    # Without passthrough no stack depth is sent.
    assert negotiate(init_req(), InitConfig()).max_stack_depth == 0


def test_refused_flags_reported() -> None:
    offer = HOST_OFFER & ~F.PASSTHROUGH & ~F.ALLOW_IDMAP
    n = negotiate(init_req(flags=offer), InitConfig(passthrough=True, allow_idmap=True, request_timeout=30))
    assert n.refused == F.PASSTHROUGH | F.ALLOW_IDMAP
    assert n.request_timeout == 30 and reply_of(n).request_timeout == 30
    n = negotiate(init_req(flags=offer & ~F.REQUEST_TIMEOUT), InitConfig(request_timeout=30))
    assert n.refused == F.REQUEST_TIMEOUT and n.request_timeout == 0


def test_max_readahead_is_the_smaller() -> None:
    assert negotiate(init_req(readahead=1 << 30), InitConfig()).max_readahead == 1 << 20
    assert negotiate(init_req(readahead=4096), InitConfig()).max_readahead == 4096


@pytest.mark.parametrize("kw", [
    {"max_write": 4095}, {"max_write": (16 << 20) + 1}, {"request_timeout": 1 << 16}, {"max_background": -1},
    {"congestion_threshold": 1 << 16},
])
def test_config_validation(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        InitConfig(**kw)


@given(offered_lo=st.integers(0, LOW), offered_hi=st.integers(0, LOW), wanted=st.integers(0, (1 << 64) - 1),
       minor=st.integers(31, 60))
def test_negotiation_invariants(offered_lo: int, offered_hi: int, wanted: int, minor: int) -> None:
    hi = offered_hi if offered_lo & F.INIT_EXT else 0
    n = negotiate(init_req(minor=minor, flags=offered_lo | hi << 32), InitConfig(), F(wanted))
    offered = offered_lo | hi << 32
    rep = reply_of(n)
    assert rep.flags & ~offered == 0  # nothing that was not offered
    assert rep.flags & ~wanted == 0  # nothing that was not asked for
    assert rep.flags & INFORMATIONAL == 0
    assert not (rep.flags & F.PASSTHROUGH and rep.flags & F.WRITEBACK_CACHE)
    if not rep.flags & F.INIT_EXT:
        assert rep.flags2 == 0
    assert int(n.flags) & ~int(INFORMATIONAL) == int(rep.flags) | rep.flags2 << 32  # both words
    assert n.refused == F(wanted & ~offered & ~INFORMATIONAL)
    assert rep.minor == min(minor, 45)


def test_unknown_flag_is_not_agreed() -> None:
    """A flag bit afuse has no name for (offered and wanted) is neither agreed nor replied
    (found by test_negotiation_invariants: offered INIT_EXT | 1 << 43, wanted both)."""
    unknown = 1 << 43
    n = negotiate(init_req(minor=31, flags=F.INIT_EXT | unknown), InitConfig(), F(int(F.INIT_EXT) | unknown))
    assert not int(n.flags) & unknown
    rep = reply_of(n)
    assert int(n.flags) & ~int(INFORMATIONAL) == int(rep.flags) | rep.flags2 << 32
