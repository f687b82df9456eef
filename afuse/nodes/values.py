"""Ready-made nodes: from plain values (bytes, dict, a link target) and in memory, read-write."""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Mapping
from typing import TypeAlias

from ..errors import FUSEError
from ..wire import requests as r
from ..wire.types import Attr
from .caller import current_caller
from .node import Node

__all__ = ["Dir", "MemDir", "MemFile", "StaticFile", "Symlink", "Tree", "node_from"]

#: What :func:`node_from` accepts: a node, bytes or str (a file), a dict (a directory).
Tree: TypeAlias = "Node | bytes | str | Mapping[bytes | str, Tree]"


def _name(name: bytes | str) -> bytes:
    return name.encode() if isinstance(name, str) else name


def node_from(value: Tree) -> Node:
    """A node from a plain value: bytes or str -> :class:`StaticFile`, dict -> :class:`Dir`."""
    if isinstance(value, Node):
        return value
    if isinstance(value, (bytes, str)):
        return StaticFile(value)
    if isinstance(value, Mapping):
        return Dir(value)
    raise TypeError(f"cannot make a node from {type(value).__name__} (want Node, bytes, str or dict)")


class _Attrs(Node):
    """A node keeping its attributes in an :class:`Attr` (owner: the creating caller)."""

    def __init__(self, mode: int, uid: int | None = None, gid: int | None = None) -> None:
        super().__init__(mode)
        now = time.time_ns()
        caller = current_caller()
        self.attr = Attr(mode=mode, nlink=1, uid=caller.uid if uid is None else uid,
                         gid=caller.gid if gid is None else gid, atime_ns=now, mtime_ns=now, ctime_ns=now)

    async def getattr(self) -> Attr:
        """The stored attributes (``ino``: the nodeid once there is one)."""
        if not self.attr.ino:
            self.attr.ino = self.ino or self.nodeid
        return self.attr

    def touch(self, mtime: bool = True) -> None:
        """Set ctime (and mtime) to now."""
        now = time.time_ns()
        self.attr.ctime_ns = now
        if mtime:
            self.attr.mtime_ns = now


class StaticFile(_Attrs):
    """A read-only file holding ``data``."""

    def __init__(self, data: bytes | str, mode: int = 0o444) -> None:
        super().__init__(stat.S_IFREG | (mode & 0o7777))
        self.data = data.encode() if isinstance(data, str) else bytes(data)
        self.attr.size = len(self.data)

    async def read(self, offset: int, size: int) -> bytes:
        """Bytes at ``offset``."""
        return self.data[offset:offset + size]


class Symlink(_Attrs):
    """A symbolic link to ``target``."""

    def __init__(self, target: bytes | str) -> None:
        super().__init__(stat.S_IFLNK | 0o777)
        self.target = _name(target)
        self.attr.size = len(self.target)

    async def readlink(self) -> bytes:
        """The target."""
        return self.target


class Dir(_Attrs):
    """A directory whose children are kept by the framework, built from ``entries``
    (``{"name": b"data" or {...} or a Node}``); read-only unless its class allows changes."""

    def __init__(self, entries: Mapping[bytes | str, Tree] | None = None, mode: int = 0o755) -> None:
        super().__init__(stat.S_IFDIR | (mode & 0o7777))
        for name, value in (entries or {}).items():
            self.add_child(_name(name), self.node_from(value))

    @classmethod
    def node_from(cls, value: Tree) -> Node:
        """A child from a plain value (:func:`node_from`)."""
        return node_from(value)

    async def getattr(self) -> Attr:
        """Attributes; nlink counts the subdirectories."""
        assert self.children is not None
        self.attr.nlink = 2 + sum(1 for c in self.children.values() if c.is_dir)
        return await super().getattr()


def _setattr(node: _Attrs, ch: r.SetattrRequest) -> Attr:
    a = node.attr
    now = time.time_ns()
    if ch.mode is not None:
        a.mode = stat.S_IFMT(a.mode) | (ch.mode & 0o7777)
    if ch.new_uid is not None:
        a.uid = ch.new_uid
    if ch.new_gid is not None:
        a.gid = ch.new_gid
    if ch.size is not None:
        if not isinstance(node, MemFile):
            raise FUSEError(errno.EISDIR if node.is_dir else errno.EINVAL)
        node.truncate(ch.size)
    if ch.atime_now or ch.atime_ns is not None:
        a.atime_ns = now if ch.atime_now else ch.atime_ns or 0
    if ch.mtime_now or ch.mtime_ns is not None:
        a.mtime_ns = now if ch.mtime_now else ch.mtime_ns or 0
    a.ctime_ns = ch.ctime_ns if ch.ctime_ns is not None else now
    return a


