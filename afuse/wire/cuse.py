"""The CUSE part of the wire protocol: the CUSE_INIT reply and unrestricted-ioctl retries.

A CUSE server opens /dev/cuse; the kernel's first request is CUSE_INIT (decoded as
:class:`~afuse.wire.requests.CuseInitRequest`). The reply is ``cuse_init_out`` followed by the
device-info block, NUL-terminated ``key=value`` strings of which ``DEVNAME`` is required (the
device appears as /dev/DEVNAME). Then the server gets OPEN, READ, WRITE, IOCTL, POLL, FLUSH,
FSYNC, RELEASE and INTERRUPT as a FUSE server would.

With CUSE_UNRESTRICTED_IOCTL every ioctl arrives with ``in_size == out_size == 0``; the server
answers with a retry naming the caller's memory ranges it wants copied in and out
(:func:`ioctl_retry`), and the kernel re-sends the ioctl with those bytes, as often as needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from . import structs as S
from .constants import (
    CUSE_INIT_INFO_MAX,
    CUSE_UNRESTRICTED_IOCTL,
    IOCTL_MAX_IOV,
    IOCTL_RETRY,
    KERNEL_MINOR_VERSION,
    KERNEL_VERSION,
)
from .requests import CuseInitRequest

__all__ = ["CuseConfig", "CuseInitError", "CuseNegotiated", "device_info", "encode_cuse_init_reply",
           "ioctl_retry", "negotiate_cuse"]

#: The oldest protocol minor the kernel accepts in a CUSE_INIT reply.
MIN_CUSE_MINOR = 11
#: The kernel floors max_read/max_write to this.
MIN_IO_SIZE = 4096
_OUT_HEADER = S.OUT_HEADER
_IOCTL_OUT = S.IOCTL_OUT
_IOVEC = S.IOCTL_IOVEC
#: The kernel moves at most this many bytes per ioctl direction (fc->max_pages, 32 pages on CUSE).
IOCTL_MAX_TRANSFER = 32 * 4096


class CuseInitError(ValueError):
    """CUSE_INIT cannot be answered as asked (bad device info, unsupported kernel version)."""


def _check_name(name: str) -> None:
    if not name or name != name.strip() or any(c in name for c in "\0=\n") or len(name) > 255:
        raise CuseInitError(f"invalid device name {name!r}: need 1-255 characters, no NUL, '=', newline "
                            "or surrounding whitespace")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise CuseInitError(f"invalid device name {name!r}: empty, '.' or '..' path component")


def device_info(devname: str, dev_major: int | None = None, dev_minor: int | None = None,
                extra: Sequence[str] = ()) -> bytes:
    """The device-info block: ``DEVNAME=devname\\0``, then ``MAJOR=``/``MINOR=`` and ``extra`` strings.

    The kernel uses DEVNAME only (the numbers travel in ``cuse_init_out``); libfuse puts
    MAJOR/MINOR in the block too, so they are accepted and written here for the same reason.
    """
    _check_name(devname)
    items = [f"DEVNAME={devname}"]
    if dev_major is not None:
        items.append(f"MAJOR={dev_major}")
    if dev_minor is not None:
        items.append(f"MINOR={dev_minor}")
    for item in extra:
        key = item.partition("=")[0].strip()
        if "\0" in item or not key:
            raise CuseInitError(f"invalid device-info string {item!r}: need key=value without NUL")
        items.append(item)
    block = b"".join(i.encode() + b"\0" for i in items)
    if len(block) > CUSE_INIT_INFO_MAX:
        raise CuseInitError(f"device info is {len(block)} bytes; the kernel takes at most {CUSE_INIT_INFO_MAX}")
    return block


@attrs.define(frozen=True)
class CuseConfig:
    """What the server asks for in its CUSE_INIT reply.

    ``dev_major`` 0 lets the kernel allocate a major number; ``unrestricted_ioctl`` turns on the
    retry protocol for every ioctl (else the kernel copies what the ioctl number's ``_IOC`` size
    and direction bits say, and retries are refused).
    """

    devname: str = attrs.field()
    dev_major: int = 0
    dev_minor: int = 0
    unrestricted_ioctl: bool = True
    max_read: int = 128 * 1024
    max_write: int = 128 * 1024
    extra_info: tuple[str, ...] = ()

    @devname.validator
    def _v_devname(self, _a: attrs.Attribute[str], value: str) -> None:
        _check_name(value)

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.dev_major < 1 << 12 or not 0 <= self.dev_minor < 1 << 20:
            raise CuseInitError(f"device number {self.dev_major}:{self.dev_minor} out of range "
                                "(major < 4096, minor < 1048576)")
        for what, n in (("max_read", self.max_read), ("max_write", self.max_write)):
            if not MIN_IO_SIZE <= n < 1 << 32:
                raise CuseInitError(f"{what}={n}: need {MIN_IO_SIZE} <= {what} < 2**32")


@attrs.define(frozen=True)
class CuseNegotiated:
    """The outcome of CUSE_INIT: versions, the flags in effect and the I/O sizes."""

    kernel_minor: int
    minor: int
    flags: int
    max_read: int
    max_write: int

    @property
    def unrestricted_ioctl(self) -> bool:
        """Whether ioctls use the retry protocol (CUSE_UNRESTRICTED_IOCTL)."""
        return bool(self.flags & CUSE_UNRESTRICTED_IOCTL)


def negotiate_cuse(req: CuseInitRequest, config: CuseConfig,
                   own_minor: int = KERNEL_MINOR_VERSION) -> CuseNegotiated:
    """Answerable terms for the kernel's CUSE_INIT; raises CuseInitError if there are none."""
    if req.major != KERNEL_VERSION:
        raise CuseInitError(f"kernel speaks FUSE {req.major}.{req.minor}; CUSE needs major {KERNEL_VERSION}")
    minor = min(own_minor, req.minor)
    if minor < MIN_CUSE_MINOR:
        raise CuseInitError(f"kernel speaks FUSE 7.{req.minor}; CUSE needs 7.{MIN_CUSE_MINOR} or later")
    flags = CUSE_UNRESTRICTED_IOCTL if config.unrestricted_ioctl and req.flags & CUSE_UNRESTRICTED_IOCTL else 0
    if config.unrestricted_ioctl and not flags:
        raise CuseInitError("unrestricted ioctls were asked for, but the kernel does not offer "
                            "CUSE_UNRESTRICTED_IOCTL")
    return CuseNegotiated(req.minor, minor, flags, config.max_read, config.max_write)


