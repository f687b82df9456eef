"""Requests the kernel sends, one attrs class each, with their decoders and (kernel side) encoders.

Every request carries the header fields ``unique``, ``nodeid``, ``uid``, ``gid`` and ``pid``.
Names and xattr names are ``bytes`` without their terminating NUL.
"""

from __future__ import annotations

from typing import ClassVar, Protocol

import attrs

from . import structs as S
from .constants import (
    EXT_GROUPS,
    FSYNC_FDATASYNC,
    GETATTR_FH,
    INT_REQ_BIT,
    INVALID_UIDGID,
    LK_FLOCK,
    MAX_NR_SECCTX,
    OPEN_KILL_SUIDGID,
    RELEASE_FLOCK_UNLOCK,
    RELEASE_FLUSH,
    UNIQUE_RESEND,
    FAttr,
    InitFlag,
    Opcode,
)
from .types import Lock

#: Every request class (one per opcode, or per group of opcodes) and the decoder.
__all__ = [
    "AccessRequest", "BmapRequest", "CopyFileRangeRequest", "CreateRequest", "CuseInitRequest",
    "DestroyRequest", "FallocateRequest", "FlushRequest", "ForgetRequest", "FsyncRequest", "FsyncdirRequest",
    "GetattrRequest", "GetlkRequest", "GetxattrRequest", "InitRequest", "InterruptRequest", "IoctlRequest",
    "LinkRequest", "ListxattrRequest", "LookupRequest", "LseekRequest", "MkdirRequest", "MknodRequest",
    "NotifyReplyRequest", "OpenRequest", "OpendirRequest", "PollRequest", "ProtocolError", "ReadRequest",
    "ReaddirRequest", "ReaddirplusRequest", "ReadlinkRequest", "ReleaseRequest", "ReleasedirRequest",
    "RemovemappingRequest", "RemovexattrRequest", "RenameRequest", "RmdirRequest", "SetattrRequest",
    "SetlkRequest", "SetupmappingRequest", "SetxattrRequest", "StatfsRequest", "StatxRequest",
    "SymlinkRequest", "SyncfsRequest", "TmpfileRequest", "UnknownOpcode", "UnlinkRequest", "WriteRequest",
    "DecodeState", "ForgetItem", "Request", "SecurityContext",
]


class ProtocolError(Exception):
    """A request the decoder cannot make sense of; ``unique`` is 0 if even the header was bad."""

    def __init__(self, message: str, unique: int = 0, opcode: int = 0) -> None:
        super().__init__(message)
        self.unique = unique
        self.opcode = opcode


class UnknownOpcode(ProtocolError):
    """A well-formed request with an opcode this decoder does not know (answer ENOSYS)."""


@attrs.define(slots=True)
class Request:
    """Fields every request has (``struct fuse_in_header``).

    ``uid``/``gid`` are the caller's fsuid/fsgid in the connection's user namespace.
    Once FUSE_ALLOW_IDMAP is negotiated (``InitConfig(allow_idmap=True)``), only requests that
    create an inode carry them — mapped back through an idmapped mount's idmapping into the
    filesystem's view — and every other request, on every mount of the connection, carries
    :data:`afuse.wire.constants.INVALID_UIDGID` in both: test :attr:`has_ids` rather than
    the number. Kernel-internal requests carry no ids either. See docs/kernel-features.md.
    """

    opcode: ClassVar[Opcode]
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int

    @property
    def is_resend(self) -> bool:
        """True if the kernel re-queued this request after FUSE_NOTIFY_RESEND (it may be a replay)."""
        return bool(self.unique & UNIQUE_RESEND)

    @property
    def request_id(self) -> int:
        """``unique`` without the resend bit: the same for the first attempt and its replays."""
        return self.unique & ~UNIQUE_RESEND

    @property
    def has_ids(self) -> bool:
        """False when the kernel sent no caller ids (idmapped mounts, kernel-internal requests)."""
        return self.uid != INVALID_UIDGID


@attrs.define(slots=True)
class SecurityContext:
    """One security context of a creating request (FUSE_SECURITY_CTX): xattr name and value."""

    name: bytes
    value: bytes


@attrs.define(slots=True)
class _Creating(Request):
    """Base of requests that create an inode; they may carry request extensions."""

    #: Security contexts for the new inode (FUSE_SECURITY_CTX); None when the kernel sent none.
    security_context: list[SecurityContext] | None = attrs.field(default=None, kw_only=True)
    #: Supplementary groups of the caller relevant to the parent (FUSE_CREATE_SUPP_GROUP).
    supp_groups: list[int] | None = attrs.field(default=None, kw_only=True)


@attrs.define(slots=True)
class LookupRequest(Request):
    """Look up ``name`` in directory ``nodeid``."""

    opcode = Opcode.LOOKUP
    name: bytes


@attrs.define(slots=True, frozen=True)
class ForgetItem:
    """Drop ``nlookup`` from the lookup count of ``nodeid``."""

    nodeid: int
    nlookup: int


