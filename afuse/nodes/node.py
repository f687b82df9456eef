"""Nodes (inodes as Python objects) and file handles (open files as Python objects).

A :class:`Node` subclass implements only the async methods for what it supports; the bridge
(:class:`afuse.nodes.NodeFS`) finds them by name. The methods a node may define, with the
arguments the bridge passes (``name``/``target`` are bytes, ``mode`` includes the file type):

=====================================  =======================================================
``lookup(name) -> Node | None``        a child not kept in :attr:`Node.children` (dynamic)
``getattr() -> Attr``                  attributes (``ino`` 0: the bridge fills it in)
``setattr(changes) -> Attr``           ``changes`` is the :class:`afuse.SetattrRequest`
``readdir() -> iterable of DirItem``   a listing not kept in :attr:`Node.children`; or an async
                                       iterator of DirItem (or of lists of them, batches as they
                                       arrive): the kernel is answered as the listing arrives
``open(flags) -> FileHandle | None``   None: no handle, I/O goes to the node's own methods
``create(name, flags, mode)``          ``-> Node`` or ``(Node, FileHandle | None)``
``mkdir(name, mode) -> Node``          also ``mknod(name, mode, rdev)``, ``symlink(name, target)``
``link(name, node) -> Node``           a hard link to ``node`` (return it)
``unlink(name)``, ``rmdir(name)``      allow (return) or refuse (raise) a removal
``rename(name, newparent, newname, flags)``
``readlink() -> bytes``                a symlink's target
``getxattr(name) -> bytes``            also ``setxattr(name, value, flags)``, ``listxattr()``,
                                       ``removexattr(name)``
``statfs() -> FsStats``                ``access(mask)``
``forgotten()`` (not async)            the bridge dropped the node: the kernel forgot it and it
                                       is not in the persistent tree, or it duplicated (by key)
                                       a live node and was never used (close what it holds)
=====================================  =======================================================

File I/O methods live on the :class:`FileHandle` returned by ``open``/``create``, or on the node
when there is no handle (or the handle lacks them): ``read(offset, size) -> bytes``,
``write(offset, data) -> int``, ``flush()``, ``fsync(datasync)``, ``release()`` (handles only),
``setattr(changes)`` (ftruncate, fchmod, ...), ``fallocate(offset, length, mode)``,
``lseek(offset, whence) -> int``, ``copy_file_range(offset, out_handle, out_offset, length, flags)
-> int``, and ``getlk(req)``, ``setlk(req)``, ``flock(req)``, ``ioctl(req)``, ``poll(req)`` with
the raw request.

Raise :class:`afuse.FUSEError` (or OSError) to answer an errno.
"""

from __future__ import annotations

import bisect
import os
import stat
from collections.abc import Hashable, Iterable
from typing import TYPE_CHECKING, NamedTuple

from ..wire.constants import FOpen

if TYPE_CHECKING:
    from ..operations import Operations
    from ..passthrough import BackingFile
    from .bridge import NodeFS

__all__ = ["DirItem", "FDHandle", "FileHandle", "Node"]


def _check_name(name: bytes) -> None:
    if not isinstance(name, bytes) or not name or b"/" in name or b"\0" in name or name in (b".", b".."):
        raise ValueError(f"invalid directory entry name {name!r}")


class DirItem(NamedTuple):
    """One entry of a dynamic listing (:meth:`readdir`): name, file type bits, inode number (0: unknown).

    A named tuple: listings make one per entry, and a tuple costs a third of a class instance."""

    name: bytes
    mode: int
    ino: int = 0


