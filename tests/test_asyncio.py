"""afuse.asyncio: filesystems served from asyncio programs, handlers written as asyncio coroutines.

The asyncio loop under test serves the mount, so the mount is touched only from threads
(``asyncio.to_thread``) and other processes, never from the loop's own thread.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import functools
import json
import os
import random
import select
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import sniffio
import trio

import afuse
import afuse.asyncio
import afuse.nodes
import afuse.notify
from afuse import device, testing
from afuse.examples.hello_asyncio import DATA, HelloAsyncioFS, serve_until_unmounted
from afuse.operations import overridden

ROOT = 1
TIMEOUT = 20.0


def mounted(path: str | Path) -> bool:
    """True if an afuse filesystem is mounted on ``path`` (without touching the mount)."""
    resolved = device.resolve_mountpoint(str(path))  # os.path.realpath would stat the mount's root
    return any(mp == resolved for mp, _t, _s in device.find_mounts())


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[str]:
    path = tmp_path / "mnt"
    path.mkdir()
    yield str(path)
    if mounted(path):  # a failed test must not leave its mount behind
        device.unmount(str(path), lazy=True)
        pytest.fail(f"{path} was left mounted")


async def run_process(*args: str, timeout: float = TIMEOUT) -> tuple[int, str]:
    """Run a program (never the loop's own thread touching the mount); its status and stdout."""
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(timeout):
            out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


# -- a tiny HTTP server and client on asyncio streams --------------------------------------------

class FileServer:
    """HTTP/1.1 on 127.0.0.1: ``GET /stat/NAME`` (the size) and ``GET /data/NAME?OFFSET,SIZE``.

    Reads of ``slow`` wait until :attr:`release` is set.
    """

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.release = asyncio.Event()
        self.slow_started = asyncio.Event()
        self.slow_aborted = asyncio.Event()  # the client went away while "slow" was pending
        self.requests: list[str] = []
        self.port = 0

    async def __aenter__(self) -> FileServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = (await reader.readline()).decode()
            while (await reader.readline()) not in (b"\r\n", b""):
                pass
            _method, target, _version = line.split()
            self.requests.append(target)
            kind, _, rest = target.lstrip("/").partition("/")
            name, _, query = rest.partition("?")
            body = self.files.get(name)
            if body is None:
                writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                return
            if name == "slow" and kind == "data":
                self.slow_started.set()
                waiting = asyncio.ensure_future(self.release.wait())
                gone = asyncio.ensure_future(reader.read(1))  # EOF once the client closes
                done, _ = await asyncio.wait([waiting, gone], return_when=asyncio.FIRST_COMPLETED)
                waiting.cancel()
                gone.cancel()
                if gone in done:
                    self.slow_aborted.set()
                    return
            if kind == "stat":
                body = str(len(body)).encode()
            else:
                offset, size = map(int, query.split(","))
                body = body[offset : offset + size]
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
                         + body)
            await writer.drain()
        finally:
            writer.close()


