"""INIT negotiation: a pure function from what the kernel offers and what the filesystem asks for."""

from __future__ import annotations

from typing import Any

import attrs

from . import structs as S
from .constants import KERNEL_MINOR_VERSION, KERNEL_VERSION, OLDEST_MINOR_VERSION, InitFlag
from .requests import InitRequest

PAGE_SIZE = 4096
#: The largest max_write afuse negotiates (the kernel's default max_pages_limit is 256 pages).
MAX_WRITE_LIMIT = 1 << 20


@attrs.define(slots=True)
class InitConfig:
    """What a filesystem asks of the kernel at INIT. Flags the kernel does not offer are dropped.

    Flags that need a handler (locks, readdirplus) are requested only if the filesystem
    implements it.
    """

    max_write: int = MAX_WRITE_LIMIT
    #: The readahead window (bytes). INIT can only lower the kernel's offer (its default, 128
    #: KiB); the session then raises the mount's bdi read_ahead_kb to this (as root).
    max_readahead: int = MAX_WRITE_LIMIT
    max_background: int = 64
    congestion_threshold: int = 48
    time_gran: int = 1
    async_read: bool = True
    atomic_o_trunc: bool = True
    parallel_dirops: bool = True
    readdirplus: bool = True
    readdirplus_auto: bool = True
    writeback_cache: bool = False
    cache_symlinks: bool = False
    posix_locks: bool = True
    flock_locks: bool = True
    export_support: bool = False
    no_export_support: bool = False
    handle_killpriv: bool = False
    handle_killpriv_v2: bool = False
    setxattr_ext: bool = True
    auto_inval_data: bool = True
    explicit_inval_data: bool = False
    async_dio: bool = True
    dont_mask: bool = False
    posix_acl: bool = False
    abort_error: bool = True
    security_ctx: bool = False
    create_supp_group: bool = False
    direct_io_allow_mmap: bool = False
    passthrough: bool = False
    max_stack_depth: int = 1
    allow_idmap: bool = False
    #: Seconds after which the kernel aborts the connection on an unanswered request (0: never).
    request_timeout: int = 0
    #: Further INIT flags to ask for, as raw bits.
    extra_flags: int = 0

    def __attrs_post_init__(self) -> None:
        if not PAGE_SIZE <= self.max_write <= MAX_WRITE_LIMIT * 16:
            raise ValueError(f"max_write must be 4 KiB .. 16 MiB, not {self.max_write}")
        if self.passthrough and not 1 <= self.max_stack_depth <= 2:
            raise ValueError(f"max_stack_depth must be 1 or 2 for passthrough, not {self.max_stack_depth}")
        if self.passthrough and self.writeback_cache:
            raise ValueError("passthrough cannot be combined with writeback_cache")
        if not 0 <= self.request_timeout <= 0xFFFF:
            raise ValueError("request_timeout must fit 16 bits")
        if not 0 <= self.max_background <= 0xFFFF or not 0 <= self.congestion_threshold <= 0xFFFF:
            raise ValueError("max_background and congestion_threshold must fit 16 bits")

    def wanted_flags(self) -> InitFlag:
        """The INIT flags this configuration asks for."""
        F = InitFlag
        want = F.BIG_WRITES | F.MAX_PAGES | F.INIT_EXT | F.HAS_IOCTL_DIR | F.HAS_RESEND
        for attr, flag in _BOOL_FLAGS:
            if getattr(self, attr):
                want |= flag
        if self.request_timeout:
            want |= F.REQUEST_TIMEOUT
        return F(want | self.extra_flags)


_BOOL_FLAGS: tuple[tuple[str, InitFlag], ...] = (
    ("async_read", InitFlag.ASYNC_READ),
    ("atomic_o_trunc", InitFlag.ATOMIC_O_TRUNC),
    ("parallel_dirops", InitFlag.PARALLEL_DIROPS),
    ("readdirplus", InitFlag.DO_READDIRPLUS),
    ("readdirplus_auto", InitFlag.READDIRPLUS_AUTO),
    ("writeback_cache", InitFlag.WRITEBACK_CACHE),
    ("cache_symlinks", InitFlag.CACHE_SYMLINKS),
    ("posix_locks", InitFlag.POSIX_LOCKS),
    ("flock_locks", InitFlag.FLOCK_LOCKS),
    ("export_support", InitFlag.EXPORT_SUPPORT),
    ("no_export_support", InitFlag.NO_EXPORT_SUPPORT),
    ("handle_killpriv", InitFlag.HANDLE_KILLPRIV),
    ("handle_killpriv_v2", InitFlag.HANDLE_KILLPRIV_V2),
    ("setxattr_ext", InitFlag.SETXATTR_EXT),
    ("auto_inval_data", InitFlag.AUTO_INVAL_DATA),
    ("explicit_inval_data", InitFlag.EXPLICIT_INVAL_DATA),
    ("async_dio", InitFlag.ASYNC_DIO),
    ("dont_mask", InitFlag.DONT_MASK),
    ("posix_acl", InitFlag.POSIX_ACL),
    ("abort_error", InitFlag.ABORT_ERROR),
    ("security_ctx", InitFlag.SECURITY_CTX),
    ("create_supp_group", InitFlag.CREATE_SUPP_GROUP),
    ("direct_io_allow_mmap", InitFlag.DIRECT_IO_ALLOW_MMAP),
    ("passthrough", InitFlag.PASSTHROUGH),
    ("allow_idmap", InitFlag.ALLOW_IDMAP),
)

