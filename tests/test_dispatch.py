"""The dispatcher without a kernel: requests through the wire, handlers, replies back through the wire."""

from __future__ import annotations

import errno
import logging
import stat
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import attrs
import pytest
from fakekernel import FakeKernel

import afuse.wire.requests as r
from afuse.errors import FUSEError
from afuse.operations import Operations
from afuse.wire import kernel as k
from afuse.wire.constants import LK_FLOCK, InitFlag
from afuse.wire.init import InitConfig
from afuse.wire.types import (
    Attr,
    DirEntries,
    DirEntry,
    DirSlice,
    Entry,
    FsStats,
    Handle,
    IoctlReply,
    Lock,
    Statx,
    Timestamp,
)

pytestmark = pytest.mark.trio

FILE = Attr(ino=2, mode=stat.S_IFREG | 0o644, nlink=1, size=5)
DIR = Attr(ino=1, mode=stat.S_IFDIR | 0o755, nlink=2)


class Empty(Operations):
    """Overrides nothing."""


# -- unimplemented operations ----------------------------------------------------------------------

ENOSYS_CALLS: list[tuple[type[r.Request], dict[str, Any]]] = [
    (r.LookupRequest, {"name": b"x"}),
    (r.GetattrRequest, {"fh": None}),
    (r.ReadlinkRequest, {}),
    (r.MkdirRequest, {"name": b"d", "mode": 0o755}),
    (r.UnlinkRequest, {"name": b"x"}),
    (r.RenameRequest, {"name": b"a", "newdir": 1, "newname": b"b", "flags": 0}),
    (r.OpenRequest, {"flags": 0, "open_flags": 0}),
    (r.OpendirRequest, {"flags": 0, "open_flags": 0}),
    (r.ReadRequest, {"fh": 0, "offset": 0, "size": 10, "read_flags": 0, "lock_owner": 0, "flags": 0}),
    (r.WriteRequest, {"fh": 0, "offset": 0, "data": b"x", "write_flags": 0, "lock_owner": 0, "flags": 0}),
    (r.FlushRequest, {"fh": 0, "lock_owner": 0}),
    (r.FsyncRequest, {"fh": 0, "datasync": False}),
    (r.SetxattrRequest, {"name": b"user.a", "value": b"v", "flags": 0, "setxattr_flags": 0}),
    (r.GetxattrRequest, {"name": b"user.a", "size": 0}),
    (r.ListxattrRequest, {"size": 0}),
    (r.ReaddirRequest, {"fh": 0, "offset": 0, "size": 4096}),
    (r.ReaddirplusRequest, {"fh": 0, "offset": 0, "size": 4096}),
    (r.GetlkRequest, {"fh": 0, "owner": 1, "lock": Lock(0, 1, 1), "lk_flags": 0}),
    (r.SetlkRequest, {"fh": 0, "owner": 1, "lock": Lock(0, 1, 1), "lk_flags": 0, "sleep": False}),
    (r.SetlkRequest, {"fh": 0, "owner": 1, "lock": Lock(0, 1, 1), "lk_flags": LK_FLOCK, "sleep": True}),
    (r.AccessRequest, {"mask": 4}),
    (r.CreateRequest, {"name": b"f", "mode": 0o100644}),
    (r.TmpfileRequest, {"name": b"/", "mode": 0o100600}),
    (r.BmapRequest, {"block": 1, "blocksize": 512}),
    (r.IoctlRequest, {"fh": 0, "flags": 0, "cmd": 0x5401, "arg": 0, "in_size": 0, "out_size": 0, "in_data": b""}),
    (r.PollRequest, {"fh": 0, "kh": 1, "flags": 0, "events": 1}),
    (r.FallocateRequest, {"fh": 0, "offset": 0, "length": 1, "mode": 0}),
    (r.LseekRequest, {"fh": 0, "offset": 0, "whence": 3}),
    (r.CopyFileRangeRequest, {"fh_in": 0, "off_in": 0, "nodeid_out": 2, "fh_out": 0, "off_out": 0, "length": 1,
                              "flags": 0, "wide": True}),
    (r.StatxRequest, {"fh": None, "getattr_flags": 0, "sx_flags": 0, "mask": 0xFFF}),
    (r.SyncfsRequest, {}),
    (r.InitRequest, {"major": 7, "minor": 45, "max_readahead": 0, "flags": InitFlag(0)}),  # the session's job
    (r.InterruptRequest, {"target": 4}),
]


