"""The reader pool's handler driver without a mount: INTERRUPT of a blocked handler.

``ReaderPool.resume`` drives a handler that blocked, for /dev/fuse readers and ring tasks alike;
an INTERRUPT cancels the worker's scope and the request must then be answered EINTR, whatever
shape the cancellation takes when it leaves the handler.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import trio
import trio.testing

from afuse.readers import ReaderPool, only_cancelled, poll
from afuse.wire import replies


async def waits_plainly() -> str:
    await trio.sleep_forever()
    return "unreachable"


async def waits_in_a_nursery() -> str:
    async with trio.open_nursery() as nursery:  # cancelled, it raises a group of Cancelled
        nursery.start_soon(trio.sleep_forever)
        await trio.sleep_forever()
    return "unreachable"


async def waits_in_nested_nurseries() -> str:
    async with trio.open_nursery() as outer:
        outer.start_soon(waits_in_a_nursery)
        await trio.sleep_forever()
    return "unreachable"


async def drive_and_interrupt(handler: Callable[[], Coroutine[Any, Any, Any]], unique: int = 42) -> tuple[
        ReaderPool, list[object]]:
    """Drive ``handler()`` as a worker does until it blocks, then INTERRUPT it; what resume returned."""
    pool = ReaderPool(-1, 1, 1)
    results: list[object] = []

    async def worker() -> None:
        with trio.CancelScope() as wscope:
            coro = handler()
            msg = coro.send(None)  # it blocks: resume takes over, as in a reader or a ring task
            results.append(await pool.resume(coro, msg, unique, wscope, handoff=lambda: None))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker)
        await trio.testing.wait_all_tasks_blocked()
        assert unique in pool.inflight and unique in pool.blocked
        pool.interrupt(unique)
    return pool, results


@pytest.mark.trio
@pytest.mark.parametrize("handler", [waits_plainly, waits_in_a_nursery, waits_in_nested_nurseries])
async def test_interrupted_handler_is_answered_eintr(handler: Callable[[], Coroutine[Any, Any, Any]]) -> None:
    pool, results = await drive_and_interrupt(handler)
    assert results == [replies.error(42, errno.EINTR)]
    assert not pool.inflight and not pool.blocked and not pool.early_interrupts


async def fails_while_cancelled() -> str:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.sleep_forever)
        try:
            await trio.sleep_forever()
        finally:
            raise ValueError("a handler bug while being interrupted")
    return "unreachable"


@pytest.mark.trio
async def test_a_real_error_next_to_the_cancellation_is_not_swallowed() -> None:
    with pytest.RaisesGroup(ValueError, flatten_subgroups=True):
        await drive_and_interrupt(fails_while_cancelled)


@pytest.mark.trio
async def test_only_cancelled() -> None:
    caught: list[trio.Cancelled] = []
    with trio.CancelScope() as scope:
        scope.cancel()
        try:
            await trio.lowlevel.checkpoint()
        except trio.Cancelled as e:
            caught.append(e)
            raise
    cancelled = caught[0]
    assert only_cancelled(cancelled)
    assert only_cancelled(BaseExceptionGroup("g", [cancelled, BaseExceptionGroup("h", [cancelled])]))
    assert not only_cancelled(BaseExceptionGroup("g", [cancelled, ValueError()]))
    assert not only_cancelled(ValueError())


def test_poll_reads_what_comes_and_gives_up_after_its_time() -> None:
    """``poll`` returns a message already there, and None once its time is up on an empty fd."""
    r, w = os.pipe()
    try:
        os.set_blocking(r, False)
        buf = bytearray(64)
        t0 = time.perf_counter_ns()
        assert poll(r, buf, 2_000_000) is None  # 2 ms of nothing
        assert time.perf_counter_ns() - t0 >= 2_000_000
        os.write(w, b"request")
        assert poll(r, buf, 2_000_000) == 7
        assert bytes(buf[:7]) == b"request"
        os.close(w)
        w = -1
        assert poll(r, buf, 1_000_000) == 0  # end of file is a read like any other
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


@pytest.mark.trio
async def test_ended_workers_buffers_are_reused_and_never_under_a_blocked_handler(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers come and go with blocking handlers; a new worker takes an ended one's buffer
    (no fresh megabyte to fault in and zero each time), never one whose request is still being
    served: a blocked handler's request stays intact while other workers read."""
    import socket

    import afuse.readers

    made: list[int] = []
    make = afuse.readers.reusable_buffer

    def counting(size: int) -> bytearray:
        made.append(size)
        return make(size)

    monkeypatch.setattr(afuse.readers, "reusable_buffer", counting)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # one request per read, as /dev/fuse
    a.setblocking(False)
    pool = ReaderPool(a.fileno(), 1, 8, private_clones=False)
    pool.open(clones=[])
    pool.bufsize = 4096
    intact: list[bool] = []
    served = blocked_ones = 0
    unique = iter(range(1, 1 << 30))

    async def serve(fd: int, data: memoryview, wscope: trio.CancelScope) -> bool:
        nonlocal served, blocked_ones
        copy = data.tobytes()

        async def handler() -> None:
            if bytes(data[:1]) == b"B":
                await trio.sleep(0.003)  # blocks: the device goes to another worker
                intact.append(data.tobytes() == copy)

        _, blocked = await pool.drive(handler(), next(unique), wscope)
        served += 1
        blocked_ones += blocked
        return blocked

    sent = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pool.run, serve, trio.CancelScope())
        for i in range(300):
            b.send((b"B" if i % 3 else b"F") + os.urandom(3000))
            sent += 1
            if i % 10 == 9:
                await trio.sleep(0.01)  # idle: the workers beyond the first end
        with trio.fail_after(10):
            while served < sent:
                await trio.sleep(0.01)
        await pool.drain()
    a.close()
    b.close()
    assert blocked_ones == 200 and len(intact) == 200 and all(intact)
    assert 1 < len(made) <= 8  # at most one buffer per worker alive at once, not one per worker started
