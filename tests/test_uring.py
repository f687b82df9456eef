"""FUSE over io_uring against the real kernel: serving, concurrency, interrupts, refusal, teardown.

Each test turns the fuse module parameter ``enable_uring`` on (or off) through the
``enable_uring`` / ``disable_uring`` fixtures, which restore its earlier value however the test
ends. The rest of the mount suite runs over io_uring with ``AFUSE_TEST_IO_URING=1`` (docs/uring.md).
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import pytest
import trio

import afuse
from afuse import testing, uring
from afuse.examples.hello import DATA, HelloFS
from afuse.examples.memfs import MemFS
from afuse.testing import MountFactory


@pytest.fixture
def enable_uring(fuse_available: None) -> Iterator[None]:
    """enable_uring=Y for the test; its earlier value afterwards, even on failure."""
    before = uring.uring_enabled()
    with uring.uring_parameter(True):
        yield
    assert uring.uring_enabled() == before


@pytest.fixture
def disable_uring(fuse_available: None) -> Iterator[None]:
    """enable_uring=N for the test; its earlier value afterwards, even on failure."""
    before = uring.uring_enabled()
    with uring.uring_parameter(False):
        yield
    assert uring.uring_enabled() == before


def test_parameter_is_restored_after_a_failure(fuse_available: None) -> None:
    before = uring.uring_enabled()
    with pytest.raises(RuntimeError), uring.uring_parameter(not before):
        assert uring.uring_enabled() == (not before)
        raise RuntimeError("the block fails")
    assert uring.uring_enabled() == before


def test_memfs_over_io_uring(enable_uring: None, fuse_mount: MountFactory) -> None:
    m = fuse_mount(MemFS(), io_uring=True)
    assert m.session.transport == "io_uring"
    ring = m.session.uring
    assert ring is not None and ring.queues == uring.possible_cpus()
    os.mkdir(m.join("d"))
    with open(m.join("d", "small"), "w") as f:
        f.write("hello\n")
    big = os.urandom(3 * 1024 * 1024 + 123)  # several full 1 MiB payloads and a partial one
    with open(m.join("big"), "wb") as f:
        f.write(big)
    os.sync()
    with open(m.join("big"), "rb") as f:
        assert f.read() == big
    os.rename(m.join("d", "small"), m.join("d", "renamed"))
    assert sorted(os.listdir(m.path)) == ["big", "d"]
    assert os.listdir(m.join("d")) == ["renamed"]
    os.setxattr(m.join("big"), "user.k", b"v" * 300)
    assert os.getxattr(m.join("big"), "user.k") == b"v" * 300
    os.truncate(m.join("big"), 10)
    assert os.stat(m.join("big")).st_size == 10
    os.unlink(m.join("big"))
    with pytest.raises(FileNotFoundError):
        os.stat(m.join("big"))
    with pytest.raises(FileExistsError):
        os.mkdir(m.join("d"))
    # Every request with a reply came through the ring, none through /dev/fuse.
    assert ring.served > 20
    assert ring.served == m.session.served


class Counting(HelloFS):
    """HelloFS with attributes never cached, names of its own making, and FORGETs counted."""

    attr_timeout = 0.0

    def __init__(self) -> None:
        super().__init__()
        self.forgets = 0

    async def forget(self, req: afuse.ForgetRequest) -> None:
        self.forgets += len(req.items)
        await super().forget(req)


def test_forget_still_comes_through_dev_fuse(enable_uring: None, fuse_mount: MountFactory) -> None:
    ops = Counting()
    m = fuse_mount(ops, io_uring=True)
    for _ in range(5):
        os.stat(m.join("hello"))
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2")  # the dentry of "hello" goes: the kernel sends FORGET
    deadline = time.monotonic() + 10
    while not ops.forgets and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ops.forgets >= 1
    assert m.session.uring is not None and m.session.uring.served == m.session.served


class SlowAttrs(HelloFS):
    """Every GETATTR blocks briefly; records how many were waiting at once."""

    attr_timeout = 0.0

    def __init__(self) -> None:
        super().__init__()
        self.now = 0
        self.most = 0

    async def getattr(self, req: afuse.GetattrRequest) -> afuse.Attr:
        self.now += 1
        self.most = max(self.most, self.now)
        try:
            await trio.sleep(0.002)
            return await super().getattr(req)
        finally:
            self.now -= 1


def test_eight_parallel_clients_with_blocking_handlers(enable_uring: None, fuse_mount: MountFactory) -> None:
    ops = SlowAttrs()
    m = fuse_mount(ops, io_uring=True, io_uring_depth=4)
    results: list[int] = []
    errors: list[BaseException] = []

    def client() -> None:
        try:
            for _ in range(40):
                results.append(os.stat(m.join("hello")).st_size)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert not errors
    assert results == [len(DATA)] * 320
    assert ops.most > 1  # handlers really waited side by side (ring tasks handed the ring on)
    assert m.session.uring is not None and m.session.uring.served == m.session.served


class Blocking(HelloFS):
    """Looking up "block" waits until cancelled (``in_nursery``: in a nursery of its own, whose
    cancellation raises a group of Cancelled, not Cancelled)."""

    def __init__(self, in_nursery: bool = False) -> None:
        super().__init__()
        self.in_nursery = in_nursery
        self.entered = threading.Event()
        self.cancelled = False

    async def lookup(self, req: afuse.LookupRequest) -> afuse.Entry:
        if req.name != b"block":
            return await super().lookup(req)
        self.entered.set()
        try:
            if self.in_nursery:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(trio.sleep_forever)
                    await trio.sleep_forever()
            else:
                await trio.sleep_forever()
        except BaseException:
            self.cancelled = True
            raise
        raise AssertionError("unreachable")


_ACCESS_CHILD = textwrap.dedent(
    """
    import ctypes, os, signal, sys
    signal.signal(signal.SIGUSR1, lambda *a: None)
    libc = ctypes.CDLL(None, use_errno=True)
    print("reading", flush=True)
    n = libc.access(sys.argv[1].encode(), os.F_OK)
    print(n, ctypes.get_errno(), flush=True)
    """
)


@pytest.mark.parametrize("in_nursery", [False, True], ids=["plain", "in-nursery"])
def test_interrupt_reaches_a_handler_served_from_the_ring(enable_uring: None, fuse_mount: MountFactory,
                                                         in_nursery: bool) -> None:
    ops = Blocking(in_nursery)
    m = fuse_mount(ops, io_uring=True)
    child = subprocess.Popen([sys.executable, "-c", _ACCESS_CHILD, m.join("block")], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "reading"
        assert ops.entered.wait(10)
        child.send_signal(signal.SIGUSR1)  # the kernel sends INTERRUPT through /dev/fuse
        out, _ = child.communicate(timeout=10)
    finally:
        child.kill()
        child.wait()
    assert out.split() == ["-1", str(errno.EINTR)]
    assert ops.cancelled
    for _ in range(20):  # the interrupted ring task was replaced: serving goes on
        assert os.stat(m.join("hello")).st_size == len(DATA)


class NurseryAttrs(HelloFS):
    """GETATTR waits in a nursery of its own (where an INTERRUPT finds it: a group of Cancelled
    comes out); counts the interrupted ones."""

    attr_timeout = 0.0

    def __init__(self) -> None:
        super().__init__()
        self.interrupted = 0

    async def getattr(self, req: afuse.GetattrRequest) -> afuse.Attr:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.sleep, 0.004)
                await trio.sleep(0.002)
        except BaseException:
            self.interrupted += 1
            raise
        return await super().getattr(req)


_STAT_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    signal.signal(signal.SIGUSR1, lambda *a: None)
    print("ready", flush=True)
    for _ in range(int(sys.argv[2])):
        while True:
            try:
                assert os.stat(sys.argv[1]).st_size > 0
                break
            except InterruptedError:  # an interrupted GETATTR: try again, as a C caller does
                pass
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # signals still on their way kill no one
    print("done", flush=True)
    """
)


