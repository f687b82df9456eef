"""CUSE devices created and used with real syscalls. Runs inside a guest kernel with CUSE.

Not collected on the host (its kernel has no CUSE): ``tests/test_guest.py`` boots a guest with
``tools/guest.py`` and runs this file there. By hand, in a kernel with /dev/cuse::

    python -m pytest tests/cuse/guest_cuse.py
"""

from __future__ import annotations

import errno
import itertools
import os
import select
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from afuse.cuse import CuseSession, DeviceError, DeviceOperations
from afuse.dispatch import HandlerResultError
from afuse.errors import FUSEError
from afuse.examples.cusedev import BufferDevice
from afuse.testing import HandlerErrors, served_device
from afuse.wire import requests as r
from afuse.wire.constants import POLL_SCHEDULE_NOTIFY
from afuse.wire.types import Handle

HERE = Path(__file__).parent
_names = itertools.count()


@pytest.fixture(scope="session", autouse=True)
def cuse_available() -> None:
    if not os.path.exists("/dev/cuse"):
        pytest.fail("no /dev/cuse: run this file in a kernel with CUSE (tools/guest.py does)")


@pytest.fixture
def name() -> str:
    """A device name no other test uses."""
    return f"afuse-t{os.getpid()}-{next(_names)}"


@pytest.fixture(scope="session")
def client(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The C client of the example device (built by the host test, or here with gcc)."""
    built = os.environ.get("AFUSE_CUSE_CLIENT")
    if built:
        return built
    out = tmp_path_factory.mktemp("client") / "cuse_client"
    subprocess.run(["gcc", "-Wall", "-Werror", "-O2", "-o", str(out), str(HERE / "cuse_client.c")], check=True)
    return str(out)


def run_client(client: str, *args: str, data: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([client, *args], input=data, capture_output=True, timeout=60)


def wait_gone(path: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while os.path.exists(path):
        assert time.monotonic() < deadline, f"{path} still exists"
        time.sleep(0.02)


class Recording(BufferDevice):
    """The example device, remembering the requests it served."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[r.Request] = []

    async def open(self, req: r.OpenRequest) -> Handle:
        self.seen.append(req)
        return await super().open(req)

    async def read(self, req: r.ReadRequest) -> bytes:
        self.seen.append(req)
        return await super().read(req)

    async def write(self, req: r.WriteRequest) -> int:
        self.seen.append(req)
        return await super().write(req)

    async def poll(self, req: r.PollRequest) -> int:
        self.seen.append(req)
        return await super().poll(req)

    async def release(self, req: r.ReleaseRequest) -> None:
        self.seen.append(req)
        await super().release(req)

    def of(self, cls: type[r.Request]) -> list[r.Request]:
        return [q for q in self.seen if type(q) is cls]


def test_create_open_read_write_release(name: str) -> None:
    ops = Recording()
    with served_device(ops, name, mode=0o666) as dev:
        assert dev.path == f"/dev/{name}"
        st = os.stat(dev.path)
        assert stat.S_ISCHR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o666
        assert st.st_rdev == dev.devno and os.major(dev.devno) > 0
        fd = os.open(dev.path, os.O_RDWR)
        try:
            assert os.write(fd, b"hello, device") == 13
            assert os.read(fd, 100) == b"hello, device"
            assert os.read(fd, 5) == b"hello"  # no file position: every read starts at 0
        finally:
            os.close(fd)
        # close(2) sends no FLUSH: CUSE has none.
        assert [type(q) for q in ops.seen] == [r.OpenRequest, r.WriteRequest, r.ReadRequest, r.ReadRequest,
                                               r.ReleaseRequest]
        (rel,) = ops.of(r.ReleaseRequest)
        (opened,) = ops.of(r.OpenRequest)
        assert isinstance(rel, r.ReleaseRequest) and rel.fh == 1
        assert isinstance(opened, r.OpenRequest) and opened.flags & os.O_ACCMODE == os.O_RDWR
    wait_gone(f"/dev/{name}")


def test_large_transfers_are_split_at_increasing_offsets(name: str) -> None:
    ops = Recording()
    data = os.urandom(300_000)
    with served_device(ops, name) as dev:
        fd = os.open(dev.path, os.O_RDWR)
        try:
            assert os.write(fd, data) == len(data)
            got = os.read(fd, len(data))
        finally:
            os.close(fd)
    assert got == data and bytes(ops.buf) == data
    writes = [q for q in ops.of(r.WriteRequest) if isinstance(q, r.WriteRequest)]
    assert len(writes) >= 3
    assert [q.offset for q in writes] == [sum(len(w.data) for w in writes[:i]) for i in range(len(writes))]


def test_owner_and_mode(name: str) -> None:
    with served_device(BufferDevice(), name, mode=0o640, uid=1234, gid=5678) as dev:
        st = os.stat(dev.path)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, 0o640)


