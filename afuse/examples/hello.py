"""One read-only file: ``python -m afuse.examples.hello MOUNTPOINT``."""

from __future__ import annotations

import errno
import stat
import sys
import time
from collections.abc import Iterator, Sequence

from afuse.errors import FUSEError
from afuse.operations import Operations
from afuse.wire import requests as r
from afuse.wire.constants import ROOT_ID
from afuse.wire.types import Attr, DirEntry, Entry, Handle

from ._cli import make_parser, run_example

NAME = b"hello"
DATA = b"Hello, world!\n"
FILE_ID = 2


class HelloFS(Operations):
    """A root directory holding one file, ``hello``."""

    def __init__(self) -> None:
        now = time.time_ns()
        self._root = Attr(ino=ROOT_ID, mode=stat.S_IFDIR | 0o755, nlink=2,
                          atime_ns=now, mtime_ns=now, ctime_ns=now)
        self._file = Attr(ino=FILE_ID, mode=stat.S_IFREG | 0o444, nlink=1, size=len(DATA),
                          atime_ns=now, mtime_ns=now, ctime_ns=now)

    def _attr(self, nodeid: int) -> Attr:
        if nodeid == ROOT_ID:
            return self._root
        if nodeid == FILE_ID:
            return self._file
        raise FUSEError(errno.ENOENT)

    async def getattr(self, req: r.GetattrRequest) -> Attr:
        return self._attr(req.nodeid)

    async def lookup(self, req: r.LookupRequest) -> Entry:
        if req.nodeid != ROOT_ID or req.name != NAME:
            raise FUSEError(errno.ENOENT)
        return Entry(FILE_ID, self._file)

    async def opendir(self, req: r.OpendirRequest) -> Handle:
        if req.nodeid != ROOT_ID:
            raise FUSEError(errno.ENOTDIR)
        return Handle()

    async def readdir(self, req: r.ReaddirRequest) -> Iterator[DirEntry]:
        entries = [DirEntry(b".", 1, self._root), DirEntry(b"..", 2, self._root),
                   DirEntry(NAME, 3, self._file)]
        return iter(entries[req.offset:])

    async def open(self, req: r.OpenRequest) -> Handle:
        if req.nodeid != FILE_ID:
            raise FUSEError(errno.EISDIR if req.nodeid == ROOT_ID else errno.ENOENT)
        if req.flags & 3 != 0:  # O_WRONLY or O_RDWR
            raise FUSEError(errno.EACCES)
        return Handle()

    async def read(self, req: r.ReadRequest) -> bytes:
        return DATA[req.offset : req.offset + req.size]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    args = make_parser("Mount a filesystem holding one read-only file.",
                       prog="python -m afuse.examples.hello").parse_args(argv)
    return run_example(HelloFS(), args)


if __name__ == "__main__":
    sys.exit(main())
