"""The filesystem of docs/tutorial.md, built from nodes.

``/notes`` holds read-write files in memory, ``/squares/N`` is a file for every number N
(looked up on demand), ``/now`` is the current time, and ``/README`` is a fixed text.
Run it with ``python docs/examples/tutorialfs.py MOUNTPOINT [--debug] [-o OPTIONS]``.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import stat
import time
from collections.abc import Iterator

import afuse
from afuse import Attr, FOpen
from afuse.nodes import Dir, DirItem, Node, NodeFS, current_caller


class Note(Node):
    """A regular file whose bytes live in memory."""

    def __init__(self, mode: int = 0o644) -> None:
        super().__init__(stat.S_IFREG | (mode & 0o7777))
        caller = current_caller()  # who created it owns it
        now = time.time_ns()
        self.attr = Attr(mode=self.mode, nlink=1, uid=caller.uid, gid=caller.gid,
                         atime_ns=now, mtime_ns=now, ctime_ns=now)
        self.data = bytearray()

    async def getattr(self) -> Attr:
        self.attr.size = len(self.data)
        return self.attr  # ino 0: the bridge fills in the nodeid

    async def open(self, flags: int) -> None:
        if flags & os.O_TRUNC:
            self.truncate(0)
        # None: no file handle object; reads and writes come to this node.

    async def read(self, offset: int, size: int) -> bytes:
        return bytes(self.data[offset:offset + size])

    async def write(self, offset: int, data: bytes) -> int:
        if offset > len(self.data):
            self.data.extend(bytes(offset - len(self.data)))
        self.data[offset:offset + len(data)] = data
        self.attr.mtime_ns = self.attr.ctime_ns = time.time_ns()
        return len(data)

    def truncate(self, size: int) -> None:
        del self.data[size:]
        self.data.extend(bytes(size - len(self.data)))
        self.attr.mtime_ns = self.attr.ctime_ns = time.time_ns()

    async def setattr(self, changes: afuse.SetattrRequest) -> Attr:
        if changes.size is not None:
            self.truncate(changes.size)
        if changes.mode is not None:
            self.attr.mode = stat.S_IFREG | (changes.mode & 0o7777)
        if changes.mtime_ns is not None or changes.mtime_now:
            self.attr.mtime_ns = time.time_ns() if changes.mtime_now else changes.mtime_ns or 0
        return await self.getattr()


class Notes(Dir):
    """A directory of notes: the bridge keeps its children; these methods say yes or no."""

    async def create(self, name: bytes, flags: int, mode: int) -> Node:
        if not name.endswith(b".txt"):
            raise afuse.FUSEError(errno.EPERM)  # notes only
        return Note(mode)

    async def unlink(self, name: bytes) -> None:
        pass  # allowed: the bridge removes the child

    async def rename(self, name: bytes, newparent: Node, newname: bytes, flags: int) -> None:
        if newparent is not self or not newname.endswith(b".txt"):
            raise afuse.FUSEError(errno.EPERM)


class Square(Node):
    """The file ``/squares/N``: N squared, as text."""

    def __init__(self, n: int) -> None:
        super().__init__(stat.S_IFREG | 0o444, key=("square", n))
        self.text = f"{n * n}\n".encode()

    async def getattr(self) -> Attr:
        return Attr(mode=self.mode, nlink=1, size=len(self.text))

    async def read(self, offset: int, size: int) -> bytes:
        return self.text[offset:offset + size]


class Squares(Node):
    """A directory answering lookups itself: every number has a file, none is stored."""

    def __init__(self) -> None:
        super().__init__(stat.S_IFDIR | 0o555)

    async def lookup(self, name: bytes) -> Node | None:
        if not name.isdigit() or len(name) > 6:
            return None  # ENOENT
        return Square(int(name))

    async def readdir(self) -> Iterator[DirItem]:
        return (DirItem(str(n).encode(), stat.S_IFREG) for n in range(1, 11))  # lists 1..10


class Now(Node):
    """The current time; read anew at every open (direct I/O: no page cache)."""

    fopen = FOpen.DIRECT_IO

    def __init__(self) -> None:
        super().__init__(stat.S_IFREG | 0o444)

    async def read(self, offset: int, size: int) -> bytes:
        return time.strftime("%Y-%m-%d %H:%M:%S\n").encode()[offset:offset + size]


def make_root() -> Dir:
    """The tree: fixed text, a notes directory, the squares, the clock."""
    return Dir({
        "README": "Notes go in notes/, squares are in squares/, and now tells the time.\n",
        "notes": Notes(),
        "squares": Squares(),
        "now": Now(),
    })


def make_fs() -> NodeFS:
    """The filesystem: the tree, and the classes that appear in it only later."""
    return NodeFS(make_root(), types=[Note, Square])


def main() -> None:
    parser = argparse.ArgumentParser(prog="tutorialfs", description="The tutorial's filesystem.")
    parser.add_argument("mountpoint")
    parser.add_argument("-o", dest="options", action="append", default=[], help="mount options")
    parser.add_argument("--debug", action="store_true", help="log every request")
    args = parser.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    afuse.run(make_fs(), args.mountpoint, options=",".join(args.options))


if __name__ == "__main__":
    main()
