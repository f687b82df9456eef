"""Failover without waiting for data or Python: memfs's content store, the keeper's warm standbys,
the keeper socket's mode, memfs's failover options."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from afuse.errors import FUSEError
from afuse.examples._cli import standby_command
from afuse.examples.memfs import File, MemFS
from afuse.keeper import Keeper, KeeperClient
from afuse.nodes.filestore import ContentStore, StoredData
from afuse.nodes.sparse import ChunkPool
from afuse.state import CONTENT_DIR, JOURNAL, SNAPSHOT, FileStateStore
from afuse.wire import requests as r
from afuse.wire.constants import InitFlag
from afuse.wire.init import Negotiated

UID, GID = os.getuid(), os.getgid()
MIB = 1 << 20


def _negotiated() -> Negotiated:
    f = InitFlag.ASYNC_READ | InitFlag.BIG_WRITES
    return Negotiated(kernel_major=7, kernel_minor=45, minor=45, offered=f, flags=f, max_write=1 << 20,
                      max_pages=256, max_readahead=1 << 20, max_background=64, congestion_threshold=48,
                      time_gran=1, max_stack_depth=1, request_timeout=0, refused=InitFlag(0))


# -- the content store ----------------------------------------------------------------------------------


def test_stored_data_is_written_through(tmp_path: Path) -> None:
    store = ContentStore(tmp_path / "data")
    d = StoredData(store, 7, ChunkPool(1 << 30))
    assert d.size == 0 and d.blocks == 0 and store.opened == 0  # an empty file opens nothing
    d.write(1 << 20, b"hello")
    with open(store.file(7), "rb") as f:  # on disk at once: a SIGKILL cannot lose it
        assert f.read()[-5:] == b"hello"
    assert d.size == (1 << 20) + 5 and d.read(0, 4) == b"\0" * 4 and d.read(1 << 20, 100) == b"hello"
    assert d.seek(0, 3) == 1 << 20  # SEEK_DATA skips the hole
    d.punch(1 << 20, (1 << 20) + 5)
    assert d.read(1 << 20, 5) == b"\0" * 5
    e = StoredData(store, 8, d.pool)
    d.write(0, b"abc")
    assert d.copy_to(0, e, 10, 3) == 3 and e.read(10, 3) == b"abc" and e.size == 13
    d.truncate(2)
    assert d.size == 2 and os.path.getsize(store.file(7)) == 2
    with pytest.raises(FUSEError) as info:
        d.write((1 << 63) - 2, b"xyz")
    assert info.value.errno == errno.EFBIG
    store.replaying = True  # a journal being redone: the files are final already
    d.write(0, b"zzz")
    d.truncate(0)
    e.free()
    store.replaying = False
    assert d.read(0, 10) == b"ab" and os.path.exists(store.file(8))
    e.free()
    assert not os.path.exists(store.file(8))
    store.close()


async def _make_big(fs: MemFS, size: int) -> tuple[int, int]:
    """A file of ``size`` bytes written through the handlers; (nodeid, fh) of it, still open."""
    e, h = await fs.create(r.CreateRequest(10, 1, UID, GID, 42, name=b"big", flags=os.O_RDWR, mode=0o644,
                                           umask=0, open_flags=0))
    block = bytes(range(256)) * 4096  # 1 MiB
    for i in range(size // MIB):
        await fs.write(r.WriteRequest(11 + i, e.nodeid, UID, GID, 42, fh=h.fh, offset=i * MIB, data=block,
                                      write_flags=0, lock_owner=0, flags=0))
    return e.nodeid, h.fh


def test_takeover_reads_no_content(tmp_path: Path) -> None:
    """The snapshot and journal hold no file bytes; a restore opens no content file; getattr and
    lookup are served before any content is touched; the bytes are read only when asked for."""
    state = tmp_path / "state"
    fs = MemFS(content=state / CONTENT_DIR)
    store = FileStateStore(state)
    store.attach(fs)
    nodeid, fh = trio.run(_make_big, fs, 32 * MIB)
    written = fs.node(nodeid)
    assert isinstance(written, File)
    mtime = written.mtime
    store.close()
    small = os.path.getsize(state / SNAPSHOT) + sum(
        os.path.getsize(p) for p in state.glob(JOURNAL.format(gen="*")))
    assert small < 64 * 1024, small  # 32 MiB of content, a few KiB of state

    fs2 = MemFS(content=state / CONTENT_DIR)
    assert FileStateStore(state).load_into(fs2)
    assert fs2.content is not None and fs2.content.opened == 0

    async def use() -> None:
        entry = await fs2.lookup(r.LookupRequest(100, 1, UID, GID, 42, name=b"big"))
        assert entry.nodeid == nodeid and entry.attr.size == 32 * MIB and entry.attr.mtime_ns == mtime
        attr = await fs2.getattr(r.GetattrRequest(101, nodeid, UID, GID, 42, fh=None))
        assert attr.size == 32 * MIB
        assert fs2.content is not None and fs2.content.opened == 0  # served without the content
        data = await fs2.read(r.ReadRequest(102, nodeid, UID, GID, 42, fh=fh, offset=5 * MIB + 3, size=5,
                                            read_flags=0, lock_owner=0, flags=0))
        assert isinstance(data, bytes) and data == bytes(range(3, 8))
        assert fs2.content.opened == 1

    trio.run(use)


def test_fresh_mount_clears_old_content(tmp_path: Path) -> None:
    state = FileStateStore(tmp_path)
    os.makedirs(tmp_path / CONTENT_DIR)
    (tmp_path / CONTENT_DIR / "2").write_bytes(b"old")
    state.clear()
    assert not (tmp_path / CONTENT_DIR).exists()


# -- the keeper ---------------------------------------------------------------------------------------


@pytest.mark.trio
async def test_keeper_socket_is_0600_under_any_umask(tmp_path: Path) -> None:
    path = str(tmp_path / "k.sock")
    old = os.umask(0)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(Keeper().serve, path)
            assert os.stat(path).st_mode & 0o777 == 0o600
            nursery.cancel_scope.cancel()
    finally:
        os.umask(old)


@pytest.mark.trio
async def test_keeper_standby_protocol(tmp_path: Path) -> None:
    """A standby gets the descriptors when the owner dies; an explicit take goes first and dismisses
    the standbys; a drain dismisses them too."""
    path, mp = str(tmp_path / "k.sock"), str(tmp_path / "m")
    os.mkdir(mp)
    rfd, wfd = os.pipe()
    got: dict[str, Any] = {}

    async def standby(name: str, client: KeeperClient) -> None:
        got[name] = await client.standby(mp)

    async def until(name: str) -> Any:
        with trio.fail_after(5):
            while name not in got:
                await trio.sleep(0.01)
        return got[name]

    async def standbys() -> list[int]:
        c = await KeeperClient.connect(path)
        try:
            pids: list[int] = (await c.list())[0]["standby_pids"]
            return pids
        finally:
            c.close()

    async with trio.open_nursery() as nursery:
        await nursery.start(Keeper(owner_wait=5).serve, path)
        owner = await KeeperClient.connect(path)
        await owner.register(mp, _negotiated(), [rfd, wfd])
        os.close(rfd)
        os.close(wfd)
        s1 = await KeeperClient.connect(path)
        nursery.start_soon(standby, "s1", s1)
        with trio.fail_after(5):
            while await standbys() != [os.getpid()]:
                await trio.sleep(0.01)
        assert "s1" not in got
        owner.close()  # the owner dies: the standby takes over, with resend
        h1 = await until("s1")
        assert h1 is not None and h1.resend and len(h1.fds) == 2 and h1.standbys == 0
        os.write(h1.fds[1], b"x")
        assert os.read(h1.fds[0], 1) == b"x"

        s2 = await KeeperClient.connect(path)
        nursery.start_soon(standby, "s2", s2)
        taker = await KeeperClient.connect(path)

        async def take() -> None:
            got["t"] = await taker.take(mp)

        nursery.start_soon(take)
        await trio.sleep(0.2)
        s1.close()  # the owner dies while an explicit take waits: the take goes first
        ht = await until("t")
        assert ht is not None and ht.standbys == 0
        assert await until("s2") is None  # dismissed: the new owner starts its own

        s3 = await KeeperClient.connect(path)
        nursery.start_soon(standby, "s3", s3)
        with trio.fail_after(5):
            while not await standbys():
                await trio.sleep(0.01)
        await taker.drained(mp)  # stopped on purpose: no standby takes over
        assert await until("s3") is None
        for fd in (*h1.fds, *ht.fds):
            os.close(fd)
        for c in (s2, s3, taker):
            c.close()
        nursery.cancel_scope.cancel()


# -- memfs's failover options -------------------------------------------------------------------------------


def test_memfs_has_the_failover_options() -> None:
    out = subprocess.run([sys.executable, "-m", "afuse.examples.memfs", "--help"], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    for opt in ("--keeper", "--state-dir", "--upgrade", "--take-wait", "--standby", "--no-standby",
                "--readers", "--events"):
        assert opt in out, opt


def test_standby_command() -> None:
    cmd = standby_command("afuse.examples.memfs", ["/mnt", "--keeper", "/k", "--state-dir", "/s", "--upgrade",
                                                   "--take-wait", "5", "--take-wait=7"])
    assert cmd == [sys.executable, "-m", "afuse.examples.memfs", "/mnt", "--keeper", "/k", "--state-dir", "/s",
                   "--standby"]
