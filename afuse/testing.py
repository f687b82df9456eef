"""Mount throw-away filesystems in tests.

Three forms, all unmounting afterwards and never leaving a mount behind:

* :func:`mounted` — a plain ``with`` block for synchronous tests: the filesystem's trio loop runs
  in another thread, so the test thread may use ``open()`` and ``os.*`` on ``m.path``.
* :func:`mounted_process` — the filesystem runs in a child process, for tests that would hold
  the GIL while the kernel waits on the filesystem (a page fault on an mmap of a file on it).
* :func:`trio_mount` — an ``async with`` for trio tests; touch the mount only from threads
  (``trio.to_thread.run_sync``, ``trio.Path``), never from the loop serving it.
* :func:`asyncio_mounted` — as :func:`mounted`, for filesystems whose handlers are asyncio
  coroutines (:mod:`afuse.asyncio`), served from an asyncio loop in another thread.

The pytest plugin (:mod:`afuse.pytest_plugin`) wraps them as fixtures.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import trio

from . import device
from .device import MountOptions
from .errors import MountError
from .operations import Operations
from .running import serve_until_signalled
from .session import Session, mount, serve
from .wire.init import InitConfig

if TYPE_CHECKING:
    from .cuse import CuseSession, DeviceOperations

T = TypeVar("T")

#: Environment variable: set to ``1`` to serve every mount made by these helpers (and so the
#: ``fuse_mount*`` fixtures) over io_uring (``serve(io_uring=True)``), unless a test passes
#: ``io_uring`` itself. For running a mount test suite over both transports (docs/uring.md).
TRANSPORT_ENV = "AFUSE_TEST_IO_URING"


def _transport(serve_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``serve_kwargs`` with ``io_uring=True`` added when :data:`TRANSPORT_ENV` asks for it."""
    value = os.environ.get(TRANSPORT_ENV, "")
    if value not in ("", "0", "1"):
        raise ValueError(f"{TRANSPORT_ENV} must be 1 or 0, not {value!r}")
    if value == "1" and "io_uring" not in serve_kwargs and serve_kwargs.get("takeover") is None:
        return {**serve_kwargs, "io_uring": True}
    return serve_kwargs


class HandlerErrors(Exception):
    """Handlers raised unexpected exceptions while a test used the filesystem (see ``__cause__``)."""


