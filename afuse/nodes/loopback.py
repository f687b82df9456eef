"""A loopback node: a directory tree of the host, served node by node (dynamic lookup).

Each :class:`LoopbackNode` holds an ``O_PATH`` descriptor of its file, closed when the kernel
forgets it; its key is ``(st_dev, st_ino)``, so hard links are one node. Open files are
:class:`~afuse.nodes.FDHandle`: passthrough when negotiated, else served with pread/pwrite.
Every caller acts with the daemon's credentials (mount with ``default_permissions`` for the
kernel to check permissions); files are created owned by the daemon, or by the caller when the
daemon runs as root.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import time
from collections.abc import Iterator

from ..errors import FUSEError
from ..wire import requests as r
from ..wire.constants import FOpen
from ..wire.types import Attr, FsStats
from .bridge import NodeFS
from .caller import current_caller
from .node import DirItem, FDHandle, FileHandle, Node

__all__ = ["LoopbackNode", "loopback"]

_PATH = os.O_PATH | os.O_NOFOLLOW
_libc = ctypes.CDLL(None, use_errno=True)


class LoopbackNode(Node):
    """A file, directory or symlink of the host, by ``O_PATH`` descriptor ``fd``.

    ``fopen`` lets the kernel cache directory listings (it drops them when the directory's
    mtime changes); set it to 0 in a subclass to list afresh on every open.
    """

    fopen: FOpen | int = FOpen.CACHE_DIR | FOpen.KEEP_CACHE

    def __init__(self, fd: int, st: os.stat_result) -> None:
        super().__init__(st.st_mode, key=(st.st_dev, st.st_ino), ino=st.st_ino)
        self.fd = fd

    @classmethod
    def root(cls, path: str) -> LoopbackNode:
        """The node of directory ``path``."""
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY)
        return cls(fd, os.fstat(fd))

    @property
    def proc(self) -> str:
        """A path naming this very file (``/proc/self/fd/N``)."""
        return f"/proc/self/fd/{self.fd}"

    def forgotten(self) -> None:
        """Close the descriptor."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _child(self, name: bytes) -> Node:
        st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        if self._bridge is not None:
            live = self._bridge.node_by_key((st.st_dev, st.st_ino))
            if live is not None:
                return live
        fd = os.open(name, _PATH, dir_fd=self.fd)
        return type(self)(fd, os.fstat(fd))

    def _own(self, name: bytes) -> None:
        c = current_caller()
        if os.geteuid() == 0 and (c.uid, c.gid) != (0, 0):
            os.chown(name, c.uid, c.gid, dir_fd=self.fd, follow_symlinks=False)

    # -- attributes --------------------------------------------------------------------------------

    async def getattr(self) -> Attr:
        """fstat of the descriptor."""
        return Attr.from_stat(os.stat(self.fd))

    async def setattr(self, changes: r.SetattrRequest) -> Attr:
        """chmod, chown, truncate, utimes through ``/proc/self/fd``."""
        if stat.S_ISLNK(self.mode):
            raise FUSEError(errno.EOPNOTSUPP)
        if changes.mode is not None:
            os.chmod(self.proc, stat.S_IMODE(changes.mode))
        if changes.new_uid is not None or changes.new_gid is not None:
            os.chown(self.proc, -1 if changes.new_uid is None else changes.new_uid,
                     -1 if changes.new_gid is None else changes.new_gid)
        if changes.size is not None:
            os.truncate(self.proc, changes.size)
        if changes.atime_now or changes.mtime_now or changes.atime_ns is not None or changes.mtime_ns is not None:
            st, now = os.stat(self.fd), time.time_ns()
            atime = now if changes.atime_now else st.st_atime_ns if changes.atime_ns is None else changes.atime_ns
            mtime = now if changes.mtime_now else st.st_mtime_ns if changes.mtime_ns is None else changes.mtime_ns
            os.utime(self.proc, ns=(atime, mtime))
        return Attr.from_stat(os.stat(self.fd))

    async def readlink(self) -> bytes:
        """The symlink's target."""
        return os.readlink(b"", dir_fd=self.fd)

    async def statfs(self) -> FsStats:
        """statvfs of the host filesystem."""
        return FsStats.from_statvfs(os.statvfs(self.fd))

    async def getxattr(self, name: bytes) -> bytes:
        """An extended attribute."""
        return os.getxattr(self.proc, name)

    async def setxattr(self, name: bytes, value: bytes, flags: int) -> None:
        """Set an extended attribute."""
        os.setxattr(self.proc, name, value, flags)

    async def listxattr(self) -> list[bytes]:
        """Extended attribute names."""
        return [os.fsencode(n) for n in os.listxattr(self.proc)]

    async def removexattr(self, name: bytes) -> None:
        """Remove an extended attribute."""
        os.removexattr(self.proc, name)

    # -- directories -----------------------------------------------------------------------------

    async def lookup(self, name: bytes) -> Node | None:
        """The child ``name`` (the live node if the kernel knows the file already)."""
        return self._child(name)

    async def readdir(self) -> Iterator[DirItem]:
        """The host directory's entries."""
        dfd = os.open(".", os.O_RDONLY | os.O_DIRECTORY, dir_fd=self.fd)
        try:
            with os.scandir(dfd) as it:
                items = []
                for e in it:
                    if e.is_symlink():
                        mode = stat.S_IFLNK
                    elif e.is_dir(follow_symlinks=False):
                        mode = stat.S_IFDIR
                    elif e.is_file(follow_symlinks=False):
                        mode = stat.S_IFREG
                    else:
                        mode = e.stat(follow_symlinks=False).st_mode
                    items.append(DirItem(os.fsencode(e.name), stat.S_IFMT(mode), e.inode()))
        finally:
            os.close(dfd)
        return iter(items)

    async def create(self, name: bytes, flags: int, mode: int) -> tuple[Node, FileHandle]:
        """Create and open a regular file."""
        fd = os.open(name, (flags | os.O_CREAT) & ~os.O_APPEND, stat.S_IMODE(mode), dir_fd=self.fd)
        try:
            self._own(name)
            return self._child(name), FDHandle(fd)
        except BaseException:
            os.close(fd)
            raise

    async def mkdir(self, name: bytes, mode: int) -> Node:
        """A new directory."""
        os.mkdir(name, stat.S_IMODE(mode), dir_fd=self.fd)
        self._own(name)
        return self._child(name)

    async def mknod(self, name: bytes, mode: int, rdev: int) -> Node:
        """A new file, fifo, socket or device node."""
        os.mknod(name, mode, rdev, dir_fd=self.fd)
        self._own(name)
        return self._child(name)

    async def symlink(self, name: bytes, target: bytes) -> Node:
        """A new symlink."""
        os.symlink(target, name, dir_fd=self.fd)
        self._own(name)
        return self._child(name)

    async def link(self, name: bytes, node: Node) -> Node:
        """A hard link to ``node`` (a LoopbackNode)."""
        if not isinstance(node, LoopbackNode):
            raise FUSEError(errno.EXDEV)
        os.link(node.proc, name, dst_dir_fd=self.fd, follow_symlinks=True)
        return node

    async def unlink(self, name: bytes) -> None:
        """Remove a name."""
        os.unlink(name, dir_fd=self.fd)

    async def rmdir(self, name: bytes) -> None:
        """Remove an empty directory."""
        os.rmdir(name, dir_fd=self.fd)

    async def rename(self, name: bytes, newparent: Node, newname: bytes, flags: int) -> None:
        """rename(2), or renameat2(2) with ``flags``."""
        if not isinstance(newparent, LoopbackNode):
            raise FUSEError(errno.EXDEV)
        if not flags:
            os.rename(name, newname, src_dir_fd=self.fd, dst_dir_fd=newparent.fd)
        elif _libc.renameat2(self.fd, name, newparent.fd, newname, flags) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))

    # -- files -------------------------------------------------------------------------------------

    async def open(self, flags: int) -> FileHandle:
        """Open the file again, read-write as asked, through ``/proc/self/fd`` (without O_APPEND:
        the kernel sends every write's offset, and pwrite(2) would ignore it)."""
        return FDHandle(os.open(self.proc, flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_APPEND)))


def loopback(path: str) -> NodeFS:
    """A filesystem mirroring directory ``path`` (a factory for ``afuse.testing`` and benchmarks)."""
    return NodeFS(LoopbackNode.root(path), types=[FDHandle])