@attrs.define(slots=True)
class ForgetRequest(Request):
    """FORGET or BATCH_FORGET: lookup counts to drop. Never answered."""

    opcode = Opcode.FORGET
    items: list[ForgetItem]


@attrs.define(slots=True)
class GetattrRequest(Request):
    """Attributes of ``nodeid``; ``fh`` is the open file's handle when the caller used fstat."""

    opcode = Opcode.GETATTR
    fh: int | None


@attrs.define(slots=True)
class SetattrRequest(Request):
    """Change attributes; a field is None when the caller did not set it.

    ``new_uid``/``new_gid`` are the requested owner (``uid``/``gid`` stay the caller's).

    ``atime_now``/``mtime_now`` ask for the current time. ``valid`` holds the raw FATTR_* bits.
    """

    opcode = Opcode.SETATTR
    valid: FAttr
    fh: int | None
    size: int | None
    lock_owner: int | None
    atime_ns: int | None
    mtime_ns: int | None
    ctime_ns: int | None
    mode: int | None
    new_uid: int | None
    new_gid: int | None
    atime_now: bool
    mtime_now: bool
    kill_suidgid: bool


@attrs.define(slots=True)
class ReadlinkRequest(Request):
    """Read the target of symlink ``nodeid``."""

    opcode = Opcode.READLINK


@attrs.define(slots=True)
class SymlinkRequest(_Creating):
    """Create symlink ``name`` in directory ``nodeid`` pointing at ``target``."""

    opcode = Opcode.SYMLINK
    name: bytes = b""
    target: bytes = b""


@attrs.define(slots=True)
class MknodRequest(_Creating):
    """Create node ``name`` (``mode`` includes the type; ``rdev`` in the kernel's new encoding)."""

    opcode = Opcode.MKNOD
    name: bytes = b""
    mode: int = 0
    rdev: int = 0
    umask: int = 0


@attrs.define(slots=True)
class MkdirRequest(_Creating):
    """Create directory ``name``; ``mode`` may lack S_IFDIR."""

    opcode = Opcode.MKDIR
    name: bytes = b""
    mode: int = 0
    umask: int = 0


@attrs.define(slots=True)
class UnlinkRequest(Request):
    """Remove ``name`` from directory ``nodeid``."""

    opcode = Opcode.UNLINK
    name: bytes


@attrs.define(slots=True)
class RmdirRequest(Request):
    """Remove directory ``name`` from directory ``nodeid``."""

    opcode = Opcode.RMDIR
    name: bytes


@attrs.define(slots=True)
class RenameRequest(Request):
    """Move ``name`` in ``nodeid`` to ``newname`` in ``newdir`` (RENAME and RENAME2).

    ``flags``: RENAME_NOREPLACE 1, RENAME_EXCHANGE 2, RENAME_WHITEOUT 4.
    """

    opcode = Opcode.RENAME
    name: bytes
    newdir: int
    newname: bytes
    flags: int


@attrs.define(slots=True)
class LinkRequest(Request):
    """Make a hard link to ``oldnodeid`` named ``newname`` in directory ``nodeid``."""

    opcode = Opcode.LINK
    oldnodeid: int
    newname: bytes


@attrs.define(slots=True)
class OpenRequest(Request):
    """Open ``nodeid``: ``flags`` are open(2)'s, less O_CREAT/O_EXCL/O_NOCTTY."""

    opcode = Opcode.OPEN
    flags: int
    open_flags: int

    @property
    def kill_suidgid(self) -> bool:
        """O_TRUNC by a caller without CAP_FSETID (HANDLE_KILLPRIV_V2)."""
        return bool(self.open_flags & OPEN_KILL_SUIDGID)


@attrs.define(slots=True)
class OpendirRequest(OpenRequest):
    """Open directory ``nodeid``."""

    opcode = Opcode.OPENDIR


@attrs.define(slots=True)
class ReadRequest(Request):
    """Read up to ``size`` bytes at ``offset``; ``flags`` are the open flags."""

    opcode = Opcode.READ
    fh: int
    offset: int
    size: int
    read_flags: int
    lock_owner: int
    flags: int


@attrs.define(slots=True)
class WriteRequest(Request):
    """Write ``data`` at ``offset``; WRITE_CACHE in ``write_flags`` marks page-cache writeback."""

    opcode = Opcode.WRITE
    fh: int
    offset: int
    data: bytes
    write_flags: int
    lock_owner: int
    flags: int


@attrs.define(slots=True)
class StatfsRequest(Request):
    """Statistics of the filesystem containing ``nodeid``."""

    opcode = Opcode.STATFS


@attrs.define(slots=True)
class ReleaseRequest(Request):
    """Last close of an open file; errors are ignored by the kernel."""

    opcode = Opcode.RELEASE
    fh: int
    flags: int
    release_flags: int
    lock_owner: int

    @property
    def flush(self) -> bool:
        """The kernel asks for a flush as well (RELEASE_FLUSH)."""
        return bool(self.release_flags & RELEASE_FLUSH)

    @property
    def flock_unlock(self) -> bool:
        """Drop the flock locks of ``lock_owner`` (RELEASE_FLOCK_UNLOCK)."""
        return bool(self.release_flags & RELEASE_FLOCK_UNLOCK)


