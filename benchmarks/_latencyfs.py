"""Filesystems for the GETATTR round-trip benchmark (``benchmarks/bench.py``).

* :class:`ZeroTimeoutHello` — a one-file filesystem on the low-level ``afuse.Operations`` API
  with ``attr_timeout = 0``, so every ``stat`` of ``hello`` is one GETATTR round trip (the name
  stays cached: ``entry_timeout = 3600``). Its second name, ``fresh``, is answered with
  ``entry_timeout = 0``: every ``stat`` of it is one LOOKUP (the kernel revalidates the name)
  and one GETATTR (the attributes are never cached). Served by
  ``python -m afuse.testing benchmarks._latencyfs:ZeroTimeoutHello MOUNTPOINT -o ''``.
* :class:`ZeroTimeoutNodeHello` — the same on nodes (``afuse.examples.hello``, the NodeFS bridge).
* ``python benchmarks/_latencyfs.py raw MOUNTPOINT`` — the same filesystem served by a bare
  blocking read/decode/reply loop on afuse's wire codecs (no session, no trio): the least a
  Python daemon can do per request.
* ``python benchmarks/_latencyfs.py pyfuse3 MOUNTPOINT`` — the same filesystem written for
  pyfuse3 (only if pyfuse3 is installed), the baseline.

The scripts print ``ready`` once mounted and unmount on SIGTERM/SIGINT.
"""

from __future__ import annotations

import errno
import stat
import sys
import time
from collections.abc import Iterator

from afuse import Attr, DirEntry, Entry, FUSEError, Handle, Operations
from afuse.examples.hello import DATA, NAME, HelloFS
from afuse.wire import requests as r
from afuse.wire.constants import ROOT_ID

FILE_ID = 2
FRESH = b"fresh"  # a name looked up again on every stat (entry_timeout 0)
FRESH_ID = 3


class ZeroTimeoutHello(Operations):
    """One read-only file on the low-level API; its attributes are never cached: one GETATTR per stat."""

    attr_timeout = 0.0
    entry_timeout = 3600.0

    def __init__(self) -> None:
        now = time.time_ns()
        self._root = Attr(ino=ROOT_ID, mode=stat.S_IFDIR | 0o755, nlink=2, atime_ns=now, mtime_ns=now, ctime_ns=now)
        self._file = Attr(ino=FILE_ID, mode=stat.S_IFREG | 0o444, nlink=1, size=len(DATA),
                          atime_ns=now, mtime_ns=now, ctime_ns=now)
        self._fresh = Attr(ino=FRESH_ID, mode=stat.S_IFREG | 0o444, nlink=1, size=len(DATA),
                           atime_ns=now, mtime_ns=now, ctime_ns=now)

    async def getattr(self, req: r.GetattrRequest) -> Attr:
        if req.nodeid == ROOT_ID:
            return self._root
        if req.nodeid == FILE_ID:
            return self._file
        if req.nodeid == FRESH_ID:
            return self._fresh
        raise FUSEError(errno.ENOENT)

    async def lookup(self, req: r.LookupRequest) -> Entry:
        if req.nodeid == ROOT_ID and req.name == NAME:
            return Entry(FILE_ID, self._file)
        if req.nodeid == ROOT_ID and req.name == FRESH:
            return Entry(FRESH_ID, self._fresh, entry_timeout=0.0)
        raise FUSEError(errno.ENOENT)

    async def readdir(self, req: r.ReaddirRequest) -> Iterator[DirEntry]:
        entries = [DirEntry(b".", 1, self._root), DirEntry(b"..", 2, self._root), DirEntry(NAME, 3, self._file)]
        return iter(entries[req.offset:])

    async def open(self, req: r.OpenRequest) -> Handle:
        if req.nodeid != FILE_ID:
            raise FUSEError(errno.EISDIR if req.nodeid == ROOT_ID else errno.ENOENT)
        return Handle()

    async def read(self, req: r.ReadRequest) -> bytes:
        return DATA[req.offset : req.offset + req.size]


class ZeroTimeoutNodeHello(HelloFS):
    """The hello example (nodes) with the same timeouts."""

    attr_timeout = 0.0
    entry_timeout = 3600.0


