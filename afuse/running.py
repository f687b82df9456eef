"""Serving from a script or a command line: until unmounted or signalled, never leaving a mount behind.

:func:`run` is the one-call way (like ``trio.run``); :func:`serve_until_signalled` is the wait
inside it, for code that mounts (or takes over) a session itself and decides what a signal does.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Final, Protocol

import trio

from .device import MountOptions
from .operations import Operations
from .session import mount
from .wire.init import InitConfig

__all__ = ["STOP_SIGNALS", "SupportsWaitClosed", "run", "run_until_signalled", "serve_until_signalled"]

#: The signals that stop :func:`run` by default: Ctrl-C, ``kill``, and the terminal going away.
STOP_SIGNALS: Final[tuple[signal.Signals, ...]] = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class SupportsWaitClosed(Protocol):
    """Anything with ``wait_closed()`` that returns once serving has ended (an :class:`afuse.Session`)."""

    async def wait_closed(self) -> None: ...


async def serve_until_signalled(
    session: SupportsWaitClosed,
    *,
    signals: Iterable[int] = STOP_SIGNALS,
    on_signal: Callable[[signal.Signals], Awaitable[object]] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> signal.Signals | None:
    """Wait until ``session`` closes (return None) or one of ``signals`` arrives (return it).

    Unmounts nothing: the caller decides (leaving ``afuse.mount``'s block unmounts). With
    ``on_signal``, the first signal awaits ``on_signal(signum)`` instead (e.g. a failover daemon's
    ``session.drain()``), the wait goes on until the session closes, and the signal is returned;
    later signals are ignored meanwhile. ``task_status.started()`` is called once the signals are
    caught (for ``nursery.start``). Signals can only be caught in the main thread.
    """
    wanted = tuple(signal.Signals(s) for s in signals)
    if not wanted:
        task_status.started()
        await session.wait_closed()
        return None
    got: signal.Signals | None = None
    with trio.open_signal_receiver(*wanted) as receiver:
        task_status.started()
        async with trio.open_nursery() as nursery:

            async def watch_signals() -> None:
                nonlocal got
                async for signum in receiver:
                    got = signal.Signals(signum)
                    if on_signal is not None:
                        # Later signals are still caught (the receiver stays open), and ignored.
                        await on_signal(got)
                        return  # wait_closed() ends the wait
                    break
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_signals)
            await session.wait_closed()
            nursery.cancel_scope.cancel()
    return got


def run(
    ops: Operations,
    mountpoint: str | os.PathLike[str],
    *,
    options: MountOptions | str | None = None,
    config: InitConfig | None = None,
    signals: Iterable[int] = STOP_SIGNALS,
    **serve_kwargs: Any,
) -> None:
    """Mount ``ops`` on ``mountpoint`` and serve it until unmounted from outside or signalled.

    Like ``trio.run`` it blocks and starts its own event loop. One of ``signals`` (SIGINT, SIGTERM
    or SIGHUP by default; catching any needs the main thread) unmounts and returns normally, and
    so does Ctrl-C when SIGINT is not among them. An exception while mounting or serving (e.g.
    raised by ``ops.init``) unmounts and is re-raised as itself, not wrapped in an exception
    group. Other keyword arguments are those of :func:`afuse.serve`.
    """
    run_until_signalled(ops, mountpoint, options=options, config=config, signals=signals, **serve_kwargs)


def run_until_signalled(
    ops: Operations,
    mountpoint: str | os.PathLike[str],
    *,
    signals: Iterable[int] = STOP_SIGNALS,
    **serve_kwargs: Any,
) -> signal.Signals | None:
    """:func:`run`, returning the signal that stopped it (None if unmounted from outside).

    A KeyboardInterrupt (Ctrl-C with SIGINT not in ``signals``) is returned as SIGINT.
    """
    wanted = tuple(signal.Signals(s) for s in signals)
    try:
        return trio.run(_serve_until_signalled, ops, mountpoint, wanted, serve_kwargs)
    except KeyboardInterrupt:
        return signal.SIGINT


async def _serve_until_signalled(
    ops: Operations,
    mountpoint: str | os.PathLike[str],
    signals: tuple[signal.Signals, ...],
    serve_kwargs: dict[str, Any],
) -> signal.Signals | None:
    # The signals are caught before mounting, so one arriving while mounting (or during INIT)
    # cancels it and still unmounts, instead of killing the process with a mount left behind.
    got: signal.Signals | None = None
    failure: BaseException | None = None
    try:
        catch: contextlib.AbstractContextManager[Any] = (
            trio.open_signal_receiver(*signals) if signals else contextlib.nullcontext()
        )
        with catch as receiver:
            async with trio.open_nursery() as nursery:

                async def watch_signals() -> None:
                    nonlocal got
                    async for signum in receiver:
                        got = signal.Signals(signum)
                        break
                    nursery.cancel_scope.cancel()

                if signals:
                    nursery.start_soon(watch_signals)
                async with mount(ops, mountpoint, **serve_kwargs) as session:
                    await session.wait_closed()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        failure = _one_cause(group)
        if failure is group:
            raise
    if failure is not None:
        raise failure  # outside the except block: no "during handling of the group" context
    return got


def _one_cause(exc: BaseException) -> BaseException:
    """``exc`` itself, or its only exception if it is a group of one (recursively)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc

