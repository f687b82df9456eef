"""Values a filesystem returns from its handlers; the wire layer encodes them."""

from __future__ import annotations

import stat as _stat
from collections.abc import AsyncIterable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from .constants import FOpen

if TYPE_CHECKING:
    import os


@attrs.define(slots=True)
class Attr:
    """Attributes of an inode (``struct fuse_attr``). Times are integer nanoseconds.

    ``timeout`` is how long the kernel may cache these attributes, in seconds;
    None uses the filesystem's :attr:`Operations.attr_timeout`.
    """

    ino: int = 0
    mode: int = 0
    nlink: int = 1
    uid: int = 0
    gid: int = 0
    rdev: int = 0
    size: int = 0
    blocks: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    blksize: int = 0
    flags: int = 0
    timeout: float | None = None

    @classmethod
    def from_stat(cls, st: os.stat_result, ino: int | None = None) -> Attr:
        """Build from :func:`os.stat` output; ``ino`` replaces ``st_ino`` when given."""
        return cls(
            st.st_ino if ino is None else ino, st.st_mode, st.st_nlink, st.st_uid, st.st_gid,
            st.st_rdev, st.st_size, st.st_blocks, st.st_atime_ns, st.st_mtime_ns,
            st.st_ctime_ns, st.st_blksize,
        )

    @property
    def type(self) -> int:
        """The file type bits (``mode & S_IFMT``)."""
        return _stat.S_IFMT(self.mode)


@attrs.define(slots=True)
class Entry:
    """A directory entry reply (``struct fuse_entry_out``).

    ``nodeid`` 0 is a negative entry: the kernel caches the name's absence for ``entry_timeout``.
    Each reply with a non-zero nodeid adds one to the kernel's lookup count of it.
    ``entry_timeout`` None uses :attr:`Operations.entry_timeout`; the attribute timeout is
    ``attr.timeout``.
    """

    nodeid: int
    attr: Attr
    generation: int = 0
    entry_timeout: float | None = None


@attrs.define(slots=True)
class Handle:
    """The reply to OPEN, OPENDIR and the open half of CREATE/TMPFILE (``fuse_open_out``).

    ``fh`` is echoed back in every request on this open file. ``flags`` are FOPEN_* bits.
    ``backing_id`` names a passthrough backing file (with ``FOpen.PASSTHROUGH``).
    """

    fh: int = 0
    flags: FOpen | int = 0
    backing_id: int = 0


@attrs.define(slots=True)
class FsStats:
    """Filesystem statistics (``struct fuse_kstatfs``), as :func:`os.statvfs` reports them."""

    blocks: int = 0
    bfree: int = 0
    bavail: int = 0
    files: int = 0
    ffree: int = 0
    bsize: int = 4096
    namelen: int = 255
    frsize: int = 4096

    @classmethod
    def from_statvfs(cls, st: os.statvfs_result) -> FsStats:
        """Build from :func:`os.statvfs` output."""
        return cls(st.f_blocks, st.f_bfree, st.f_bavail, st.f_files, st.f_ffree, st.f_bsize,
                   st.f_namemax, st.f_frsize)


@attrs.define(slots=True)
class Lock:
    """A POSIX record lock (``struct fuse_file_lock``); ``end`` is inclusive, ``type`` F_RDLCK/F_WRLCK/F_UNLCK."""

    start: int
    end: int
    type: int
    pid: int = 0


@attrs.define(slots=True)
class Timestamp:
    """A statx timestamp."""

    sec: int = 0
    nsec: int = 0


@attrs.define(slots=True)
class Statx:
    """Extended attributes of an inode (``struct fuse_statx``); ``mask`` says which are valid.

    ``timeout`` as in :class:`Attr`.
    """

    mask: int = 0
    blksize: int = 0
    attributes: int = 0
    nlink: int = 0
    uid: int = 0
    gid: int = 0
    mode: int = 0
    ino: int = 0
    size: int = 0
    blocks: int = 0
    attributes_mask: int = 0
    atime: Timestamp = attrs.field(factory=Timestamp)
    btime: Timestamp = attrs.field(factory=Timestamp)
    ctime: Timestamp = attrs.field(factory=Timestamp)
    mtime: Timestamp = attrs.field(factory=Timestamp)
    rdev_major: int = 0
    rdev_minor: int = 0
    dev_major: int = 0
    dev_minor: int = 0
    timeout: float | None = None


@attrs.define(slots=True)
class DirEntry:
    """One directory entry for READDIR/READDIRPLUS.

    ``offset`` is the cookie of the *next* entry: the kernel passes it back to continue after this
    one; it must never be 0. For READDIR only ``attr.ino`` and the file type of ``attr.mode`` are
    sent; READDIRPLUS sends the whole ``entry`` (which then counts as one lookup unless its
    nodeid is 0). ``entry`` may be given for READDIR too and is then used for ino and type.
    """

    name: bytes
    offset: int
    attr: Attr | None = None
    entry: Entry | None = None


#: A READDIR entry without an object: ``(name, offset, ino, mode)`` (only the file type bits of
#: ``mode`` are sent); not for READDIRPLUS.
PlainDirEntry = tuple[bytes, int, int, int]

@attrs.frozen(slots=True)
class DirSlice:
    """A READDIR answered from a listing kept as a list: the entries ``items[start:]``, item ``i``
    at offset ``i + 1``, taken until the kernel's buffer is full. Each item is a tuple that begins
    ``(name, mode, ino)`` (more fields are ignored; only the type bits of ``mode`` are sent, and
    ino 0 is sent as 0xFFFFFFFF). Offsets are positions: right for a snapshot taken at offset 0,
    not for a list that changes between READDIRs. Not for READDIRPLUS."""

    items: Sequence[tuple[Any, ...]]
    start: int


#: A directory listing as ``readdir`` returns it: an iterable (list, generator), an async
#: iterable, or (READDIR) a :class:`DirSlice`.
DirEntries = Iterable[DirEntry | PlainDirEntry] | AsyncIterable[DirEntry | PlainDirEntry] | DirSlice


@attrs.define(slots=True)
class IoctlReply:
    """The reply to IOCTL: ``result`` is ioctl(2)'s return value, ``data`` the bytes copied out.

    For unrestricted ioctls (CUSE), a reply with ``in_iovs``/``out_iovs`` set asks the kernel to
    retry with those user memory ranges, as (address, length) pairs.
    """

    result: int = 0
    data: bytes = b""
    in_iovs: list[tuple[int, int]] | None = None
    out_iovs: list[tuple[int, int]] | None = None