@attrs.define(slots=True)
class ReleasedirRequest(ReleaseRequest):
    """Last close of an open directory."""

    opcode = Opcode.RELEASEDIR


@attrs.define(slots=True)
class FsyncRequest(Request):
    """Flush ``fh`` to stable storage; ``datasync`` for fdatasync."""

    opcode = Opcode.FSYNC
    fh: int
    datasync: bool


@attrs.define(slots=True)
class FsyncdirRequest(FsyncRequest):
    """fsync of a directory."""

    opcode = Opcode.FSYNCDIR


@attrs.define(slots=True)
class SetxattrRequest(Request):
    """Set xattr ``name``; ``flags`` XATTR_CREATE 1 / XATTR_REPLACE 2."""

    opcode = Opcode.SETXATTR
    name: bytes
    value: bytes
    flags: int
    setxattr_flags: int


@attrs.define(slots=True)
class GetxattrRequest(Request):
    """Get xattr ``name``; ``size`` 0 asks only for the length (the framework handles it)."""

    opcode = Opcode.GETXATTR
    name: bytes
    size: int


@attrs.define(slots=True)
class ListxattrRequest(Request):
    """List xattr names; ``size`` 0 asks only for the length (the framework handles it)."""

    opcode = Opcode.LISTXATTR
    size: int


@attrs.define(slots=True)
class RemovexattrRequest(Request):
    """Remove xattr ``name``."""

    opcode = Opcode.REMOVEXATTR
    name: bytes


@attrs.define(slots=True)
class FlushRequest(Request):
    """A close(2) of a descriptor of ``fh`` (one per close)."""

    opcode = Opcode.FLUSH
    fh: int
    lock_owner: int


@attrs.define(slots=True)
class InitRequest(Request):
    """The kernel's INIT: its version, readahead limit and the flags it offers."""

    opcode = Opcode.INIT
    major: int
    minor: int
    max_readahead: int
    flags: InitFlag


@attrs.define(slots=True)
class ReaddirRequest(Request):
    """Read entries of directory ``fh`` after cookie ``offset``, at most ``size`` bytes."""

    opcode = Opcode.READDIR
    fh: int
    offset: int
    size: int


@attrs.define(slots=True)
class ReaddirplusRequest(ReaddirRequest):
    """READDIRPLUS: entries with their attributes."""

    opcode = Opcode.READDIRPLUS


@attrs.define(slots=True)
class GetlkRequest(Request):
    """Test for a POSIX lock conflicting with ``lock`` held by another ``owner``."""

    opcode = Opcode.GETLK
    fh: int
    owner: int
    lock: Lock
    lk_flags: int


@attrs.define(slots=True)
class SetlkRequest(Request):
    """Acquire or release a lock: POSIX (fcntl) unless ``is_flock``; ``sleep`` for SETLKW."""

    opcode = Opcode.SETLK
    fh: int
    owner: int
    lock: Lock
    lk_flags: int
    sleep: bool

    @property
    def is_flock(self) -> bool:
        """The lock comes from flock(2), not fcntl(2)."""
        return bool(self.lk_flags & LK_FLOCK)


@attrs.define(slots=True)
class AccessRequest(Request):
    """access(2) check of ``mask`` (R_OK/W_OK/X_OK/F_OK); not sent with default_permissions."""

    opcode = Opcode.ACCESS
    mask: int


@attrs.define(slots=True)
class CreateRequest(_Creating):
    """Create and open regular file ``name`` in directory ``nodeid``."""

    opcode = Opcode.CREATE
    name: bytes = b""
    flags: int = 0
    mode: int = 0
    umask: int = 0
    open_flags: int = 0


@attrs.define(slots=True)
class TmpfileRequest(CreateRequest):
    """O_TMPFILE: create an unnamed file in directory ``nodeid`` and open it."""

    opcode = Opcode.TMPFILE


@attrs.define(slots=True)
class InterruptRequest(Request):
    """Interrupt the request whose unique is ``target``."""

    opcode = Opcode.INTERRUPT
    target: int


@attrs.define(slots=True)
class BmapRequest(Request):
    """Map file block ``block`` (of ``blocksize``) to a device block (fuseblk only)."""

    opcode = Opcode.BMAP
    block: int
    blocksize: int


@attrs.define(slots=True)
class DestroyRequest(Request):
    """The filesystem is being unmounted (fuseblk only)."""

    opcode = Opcode.DESTROY


@attrs.define(slots=True)
class IoctlRequest(Request):
    """ioctl ``cmd`` on ``fh`` with argument ``arg``; ``in_data`` was copied in, at most ``out_size`` goes back."""

    opcode = Opcode.IOCTL
    fh: int
    flags: int
    cmd: int
    arg: int
    in_size: int
    out_size: int
    in_data: bytes


@attrs.define(slots=True)
class PollRequest(Request):
    """Poll ``fh`` for ``events``; ``kh`` is the handle for a later poll notification."""

    opcode = Opcode.POLL
    fh: int
    kh: int
    flags: int
    events: int