@pytest.mark.parametrize("transport", ["/dev/fuse", "io_uring"])
def test_interrupt_storm_loses_no_request(request: pytest.FixtureRequest, fuse_mount: MountFactory,
                                         transport: str) -> None:
    """Four processes stat a file whose GETATTR waits in a nursery while they are showered with
    signals (so with INTERRUPTs): every request is answered, none left waiting, and serving goes on."""
    if transport == "io_uring":
        request.getfixturevalue("enable_uring")
    ops = NurseryAttrs()
    m = fuse_mount(ops, io_uring=transport == "io_uring")
    assert m.session.transport == transport
    children = [subprocess.Popen([sys.executable, "-c", _STAT_CHILD, m.join("hello"), "150"],
                                 stdout=subprocess.PIPE, text=True) for _ in range(4)]
    try:
        for child in children:
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 60
        while any(c.poll() is None for c in children) and time.monotonic() < deadline:
            for child in children:
                if child.poll() is None:
                    child.send_signal(signal.SIGUSR1)
            time.sleep(0.02)  # a GETATTR takes ~5 ms: about one in four is interrupted
        outs = [child.communicate(timeout=10)[0] for child in children]
    finally:
        for child in children:
            child.kill()
            child.wait()
    assert [c.returncode for c in children] == [0] * 4
    assert [out.split() for out in outs] == [["done"]] * 4
    assert ops.interrupted > 0  # INTERRUPTs really reached handlers waiting in their nurseries
    for _ in range(20):
        assert os.stat(m.join("hello")).st_size == len(DATA)


