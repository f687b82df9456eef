"""The opcode table: one record per opcode, everything afuse knows about it.

Each :class:`OpSpec` names the request class and its decoder (and, for the fake kernel, its
body encoder), the shape of its reply, the :class:`afuse.Operations` method that handles it,
whether it is answered, whether running it again for a resent request is safe, whether it
changes state a failover-capable filesystem must keep, and what must be negotiated for the
kernel to send it. Every other list of opcodes in afuse is derived from :data:`OPCODES`:
the decoder's dispatch, the kernel side's encoders, the dispatcher's routes and its ENOSYS
defaults, the INIT flags that depend on handlers, the requests the session answers itself,
the handlers a failover probe wraps and those memfs journals.

Adding an opcode: a request class with its ``_d_*`` decoder (and ``encode``) in
:mod:`.requests`, one record here, and its method on :class:`afuse.Operations`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

import attrs

from . import requests as r
from . import structs as S
from .constants import FSYNC_FDATASYNC, GETATTR_FH, InitFlag, Opcode
from .requests import _z

__all__ = [
    "BY_CLASS", "BY_OPCODE", "HANDLERS", "NO_REPLY", "OPCODES", "STATEFUL_HANDLERS", "OpSpec", "Shape",
]


_NO_FLAGS = InitFlag(0)
_O = Opcode


class Shape(enum.Enum):
    """What a handler returns and how it becomes the reply (see :mod:`.results`)."""

    #: No reply at all (FORGET, BATCH_FORGET, INTERRUPT, NOTIFY_REPLY).
    NONE = "none"
    #: ``None``; an empty success reply.
    EMPTY = "empty"
    #: An :class:`~afuse.wire.types.Entry` (``fuse_entry_out``).
    ENTRY = "entry"
    #: An :class:`~afuse.wire.types.Attr` (``fuse_attr_out``).
    ATTR = "attr"
    #: ``bytes`` (READLINK).
    DATA = "data"
    #: ``bytes`` no longer than the request's ``size`` (READ).
    READ = "read"
    #: A count from 0 to the bytes written (WRITE).
    WRITE = "write"
    #: A :class:`~afuse.wire.types.Handle` (OPEN, OPENDIR).
    OPEN = "open"
    #: ``(Entry, Handle)`` (CREATE, TMPFILE).
    CREATE = "create"
    #: A :class:`~afuse.wire.types.FsStats`.
    STATFS = "statfs"
    #: An xattr value in ``bytes`` (size 0: its length is answered; too big: ERANGE).
    XATTR = "xattr"
    #: An iterable of xattr names (same size rules).
    XATTR_NAMES = "xattr_names"
    #: :class:`~afuse.wire.types.DirEntry` items, streamed into the kernel's buffer.
    DIRENTS = "dirents"
    #: A :class:`~afuse.wire.types.Lock` (GETLK).
    LOCK = "lock"
    #: An int in the u64 range (BMAP, LSEEK).
    U64 = "u64"
    #: An :class:`~afuse.wire.types.IoctlReply`.
    IOCTL = "ioctl"
    #: Poll events, an int.
    POLL = "poll"
    #: Bytes copied, from 0 to the request's length (COPY_FILE_RANGE and its 64-bit form).
    COPIED = "copied"
    #: A :class:`~afuse.wire.types.Statx`.
    STATX = "statx"
    #: Handled by the session itself (INIT, CUSE_INIT).
    SESSION = "session"
    #: Answered by a route of its own (:meth:`afuse.Dispatcher.register`), e.g. experimental opcodes.
    CUSTOM = "custom"


Decode = Callable[..., r.Request]
Encode = Callable[[Any], bytes]


@attrs.frozen
class OpSpec:
    """Everything about one opcode."""

    opcode: int
    #: The request class; several opcodes may share one (RENAME/RENAME2, SETLK/SETLKW, ...).
    request: type[r.Request]
    #: ``decode(decoder, head, body[, ext])`` -> request (see :mod:`.requests`).
    decode: Decode
    #: The body the kernel sends for a request (kernel side: fake kernel, tests); None: special.
    encode: Encode | None
    reply: Shape
    #: The :class:`afuse.Operations` method; None when the session handles the request itself.
    handler: str | None
    #: Not overriding ``handler`` runs :class:`afuse.Operations`'s default (else ENOSYS, no call).
    defaulted: bool = False
    #: Running it again for a resent request gives the answer the first attempt would have.
    idempotent: bool = True
    #: Changes state the kernel relies on (names, contents, lookup counts, open handles):
    #: a failover-capable filesystem must keep its effect (memfs journals these).
    stateful: bool = False
    #: May carry request extensions (FUSE_SECURITY_CTX, FUSE_EXT_GROUPS).
    extensions: bool = False
    #: INIT flags the kernel needs before it sends this; asked for only if ``handler`` exists.
    needs: InitFlag = _NO_FLAGS
    #: Lock requests with ``is_flock`` go to this handler instead, needing ``alt_needs``.
    alt_handler: str | None = None
    alt_needs: InitFlag = _NO_FLAGS
    #: Its reply may open a file in passthrough mode (FOpen.PASSTHROUGH with a backing id).
    backing: bool = False
    #: The protocol minor version that introduced it.
    since: int = 0

    @property
    def name(self) -> str:
        """The opcode's name without ``FUSE_``, e.g. ``LOOKUP``."""
        try:
            return Opcode(self.opcode).name
        except ValueError:
            return f"OPCODE_{self.opcode}"

    @property
    def replies(self) -> bool:
        """True if the request is answered."""
        return self.reply is not Shape.NONE