@attrs.define(slots=True)
class NotifyReplyRequest(Request):
    """The kernel's answer to a RETRIEVE notification (``unique`` is the notify_unique)."""

    opcode = Opcode.NOTIFY_REPLY
    offset: int
    size: int
    data: bytes


@attrs.define(slots=True)
class FallocateRequest(Request):
    """fallocate(2) ``mode`` over ``length`` bytes at ``offset``."""

    opcode = Opcode.FALLOCATE
    fh: int
    offset: int
    length: int
    mode: int


@attrs.define(slots=True)
class LseekRequest(Request):
    """lseek with ``whence`` SEEK_DATA (3) or SEEK_HOLE (4)."""

    opcode = Opcode.LSEEK
    fh: int
    offset: int
    whence: int


@attrs.define(slots=True)
class CopyFileRangeRequest(Request):
    """Copy ``length`` bytes; ``wide`` marks COPY_FILE_RANGE_64 (a 64-bit byte count may be returned)."""

    opcode = Opcode.COPY_FILE_RANGE
    fh_in: int
    off_in: int
    nodeid_out: int
    fh_out: int
    off_out: int
    length: int
    flags: int
    wide: bool


@attrs.define(slots=True)
class SetupmappingRequest(Request):
    """virtiofs DAX: map a file range into the DAX window."""

    opcode = Opcode.SETUPMAPPING
    fh: int
    foffset: int
    length: int
    flags: int
    moffset: int


@attrs.define(slots=True)
class RemovemappingRequest(Request):
    """virtiofs DAX: remove mappings, as (moffset, length) pairs."""

    opcode = Opcode.REMOVEMAPPING
    mappings: list[tuple[int, int]]


@attrs.define(slots=True)
class SyncfsRequest(Request):
    """syncfs(2) of the whole filesystem."""

    opcode = Opcode.SYNCFS


@attrs.define(slots=True)
class StatxRequest(Request):
    """statx(2) of ``nodeid``; ``mask`` is what the caller asked for (STATX_* bits)."""

    opcode = Opcode.STATX
    fh: int | None
    getattr_flags: int
    sx_flags: int
    mask: int


@attrs.define(slots=True)
class CuseInitRequest(Request):
    """CUSE_INIT: the first message on /dev/cuse."""

    opcode = Opcode.CUSE_INIT
    major: int
    minor: int
    flags: int


# ---------------------------------------------------------------------------------------------
# Decoding

_Head = tuple[int, int, int, int, int]  # unique nodeid uid gid pid


def _cstr(body: memoryview, start: int = 0) -> tuple[bytes, int]:
    """The NUL-terminated string at ``start`` and the offset after its NUL."""
    raw = body[start:].tobytes()
    end = raw.find(b"\0")
    if end < 0:
        raise ProtocolError("string is not NUL-terminated")
    return raw[:end], start + end + 1


def _name(d: DecodeState, h: _Head, b: memoryview) -> bytes:
    n = b.tobytes()
    end = n.find(b"\0")
    if end < 0:
        raise ProtocolError("name is not NUL-terminated")
    return n[:end]


def _need(b: memoryview, n: int) -> None:
    if len(b) < n:
        raise ProtocolError(f"body is {len(b)} bytes, expected at least {n}")


def _ext(data: memoryview) -> tuple[list[SecurityContext] | None, list[int] | None]:
    """Decode request extensions (FUSE_SECURITY_CTX, FUSE_EXT_GROUPS)."""
    secctx: list[SecurityContext] | None = None
    groups: list[int] | None = None
    pos = 0
    while pos + 8 <= len(data):
        size, typ = S.EXT_HEADER.unpack_from(data, pos)
        if size < 8 or size % 8 or pos + size > len(data):
            raise ProtocolError(f"bad extension header size {size}")
        if typ <= MAX_NR_SECCTX:
            # fuse_secctx_header {size, nr}; then nr x (fuse_secctx {size, pad} + name\0 + value), padded.
            secctx = []
            nr = typ
            p = pos + 8
            for _ in range(nr):
                vsize, _pad = S.SECCTX.unpack_from(data, p)
                name, after = _cstr(data[: pos + size], p + 8)
                if after + vsize > pos + size:
                    raise ProtocolError("security context overruns its extension")
                value = data[after : after + vsize].tobytes()
                secctx.append(SecurityContext(name, value))
                p = (after + vsize + 7) & ~7
        elif typ == EXT_GROUPS:
            (nr,) = S.SUPP_GROUPS.unpack_from(data, pos + 8)
            if 12 + 4 * nr > size:
                raise ProtocolError("supplementary groups overrun their extension")
            groups = list(memoryview(data[pos + 12 : pos + 12 + 4 * nr]).cast("I"))
        pos += size
    return secctx, groups


def _creating(cls: type[_Creating], h: _Head, tail: memoryview, ext: memoryview | None, **kw: object) -> _Creating:
    req = cls(*h, **kw)  # type: ignore[arg-type]
    if ext is not None and len(ext):
        req.security_context, req.supp_groups = _ext(ext)
    return req


