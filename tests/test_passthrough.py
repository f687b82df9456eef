"""FUSE passthrough (FOPEN_PASSTHROUGH with backing files) against the real kernel, via
passthroughfs: data, no READ/WRITE reaching the daemon, shared mmap, the fallback, backing-id
lifetimes (no leak, error paths) and the dispatcher's checks of open replies."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from typing import Any, cast

import pytest

from afuse import device
from afuse.dispatch import HandlerResultError
from afuse.errors import FUSEError, NotNegotiated
from afuse.examples.passthroughfs import PassthroughFS
from afuse.nodes import LoopbackHandle
from afuse.pytest_plugin import fuse_unavailable_reason
from afuse.session import Session, current_session
from afuse.splice import FileRange
from afuse.testing import MountedFS, mounted
from afuse.wire import requests as r
from afuse.wire.constants import FUSE_DEV_IOC_BACKING_CLOSE, FOpen, InitFlag
from afuse.wire.init import InitConfig
from afuse.wire.types import Handle

pytestmark = pytest.mark.skipif(fuse_unavailable_reason() is not None or os.geteuid() != 0,
                                reason="needs root and /dev/fuse")

PT_CONFIG = InitConfig(passthrough=True, max_stack_depth=1)
MiB = 1 << 20


class Counting(PassthroughFS):
    """Counts the READ and WRITE requests that reach the daemon."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.reads = 0
        self.writes = 0

    async def read(self, req: r.ReadRequest) -> bytes | FileRange:
        self.reads += 1
        return await super().read(req)

    async def write(self, req: r.WriteRequest) -> int:
        self.writes += 1
        return await super().write(req)


@pytest.fixture
def source() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="afuse-ptsrc-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def serving(ops: PassthroughFS, config: InitConfig = PT_CONFIG, **kw: Any) -> Iterator[MountedFS]:
    try:
        with mounted(ops, config=config, timeout=15, **kw) as m:
            yield m
    finally:
        ops.close()


def _require_passthrough(m: MountedFS) -> None:
    if not m.session.has(InitFlag.PASSTHROUGH):
        pytest.skip("the kernel did not agree to FUSE_PASSTHROUGH")
    ops = m.ops
    assert isinstance(ops, PassthroughFS)
    if ops.passthrough_unavailable:
        pytest.skip(f"passthrough unavailable here: {ops.passthrough_unavailable}")


def _settle(session: Session, timeout: float = 10.0) -> None:
    """Wait until every open file's RELEASE (asynchronous) has been served."""
    table = session.backing
    assert table is not None
    deadline = time.monotonic() + timeout
    while (table.held or table.files) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not table.held and not table.files, (table.held, table.files)


def _still_registered(session: Session, backing_id: int) -> bool:
    """BACKING_CLOSE ``backing_id``: True if it was still registered (it is not any more)."""
    try:
        fcntl.ioctl(session.fd, FUSE_DEV_IOC_BACKING_CLOSE, bytearray(struct.pack("<I", backing_id)), True)
    except OSError as e:
        assert e.errno == errno.ENOENT, e
        return False
    return True


@pytest.mark.parametrize("depth", [1, 2])
def test_data_correct_and_no_read_or_write_reaches_the_daemon(source: str, depth: int) -> None:
    ops = Counting(source)
    with serving(ops, InitConfig(passthrough=True, max_stack_depth=depth)) as m:
        _require_passthrough(m)
        assert m.session.negotiated is not None and m.session.negotiated.max_stack_depth == depth
        p = m.join("big")
        data = os.urandom(MiB)
        with open(p, "wb") as f:
            f.write(data)
        with open(p, "rb") as f:
            assert f.read() == data
        with open(os.path.join(source, "big"), "rb") as f:
            assert f.read() == data  # the source file itself took the data
        # Random offsets, both ways, through one descriptor and checked against the source.
        rng = random.Random(4)
        model = bytearray(data)
        fd = os.open(p, os.O_RDWR)
        try:
            for _ in range(200):
                off = rng.randrange(0, 2 * MiB)
                chunk = rng.randbytes(rng.randrange(1, 70_000))
                assert os.pwrite(fd, chunk, off) == len(chunk)
                if off > len(model):
                    model.extend(bytes(off - len(model)))
                model[off:off + len(chunk)] = chunk
                roff = rng.randrange(0, len(model))
                n = rng.randrange(1, 100_000)
                assert os.pread(fd, n, roff) == bytes(model[roff:roff + n])
        finally:
            os.close(fd)
        with open(os.path.join(source, "big"), "rb") as f:
            assert f.read() == bytes(model)
        with open(p, "rb") as f:
            assert f.read() == bytes(model)
        assert os.stat(p).st_size == len(model)
        # Created files too (CREATE's reply carries the backing id), and copies between them.
        with open(m.join("created"), "wb") as f:
            f.write(b"hello passthrough")
        shutil.copyfile(m.join("created"), m.join("copy"))
        with open(m.join("copy"), "rb") as f:
            assert f.read() == b"hello passthrough"
        assert ops.reads == 0 and ops.writes == 0, (ops.reads, ops.writes)
        _settle(m.session)


