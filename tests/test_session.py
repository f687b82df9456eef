"""The session against the real kernel: serving, interrupts, failures, unmounting."""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import trio

import afuse
from afuse import testing
from afuse.examples.hello import DATA, HelloFS
from afuse.testing import MountFactory, ProcessMountFactory


def test_hello_read_and_list(fuse_mount: MountFactory) -> None:
    m = fuse_mount(HelloFS())
    assert os.listdir(m.path) == ["hello"]
    with open(m.join("hello"), "rb") as f:
        assert f.read() == DATA
    st = os.stat(m.join("hello"))
    assert stat.S_ISREG(st.st_mode) and st.st_size == len(DATA)
    with pytest.raises(PermissionError):
        open(m.join("hello"), "wb")
    with pytest.raises(FileNotFoundError):
        os.stat(m.join("nope"))


def test_mounted_shows_in_mountinfo(fuse_mount: MountFactory) -> None:
    m = fuse_mount(HelloFS(), options="fsname=afuse-hello,subtype=hello")
    found = [(mp, t, src) for mp, t, src in afuse.device.find_mounts() if mp == os.path.realpath(m.path)]
    assert found == [(os.path.realpath(m.path), "fuse.hello", "afuse-hello")]


def test_negotiated_flags_visible(fuse_mount: MountFactory) -> None:
    m = fuse_mount(HelloFS())
    neg = m.session.negotiated
    assert neg is not None and neg.minor == 45
    assert neg.offered & afuse.InitFlag.HAS_RESEND
    assert neg.has(afuse.InitFlag.MAX_PAGES)
    assert not neg.has(afuse.InitFlag.POSIX_LOCKS)  # HelloFS has no lock handlers
    assert neg.max_write == 1 << 20