class DecodeState(Protocol):
    """What a decoder function may read of its decoder (see :class:`afuse.wire.decoder.Decoder`)."""

    setxattr_ext: bool


def _d_lookup(d: DecodeState, h: _Head, b: memoryview) -> Request:
    return LookupRequest(*h, _name(d, h, b))


def _d_forget(d: DecodeState, h: _Head, b: memoryview) -> Request:
    (n,) = S.FORGET_IN.unpack_from(b)
    return ForgetRequest(*h, [ForgetItem(h[1], n)])


def _d_batch_forget(d: DecodeState, h: _Head, b: memoryview) -> Request:
    count, _ = S.BATCH_FORGET_IN.unpack_from(b)
    _need(b, 8 + 16 * count)
    items = [ForgetItem(n, c) for n, c in S.FORGET_ONE.iter_unpack(b[8 : 8 + 16 * count])]
    req = ForgetRequest(*h, items)
    return req


def _d_getattr(d: DecodeState, h: _Head, b: memoryview) -> Request:
    if len(b) < 16:  # very old kernels sent no getattr_in
        return GetattrRequest(*h, None)
    flags, _, fh = S.GETATTR_IN.unpack_from(b)
    return GetattrRequest(*h, fh if flags & GETATTR_FH else None)


def _d_setattr(d: DecodeState, h: _Head, b: memoryview) -> Request:
    (valid, _, fh, size, lock_owner, atime, mtime, ctime, atimens, mtimens, ctimens, mode, _,
     uid, gid, _) = S.SETATTR_IN.unpack_from(b)
    v = FAttr(valid)
    return SetattrRequest(
        *h, v,
        fh if valid & FAttr.FH else None,
        size if valid & FAttr.SIZE else None,
        lock_owner if valid & FAttr.LOCKOWNER else None,
        atime * 1_000_000_000 + atimens if valid & FAttr.ATIME and not valid & FAttr.ATIME_NOW else None,
        mtime * 1_000_000_000 + mtimens if valid & FAttr.MTIME and not valid & FAttr.MTIME_NOW else None,
        ctime * 1_000_000_000 + ctimens if valid & FAttr.CTIME else None,
        mode if valid & FAttr.MODE else None,
        uid if valid & FAttr.UID else None,
        gid if valid & FAttr.GID else None,
        bool(valid & FAttr.ATIME_NOW),
        bool(valid & FAttr.MTIME_NOW),
        bool(valid & FAttr.KILL_SUIDGID),
    )


def _d_readlink(d: DecodeState, h: _Head, b: memoryview) -> Request:
    return ReadlinkRequest(*h)


def _d_symlink(d: DecodeState, h: _Head, b: memoryview, ext: memoryview | None = None) -> Request:
    name, p = _cstr(b)
    target, _ = _cstr(b, p)
    return _creating(SymlinkRequest, h, b, ext, name=name, target=target)


def _d_mknod(d: DecodeState, h: _Head, b: memoryview, ext: memoryview | None = None) -> Request:
    mode, rdev, umask, _ = S.MKNOD_IN.unpack_from(b)
    name, _ = _cstr(b, 16)
    return _creating(MknodRequest, h, b, ext, name=name, mode=mode, rdev=rdev, umask=umask)


def _d_mkdir(d: DecodeState, h: _Head, b: memoryview, ext: memoryview | None = None) -> Request:
    mode, umask = S.MKDIR_IN.unpack_from(b)
    name, _ = _cstr(b, 8)
    return _creating(MkdirRequest, h, b, ext, name=name, mode=mode, umask=umask)


def _d_unlink(d: DecodeState, h: _Head, b: memoryview) -> Request:
    return UnlinkRequest(*h, _name(d, h, b))


def _d_rmdir(d: DecodeState, h: _Head, b: memoryview) -> Request:
    return RmdirRequest(*h, _name(d, h, b))


def _d_rename(d: DecodeState, h: _Head, b: memoryview) -> Request:
    (newdir,) = S.RENAME_IN.unpack_from(b)
    old, p = _cstr(b, 8)
    new, _ = _cstr(b, p)
    return RenameRequest(*h, old, newdir, new, 0)


def _d_rename2(d: DecodeState, h: _Head, b: memoryview) -> Request:
    newdir, flags, _ = S.RENAME2_IN.unpack_from(b)
    old, p = _cstr(b, 16)
    new, _ = _cstr(b, p)
    return RenameRequest(*h, old, newdir, new, flags)


def _d_link(d: DecodeState, h: _Head, b: memoryview) -> Request:
    (old,) = S.LINK_IN.unpack_from(b)
    name, _ = _cstr(b, 8)
    return LinkRequest(*h, old, name)


def _d_open(d: DecodeState, h: _Head, b: memoryview) -> Request:
    return OpenRequest(*h, *S.OPEN_IN.unpack_from(b))


def _d_opendir(d: DecodeState, h: _Head, b: memoryview) -> Request:
    return OpendirRequest(*h, *S.OPEN_IN.unpack_from(b))