class _Cookies:
    """Stable directory offsets of a persistent directory: each name gets the next cookie when it
    joins, and keeps it while it stays (a removal does not move later entries, an insertion
    appends), so an offset means the same entry in every open of the directory."""

    __slots__ = ("by_name", "names", "next", "offsets", "stale")

    #: Cookies 1 and 2 are "." and "..".
    FIRST = 3

    def __init__(self, names: Iterable[bytes]) -> None:
        self.by_name: dict[bytes, int] = {}
        self.offsets: list[int] = []  # ascending, with the names in ``names``; stale ones skipped
        self.names: list[bytes] = []
        self.next = self.FIRST
        self.stale = 0
        for name in names:
            self.add(name)

    @classmethod
    def restored(cls, next_cookie: int, pairs: Iterable[tuple[bytes, int]]) -> _Cookies:
        """Cookies as saved (``(name, cookie)`` pairs and the next cookie): a successor answers
        offsets the kernel got from its predecessor."""
        ck = cls(())
        for name, c in sorted(pairs, key=lambda p: p[1]):
            ck.by_name[name] = c
            ck.offsets.append(c)
            ck.names.append(name)
        ck.next = max(next_cookie, (ck.offsets[-1] + 1) if ck.offsets else cls.FIRST)
        return ck

    def add(self, name: bytes) -> None:
        if name not in self.by_name:
            c = self.by_name[name] = self.next
            self.next += 1
            self.offsets.append(c)
            self.names.append(name)

    def remove(self, name: bytes) -> None:
        if self.by_name.pop(name, None) is not None:
            self.stale += 1
            if self.stale > 64 and 2 * self.stale > len(self.offsets):
                keep = [(c, n) for c, n in zip(self.offsets, self.names, strict=True) if self.by_name.get(n) == c]
                self.offsets, self.names = [c for c, _ in keep], [n for _, n in keep]
                self.stale = 0

    def sync(self, children: dict[bytes, Node]) -> None:
        """Catch up with changes made to ``children`` directly (not through add/remove_child)."""
        if len(self.by_name) != len(children) or any(n not in children for n in self.by_name):
            for name in [n for n in self.by_name if n not in children]:
                self.remove(name)
            for name in children:
                self.add(name)

    def after(self, offset: int) -> tuple[int, bytes] | None:
        """The first live entry (cookie, name) with a cookie above ``offset``."""
        i = bisect.bisect_right(self.offsets, offset)
        offsets, names, by_name = self.offsets, self.names, self.by_name
        while i < len(offsets):
            c, name = offsets[i], names[i]
            if by_name.get(name) == c:
                return c, name
            i += 1
        return None