@pytest.mark.parametrize(("cls", "fields"), ENOSYS_CALLS, ids=lambda x: x.__name__ if isinstance(x, type) else None)
async def test_unimplemented_is_enosys(cls: type[r.Request], fields: dict[str, Any]) -> None:
    fk = FakeKernel(Empty())
    assert await fk.errno(cls, **fields) == errno.ENOSYS
    assert fk.dispatcher.errors == []


async def test_release_and_destroy_default_to_success() -> None:
    fk = FakeKernel(Empty())
    fields = {"fh": 1, "flags": 0, "release_flags": 0, "lock_owner": 0}
    assert (await fk.call(r.ReleaseRequest, 2, **fields)).ok() == b""
    assert (await fk.call(r.ReleasedirRequest, 1, **fields)).ok() == b""
    assert (await fk.call(r.DestroyRequest, 0)).ok() == b""


async def test_statfs_default() -> None:
    fk = FakeKernel(Empty())
    assert await fk.ok(k.decode_statfs, r.StatfsRequest) == FsStats(bsize=512, frsize=512)


async def test_forget_has_no_reply_and_errors_are_kept(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[r.ForgetRequest] = []

    class FS(Operations):
        async def forget(self, req: r.ForgetRequest) -> None:
            seen.append(req)
            if len(req.items) > 1:
                raise RuntimeError("forget failed")

    fk = FakeKernel(FS())
    await fk.dispatcher.forget(fk.make(r.ForgetRequest, 5, items=[r.ForgetItem(5, 2)]))
    with caplog.at_level(logging.ERROR, logger="afuse"):
        await fk.dispatcher.forget(fk.make(r.ForgetRequest, 0, items=[r.ForgetItem(5, 1), r.ForgetItem(6, 1)]))
    assert [len(q.items) for q in seen] == [1, 2]
    assert isinstance(fk.dispatcher.errors[0], RuntimeError)
    assert "forget handler failed" in caplog.text


# -- errors ----------------------------------------------------------------------------------------


class Raising(Operations):
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    async def getattr(self, req: r.GetattrRequest) -> Attr:
        raise self.exc


@pytest.mark.parametrize(("exc", "code"), [
    (FUSEError(errno.ENOENT), errno.ENOENT),
    (FUSEError(errno.EACCES, "no"), errno.EACCES),
    (FileNotFoundError(errno.ENOENT, "gone"), errno.ENOENT),
    (PermissionError(errno.EPERM, "no"), errno.EPERM),
    (OSError(errno.EROFS, "ro"), errno.EROFS),
    (OSError("no errno"), errno.EIO),
])
async def test_expected_errors(exc: BaseException, code: int) -> None:
    fk = FakeKernel(Raising(exc))
    assert await fk.errno(r.GetattrRequest, fh=None) == code
    assert fk.dispatcher.errors == []


async def test_unexpected_exception_is_eio_and_recorded(caplog: pytest.LogCaptureFixture) -> None:
    boom = ZeroDivisionError("boom")
    fk = FakeKernel(Raising(boom))
    with caplog.at_level(logging.ERROR, logger="afuse"):
        assert await fk.errno(r.GetattrRequest, 7, fh=None) == errno.EIO
    assert fk.dispatcher.errors == [boom]
    assert "GETATTR" in caplog.text and "ZeroDivisionError: boom" in caplog.text
    # The dispatcher keeps serving.
    assert await fk.errno(r.GetattrRequest, 7, fh=None) == errno.EIO
    assert len(fk.dispatcher.errors) == 2


class Wrong(Operations):
    """Every handler returns something of the wrong type."""

    async def lookup(self, req: r.LookupRequest) -> Any:
        return FILE

    async def getattr(self, req: r.GetattrRequest) -> Any:
        return Entry(2, FILE)

    async def readlink(self, req: r.ReadlinkRequest) -> Any:
        return "target"

    async def open(self, req: r.OpenRequest) -> Any:
        return 3

    async def create(self, req: r.CreateRequest) -> Any:
        return Entry(2, FILE)

    async def statfs(self, req: r.StatfsRequest) -> Any:
        return {"blocks": 1}

    async def read(self, req: r.ReadRequest) -> Any:
        return "text"

    async def getlk(self, req: r.GetlkRequest) -> Any:
        return None

    async def bmap(self, req: r.BmapRequest) -> Any:
        return -1

    async def poll(self, req: r.PollRequest) -> Any:
        return 1.5

    async def statx(self, req: r.StatxRequest) -> Any:
        return FILE

    async def ioctl(self, req: r.IoctlRequest) -> Any:
        return b"data"


@pytest.mark.parametrize(("cls", "fields", "message"), [
    (r.LookupRequest, {"name": b"x"}, "lookup must return an Entry, not Attr"),
    (r.GetattrRequest, {"fh": None}, "getattr must return Attr, not Entry"),
    (r.ReadlinkRequest, {}, "readlink must return bytes, not str"),
    (r.OpenRequest, {"flags": 0, "open_flags": 0}, "open must return a Handle, not int"),
    (r.CreateRequest, {"name": b"f"}, "create must return (Entry, Handle)"),
    (r.StatfsRequest, {}, "statfs must return FsStats, not dict"),
    (r.ReadRequest, {"fh": 0, "offset": 0, "size": 10, "read_flags": 0, "lock_owner": 0, "flags": 0},
     "read must return bytes, not str"),
    (r.GetlkRequest, {"fh": 0, "owner": 1, "lock": Lock(0, 1, 1), "lk_flags": 0}, "getlk must return Lock"),
    (r.BmapRequest, {"block": 1, "blocksize": 512}, "bmap returned -1"),
    (r.PollRequest, {"fh": 0, "kh": 1, "flags": 0, "events": 1}, "poll must return int, not float"),
    (r.StatxRequest, {"fh": None, "getattr_flags": 0, "sx_flags": 0, "mask": 0}, "statx must return Statx"),
    (r.IoctlRequest, {"fh": 0, "flags": 0, "cmd": 1, "arg": 0, "in_size": 0, "out_size": 0, "in_data": b""},
     "ioctl must return IoctlReply, not bytes"),
], ids=lambda x: x.__name__ if isinstance(x, type) else None)
async def test_wrong_result_type_is_eio_with_a_clear_message(
    cls: type[r.Request], fields: dict[str, Any], message: str, caplog: pytest.LogCaptureFixture,
) -> None:
    fk = FakeKernel(Wrong())
    with caplog.at_level(logging.ERROR, logger="afuse"):
        assert await fk.errno(cls, **fields) == errno.EIO
    assert message in caplog.text
    assert len(fk.dispatcher.errors) == 1


# -- entries, attributes, handles --------------------------------------------------------------------


class Files(Operations):
    entry_timeout = 3.0
    attr_timeout = 0.5

    async def lookup(self, req: r.LookupRequest) -> Entry:
        if req.name == b"neg":
            return Entry(0, Attr(), entry_timeout=7.0)
        if req.name != b"file":
            raise FUSEError(errno.ENOENT)
        return Entry(2, FILE, generation=9)

    async def getattr(self, req: r.GetattrRequest) -> Attr:
        return FILE if req.nodeid == 2 else Attr(ino=1, mode=DIR.mode, timeout=10.0)

    async def create(self, req: r.CreateRequest) -> tuple[Entry, Handle]:
        return Entry(3, Attr(ino=3, mode=req.mode)), Handle(77, 1)

    async def open(self, req: r.OpenRequest) -> Handle:
        return Handle(5)


async def test_entry_and_attr_replies() -> None:
    fk = FakeKernel(Files())
    e = await fk.ok(k.decode_entry, r.LookupRequest, name=b"file")
    assert (e.nodeid, e.generation, e.entry_timeout, e.attr.timeout) == (2, 9, 3.0, 0.5)
    assert e.attr.ino == 2 and stat.S_ISREG(e.attr.mode)
    neg = await fk.ok(k.decode_entry, r.LookupRequest, name=b"neg")
    assert (neg.nodeid, neg.entry_timeout) == (0, 7.0)
    assert await fk.errno(r.LookupRequest, name=b"other") == errno.ENOENT
    assert (await fk.ok(k.decode_attr, r.GetattrRequest, 1, fh=None)).timeout == 10.0
    assert await fk.ok(k.decode_attr, r.GetattrRequest, 2, fh=4) == Attr(**{**_fields(FILE), "timeout": 0.5})
    ent, hd = await fk.ok(k.decode_create, r.CreateRequest, name=b"f", mode=0o100600)
    assert ent.nodeid == 3 and hd == Handle(77, 1)
    assert await fk.ok(k.decode_open, r.OpenRequest, 2, flags=0, open_flags=0) == Handle(5)


def _fields(a: Attr) -> dict[str, Any]:
    return attrs.asdict(a, recurse=False)


# -- xattrs ----------------------------------------------------------------------------------------


class Xattrs(Operations):
    async def getxattr(self, req: r.GetxattrRequest) -> bytes:
        if req.name != b"user.a":
            raise FUSEError(errno.ENODATA)
        return b"value"

    async def listxattr(self, req: r.ListxattrRequest) -> Iterable[bytes]:
        return [b"user.a", b"user.bb"]


async def test_getxattr_sizes() -> None:
    fk = FakeKernel(Xattrs())
    assert await fk.ok(k.decode_xattr_size, r.GetxattrRequest, name=b"user.a", size=0) == 5
    assert await fk.errno(r.GetxattrRequest, name=b"user.a", size=4) == errno.ERANGE
    assert (await fk.call(r.GetxattrRequest, name=b"user.a", size=5)).ok() == b"value"
    assert (await fk.call(r.GetxattrRequest, name=b"user.a", size=100)).ok() == b"value"
    assert await fk.errno(r.GetxattrRequest, name=b"user.z", size=0) == errno.ENODATA


async def test_listxattr_sizes() -> None:
    fk = FakeKernel(Xattrs())
    assert await fk.ok(k.decode_xattr_size, r.ListxattrRequest, size=0) == 15
    assert await fk.errno(r.ListxattrRequest, size=14) == errno.ERANGE
    assert (await fk.call(r.ListxattrRequest, size=15)).ok() == b"user.a\0user.bb\0"


async def test_listxattr_bad_names() -> None:
    class Bad(Operations):
        async def listxattr(self, req: r.ListxattrRequest) -> Iterable[bytes]:
            return [b"user.a", b""]

    fk = FakeKernel(Bad())
    assert await fk.errno(r.ListxattrRequest, size=0) == errno.EIO


# -- readdir ---------------------------------------------------------------------------------------

NAMES = [b"alpha", b"beta", b"gamma", b"delta", b"epsilon"]  # every record is 32 bytes
FITS_TWO = 2 * 32 + 31


def dirent(i: int) -> DirEntry:
    return DirEntry(NAMES[i], i + 1, Attr(ino=10 + i, mode=stat.S_IFREG | 0o644))


class ListDir(Operations):
    async def readdir(self, req: r.ReaddirRequest) -> Iterable[DirEntry]:
        return [dirent(i) for i in range(req.offset, len(NAMES))]


class LoggedDir(Operations):
    """Logs each entry produced, taken, and the end and closing of the listing."""

    def __init__(self) -> None:
        self.log: list[str] = []


class SyncGenDir(LoggedDir):
    def _gen(self, start: int) -> Iterator[DirEntry]:
        try:
            for i in range(start, len(NAMES)):
                self.log.append(f"yield {i}")
                yield dirent(i)
                self.log.append(f"taken {i}")
            self.log.append("end")
        finally:
            self.log.append("closed")

    async def readdir(self, req: r.ReaddirRequest) -> Iterable[DirEntry]:
        return self._gen(req.offset)


class AsyncGenDir(LoggedDir):
    """``async def readdir`` with ``yield`` in it: an async generator function."""

    async def readdir(self, req: r.ReaddirRequest) -> AsyncIterator[DirEntry]:
        try:
            for i in range(req.offset, len(NAMES)):
                self.log.append(f"yield {i}")
                yield dirent(i)
                self.log.append(f"taken {i}")
            self.log.append("end")
        finally:
            self.log.append("closed")


class ReturnsAsyncGen(LoggedDir):
    """``async def readdir`` returning an async generator."""

    async def _agen(self, start: int) -> AsyncIterator[DirEntry]:
        try:
            for i in range(start, len(NAMES)):
                self.log.append(f"yield {i}")
                yield dirent(i)
                self.log.append(f"taken {i}")
            self.log.append("end")
        finally:
            self.log.append("closed")

    async def readdir(self, req: r.ReaddirRequest) -> DirEntries:
        return self._agen(req.offset)


async def test_readdir_from_a_list() -> None:
    fk = FakeKernel(ListDir())
    got = await fk.ok(k.decode_dirents, r.ReaddirRequest, fh=0, offset=0, size=FITS_TWO)
    assert [(d.name, d.offset) for d in got] == [(b"alpha", 1), (b"beta", 2)]
    got = await fk.ok(k.decode_dirents, r.ReaddirRequest, fh=0, offset=2, size=4096)
    assert [d.name for d in got] == [b"gamma", b"delta", b"epsilon"]
    assert [d.attr.ino for d in got if d.attr] == [12, 13, 14]
    assert (await fk.call(r.ReaddirRequest, fh=0, offset=5, size=4096)).ok() == b""


@pytest.mark.parametrize("cls", [SyncGenDir, AsyncGenDir, ReturnsAsyncGen])
async def test_readdir_generator_closed_at_the_entry_that_did_not_fit(cls: type[LoggedDir]) -> None:
    ops = cls()
    fk = FakeKernel(ops)
    got = await fk.ok(k.decode_dirents, r.ReaddirRequest, fh=0, offset=0, size=FITS_TWO)
    assert [d.name for d in got] == [b"alpha", b"beta"]
    # Code after the yields of the taken entries ran; after the third yield it did not.
    assert ops.log == ["yield 0", "taken 0", "yield 1", "taken 1", "yield 2", "closed"]
    ops.log.clear()
    got = await fk.ok(k.decode_dirents, r.ReaddirRequest, fh=0, offset=2, size=4096)
    assert [d.name for d in got] == [b"gamma", b"delta", b"epsilon"]
    assert ops.log == ["yield 2", "taken 2", "yield 3", "taken 3", "yield 4", "taken 4", "end", "closed"]


async def test_readdir_entry_validation(caplog: pytest.LogCaptureFixture) -> None:
    bad: list[DirEntry] = []

    class FS(Operations):
        async def readdir(self, req: r.ReaddirRequest) -> Iterable[DirEntry]:
            return bad

    fk = FakeKernel(FS())
    for entries, message in [
        ([DirEntry(b"a", 0, FILE)], "offset 0"),
        ([DirEntry(b"a/b", 1, FILE)], "invalid directory entry name"),
        ([DirEntry(b"a\0b", 1, FILE)], "invalid directory entry name"),
        ([DirEntry(b"", 1, FILE)], "invalid directory entry name"),
        ([DirEntry(b"a", 1)], "neither attr nor entry"),
    ]:
        bad[:] = entries
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="afuse"):
            assert await fk.errno(r.ReaddirRequest, fh=0, offset=0, size=4096) == errno.EIO
        assert message in caplog.text
    # An entry's attr serves READDIR too.
    bad[:] = [DirEntry(b"d", 1, entry=Entry(4, Attr(ino=4, mode=stat.S_IFDIR)))]
    got = await fk.ok(k.decode_dirents, r.ReaddirRequest, fh=0, offset=0, size=4096)
    assert got[0].attr == Attr(ino=4, mode=stat.S_IFDIR)