async def http_get(port: int, target: str) -> tuple[int, bytes]:
    """A minimal asyncio HTTP/1.1 client: GET ``target`` from 127.0.0.1:``port``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        status = int((await reader.readline()).split()[1])
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            key, _, value = line.decode().partition(":")
            if key.strip().lower() == "content-length":
                length = int(value)
        return status, await reader.readexactly(length)
    finally:
        writer.close()


class HttpFS(afuse.Operations):
    """Files served by a :class:`FileServer`: every lookup, getattr and read is an HTTP request."""

    entry_timeout = 0.0
    attr_timeout = 0.0

    def __init__(self, port: int, names: list[str]) -> None:
        self.port = port
        self.names = names
        self.libraries: list[str | None] = []  # sniffio's answer in each handler
        self.cancelled: list[str] = []  # reads cancelled (by an INTERRUPT)

    def _note(self) -> None:
        self.libraries.append(sniffio.current_async_library())
        assert asyncio.current_task() is not None

    async def _size(self, name: str) -> int:
        status, body = await http_get(self.port, f"/stat/{name}")
        if status == 404:
            raise afuse.FUSEError(errno.ENOENT)
        return int(body)

    def _attr(self, ino: int, size: int) -> afuse.Attr:
        return afuse.Attr(ino=ino, mode=stat.S_IFREG | 0o444, nlink=1, size=size)

    async def lookup(self, req: afuse.LookupRequest) -> afuse.Entry:
        self._note()
        name = req.name.decode()
        if req.nodeid != ROOT or name not in self.names:
            raise afuse.FUSEError(errno.ENOENT)
        ino = 2 + self.names.index(name)
        return afuse.Entry(ino, self._attr(ino, await self._size(name)))

    async def getattr(self, req: afuse.GetattrRequest) -> afuse.Attr:
        self._note()
        if req.nodeid == ROOT:
            return afuse.Attr(ino=ROOT, mode=stat.S_IFDIR | 0o755, nlink=2)
        name = self.names[req.nodeid - 2]
        return self._attr(req.nodeid, await self._size(name))

    async def open(self, req: afuse.OpenRequest) -> afuse.Handle:
        self._note()
        return afuse.Handle(fh=req.nodeid, flags=afuse.FOpen.DIRECT_IO)  # every read() a READ

    async def read(self, req: afuse.ReadRequest) -> bytes:
        self._note()
        name = self.names[req.fh - 2]
        try:
            status, body = await http_get(self.port, f"/data/{name}?{req.offset},{req.size}")
        except asyncio.CancelledError:
            self.cancelled.append(name)
            raise
        if status != 200:
            raise afuse.FUSEError(errno.EIO)
        return body

    async def readdir(self, req: afuse.ReaddirRequest) -> AsyncIterator[afuse.DirEntry]:
        self._note()
        root = afuse.Attr(ino=ROOT, mode=stat.S_IFDIR | 0o755)
        entries = [afuse.DirEntry(b".", 1, root), afuse.DirEntry(b"..", 2, root)]
        for i, name in enumerate(self.names):
            entries.append(afuse.DirEntry(name.encode(), 3 + i, self._attr(2 + i, 0)))
        for entry in entries[req.offset:]:
            await asyncio.sleep(0)
            yield entry


FILES = {"a": b"alpha\n" * 1000, "b": b"bravo\n", "slow": b"finally\n"}

_OTHER_CLIENT = textwrap.dedent(
    """
    import json, os, sys
    mnt = sys.argv[1]
    out = {"names": sorted(os.listdir(mnt)), "size_a": os.stat(os.path.join(mnt, "a")).st_size}
    for name in ("a", "b"):
        with open(os.path.join(mnt, name), "rb") as f:
            out[name] = f.read().decode()
    print(json.dumps(out))
    """
)


@pytest.mark.asyncio
async def test_http_backed_files_and_responsive_while_one_request_is_slow(mnt: str) -> None:
    async with FileServer(FILES) as server:
        fs = HttpFS(server.port, list(FILES))
        async with afuse.asyncio.mount(fs, mnt) as session:
            assert session.mountpoint == device.resolve_mountpoint(mnt) and mounted(mnt)
            slow_reader = asyncio.ensure_future(run_process(
                sys.executable, "-c", "import sys; print(open(sys.argv[1], 'rb').read().decode(), end='')",
                os.path.join(mnt, "slow")))
            async with asyncio.timeout(TIMEOUT):
                await server.slow_started.wait()
            # With the READ of "slow" in flight, another process lists, stats and reads.
            status, out = await run_process(sys.executable, "-c", _OTHER_CLIENT, mnt)
            assert status == 0
            assert json.loads(out) == {"names": ["a", "b", "slow"], "size_a": len(FILES["a"]),
                                       "a": FILES["a"].decode(), "b": FILES["b"].decode()}
            assert not slow_reader.done()
            server.release.set()
            assert await slow_reader == (0, FILES["slow"].decode())
            assert session.errors == []
        assert not mounted(mnt)
    assert fs.libraries and set(fs.libraries) == {"asyncio"}
    assert any(t.startswith("/data/a?") for t in server.requests)
    assert not fs.cancelled


@pytest.mark.asyncio
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGINT])
async def test_interrupt_cancels_the_asyncio_handler(mnt: str, signum: int) -> None:
    async with FileServer(FILES) as server:
        fs = HttpFS(server.port, list(FILES))
        async with afuse.asyncio.mount(fs, mnt) as session:
            reader = await asyncio.create_subprocess_exec(
                sys.executable, "-c", "import sys; open(sys.argv[1], 'rb').read()", os.path.join(mnt, "slow"))
            try:
                async with asyncio.timeout(TIMEOUT):
                    await server.slow_started.wait()
                    reader.send_signal(signum)
                    # The kernel sends INTERRUPT; the handler's task is cancelled, its HTTP
                    # connection closed, and the reader, answered EINTR, dies of its signal.
                    assert await reader.wait() == -signum
                    await server.slow_aborted.wait()
            finally:
                if reader.returncode is None:
                    reader.kill()
                    await reader.wait()
            assert fs.cancelled == ["slow"]
            # Still serving.
            status, out = await run_process(sys.executable, "-c", _OTHER_CLIENT, mnt)
            assert status == 0 and json.loads(out)["b"] == FILES["b"].decode()
            assert session.errors == []
    assert not mounted(mnt)


class Probe(afuse.Operations):
    """Records what a handler sees: sniffio, the asyncio task, context variables, the session."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    async def getattr(self, req: afuse.GetattrRequest) -> afuse.Attr:
        await asyncio.sleep(0.001)
        self.seen.append({
            "library": sniffio.current_async_library(),
            "task": asyncio.current_task() is not None,
            "var": VAR.get("unset"),
            "session": afuse.current_session().mountpoint,
        })
        return afuse.Attr(ino=req.nodeid, mode=stat.S_IFDIR | 0o755, nlink=2)