def test_default_node_is_root_only(name: str) -> None:
    with served_device(BufferDevice(), name) as dev:
        st = os.stat(dev.path)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o600)


def test_c_client_unrestricted_ioctls_against_the_example_daemon(name: str, client: str) -> None:
    """The example run as its own process, used by a C client built against the ioctl header."""
    proc = subprocess.Popen([sys.executable, "-m", "afuse.examples.cusedev", "--name", name],
                            stderr=subprocess.PIPE)
    path = f"/dev/{name}"
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(path):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.2)  # chmod/chown happen right after the node appears
        assert run_client(client, path, "get").stdout == b"0\n"
        assert run_client(client, path, "set", "10").returncode == 0
        assert run_client(client, path, "get").stdout == b"10\n"
        # FIOC_WRITE: the daemon follows fioc_rw_arg.buf through the retry protocol.
        res = run_client(client, path, "write", "5", "2", data=b"hello")
        assert (res.returncode, res.stderr) == (0, b"5 10 10\n")
        res = run_client(client, path, "write", "3", "20", data=b"xyz")
        assert (res.returncode, res.stderr) == (0, b"3 10 23\n")
        res = run_client(client, path, "read", "9", "0")
        assert (res.returncode, res.stdout, res.stderr) == (0, b"\0\0hello\0\0", b"9 23 23\n")
        res = run_client(client, path, "read", "100", "18")
        assert (res.returncode, res.stdout, res.stderr) == (0, b"\0\0xyz", b"5 23 23\n")
        with open(path, "rb", buffering=0) as f:  # plain read(2) sees the same buffer
            assert f.read(100) == b"\0\0hello" + bytes(13) + b"xyz"
        assert run_client(client, path, "set", "4").returncode == 0
        res = run_client(client, path, "read", "100", "0")
        assert (res.stdout, res.stderr) == (b"\0\0he", b"4 4 4\n")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    # Daemon exit removes the device.
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else b""
    wait_gone(path)


def test_killed_daemon_removes_the_device(name: str) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "afuse.examples.cusedev", "--name", name])
    path = f"/dev/{name}"
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(path):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait(30)
    wait_gone(path)
    with pytest.raises(FileNotFoundError):
        os.open(path, os.O_RDWR)


def test_restricted_ioctls(name: str, client: str) -> None:
    """Without CUSE_UNRESTRICTED_IOCTL the kernel copies what _IOC says; FIOC_READ can't work."""
    ops = BufferDevice()
    with served_device(ops, name, unrestricted_ioctl=False) as dev:
        assert dev.cuse_negotiated is not None and not dev.cuse_negotiated.unrestricted_ioctl
        assert run_client(client, dev.path, "set", "7").returncode == 0
        assert run_client(client, dev.path, "get").stdout == b"7\n"
        res = run_client(client, dev.path, "read", "4", "0")
        assert res.returncode == 1 and res.stderr == b"error: FIOC_READ: Inappropriate ioctl for device\n"
    assert len(ops.buf) == 7