class SlowMissing(HelloFS):
    """Looking up "slow..." takes 0.3 s (then: no such file); counts the interrupted ones."""

    def __init__(self) -> None:
        super().__init__()
        self.interrupted = 0

    async def lookup(self, req: afuse.LookupRequest) -> afuse.Entry:
        if req.name.startswith(b"slow"):
            try:
                await trio.sleep(0.3)
            except trio.Cancelled:
                self.interrupted += 1
                raise
        return await super().lookup(req)


def test_thread_that_served_a_ring_gets_no_spurious_interrupt(enable_uring: None, fuse_mount: MountFactory) -> None:
    """Freeing a ring, the kernel interrupts every thread that used it (TWA_SIGNAL task work): a
    FUSE call this thread makes right after serving a ring in its own trio loop must not be
    answered EINTR by that (serve waits until the kernel has freed the ring)."""
    ops = SlowMissing()
    m = fuse_mount(ops, io_uring=False)  # served in another thread; any transport would do
    libc = ctypes.CDLL(None, use_errno=True)

    async def serve_a_ring_here() -> None:
        async with testing.trio_mount(HelloFS(), io_uring=True) as session:
            assert session.transport == "io_uring"
            assert await trio.to_thread.run_sync(os.listdir, session.mountpoint) == ["hello"]

    for i in range(3):
        trio.run(serve_a_ring_here)
        assert libc.access(m.join(f"slow{i}").encode(), os.F_OK) == -1  # no retry, as a C caller
        assert ctypes.get_errno() == errno.ENOENT
    assert ops.interrupted == 0


def test_true_raises_a_clear_error_when_the_kernel_refuses(disable_uring: None) -> None:
    with pytest.raises(uring.UringUnavailable, match="enable_uring is N"):
        with testing.mounted(HelloFS(), io_uring=True):
            pass


def test_auto_falls_back_to_dev_fuse(disable_uring: None, fuse_mount: MountFactory) -> None:
    m = fuse_mount(HelloFS(), io_uring="auto")
    assert m.session.transport == "/dev/fuse" and m.session.uring is None
    with open(m.join("hello"), "rb") as f:
        assert f.read() == DATA


def test_auto_uses_the_ring_when_offered(enable_uring: None, fuse_mount: MountFactory) -> None:
    m = fuse_mount(HelloFS(), io_uring="auto")
    assert m.session.transport == "io_uring"
    with open(m.join("hello"), "rb") as f:
        assert f.read() == DATA


def test_bad_arguments_are_refused_before_mounting(fuse_available: None) -> None:
    with pytest.raises(ValueError, match="io_uring must be"):
        with testing.mounted(HelloFS(), io_uring="yes"):
            pass
    with pytest.raises(ValueError, match="io_uring_depth"):
        with testing.mounted(HelloFS(), io_uring=True, io_uring_depth=0):
            pass


def test_abort_ends_serving_and_closes_the_ring(enable_uring: None) -> None:
    with testing.mounted(HelloFS(), io_uring=True, timeout=10) as m:
        ring = m.session.uring
        assert ring is not None
        assert os.stat(m.join("hello")).st_size == len(DATA)
        m.session.mount.abort()
        deadline = time.monotonic() + 10
        while not m.session.closed and time.monotonic() < deadline:
            time.sleep(0.01)
        assert m.session.closed  # the readers saw ENODEV, the ring entries ENOTCONN
    assert ring.fd == -1  # unmapped and closed


def test_unmount_from_outside_ends_serving(enable_uring: None) -> None:
    with testing.mounted(HelloFS(), io_uring=True, timeout=10) as m:
        ring = m.session.uring
        assert ring is not None
        assert os.listdir(m.path) == ["hello"]
        afuse.device.unmount(m.path)
        deadline = time.monotonic() + 10
        while not m.session.closed and time.monotonic() < deadline:
            time.sleep(0.01)
        assert m.session.closed
    assert ring.fd == -1


def test_example_command_line_flag(enable_uring: None, tmp_path: os.PathLike[str]) -> None:
    mnt = os.path.join(tmp_path, "mnt")
    os.mkdir(mnt)
    proc = subprocess.Popen([sys.executable, "-m", "afuse.examples.hello", "--io-uring", mnt],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not os.path.ismount(mnt) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.path.ismount(mnt)
        with open(os.path.join(mnt, "hello"), "rb") as f:
            assert f.read() == DATA
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if os.path.ismount(mnt):
            afuse.device.unmount(mnt, lazy=True)
    assert proc.returncode == 0, err
    assert "serving over io_uring" in err


def test_example_command_line_flag_refused(disable_uring: None, tmp_path: os.PathLike[str]) -> None:
    mnt = os.path.join(tmp_path, "mnt")
    os.mkdir(mnt)
    proc = subprocess.run([sys.executable, "-m", "afuse.examples.hello", "--io-uring", mnt],
                          capture_output=True, text=True, timeout=30)
    assert not os.path.ismount(mnt)
    assert proc.returncode == 1
    assert "enable_uring is N" in proc.stderr