class MountedFS:
    """A filesystem served in a background thread; ``path`` is its mountpoint."""

    def __init__(self, path: str, session: Session, ops: Operations,
                 token: trio.lowlevel.TrioToken | None = None) -> None:
        self.path = path
        self.session = session
        self.ops = ops
        self._token = token

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``await fn(*args)`` on the loop serving the filesystem and return its result
        (e.g. ``m.call(afuse.notify.inval_entry, m.session, 1, b"name")``); from the test thread."""
        if self._token is None:
            raise RuntimeError("this filesystem is not served by a loop of this process")
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def __fspath__(self) -> str:
        return self.path

    def join(self, *parts: str) -> str:
        """``os.path.join(self.path, *parts)``."""
        return os.path.join(self.path, *parts)


#: Mountpoints this process created (for checks that no mount was left behind).
created_mountpoints: set[str] = set()


def _make_mountpoint(mountpoint: str | None) -> tuple[str, bool]:
    if mountpoint is not None:
        return os.fspath(mountpoint), False
    d = tempfile.mkdtemp(prefix="afuse-mnt-")
    os.chmod(d, 0o755)
    created_mountpoints.add(os.path.realpath(d))
    return d, True


def _cleanup_mountpoint(path: str, made: bool) -> None:
    resolved = device.resolve_mountpoint(path)
    if any(mp == resolved for mp, _fstype, _src in device.find_mounts()):
        with contextlib.suppress(OSError):
            device.unmount(path, lazy=True)
    if made:
        with contextlib.suppress(OSError):
            os.rmdir(path)


@contextlib.contextmanager
def mounted(
    ops: Operations,
    *,
    options: MountOptions | str | None = None,
    config: InitConfig | None = None,
    mountpoint: str | None = None,
    timeout: float = 20.0,
    raise_handler_errors: bool = True,
    **serve_kwargs: Any,
) -> Iterator[MountedFS]:
    """Serve ``ops`` in a background thread on a fresh directory (or ``mountpoint``).

    On exit the filesystem is unmounted (aborted if it does not stop within ``timeout``), and
    unexpected handler exceptions are raised as :class:`HandlerErrors`.
    """
    if isinstance(options, str):
        options = MountOptions.parse(options)
    path, made = _make_mountpoint(mountpoint)
    try:
        with _serving_thread(
            partial(serve, ops, path, options=options, config=config, **_transport(serve_kwargs)),
            f"afuse {path}", timeout,
            lambda: MountError(0, f"mounting {path} did not finish within {timeout} s"),
            _abort_mount, raise_handler_errors,
        ) as (session, token):
            yield MountedFS(path, session, ops, token)
    finally:
        _cleanup_mountpoint(path, made)


S = TypeVar("S", bound=Session)


def _abort_mount(session: Session) -> None:
    session.mount.abort()


@contextlib.contextmanager
def _serving_thread(
    start: Callable[..., Awaitable[None]],
    label: str,
    timeout: float,
    timed_out: Callable[[], BaseException],
    abort: Callable[[S], None],
    raise_handler_errors: bool,
) -> Iterator[tuple[S, trio.lowlevel.TrioToken]]:
    """Run ``await nursery.start(start)`` in a trio loop of a background thread, for the block.

    Yields the session and the loop's token. On exit serving is cancelled; a session whose
    handler never finishes is aborted (``abort``) if the thread does not end within ``timeout``.
    An error of the loop, then unexpected handler errors (:class:`HandlerErrors`), are raised.
    """
    box: dict[str, Any] = {}
    started = threading.Event()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            box["token"] = trio.lowlevel.current_trio_token()
            box["scope"] = nursery.cancel_scope
            session = await nursery.start(start)
            box["session"] = session
            started.set()
            await session.wait_closed()
            nursery.cancel_scope.cancel()

    def run() -> None:
        try:
            trio.run(main)
        except BaseException as e:  # reported to the test thread
            while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
                e = e.exceptions[0]
            box["error"] = e
        finally:
            started.set()

    thread = threading.Thread(target=run, name=label, daemon=True)
    thread.start()
    if not started.wait(timeout):
        raise timed_out()
    if "error" in box:
        thread.join(timeout)
        raise box["error"]
    session: S = box["session"]
    try:
        yield session, box["token"]
    finally:
        with contextlib.suppress(RuntimeError):  # the loop already ended
            box["token"].run_sync_soon(box["scope"].cancel)
        thread.join(timeout)
        if thread.is_alive():
            # A handler that never finishes: abort the connection, which fails every request.
            with contextlib.suppress(OSError):
                abort(session)
            thread.join(timeout)
    if "error" in box and not isinstance(box["error"], KeyboardInterrupt):
        raise box["error"]
    if raise_handler_errors and session.errors:
        raise HandlerErrors(f"{len(session.errors)} handler error(s); first: {session.errors[0]!r}") \
            from session.errors[0]


class MountFactory(Protocol):
    """The type of the ``fuse_mount`` fixture: :func:`mounted` for the rest of the test."""

    def __call__(
        self,
        ops: Operations,
        *,
        options: MountOptions | str | None = ...,
        config: InitConfig | None = ...,
        mountpoint: str | None = ...,
        timeout: float = ...,
        raise_handler_errors: bool = ...,
        **serve_kwargs: Any,
    ) -> MountedFS: ...


@contextlib.asynccontextmanager
async def trio_mount(
    ops: Operations,
    *,
    mountpoint: str | None = None,
    raise_handler_errors: bool = True,
    **serve_kwargs: Any,
) -> AsyncIterator[Session]:
    """Serve ``ops`` on a fresh directory inside the current trio run; unmounts on exit."""
    path, made = _make_mountpoint(mountpoint)
    try:
        async with trio.open_nursery() as nursery:
            session: Session = await nursery.start(partial(serve, ops, path, **_transport(serve_kwargs)))
            try:
                yield session
            finally:
                nursery.cancel_scope.cancel()
    finally:
        _cleanup_mountpoint(path, made)
    if raise_handler_errors and session.errors:
        raise HandlerErrors(f"{len(session.errors)} handler error(s); first: {session.errors[0]!r}") \
            from session.errors[0]


@contextlib.contextmanager
def asyncio_mounted(
    ops: Operations,
    *,
    mountpoint: str | None = None,
    timeout: float = 20.0,
    raise_handler_errors: bool = True,
    **serve_kwargs: Any,
) -> Iterator[MountedFS]:
    """As :func:`mounted`, for a filesystem whose handlers are asyncio coroutines.

    ``ops`` is served with :func:`afuse.asyncio.mount` from an asyncio loop in a background
    thread; the test thread may use the mount.
    """
    import asyncio

    from . import asyncio as afuse_asyncio

    path, made = _make_mountpoint(mountpoint)
    box: dict[str, Any] = {}
    started = threading.Event()

    async def main() -> None:
        stop = asyncio.Event()
        box["loop"], box["stop"] = asyncio.get_running_loop(), stop
        async with afuse_asyncio.mount(ops, path, **_transport(serve_kwargs)) as fs:
            box["session"] = fs.session
            started.set()
            waiting = [asyncio.ensure_future(fs.wait_closed()), asyncio.ensure_future(stop.wait())]
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for w in waiting:
                w.cancel()

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as e:  # reported to the test thread
            while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
                e = e.exceptions[0]
            box["error"] = e
        finally:
            started.set()

    thread = threading.Thread(target=run, name=f"afuse asyncio {path}", daemon=True)
    thread.start()
    if not started.wait(timeout) or "session" not in box:
        if "loop" in box:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                box["loop"].call_soon_threadsafe(box["stop"].set)
        thread.join(timeout)
        _cleanup_mountpoint(path, made)
        raise box.get("error") or MountError(0, f"mounting {path} did not finish within {timeout} s")
    session: Session = box["session"]
    try:
        yield MountedFS(path, session, ops)
    finally:
        with contextlib.suppress(RuntimeError):  # the loop already ended
            box["loop"].call_soon_threadsafe(box["stop"].set)
        thread.join(timeout)
        if thread.is_alive():
            # A handler that never finishes: abort the connection, which fails every request.
            with contextlib.suppress(OSError):
                session.mount.abort()
            thread.join(timeout)
        _cleanup_mountpoint(path, made)
    if "error" in box and not isinstance(box["error"], KeyboardInterrupt):
        raise box["error"]
    if raise_handler_errors and session.errors:
        raise HandlerErrors(f"{len(session.errors)} handler error(s); first: {session.errors[0]!r}") \
            from session.errors[0]


class MountedProcess:
    """A filesystem served by a child process; ``path`` is its mountpoint."""

    def __init__(self, path: str, proc: subprocess.Popen[bytes]) -> None:
        self.path = path
        self.proc = proc

    def __fspath__(self) -> str:
        return self.path

    def join(self, *parts: str) -> str:
        """``os.path.join(self.path, *parts)``."""
        return os.path.join(self.path, *parts)


class ProcessMountFactory(Protocol):
    """The type of the ``fuse_mount_process`` fixture: :func:`mounted_process` for the rest of the test."""

    def __call__(
        self,
        factory: str,
        args: Sequence[str] = ...,
        *,
        options: str = ...,
        mountpoint: str | None = ...,
        timeout: float = ...,
    ) -> MountedProcess: ...


def wait_for_line(proc: subprocess.Popen[bytes], want: bytes = b"ready", timeout: float = 20.0) -> bool:
    """Read ``proc``'s stdout (a pipe) until a line equal to ``want`` (stripped): True, or False
    once ``proc`` exits, its stdout ends, or ``timeout`` seconds pass first."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        ready, _, _ = select.select([proc.stdout], [], [], 0.05)
        if ready:
            line = proc.stdout.readline()
            if line.strip() == want:
                return True
            if not line:
                return False
    return False


