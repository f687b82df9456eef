"""Serve a filesystem from an asyncio program, with handlers written as asyncio coroutines.

::

    import asyncio, afuse, afuse.asyncio

    class NetFS(afuse.Operations):
        async def read(self, req: afuse.ReadRequest) -> bytes:
            reader, writer = await asyncio.open_connection("example.org", 80)  # asyncio code
            ...

    async def main() -> None:
        async with afuse.asyncio.mount(NetFS(), "/mnt/net") as session:
            await session.wait_closed()  # serve until unmounted

    asyncio.run(main())

afuse itself runs on trio; here trio runs as a *guest* of the asyncio loop
(:func:`trio.lowlevel.start_guest_run`), in the same thread. Each handler call becomes an asyncio
task (in a copy of the calling context in which sniffio reports ``"asyncio"``) that the trio side
waits for. An INTERRUPT, or stopping, cancels that task. See docs/asyncio.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import functools
import inspect
import os
import signal
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from typing import Any, TypeVar

import outcome
import sniffio
import trio

from .errors import FUSEError
from .operations import Operations
from .session import Session, serve
from .wire.opcodes import HANDLERS

__all__ = ["AsyncioSession", "bridge", "mount", "run", "run_asyncio", "serve_until_stopped"]

T = TypeVar("T")

#: Signals :func:`serve_until_stopped` and :func:`run` stop on by default.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

_DIR_HANDLERS = ("readdir", "readdirplus")

#: trio checkpoints a handler call polls its asyncio task for before sleeping until it ends.
SPIN_CHECKPOINTS = 3


# -- the trio side waiting for asyncio ---------------------------------------------------------

async def _run_in_asyncio(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` as an asyncio task and wait for it from trio; cancelling waits for its end.

    The task runs in a copy of the caller's context (so :func:`afuse.current_session` and the
    program's context variables carry over) in which sniffio's override is cleared: sniffio
    then finds the running asyncio task and reports ``"asyncio"``.
    """
    ctx = contextvars.copy_context()
    ctx.run(sniffio.current_async_library_cvar.set, None)
    try:
        task = loop.create_task(coro, context=ctx)
    except BaseException:
        coro.close()
        raise
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()
    waiting = False  # whether trio sleeps on ``done`` (then the task's end must wake it)

    def on_done(_: asyncio.Task[T]) -> None:
        if waiting:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

    task.add_done_callback(on_done)
    try:
        # A handler that does not wait for I/O ends within an iteration or two of the asyncio
        # loop; trio checkpoints interleave with those without waking trio's I/O thread, which
        # sleeping on ``done`` would need (about 0.15 ms a request). Then sleep.
        for _ in range(SPIN_CHECKPOINTS):
            if task.done():
                break
            await trio.lowlevel.checkpoint()
        else:
            waiting = True
            if not task.done():
                await done.wait()
    except BaseException:  # trio.Cancelled: an INTERRUPT, or the session stopping
        task.cancel()
        waiting = True
        if not task.done():
            with trio.CancelScope(shield=True):
                await done.wait()
        raise
    if task.cancelled():
        # Cancelled from the asyncio side (e.g. the loop shutting down): not the handler's answer.
        raise FUSEError(errno.EINTR, "the asyncio task running the handler was cancelled")
    return task.result()


async def run_asyncio(coro: Coroutine[Any, Any, T]) -> T:
    """From trio code running as a guest of asyncio (handlers mounted with ``trio_handlers=True``),
    run asyncio coroutine ``coro`` as a task and return its result; cancelling the caller cancels it."""
    return await _run_in_asyncio(asyncio.get_running_loop(), coro)