#: Flags the kernel only informs about; they are never echoed in the reply.
INFORMATIONAL = (
    InitFlag.SPLICE_READ | InitFlag.SPLICE_WRITE | InitFlag.SPLICE_MOVE | InitFlag.NO_OPEN_SUPPORT
    | InitFlag.NO_OPENDIR_SUPPORT | InitFlag.HAS_EXPIRE_ONLY | InitFlag.HAS_RESEND
)


#: Every INIT flag afuse knows (InitFlag's members); the reply can carry no other bit.
_KNOWN = 0
for _flag in InitFlag:
    _KNOWN |= _flag


@attrs.define(slots=True, frozen=True)
class Negotiated:
    """The outcome of INIT: what the kernel offered and what both sides agreed on."""

    kernel_major: int
    kernel_minor: int
    #: The minor version in force (min of the kernel's and afuse's).
    minor: int
    #: Everything the kernel offered.
    offered: InitFlag
    #: What the reply asked for and the kernel offered (informational bits included if offered).
    flags: InitFlag
    max_write: int
    max_pages: int
    max_readahead: int
    max_background: int
    congestion_threshold: int
    time_gran: int
    max_stack_depth: int
    request_timeout: int
    #: Flags the filesystem asked for but the kernel did not offer.
    refused: InitFlag

    def has(self, flag: InitFlag) -> bool:
        """True if ``flag`` was negotiated."""
        return bool(self.flags & flag)

    def to_dict(self) -> dict[str, int]:
        """Plain integers, for saving (e.g. as JSON) and :meth:`from_dict`."""
        return {f.name: int(getattr(self, f.name)) for f in attrs.fields(Negotiated)}

    @classmethod
    def from_dict(cls, d: dict[str, int]) -> Negotiated:
        """The inverse of :meth:`to_dict`."""
        flags = {"offered", "flags", "refused"}
        kw: dict[str, Any] = {k: InitFlag(v) if k in flags else int(v) for k, v in d.items()}
        return cls(**kw)

    @property
    def read_buffer_size(self) -> int:
        """Bytes a read of /dev/fuse needs to hold the largest request."""
        return max(8192, self.max_write + 4096)


class InitError(Exception):
    """The kernel's INIT cannot be answered with a working session."""


def negotiate(req: InitRequest, config: InitConfig, wanted: InitFlag | None = None) -> Negotiated:
    """Agree on the session parameters; ``wanted`` overrides ``config.wanted_flags()``."""
    if req.major != KERNEL_VERSION:
        raise InitError(f"kernel speaks FUSE {req.major}.{req.minor}; afuse speaks {KERNEL_VERSION}.x")
    if req.minor < OLDEST_MINOR_VERSION:
        raise InitError(f"kernel FUSE minor {req.minor} is older than 7.{OLDEST_MINOR_VERSION}")
    want = config.wanted_flags() if wanted is None else wanted
    offered = req.flags
    agreed = InitFlag(want & offered & _KNOWN)  # a bit afuse has no name for is never agreed to
    if not agreed & InitFlag.INIT_EXT:  # the kernel reads flags2 only with INIT_EXT
        agreed = InitFlag(agreed & 0xFFFFFFFF)
    if agreed & InitFlag.PASSTHROUGH and agreed & InitFlag.WRITEBACK_CACHE:
        agreed &= ~InitFlag.PASSTHROUGH
    info = InitFlag(offered & INFORMATIONAL)
    max_pages = max(1, -(-config.max_write // PAGE_SIZE)) if agreed & InitFlag.MAX_PAGES else 32
    max_write = min(config.max_write, max_pages * PAGE_SIZE)
    return Negotiated(
        kernel_major=req.major,
        kernel_minor=req.minor,
        minor=min(req.minor, KERNEL_MINOR_VERSION),
        offered=offered,
        flags=InitFlag(agreed | info),
        max_write=max_write,
        max_pages=max_pages,
        max_readahead=min(req.max_readahead, config.max_readahead),
        max_background=config.max_background,
        congestion_threshold=config.congestion_threshold,
        time_gran=config.time_gran,
        max_stack_depth=config.max_stack_depth if agreed & InitFlag.PASSTHROUGH else 0,
        request_timeout=config.request_timeout if agreed & InitFlag.REQUEST_TIMEOUT else 0,
        refused=InitFlag(want & ~offered & ~INFORMATIONAL),
    )


def init_reply_size(kernel_minor: int) -> int:
    """The size of fuse_init_out a kernel of this minor expects."""
    if kernel_minor < 5:
        return 8
    if kernel_minor < 23:
        return 24
    return S.INIT_OUT.size


def encode_init_reply(unique: int, n: Negotiated) -> bytes:
    """The INIT reply (header and fuse_init_out sized for the kernel's minor)."""
    flags = int(n.flags & ~INFORMATIONAL)
    body = S.INIT_OUT.pack(
        KERNEL_VERSION, n.minor, n.max_readahead, flags & 0xFFFFFFFF,
        n.max_background, n.congestion_threshold, n.max_write, n.time_gran,
        n.max_pages if flags & InitFlag.MAX_PAGES else 0, 0, flags >> 32,
        n.max_stack_depth, n.request_timeout,
    )[: init_reply_size(n.kernel_minor)]
    return S.OUT_HEADER.pack(16 + len(body), 0, unique) + body


def encode_version_reply(unique: int) -> bytes:
    """Reply to an INIT from a kernel with a newer major: state ours and wait for a second INIT."""
    body = S.INIT_OUT.pack(KERNEL_VERSION, KERNEL_MINOR_VERSION, *([0] * 11))[:8]
    return S.OUT_HEADER.pack(24, 0, unique) + body