class Node:
    """An inode. ``mode``'s file type is fixed for the node's life; ``key``, if not None, is a
    stable identity (e.g. ``(st_dev, st_ino)``): the bridge gives all live nodes with one key
    one nodeid. ``ino`` is the inode number reported when ``getattr`` leaves it 0 (0: the nodeid).

    A directory whose class has no ``lookup`` method has :attr:`children` (a dict, see
    :meth:`add_child`): it is a persistent directory: the
    bridge answers lookups and listings from it and updates it after successful creates,
    links, unlinks, rmdirs and renames.
    """

    __slots__ = ("__dict__", "_backing", "_bridge", "_cookies", "_links", "_lookups", "_nodeid", "children",
                 "ino", "key", "mode")

    def __init__(self, mode: int = stat.S_IFREG | 0o644, *, key: Hashable | None = None, ino: int = 0) -> None:
        fmt = mode & 0o170000  # stat.S_IFMT(mode), without a call: nodes are made on every create
        if not fmt:
            raise ValueError(f"mode {mode:#o} has no file type (S_IFREG, S_IFDIR, ...)")
        self.mode = mode
        self.key = key
        self.ino = ino
        #: Children by name (persistent directory), or None.
        self.children: dict[bytes, Node] | None = (
            {} if fmt == stat.S_IFDIR and not hasattr(type(self), "lookup") else None)
        self._nodeid = 0
        self._lookups = 0
        self._links = 0
        self._bridge: NodeFS | None = None
        self._backing: BackingFile | None = None
        #: Directory offsets of the persistent children, kept from the start: they then depend only
        #: on the children's history, which a journal replays alike (a successor answers the
        #: offsets its predecessor gave the kernel).
        self._cookies: _Cookies | None = _Cookies(()) if self.children is not None else None

    def as_operations(self) -> Operations:
        """A :class:`~afuse.nodes.NodeFS` with this node as its root, so ``afuse.mount(node, path)`` works."""
        from .bridge import NodeFS

        return NodeFS(self)

    # -- state -----------------------------------------------------------------------------------

    @property
    def is_dir(self) -> bool:
        """True for a directory."""
        return stat.S_ISDIR(self.mode)

    @property
    def nodeid(self) -> int:
        """The kernel's id of this node (0 until the bridge has given it one)."""
        return self._nodeid

    @property
    def lookups(self) -> int:
        """How many lookups of this node the kernel holds (the bridge's count)."""
        return self._lookups

    @property
    def known(self) -> bool:
        """True while the kernel may refer to this node (the root, or a positive lookup count)."""
        b = self._bridge
        return b is not None and (self._lookups > 0 or self is b.root)

    # -- the persistent tree ---------------------------------------------------------------------

    def add_child(self, name: bytes, child: Node) -> None:
        """Keep ``child`` as ``name`` (replacing what was there). Does not notify the kernel."""
        _check_name(name)
        if not isinstance(child, Node):
            raise TypeError(f"a child must be a Node, not {type(child).__name__}")
        if self.children is None:
            raise ValueError("add_child on a node that is not a directory")
        old = self.children.get(name)
        if old is child:
            return
        self.children[name] = child
        if self._cookies is not None:
            self._cookies.add(name)
        child._links += 1
        if self._bridge is not None:
            self._bridge._attach(child)
        if old is not None:
            self._unlinked(old)

    def remove_child(self, name: bytes) -> Node:
        """Drop child ``name`` (KeyError if absent) and return it. Does not notify the kernel."""
        if self.children is None:
            raise KeyError(name)
        child = self.children.pop(name)
        if self._cookies is not None:
            self._cookies.remove(name)
        self._unlinked(child)
        return child

    def _unlinked(self, child: Node) -> None:
        child._links -= 1
        if self._bridge is not None and child._links <= 0:
            self._bridge._detached(child)

    # -- notifications (no-ops while the kernel does not know the node) ------------------------

    async def notify_content(self, offset: int = 0, length: int = 0) -> None:
        """The data changed from ``offset`` for ``length`` bytes (0: to the end): drop cached pages
        and attributes."""
        if self.known:
            assert self._bridge is not None
            await self._bridge._notify_inode(self, offset, length)

    async def notify_attr(self) -> None:
        """The attributes changed: drop the kernel's cached attributes."""
        if self.known:
            assert self._bridge is not None
            await self._bridge._notify_inode(self, -1, 0)

    async def notify_entry(self, name: bytes) -> None:
        """Child ``name`` appeared, vanished or changed: drop the kernel's cached lookup of it."""
        if self.known:
            assert self._bridge is not None
            await self._bridge._notify_entry(self, name)

    async def notify_delete(self, name: bytes, child: Node) -> None:
        """``child`` is gone as ``name``: the kernel drops the entry (and unhashes open files' dentry)."""
        if self.known:
            assert self._bridge is not None
            if not child.known:
                await self._bridge._notify_entry(self, name)
            else:
                await self._bridge._notify_delete(self, name, child)

    async def notify_store(self, offset: int, data: bytes) -> None:
        """Put ``data`` into the kernel's page cache of this file at ``offset``."""
        if self.known:
            assert self._bridge is not None
            await self._bridge._notify_store(self, offset, data)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} nodeid={self._nodeid} mode={self.mode:#o} lookups={self._lookups}>"


class FileHandle:
    """An open file. ``fopen`` are the FOPEN flags to answer; ``backing_fd``, if not None, is a
    file descriptor of the same content: the bridge hands it to the kernel for passthrough when
    negotiated, else serves reads/writes/fsync with it where the handle lacks those methods."""

    fopen: FOpen | int = 0
    backing_fd: int | None = None


class FDHandle(FileHandle):
    """A handle over an open file descriptor, closed at release (a loopback file)."""

    def __init__(self, fd: int, fopen: FOpen | int = 0) -> None:
        self.backing_fd = fd
        self.fopen = fopen

    async def release(self) -> None:
        """Close the descriptor."""
        if self.backing_fd is not None:
            fd, self.backing_fd = self.backing_fd, None
            os.close(fd)
