"""Every notification of afuse.notify against the real kernel, each shown by its visible effect.

The filesystem runs in the test's trio loop (afuse.testing.trio_mount); the mount is touched
only from worker threads (trio.to_thread), never from the loop serving it.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import stat
from collections import Counter
from typing import Any, cast

import pytest
import trio

import afuse
from afuse import notify
from afuse.errors import NotNegotiated
from afuse.session import Session
from afuse.testing import trio_mount
from afuse.wire.constants import POLL_SCHEDULE_NOTIFY, FOpen, InitFlag
from afuse.wire.init import InitConfig, Negotiated

pytestmark = pytest.mark.trio

PAGE = 4096
F_ID = 2  # nodeid of "f"
G_ID = 3  # nodeid of "g"
SLOW_ID = 4  # nodeid of "slow"
LONG = 100.0  # cache timeouts: nothing expires during a test


class NotifyFS(afuse.Operations):
    """A flat filesystem whose contents the test changes behind the kernel's back.

    Everything is cached for a long time (so only a notification can make the kernel see a
    change) and opens keep the page cache. It counts LOOKUPs per name, READs and FORGETs.
    """

    attr_timeout = LONG
    entry_timeout = LONG

    def __init__(self) -> None:
        self.files: dict[bytes, tuple[int, bytearray]] = {
            b"f": (F_ID, bytearray(b"a" * 5)),
            b"g": (G_ID, bytearray(b"g")),
        }
        self.lookups: Counter[bytes] = Counter()
        self.reads = 0
        self.forgotten: list[int] = []
        self.forget_event = trio.Event()
        # poll
        self.ready = False
        self.kh: int | None = None
        self.kh_event = trio.Event()
        self.poll_flags: list[int] = []
        # resend
        self.first_entered = trio.Event()
        self.release_first = trio.Event()
        self.first_answered = trio.Event()
        self.slow_copies: list[afuse.LookupRequest] = []

    def _by_id(self, nodeid: int) -> bytearray:
        for ino, data in self.files.values():
            if ino == nodeid:
                return data
        raise afuse.FUSEError(errno.ENOENT)

    def _attr(self, nodeid: int) -> afuse.Attr:
        if nodeid == 1:
            return afuse.Attr(ino=1, mode=stat.S_IFDIR | 0o755, nlink=2)
        if nodeid == SLOW_ID:
            return afuse.Attr(ino=SLOW_ID, mode=stat.S_IFREG | 0o644)
        data = self._by_id(nodeid)
        return afuse.Attr(ino=nodeid, mode=stat.S_IFREG | 0o644, size=len(data), blocks=(len(data) + 511) // 512)

    async def lookup(self, req: afuse.LookupRequest) -> afuse.Entry:
        self.lookups[req.name] += 1
        if req.name == b"slow":
            self.slow_copies.append(req)
            if not req.is_resend:
                self.first_entered.set()
                await self.release_first.wait()
                self.first_answered.set()
            return afuse.Entry(SLOW_ID, self._attr(SLOW_ID))
        if req.nodeid != 1 or req.name not in self.files:
            raise afuse.FUSEError(errno.ENOENT)
        ino, _ = self.files[req.name]
        return afuse.Entry(ino, self._attr(ino))

    async def forget(self, req: afuse.ForgetRequest) -> None:
        for item in req.items:
            self.forgotten.append(item.nodeid)
        self.forget_event.set()

    async def getattr(self, req: afuse.GetattrRequest) -> afuse.Attr:
        return self._attr(req.nodeid)

    async def open(self, req: afuse.OpenRequest) -> afuse.Handle:
        self._by_id(req.nodeid)
        return afuse.Handle(req.nodeid, FOpen.KEEP_CACHE)

    async def read(self, req: afuse.ReadRequest) -> bytes:
        self.reads += 1
        data = self._by_id(req.nodeid)
        return bytes(data[req.offset : req.offset + req.size])

    async def poll(self, req: afuse.PollRequest) -> int:
        self.poll_flags.append(req.flags)
        if self.ready:
            return select.POLLIN
        if req.flags & POLL_SCHEDULE_NOTIFY:
            self.kh = req.kh
            self.kh_event.set()
        return 0


def _path(session: Session, name: str) -> str:
    return os.path.join(session.mountpoint, name)


async def _stat(session: Session, name: str) -> os.stat_result:
    return await trio.to_thread.run_sync(os.stat, _path(session, name))


async def _pread(fd: int, size: int, offset: int) -> bytes:
    return await trio.to_thread.run_sync(os.pread, fd, size, offset)


async def _open(session: Session, name: str) -> int:
    return await trio.to_thread.run_sync(os.open, _path(session, name), os.O_RDONLY)


async def _close(fd: int) -> None:
    """close(2) sends FLUSH: never from the loop serving the mount (abandoned after 5 s)."""
    with trio.CancelScope(shield=True), trio.move_on_after(5):
        await trio.to_thread.run_sync(os.close, fd, abandon_on_cancel=True)


# -- inval_inode ---------------------------------------------------------------------------------


async def test_inval_inode_attrs() -> None:
    ops = NotifyFS()
    with trio.fail_after(20):
        async with trio_mount(ops) as session:
            assert (await _stat(session, "f")).st_size == 5
            ops.files[b"f"][1][:] = b"b" * 10  # behind the kernel's back
            assert (await _stat(session, "f")).st_size == 5  # still the cached attributes
            await notify.inval_inode(session, F_ID)
            assert (await _stat(session, "f")).st_size == 10


async def test_inval_inode_data_drops_page_cache() -> None:
    ops = NotifyFS()
    ops.files[b"f"][1][:] = b"a" * PAGE
    with trio.fail_after(20):
        async with trio_mount(ops) as session:
            fd = await _open(session, "f")
            try:
                assert await _pread(fd, PAGE, 0) == b"a" * PAGE
                reads = ops.reads
                assert reads >= 1
                ops.files[b"f"][1][:] = b"b" * PAGE  # same size, new content
                assert await _pread(fd, PAGE, 0) == b"a" * PAGE  # the page cache answers
                assert ops.reads == reads
                await notify.inval_inode(session, F_ID, 0, 0)
                assert await _pread(fd, PAGE, 0) == b"b" * PAGE
                assert ops.reads > reads
            finally:
                await _close(fd)


# -- inval_entry and delete ----------------------------------------------------------------------


@pytest.mark.parametrize("expire_only", [False, True])
async def test_inval_entry_causes_new_lookup(expire_only: bool) -> None:
    ops = NotifyFS()
    with trio.fail_after(20):
        async with trio_mount(ops) as session:
            if expire_only and not session.has(InitFlag.HAS_EXPIRE_ONLY):
                pytest.skip("kernel lacks FUSE_HAS_EXPIRE_ONLY")
            await _stat(session, "f")
            await _stat(session, "f")
            assert ops.lookups[b"f"] == 1  # the dentry is cached
            await notify.inval_entry(session, 1, b"f", expire_only=expire_only)
            await _stat(session, "f")
            assert ops.lookups[b"f"] == 2
            await _stat(session, "f")
            assert ops.lookups[b"f"] == 2  # cached again


async def test_inval_entry_not_cached_is_enoent() -> None:
    ops = NotifyFS()
    with trio.fail_after(20):
        async with trio_mount(ops) as session:
            with pytest.raises(FileNotFoundError):
                await notify.inval_entry(session, 1, b"never-looked-up")


async def test_delete_makes_removed_name_vanish() -> None:
    ops = NotifyFS()
    with trio.fail_after(20):
        async with trio_mount(ops) as session:
            await _stat(session, "g")
            del ops.files[b"g"]  # removed behind the kernel's back
            await _stat(session, "g")  # the cached dentry still answers
            assert ops.lookups[b"g"] == 1
            await notify.delete(session, 1, G_ID, b"g")
            with pytest.raises(FileNotFoundError):
                await _stat(session, "g")
            assert ops.lookups[b"g"] == 2


# -- store and retrieve --------------------------------------------------------------------------


async def test_store_fills_page_cache_without_read() -> None:
    ops = NotifyFS()
    ops.files[b"f"][1][:] = b"a" * PAGE
    with trio.fail_after(20):
        async with trio_mount(ops) as session:
            fd = await _open(session, "f")
            try:
                stored = bytes(range(256)) * (PAGE // 256)
                await notify.store(session, F_ID, 0, stored)
                assert await _pread(fd, PAGE, 0) == stored
                assert ops.reads == 0  # the kernel never asked
            finally:
                await _close(fd)


async def test_store_extends_size() -> None:
    ops = NotifyFS()
    ops.files[b"f"][1][:] = b""
    with trio.fail_after(20):
        async with trio_mount(ops) as session:
            fd = await _open(session, "f")
            try:
                # The filesystem grows the file and pushes the new data with it (the kernel
                # refetches the attributes after a store that grew the file).
                ops.files[b"f"][1][:] = b"z" * PAGE
                await notify.store(session, F_ID, 0, b"z" * PAGE)
                st = await trio.to_thread.run_sync(os.fstat, fd)
                assert st.st_size == PAGE
                assert await _pread(fd, PAGE, 0) == b"z" * PAGE
                assert ops.reads == 0
            finally:
                await _close(fd)


async def test_retrieve_returns_cached_data() -> None:
    ops = NotifyFS()
    content = bytes(range(256)) * (PAGE // 256)
    ops.files[b"f"][1][:] = content
    with trio.fail_after(20):
        async with trio_mount(ops) as session:
            fd = await _open(session, "f")
            try:
                assert await _pread(fd, PAGE, 0) == content
                ops.files[b"f"][1][:] = b"x" * PAGE  # the cache, not the filesystem, answers
                assert await notify.retrieve(session, F_ID, 0, PAGE, timeout=5) == content
                assert await notify.retrieve(session, F_ID, 100, 50, timeout=5) == content[100:150]
                with pytest.raises(FileNotFoundError):  # an inode the kernel does not have
                    await notify.retrieve(session, 999, 0, 10, timeout=5)
                assert not session._retrieve_waiters  # nothing left waiting
            finally:
                await _close(fd)


# -- poll ------------------------------------------------------------------------------------------


async def test_poll_wakeup_wakes_poller() -> None:
    ops = NotifyFS()
    result: dict[str, Any] = {}

    def poller(path: str) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            p = select.poll()
            p.register(fd, select.POLLIN)
            result["events"] = p.poll(10_000)
        finally:
            os.close(fd)

    with trio.fail_after(20):
        async with trio_mount(ops) as session:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.to_thread.run_sync, poller, _path(session, "f"))
                await ops.kh_event.wait()
                await trio.sleep(0.2)
                assert "events" not in result  # the poller waits
                assert ops.kh is not None
                ops.ready = True
                await notify.poll_wakeup(session, ops.kh)
            assert result["events"] and result["events"][0][1] & select.POLLIN
            assert ops.poll_flags[0] & POLL_SCHEDULE_NOTIFY


# -- resend ----------------------------------------------------------------------------------------


async def test_resend_redelivers_blocked_request(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="afuse")
    ops = NotifyFS()
    result: dict[str, Any] = {}

    def client(path: str) -> None:
        try:
            result["st"] = os.stat(path)
        except OSError as e:
            result["err"] = e

    with trio.fail_after(20):
        # The kernel resends only requests read from /dev/fuse, not those on an io_uring queue.
        async with trio_mount(ops, io_uring=False) as session:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.to_thread.run_sync, client, _path(session, "slow"))
                await ops.first_entered.wait()
                await notify.resend(session)
                # The second copy is answered; the caller wakes up while the first still blocks.
                while "st" not in result and "err" not in result:
                    await trio.sleep(0.01)
            assert "st" in result, result
            assert result["st"].st_ino == SLOW_ID
            first, second = ops.slow_copies[:2]
            assert not first.is_resend and second.is_resend
            assert second.request_id == first.request_id == first.unique
            assert second.unique == first.unique | (1 << 63)
            assert not ops.first_answered.is_set()
            # Now the first copy answers: the kernel no longer knows it (ENOENT, logged at debug).
            ops.release_first.set()
            await ops.first_answered.wait()
            msg = f"reply to unique {first.unique}: nobody waits (ENOENT)"
            while not any(msg in rec.getMessage() for rec in caplog.records):
                await trio.sleep(0.01)
            rec = next(rec for rec in caplog.records if msg in rec.getMessage())
            assert rec.levelno == logging.DEBUG
            assert not session.errors
            # and it keeps serving
            assert (await _stat(session, "f")).st_size == 5
            assert not session.closed


# -- inc_epoch and prune ---------------------------------------------------------------------------


async def test_inc_epoch_revalidates_dentries() -> None:
    ops = NotifyFS()
    with trio.fail_after(20):
        async with trio_mount(ops) as session:
            await _stat(session, "f")
            await _stat(session, "g")
            await _stat(session, "f")
            assert ops.lookups == {b"f": 1, b"g": 1}
            await notify.inc_epoch(session)
            await _stat(session, "f")
            await _stat(session, "g")
            assert ops.lookups == {b"f": 2, b"g": 2}


async def test_prune_makes_kernel_forget() -> None:
    ops = NotifyFS()
    with trio.fail_after(20):
        async with trio_mount(ops) as session:
            await _stat(session, "f")
            await _stat(session, "g")
            assert not ops.forgotten
            await notify.prune(session, [F_ID])
            with trio.fail_after(5):
                while F_ID not in ops.forgotten:
                    await ops.forget_event.wait()
                    ops.forget_event = trio.Event()
            assert G_ID not in ops.forgotten  # only what was asked for
            await notify.prune(session, [])  # nothing to do
            # "f" is looked up afresh
            await _stat(session, "f")
            assert ops.lookups[b"f"] == 2


# -- not negotiated (no kernel needed) -------------------------------------------------------------


_NO_FLAGS = InitFlag(0)


def _fake_session(minor: int, flags: InitFlag = _NO_FLAGS) -> Session:
    """A Session object that was never mounted, with a hand-made negotiation outcome."""
    session = Session(afuse.Operations(), cast(Any, None), InitConfig(), 1, 1)
    session.negotiated = Negotiated(
        kernel_major=7, kernel_minor=minor, minor=minor, offered=flags, flags=flags, max_write=1 << 20,
        max_pages=256, max_readahead=1 << 20, max_background=64, congestion_threshold=48, time_gran=1,
        max_stack_depth=1, request_timeout=0, refused=InitFlag(0))
    return session


async def test_not_negotiated_errors() -> None:
    old = _fake_session(39)
    with pytest.raises(NotNegotiated, match=r"7\.40"):
        await notify.resend(old)
    with pytest.raises(NotNegotiated, match=r"7\.44"):
        await notify.inc_epoch(old)
    with pytest.raises(NotNegotiated, match=r"7\.45"):
        await notify.prune(old, [2])
    with pytest.raises(NotNegotiated, match="HAS_EXPIRE_ONLY"):
        await notify.inval_entry(old, 1, b"x", expire_only=True)
    mid = _fake_session(44, InitFlag.HAS_EXPIRE_ONLY)
    with pytest.raises(NotNegotiated, match=r"7\.45"):
        await notify.prune(mid, [2])
    unmounted = Session(afuse.Operations(), cast(Any, None), InitConfig(), 1, 1)
    with pytest.raises(NotNegotiated, match="no session"):
        await notify.resend(unmounted)