@contextlib.contextmanager
def mounted_process(
    factory: str,
    args: Sequence[str] = (),
    *,
    options: str = "",
    mountpoint: str | None = None,
    timeout: float = 20.0,
) -> Iterator[MountedProcess]:
    """Serve ``factory`` (``"module:callable"`` returning an :class:`Operations`) in a child process.

    ``args`` are passed to the callable as strings. The child exits non-zero if any handler
    raised an unexpected exception; that is reported here as :class:`HandlerErrors`.
    """
    path, made = _make_mountpoint(mountpoint)
    cmd = [sys.executable, "-m", "afuse.testing", factory, path, "-o", options, *args]
    env = dict(os.environ)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    # stderr goes to a file: a chatty daemon must never block on a full pipe.
    errlog = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errlog, env=env)
    try:
        if not wait_for_line(proc, b"ready", timeout):  # the child prints "ready" once mounted
            proc.kill()
            proc.wait(timeout)
            errlog.seek(0)
            err = errlog.read()
            raise MountError(0, f"filesystem process did not start: {err.decode(errors='replace')}")
        yield MountedProcess(path, proc)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        _cleanup_mountpoint(path, made)
    errlog.seek(0)
    err = errlog.read()
    errlog.close()
    if proc.returncode not in (0, -signal.SIGTERM):
        raise HandlerErrors(f"filesystem process exited {proc.returncode}: {err.decode(errors='replace')}")