def encode_cuse_init_reply(unique: int, neg: CuseNegotiated, config: CuseConfig) -> bytes:
    """The reply to CUSE_INIT: ``cuse_init_out`` and the device-info block, one message."""
    info = device_info(config.devname, config.dev_major or None, config.dev_minor or None, config.extra_info)
    body = S.CUSE_INIT_OUT.pack(KERNEL_VERSION, neg.minor, 0, neg.flags, neg.max_read, neg.max_write,
                                config.dev_major, config.dev_minor)
    return _OUT_HEADER.pack(_OUT_HEADER.size + len(body) + len(info), 0, unique) + body + info


def _check_iovs(what: str, iovs: Sequence[tuple[int, int]]) -> int:
    total = 0
    for iov in iovs:
        try:
            base, length = iov
        except (TypeError, ValueError):
            raise ValueError(f"{what}: {iov!r} is not an (address, length) pair") from None
        if not (isinstance(base, int) and isinstance(length, int)) or not 0 <= base < 1 << 64 \
                or not 0 <= length < 1 << 64 or base + length > 1 << 64:
            raise ValueError(f"{what}: ({base!r}, {length!r}) is not a valid user memory range")
        total += length
    if total > IOCTL_MAX_TRANSFER:
        raise ValueError(f"{what} total {total} bytes; the kernel copies at most {IOCTL_MAX_TRANSFER} per ioctl")
    return total


def ioctl_retry(unique: int, in_iovs: Sequence[tuple[int, int]], out_iovs: Sequence[tuple[int, int]]) -> bytes:
    """A FUSE_IOCTL_RETRY reply: copy ``in_iovs`` in and retry, taking ``out_iovs`` back.

    Each iovec is (caller's address, length). The kernel re-sends the ioctl with the in-ranges'
    bytes concatenated as its input and ``out_size`` the out-ranges' total; the final reply's data
    is scattered over the out-ranges in order. Raises ValueError beyond the kernel's limits
    (256 iovecs, 128 KiB per direction), which it would answer with EIO or ENOMEM.
    """
    if len(in_iovs) + len(out_iovs) > IOCTL_MAX_IOV:
        raise ValueError(f"{len(in_iovs)} + {len(out_iovs)} iovecs; the kernel takes at most {IOCTL_MAX_IOV}")
    if not in_iovs and not out_iovs:
        raise ValueError("an ioctl retry needs at least one in or out range")
    _check_iovs("in_iovs", in_iovs)
    _check_iovs("out_iovs", out_iovs)
    body = b"".join(_IOVEC.pack(base, n) for base, n in (*in_iovs, *out_iovs))
    size = _OUT_HEADER.size + _IOCTL_OUT.size + len(body)
    return (_OUT_HEADER.pack(size, 0, unique) + _IOCTL_OUT.pack(0, IOCTL_RETRY, len(in_iovs), len(out_iovs))
            + body)