def test_retry_on_a_restricted_device_is_a_clear_handler_error(name: str, client: str) -> None:
    class AlwaysRetry(BufferDevice):
        async def ioctl(self, req: r.IoctlRequest) -> object:  # type: ignore[override]
            from afuse.cuse import retry

            return retry(in_iovs=[(req.arg, 8)])

    with pytest.raises(HandlerErrors) as info:
        with served_device(AlwaysRetry(), name, unrestricted_ioctl=False) as dev:
            res = run_client(client, dev.path, "get")
            assert res.returncode == 1 and b"Input/output error" in res.stderr
    assert isinstance(info.value.__cause__, HandlerResultError)
    assert "restricted" in str(info.value.__cause__)


def test_poll_wakeup(name: str) -> None:
    ops = Recording()
    with served_device(ops, name) as dev:
        reader = os.open(dev.path, os.O_RDONLY)
        writer = os.open(dev.path, os.O_WRONLY)
        try:
            p = select.poll()
            p.register(reader, select.POLLIN)
            assert p.poll(0) == []  # empty: not readable
            result: list[list[tuple[int, int]]] = []
            t0 = time.monotonic()
            waiter = threading.Thread(target=lambda: result.append(p.poll(30_000)))
            waiter.start()
            deadline = time.monotonic() + 20
            while not any(isinstance(q, r.PollRequest) and q.flags & POLL_SCHEDULE_NOTIFY for q in ops.seen):
                assert time.monotonic() < deadline, "the sleeping poll never reached the device"
                time.sleep(0.02)
            time.sleep(0.2)
            assert waiter.is_alive()  # asleep in poll(2): nothing to read yet
            os.write(writer, b"data")
            waiter.join(30)
            assert result and result[0] == [(reader, select.POLLIN)]
            assert time.monotonic() - t0 < 25
            assert os.read(reader, 10) == b"data"
        finally:
            os.close(reader)
            os.close(writer)
    polls = [q for q in ops.of(r.PollRequest) if isinstance(q, r.PollRequest)]
    # The sleeping poll asked for a notification; the wake-up made the kernel poll again.
    assert any(q.flags & POLL_SCHEDULE_NOTIFY and q.kh for q in polls) and len(polls) >= 3


