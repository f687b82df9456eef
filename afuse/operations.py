"""The :class:`Operations` base class: one async method per FUSE operation.

Subclass it and override what the filesystem supports. Every handler is an ``async def`` (readdir
and readdirplus may also be async generators) that takes the decoded request
(see :mod:`afuse.wire.requests`) and returns a value or raises :class:`afuse.FUSEError`
(an :class:`OSError` answers its errno; any other exception answers EIO and is logged).
An operation that is not overridden answers ENOSYS without calling anything, which for many
operations tells the kernel never to send it again (see the operations reference in docs/).
"""

from __future__ import annotations

import errno
from collections.abc import AsyncIterable, Awaitable, Iterable
from typing import TYPE_CHECKING, NoReturn, Protocol, runtime_checkable

from .errors import FUSEError
from .splice import FileRange
from .wire import requests as r
from .wire.types import Attr, DirEntries, DirEntry, Entry, FsStats, Handle, IoctlReply, Lock, Statx

if TYPE_CHECKING:
    from .wire.init import Negotiated

__all__ = ["DirEntries", "DirListing", "Mountable", "Operations", "overridden"]

#: What calling ``readdir`` gives: an async iterable (``async def`` with ``yield``), or an
#: awaitable of :data:`DirEntries` (``async def`` with ``return``).
DirListing = AsyncIterable[DirEntry] | Awaitable[DirEntries]


def _enosys() -> FUSEError:
    return FUSEError(errno.ENOSYS)


async def _answer_enosys() -> NoReturn:
    raise _enosys()