async def test_readdir_returns_a_dir_slice(caplog: pytest.LogCaptureFixture) -> None:
    """A readdir that keeps its listing as a list answers with DirSlice(items, req.offset)."""
    items = [(n, stat.S_IFREG, 10 + i) for i, n in enumerate(NAMES)]

    class FS(Operations):
        async def readdir(self, req: r.ReaddirRequest) -> DirEntries:
            return DirSlice(items, req.offset)

    fk = FakeKernel(FS())
    got = await fk.ok(k.decode_dirents, r.ReaddirRequest, fh=0, offset=0, size=FITS_TWO)
    assert [(d.name, d.offset) for d in got] == [(NAMES[0], 1), (NAMES[1], 2)]
    got = await fk.ok(k.decode_dirents, r.ReaddirRequest, fh=0, offset=2, size=4096)
    assert [(d.name, d.offset, d.attr and d.attr.ino) for d in got] == [
        (n, i + 1, 10 + i) for i, n in enumerate(NAMES) if i >= 2]
    assert (await fk.call(r.ReaddirRequest, fh=0, offset=len(NAMES), size=4096)).ok() == b""
    items.append((b"bad/name", stat.S_IFREG, 99))
    with caplog.at_level(logging.ERROR, logger="afuse"):
        assert await fk.errno(r.ReaddirRequest, fh=0, offset=len(NAMES), size=4096) == errno.EIO
    assert "invalid directory entry name" in caplog.text
    got = await fk.ok(k.decode_dirents, r.ReaddirRequest, fh=0, offset=1, size=FITS_TWO)  # still serving
    assert [d.name for d in got] == NAMES[1:3]


