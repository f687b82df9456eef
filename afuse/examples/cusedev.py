"""A byte-buffer character device: ``python -m afuse.examples.cusedev --name NAME``.

It behaves like libfuse's CUSE example (``example/cuse.c`` with ``example/ioctl.h``), so that
example's clients work against it unchanged: read(2) and write(2) at the offset the kernel gives
(always 0 for a character device), growing the buffer on write, and the ioctls

* ``FIOC_GET_SIZE = _IOR('E', 0, size_t)``: the buffer's size;
* ``FIOC_SET_SIZE = _IOW('E', 1, size_t)``: truncate or zero-extend it;
* ``FIOC_READ = _IO('E', 2)`` / ``FIOC_WRITE = _IO('E', 3)``: read or write ``size`` bytes at
  ``offset`` through ``struct fioc_rw_arg {off_t offset; void *buf; size_t size; size_t prev_size;
  size_t new_size;}`` — the daemon follows ``buf`` with the unrestricted-ioctl retry protocol; the
  ioctl returns the byte count and fills in the buffer's size before and after.

Added: poll(2) reports POLLIN while the buffer holds data (and wakes pollers when it gets some),
POLLOUT always. Root only (creating a CUSE device needs CAP_SYS_ADMIN).
"""

from __future__ import annotations

import argparse
import errno
import itertools
import logging
import os
import select
import signal
import struct
import sys
from collections.abc import Sequence

import trio

from afuse.cuse import CuseSession, DeviceError, DeviceOperations, device, is_compat, is_unrestricted, retry
from afuse.errors import FUSEError
from afuse.wire import requests as r
from afuse.wire.constants import POLL_SCHEDULE_NOTIFY
from afuse.wire.types import Handle, IoctlReply

log = logging.getLogger("afuse.examples.cusedev")