def _child_main(argv: Sequence[str]) -> int:
    """``python -m afuse.testing module:callable MOUNTPOINT -o OPTS [ARGS...]``."""
    factory, path, _o, options, *args = argv
    mod_name, _, attr = factory.partition(":")
    ops = getattr(importlib.import_module(mod_name), attr)(*args)
    failed = False

    async def main() -> None:
        nonlocal failed
        async with mount(ops, path, options=options or None, **_transport({})) as session, \
                trio.open_nursery() as nursery:
            await nursery.start(partial(serve_until_signalled, session, signals=(signal.SIGTERM, signal.SIGINT)))
            print("ready", flush=True)
        failed = bool(session.errors)
        for e in session.errors:
            print(f"handler error: {e!r}", file=sys.stderr)

    trio.run(main)
    return 1 if failed else 0


@contextlib.contextmanager
def served_device(
    ops: DeviceOperations,
    name: str,
    *,
    timeout: float = 20.0,
    raise_handler_errors: bool = True,
    **serve_kwargs: Any,
) -> Iterator[CuseSession]:
    """Serve CUSE device ``ops`` as /dev/``name`` in a background thread (see :mod:`afuse.cuse`).

    The test thread may open and use ``session.path``. On exit the device is removed (its
    connection aborted if serving does not stop within ``timeout``), and unexpected handler
    exceptions are raised as :class:`HandlerErrors`.
    """
    from .cuse import CuseSession, serve_device

    with _serving_thread(
        partial(serve_device, ops, name, **serve_kwargs), f"afuse /dev/{name}", timeout,
        lambda: TimeoutError(f"creating /dev/{name} did not finish within {timeout} s"),
        CuseSession.abort, raise_handler_errors,
    ) as (session, _token):
        yield session


def copy_tree(src: str, dst: str) -> None:
    """``cp -a`` in Python (for tests comparing trees)."""
    shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True)


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