class PlusDir(Operations):
    entry_timeout = 2.0
    attr_timeout = 1.0

    def __init__(self, with_entry: bool = True) -> None:
        self.with_entry = with_entry
        self.taken: list[int] = []

    async def readdir(self, req: r.ReaddirRequest) -> Iterable[DirEntry]:
        return []

    async def readdirplus(self, req: r.ReaddirplusRequest) -> AsyncIterator[DirEntry]:
        for i in range(req.offset, len(NAMES)):
            a = Attr(ino=10 + i, mode=stat.S_IFREG | 0o600)
            yield DirEntry(NAMES[i], i + 1, a, Entry(10 + i, a) if self.with_entry else None)
            self.taken.append(10 + i)  # counted only once taken


async def test_readdirplus() -> None:
    ops = PlusDir()
    fk = FakeKernel(ops)
    got = await fk.ok(k.decode_direntplus, r.ReaddirplusRequest, fh=0, offset=0, size=2 * 160 + 159)
    assert [(d.name, d.entry.nodeid if d.entry else 0) for d in got] == [(b"alpha", 10), (b"beta", 11)]
    assert got[0].entry is not None and (got[0].entry.entry_timeout, got[0].entry.attr.timeout) == (2.0, 1.0)
    assert ops.taken == [10, 11]