VAR: contextvars.ContextVar[str] = contextvars.ContextVar("VAR")


@pytest.mark.asyncio
async def test_handlers_run_as_asyncio_tasks_in_the_programs_context(mnt: str) -> None:
    VAR.set("from the program")
    ops = Probe()
    async with afuse.asyncio.mount(ops, mnt) as session:
        st = await asyncio.to_thread(os.stat, mnt)
        assert stat.S_ISDIR(st.st_mode)
        assert session.ops is ops
    assert ops.seen and ops.seen[0] == {"library": "asyncio", "task": True, "var": "from the program",
                                        "session": session.mountpoint}
    assert session.closed and not mounted(mnt)


@pytest.mark.asyncio
async def test_hello_asyncio_reads_lists_and_refuses(mnt: str) -> None:
    async with afuse.asyncio.mount(HelloAsyncioFS(), mnt):
        assert await asyncio.to_thread(os.listdir, mnt) == ["hello"]
        assert await asyncio.to_thread(Path(mnt, "hello").read_bytes) == DATA
        with pytest.raises(PermissionError):
            await asyncio.to_thread(open, os.path.join(mnt, "hello"), "wb")
        with pytest.raises(FileNotFoundError):
            await asyncio.to_thread(os.stat, os.path.join(mnt, "nope"))


class Listings(afuse.Operations):
    """readdir in three shapes: a list, an async iterable from a coroutine, an async generator."""

    def __init__(self, shape: str) -> None:
        self.shape = shape
        self.closed = False

    async def getattr(self, req: afuse.GetattrRequest) -> afuse.Attr:
        return afuse.Attr(ino=req.nodeid, mode=stat.S_IFDIR | 0o755, nlink=2)

    def _entries(self, offset: int) -> list[afuse.DirEntry]:
        a = afuse.Attr(ino=5, mode=stat.S_IFREG | 0o644)
        names = [b".", b"..", *(b"f%03d" % i for i in range(300))]
        return [afuse.DirEntry(n, i + 1, a) for i, n in enumerate(names)][offset:]

    async def readdir(self, req: afuse.ReaddirRequest) -> Any:
        if self.shape == "list":
            await asyncio.sleep(0)
            return self._entries(req.offset)
        if self.shape == "aiter":
            await asyncio.sleep(0)
            return self._agen(req.offset)
        return self._agen(req.offset)  # not reached for "agen"

    async def _agen(self, offset: int) -> AsyncIterator[afuse.DirEntry]:
        try:
            for entry in self._entries(offset):
                await asyncio.sleep(0)
                assert sniffio.current_async_library() == "asyncio"
                yield entry
        finally:
            await asyncio.sleep(0)  # asyncio code in the generator's cleanup, too
            self.closed = True