class MemFile(_Attrs):
    """A read-write regular file in memory."""

    def __init__(self, data: bytes = b"", mode: int = stat.S_IFREG | 0o644) -> None:
        super().__init__(stat.S_IFMT(mode) or stat.S_IFREG | (mode & 0o7777))
        self.attr.mode = self.mode = (stat.S_IFMT(mode) or stat.S_IFREG) | (mode & 0o7777)
        self.data = bytearray(data)
        self.attr.size = len(self.data)

    def truncate(self, size: int) -> None:
        """Cut or zero-extend to ``size`` bytes."""
        if size < len(self.data):
            del self.data[size:]
        else:
            self.data.extend(bytes(size - len(self.data)))
        self.attr.size = size
        self.touch()

    async def open(self, flags: int) -> None:
        """Open without a handle (I/O comes here); O_TRUNC empties the file."""
        if flags & os.O_TRUNC and self.data:
            self.truncate(0)

    async def read(self, offset: int, size: int) -> bytes:
        """Bytes at ``offset``."""
        return bytes(self.data[offset:offset + size])

    async def write(self, offset: int, data: bytes) -> int:
        """Write ``data`` at ``offset`` (zero-filling a gap)."""
        end = offset + len(data)
        if offset > len(self.data):
            self.data.extend(bytes(offset - len(self.data)))
        self.data[offset:end] = data
        self.attr.size = len(self.data)
        self.touch()
        return len(data)

    async def setattr(self, changes: r.SetattrRequest) -> Attr:
        """chmod, chown, truncate, utimes."""
        return _setattr(self, changes)


class _MemSymlink(Symlink):
    async def setattr(self, changes: r.SetattrRequest) -> Attr:
        return _setattr(self, changes)


class MemDir(Dir):
    """A read-write directory in memory: creates :class:`MemFile`, :class:`MemDir` and symlinks;
    the framework keeps the tree (nlink and times are kept here). From plain values, bytes and
    str make :class:`MemFile` and dicts :class:`MemDir`."""

    @classmethod
    def node_from(cls, value: Tree) -> Node:
        """A read-write child from a plain value."""
        if isinstance(value, (bytes, str)):
            return MemFile(value.encode() if isinstance(value, str) else value)
        if isinstance(value, Mapping):
            return MemDir(value)
        return node_from(value)

    async def setattr(self, changes: r.SetattrRequest) -> Attr:
        """chmod, chown, utimes."""
        return _setattr(self, changes)

    def _gid(self) -> int | None:
        return self.attr.gid if self.attr.mode & stat.S_ISGID else None

    async def create(self, name: bytes, flags: int, mode: int) -> Node:
        """A new empty file."""
        f = MemFile(mode=mode)
        gid = self._gid()
        if gid is not None:
            f.attr.gid = gid
        self.touch()
        return f

    async def mknod(self, name: bytes, mode: int, rdev: int) -> Node:
        """A regular file, fifo or socket (no device nodes)."""
        if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
            raise FUSEError(errno.EPERM)
        return await self.create(name, 0, mode)

    async def mkdir(self, name: bytes, mode: int) -> Node:
        """A new empty directory (setgid directories pass on their group and the bit)."""
        d = MemDir(mode=mode)
        gid = self._gid()
        if gid is not None:
            d.attr.gid = gid
            d.attr.mode |= stat.S_ISGID
        self.touch()
        return d

    async def symlink(self, name: bytes, target: bytes) -> Node:
        """A new symlink."""
        self.touch()
        return _MemSymlink(target)

    async def link(self, name: bytes, node: Node) -> Node:
        """Another name for ``node``."""
        if isinstance(node, _Attrs):
            node.attr.nlink += 1
            node.touch(mtime=False)
        self.touch()
        return node

    def _gone(self, name: bytes) -> None:
        assert self.children is not None
        child = self.children[name]
        if isinstance(child, _Attrs) and not child.is_dir:
            child.attr.nlink -= 1
            child.touch(mtime=False)
        self.touch()

    async def unlink(self, name: bytes) -> None:
        """Allow removing a file."""
        self._gone(name)

    async def rmdir(self, name: bytes) -> None:
        """Allow removing an empty directory."""
        self.touch()

    async def rename(self, name: bytes, newparent: Node, newname: bytes, flags: int) -> None:
        """Allow moves within the tree (times and link counts follow)."""
        if flags & ~3:
            raise FUSEError(errno.EINVAL)
        assert newparent.children is not None
        target = newparent.children.get(newname)
        if target is not None and not flags & 2 and isinstance(newparent, MemDir):
            newparent._gone(newname)
        self.touch()
        if isinstance(newparent, _Attrs):
            newparent.touch()