class Blocking(HelloFS):
    """Looking up "block" blocks until cancelled (a lookup's caller is interruptible; a
    page-cache read's is not)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = trio.Event()
        self.cancelled = False

    async def lookup(self, req: afuse.LookupRequest) -> afuse.Entry:
        if req.name != b"block":
            return await super().lookup(req)
        self.entered.set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            self.cancelled = True
            raise
        raise AssertionError("unreachable")


_READ_CHILD = textwrap.dedent(
    """
    import ctypes, os, signal, sys
    signal.signal(signal.SIGUSR1, lambda *a: None)
    libc = ctypes.CDLL(None, use_errno=True)
    print("reading", flush=True)
    n = libc.access(sys.argv[1].encode(), os.F_OK)
    print(n, ctypes.get_errno(), flush=True)
    """
)


def test_interrupt_cancels_handler_and_caller_gets_eintr(fuse_mount: MountFactory) -> None:
    ops = Blocking()
    m = fuse_mount(ops)
    assert interrupt_blocked_lookup(m, ops) == (-1, errno.EINTR)
    assert ops.cancelled


class Crashing(HelloFS):
    attr_timeout = 0.0

    crash = True

    async def getattr(self, req: afuse.GetattrRequest) -> afuse.Attr:
        if req.nodeid == 2 and self.crash:
            raise RuntimeError("boom")
        return await super().getattr(req)

    async def opendir(self, req: afuse.OpendirRequest) -> afuse.Handle:
        return "not a handle"  # type: ignore[return-value]


def test_crashing_handler_answers_eio_and_session_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    ops = Crashing()
    with testing.mounted(ops, raise_handler_errors=False) as m:
        with pytest.raises(OSError) as e:
            os.stat(m.join("hello"))
        assert e.value.errno == errno.EIO
        with pytest.raises(OSError) as e:
            os.listdir(m.path)
        assert e.value.errno == errno.EIO
        # still serving
        ops.crash = False
        assert stat.S_ISDIR(os.stat(m.path).st_mode)
        with open(m.join("hello"), "rb") as f:
            assert f.read() == DATA
        errors = list(m.session.errors)
    assert any(isinstance(x, RuntimeError) and str(x) == "boom" for x in errors)
    assert any("must return a Handle" in str(x) for x in errors)
    assert "boom" in caplog.text


def test_handler_errors_reraised_at_teardown() -> None:
    with pytest.raises(testing.HandlerErrors) as e:
        with testing.mounted(Crashing()) as m:
            with pytest.raises(OSError):
                os.stat(m.join("hello"))
    assert isinstance(e.value.__cause__, RuntimeError)


def test_outside_unmount_ends_serving_cleanly(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="afuse")
    with testing.mounted(HelloFS()) as m:
        assert os.listdir(m.path) == ["hello"]
        subprocess.run(["umount", m.path], check=True)
        deadline = time.monotonic() + 10
        while not m.session.closed and time.monotonic() < deadline:
            time.sleep(0.01)
        assert m.session.closed
    assert "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_debug_log_names_each_request(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="afuse")
    with testing.mounted(HelloFS()) as m:
        os.stat(m.join("hello"))
        with pytest.raises(FileNotFoundError):
            os.stat(m.join("missing"))
    lines = [r.getMessage() for r in caplog.records]
    # Each request when it arrives, with its arguments and caller ...
    assert any(line.startswith("-> LOOKUP unique=") and "nodeid=1 " in line and "name=b'hello'" in line
               and f"pid={os.getpid()}" in line for line in lines), lines
    # ... and its reply, with the errno's name or the size, and the time taken.
    assert any(line.startswith("<- LOOKUP unique=") and ": OK, 128 bytes in " in line and line.endswith(" us")
               for line in lines), lines
    assert any(line.startswith("<- LOOKUP") and ": ENOENT in " in line for line in lines)
    # INIT's flags by name, not as a number.
    assert any(line.startswith("INIT: negotiated 7.") and "ASYNC_READ" in line for line in lines), lines


def test_several_mounts_in_one_process(fuse_mount: MountFactory) -> None:
    mounts = [fuse_mount(HelloFS()) for _ in range(3)]
    for m in mounts:
        with open(m.join("hello"), "rb") as f:
            assert f.read() == DATA
    assert len({m.path for m in mounts}) == 3


def test_unknown_mount_option_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(afuse.MountError) as e:
        with testing.mounted(HelloFS(), options="allow_other,bogus_option"):
            pass
    assert "bogus_option" in str(e.value)


def test_mmap_through_subprocess_mode(fuse_mount_process: ProcessMountFactory) -> None:
    m = fuse_mount_process("afuse.examples.hello:HelloFS")
    with open(m.join("hello"), "rb") as f:
        with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
            assert mm[:] == DATA


@pytest.mark.trio
async def test_trio_native_form() -> None:
    async with testing.trio_mount(HelloFS()) as session:
        data = await trio.Path(session.mountpoint, "hello").read_bytes()
        assert data == DATA
        names = await trio.to_thread.run_sync(os.listdir, session.mountpoint)
        assert names == ["hello"]


@pytest.mark.trio
async def test_nursery_start_form_and_cancel_unmounts(tmp_path: Path) -> None:
    mp = str(tmp_path / "mnt")
    os.mkdir(mp)
    async with trio.open_nursery() as nursery:
        session = await nursery.start(afuse.serve, HelloFS(), mp)
        assert isinstance(session, afuse.Session)
        st = await trio.to_thread.run_sync(os.stat, os.path.join(mp, "hello"))
        assert st.st_size == len(DATA)
        nursery.cancel_scope.cancel()
    assert session.closed
    assert os.path.realpath(mp) not in [x[0] for x in afuse.device.find_mounts()]


@pytest.mark.trio
async def test_async_with_mount_form(tmp_path: Path) -> None:
    mp = str(tmp_path / "mnt")
    os.mkdir(mp)
    async with afuse.mount(HelloFS(), mp, options="subtype=hello") as session:
        assert await trio.to_thread.run_sync(os.listdir, mp) == ["hello"]
    assert session.closed
    assert os.path.realpath(mp) not in [x[0] for x in afuse.device.find_mounts()]


def test_libc_errno_through_ctypes_stat(fuse_mount: MountFactory) -> None:
    """A negative errno from a handler reaches a C caller unchanged."""
    m = fuse_mount(HelloFS())
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.access(m.join("nope").encode(), os.F_OK) == -1
    assert ctypes.get_errno() == errno.ENOENT


class ScopedWaits(HelloFS):
    """Handlers whose first blocking point is inside their own cancel scopes."""

    attr_timeout = 0.0

    def __init__(self) -> None:
        super().__init__()
        self.entered = trio.Event()
        self.cancelled = False

    async def getattr(self, req: afuse.GetattrRequest) -> afuse.Attr:
        await trio.sleep(0.001)  # a cancel scope inside trio.sleep
        with trio.move_on_after(5):
            await trio.to_thread.run_sync(time.sleep, 0.001)
        async with trio.open_nursery() as n:
            n.start_soon(trio.sleep, 0.001)
        return await super().getattr(req)

    async def lookup(self, req: afuse.LookupRequest) -> afuse.Entry:
        if req.name != b"block":
            return await super().lookup(req)
        self.entered.set()
        try:
            await trio.sleep(3600)
        except trio.Cancelled:
            self.cancelled = True
            raise
        raise AssertionError("unreachable")


def test_handlers_with_their_own_cancel_scopes(fuse_mount: MountFactory) -> None:
    ops = ScopedWaits()
    m = fuse_mount(ops)
    for _ in range(20):
        assert os.stat(m.join("hello")).st_size == len(DATA)


def test_interrupt_of_a_handler_waiting_inside_its_own_scope(fuse_mount: MountFactory) -> None:
    ops = ScopedWaits()
    m = fuse_mount(ops)
    assert interrupt_blocked_lookup(m, ops) == (-1, errno.EINTR)
    assert ops.cancelled
    # the worker that was interrupted was replaced: the session still serves, many times over
    for _ in range(50):
        assert os.stat(m.join("hello")).st_size == len(DATA)


class NurseryWaits(ScopedWaits):
    """Looking up "block" waits in a nursery of its own: cancelled, it raises a group of Cancelled."""

    async def lookup(self, req: afuse.LookupRequest) -> afuse.Entry:
        if req.name != b"block":
            return await super().lookup(req)
        self.entered.set()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.sleep, 3600)
                await trio.sleep(3600)
        except BaseException:
            self.cancelled = True
            raise
        raise AssertionError("unreachable")


def test_interrupt_of_a_handler_waiting_in_a_nursery(fuse_mount: MountFactory) -> None:
    ops = NurseryWaits()
    m = fuse_mount(ops)
    assert interrupt_blocked_lookup(m, ops) == (-1, errno.EINTR)  # answered, not lost with its worker
    assert ops.cancelled
    for _ in range(50):  # and the worker was replaced
        assert os.stat(m.join("hello")).st_size == len(DATA)


def interrupt_blocked_lookup(m: testing.MountedFS, ops: Blocking | ScopedWaits) -> tuple[int, int]:
    """A child looks up "block" (which blocks), gets SIGUSR1; returns its access() result and errno."""
    child = subprocess.Popen([sys.executable, "-c", _READ_CHILD, m.join("block")],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "reading"
        deadline = time.monotonic() + 10
        while not ops.entered.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ops.entered.is_set()
        child.send_signal(signal.SIGUSR1)
        out, _ = child.communicate(timeout=10)
    finally:
        child.kill()
    n, err = map(int, out.split())
    return n, err


@pytest.mark.trio
async def test_cancelling_serve_at_any_point_of_startup_leaves_nothing(tmp_path: Path) -> None:
    """Cancelled while mounting, negotiating, starting its readers or serving: serve() returns
    promptly and nothing stays mounted (the readers run shielded: every way out stops them)."""
    mp = str(tmp_path / "mnt")
    os.mkdir(mp)
    for delay in (0.0, 0.0002, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.05):
        with trio.fail_after(30):
            with trio.move_on_after(delay):
                async with trio.open_nursery() as nursery:
                    await nursery.start(afuse.serve, HelloFS(), mp)
                    await trio.sleep_forever()
        assert os.path.realpath(mp) not in [m for m, _t, _s in afuse.device.find_mounts("")], delay


def test_poll_us_serves_while_polling() -> None:
    """``serve(poll_us=...)``: readers busy-poll an empty device before waiting; requests are
    served as usual (from threads on other CPUs, the case polling is for)."""
    with testing.mounted(HelloFS(), poll_us=200) as m:
        expected = 200_000 if len(os.sched_getaffinity(0)) > 1 else 0  # off on one CPU
        assert m.session.pool.poll_ns == expected
        results: list[bytes] = []

        def reader() -> None:
            for _ in range(50):
                with open(m.join("hello"), "rb") as f:
                    results.append(f.read())
                os.stat(m.join("hello"))

        threads = [threading.Thread(target=reader) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == [DATA] * 200


def test_poll_us_refuses_negative() -> None:
    with pytest.raises(ValueError, match="poll_us"), testing.mounted(HelloFS(), poll_us=-1):
        pass


def test_poll_us_option_of_the_examples(tmp_path: Path) -> None:
    """``--poll-us``: a bad value is a usage error (exit 2); a good one serves."""
    bad = subprocess.run([sys.executable, "-m", "afuse.examples.hello", str(tmp_path), "--poll-us", "-5"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--poll-us" in bad.stderr, bad.stderr
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    errlog = tmp_path / "hello.log"  # a file, not a pipe nobody reads: the daemon can never block on it
    with open(errlog, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "afuse.examples.hello", str(mnt), "--poll-us", "50"],
                                stderr=err)
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mnt) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.path.ismount(mnt), errlog.read_text()
        assert (mnt / "hello").read_bytes() == DATA
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            subprocess.run(["umount", "-l", str(mnt)], check=False)
    assert proc.returncode == 0