_L = InitFlag.POSIX_LOCKS


def _fsync(q: r.FsyncRequest) -> bytes:
    return S.FSYNC_IN.pack(q.fh, FSYNC_FDATASYNC if q.datasync else 0, 0)


def _rename(q: r.RenameRequest) -> bytes:
    head = S.RENAME2_IN.pack(q.newdir, q.flags, 0) if q.flags else S.RENAME_IN.pack(q.newdir)
    return head + _z(q.name) + _z(q.newname)


def _cfr(q: r.CopyFileRangeRequest) -> bytes:
    return S.COPY_FILE_RANGE_IN.pack(q.fh_in, q.off_in, q.nodeid_out, q.fh_out, q.off_out, q.length, q.flags)


def _statx(q: r.StatxRequest) -> bytes:
    flags = (q.getattr_flags | GETATTR_FH) if q.fh is not None else (q.getattr_flags & ~GETATTR_FH)
    return S.STATX_IN.pack(flags, 0, q.fh or 0, q.sx_flags, q.mask)


def _read(q: r.ReadRequest) -> bytes:
    return S.READ_IN.pack(q.fh, q.offset, q.size, q.read_flags, q.lock_owner, q.flags, 0)


def _write(q: r.WriteRequest) -> bytes:
    return S.WRITE_IN.pack(q.fh, q.offset, len(q.data), q.write_flags, q.lock_owner, q.flags, 0) + q.data


def _release(q: r.ReleaseRequest) -> bytes:
    return S.RELEASE_IN.pack(q.fh, q.flags, q.release_flags, q.lock_owner)


def _readdir(q: r.ReaddirRequest) -> bytes:
    return S.READ_IN.pack(q.fh, q.offset, q.size, 0, 0, 0, 0)


def _create(q: r.CreateRequest) -> bytes:
    return S.CREATE_IN.pack(q.flags, q.mode, q.umask, q.open_flags) + _z(q.name)


def _removemapping(q: r.RemovemappingRequest) -> bytes:
    return S.REMOVEMAPPING_IN.pack(len(q.mappings)) + b"".join(S.REMOVEMAPPING_ONE.pack(m, n) for m, n in q.mappings)


_T = OpSpec