class _AsyncIterBridge:
    """A trio-side async iterator over an asyncio async iterator (a readdir generator).

    Each step runs as an asyncio task, so code after the generator's ``yield`` runs only when
    the dispatcher takes the next entry, as with a trio handler.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, source: Any) -> None:
        self._loop = loop
        self._it = source.__aiter__()
        self._closed = False

    def __aiter__(self) -> _AsyncIterBridge:
        return self

    async def __anext__(self) -> Any:
        async def step() -> tuple[bool, Any]:
            try:
                return True, await self._it.__anext__()
            except StopAsyncIteration:
                return False, None

        more, item = await _run_in_asyncio(self._loop, step())
        if not more:
            self._closed = True
            raise StopAsyncIteration
        return item

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        aclose = getattr(self._it, "aclose", None)
        if aclose is None:
            return

        async def close() -> None:
            await aclose()

        with trio.CancelScope(shield=True):  # let the generator's finally blocks run
            await _run_in_asyncio(self._loop, close())


def _handler(name: str) -> Callable[..., Awaitable[Any]]:
    async def call(self: _Bridged, req: Any) -> Any:
        return await _run_in_asyncio(self._afuse_loop, getattr(self._afuse_ops, name)(req))

    call.__name__ = call.__qualname__ = name
    return call


def _dir_handler(name: str) -> Callable[..., Awaitable[Any]]:
    async def call(self: _Bridged, req: Any) -> Any:
        loop = self._afuse_loop
        result = getattr(self._afuse_ops, name)(req)
        if hasattr(result, "__aiter__"):  # an async generator function
            return _AsyncIterBridge(loop, result)
        result = await _run_in_asyncio(loop, result)
        if hasattr(result, "__aiter__"):  # a coroutine returning an async iterable
            return _AsyncIterBridge(loop, result)
        return result

    call.__name__ = call.__qualname__ = name
    return call


def _is_async(fn: Any) -> bool:
    """True for an ``async def`` function, also behind ``functools.wraps`` decorators."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(inspect.unwrap(fn))