def _ioc(direction: int, kind: str, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (ord(kind) << 8) | nr


_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
SIZE_T = struct.Struct("<Q")
#: struct fioc_rw_arg on x86_64: off_t offset, void *buf, size_t size, prev_size, new_size.
FIOC_RW_ARG = struct.Struct("<qQQQQ")
_PREV_SIZE_OFF = 24
_NEW_SIZE_OFF = 32
FIOC_GET_SIZE = _ioc(_IOC_READ, "E", 0, SIZE_T.size)
FIOC_SET_SIZE = _ioc(_IOC_WRITE, "E", 1, SIZE_T.size)
FIOC_READ = _ioc(_IOC_NONE, "E", 2, 0)
FIOC_WRITE = _ioc(_IOC_NONE, "E", 3, 0)
#: The largest buffer this device grows to (beyond it: ENOMEM).
DEFAULT_MAX_SIZE = 256 << 20

_READABLE = select.POLLIN | select.POLLRDNORM
_WRITABLE = select.POLLOUT | select.POLLWRNORM


class BufferDevice(DeviceOperations):
    """One byte buffer shared by every open of the device."""

    def __init__(self, max_size: int = DEFAULT_MAX_SIZE) -> None:
        self.buf = bytearray()
        self.max_size = max_size
        self.session: CuseSession | None = None
        self._fhs = itertools.count(1)
        #: fh -> kh of its last POLL that asked for a notification.
        self._pollers: dict[int, int] = {}

    def init(self, session: CuseSession) -> None:
        self.session = session

    # -- the buffer ------------------------------------------------------------------------------

    def _resize(self, size: int) -> None:
        if size > self.max_size:
            raise FUSEError(errno.ENOMEM)
        if size < len(self.buf):
            del self.buf[size:]
        else:
            self.buf.extend(bytes(size - len(self.buf)))

    def _read_at(self, offset: int, size: int) -> bytes:
        offset = min(offset, len(self.buf))
        return bytes(self.buf[offset:offset + size])

    async def _write_at(self, offset: int, data: bytes) -> None:
        if offset + len(data) > len(self.buf):
            self._resize(offset + len(data))
        self.buf[offset:offset + len(data)] = data
        await self._changed()

    async def _changed(self) -> None:
        """Wake the pollers if there is data to read now."""
        if self.buf and self._pollers and self.session is not None:
            for kh in set(self._pollers.values()):
                await self.session.poll_wakeup(kh)

    # -- operations ------------------------------------------------------------------------------

    async def open(self, req: r.OpenRequest) -> Handle:
        return Handle(next(self._fhs))

    async def release(self, req: r.ReleaseRequest) -> None:
        self._pollers.pop(req.fh, None)

    async def read(self, req: r.ReadRequest) -> bytes:
        return self._read_at(req.offset, req.size)

    async def write(self, req: r.WriteRequest) -> int:
        await self._write_at(req.offset, req.data)
        return len(req.data)

    async def poll(self, req: r.PollRequest) -> int:
        if req.flags & POLL_SCHEDULE_NOTIFY:
            self._pollers[req.fh] = req.kh
        return ((_READABLE if self.buf else 0) | _WRITABLE) & (req.events | select.POLLERR | select.POLLHUP)

    async def ioctl(self, req: r.IoctlRequest) -> IoctlReply:
        if is_compat(req):
            raise FUSEError(errno.ENOSYS)  # 32-bit callers' struct layout is not handled
        if req.cmd == FIOC_GET_SIZE:
            if req.out_size < SIZE_T.size:
                return retry(out_iovs=[(req.arg, SIZE_T.size)])
            return IoctlReply(0, SIZE_T.pack(len(self.buf)))
        if req.cmd == FIOC_SET_SIZE:
            if len(req.in_data) < SIZE_T.size:
                return retry(in_iovs=[(req.arg, SIZE_T.size)])
            self._resize(SIZE_T.unpack_from(req.in_data)[0])
            await self._changed()
            return IoctlReply(0)
        if req.cmd in (FIOC_READ, FIOC_WRITE):
            if not is_unrestricted(req):
                raise FUSEError(errno.ENOTTY, "FIOC_READ/FIOC_WRITE need unrestricted ioctls")
            return await self._rw(req, req.cmd == FIOC_READ)
        raise FUSEError(errno.EINVAL)

    async def _rw(self, req: r.IoctlRequest, is_read: bool) -> IoctlReply:
        """FIOC_READ/FIOC_WRITE: first fetch the argument, then the caller's buffer, then act."""
        arg_iov = (req.arg, FIOC_RW_ARG.size)
        if len(req.in_data) < FIOC_RW_ARG.size:
            return retry(in_iovs=[arg_iov])
        offset, buf, size, _prev, _new = FIOC_RW_ARG.unpack_from(req.in_data)
        if offset < 0:
            raise FUSEError(errno.EINVAL)
        sizes = [(req.arg + _PREV_SIZE_OFF, SIZE_T.size), (req.arg + _NEW_SIZE_OFF, SIZE_T.size)]
        if is_read:
            ins, outs = [arg_iov], [*sizes, (buf, size)]
        else:
            ins, outs = [arg_iov, (buf, size)], sizes
        if len(req.in_data) != sum(n for _, n in ins) or req.out_size != sum(n for _, n in outs):
            return retry(ins, outs)  # the second round: the buffer (and the size fields)
        prev = len(self.buf)
        if is_read:
            data = self._read_at(offset, size)
            return IoctlReply(len(data), SIZE_T.pack(prev) + SIZE_T.pack(len(self.buf)) + data)
        data = req.in_data[FIOC_RW_ARG.size:]
        await self._write_at(offset, data)
        return IoctlReply(len(data), SIZE_T.pack(prev) + SIZE_T.pack(len(self.buf)))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="A byte-buffer character device (libfuse's CUSE example).")
    p.add_argument("-n", "--name", required=True, help="device name: the device is /dev/NAME")
    p.add_argument("-M", "--maj", type=int, default=0, help="device major number (default: allocated)")
    p.add_argument("-m", "--min", type=int, default=0, help="device minor number")
    p.add_argument("--mode", type=lambda s: int(s, 8), default=None, help="permissions of /dev/NAME (octal)")
    p.add_argument("--restricted-ioctl", action="store_true",
                   help="let the kernel copy ioctl data by the _IOC bits (FIOC_READ/WRITE then fail ENOTTY)")
    p.add_argument("--max-size", type=int, default=DEFAULT_MAX_SIZE, help="largest buffer size in bytes")
    p.add_argument("--debug", action="store_true", help="log every request")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        trio.run(_serve, BufferDevice(args.max_size), args)
    except (DeviceError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


async def _serve(ops: BufferDevice, args: argparse.Namespace) -> None:
    async with device(ops, args.name, mode=args.mode, dev_major=args.maj, dev_minor=args.min,
                      unrestricted_ioctl=not args.restricted_ioctl) as dev:
        log.info("serving %s (%d:%d)", dev.path, os.major(dev.devno), os.minor(dev.devno))
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                async def stop_on_signal() -> None:
                    async for _ in signals:
                        break
                    nursery.cancel_scope.cancel()

                async def stop_on_close() -> None:
                    await dev.wait_closed()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(stop_on_signal)
                nursery.start_soon(stop_on_close)


if __name__ == "__main__":
    sys.exit(main())
