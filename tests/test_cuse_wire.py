"""The CUSE wire part (sans-IO): CUSE_INIT negotiation and reply, device info, ioctl retries.

Checked against afuse.wire.kernel's decoders (the kernel side). The devices themselves are
tested in a guest kernel (tests/guest/guest_cuse.py via tests/test_guest.py).
"""

from __future__ import annotations

from typing import Any

import pytest

from afuse.cuse import is_compat, is_unrestricted, retry
from afuse.wire import kernel
from afuse.wire import requests as r
from afuse.wire.constants import CUSE_UNRESTRICTED_IOCTL, IOCTL_COMPAT, IOCTL_UNRESTRICTED
from afuse.wire.cuse import (
    IOCTL_MAX_TRANSFER,
    CuseConfig,
    CuseInitError,
    device_info,
    encode_cuse_init_reply,
    ioctl_retry,
    negotiate_cuse,
)
from afuse.wire.decoder import Decoder


def init_request(major: int = 7, minor: int = 41, flags: int = CUSE_UNRESTRICTED_IOCTL) -> r.CuseInitRequest:
    raw = kernel.encode_request(r.CuseInitRequest(99, 0, 0, 0, 0, major, minor, flags))
    req = Decoder().decode(raw)
    assert isinstance(req, r.CuseInitRequest)
    return req


def test_init_reply_round_trip() -> None:
    cfg = CuseConfig("mydev", dev_major=240, dev_minor=3, max_read=65536, max_write=8192)
    neg = negotiate_cuse(init_request(minor=41), cfg)
    assert (neg.kernel_minor, neg.minor, neg.unrestricted_ioctl) == (41, 41, True)
    msg = encode_cuse_init_reply(99, neg, cfg)
    error, unique, body = kernel.split_reply(msg)
    assert (error, unique) == (0, 99)
    rep = kernel.decode_cuse_init_reply(body)
    assert (rep.major, rep.minor, rep.flags) == (7, 41, CUSE_UNRESTRICTED_IOCTL)
    assert (rep.max_read, rep.max_write, rep.dev_major, rep.dev_minor) == (65536, 8192, 240, 3)
    assert rep.info == [b"DEVNAME=mydev", b"MAJOR=240", b"MINOR=3"]
    assert len(msg) == 16 + 72 + len(b"DEVNAME=mydev\0MAJOR=240\0MINOR=3\0")


def test_negotiates_down_and_restricted() -> None:
    cfg = CuseConfig("d", unrestricted_ioctl=False)
    neg = negotiate_cuse(init_request(minor=50, flags=CUSE_UNRESTRICTED_IOCTL), cfg)
    assert neg.minor == 45 and neg.flags == 0 and not neg.unrestricted_ioctl
    rep = kernel.decode_cuse_init_reply(kernel.split_reply(encode_cuse_init_reply(1, neg, cfg))[2])
    assert rep.flags == 0 and rep.info == [b"DEVNAME=d"] and (rep.dev_major, rep.dev_minor) == (0, 0)


@pytest.mark.parametrize(("major", "minor", "flags", "message"), [
    (8, 0, 1, "CUSE needs major 7"),
    (7, 10, 1, r"CUSE needs 7\.11 or later"),
    (7, 41, 0, "does not offer CUSE_UNRESTRICTED_IOCTL"),
])
def test_unanswerable_init(major: int, minor: int, flags: int, message: str) -> None:
    with pytest.raises(CuseInitError, match=message):
        negotiate_cuse(init_request(major, minor, flags), CuseConfig("d"))


@pytest.mark.parametrize("name", ["", " d", "d ", "a=b", "a\0b", "a\nb", "a//b", "../x", "a/./b", "x" * 256])
def test_invalid_names(name: str) -> None:
    with pytest.raises(CuseInitError, match="invalid device name"):
        CuseConfig(name)


def test_device_info_limits() -> None:
    assert device_info("net/tun2") == b"DEVNAME=net/tun2\0"
    assert device_info("d", extra=["FOO=bar"]) == b"DEVNAME=d\0FOO=bar\0"
    with pytest.raises(CuseInitError, match="at most 4096"):
        device_info("d", extra=["K=" + "v" * 4100])
    with pytest.raises(CuseInitError, match="key=value"):
        device_info("d", extra=["=v"])


@pytest.mark.parametrize(("kw", "message"), [
    ({"dev_major": 4096}, "out of range"), ({"dev_minor": -1}, "out of range"),
    ({"max_read": 4095}, "max_read=4095"), ({"max_write": 1 << 32}, "max_write"),
])
def test_config_checks(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(CuseInitError, match=message):
        CuseConfig("d", **kw)


def test_ioctl_retry_encoding() -> None:
    msg = ioctl_retry(7, [(0x1000, 40), (0x7FFF0000, 16)], [(0x1018, 8)])
    error, unique, body = kernel.split_reply(msg)
    assert (error, unique) == (0, 7)
    rep = kernel.decode_ioctl(body)
    assert rep.in_iovs == [(0x1000, 40), (0x7FFF0000, 16)] and rep.out_iovs == [(0x1018, 8)]


@pytest.mark.parametrize(("ins", "outs", "message"), [
    ([], [], "at least one"),
    ([(0, 1)] * 200, [(0, 1)] * 57, "at most 256"),
    ([(0, IOCTL_MAX_TRANSFER + 1)], [], "at most 131072"),
    ([(-1, 8)], [], "not a valid user memory range"),
    ([(1 << 64 - 1, 1 << 63 + 1)], [], "not a valid user memory range"),
    ([(1, 2, 3)], [], "not an \\(address, length\\) pair"),
])
def test_ioctl_retry_limits(ins: list[tuple[int, int]], outs: list[tuple[int, int]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ioctl_retry(1, ins, outs)


def test_ioctl_helpers() -> None:
    req = r.IoctlRequest(1, 0, 0, 0, 0, 3, IOCTL_UNRESTRICTED, 0x4502, 0x1000, 0, 0, b"")
    assert is_unrestricted(req) and not is_compat(req)
    req.flags = IOCTL_COMPAT
    assert is_compat(req) and not is_unrestricted(req)
    assert retry([(1, 2)]).in_iovs == [(1, 2)] and retry(out_iovs=[(3, 4)]).out_iovs == [(3, 4)]
