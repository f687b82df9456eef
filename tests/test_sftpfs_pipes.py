"""sftpfs's pipe reader and writer (the ``ssh`` transport's ends), on a real pipe with a real peer:
packets of every size arrive whole and in order across the reader's chunks; the writer keeps
order under back-pressure without copying, closes after what it queued, and a peer that goes
away ends both."""

from __future__ import annotations

import asyncio
import fcntl
import os
import random
import threading

import pytest

from afuse.examples.sftpfs import _PipeReader, _PipeWriter


def test_reader_returns_whole_packets_across_chunks() -> None:
    rng = random.Random(7)
    sizes = [rng.choice([1, 4, 13, 4096, 65536, 131072 + 9, 300_000]) for _ in range(300)]
    payload = b"".join(bytes([i % 251]) * n for i, n in enumerate(sizes))
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    os.set_blocking(w, True)

    def feed() -> None:  # odd-sized writes, so packets straddle the reader's chunks
        pos = 0
        while pos < len(payload):
            n = rng.choice([1, 7, 1000, 65536, 200_000])
            pos += os.write(w, payload[pos:pos + n])
        os.close(w)

    async def main() -> list[bytes | memoryview]:
        reader = _PipeReader(r)
        t = threading.Thread(target=feed)
        t.start()
        try:
            got = [await reader.readexactly(n) for n in sizes]
            with pytest.raises(asyncio.IncompleteReadError):  # the end: an EOFError for asyncssh
                await reader.readexactly(1)
        finally:
            t.join()
        assert reader.eof
        return got

    got = asyncio.run(main())
    assert [len(g) for g in got] == sizes
    assert b"".join(got) == payload


def test_reader_hands_on_large_data_packets_as_views() -> None:
    """An SSH_FXP_DATA packet (type 103) of 16 KiB or more within one read is a view of what was
    read (its data reaches the kernel without a copy); other packets are bytes."""
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    data = bytes([103]) + os.urandom(100_000)
    name = bytes([104]) + os.urandom(30_000)
    small = bytes([103]) + os.urandom(100)
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 1 << 20)  # all of it in the pipe, read at once
    assert os.write(w, data + name + small) == len(data + name + small)
    os.close(w)

    async def main() -> list[bytes | memoryview]:
        reader = _PipeReader(r)
        return [await reader.readexactly(len(p)) for p in (data, name, small)]

    got = asyncio.run(main())
    assert [type(g) for g in got] == [memoryview, bytes, bytes]
    assert [bytes(g) for g in got] == [data, name, small]


def test_writer_keeps_order_under_back_pressure_and_closes_after_the_queue() -> None:
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    os.set_blocking(r, True)
    parts = [os.urandom(n) for n in (10, 70_000, 1, 1 << 20, 3, 250_000)] * 8
    received = bytearray()

    def drain() -> None:
        while chunk := os.read(r, 1 << 16):
            received.extend(chunk)
        os.close(r)

    async def main() -> None:
        writer = _PipeWriter(w)
        t = threading.Thread(target=drain)
        t.start()
        try:
            for i in range(0, len(parts), 3):
                writer.writelines([memoryview(p) for p in parts[i:i + 3]])  # more than the pipe holds
                await asyncio.sleep(0)
            assert writer.queue  # the pipe is full: the rest waits, not copied
            writer.close()  # closes once everything queued is written
            await asyncio.wait_for(writer.wait_closed(), 30)
        finally:
            await asyncio.to_thread(t.join)
        assert writer.is_closing() and writer.broken is None

    asyncio.run(main())
    assert bytes(received) == b"".join(parts)


def test_writer_to_a_peer_that_went_away_stops_quietly() -> None:
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    os.close(r)

    async def main() -> _PipeWriter:
        writer = _PipeWriter(w)
        writer.write(b"x" * 100)  # EPIPE: dropped, the writer closed (the reader sees the end)
        await asyncio.wait_for(writer.wait_closed(), 5)
        writer.write(b"more")  # after closing: ignored
        return writer

    writer = asyncio.run(main())
    assert isinstance(writer.broken, BrokenPipeError) and not writer.queue