def _raw_main(mountpoint: str) -> int:
    """The same filesystem as the simplest possible daemon: one thread in a blocking read loop.

    No session, no trio, no dispatcher: afuse's wire codecs and mount only. It measures what a
    GETATTR round trip costs with the least Python a daemon can run, so that the figure of
    :class:`ZeroTimeoutHello` shows how much afuse's session and dispatch layers add.
    """
    import errno
    import os
    import signal

    from afuse import device
    from afuse.device import MountOptions
    from afuse.wire import replies
    from afuse.wire import requests as r
    from afuse.wire.constants import ROOT_ID, InitFlag
    from afuse.wire.decoder import Decoder
    from afuse.wire.init import InitConfig, encode_init_reply, negotiate
    from afuse.wire.types import Entry

    fs = ZeroTimeoutHello()
    file_id = 2
    attr_timeout, entry_timeout = fs.attr_timeout, fs.entry_timeout

    def stop(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    mnt = device.mount(mountpoint, MountOptions(fsname="fusebench-raw"))
    fd = mnt.fd
    decoder = Decoder()
    try:
        buf = bytearray((1 << 20) + 4096)
        n = os.readv(fd, (buf,))
        init = decoder.decode(memoryview(buf)[:n])
        assert isinstance(init, r.InitRequest)
        unwanted = InitFlag.DO_READDIRPLUS | InitFlag.READDIRPLUS_AUTO | InitFlag.POSIX_LOCKS | InitFlag.FLOCK_LOCKS
        neg = negotiate(init, InitConfig(), InitConfig().wanted_flags() & ~unwanted)
        os.write(fd, encode_init_reply(init.unique, neg))
        buf = bytearray(neg.read_buffer_size)
        mv = memoryview(buf)
        print("ready", flush=True)
        while True:
            try:
                n = os.readv(fd, (buf,))
            except OSError as e:
                if e.errno == errno.ENOENT:
                    continue
                if e.errno in (errno.ENODEV, errno.ECONNABORTED):
                    break
                raise
            req = decoder.decode(mv[:n])
            kind = type(req)
            if kind is r.GetattrRequest:
                a = {ROOT_ID: fs._root, file_id: fs._file, FRESH_ID: fs._fresh}.get(req.nodeid)
                if a is None:
                    out = replies.error(req.unique, errno.ENOENT)
                else:
                    out = replies.attr(req.unique, a, attr_timeout)
            elif isinstance(req, r.LookupRequest):
                if req.nodeid == ROOT_ID and req.name == b"hello":
                    out = replies.entry(req.unique, Entry(file_id, fs._file), entry_timeout, attr_timeout)
                elif req.nodeid == ROOT_ID and req.name == FRESH:
                    out = replies.entry(req.unique, Entry(FRESH_ID, fs._fresh), 0.0, attr_timeout)
                else:
                    out = replies.error(req.unique, errno.ENOENT)
            elif kind in (r.ForgetRequest, r.InterruptRequest):
                continue
            else:
                out = replies.error(req.unique, errno.ENOSYS)
            try:
                os.write(fd, out)
            except FileNotFoundError:
                pass
    except KeyboardInterrupt:
        pass
    finally:
        try:
            mnt.unmount()
        finally:
            mnt.close()
    return 0


def _pyfuse3_main(mountpoint: str) -> int:  # pragma: no cover - needs pyfuse3
    import errno
    import os
    import signal
    import stat
    import time
    from functools import partial

    import pyfuse3  # type: ignore[import-not-found]
    import trio

    from afuse.running import serve_until_signalled

    name = b"hello"
    data = b"Hello, world!\n"
    root = pyfuse3.ROOT_INODE
    file_ino = root + 1
    fresh_ino = root + 2  # FRESH: looked up again on every stat (entry_timeout 0)
    now = time.time_ns()

    def attr(inode: int) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        if inode == root:
            e.st_mode = stat.S_IFDIR | 0o755
            e.st_nlink = 2
            e.st_size = 0
        elif inode in (file_ino, fresh_ino):
            e.st_mode = stat.S_IFREG | 0o444
            e.st_nlink = 1
            e.st_size = len(data)
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        e.st_ino = inode
        e.st_uid = os.getuid()
        e.st_gid = os.getgid()
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = now
        e.attr_timeout = 0
        e.entry_timeout = 0 if inode == fresh_ino else 3600
        return e

    class Hello(pyfuse3.Operations):  # type: ignore[misc]
        async def getattr(self, inode, ctx=None):  # type: ignore[no-untyped-def]
            return attr(inode)

        async def lookup(self, parent_inode, lookup_name, ctx=None):  # type: ignore[no-untyped-def]
            if parent_inode == root and lookup_name == name:
                return attr(file_ino)
            if parent_inode == root and lookup_name == FRESH:
                return attr(fresh_ino)
            raise pyfuse3.FUSEError(errno.ENOENT)

        async def opendir(self, inode, ctx):  # type: ignore[no-untyped-def]
            if inode != root:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            return inode

        async def readdir(self, fh, start_id, token):  # type: ignore[no-untyped-def]
            if start_id == 0:
                pyfuse3.readdir_reply(token, name, attr(file_ino), 1)

        async def open(self, inode, flags, ctx):  # type: ignore[no-untyped-def]
            if inode != file_ino:
                raise pyfuse3.FUSEError(errno.ENOENT)
            if flags & os.O_ACCMODE != os.O_RDONLY:
                raise pyfuse3.FUSEError(errno.EACCES)
            return pyfuse3.FileInfo(fh=inode)

        async def read(self, fh, off, size):  # type: ignore[no-untyped-def]
            return data[off : off + size]

    # No default_permissions: like afuse's default, so one stat is one GETATTR.
    pyfuse3.init(Hello(), mountpoint, {"fsname=fusebench-pyfuse3"})
    print("ready", flush=True)

    class Main:
        async def wait_closed(self) -> None:
            await pyfuse3.main()  # returns once terminated or unmounted

    async def stop(_signum: signal.Signals) -> None:
        pyfuse3.terminate()

    try:
        trio.run(partial(serve_until_signalled, Main(), signals=(signal.SIGTERM, signal.SIGINT), on_signal=stop))
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("pyfuse3", "raw"):
        print("usage: python benchmarks/_latencyfs.py {pyfuse3|raw} MOUNTPOINT", file=sys.stderr)
        sys.exit(2)
    sys.exit((_pyfuse3_main if sys.argv[1] == "pyfuse3" else _raw_main)(sys.argv[2]))