def _d_read(d: DecodeState, h: _Head, b: memoryview) -> Request:
    fh, off, size, rflags, owner, flags, _ = S.READ_IN.unpack_from(b)
    return ReadRequest(*h, fh, off, size, rflags, owner, flags)


def _d_write(d: DecodeState, h: _Head, b: memoryview) -> Request:
    fh, off, size, wflags, owner, flags, _ = S.WRITE_IN.unpack_from(b)
    if len(b) - 40 < size:
        raise ProtocolError(f"WRITE of {size} bytes carries {len(b) - 40}")
    return WriteRequest(*h, fh, off, b[40 : 40 + size].tobytes(), wflags, owner, flags)


def _d_statfs(d: DecodeState, h: _Head, b: memoryview) -> Request:
    return StatfsRequest(*h)


def _d_release(d: DecodeState, h: _Head, b: memoryview) -> Request:
    return ReleaseRequest(*h, *S.RELEASE_IN.unpack_from(b))


def _d_releasedir(d: DecodeState, h: _Head, b: memoryview) -> Request:
    return ReleasedirRequest(*h, *S.RELEASE_IN.unpack_from(b))


def _d_fsync(d: DecodeState, h: _Head, b: memoryview) -> Request:
    fh, flags, _ = S.FSYNC_IN.unpack_from(b)
    return FsyncRequest(*h, fh, bool(flags & FSYNC_FDATASYNC))


def _d_fsyncdir(d: DecodeState, h: _Head, b: memoryview) -> Request:
    fh, flags, _ = S.FSYNC_IN.unpack_from(b)
    return FsyncdirRequest(*h, fh, bool(flags & FSYNC_FDATASYNC))


def _d_setxattr(d: DecodeState, h: _Head, b: memoryview) -> Request:
    if d.setxattr_ext:
        size, flags, sflags, _ = S.SETXATTR_IN.unpack_from(b)
        p = 16
    else:
        size, flags = S.SETXATTR_IN_COMPAT.unpack_from(b)
        sflags, p = 0, 8
    name, p = _cstr(b, p)
    if len(b) - p < size:
        raise ProtocolError(f"SETXATTR value of {size} bytes carries {len(b) - p}")
    return SetxattrRequest(*h, name, b[p : p + size].tobytes(), flags, sflags)


def _d_getxattr(d: DecodeState, h: _Head, b: memoryview) -> Request:
    size, _ = S.GETXATTR_IN.unpack_from(b)
    name, _ = _cstr(b, 8)
    return GetxattrRequest(*h, name, size)


def _d_listxattr(d: DecodeState, h: _Head, b: memoryview) -> Request:
    size, _ = S.GETXATTR_IN.unpack_from(b)
    return ListxattrRequest(*h, size)


def _d_removexattr(d: DecodeState, h: _Head, b: memoryview) -> Request:
    return RemovexattrRequest(*h, _name(d, h, b))


def _d_flush(d: DecodeState, h: _Head, b: memoryview) -> Request:
    fh, _, _, owner = S.FLUSH_IN.unpack_from(b)
    return FlushRequest(*h, fh, owner)


def _d_init(d: DecodeState, h: _Head, b: memoryview) -> Request:
    if len(b) >= S.INIT_IN.size:
        major, minor, ra, flags, flags2 = S.INIT_IN.unpack_from(b)
    elif len(b) >= S.INIT_IN_HEAD.size:
        major, minor, ra, flags = S.INIT_IN_HEAD.unpack_from(b)
        flags2 = 0
    else:
        _need(b, 8)
        major, minor = S.INIT_IN_HEAD.unpack_from(bytes(b[:8]) + bytes(8))[:2]
        ra = flags = flags2 = 0
    all_flags = flags | (flags2 << 32 if flags & InitFlag.INIT_EXT else 0)
    return InitRequest(*h, major, minor, ra, InitFlag(all_flags))


def _d_readdir(d: DecodeState, h: _Head, b: memoryview) -> Request:
    fh, off, size, *_ = S.READ_IN.unpack_from(b)
    return ReaddirRequest(*h, fh, off, size)


def _d_readdirplus(d: DecodeState, h: _Head, b: memoryview) -> Request:
    fh, off, size, *_ = S.READ_IN.unpack_from(b)
    return ReaddirplusRequest(*h, fh, off, size)


def _lk(b: memoryview) -> tuple[int, int, Lock, int]:
    fh, owner, start, end, typ, pid, lk_flags, _ = S.LK_IN.unpack_from(b)
    return fh, owner, Lock(start, end, typ, pid), lk_flags


def _d_getlk(d: DecodeState, h: _Head, b: memoryview) -> Request:
    return GetlkRequest(*h, *_lk(b))


def _d_setlk(d: DecodeState, h: _Head, b: memoryview) -> Request:
    return SetlkRequest(*h, *_lk(b), False)


def _d_setlkw(d: DecodeState, h: _Head, b: memoryview) -> Request:
    return SetlkRequest(*h, *_lk(b), True)


def _d_access(d: DecodeState, h: _Head, b: memoryview) -> Request:
    mask, _ = S.ACCESS_IN.unpack_from(b)
    return AccessRequest(*h, mask)