def _forward(name: str) -> Callable[..., Any]:
    def call(self: _Bridged, *args: Any, **kwargs: Any) -> Any:
        return getattr(self._afuse_ops, name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call


def _forward_attribute(name: str) -> property:
    return property(lambda self: getattr(self._afuse_ops, name), doc=f"The wrapped filesystem's {name}.")


class _Bridged(Operations):
    """Base of the generated wrapper classes; see :func:`bridge`."""

    _afuse_ops: Operations
    _afuse_loop: asyncio.AbstractEventLoop

    def __init__(self, ops: Operations, loop: asyncio.AbstractEventLoop) -> None:
        self._afuse_ops = ops
        self._afuse_loop = loop

    def __getattr__(self, name: str) -> Any:
        # Anything else (a filesystem's own attributes) is the wrapped object's.
        if name.startswith("_afuse_"):
            raise AttributeError(name)
        return getattr(self._afuse_ops, name)

    def __repr__(self) -> str:
        return f"afuse.asyncio.bridge({self._afuse_ops!r})"


_classes: weakref.WeakKeyDictionary[type[Operations], type[_Bridged]] = weakref.WeakKeyDictionary()


def _bridge_class(cls: type[Operations]) -> type[_Bridged]:
    made = _classes.get(cls)
    if made is not None:
        return made
    ns: dict[str, Any] = {}
    for name, base in vars(Operations).items():
        if name.startswith("_"):
            continue
        if not callable(base):  # entry_timeout, attr_timeout: the wrapped object's values
            ns[name] = _forward_attribute(name)
            continue
        fn: Any = getattr(cls, name)
        if fn is base:
            continue  # not overridden: the dispatcher answers it without a call
        if name not in HANDLERS:  # init: synchronous, called from trio as it is
            ns[name] = _forward(name)
        elif name in _DIR_HANDLERS:
            if not (_is_async(fn) or inspect.isasyncgenfunction(inspect.unwrap(fn))):
                raise TypeError(f"{cls.__qualname__}.{name} must be an 'async def' coroutine function "
                                "or async generator function")
            ns[name] = _dir_handler(name)
        else:
            if not _is_async(fn):
                raise TypeError(f"{cls.__qualname__}.{name} must be an 'async def' coroutine function")
            ns[name] = _handler(name)
    made = _classes[cls] = type(f"Asyncio{cls.__name__}", (_Bridged,), ns)
    return made


def bridge(ops: Operations, loop: asyncio.AbstractEventLoop | None = None) -> Operations:
    """An :class:`Operations` whose handlers run ``ops``'s as tasks on asyncio ``loop``.

    Only the handlers ``ops`` overrides are bridged (the others still answer ENOSYS or their
    default without a call). ``loop`` defaults to the running loop. Serve the result with trio
    running as a guest of that loop (:func:`mount` does both). Raises TypeError naming the
    method if a handler is not an ``async def``.
    """
    if not isinstance(ops, Operations):
        raise TypeError(f"expected an afuse.Operations instance, not {type(ops).__name__}")
    if isinstance(ops, _Bridged):
        return ops
    return _bridge_class(type(ops))(ops, loop or asyncio.get_running_loop())


# -- the asyncio side ----------------------------------------------------------------------------

class AsyncioSession:
    """A filesystem served from asyncio: the asyncio view of an :class:`afuse.Session`."""

    def __init__(self, session: Session, loop: asyncio.AbstractEventLoop, token: trio.lowlevel.TrioToken,
                 finished: asyncio.Future[outcome.Outcome[None]]) -> None:
        #: The trio-side session (its async methods are trio's: call them with :meth:`call_trio`).
        self.session = session
        self._loop = loop
        self._token = token
        self._finished = finished

    @property
    def mountpoint(self) -> str:
        """Where the filesystem is mounted."""
        return self.session.mountpoint

    @property
    def ops(self) -> Operations:
        """The filesystem object given to :func:`mount` (``session.ops`` is its trio-side wrapper)."""
        ops = self.session.ops
        return ops._afuse_ops if isinstance(ops, _Bridged) else ops

    @property
    def errors(self) -> list[BaseException]:
        """Unexpected exceptions raised by handlers (each was answered EIO and logged)."""
        return self.session.errors

    @property
    def closed(self) -> bool:
        """True once serving has ended."""
        return self._finished.done() or self.session.closed

    async def wait_closed(self) -> None:
        """Wait until serving has ended (unmounted from outside, aborted, or shut down)."""
        await asyncio.shield(self._finished)

    async def call_trio(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run trio async function ``fn(*args)`` in the session's trio run and return its result.

        For afuse's trio API, e.g. ``await s.call_trio(afuse.notify.inval_entry, s.session, 1,
        b"name")``. Cancelling the caller cancels ``fn``.
        """
        loop = self._loop
        result: asyncio.Future[outcome.Outcome[T]] = loop.create_future()
        scope = trio.CancelScope()

        def deliver(o: outcome.Outcome[T]) -> None:
            if not result.done():
                result.set_result(o)

        async def runner() -> None:
            o: outcome.Outcome[T] = outcome.Error(asyncio.CancelledError())  # if the scope is cancelled
            try:
                with scope:
                    o = outcome.Value(await fn(*args))
            except trio.Cancelled:  # the trio run is ending
                loop.call_soon_threadsafe(deliver, o)
                raise
            except BaseException as e:
                o = outcome.Error(e)
            loop.call_soon_threadsafe(deliver, o)

        def start() -> None:
            trio.lowlevel.spawn_system_task(runner)

        try:
            self._token.run_sync_soon(start)
        except trio.RunFinishedError:
            raise RuntimeError("the session's trio run has ended") from None
        try:
            o = await asyncio.shield(result)
        except asyncio.CancelledError:
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(scope.cancel)
            await _wait_uncancelled(result)
            raise
        return o.unwrap()


async def _wait_uncancelled(fut: asyncio.Future[Any]) -> bool:
    """Wait for ``fut`` even if cancelled meanwhile; True if a cancellation was swallowed."""
    cancelled = False
    while not fut.done():
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            if fut.done():
                break
            cancelled = True
    return cancelled


def _unwrap_single(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


class _TrioHost:
    """The one trio run (a guest of an asyncio loop) serving every mount of that loop.

    Trio allows one run per thread, so mounts share it; it starts with the first and ends when
    the last has ended.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.users = 0
        self.stopping = False
        self.ready: asyncio.Future[tuple[trio.lowlevel.TrioToken, trio.Nursery]] = loop.create_future()
        self.finished: asyncio.Future[outcome.Outcome[None]] = loop.create_future()
        self._stop: trio.Event | None = None

    def start(self) -> None:
        trio.lowlevel.start_guest_run(
            self._main,
            run_sync_soon_threadsafe=self.loop.call_soon_threadsafe,
            run_sync_soon_not_threadsafe=self.loop.call_soon,
            done_callback=self._done,
            host_uses_signal_set_wakeup_fd=True,
        )

    async def _main(self) -> None:
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            if not self.ready.done():
                self.ready.set_result((trio.lowlevel.current_trio_token(), nursery))
            if not self.stopping:
                await self._stop.wait()

    def _done(self, o: outcome.Outcome[None]) -> None:
        if _hosts.get(self.loop) is self:
            del _hosts[self.loop]
        if not self.ready.done():
            self.ready.set_exception(RuntimeError("the trio run ended before it started serving"))
        if not self.finished.done():
            self.finished.set_result(o)

    def stop(self) -> None:
        self.stopping = True
        if self.ready.done() and not self.ready.cancelled() and self.ready.exception() is None:
            token, _ = self.ready.result()
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self._set_stop)

    def _set_stop(self) -> None:
        if self._stop is not None:
            self._stop.set()