async def test_readdirplus_requires_entry(caplog: pytest.LogCaptureFixture) -> None:
    fk = FakeKernel(PlusDir(with_entry=False))
    with caplog.at_level(logging.ERROR, logger="afuse"):
        assert await fk.errno(r.ReaddirplusRequest, fh=0, offset=0, size=4096) == errno.EIO
    assert "has no entry" in caplog.text


# -- read, write, copy_file_range -----------------------------------------------------------------


class Data(Operations):
    def __init__(self, read: bytes = b"hello", written: Any = None, copied: int = 0) -> None:
        self.data, self.written, self.copied = read, written, copied

    async def read(self, req: r.ReadRequest) -> bytes:
        return self.data

    async def write(self, req: r.WriteRequest) -> int:
        return len(req.data) if self.written is None else self.written

    async def copy_file_range(self, req: r.CopyFileRangeRequest) -> int:
        return self.copied


def _read(size: int) -> dict[str, int]:
    return {"fh": 1, "offset": 0, "size": size, "read_flags": 0, "lock_owner": 0, "flags": 0}


def _write(data: bytes) -> dict[str, Any]:
    return {"fh": 1, "offset": 0, "data": data, "write_flags": 0, "lock_owner": 0, "flags": 0}


async def test_read_size() -> None:
    fk = FakeKernel(Data(b"hello"))
    assert (await fk.call(r.ReadRequest, 2, **_read(5))).ok() == b"hello"
    assert (await fk.call(r.ReadRequest, 2, **_read(4096))).ok() == b"hello"
    assert await fk.errno(r.ReadRequest, 2, **_read(4)) == errno.EIO
    assert "read returned 5 bytes for a request of 4" in str(fk.dispatcher.errors[-1])


