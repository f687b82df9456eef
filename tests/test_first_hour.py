"""A user's first hour: mistakes reported where they are made, a debug log worth reading, a
configurable shutdown grace. Real mounts, real syscalls."""

from __future__ import annotations

import errno
import logging
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

import afuse
from afuse import notify, testing
from afuse.dispatch import HandlerResultError, check_operations
from afuse.pytest_plugin import fuse_unavailable_reason
from afuse.wire.types import Attr, DirEntry, Entry, FsStats, Handle

pytestmark = pytest.mark.skipif(fuse_unavailable_reason() is not None, reason=str(fuse_unavailable_reason()))

ROOT = Attr(ino=1, mode=stat.S_IFDIR | 0o755, nlink=2)
FILE = Attr(ino=2, mode=stat.S_IFREG | 0o644, nlink=1, size=5)


class OneFile(afuse.Operations):
    """``/f`` (5 bytes); ``/slow`` blocks its READ until released; looking up ``block`` blocks
    until interrupted; ``/nomode`` has no file type."""

    attr_timeout = 0.0
    entry_timeout = 0.0

    def __init__(self) -> None:
        self.release_slow = threading.Event()

    async def getattr(self, req: afuse.GetattrRequest) -> Attr:
        if req.nodeid == 1:
            return ROOT
        if req.nodeid == 4:
            return Attr(ino=4, mode=0o644, nlink=1)  # the likeliest slip: no S_IFREG
        return FILE if req.nodeid == 2 else Attr(ino=3, mode=stat.S_IFREG | 0o644, nlink=1, size=5)

    async def lookup(self, req: afuse.LookupRequest) -> Entry:
        if req.name == b"block":  # blocks until interrupted (a lookup's caller is interruptible)
            await trio.sleep_forever()
        ids = {b"f": 2, b"slow": 3, b"nomode": 4}
        if req.name not in ids:
            raise afuse.FUSEError(errno.ENOENT)
        if ids[req.name] == 4:
            return Entry(4, Attr(ino=4, mode=stat.S_IFREG | 0o644, nlink=1))
        return Entry(ids[req.name], await self.getattr(afuse.GetattrRequest(0, ids[req.name], 0, 0, 0, None)))

    async def open(self, req: afuse.OpenRequest) -> Handle:
        return Handle(req.nodeid)

    async def read(self, req: afuse.ReadRequest) -> bytes:
        if req.nodeid == 3:
            await trio.to_thread.run_sync(self.release_slow.wait, abandon_on_cancel=True)
        return b"hello"[req.offset:req.offset + req.size]

    async def statfs(self, req: afuse.StatfsRequest) -> FsStats:
        return FsStats(bsize=4096)


# -- 7: wrong handler shapes fail where the mistake is made ------------------------------------------


class PlainGetattr(afuse.Operations):
    def getattr(self, req: afuse.GetattrRequest) -> Attr:  # type: ignore[override]
        return ROOT


class SyncGenReaddir(afuse.Operations):
    def readdir(self, req: afuse.ReaddirRequest) -> Iterator[DirEntry]:  # type: ignore[override]
        yield DirEntry(b"x", 1, attr=FILE)


def test_plain_def_handler_is_refused_before_mounting(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"PlainGetattr\.getattr must be an async def, not a plain function"):
        check_operations(PlainGetattr())
    with pytest.raises(TypeError, match=r"SyncGenReaddir\.readdir must be an async def or an async generator"):
        check_operations(SyncGenReaddir())
    mp = tmp_path / "mnt"
    mp.mkdir()
    with pytest.raises(TypeError, match="getattr"):
        with testing.mounted(PlainGetattr(), mountpoint=str(mp)):
            pass
    assert str(mp) not in [m for m, _t, _s in afuse.device.find_mounts("")]  # never mounted


class TupleReaddir(OneFile):
    async def readdir(self, req: afuse.ReaddirRequest) -> AsyncIterator[DirEntry]:
        yield (b"f", 1, FILE)  # type: ignore[misc]  # the slip: a tuple


def test_readdir_item_of_the_wrong_type_is_a_clear_error(caplog: pytest.LogCaptureFixture) -> None:
    with testing.mounted(TupleReaddir(), raise_handler_errors=False) as m:
        with pytest.raises(OSError) as e:
            os.listdir(m.path)
        assert e.value.errno == errno.EIO
        errors = [x for x in m.session.errors if isinstance(x, HandlerResultError)]
        want = "readdir must yield DirEntry items or (name, offset, ino, mode) tuples, not a 3-tuple"
        assert errors and want in str(errors[0])
        assert os.stat(m.join("f")).st_size == 5  # still serving
    assert any("READDIR" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)


