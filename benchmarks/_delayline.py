"""A TCP relay that adds a fixed one-way delay in each direction: latency without a bandwidth cap.

    python benchmarks/_delayline.py --to HOST:PORT --delay SECONDS   # prints "listening PORT"
    python benchmarks/_delayline.py --echo --delay SECONDS           # delayed echo server (RTT check)

Stands in for ``tc qdisc add dev lo root netem delay 10ms`` where the kernel has no netem
(CONFIG_NET_SCH_NETEM unset). Every chunk read from one side is written to the other side
``--delay`` seconds after it arrived, in arrival order: a round trip through the relay gains
2 x delay, and many requests in flight overlap their delays just as packets do under netem
(no chunk waits for the one before it to be delivered, only for its own due time). Unlike netem,
each TCP connection ends at the relay, so TCP's own congestion window sees a short round trip;
the relay's queue (at most ``QUEUE_CHUNKS`` chunks of ``CHUNK`` bytes per direction) is the
in-flight limit instead, well above a 20 ms bandwidth-delay product at these speeds.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys

CHUNK = 256 * 1024
QUEUE_CHUNKS = 512  # 128 MiB per direction at most: far above 20 ms x loopback bandwidth


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _delayed_copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copy reader to writer, each chunk delivered ``delay`` seconds after it was read, in order."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUE_CHUNKS)

    async def pump_in() -> None:
        while True:
            try:
                data = await reader.read(CHUNK)
            except ConnectionError:
                data = b""
            await queue.put((loop.time() + delay, data))
            if not data:
                return

    async def pump_out() -> None:
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    pin = asyncio.ensure_future(pump_in())
    try:
        await pump_out()
    except ConnectionError:
        pass
    finally:
        pin.cancel()


async def _relay(target: tuple[str, int], delay: float, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
    _nodelay(writer)
    try:
        up_reader, up_writer = await asyncio.open_connection(*target)
    except OSError:
        writer.close()
        return
    _nodelay(up_writer)
    try:
        await asyncio.gather(_delayed_copy(reader, up_writer, delay), _delayed_copy(up_reader, writer, delay))
    finally:
        for w in (writer, up_writer):
            w.close()


async def _echo(delay: float, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo through two delayed copies (in, then out): what a round trip through the relay costs."""
    _nodelay(writer)
    a, b = socket.socketpair()  # what is written on a is read on b: the echo's turning point
    _ra, wa = await asyncio.open_connection(sock=a)
    rb, wb = await asyncio.open_connection(sock=b)
    try:
        await asyncio.gather(_delayed_copy(reader, wa, delay), _delayed_copy(rb, writer, delay))
    finally:
        for w in (writer, wa, wb):
            w.close()


async def main_async(args: argparse.Namespace) -> None:
    """Listen on 127.0.0.1 (an ephemeral port unless ``--port``) and serve until killed."""
    if args.echo:
        server = await asyncio.start_server(lambda r, w: _echo(args.delay, r, w), "127.0.0.1", args.port)
    else:
        host, _, port = args.to.rpartition(":")
        target = (host or "127.0.0.1", int(port))
        server = await asyncio.start_server(lambda r, w: _relay(target, args.delay, r, w), "127.0.0.1", args.port)
    print("listening", server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--to", help="HOST:PORT to relay to")
    p.add_argument("--echo", action="store_true", help="be a delayed echo server instead of a relay")
    p.add_argument("--delay", type=float, required=True, help="one-way delay in seconds (each direction)")
    p.add_argument("--port", type=int, default=0, help="port to listen on (default: any free port)")
    args = p.parse_args(argv)
    if not args.echo and not args.to:
        p.error("--to HOST:PORT or --echo")
    try:
        asyncio.run(main_async(args))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