@pytest.mark.parametrize(("written", "code"), [(None, 0), (0, 0), (3, 0), (6, errno.EIO), (-1, errno.EIO),
                                               ("5", errno.EIO)])
async def test_write_count(written: Any, code: int) -> None:
    fk = FakeKernel(Data(written=written))
    reply = await fk.call(r.WriteRequest, 2, **_write(b"hello"))
    assert reply.errno == code
    if not code:
        assert k.decode_write(reply.body) == (5 if written is None else written)


def _cfr(length: int, wide: bool) -> dict[str, Any]:
    return {"fh_in": 1, "off_in": 0, "nodeid_out": 3, "fh_out": 2, "off_out": 0, "length": length, "flags": 0,
            "wide": wide}


async def test_copy_file_range_wide_and_narrow() -> None:
    big = (1 << 32) + 5
    fk = FakeKernel(Data(copied=big))
    wide = await fk.call(r.CopyFileRangeRequest, 2, **_cfr(1 << 40, True))
    assert k.decode_u64(wide.ok()) == big
    fk = FakeKernel(Data(copied=4096))
    narrow = await fk.call(r.CopyFileRangeRequest, 2, **_cfr(8192, False))
    assert k.decode_write(narrow.ok()) == 4096
    assert await fk.errno(r.CopyFileRangeRequest, 2, **_cfr(100, True)) == errno.EIO  # more than asked