class AgenListings(Listings):
    async def readdir(self, req: afuse.ReaddirRequest) -> AsyncIterator[afuse.DirEntry]:  # type: ignore[override]
        async for entry in self._agen(req.offset):
            yield entry


@pytest.mark.asyncio
@pytest.mark.parametrize("shape", ["list", "aiter", "agen"])
async def test_readdir_shapes(mnt: str, shape: str) -> None:
    ops = AgenListings(shape) if shape == "agen" else Listings(shape)
    async with afuse.asyncio.mount(ops, mnt) as session:
        names = await asyncio.to_thread(os.listdir, mnt)
        assert session.errors == []
    assert names == [f"f{i:03d}" for i in range(300)]
    if shape != "list":
        assert ops.closed  # the generator, stopped at a full reply, was closed in asyncio


def test_only_overridden_handlers_are_bridged() -> None:
    async def check() -> None:
        ops = HelloAsyncioFS()
        bridged = afuse.asyncio.bridge(ops)
        for name in ("getattr", "lookup", "opendir", "readdir", "open", "read"):
            assert overridden(bridged, name), name
        for name in ("write", "readdirplus", "setattr", "getlk", "access", "statx", "release"):
            assert not overridden(bridged, name), name  # still ENOSYS (or default) without a call
        assert afuse.asyncio.bridge(bridged) is bridged
        assert type(afuse.asyncio.bridge(HelloAsyncioFS())) is type(bridged)

    asyncio.run(check())


