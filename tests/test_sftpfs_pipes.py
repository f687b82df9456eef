"""sftpfs's pipe ends (the ``ssh`` transport's), on real pipes with a real peer, in trio: what is
read arrives whole and in order through :func:`read_pipe`; the writer keeps order under
back-pressure without copying, closes after what it queued, and a peer that goes away ends both."""

from __future__ import annotations

import os
import random
import threading

import trio

from afuse.examples.sftpfs import PipeWriter, read_pipe


def test_read_pipe_delivers_everything_in_order_then_closes() -> None:
    rng = random.Random(7)
    payload = os.urandom(3_000_000)
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    os.set_blocking(w, True)

    def feed() -> None:  # odd-sized writes
        pos = 0
        while pos < len(payload):
            pos += os.write(w, payload[pos:pos + rng.choice([1, 7, 1000, 65536, 200_000])])
        os.close(w)

    got: list[memoryview] = []

    async def main() -> None:
        t = threading.Thread(target=feed)
        t.start()
        try:
            with trio.fail_after(30):
                await read_pipe(r, got.append)
        finally:
            await trio.to_thread.run_sync(t.join)

    trio.run(main)
    assert b"".join(got) == payload
    assert all(len(g) <= 1 << 20 for g in got)
    _assert_closed(r)


def test_read_pipe_stops_when_its_descriptor_is_closing() -> None:
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    async def main() -> None:
        with trio.fail_after(5):
            async with trio.open_nursery() as n:
                n.start_soon(read_pipe, r, lambda data: None)
                await trio.sleep(0.05)
                trio.lowlevel.notify_closing(r)  # as an abort does: the reader ends and closes it
        os.close(w)

    trio.run(main)  # returns: the reader ended
    _assert_closed(r)


def _assert_closed(fd: int) -> None:
    try:
        os.fstat(fd)
    except OSError:
        return
    raise AssertionError("read_pipe left its descriptor open")


def test_writer_keeps_order_under_back_pressure_and_closes_after_the_queue() -> None:
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    os.set_blocking(r, True)
    parts = [os.urandom(n) for n in (10, 70_000, 1, 1 << 20, 3, 250_000)] * 8
    received = bytearray()

    def drain() -> None:
        while chunk := os.read(r, 1 << 16):
            received.extend(chunk)
        os.close(r)

    async def main() -> PipeWriter:
        t = threading.Thread(target=drain)
        t.start()
        async with trio.open_nursery() as n:
            writer = PipeWriter(w, n)
            for i in range(0, len(parts), 3):
                writer.write([memoryview(p) for p in parts[i:i + 3]])  # more than the pipe holds
            assert writer.queue and writer.waiting  # the pipe is full: the rest waits, not copied
            writer.close()  # closes once everything queued is written
            with trio.fail_after(30):
                while not writer.closing:
                    await trio.sleep(0.01)
        await trio.to_thread.run_sync(t.join)
        return writer

    writer = trio.run(main)
    assert writer.broken is None and not writer.queue
    assert bytes(received) == b"".join(parts)


def test_writer_to_a_peer_that_went_away_stops_quietly() -> None:
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    os.close(r)

    async def main() -> PipeWriter:
        async with trio.open_nursery() as n:
            writer = PipeWriter(w, n)
            writer.write([b"x" * 100])  # EPIPE: dropped, the writer closed (the reader sees the end)
            assert writer.closing
            writer.write([b"more"])  # after closing: ignored
        return writer

    writer = trio.run(main)
    assert isinstance(writer.broken, BrokenPipeError) and not writer.queue