MMAP_SCRIPT = textwrap.dedent("""
    import mmap, os, sys
    path = sys.argv[1]
    fd = os.open(path, os.O_RDWR)
    m = mmap.mmap(fd, 3 * 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    assert m[:5] == b"start", m[:5]
    m[5000:5013] = b"through mmap!"
    m.flush()  # msync(MS_SYNC)
    m.close()
    os.close(fd)
    print("ok")
""")


def test_shared_mmap(source: str) -> None:
    ops = Counting(source)
    with open(os.path.join(source, "mapped"), "wb") as f:
        f.write(b"start" + bytes(3 * 4096 - 5))
    with serving(ops) as m:
        _require_passthrough(m)
        out = subprocess.run([sys.executable, "-c", MMAP_SCRIPT, m.join("mapped")], capture_output=True,
                             text=True, timeout=30)
        assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
        with open(os.path.join(source, "mapped"), "rb") as f:
            data = f.read()
        assert data[5000:5013] == b"through mmap!"
        assert data[:5] == b"start" and len(data) == 3 * 4096
        assert ops.reads == 0 and ops.writes == 0
        _settle(m.session)


def _fallback_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [rec.getMessage() for rec in caplog.records if "passthrough unavailable" in rec.getMessage()]


def test_fallback_when_not_negotiated(source: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="afuse.passthroughfs")
    ops = Counting(source)
    with serving(ops, InitConfig(passthrough=False)) as m:
        assert not m.session.has(InitFlag.PASSTHROUGH) and m.session.backing is None
        with open(m.join("f"), "wb") as f:
            f.write(b"x" * 100_000)
        with open(m.join("f"), "rb") as f:
            assert f.read() == b"x" * 100_000
        assert ops.writes > 0 and ops.reads > 0
        with pytest.raises(NotNegotiated):
            m.session.open_backing(0)
    lines = _fallback_lines(caplog)
    assert len(lines) == 1, lines
    assert "not asked for" in lines[0] or "did not offer" in lines[0]