def test_a_handler_that_is_not_async_is_refused() -> None:
    class Sync(afuse.Operations):
        def getattr(self, req: afuse.GetattrRequest) -> afuse.Attr:  # type: ignore[override]
            return afuse.Attr(ino=1, mode=stat.S_IFDIR | 0o755)

    async def check() -> None:
        with pytest.raises(TypeError, match=r"Sync\.getattr must be an 'async def'"):
            async with afuse.asyncio.mount(Sync(), "/nonexistent"):
                pass

    asyncio.run(check())

    def traced(fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapper(*args: Any) -> Any:
            return fn(*args)  # the coroutine, for the bridge to run

        return wrapper

    class Decorated(HelloAsyncioFS):
        @traced
        async def getattr(self, req: afuse.GetattrRequest) -> afuse.Attr:
            return await super().getattr(req)

    async def accepted() -> None:
        assert overridden(afuse.asyncio.bridge(Decorated()), "getattr")

    asyncio.run(accepted())
    with pytest.raises(TypeError, match=r"afuse\.Operations"):
        afuse.asyncio.bridge(object())  # type: ignore[arg-type]


class Failing(HelloAsyncioFS):
    async def lookup(self, req: afuse.LookupRequest) -> afuse.Entry:
        await asyncio.sleep(0)
        raise RuntimeError("boom in asyncio")


@pytest.mark.asyncio
async def test_handler_exception_is_an_eio_reply_and_kept(mnt: str) -> None:
    async with afuse.asyncio.mount(Failing(), mnt) as session:
        with pytest.raises(OSError) as e:
            await asyncio.to_thread(os.stat, os.path.join(mnt, "hello"))
        assert e.value.errno == errno.EIO
        assert stat.S_ISDIR((await asyncio.to_thread(os.stat, mnt)).st_mode)  # serving on
    assert [str(x) for x in session.errors] == ["boom in asyncio"]


@pytest.mark.asyncio
async def test_exception_in_the_block_unmounts(mnt: str) -> None:
    with pytest.raises(ZeroDivisionError):
        async with afuse.asyncio.mount(HelloAsyncioFS(), mnt):
            assert await asyncio.to_thread(Path(mnt, "hello").read_bytes) == DATA
            1 / 0  # noqa: B018
    assert not mounted(mnt)


@pytest.mark.asyncio
async def test_cancelling_the_task_unmounts(mnt: str) -> None:
    ready = asyncio.Event()

    async def serve() -> None:
        async with afuse.asyncio.mount(HelloAsyncioFS(), mnt):
            ready.set()
            await asyncio.sleep(3600)

    task = asyncio.ensure_future(serve())
    async with asyncio.timeout(TIMEOUT):
        await ready.wait()
    assert mounted(mnt)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not mounted(mnt)


@pytest.mark.asyncio
async def test_cancelling_while_mounting_leaves_nothing(mnt: str) -> None:
    async def serve() -> None:
        async with afuse.asyncio.mount(HelloAsyncioFS(), mnt):
            await asyncio.sleep(3600)

    for delay in (0.0, 0.0005, 0.001, 0.002, 0.004, 0.008):  # at points during mounting, and after
        task = asyncio.ensure_future(serve())
        await asyncio.sleep(delay)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not mounted(mnt)


@pytest.mark.asyncio
async def test_exception_elsewhere_in_the_program_unmounts(mnt: str) -> None:
    ready = asyncio.Event()

    async def serve() -> None:
        async with afuse.asyncio.mount(HelloAsyncioFS(), mnt):
            ready.set()
            await asyncio.sleep(3600)

    async def fail() -> None:
        await ready.wait()
        assert mounted(mnt)
        raise KeyError("elsewhere")

    with pytest.raises(ExceptionGroup) as e:
        async with asyncio.timeout(TIMEOUT), asyncio.TaskGroup() as tg:
            tg.create_task(serve())
            tg.create_task(fail())
    assert e.group_contains(KeyError)
    assert not mounted(mnt)


@pytest.mark.asyncio
async def test_several_mounts_in_one_program(tmp_path: Path) -> None:
    """Mounts share the loop's one trio run: nested, concurrent in tasks, one after another."""
    paths = [str(tmp_path / n) for n in ("a", "b", "c")]
    for p in paths:
        os.mkdir(p)
    try:
        for _ in range(2):  # the trio run ends with the last mount and starts again
            async with afuse.asyncio.mount(HelloAsyncioFS(), paths[0]), \
                    afuse.asyncio.mount(HelloAsyncioFS(), paths[1]):
                assert await asyncio.to_thread(lambda: [Path(p, "hello").read_bytes() for p in paths[:2]]) \
                    == [DATA, DATA]

        async def one(path: str) -> list[str]:
            async with afuse.asyncio.mount(HelloAsyncioFS(), path):
                await asyncio.sleep(0.05)
                return await asyncio.to_thread(os.listdir, path)

        async with asyncio.timeout(TIMEOUT), asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(one(p)) for p in paths]
        assert [t.result() for t in tasks] == [["hello"]] * 3
    finally:
        left = [p for p in paths if mounted(p)]
        for p in left:
            device.unmount(p, lazy=True)
    assert not left


@pytest.mark.asyncio
async def test_mounts_coming_and_going_concurrently(tmp_path: Path) -> None:
    """Mounts starting while the shared trio run is stopping wait for it and start a new one."""
    rng = random.Random(9)
    paths = [str(tmp_path / str(i)) for i in range(6)]
    for p in paths:
        os.mkdir(p)

    async def one(path: str, delay: float, hold: float) -> list[str]:
        await asyncio.sleep(delay)
        async with afuse.asyncio.mount(HelloAsyncioFS(), path):
            names = await asyncio.to_thread(os.listdir, path)
            await asyncio.sleep(hold)
            return names

    try:
        for _ in range(4):
            async with asyncio.timeout(TIMEOUT), asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(one(p, rng.random() * 0.03, rng.random() * 0.01)) for p in paths]
            assert [t.result() for t in tasks] == [["hello"]] * len(paths)
    finally:
        left = [p for p in paths if mounted(p)]
        for p in left:
            device.unmount(p, lazy=True)
    assert not left


