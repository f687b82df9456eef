"""READ replies spliced from a file: the data moves file -> pipe -> /dev/fuse without a copy in Python.

A ``read`` handler may return :class:`FileRange` (``fd``, ``offset``, ``size``) instead of bytes.
The session then writes the reply through a pipe: the 16-byte header, the file's pages spliced
after it (page references, not a copy), and the pipe spliced into /dev/fuse as one message, so
the kernel copies the data once, straight into the reader's pages. A daemon serving reads with
``os.pread`` copies it twice (file -> Python buffer -> kernel). Small ranges, and a range the
file does not fill (end of file), are read with pread and written with writev instead.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from typing import Final

import attrs

from .wire import structs as S

__all__ = ["FileRange", "SplicePipe", "SPLICE_MIN"]

log = logging.getLogger("afuse")

#: Ranges smaller than this are read with pread: for them the pipe costs more than the copy.
SPLICE_MIN: Final = 32768
_F_SETPIPE_SZ: Final = 1031
_PAGE: Final = 4096


@attrs.frozen(slots=True)
class FileRange:
    """What a ``read`` handler may return: ``size`` bytes of open file ``fd`` from ``offset`` (fewer
    at its end). The descriptor must stay open until the handler's reply is written."""

    fd: int
    offset: int
    size: int


@attrs.frozen(slots=True)
class SplicedReply:
    """A READ reply (request ``unique``) whose data is ``range`` (the dispatcher's result)."""

    unique: int
    range: FileRange

    def to_bytes(self) -> bytes:
        """The reply as bytes (pread), for a writer without a pipe and for tests."""
        data = os.pread(self.range.fd, self.range.size, self.range.offset)
        return S.OUT_HEADER.pack(16 + len(data), 0, self.unique) + data


class SplicePipe:
    """A pipe that writes :class:`SplicedReply` messages to /dev/fuse (one per session thread)."""

    def __init__(self, max_data: int) -> None:
        self.r, self.w = os.pipe2(os.O_CLOEXEC)
        #: The largest data range spliced (the rest go through pread).
        self.max_data = 0
        try:
            for size in (_pow2(max_data + _PAGE), 1 << 20):
                try:
                    got = fcntl.fcntl(self.w, _F_SETPIPE_SZ, size)
                except OSError:
                    continue
                self.max_data = got - _PAGE  # the header takes a page slot of its own
                break
        except BaseException:
            self.close()
            raise

    def write(self, devfd: int, reply: SplicedReply) -> None:
        """Write ``reply`` to ``devfd``; an error reading the file is answered as that errno.
        OSError as os.write to ``devfd`` would raise it."""
        rng = reply.range
        size = rng.size
        if size < SPLICE_MIN or size > self.max_data:
            try:
                data = os.pread(rng.fd, size, rng.offset)
            except OSError as e:
                os.write(devfd, _error(reply.unique, e))
                return
            os.writev(devfd, [S.OUT_HEADER.pack(16 + len(data), 0, reply.unique), data])
            return
        os.write(self.w, S.OUT_HEADER.pack(16 + size, 0, reply.unique))
        got = 0
        try:
            while got < size:
                n = os.splice(rng.fd, self.w, size - got, offset_src=rng.offset + got)
                if n == 0:
                    break
                got += n
        except OSError as e:
            self._drain(16 + got)
            os.write(devfd, _error(reply.unique, e))
            return
        except BaseException:
            self._drain(16 + got)
            raise
        if got < size:  # end of file: take the data back and send the shorter reply
            self._drain(16)
            data = os.read(self.r, got) if got else b""
            os.writev(devfd, [S.OUT_HEADER.pack(16 + len(data), 0, reply.unique), data])
            return
        try:
            n = os.splice(self.r, devfd, 16 + size)
        except BaseException:
            self._drain(16 + size)
            raise
        if n != 16 + size:  # the kernel takes a message whole or not at all
            self._drain(16 + size - n)

    def _drain(self, n: int) -> None:
        while n > 0:
            chunk = os.read(self.r, min(n, 1 << 20))
            if not chunk:
                break
            n -= len(chunk)

    def close(self) -> None:
        """Close the pipe."""
        for fd in (self.r, self.w):
            try:
                os.close(fd)
            except OSError:
                pass
        self.r = self.w = -1


def _error(unique: int, e: OSError) -> bytes:
    err = e.errno if e.errno and 0 < e.errno < 512 else errno.EIO
    return S.OUT_HEADER.pack(16, -err, unique)


def _pow2(n: int) -> int:
    size = _PAGE
    while size < n:
        size <<= 1
    return size