#: The table.
OPCODES: tuple[OpSpec, ...] = (
    _T(_O.LOOKUP, r.LookupRequest, r._d_lookup, lambda q: _z(q.name), Shape.ENTRY, "lookup", stateful=True),
    _T(_O.FORGET, r.ForgetRequest, r._d_forget, None, Shape.NONE, "forget", idempotent=False, stateful=True,
       defaulted=True),
    _T(_O.GETATTR, r.GetattrRequest, r._d_getattr,
       lambda q: S.GETATTR_IN.pack(0 if q.fh is None else GETATTR_FH, 0, q.fh or 0), Shape.ATTR, "getattr"),
    _T(_O.SETATTR, r.SetattrRequest, r._d_setattr, r._e_setattr, Shape.ATTR, "setattr", stateful=True),
    _T(_O.READLINK, r.ReadlinkRequest, r._d_readlink, lambda q: b"", Shape.DATA, "readlink"),
    _T(_O.SYMLINK, r.SymlinkRequest, r._d_symlink, lambda q: _z(q.name) + _z(q.target), Shape.ENTRY, "symlink",
       idempotent=False, stateful=True, extensions=True),
    _T(_O.MKNOD, r.MknodRequest, r._d_mknod, lambda q: S.MKNOD_IN.pack(q.mode, q.rdev, q.umask, 0) + _z(q.name),
       Shape.ENTRY, "mknod", idempotent=False, stateful=True, extensions=True),
    _T(_O.MKDIR, r.MkdirRequest, r._d_mkdir, lambda q: S.MKDIR_IN.pack(q.mode, q.umask) + _z(q.name),
       Shape.ENTRY, "mkdir", idempotent=False, stateful=True, extensions=True),
    _T(_O.UNLINK, r.UnlinkRequest, r._d_unlink, lambda q: _z(q.name), Shape.EMPTY, "unlink",
       idempotent=False, stateful=True),
    _T(_O.RMDIR, r.RmdirRequest, r._d_rmdir, lambda q: _z(q.name), Shape.EMPTY, "rmdir",
       idempotent=False, stateful=True),
    _T(_O.RENAME, r.RenameRequest, r._d_rename, _rename, Shape.EMPTY, "rename", idempotent=False, stateful=True),
    _T(_O.LINK, r.LinkRequest, r._d_link, lambda q: S.LINK_IN.pack(q.oldnodeid) + _z(q.newname), Shape.ENTRY,
       "link", idempotent=False, stateful=True),
    _T(_O.OPEN, r.OpenRequest, r._d_open, lambda q: S.OPEN_IN.pack(q.flags, q.open_flags), Shape.OPEN, "open",
       stateful=True, backing=True),
    _T(_O.READ, r.ReadRequest, r._d_read, _read, Shape.READ, "read"),
    _T(_O.WRITE, r.WriteRequest, r._d_write, _write, Shape.WRITE, "write", stateful=True),
    _T(_O.STATFS, r.StatfsRequest, r._d_statfs, lambda q: b"", Shape.STATFS, "statfs", defaulted=True),
    _T(_O.RELEASE, r.ReleaseRequest, r._d_release, _release, Shape.EMPTY, "release", idempotent=False,
       stateful=True, defaulted=True),
    _T(_O.FSYNC, r.FsyncRequest, r._d_fsync, _fsync, Shape.EMPTY, "fsync"),
    _T(_O.SETXATTR, r.SetxattrRequest, r._d_setxattr, None, Shape.EMPTY, "setxattr", stateful=True),
    _T(_O.GETXATTR, r.GetxattrRequest, r._d_getxattr, lambda q: S.GETXATTR_IN.pack(q.size, 0) + _z(q.name),
       Shape.XATTR, "getxattr"),
    _T(_O.LISTXATTR, r.ListxattrRequest, r._d_listxattr, lambda q: S.GETXATTR_IN.pack(q.size, 0),
       Shape.XATTR_NAMES, "listxattr"),
    _T(_O.REMOVEXATTR, r.RemovexattrRequest, r._d_removexattr, lambda q: _z(q.name), Shape.EMPTY, "removexattr",
       stateful=True),
    _T(_O.FLUSH, r.FlushRequest, r._d_flush, lambda q: S.FLUSH_IN.pack(q.fh, 0, 0, q.lock_owner), Shape.EMPTY,
       "flush"),
    _T(_O.INIT, r.InitRequest, r._d_init, r._e_init, Shape.SESSION, None, idempotent=False),
    _T(_O.OPENDIR, r.OpendirRequest, r._d_opendir, lambda q: S.OPEN_IN.pack(q.flags, q.open_flags), Shape.OPEN,
       "opendir", stateful=True),
    _T(_O.READDIR, r.ReaddirRequest, r._d_readdir, _readdir, Shape.DIRENTS, "readdir"),
    _T(_O.RELEASEDIR, r.ReleasedirRequest, r._d_releasedir, _release, Shape.EMPTY, "releasedir",
       idempotent=False, stateful=True, defaulted=True),
    _T(_O.FSYNCDIR, r.FsyncdirRequest, r._d_fsyncdir, _fsync, Shape.EMPTY, "fsyncdir"),
    _T(_O.GETLK, r.GetlkRequest, r._d_getlk, r._e_lk, Shape.LOCK, "getlk", needs=_L),
    _T(_O.SETLK, r.SetlkRequest, r._d_setlk, r._e_lk, Shape.EMPTY, "setlk", needs=_L,
       alt_handler="flock", alt_needs=InitFlag.FLOCK_LOCKS),
    _T(_O.SETLKW, r.SetlkRequest, r._d_setlkw, r._e_lk, Shape.EMPTY, "setlk", needs=_L,
       alt_handler="flock", alt_needs=InitFlag.FLOCK_LOCKS),
    _T(_O.ACCESS, r.AccessRequest, r._d_access, lambda q: S.ACCESS_IN.pack(q.mask, 0), Shape.EMPTY, "access"),
    _T(_O.CREATE, r.CreateRequest, r._d_create, _create, Shape.CREATE, "create", idempotent=False,
       stateful=True, extensions=True, backing=True),
    _T(_O.INTERRUPT, r.InterruptRequest, r._d_interrupt, lambda q: S.INTERRUPT_IN.pack(q.target), Shape.NONE,
       None),
    _T(_O.BMAP, r.BmapRequest, r._d_bmap, lambda q: S.BMAP_IN.pack(q.block, q.blocksize, 0), Shape.U64, "bmap"),
    _T(_O.DESTROY, r.DestroyRequest, r._d_destroy, lambda q: b"", Shape.EMPTY, "destroy", idempotent=False,
       defaulted=True),
    _T(_O.IOCTL, r.IoctlRequest, r._d_ioctl, r._e_ioctl, Shape.IOCTL, "ioctl", idempotent=False, since=11),
    _T(_O.POLL, r.PollRequest, r._d_poll, lambda q: S.POLL_IN.pack(q.fh, q.kh, q.flags, q.events), Shape.POLL,
       "poll", since=11),
    _T(_O.NOTIFY_REPLY, r.NotifyReplyRequest, r._d_notify_reply, r._e_notify_reply, Shape.NONE, None, since=15),
    _T(_O.BATCH_FORGET, r.ForgetRequest, r._d_batch_forget, None, Shape.NONE, "forget", idempotent=False,
       stateful=True, defaulted=True, since=16),
    _T(_O.FALLOCATE, r.FallocateRequest, r._d_fallocate,
       lambda q: S.FALLOCATE_IN.pack(q.fh, q.offset, q.length, q.mode, 0), Shape.EMPTY, "fallocate",
       stateful=True, since=19),
    _T(_O.READDIRPLUS, r.ReaddirplusRequest, r._d_readdirplus, _readdir, Shape.DIRENTS, "readdirplus",
       stateful=True, needs=InitFlag.DO_READDIRPLUS | InitFlag.READDIRPLUS_AUTO, since=21),
    _T(_O.RENAME2, r.RenameRequest, r._d_rename2, _rename, Shape.EMPTY, "rename", idempotent=False,
       stateful=True, since=23),
    _T(_O.LSEEK, r.LseekRequest, r._d_lseek, lambda q: S.LSEEK_IN.pack(q.fh, q.offset, q.whence, 0), Shape.U64,
       "lseek", since=24),
    _T(_O.COPY_FILE_RANGE, r.CopyFileRangeRequest, r._d_cfr, _cfr, Shape.COPIED, "copy_file_range",
       stateful=True, since=28),
    _T(_O.SETUPMAPPING, r.SetupmappingRequest, r._d_setupmapping,
       lambda q: S.SETUPMAPPING_IN.pack(q.fh, q.foffset, q.length, q.flags, q.moffset), Shape.EMPTY, None,
       since=31),
    _T(_O.REMOVEMAPPING, r.RemovemappingRequest, r._d_removemapping, _removemapping, Shape.EMPTY, None,
       since=31),
    _T(_O.SYNCFS, r.SyncfsRequest, r._d_syncfs, lambda q: S.SYNCFS_IN.pack(0), Shape.EMPTY, "syncfs", since=34),
    _T(_O.TMPFILE, r.TmpfileRequest, r._d_tmpfile, _create, Shape.CREATE, "tmpfile", idempotent=False,
       stateful=True, extensions=True, backing=True, since=37),
    _T(_O.STATX, r.StatxRequest, r._d_statx, _statx, Shape.STATX, "statx", since=39),
    _T(_O.COPY_FILE_RANGE_64, r.CopyFileRangeRequest, r._d_cfr64, _cfr, Shape.COPIED, "copy_file_range",
       stateful=True, since=45),
    _T(_O.CUSE_INIT, r.CuseInitRequest, r._d_cuse_init,
       lambda q: S.CUSE_INIT_IN.pack(q.major, q.minor, 0, q.flags), Shape.SESSION, None, idempotent=False),
)

#: Records by opcode.
BY_OPCODE: dict[int, OpSpec] = {s.opcode: s for s in OPCODES}
#: Records by request class (the first opcode of a class that has several).
BY_CLASS: dict[type[r.Request], OpSpec] = {}
for _s in OPCODES:
    BY_CLASS.setdefault(_s.request, _s)
del _s

#: Opcodes that are never answered.
NO_REPLY: frozenset[int] = frozenset(s.opcode for s in OPCODES if not s.replies)
#: Every :class:`afuse.Operations` method that handles a request, in table order.
HANDLERS: tuple[str, ...] = tuple(dict.fromkeys(
    h for s in OPCODES for h in (s.handler, s.alt_handler) if h is not None))
#: Handlers of requests that change state a failover-capable filesystem must keep.
STATEFUL_HANDLERS: tuple[str, ...] = tuple(dict.fromkeys(
    s.handler for s in OPCODES if s.stateful and s.handler is not None))
