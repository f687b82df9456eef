"""A hand-rolled minimal FUSE daemon for tests of the device layer (no afuse session needed).

Byte layouts are written out here on purpose, independent of ``afuse.wire``.
"""

from __future__ import annotations

import errno
import os
import select
import stat
import struct
import threading
from collections.abc import Callable
from typing import Generic, ParamSpec, TypeVar

import attrs

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid total_extlen padding
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
INIT_IN_HEAD = struct.Struct("<IIII")  # major minor max_readahead flags
INIT_OUT = struct.Struct("<IIIIHHIIHHIIH22x")  # 64 bytes
ATTR_OUT = struct.Struct("<QII" + "QQQQQQIIIIIIIIII")  # attr_valid, nsec, dummy + fuse_attr: 104 bytes
assert INIT_OUT.size == 64 and ATTR_OUT.size == 104

FUSE_LOOKUP = 1
FUSE_FORGET = 2
FUSE_GETATTR = 3
FUSE_OPEN = 14
FUSE_RELEASE = 18
FUSE_INIT = 26
FUSE_OPENDIR = 27
FUSE_RELEASEDIR = 29
FUSE_INTERRUPT = 36
FUSE_DESTROY = 38
FUSE_BATCH_FORGET = 42
NO_REPLY = frozenset({FUSE_FORGET, FUSE_BATCH_FORGET, FUSE_INTERRUPT})

FUSE_INIT_EXT = 1 << 30
FUSE_PASSTHROUGH = 1 << 37

#: Big enough for any request after an INIT with max_write 65536 (and for INIT itself).
READ_SIZE = (1 << 20) + 4096
#: Default seconds to wait for anything in these tests.
TIMEOUT = 10.0


@attrs.frozen
class Request:
    """One request read from /dev/fuse."""

    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    body: bytes


def wait_readable(fd: int, timeout: float = TIMEOUT) -> bool:
    """Poll ``fd`` for input (or an error condition); False on timeout."""
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLERR | select.POLLHUP)
    return bool(poller.poll(int(timeout * 1000)))


def read_request(fd: int, timeout: float | None = TIMEOUT) -> Request:
    """Read one request, waiting at most ``timeout`` seconds (TimeoutError).

    ``timeout=None`` reads without polling first: needed for a sync-init fd before its mount,
    where poll() blocks (ignoring its timeout) until mount(2) installs the fd.
    """
    if timeout is not None and not wait_readable(fd, timeout):
        raise TimeoutError(f"no FUSE request on fd {fd} within {timeout}s")
    data = os.read(fd, READ_SIZE)
    length, opcode, unique, nodeid, uid, gid, pid, _extlen, _pad = IN_HEADER.unpack_from(data)
    assert length == len(data), (length, len(data))
    return Request(opcode, unique, nodeid, uid, gid, pid, data[IN_HEADER.size :])


def reply(fd: int, unique: int, body: bytes = b"", error: int = 0) -> None:
    """Write one reply: ``error`` is a positive errno (no body) or 0."""
    os.write(fd, OUT_HEADER.pack(OUT_HEADER.size + len(body), -error, unique) + body)


def init_out(
    minor: int = 45,
    flags: int = 0,
    max_write: int = 65536,
    max_stack_depth: int = 0,
) -> bytes:
    """A fuse_init_out (flags is a 64-bit word, split into flags/flags2)."""
    if flags >> 32:
        flags |= FUSE_INIT_EXT
    return INIT_OUT.pack(7, minor, 0, flags & 0xFFFFFFFF, 0, 0, max_write, 1, 0, 0, flags >> 32, max_stack_depth, 0)


def handshake(fd: int, timeout: float | None = TIMEOUT, **init: int) -> Request:
    """Read the INIT request and answer it (keywords go to ``init_out``); return the request."""
    req = read_request(fd, timeout)
    assert req.opcode == FUSE_INIT, req
    major, minor, _readahead, _flags = INIT_IN_HEAD.unpack_from(req.body)
    assert major == 7 and minor >= 31, (major, minor)
    reply(fd, req.unique, init_out(**init))
    return req