class Operations:
    """Base class of a filesystem. Class attributes set the default cache timeouts (seconds)."""

    #: How long the kernel may cache a name lookup when an :class:`Entry` does not say.
    entry_timeout: float = 1.0
    #: How long the kernel may cache attributes when an :class:`Attr` does not say.
    attr_timeout: float = 1.0

    def init(self, negotiated: Negotiated) -> None:
        """Called once INIT is negotiated, before any other request is served."""

    async def destroy(self, req: r.DestroyRequest) -> None:
        """The filesystem is being unmounted (only fuseblk mounts get this)."""

    async def lookup(self, req: r.LookupRequest) -> Entry:
        """Look up ``req.name`` in directory ``req.nodeid``; a non-zero nodeid counts one lookup."""
        raise _enosys()

    async def forget(self, req: r.ForgetRequest) -> None:
        """Drop lookup counts (FORGET and BATCH_FORGET). No reply is sent; errors are logged."""

    async def getattr(self, req: r.GetattrRequest) -> Attr:
        """Attributes of ``req.nodeid``."""
        raise _enosys()

    async def setattr(self, req: r.SetattrRequest) -> Attr:
        """Change the attributes that are not None; return the new attributes."""
        raise _enosys()

    async def readlink(self, req: r.ReadlinkRequest) -> bytes:
        """The target of symlink ``req.nodeid``."""
        raise _enosys()

    async def symlink(self, req: r.SymlinkRequest) -> Entry:
        """Create a symlink; counts one lookup."""
        raise _enosys()

    async def mknod(self, req: r.MknodRequest) -> Entry:
        """Create a file node (regular, fifo, socket, device); counts one lookup."""
        raise _enosys()

    async def mkdir(self, req: r.MkdirRequest) -> Entry:
        """Create a directory; counts one lookup."""
        raise _enosys()

    async def unlink(self, req: r.UnlinkRequest) -> None:
        """Remove a name (the inode lives on while it is open or looked up)."""
        raise _enosys()

    async def rmdir(self, req: r.RmdirRequest) -> None:
        """Remove an empty directory."""
        raise _enosys()

    async def rename(self, req: r.RenameRequest) -> None:
        """Rename, honouring ``req.flags`` (NOREPLACE, EXCHANGE, WHITEOUT); EINVAL for unsupported flags."""
        raise _enosys()

    async def link(self, req: r.LinkRequest) -> Entry:
        """Create a hard link to ``req.oldnodeid``; counts one lookup."""
        raise _enosys()

    async def open(self, req: r.OpenRequest) -> Handle:
        """Open a file. Not overriding it lets the kernel open without asking (fh 0)."""
        raise _enosys()

    async def read(self, req: r.ReadRequest) -> bytes | FileRange:
        """Read at most ``req.size`` bytes; fewer means end of file. A
        :class:`~afuse.splice.FileRange` of an open file is spliced into the reply (no copy in Python)."""
        raise _enosys()

    async def write(self, req: r.WriteRequest) -> int:
        """Write ``req.data``; return the number of bytes written."""
        raise _enosys()

    async def flush(self, req: r.FlushRequest) -> None:
        """A descriptor of the open file was closed."""
        raise _enosys()

    async def release(self, req: r.ReleaseRequest) -> None:
        """The last reference to the open file is gone. Not overriding it answers success."""

    async def fsync(self, req: r.FsyncRequest) -> None:
        """Flush file data (and metadata unless ``req.datasync``) to stable storage."""
        raise _enosys()

    async def opendir(self, req: r.OpendirRequest) -> Handle:
        """Open a directory. Not overriding it lets the kernel open directories without asking."""
        raise _enosys()

    def readdir(self, req: r.ReaddirRequest) -> DirListing:
        """Entries after cookie ``req.offset``, as an iterable or async iterable of :class:`DirEntry`.

        Override it with either ``async def readdir(self, req) -> AsyncIterator[DirEntry]`` that
        yields entries, or ``async def readdir(self, req) -> DirEntries`` that returns them.
        The framework stops consuming when the reply is full; a generator is then closed at its
        ``yield``. Yield lazily: producing more than fits wastes work.
        """
        return _answer_enosys()

    def readdirplus(self, req: r.ReaddirplusRequest) -> DirListing:
        """As :meth:`readdir`, each entry with ``entry`` set.

        Every entry that reaches the kernel (except "." and ".." and nodeid 0) counts one lookup.
        With a generator, count after the ``yield``: code after a yield runs only when the entry
        was taken. From a list, every entry is taken only if the whole list fits, so prefer a
        generator. Not overriding it disables READDIRPLUS.
        """
        return _answer_enosys()

    async def releasedir(self, req: r.ReleasedirRequest) -> None:
        """The last reference to the open directory is gone. Not overriding it answers success."""

    async def fsyncdir(self, req: r.FsyncdirRequest) -> None:
        """fsync of a directory."""
        raise _enosys()

    async def statfs(self, req: r.StatfsRequest) -> FsStats:
        """Filesystem statistics. Not overriding it answers zero counts."""
        return FsStats(bsize=512, frsize=512)

    async def setxattr(self, req: r.SetxattrRequest) -> None:
        """Set an extended attribute."""
        raise _enosys()

    async def getxattr(self, req: r.GetxattrRequest) -> bytes:
        """The value of an extended attribute (ENODATA if absent); size checks are the framework's."""
        raise _enosys()

    async def listxattr(self, req: r.ListxattrRequest) -> Iterable[bytes]:
        """Names of the extended attributes; size checks are the framework's."""
        raise _enosys()

    async def removexattr(self, req: r.RemovexattrRequest) -> None:
        """Remove an extended attribute (ENODATA if absent)."""
        raise _enosys()

    async def access(self, req: r.AccessRequest) -> None:
        """Check access; raise EACCES to deny. Not overriding it allows everything."""
        raise _enosys()

    async def create(self, req: r.CreateRequest) -> tuple[Entry, Handle]:
        """Create and open a regular file; counts one lookup."""
        raise _enosys()

    async def tmpfile(self, req: r.TmpfileRequest) -> tuple[Entry, Handle]:
        """Create and open an unnamed file (O_TMPFILE); counts one lookup."""
        raise _enosys()

    async def getlk(self, req: r.GetlkRequest) -> Lock:
        """A lock that conflicts with ``req.lock``, or one of type F_UNLCK."""
        raise _enosys()

    async def setlk(self, req: r.SetlkRequest) -> None:
        """Take or drop a POSIX lock; wait when ``req.sleep`` (EAGAIN otherwise on conflict)."""
        raise _enosys()

    async def flock(self, req: r.SetlkRequest) -> None:
        """Take or drop a flock(2) lock; wait when ``req.sleep`` (EWOULDBLOCK otherwise)."""
        raise _enosys()

    async def bmap(self, req: r.BmapRequest) -> int:
        """The device block of file block ``req.block`` (fuseblk only)."""
        raise _enosys()

    async def ioctl(self, req: r.IoctlRequest) -> IoctlReply:
        """An ioctl; unknown commands should raise ENOTTY."""
        raise _enosys()

    async def poll(self, req: r.PollRequest) -> int:
        """The ready events of ``req.fh``; keep ``req.kh`` to wake pollers later."""
        raise _enosys()

    async def fallocate(self, req: r.FallocateRequest) -> None:
        """Allocate or punch space (``req.mode`` is FALLOC_FL_* bits)."""
        raise _enosys()

    async def lseek(self, req: r.LseekRequest) -> int:
        """SEEK_DATA / SEEK_HOLE: the resulting offset (ENXIO past the end)."""
        raise _enosys()

    async def copy_file_range(self, req: r.CopyFileRangeRequest) -> int:
        """Copy a range between two open files; return the bytes copied."""
        raise _enosys()

    async def statx(self, req: r.StatxRequest) -> Statx:
        """Extended attributes (e.g. btime); the kernel falls back to getattr when not overridden."""
        raise _enosys()

    async def syncfs(self, req: r.SyncfsRequest) -> None:
        """syncfs(2) of the whole filesystem (the kernel sends it to fuseblk mounts)."""
        raise _enosys()


@runtime_checkable
class Mountable(Protocol):
    """Anything that can be served by giving its :class:`Operations` (e.g. an :class:`afuse.Node`)."""

    def as_operations(self) -> Operations:
        """The low-level filesystem that serves this object."""
        ...


def as_operations(fs: Operations | Mountable) -> Operations:
    """``fs`` itself, or the :class:`Operations` a :class:`Mountable` gives; TypeError otherwise."""
    if isinstance(fs, Operations):
        return fs
    make = getattr(fs, "as_operations", None)
    if make is None:
        raise TypeError(f"cannot mount a {type(fs).__name__}: pass an afuse.Operations or an afuse.Node")
    ops = make()
    if not isinstance(ops, Operations):
        raise TypeError(f"{type(fs).__name__}.as_operations() returned {type(ops).__name__}, not an Operations")
    return ops


def overridden(ops: Operations, name: str) -> bool:
    """True if ``ops`` implements operation ``name`` itself."""
    return getattr(type(ops), name, None) is not getattr(Operations, name)