def _d_create_common(cls: type[CreateRequest], h: _Head, b: memoryview, ext: memoryview | None) -> Request:
    flags, mode, umask, oflags = S.CREATE_IN.unpack_from(b)
    name, _ = _cstr(b, 16)
    return _creating(cls, h, b, ext, name=name, flags=flags, mode=mode, umask=umask, open_flags=oflags)


def _d_create(d: DecodeState, h: _Head, b: memoryview, ext: memoryview | None = None) -> Request:
    return _d_create_common(CreateRequest, h, b, ext)


def _d_tmpfile(d: DecodeState, h: _Head, b: memoryview, ext: memoryview | None = None) -> Request:
    return _d_create_common(TmpfileRequest, h, b, ext)


def _d_interrupt(d: DecodeState, h: _Head, b: memoryview) -> Request:
    (target,) = S.INTERRUPT_IN.unpack_from(b)
    return InterruptRequest(*h, target)


def _d_bmap(d: DecodeState, h: _Head, b: memoryview) -> Request:
    block, bs, _ = S.BMAP_IN.unpack_from(b)
    return BmapRequest(*h, block, bs)


def _d_destroy(d: DecodeState, h: _Head, b: memoryview) -> Request:
    return DestroyRequest(*h)


def _d_ioctl(d: DecodeState, h: _Head, b: memoryview) -> Request:
    fh, flags, cmd, arg, in_size, out_size = S.IOCTL_IN.unpack_from(b)
    data = b[32 : 32 + in_size].tobytes()
    if len(data) < in_size:
        raise ProtocolError(f"IOCTL in_size {in_size} carries {len(data)}")
    return IoctlRequest(*h, fh, flags, cmd, arg, in_size, out_size, data)


def _d_poll(d: DecodeState, h: _Head, b: memoryview) -> Request:
    return PollRequest(*h, *S.POLL_IN.unpack_from(b))


def _d_notify_reply(d: DecodeState, h: _Head, b: memoryview) -> Request:
    _, off, size, *_ = S.NOTIFY_RETRIEVE_IN.unpack_from(b)
    if len(b) - 40 < size:
        raise ProtocolError(f"NOTIFY_REPLY of {size} bytes carries {len(b) - 40}")
    return NotifyReplyRequest(*h, off, size, b[40 : 40 + size].tobytes())


def _d_fallocate(d: DecodeState, h: _Head, b: memoryview) -> Request:
    fh, off, length, mode, _ = S.FALLOCATE_IN.unpack_from(b)
    return FallocateRequest(*h, fh, off, length, mode)


def _d_lseek(d: DecodeState, h: _Head, b: memoryview) -> Request:
    fh, off, whence, _ = S.LSEEK_IN.unpack_from(b)
    return LseekRequest(*h, fh, off, whence)


def _d_cfr(d: DecodeState, h: _Head, b: memoryview) -> Request:
    fh_in, off_in, nodeid_out, fh_out, off_out, length, flags = S.COPY_FILE_RANGE_IN.unpack_from(b)
    return CopyFileRangeRequest(*h, fh_in, off_in, nodeid_out, fh_out, off_out, length, flags, False)


def _d_cfr64(d: DecodeState, h: _Head, b: memoryview) -> Request:
    fh_in, off_in, nodeid_out, fh_out, off_out, length, flags = S.COPY_FILE_RANGE_IN.unpack_from(b)
    return CopyFileRangeRequest(*h, fh_in, off_in, nodeid_out, fh_out, off_out, length, flags, True)


def _d_setupmapping(d: DecodeState, h: _Head, b: memoryview) -> Request:
    return SetupmappingRequest(*h, *S.SETUPMAPPING_IN.unpack_from(b))


def _d_removemapping(d: DecodeState, h: _Head, b: memoryview) -> Request:
    (count,) = S.REMOVEMAPPING_IN.unpack_from(b)
    _need(b, 4 + 16 * count)
    return RemovemappingRequest(*h, [(m, n) for m, n in S.REMOVEMAPPING_ONE.iter_unpack(b[4 : 4 + 16 * count])])


def _d_syncfs(d: DecodeState, h: _Head, b: memoryview) -> Request:
    return SyncfsRequest(*h)


def _d_statx(d: DecodeState, h: _Head, b: memoryview) -> Request:
    gflags, _, fh, sx_flags, mask = S.STATX_IN.unpack_from(b)
    return StatxRequest(*h, fh if gflags & GETATTR_FH else None, gflags, sx_flags, mask)


def _d_cuse_init(d: DecodeState, h: _Head, b: memoryview) -> Request:
    major, minor, _, flags = S.CUSE_INIT_IN.unpack_from(b)
    return CuseInitRequest(*h, major, minor, flags)


def is_interrupt_unique(unique: int) -> bool:
    """True for the unique of an INTERRUPT message (bit 0 set)."""
    return bool(unique & INT_REQ_BIT)


# ---------------------------------------------------------------------------------------------
# Encoding (the kernel's direction: for the fake kernel and tests, via the opcode table)

_NS = 1_000_000_000
_LOW32 = 0xFFFFFFFF