# -- 2: an Attr without a file type is an error, not a silent EIO -------------------------------------


def test_attr_without_file_type_is_a_clear_error(caplog: pytest.LogCaptureFixture) -> None:
    with testing.mounted(OneFile(), raise_handler_errors=False) as m:
        with pytest.raises(OSError) as e:
            os.stat(m.join("nomode"))
        assert e.value.errno == errno.EIO
        errors = [str(x) for x in m.session.errors if isinstance(x, HandlerResultError)]
        assert any("getattr returned an Attr whose mode 0o644 has no file type" in x for x in errors), errors
        assert os.stat(m.join("f")).st_size == 5  # still serving
    # Logged with the handler's name, as an error.
    assert any(r.levelno == logging.ERROR and "GETATTR" in r.getMessage() for r in caplog.records)


# -- 6: the debug log --------------------------------------------------------------------------------


def test_debug_log_shows_forget_interrupt_notifications_and_slow_requests(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="afuse")
    fs = OneFile()
    with testing.mounted(fs, warn_after=0.3) as m:
        assert os.stat(m.join("f")).st_size == 5
        # A lookup that blocks: a warning names it; the caller's signal sends INTERRUPT, logged.
        child = subprocess.Popen([sys.executable, "-c", _ACCESS_CHILD, m.join("block")],
                                 stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready"
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not any("still unanswered" in r.getMessage()
                                                          for r in caplog.records):
                time.sleep(0.05)
            child.send_signal(signal.SIGUSR1)
            out, _ = child.communicate(timeout=10)
        finally:
            child.kill()
        assert out.split() == ["-1", str(errno.EINTR)]
        # A notification and the FORGETs that follow a prune.
        m.call(notify.inval_entry, m.session, 1, b"f")
        m.call(notify.prune, m.session, [2])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any("FORGET" in r.getMessage() for r in caplog.records):
            time.sleep(0.05)
    lines = [r.getMessage() for r in caplog.records if r.name == "afuse"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(w.startswith("still unanswered after") and "LOOKUP unique=" in w and "name=b'block'" in w
               for w in warnings), warnings
    assert any(line.startswith("-> INTERRUPT") and "target=" in line for line in lines), lines
    assert any(line.startswith("notify INVAL_ENTRY (") for line in lines), lines
    assert any(line.startswith("notify PRUNE") for line in lines), lines
    assert any(("-> FORGET" in line or "-> BATCH_FORGET" in line) and "nlookup=" in line for line in lines), lines


_ACCESS_CHILD = """
import ctypes, os, signal, sys
signal.signal(signal.SIGUSR1, lambda *a: None)
libc = ctypes.CDLL(None, use_errno=True)
print("ready", flush=True)
n = libc.access(sys.argv[1].encode(), os.F_OK)
print(n, ctypes.get_errno(), flush=True)
"""


# -- 5: the shutdown grace is a parameter ----------------------------------------------------------


@pytest.mark.parametrize("grace", [0.2, 2.0])
def test_shutdown_grace_is_a_parameter(grace: float) -> None:
    fs = OneFile()
    with testing.mounted(fs, shutdown_grace=grace, raise_handler_errors=False) as m:
        path = m.path
        code = f"open({m.join('slow')!r}, 'rb').read()"
        reader = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not m.session.in_flight:
            time.sleep(0.02)
        assert m.session.in_flight == 1
        t0 = time.monotonic()
    waited = time.monotonic() - t0
    reader.kill()
    reader.wait(10)
    fs.release_slow.set()
    # The busy mount was detached lazily once the grace ran out; not 5 s, not forever.
    assert grace <= waited < grace + 4.0, waited
    assert path not in [mp for mp, _t, _s in afuse.device.find_mounts("")]


def test_grace_and_warning_arguments_are_checked(tmp_path: Path) -> None:
    for kw in ({"shutdown_grace": -1.0}, {"warn_after": 0.0}):
        with pytest.raises(ValueError):
            with testing.mounted(OneFile(), mountpoint=str(tmp_path), **kw):  # type: ignore[arg-type]
                pass