_hosts: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _TrioHost] = weakref.WeakKeyDictionary()


async def _acquire_host(loop: asyncio.AbstractEventLoop) -> _TrioHost:
    """The loop's trio host, started if need be, counting one more user."""
    while True:
        host = _hosts.get(loop)
        if host is None:
            host = _hosts[loop] = _TrioHost(loop)
            host.start()
        if host.stopping:  # a new run can start only once this one has ended
            await asyncio.shield(host.finished)
            continue
        host.users += 1
        try:
            await asyncio.shield(host.ready)
        except BaseException:
            await _release_host(host)
            raise
        return host


async def _release_host(host: _TrioHost) -> None:
    """Count one user less; the last one stops the trio run and waits for its end."""
    host.users -= 1
    if host.users > 0:
        return
    host.stop()
    cancelled = await _wait_uncancelled(host.finished)
    o = host.finished.result()
    if isinstance(o, outcome.Error) and not isinstance(o.error, trio.Cancelled):
        raise _unwrap_single(o.error)
    if cancelled:
        raise asyncio.CancelledError


@contextlib.asynccontextmanager
async def mount(
    ops: Operations, mountpoint: str | os.PathLike[str], *, trio_handlers: bool = False, **serve_kwargs: Any,
) -> AsyncIterator[AsyncioSession]:
    """Serve ``ops`` on ``mountpoint`` for the duration of the ``async with`` block (asyncio).

    Keyword arguments are those of :func:`afuse.serve` (``options``, ``config``, ...). Handlers
    are asyncio coroutines; with ``trio_handlers=True`` they are trio code served as they are (a
    :class:`afuse.nodes.NodeFS`), reaching asyncio with :func:`run_asyncio`. Leaving the block by
    any way (including cancellation) unmounts and waits until serving has ended; a failure to
    mount is raised here as a plain exception.
    """
    loop = asyncio.get_running_loop()
    bridged = ops if trio_handlers else bridge(ops, loop)
    host = await _acquire_host(loop)
    try:
        async with _serve_on(host, bridged, mountpoint, serve_kwargs) as session:
            yield session
    finally:
        await _release_host(host)