def _z(name: bytes) -> bytes:
    """``name`` with its terminating NUL; names cannot contain NUL."""
    if b"\0" in name:
        raise ValueError(f"name {name!r} contains NUL")
    return bytes(name) + b"\0"


def _pad8(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 8)


def _extensions(req: _Creating) -> bytes:
    """Request extensions of a creating request: security context first, then groups."""
    out = b""
    if req.security_context is not None:
        if len(req.security_context) > MAX_NR_SECCTX:
            raise ValueError(f"at most {MAX_NR_SECCTX} security contexts")
        parts = b"".join(
            _pad8(S.SECCTX.pack(len(c.value), 0) + _z(c.name) + c.value) for c in req.security_context
        )
        out += S.SECCTX_HEADER.pack(8 + len(parts), len(req.security_context)) + parts
    if req.supp_groups is not None:
        body = S.SUPP_GROUPS.pack(len(req.supp_groups)) + b"".join(S.U32.pack(g) for g in req.supp_groups)
        out += _pad8(S.EXT_HEADER.pack(len(_pad8(bytes(8) + body)), EXT_GROUPS) + body)
    return out


_SETATTR_KNOWN = int(
    FAttr.MODE | FAttr.UID | FAttr.GID | FAttr.SIZE | FAttr.ATIME | FAttr.MTIME | FAttr.FH
    | FAttr.ATIME_NOW | FAttr.MTIME_NOW | FAttr.LOCKOWNER | FAttr.CTIME | FAttr.KILL_SUIDGID
)


def _e_setattr(req: SetattrRequest) -> bytes:
    valid = int(req.valid) & ~_SETATTR_KNOWN
    present = (
        (req.mode, FAttr.MODE), (req.new_uid, FAttr.UID), (req.new_gid, FAttr.GID),
        (req.size, FAttr.SIZE), (req.atime_ns, FAttr.ATIME), (req.mtime_ns, FAttr.MTIME),
        (req.fh, FAttr.FH), (req.lock_owner, FAttr.LOCKOWNER), (req.ctime_ns, FAttr.CTIME),
    )
    for value, bit in present:
        if value is not None:
            valid |= bit
    if req.atime_now:
        if req.atime_ns is not None:
            raise ValueError("atime_now with an atime_ns")
        valid |= FAttr.ATIME | FAttr.ATIME_NOW
    if req.mtime_now:
        if req.mtime_ns is not None:
            raise ValueError("mtime_now with an mtime_ns")
        valid |= FAttr.MTIME | FAttr.MTIME_NOW
    if req.kill_suidgid:
        valid |= FAttr.KILL_SUIDGID
    asec, ans = divmod(req.atime_ns or 0, _NS)
    msec, mns = divmod(req.mtime_ns or 0, _NS)
    csec, cns = divmod(req.ctime_ns or 0, _NS)
    return S.SETATTR_IN.pack(
        valid, 0, req.fh or 0, req.size or 0, req.lock_owner or 0, asec, msec, csec, ans, mns, cns,
        req.mode or 0, 0, req.new_uid or 0, req.new_gid or 0, 0,
    )


def _e_init(req: InitRequest) -> bytes:
    flags = int(req.flags)
    lo, hi = flags & _LOW32, flags >> 32
    if hi and not lo & InitFlag.INIT_EXT:
        raise ValueError("INIT flags above bit 31 need INIT_EXT")
    if req.minor >= 36:
        return S.INIT_IN.pack(req.major, req.minor, req.max_readahead, lo, hi)
    if hi:
        raise ValueError(f"a 7.{req.minor} kernel sends no flags2")
    return S.INIT_IN_HEAD.pack(req.major, req.minor, req.max_readahead, lo)


def _e_lk(req: GetlkRequest | SetlkRequest) -> bytes:
    lk = req.lock
    return S.LK_IN.pack(req.fh, req.owner, lk.start, lk.end, lk.type, lk.pid, req.lk_flags, 0)


def _e_ioctl(req: IoctlRequest) -> bytes:
    if len(req.in_data) != req.in_size:
        raise ValueError(f"in_size {req.in_size} but {len(req.in_data)} bytes of in_data")
    return S.IOCTL_IN.pack(req.fh, req.flags, req.cmd, req.arg, req.in_size, req.out_size) + req.in_data


def _e_notify_reply(req: NotifyReplyRequest) -> bytes:
    if len(req.data) != req.size:
        raise ValueError(f"size {req.size} but {len(req.data)} bytes of data")
    return S.NOTIFY_RETRIEVE_IN.pack(0, req.offset, req.size, 0, 0, 0) + req.data


def _e_setxattr(req: SetxattrRequest, ext: bool) -> bytes:
    if ext:
        head = S.SETXATTR_IN.pack(len(req.value), req.flags, req.setxattr_flags, 0)
    elif req.setxattr_flags:
        raise ValueError("setxattr_flags need FUSE_SETXATTR_EXT")
    else:
        head = S.SETXATTR_IN_COMPAT.pack(len(req.value), req.flags)
    return head + _z(req.name) + req.value