# -- locks -----------------------------------------------------------------------------------------


class Locks(Operations):
    def __init__(self) -> None:
        self.calls: list[tuple[str, bool]] = []

    async def getlk(self, req: r.GetlkRequest) -> Lock:
        return Lock(0, 99, 2, 0)

    async def setlk(self, req: r.SetlkRequest) -> None:
        self.calls.append(("setlk", req.sleep))

    async def flock(self, req: r.SetlkRequest) -> None:
        self.calls.append(("flock", req.sleep))


def _lk(flags: int, sleep: bool) -> dict[str, Any]:
    return {"fh": 1, "owner": 7, "lock": Lock(0, 10, 1, 99), "lk_flags": flags, "sleep": sleep}


async def test_setlk_routes_to_flock() -> None:
    ops = Locks()
    fk = FakeKernel(ops)
    assert await fk.errno(r.SetlkRequest, 2, **_lk(0, False)) == 0
    assert await fk.errno(r.SetlkRequest, 2, **_lk(0, True)) == 0
    assert await fk.errno(r.SetlkRequest, 2, **_lk(LK_FLOCK, False)) == 0
    assert await fk.errno(r.SetlkRequest, 2, **_lk(LK_FLOCK, True)) == 0
    assert ops.calls == [("setlk", False), ("setlk", True), ("flock", False), ("flock", True)]
    got = await fk.ok(k.decode_lk, r.GetlkRequest, 2, fh=1, owner=7, lock=Lock(0, 10, 1, 99), lk_flags=0)
    assert got == Lock(0, 99, 2, 0)


async def test_setlk_without_the_matching_handler() -> None:
    class OnlyFlock(Operations):
        async def flock(self, req: r.SetlkRequest) -> None:
            pass

    class OnlyPosix(Operations):
        async def setlk(self, req: r.SetlkRequest) -> None:
            pass

    fk = FakeKernel(OnlyFlock())
    assert await fk.errno(r.SetlkRequest, 2, **_lk(0, False)) == errno.ENOSYS
    assert await fk.errno(r.SetlkRequest, 2, **_lk(LK_FLOCK, False)) == 0
    fk = FakeKernel(OnlyPosix())
    assert await fk.errno(r.SetlkRequest, 2, **_lk(0, False)) == 0
    assert await fk.errno(r.SetlkRequest, 2, **_lk(LK_FLOCK, False)) == errno.ENOSYS