@contextlib.asynccontextmanager
async def _serve_on(host: _TrioHost, ops: Operations, mountpoint: str | os.PathLike[str],
                    serve_kwargs: dict[str, Any]) -> AsyncIterator[AsyncioSession]:
    loop = host.loop
    token, nursery = host.ready.result()
    started: asyncio.Future[Session] = loop.create_future()
    finished: asyncio.Future[outcome.Outcome[None]] = loop.create_future()
    scope = trio.CancelScope()

    async def serve_until_cancelled() -> None:
        with scope:
            async with trio.open_nursery() as inner:
                session: Session = await inner.start(functools.partial(serve, ops, mountpoint, **serve_kwargs))
                if started.cancelled():  # the asyncio side gave up while mounting
                    inner.cancel_scope.cancel()
                else:
                    started.set_result(session)

    async def serve_one() -> None:
        o = await outcome.acapture(serve_until_cancelled)
        if not finished.done():
            finished.set_result(o)
        if isinstance(o, outcome.Error) and not isinstance(o.error, Exception):
            raise o.error  # trio's own cancellation, KeyboardInterrupt: not ours to swallow

    def stop() -> None:
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(scope.cancel)

    token.run_sync_soon(nursery.start_soon, serve_one)
    try:
        waiting: list[asyncio.Future[Any]] = [started, finished]
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        started.cancel()
        stop()
        await _wait_uncancelled(finished)
        raise
    if not started.done():
        o = finished.result()
        if isinstance(o, outcome.Error):
            raise _unwrap_single(o.error) from None
        raise RuntimeError("serving ended before the filesystem was mounted")
    try:
        yield AsyncioSession(started.result(), loop, token, finished)
    finally:
        stop()
        cancelled = await _wait_uncancelled(finished)
        o = finished.result()
        if isinstance(o, outcome.Error):
            raise _unwrap_single(o.error)
        if cancelled:
            raise asyncio.CancelledError


async def serve_until_stopped(
    ops: Operations, mountpoint: str | os.PathLike[str], *, signals: Iterable[int] = STOP_SIGNALS, **serve_kwargs: Any,
) -> int | None:
    """Serve ``ops`` until unmounted from outside or one of ``signals`` arrives, then unmount.

    Returns the signal number that stopped serving, or None if the filesystem was unmounted.
    Signal handlers are installed with :meth:`asyncio.loop.add_signal_handler` (main thread
    only) for as long as the filesystem is mounted, then the previous ones are restored.
    Keyword arguments are :func:`mount`'s.
    """
    loop = asyncio.get_running_loop()
    got: asyncio.Future[int] = loop.create_future()

    def on_signal(signum: int) -> None:
        if not got.done():
            got.set_result(signum)

    installed: list[tuple[int, Any]] = []
    try:
        for signum in signals:
            previous = signal.getsignal(signum)
            loop.add_signal_handler(signum, on_signal, signum)
            installed.append((signum, previous))
        async with mount(ops, mountpoint, **serve_kwargs) as session:
            closed = asyncio.ensure_future(session.wait_closed())
            try:
                waiting: list[asyncio.Future[Any]] = [got, closed]
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            finally:
                closed.cancel()
    finally:
        for signum, previous in reversed(installed):
            loop.remove_signal_handler(signum)
            if previous is not None:  # e.g. asyncio.run's own SIGINT handler
                signal.signal(signum, previous)
    return got.result() if got.done() else None


def run(ops: Operations, mountpoint: str | os.PathLike[str], *, signals: Iterable[int] = STOP_SIGNALS,
        **serve_kwargs: Any) -> int | None:
    """``asyncio.run(serve_until_stopped(...))``: mount, serve until unmounted or signalled, unmount.

    Returns the signal number that stopped serving (``signal.SIGINT`` for Ctrl-C), or None if
    the filesystem was unmounted from outside.
    """
    return asyncio.run(serve_until_stopped(ops, mountpoint, signals=signals, **serve_kwargs))