def attr_out(ino: int = 1, mode: int = stat.S_IFDIR | 0o755, nlink: int = 2, size: int = 0) -> bytes:
    """A fuse_attr_out with a 1-second attr timeout; uid/gid are ours."""
    return ATTR_OUT.pack(
        1, 0, 0,  # attr_valid, attr_valid_nsec, dummy
        ino, size, (size + 511) // 512, 0, 0, 0,  # ino size blocks atime mtime ctime
        0, 0, 0,  # atimensec mtimensec ctimensec
        mode, nlink, os.getuid(), os.getgid(), 0, 4096, 0,  # mode nlink uid gid rdev blksize flags
    )  # fmt: skip


Handler = Callable[[Request], tuple[int, bytes] | None]


def default_handler(root_mode: int = stat.S_IFDIR | 0o755) -> Handler:
    """GETATTR of the root answers ``root_mode``; DESTROY/RELEASE* succeed; the rest ENOSYS/ENOENT."""

    def handle(req: Request) -> tuple[int, bytes] | None:
        if req.opcode in NO_REPLY:
            return None
        if req.opcode == FUSE_GETATTR:
            nlink = 2 if stat.S_ISDIR(root_mode) else 1
            return 0, attr_out(ino=req.nodeid, mode=root_mode, nlink=nlink)
        if req.opcode in (FUSE_DESTROY, FUSE_RELEASE, FUSE_RELEASEDIR):
            return 0, b""
        if req.opcode == FUSE_LOOKUP:
            return errno.ENOENT, b""
        return errno.ENOSYS, b""

    return handle


class Server:
    """Serve requests from ``fd`` in a daemon thread until stopped or the connection ends."""

    def __init__(self, fd: int, handler: Handler | None = None) -> None:
        self.fd = fd
        self.handler = handler or default_handler()
        self.requests: list[Request] = []
        self.error: BaseException | None = None
        self.end_errno: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"rawfuse-{fd}")

    def __enter__(self) -> Server:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not wait_readable(self.fd, 0.1):
                    continue
                try:
                    req = read_request(self.fd, 0)
                except OSError as e:
                    if e.errno in (errno.EAGAIN, errno.EINTR):
                        continue
                    self.end_errno = e.errno
                    return
                self.requests.append(req)
                answer = self.handler(req)
                if answer is not None:
                    err, body = answer
                    try:
                        reply(self.fd, req.unique, body, err)
                    except OSError as e:
                        if e.errno == errno.ENOENT:  # interrupted/aborted meanwhile
                            continue
                        self.end_errno = e.errno
                        return
        except BaseException as e:  # reported by stop()
            self.error = e

    def stop(self, timeout: float = TIMEOUT) -> None:
        """Stop the thread and re-raise anything it raised."""
        self._stop.set()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "rawfuse server thread did not stop"
        if self.error is not None:
            raise self.error

    def join(self, timeout: float = TIMEOUT) -> None:
        """Wait for the thread to end by itself (the connection went away)."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "rawfuse server thread did not end"
        if self.error is not None:
            raise self.error

    def opcodes(self) -> list[int]:
        """Opcodes seen so far."""
        return [r.opcode for r in self.requests]


T = TypeVar("T")
P = ParamSpec("P")


class Call(Generic[T]):
    """Run ``func(*args)`` in a daemon thread (a filesystem access that the test must answer)."""

    def __init__(self, func: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> None:
        self._result: list[T] = []  # [what func returned], once it has
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(lambda: func(*args, **kwargs),), daemon=True)
        self._thread.start()

    def _run(self, call: Callable[[], T]) -> None:
        try:
            self._result.append(call())
        except BaseException as e:  # reported by wait()
            self.error = e

    def wait(self, timeout: float = TIMEOUT) -> T:
        """Join; return the result or raise what the call raised (TimeoutError if still running)."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("filesystem call still blocked")
        if self.error is not None:
            raise self.error
        return self._result[0]