class Blocking(DeviceOperations):
    """read blocks until interrupted."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.cancelled = threading.Event()

    async def read(self, req: r.ReadRequest) -> bytes:
        self.started.set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            self.cancelled.set()
            raise
        raise AssertionError("unreachable")


def test_interrupting_a_blocked_read(name: str, client: str) -> None:
    ops = Blocking()
    with served_device(ops, name) as dev:
        res = run_client(client, dev.path, "readwait", "2")
        assert (res.returncode, res.stdout) == (0, b"EINTR\n"), res.stderr
        assert ops.started.is_set() and ops.cancelled.wait(10)
        assert dev.in_flight == 0


def test_two_devices_at_once(name: str) -> None:
    with served_device(BufferDevice(), name + "a") as one, served_device(BufferDevice(), name + "b") as two:
        assert one.devno != two.devno
        for dev, text in ((one, b"first"), (two, b"second")):
            fd = os.open(dev.path, os.O_WRONLY)
            os.write(fd, text)
            os.close(fd)
        for dev, text in ((one, b"first"), (two, b"second")):
            with open(dev.path, "rb", buffering=0) as f:
                assert f.read(100) == text
    wait_gone(f"/dev/{name}a")
    wait_gone(f"/dev/{name}b")


def test_duplicate_name_is_a_clear_error(name: str) -> None:
    with served_device(BufferDevice(), name) as first:
        with pytest.raises(DeviceError) as info:
            with served_device(BufferDevice(), name):
                pass
        assert info.value.errno == errno.EEXIST
        assert f"a CUSE device named {name!r} already exists" in str(info.value)
        fd = os.open(first.path, os.O_RDWR)  # the first one is unharmed
        os.write(fd, b"ok")
        assert os.read(fd, 10) == b"ok"
        os.close(fd)


def test_name_of_an_existing_node_is_a_clear_error() -> None:
    with pytest.raises(DeviceError) as info:
        with served_device(BufferDevice(), "null"):
            pass
    assert info.value.errno == errno.EEXIST and "/dev/null already exists and is not this device" in str(info.value)
    assert os.major(os.stat("/dev/null").st_rdev) == 1  # untouched


@pytest.mark.parametrize("bad", ["", "a=b", " x", "a/../b", "x\0y"])
def test_invalid_names_are_refused(bad: str) -> None:
    with pytest.raises(DeviceError) as info:
        with served_device(BufferDevice(), bad):
            pass
    assert info.value.errno == errno.EINVAL and "invalid device name" in str(info.value)


def test_handler_error_is_eio_and_reported(name: str) -> None:
    class Broken(DeviceOperations):
        async def read(self, req: r.ReadRequest) -> bytes:
            raise RuntimeError("boom")

        async def write(self, req: r.WriteRequest) -> int:
            return "many"  # type: ignore[return-value]

        async def ioctl(self, req: r.IoctlRequest) -> object:  # type: ignore[override]
            raise FUSEError(errno.EPERM)

    with pytest.raises(HandlerErrors) as info:
        with served_device(Broken(), name) as dev:
            fd = os.open(dev.path, os.O_RDWR)
            try:
                with pytest.raises(OSError) as e1:
                    os.read(fd, 10)
                assert e1.value.errno == errno.EIO
                with pytest.raises(OSError) as e2:
                    os.write(fd, b"x")
                assert e2.value.errno == errno.EIO
                import fcntl

                with pytest.raises(OSError) as e3:  # an errno raised on purpose reaches the caller
                    fcntl.ioctl(fd, 0x4502)
                assert e3.value.errno == errno.EPERM
            finally:
                os.close(fd)
            assert len(dev.errors) == 2
            assert isinstance(dev.errors[1], HandlerResultError) and "write must return a count" in str(dev.errors[1])
    assert isinstance(info.value.__cause__, RuntimeError) and str(info.value.__cause__) == "boom"


def test_not_overridden_operations(name: str) -> None:
    """read/write/ioctl answer ENOSYS (ioctl: ENOTTY for the caller); poll then reports ready."""
    with served_device(DeviceOperations(), name) as dev:
        fd = os.open(dev.path, os.O_RDWR)
        try:
            with pytest.raises(OSError) as e:
                os.read(fd, 1)
            assert e.value.errno == errno.ENOSYS
            import fcntl

            with pytest.raises(OSError) as e:
                fcntl.ioctl(fd, 0x4502)
            assert e.value.errno == errno.ENOTTY
            p = select.poll()
            p.register(fd, select.POLLIN | select.POLLOUT)
            assert p.poll(0) == [(fd, select.POLLIN | select.POLLOUT)]
            # The kernel has no fsync for CUSE devices (cuse_frontend_fops): no FSYNC is sent.
            with pytest.raises(OSError) as e:
                os.fsync(fd)
            assert e.value.errno == errno.EINVAL
        finally:
            os.close(fd)


def test_session_ends_when_the_device_is_aborted(name: str) -> None:
    with served_device(BufferDevice(), name) as dev:
        fd = os.open(dev.path, os.O_RDWR)
        dev.abort()
        with pytest.raises(OSError) as e:
            os.read(fd, 1)
        assert e.value.errno in (errno.ENODEV, errno.ENOTCONN, errno.ECONNABORTED)
        os.close(fd)
        deadline = time.monotonic() + 10
        while not dev.closed:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    wait_gone(f"/dev/{name}")


def test_current_session_in_handlers(name: str) -> None:
    from afuse.session import current_session

    seen: list[object] = []

    class Who(DeviceOperations):
        async def read(self, req: r.ReadRequest) -> bytes:
            seen.append(current_session())
            return b""

    with served_device(Who(), name) as dev:
        with open(dev.path, "rb", buffering=0) as f:
            assert f.read(1) == b""
    assert seen == [dev] and isinstance(dev, CuseSession)


@pytest.fixture(autouse=True)
def no_device_left(name: str) -> Iterator[None]:
    yield
    left = [p for p in os.listdir("/sys/class/cuse") if p.startswith(name)] if os.path.isdir("/sys/class/cuse") else []
    assert not left, f"devices left behind: {left}"