def test_fallback_when_backing_open_is_refused(source: str, caplog: pytest.LogCaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(session_fd: int, backing_fd: int) -> int:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(device, "backing_open", refuse)
    caplog.set_level(logging.INFO, logger="afuse.passthroughfs")
    ops = Counting(source)
    with serving(ops) as m:
        if not m.session.has(InitFlag.PASSTHROUGH):
            pytest.skip("the kernel did not agree to FUSE_PASSTHROUGH")
        assert ops.passthrough_unavailable is not None and "EPERM" in ops.passthrough_unavailable
        for i in range(3):
            with open(m.join(f"f{i}"), "wb") as f:
                f.write(b"y" * 5000)
            with open(m.join(f"f{i}"), "rb") as rf:
                assert rf.read() == b"y" * 5000
        assert ops.writes >= 3 and ops.reads >= 3
    lines = _fallback_lines(caplog)
    assert len(lines) == 1 and "CAP_SYS_ADMIN" in lines[0], lines


def test_constructor_disables_passthrough(source: str) -> None:
    ops = Counting(source, passthrough=False)
    with serving(ops) as m:
        with open(m.join("f"), "wb") as f:
            f.write(b"z")
        with open(m.join("f"), "rb") as f:
            assert f.read() == b"z"
        assert ops.writes == 1 and ops.reads >= 1
        assert ops.passthrough_unavailable is not None


def test_backing_ids_are_shared_per_inode_and_closed(source: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ids: list[int] = []
    real_open = device.backing_open

    def recording(session_fd: int, backing_fd: int) -> int:
        bid = real_open(session_fd, backing_fd)
        ids.append(bid)
        return bid

    monkeypatch.setattr(device, "backing_open", recording)
    ops = Counting(source)
    with serving(ops) as m:
        _require_passthrough(m)
        table = m.session.backing
        assert table is not None
        with open(m.join("shared"), "wb") as f:
            f.write(b"0123456789")
        _settle(m.session)
        before = table.opened
        # Many opens of one inode at once: one registration, shared (the kernel requires it).
        files = [open(m.join("shared"), "rb") for _ in range(20)]
        try:
            assert table.opened == before + 1
            assert len(table.files) == 1
            assert all(g.read() == b"0123456789" for g in files)
        finally:
            for g in files:
                g.close()
        _settle(m.session)
        # Open/close cycles of many files: every id is closed again.
        for i in range(300):
            with open(m.join(f"c{i % 30}"), "ab") as f:
                f.write(b"a")
        _settle(m.session)
        assert table.opened == table.closed, (table.opened, table.closed)
        assert not table.held and not table.files and m.session.in_flight == 0  # nothing outstanding
        assert len(set(ids)) == len(ids) == table.opened
        # The kernel agrees: none of them is registered any more.
        assert not any(_still_registered(m.session, bid) for bid in ids)
        assert ops.reads == 0 and ops.writes == 0


class _BadFlags(PassthroughFS):
    """Answers opens of "bad*" with PASSTHROUGH and forbidden flags, "raise*" by raising after
    registering a backing file, "unknown*" with an id that is not a backing file of the session."""

    async def open(self, req: r.OpenRequest) -> Handle:
        h = await super().open(req)
        fd = cast(LoopbackHandle, self.handle(h.fh)).fd
        name = os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1]
        if name.startswith("bad"):
            return Handle(h.fh, FOpen.PASSTHROUGH | FOpen.KEEP_CACHE, backing_id=h.backing_id)
        if name.startswith("raise"):
            current_session().open_backing(fd)  # registered, then the handler fails
            await self.release(r.ReleaseRequest(req.unique, req.nodeid, 0, 0, 0, h.fh, 0, 0, 0))
            raise FUSEError(errno.EACCES)
        if name.startswith("unknown"):
            return Handle(h.fh, FOpen.PASSTHROUGH, backing_id=999_999)
        return h


def test_invalid_replies_give_clear_errors_and_leak_nothing(source: str) -> None:
    for name in ("bad", "raise", "unknown"):
        with open(os.path.join(source, name), "wb") as f:
            f.write(b"data")
    ops = _BadFlags(source)
    with serving(ops, raise_handler_errors=False) as m:
        _require_passthrough(m)
        with pytest.raises(OSError) as exc:
            open(m.join("bad"), "rb").close()
        assert exc.value.errno == errno.EIO
        with pytest.raises(OSError) as exc:
            open(m.join("raise"), "rb").close()
        assert exc.value.errno == errno.EACCES
        with pytest.raises(OSError) as exc:
            open(m.join("unknown"), "rb").close()
        assert exc.value.errno == errno.EIO
        errors = [str(e) for e in m.session.errors if isinstance(e, HandlerResultError)]
        assert any("KEEP_CACHE" in e and "DIRECT_IO, PARALLEL_DIRECT_WRITES and NOFLUSH" in e for e in errors), errors
        assert any("999999" in e and "open_backing" in e for e in errors), errors
        table = m.session.backing
        assert table is not None
        # Files opened after the failures work, and every registration is closed again.
        with open(os.path.join(source, "good"), "wb") as f:
            f.write(b"good")
        with open(m.join("good"), "rb") as f:
            assert f.read() == b"good"
        _settle(m.session)
        assert table.opened == table.closed


class _NotNegotiated(PassthroughFS):
    async def open(self, req: r.OpenRequest) -> Handle:
        h = await super().open(req)
        return Handle(h.fh, FOpen.PASSTHROUGH, backing_id=1)


def test_passthrough_reply_without_negotiation_is_refused(source: str) -> None:
    with open(os.path.join(source, "f"), "wb") as f:
        f.write(b"data")
    ops = _NotNegotiated(source)
    with serving(ops, InitConfig(passthrough=False), raise_handler_errors=False) as m:
        with pytest.raises(OSError) as exc:
            open(m.join("f"), "rb").close()
        assert exc.value.errno == errno.EIO
        errors = [str(e) for e in m.session.errors if isinstance(e, HandlerResultError)]
        assert any("not negotiated" in e for e in errors), errors


def test_cli_no_passthrough_flag(source: str) -> None:
    from afuse.examples import passthroughfs

    with pytest.raises(SystemExit):
        passthroughfs.main(["--help"])
    mnt = tempfile.mkdtemp(prefix="afuse-ptcli-")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen([sys.executable, "-m", "afuse.examples.passthroughfs", source, mnt],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 15
        while not os.path.ismount(mnt) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert os.path.ismount(mnt)
        with open(os.path.join(mnt, "f"), "wb") as f:
            f.write(b"cli")
        with open(os.path.join(source, "f"), "rb") as f:
            assert f.read() == b"cli"
    finally:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate(timeout=15)
        if os.path.ismount(mnt):
            device.unmount(mnt, lazy=True)
        os.rmdir(mnt)
    assert "passthrough" in err  # one line either way: in use, or why not


def test_current_session_outside_serving_raises() -> None:
    from afuse.errors import SessionError

    with pytest.raises(SessionError):
        current_session()
