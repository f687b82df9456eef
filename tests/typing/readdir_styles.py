"""Directory listings written the ways a user would write them, checked by ``mypy --strict``.

CI runs ``mypy --strict`` on tests/, so each style below must type-check as an override of
:class:`afuse.Operations`; test_readdir_styles.py mounts every one and lists it. The last section
holds styles the framework cannot serve: mypy must reject them, and because ``--strict`` reports
an unneeded ``# type: ignore``, it fails if it ever stops rejecting one.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import AsyncIterator, Iterator

import afuse


class ListingFS(afuse.Operations):
    """A root directory of ``count`` empty files; the subclasses differ only in how they list it.

    Nodeid ``i + 2`` is file ``i``; entry cookies are "." 1, ".." 2 and nodeid + 1 for a file.
    Lookup counts are kept (READDIRPLUS counts an entry only when the kernel took it).
    """

    entry_timeout = 60.0
    attr_timeout = 60.0

    def __init__(self, count: int) -> None:
        self.root = afuse.Attr(ino=afuse.ROOT_ID, mode=stat.S_IFDIR | 0o755, nlink=2,
                               uid=os.getuid(), gid=os.getgid())
        self.files = {afuse.ROOT_ID + 1 + i: f"file-{i:04d}".encode() for i in range(count)}
        self.nodeids = {name: nodeid for nodeid, name in self.files.items()}
        self.lookups: dict[int, int] = {}
        self.lookup_requests = 0

    def attr(self, nodeid: int) -> afuse.Attr:
        if nodeid == afuse.ROOT_ID:
            return self.root
        if nodeid not in self.files:
            raise afuse.FUSEError(errno.ENOENT)
        return afuse.Attr(ino=nodeid, mode=stat.S_IFREG | 0o644, uid=os.getuid(), gid=os.getgid())

    def count_lookup(self, nodeid: int) -> afuse.Entry:
        """An Entry for ``nodeid``, counting the lookup it gives the kernel."""
        self.lookups[nodeid] = self.lookups.get(nodeid, 0) + 1
        return afuse.Entry(nodeid, self.attr(nodeid))

    async def lookup(self, req: afuse.LookupRequest) -> afuse.Entry:
        self.lookup_requests += 1
        if req.nodeid != afuse.ROOT_ID or req.name not in self.nodeids:
            raise afuse.FUSEError(errno.ENOENT)
        return self.count_lookup(self.nodeids[req.name])

    async def forget(self, req: afuse.ForgetRequest) -> None:
        for item in req.items:
            self.lookups[item.nodeid] -= item.nlookup

    async def getattr(self, req: afuse.GetattrRequest) -> afuse.Attr:
        return self.attr(req.nodeid)

    def entries(self, offset: int) -> Iterator[afuse.DirEntry]:
        """READDIR entries after cookie ``offset``, lazily."""
        if offset < 1:
            yield afuse.DirEntry(b".", 1, self.root)
        if offset < 2:
            yield afuse.DirEntry(b"..", 2, self.root)
        for nodeid in sorted(self.files):
            if nodeid + 1 > offset:
                yield afuse.DirEntry(self.files[nodeid], nodeid + 1, self.attr(nodeid))

    def plus_entries(self, offset: int) -> Iterator[afuse.DirEntry]:
        """READDIRPLUS entries after cookie ``offset``; a file's lookup is counted once it was taken."""
        for d in self.entries(offset):
            if d.name in (b".", b".."):
                yield afuse.DirEntry(d.name, d.offset, entry=afuse.Entry(0, self.root))
                continue
            nodeid = self.nodeids[d.name]
            yield afuse.DirEntry(d.name, d.offset, entry=afuse.Entry(nodeid, self.attr(nodeid)))
            self.lookups[nodeid] = self.lookups.get(nodeid, 0) + 1  # runs only if it was taken


class AsyncGeneratorFS(ListingFS):
    """``async def`` with ``yield``: the form of the tutorial."""

    async def readdir(self, req: afuse.ReaddirRequest) -> AsyncIterator[afuse.DirEntry]:
        for d in self.entries(req.offset):
            yield d

    async def readdirplus(self, req: afuse.ReaddirplusRequest) -> AsyncIterator[afuse.DirEntry]:
        for d in self.plus_entries(req.offset):
            yield d


class CoroutineFS(ListingFS):
    """``async def`` returning an iterable: a (lazy) generator, or a whole list."""

    async def readdir(self, req: afuse.ReaddirRequest) -> list[afuse.DirEntry]:
        return list(self.entries(req.offset))  # more than fits: the framework takes what does

    async def readdirplus(self, req: afuse.ReaddirplusRequest) -> afuse.DirEntries:
        return self.plus_entries(req.offset)  # not a list: a list would count untaken entries


class CoroutineOfAsyncIterableFS(ListingFS):
    """``async def`` returning an async iterable (here an async generator made elsewhere)."""

    async def readdir(self, req: afuse.ReaddirRequest) -> afuse.DirEntries:
        return self._aiter(self.entries(req.offset))

    async def readdirplus(self, req: afuse.ReaddirplusRequest) -> afuse.DirEntries:
        return self._aiter(self.plus_entries(req.offset))

    @staticmethod
    async def _aiter(entries: Iterator[afuse.DirEntry]) -> AsyncIterator[afuse.DirEntry]:
        for d in entries:
            yield d


STYLES: list[type[ListingFS]] = [AsyncGeneratorFS, CoroutineFS, CoroutineOfAsyncIterableFS]


# -- rejected: the framework would fail on these at run time (mypy must say so) -----------------


class SyncListFS(ListingFS):
    """A plain ``def``: the framework awaits what readdir returns, and a list is not awaitable."""

    def readdir(self, req: afuse.ReaddirRequest) -> list[afuse.DirEntry]:  # type: ignore[override]
        return list(self.entries(req.offset))


class SyncGeneratorFS(ListingFS):
    """A plain generator function, not an ``async def``: same problem."""

    def readdir(self, req: afuse.ReaddirRequest) -> Iterator[afuse.DirEntry]:  # type: ignore[override]
        yield from self.entries(req.offset)


class NamesNotEntriesFS(ListingFS):
    """Names instead of :class:`afuse.DirEntry` objects."""

    async def readdir(self, req: afuse.ReaddirRequest) -> list[bytes]:  # type: ignore[override]
        return list(self.files.values())


class AsyncGeneratorOfNamesFS(ListingFS):
    """The same mistake as an async generator."""

    async def readdirplus(self, req: afuse.ReaddirplusRequest) -> AsyncIterator[bytes]:  # type: ignore[override]
        for name in self.files.values():
            yield name