@pytest.mark.asyncio
async def test_a_mount_starting_while_the_trio_run_stops_waits_for_a_new_one(mnt: str) -> None:
    """The race the previous test may or may not hit, made to happen."""
    loop = asyncio.get_running_loop()
    host = await afuse.asyncio._acquire_host(loop)
    releasing = asyncio.ensure_future(afuse.asyncio._release_host(host))
    await asyncio.sleep(0)
    assert host.stopping and not host.finished.done()
    async with afuse.asyncio.mount(HelloAsyncioFS(), mnt):
        assert host.finished.done()  # the old run ended before the new one started
        assert await asyncio.to_thread(os.listdir, mnt) == ["hello"]
    await releasing
    assert not afuse.asyncio._hosts


@pytest.mark.asyncio
async def test_unmounted_from_outside_ends_wait_closed(mnt: str) -> None:
    async with afuse.asyncio.mount(HelloAsyncioFS(), mnt) as session:
        await asyncio.to_thread(device.unmount, mnt)
        async with asyncio.timeout(TIMEOUT):
            await session.wait_closed()
        assert session.closed
    # The example's serve_until_unmounted (shown in docs/asyncio.md) returns then, too.
    task = asyncio.ensure_future(serve_until_unmounted(mnt))
    async with asyncio.timeout(TIMEOUT):
        while not mounted(mnt):
            await asyncio.sleep(0.01)
        assert await asyncio.to_thread(os.listdir, mnt) == ["hello"]
        await asyncio.to_thread(device.unmount, mnt)
        await task


@pytest.mark.asyncio
async def test_hello_asyncio(tmp_path: Path) -> None:
    async with afuse.asyncio.mount(HelloAsyncioFS(), tmp_path) as fs:
        assert await asyncio.to_thread(os.listdir, tmp_path) == ["hello"]
    assert fs.errors == []


@pytest.mark.asyncio
async def test_mount_failure_is_a_plain_exception(tmp_path: Path) -> None:
    with pytest.raises(afuse.MountError):
        async with afuse.asyncio.mount(HelloAsyncioFS(), str(tmp_path / "missing")):
            raise AssertionError("not reached")


class CountingLookups(HelloAsyncioFS):
    entry_timeout = 3600.0

    def __init__(self) -> None:
        super().__init__()
        self.lookups = 0

    async def lookup(self, req: afuse.LookupRequest) -> afuse.Entry:
        self.lookups += 1
        return await super().lookup(req)


@pytest.mark.asyncio
async def test_call_trio_runs_afuse_trio_api(mnt: str) -> None:
    ops = CountingLookups()
    hello = os.path.join(mnt, "hello")
    async with afuse.asyncio.mount(ops, mnt) as session:
        await asyncio.to_thread(os.stat, hello)
        await asyncio.to_thread(os.stat, hello)
        assert ops.lookups == 1  # cached
        # afuse.notify is trio code: run it in the session's trio run.
        await session.call_trio(afuse.notify.inval_entry, session.session, ROOT, b"hello")
        await asyncio.to_thread(os.stat, hello)
        assert ops.lookups == 2
        with pytest.raises(ValueError, match="from trio"):
            await session.call_trio(_raise_in_trio)
        # Cancelling the caller cancels the trio function.
        log: list[str] = []
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await session.call_trio(_sleep_recording, log)
        assert log == ["cancelled"]
        assert await session.call_trio(_add, 2, 3) == 5
    assert not mounted(mnt)


async def _sleep_recording(log: list[str]) -> None:
    try:
        await trio.sleep_forever()
    except trio.Cancelled:
        log.append("cancelled")
        raise


async def _add(a: int, b: int) -> int:
    await trio.sleep(0)
    return a + b


async def _raise_in_trio() -> None:
    assert sniffio.current_async_library() == "trio"
    raise ValueError("from trio")


# -- processes: the run helper and the example, stopped by signals ---------------------------------

def wait_mounted(proc: subprocess.Popen[bytes], path: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not mounted(path):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "not mounted in time"
        time.sleep(0.02)


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 0), (signal.SIGINT, 130), (signal.SIGHUP, 0)])
def test_example_stops_on_signals_and_unmounts(mnt: str, signum: int, status: int) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "afuse.examples.hello_asyncio", mnt],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_mounted(proc, mnt)
        assert Path(mnt, "hello").read_bytes() == DATA
        proc.send_signal(signum)
        _out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == status, err
    assert b"Traceback" not in err
    assert not mounted(mnt)