# -- the rest of the reply shapes -----------------------------------------------------------------


class Misc(Operations):
    async def bmap(self, req: r.BmapRequest) -> int:
        return req.block * 8

    async def lseek(self, req: r.LseekRequest) -> int:
        return req.offset + 4096

    async def poll(self, req: r.PollRequest) -> int:
        return req.events & 1

    async def ioctl(self, req: r.IoctlRequest) -> IoctlReply:
        if req.cmd == 1:
            return IoctlReply(0, b"x" * (req.out_size + 1))
        if req.cmd == 2:
            return IoctlReply(in_iovs=[(req.arg, 8)], out_iovs=[(req.arg, 16)])
        return IoctlReply(7, req.in_data[::-1])

    async def statx(self, req: r.StatxRequest) -> Statx:
        return Statx(mask=req.mask, ino=req.nodeid, btime=Timestamp(-5, 6))


async def test_u64_poll_ioctl_statx() -> None:
    fk = FakeKernel(Misc())
    assert await fk.ok(k.decode_u64, r.BmapRequest, 2, block=3, blocksize=512) == 24
    assert await fk.ok(k.decode_u64, r.LseekRequest, 2, fh=1, offset=10, whence=3) == 4106
    assert await fk.ok(k.decode_poll, r.PollRequest, 2, fh=1, kh=9, flags=1, events=5) == 1
    ioctl = {"fh": 1, "flags": 0, "arg": 0x1000, "out_size": 4}
    got = await fk.ok(k.decode_ioctl, r.IoctlRequest, 2, cmd=3, in_size=3, in_data=b"abc", **ioctl)
    assert got == IoctlReply(7, b"cba")
    got = await fk.ok(k.decode_ioctl, r.IoctlRequest, 2, cmd=2, in_size=0, in_data=b"", **ioctl)
    assert got == IoctlReply(0, b"", [(0x1000, 8)], [(0x1000, 16)])
    assert await fk.errno(r.IoctlRequest, 2, cmd=1, in_size=0, in_data=b"", **ioctl) == errno.EIO
    sx = await fk.ok(k.decode_statx, r.StatxRequest, 2, fh=None, getattr_flags=0, sx_flags=0, mask=0x800)
    assert (sx.mask, sx.ino, sx.btime, sx.timeout) == (0x800, 2, Timestamp(-5, 6), 1.0)


# -- INIT flags ------------------------------------------------------------------------------------


async def test_wanted_flags_follow_the_handlers() -> None:
    F = InitFlag
    locks_and_plus = F.POSIX_LOCKS | F.FLOCK_LOCKS | F.DO_READDIRPLUS | F.READDIRPLUS_AUTO
    assert not FakeKernel(Empty()).wanted_flags() & locks_and_plus
    assert FakeKernel(Empty()).wanted_flags() & F.BIG_WRITES
    full = FakeKernel(Locks()).wanted_flags()
    assert full & F.POSIX_LOCKS and full & F.FLOCK_LOCKS and not full & F.DO_READDIRPLUS
    assert FakeKernel(PlusDir()).wanted_flags() & (F.DO_READDIRPLUS | F.READDIRPLUS_AUTO) == (
        F.DO_READDIRPLUS | F.READDIRPLUS_AUTO)

    class SetlkOnly(Operations):
        async def setlk(self, req: r.SetlkRequest) -> None:
            pass

    # POSIX locks need both getlk and setlk.
    assert not FakeKernel(SetlkOnly()).wanted_flags() & F.POSIX_LOCKS
    # The config can still turn them off.
    assert not FakeKernel(Locks()).wanted_flags(InitConfig(posix_locks=False, flock_locks=False)) & (
        F.POSIX_LOCKS | F.FLOCK_LOCKS)
