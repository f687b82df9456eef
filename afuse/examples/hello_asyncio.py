"""One read-only file, served from asyncio: ``python -m afuse.examples.hello_asyncio MOUNTPOINT``.

The same filesystem as :mod:`afuse.examples.hello`, its handlers asyncio coroutines run by
:func:`afuse.asyncio.run`. Ctrl-C (exit status 130), SIGTERM, SIGHUP or an unmount stop it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import stat
import sys
import time
from collections.abc import AsyncIterator, Sequence

import afuse.asyncio
from afuse.device import MountOptions
from afuse.errors import FUSEError, MountError
from afuse.operations import Operations
from afuse.uring import UringUnavailable
from afuse.wire import requests as r
from afuse.wire.constants import ROOT_ID
from afuse.wire.types import Attr, DirEntry, Entry, Handle

from ._cli import io_uring_choice, make_parser

NAME = b"hello"
DATA = b"Hello, world!\n"
FILE_ID = 2


class HelloAsyncioFS(Operations):
    """A root directory holding one file, ``hello``; every handler runs as an asyncio task."""

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

    async def readdir(self, req: r.ReaddirRequest) -> AsyncIterator[DirEntry]:
        entries = [DirEntry(b".", 1, self._root), DirEntry(b"..", 2, self._root),
                   DirEntry(NAME, 3, self._file)]
        for entry in entries[req.offset:]:
            yield entry

    async def open(self, req: r.OpenRequest) -> Handle:
        if req.nodeid != FILE_ID:
            raise FUSEError(errno.EISDIR if req.nodeid == ROOT_ID else errno.ENOENT)
        if req.flags & 3 != 0:  # O_WRONLY or O_RDWR
            raise FUSEError(errno.EACCES)
        return Handle()

    async def read(self, req: r.ReadRequest) -> bytes:
        await asyncio.sleep(0)  # any asyncio code may run here: clients, streams, timeouts
        return DATA[req.offset : req.offset + req.size]


async def serve_until_unmounted(mountpoint: str) -> None:
    """Serve hello on ``mountpoint`` from a running asyncio loop until it is unmounted from outside."""
    async with afuse.asyncio.mount(HelloAsyncioFS(), mountpoint) as fs:
        await fs.wait_closed()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: 0 when stopped by SIGTERM, SIGHUP or an unmount, 130 on Ctrl-C."""
    parser = make_parser("Mount a filesystem holding one read-only file, served from asyncio.")
    parser.prog = "python -m afuse.examples.hello_asyncio"
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        options = MountOptions.parse(",".join(args.options))
    except (MountError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        stopped_by = afuse.asyncio.run(HelloAsyncioFS(), args.mountpoint, options=options,
                                       io_uring=io_uring_choice(args))
    except (MountError, UringUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 128 + signal.SIGINT if stopped_by == signal.SIGINT else 0


if __name__ == "__main__":
    sys.exit(main())