def test_example_help() -> None:
    out = subprocess.run([sys.executable, "-m", "afuse.examples.hello_asyncio", "--help"],
                         capture_output=True, text=True, check=True, timeout=TIMEOUT).stdout
    assert out.startswith("usage: python -m afuse.examples.hello_asyncio")
    assert "MOUNTPOINT" in out.upper()


_STUCK_SERVER = textwrap.dedent(
    """
    import asyncio, errno, stat, sys
    import afuse, afuse.asyncio

    FILE = afuse.Attr(ino=2, mode=stat.S_IFREG | 0o444, nlink=1, size=100)

    class Stuck(afuse.Operations):
        async def getattr(self, req):
            return afuse.Attr(ino=1, mode=stat.S_IFDIR | 0o755, nlink=2) if req.nodeid == 1 else FILE
        async def lookup(self, req):
            return afuse.Entry(2, FILE)
        async def open(self, req):
            return afuse.Handle(flags=afuse.FOpen.DIRECT_IO)
        async def read(self, req):
            print("reading", flush=True)
            await asyncio.Event().wait()  # never answers

    print(afuse.asyncio.run(Stuck(), sys.argv[1]), flush=True)
    """
)


def test_sigterm_with_a_request_in_flight_unmounts(mnt: str) -> None:
    """A process serving with afuse.asyncio.run, one READ stuck forever, gets SIGTERM."""
    proc = subprocess.Popen([sys.executable, "-c", _STUCK_SERVER, mnt], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    reader = None
    try:
        wait_mounted(proc, mnt)
        reader = subprocess.Popen([sys.executable, "-c", "import sys; open(sys.argv[1], 'rb').read()",
                                   os.path.join(mnt, "f")], stderr=subprocess.DEVNULL)
        assert proc.stdout is not None
        assert select.select([proc.stdout], [], [], TIMEOUT)[0], "the READ did not arrive"
        assert proc.stdout.readline() == b"reading\n"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=TIMEOUT)
        assert reader.wait(timeout=TIMEOUT) != 0  # its read failed (EINTR or ENOTCONN)
    finally:
        for p in (proc, reader):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    assert proc.returncode == 0, err
    assert out.strip() == str(int(signal.SIGTERM)).encode()
    assert not mounted(mnt)


_PROGRAM = textwrap.dedent(
    """
    import asyncio, sys
    import afuse.asyncio
    from afuse.examples.hello_asyncio import HelloAsyncioFS

    async def main():
        async with afuse.asyncio.mount(HelloAsyncioFS(), sys.argv[1]):
            print("mounted", flush=True)
            if sys.argv[2] == "raise":
                await asyncio.sleep(0.1)
                raise RuntimeError("the program failed")
            await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("how", ["raise", "sigint"])
def test_an_asyncio_program_leaves_no_mount(mnt: str, how: str) -> None:
    """asyncio.run(main()) with the mount in main: an exception in the block, and Ctrl-C (which
    asyncio.run turns into cancelling main, then KeyboardInterrupt)."""
    proc = subprocess.Popen([sys.executable, "-c", _PROGRAM, mnt, how], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert select.select([proc.stdout], [], [], TIMEOUT)[0], "not mounted in time"
        assert proc.stdout.readline() == b"mounted\n"
        assert mounted(mnt)
        if how == "sigint":
            proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if how == "raise":
        assert proc.returncode == 1 and b"RuntimeError: the program failed" in err
    else:
        assert proc.returncode in (1, -signal.SIGINT) and b"KeyboardInterrupt" in err
    assert not mounted(mnt)


def test_overhead_benchmark_runs(tmp_path: Path) -> None:
    """benchmarks/asyncio_overhead.py --quick measures both forms (nothing asserted about speed)."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "asyncio_overhead.py"
    out = tmp_path / "figures.json"
    subprocess.run([sys.executable, str(script), "--quick", "--json", str(out)], check=True,
                   capture_output=True, timeout=120)
    figures = json.loads(out.read_text())
    assert figures["calls"] == 300
    assert figures["trio_us_per_stat"] > 0 and figures["asyncio_us_per_stat"] > 0


# -- plain synchronous tests of asyncio filesystems --------------------------------------------------

def test_fuse_mount_asyncio(fuse_mount_asyncio: Any) -> None:
    m = fuse_mount_asyncio(HelloAsyncioFS())
    assert os.listdir(m.path) == ["hello"]
    with open(m.join("hello"), "rb") as f:
        assert f.read() == DATA


def test_asyncio_mounted_reraises_handler_errors_and_unmounts() -> None:
    with pytest.raises(testing.HandlerErrors) as e:
        with testing.asyncio_mounted(Failing()) as m:
            with pytest.raises(OSError):
                os.stat(m.join("hello"))
    assert str(e.value.__cause__) == "boom in asyncio"
    assert not mounted(m.path)


def test_asyncio_mounted_mount_failure_is_raised(tmp_path: Path) -> None:
    with pytest.raises(afuse.MountError):
        with testing.asyncio_mounted(HelloAsyncioFS(), mountpoint=str(tmp_path / "missing")):
            raise AssertionError("not reached")


@pytest.mark.parametrize(("args", "status", "message"), [
    (["/nonexistent/afuse-mnt"], 1, "does not exist"),
    (["-o", "bogus_opt"], 2, "unknown mount option 'bogus_opt'"),
])
def test_example_reports_bad_input(tmp_path: Path, args: list[str], status: int, message: str) -> None:
    if args[0] == "-o":
        args = [str(tmp_path), *args]
    done = subprocess.run([sys.executable, "-m", "afuse.examples.hello_asyncio", *args],
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == status
    assert message in done.stderr and "Traceback" not in done.stderr


class _SlowNode(afuse.nodes.Node):
    """A file whose read awaits asyncio code through run_asyncio (trio handlers, asyncio I/O)."""

    def __init__(self) -> None:
        super().__init__(stat.S_IFREG | 0o444)
        self.started = trio.Event()
        self.cancelled: list[str] = []
        self.slow = True
        self.fopen = afuse.FOpen.DIRECT_IO  # reads not through the page cache: a signal interrupts them

    async def getattr(self) -> afuse.Attr:
        return afuse.Attr(mode=self.mode, size=5)

    async def read(self, offset: int, size: int) -> bytes:
        assert sniffio.current_async_library() == "trio"

        async def fetch() -> bytes:
            assert sniffio.current_async_library() == "asyncio" and asyncio.current_task() is not None
            self.started.set()  # trio's Event.set is synchronous: fine from asyncio in the same thread
            try:
                await asyncio.sleep(3600 if self.slow else 0)
            except asyncio.CancelledError:
                self.cancelled.append("fetch")
                raise
            return b"hello"[offset:offset + size]

        return await afuse.asyncio.run_asyncio(fetch())


@pytest.mark.asyncio
async def test_trio_handlers_reach_asyncio_with_run_asyncio(mnt: str) -> None:
    node = _SlowNode()
    fs = afuse.nodes.NodeFS(afuse.nodes.Dir({"f": node}))
    async with afuse.asyncio.mount(fs, mnt, trio_handlers=True) as session:
        assert session.ops is fs and session.session.ops is fs  # served as it is, not bridged
        reader = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "import sys; open(sys.argv[1], 'rb').read()", os.path.join(mnt, "f"))
        try:
            async with asyncio.timeout(TIMEOUT):
                while not node.started.is_set():
                    await asyncio.sleep(0.01)
                reader.send_signal(signal.SIGINT)  # INTERRUPT: the trio handler and its asyncio task end
                assert await reader.wait() == -signal.SIGINT
                while not node.cancelled:
                    await asyncio.sleep(0.01)
        finally:
            if reader.returncode is None:
                reader.kill()
                await reader.wait()
        node.slow = False
        status, out = await run_process("cat", os.path.join(mnt, "f"))
        assert (status, out) == (0, "hello")
        assert node.cancelled == ["fetch"] and session.errors == []
    assert not mounted(mnt)
