"""passthroughfs: mirror a directory, node by node (like go-fuse's LoopbackNode, libfuse's passthrough_hp).

``python -m afuse.examples.passthroughfs SOURCE MOUNTPOINT [-o OPTS] [--timeout S] [--cache-dir] [--keep-cache]
[--keeper SOCKET --state-dir DIR [--upgrade] [--take-wait S] [--readers N] [--events FILE]]``

The filesystem is :class:`afuse.nodes.LoopbackFS`: each :class:`afuse.nodes.LoopbackNode` holds
an ``O_PATH | O_NOFOLLOW`` descriptor of its source object and is keyed by its
``(st_dev, st_ino)``, so the bridge gives one source inode one nodeid, and drops (closing the
descriptor) what the kernel forgets. Operations are ``*at()`` system calls on such descriptors
with a single name component, or go through ``/proc/self/fd/N``, which reaches the object itself
without following a symlink: nothing the source tree contains can make the daemon act outside it.

Run as root, each request is carried out under the caller's identity: the serving thread's
fsuid, fsgid and supplementary groups are switched to the caller's for the system call (per-thread
credentials; no ``await`` inside). Files are created owned by the caller, and permission checks
are the source filesystem's, with or without ``-o default_permissions``. Run as another user,
everything happens with that user's rights. Attributes report the source's inode numbers.

The mount is coherent with the source by default: the kernel caches no names, attributes or
listings (entry and attribute timeouts 0, no directory cache), so a change made directly in
SOURCE shows in the mount at once. ``--timeout SECONDS`` and ``--cache-dir`` trade that
coherence for speed: the kernel then keeps names and attributes that long, and listings until
the directory's mtime changes, and may show stale results meanwhile. ``--keep-cache`` lets it
keep a file's cached pages across opens (FOPEN_KEEP_CACHE) until it sees the file's mtime or size
change (pyfuse3's default); a change made in SOURCE that keeps both may then go unseen.

Reads the daemon serves (without passthrough) are spliced from the source file into the reply
(:class:`afuse.splice.FileRange`): the kernel copies the data once, Python never holds it.

Regular files are opened in FUSE passthrough mode where the kernel and privileges allow it
(FUSE_PASSTHROUGH negotiated, as the command line asks unless ``--no-passthrough``, and
BACKING_OPEN permitted: CAP_SYS_ADMIN): the kernel then reads, writes and maps the source file
itself. Otherwise one log line says why, and the daemon serves reads and writes.

**Failover** (``--state-dir DIR``, with ``--keeper SOCKET`` or systemd's fd store; see
docs/failover.md; ``afuse.examples.failoverfs`` is this mode): :class:`FailoverPassthroughFS`
keys each node by ``(st_dev, st_ino, file handle type, file handle)`` (``name_to_handle_at``), so
the bridge's journaled tables name every inode the kernel holds in a way a successor reopens with
``open_by_handle_at`` (needs CAP_DAC_READ_SEARCH), whatever its name is by then. The bridge
reopens open files at their first use under the same fh, and answers replayed requests (the
resend bit) as their first attempts were answered. Passthrough is off (backing ids die with the
daemon). Locks are kept: the keeper keeps a copy of each descriptor holding locks
(:meth:`afuse.nodes.LoopbackFS.attach_keeper`). Not kept: files unlinked while open, inodes on
submounts of SOURCE.
``AFUSE_FAILOVERFS_SLOW="SECONDS,PROBABILITY"`` makes lookup, write, create, mkdir, rename and
unlink sleep now and then before, inside (after taking effect) and after the bridge's work (to be
killed with requests in flight, in tests).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import random
import struct
import sys
import time
from collections.abc import Hashable, Sequence
from typing import Any

import trio

from afuse.nodes import LoopbackNode, Node
from afuse.nodes.loopback import LoopbackFS
from afuse.wire import requests as r
from afuse.wire.init import InitConfig
from afuse.wire.types import Entry, Handle

__all__ = ["FailoverPassthroughFS", "PassthroughFS", "file_handle", "main", "open_by_handle"]

_libc = ctypes.CDLL(None, use_errno=True)
_name_to_handle_at = _libc.name_to_handle_at
_name_to_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int),
                               ctypes.c_int]
_name_to_handle_at.restype = ctypes.c_int
_open_by_handle_at = _libc.open_by_handle_at
_open_by_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
_open_by_handle_at.restype = ctypes.c_int
AT_EMPTY_PATH = 0x1000
MAX_HANDLE_SZ = 128
_FH_HEAD = struct.Struct("=Ii")  # struct file_handle: handle_bytes, handle_type


def file_handle(fd: int) -> tuple[int, str] | None:
    """(handle type, handle as hex) of the object ``fd`` holds; None if the filesystem has none."""
    buf = ctypes.create_string_buffer(_FH_HEAD.size + MAX_HANDLE_SZ)
    _FH_HEAD.pack_into(buf, 0, MAX_HANDLE_SZ, 0)
    mount_id = ctypes.c_int()
    if _name_to_handle_at(fd, b"", buf, ctypes.byref(mount_id), AT_EMPTY_PATH) < 0:
        return None
    size, kind = _FH_HEAD.unpack_from(buf.raw)
    return kind, buf.raw[_FH_HEAD.size:_FH_HEAD.size + size].hex()


def open_by_handle(mount_fd: int, kind: int, handle: str, flags: int) -> int:
    """Open the object named by a :func:`file_handle` on the filesystem of ``mount_fd``."""
    raw = bytes.fromhex(handle)
    fd = int(_open_by_handle_at(mount_fd, _FH_HEAD.pack(len(raw), kind) + raw, flags | os.O_CLOEXEC))
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), "open_by_handle_at")
    return fd


class PassthroughFS(LoopbackFS):
    """Mirror the directory ``source``: :class:`~afuse.nodes.LoopbackFS`, logging as ``afuse.passthroughfs``.

    ``PassthroughFS(source, timeout=0.0, negative_timeout=0.0, cache_dir=False,
    switch_credentials=None, passthrough=True)``: see :class:`~afuse.nodes.LoopbackFS`.
    """

    log = logging.getLogger("afuse.passthroughfs")


class _SlowNode(LoopbackNode):
    """A loopback node that sleeps now and then after a change took effect (before the bridge records it)."""

    fs: FailoverPassthroughFS

    async def create(self, name: bytes, flags: int, mode: int) -> Any:
        res = await super().create(name, flags, mode)
        await self.fs.maybe_slow()
        return res

    async def mkdir(self, name: bytes, mode: int) -> Node:
        res = await super().mkdir(name, mode)
        await self.fs.maybe_slow()
        return res

    async def unlink(self, name: bytes) -> None:
        await super().unlink(name)
        await self.fs.maybe_slow()

    async def rename(self, name: bytes, newparent: Node, newname: bytes, flags: int) -> None:
        await super().rename(name, newparent, newname, flags)
        await self.fs.maybe_slow()


class FailoverPassthroughFS(PassthroughFS):
    """:class:`PassthroughFS` whose nodes a successor daemon reopens by file handle (failover).

    ``FailoverPassthroughFS(source, slow=None, **kwargs)``: ``kwargs`` as for
    :class:`PassthroughFS` (passthrough defaults to off); ``slow=(seconds, probability)`` sleeps
    now and then around changes (tests). :attr:`restored_nodes` and :attr:`lost` count the nodes a
    restore reopened and could not.
    """

    def __init__(self, source: str | os.PathLike[str], *, slow: tuple[float, float] | None = None,
                 **kwargs: Any) -> None:
        kwargs.setdefault("passthrough", False)  # backing ids do not survive a restart
        #: open_by_handle_at needs a real (not O_PATH) descriptor on the source filesystem.
        self.mount_fd = os.open(os.fspath(source), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.slow = slow
        self.node_class = _SlowNode if slow else LoopbackNode
        self.restored_nodes = 0
        self.lost = 0
        super().__init__(source, **kwargs)

    def close(self) -> None:
        """Close every descriptor the nodes hold, and the source's."""
        super().close()
        with contextlib.suppress(OSError):
            os.close(self.mount_fd)

    def node_key(self, fd: int, st: os.stat_result) -> Hashable:
        """``(st_dev, st_ino, handle type, handle)``: what :meth:`restore_node` reopens."""
        fh = file_handle(fd)
        if fh is None:
            raise OSError(f"{self.source}: its filesystem has no file handles (no failover)")
        return (st.st_dev, st.st_ino, fh[0], fh[1])

    def restore_node(self, key: Hashable) -> Node | None:
        """The node of ``key``, reopened by file handle (None if that inode is gone)."""
        if not (isinstance(key, tuple) and len(key) == 4):
            raise ValueError(f"not a failoverfs node key: {key!r}")
        dev, ino, kind, handle = key
        try:
            fd = open_by_handle(self.mount_fd, kind, handle, os.O_PATH | os.O_NOFOLLOW)
        except OSError:
            self.lost += 1
            return None
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (dev, ino):
            os.close(fd)
            self.lost += 1
            return None
        self.restored_nodes += 1
        return self.reopened(fd, st)

    async def maybe_slow(self) -> None:
        """Sleep ``slow[0]`` seconds with probability ``slow[1]`` (tests)."""
        if self.slow is not None and random.random() < self.slow[1]:
            await trio.sleep(self.slow[0])

    async def lookup(self, req: r.LookupRequest) -> Entry:
        await self.maybe_slow()
        e = await super().lookup(req)
        await self.maybe_slow()
        return e

    async def write(self, req: r.WriteRequest) -> int:
        await self.maybe_slow()
        n = await super().write(req)
        await self.maybe_slow()
        return n

    async def create(self, req: r.CreateRequest) -> tuple[Entry, Handle]:
        await self.maybe_slow()
        res = await super().create(req)
        await self.maybe_slow()  # the outcome is recorded, the reply not yet written
        return res

    async def mkdir(self, req: r.MkdirRequest) -> Entry:
        await self.maybe_slow()
        res = await super().mkdir(req)
        await self.maybe_slow()
        return res

    async def unlink(self, req: r.UnlinkRequest) -> None:
        await self.maybe_slow()
        await super().unlink(req)
        await self.maybe_slow()

    async def rename(self, req: r.RenameRequest) -> None:
        await self.maybe_slow()
        await super().rename(req)
        await self.maybe_slow()


class _Events:
    """JSON lines ``{"t", "pid", "event", ...}`` appended to a file (for measurements)."""

    def __init__(self, path: str | None) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644) if path else -1
        self.first = True

    def __call__(self, event: str, **kw: Any) -> None:
        if self.fd >= 0:
            os.write(self.fd, json.dumps({"t": time.time(), "pid": os.getpid(), "event": event, **kw}).encode() + b"\n")

    def probe(self, req: r.Request) -> None:
        if self.first:
            self.first = False
            self("first_request", op=type(req).__name__)
        if req.is_resend:
            self("resent", op=type(req).__name__)


def _slow_from_env() -> tuple[float, float] | None:
    spec = os.environ.get("AFUSE_FAILOVERFS_SLOW")
    if not spec:
        return None
    delay, _, prob = spec.partition(",")
    return float(delay), float(prob or 1.0)


def main(argv: Sequence[str] | None = None, *, failover: bool = False) -> int:
    """``python -m afuse.examples.passthroughfs SOURCE MOUNTPOINT [-o OPTS] [--debug] [failover options]``;
    ``failover`` (failoverfs) makes ``--state-dir`` required."""
    from afuse.examples._cli import add_failover_arguments, make_parser, run_example, run_failover

    name = "failoverfs" if failover else "passthroughfs"
    parser = make_parser("Mirror SOURCE at MOUNTPOINT, surviving crashes and upgrades." if failover
                         else "Mirror the directory SOURCE at MOUNTPOINT.", source=True,
                         prog=f"python -m afuse.examples.{name}")
    parser.add_argument("--timeout", type=float, default=0.0, metavar="SECONDS",
                        help="let the kernel cache names and attributes this long: faster, but changes "
                             "made directly in SOURCE may show only after it (default 0: coherent)")
    parser.add_argument("--cache-dir", action="store_true",
                        help="let the kernel cache directory listings until a directory's mtime changes: "
                             "faster, but may hide changes made directly in SOURCE")
    parser.add_argument("--keep-cache", action="store_true",
                        help="let the kernel keep a file's cached pages across opens (dropped when its mtime "
                             "or size is seen to change): faster rereads of files served by the daemon")
    parser.add_argument("--no-cache-dir", action="store_true", help=argparse.SUPPRESS)  # the default now
    parser.add_argument("--no-passthrough", action="store_true",
                        help="serve reads and writes in the daemon (no FUSE passthrough)")
    add_failover_arguments(parser, name)
    parser.add_argument("--take-wait", type=float, default=None, metavar="SECONDS",
                        help="failover: how long to wait for a serving daemon to go (a hot standby waits long)")
    parser.add_argument("--readers", type=int, default=2, help="failover: descriptors reading requests")
    parser.add_argument("--events", metavar="FILE", help="failover: append timing events (JSON lines) to FILE")
    args = parser.parse_args(argv)
    if failover and not args.state_dir:
        parser.error("the following arguments are required: --state-dir")
    if args.keeper and not args.state_dir:
        parser.error("--keeper needs --state-dir")
    if args.state_dir:
        return _serve_failover(args, name, run_failover)
    try:
        ops = PassthroughFS(args.source, timeout=args.timeout, cache_dir=args.cache_dir,
                            passthrough=not args.no_passthrough, keep_cache=args.keep_cache)
    except OSError as e:
        print(f"error: cannot open {args.source}: {e.strerror}", file=sys.stderr)
        return 1
    try:
        return run_example(ops, args, InitConfig(passthrough=not args.no_passthrough))
    finally:
        ops.close()


def _serve_failover(args: argparse.Namespace, name: str, run_failover: Any) -> int:
    events = _Events(args.events)
    events("start")
    try:
        ops = FailoverPassthroughFS(args.source, timeout=args.timeout, cache_dir=args.cache_dir,
                                    slow=_slow_from_env())
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        code: int = run_failover(
            ops, args, name, probe=events.probe if args.events else None, on_drain=lambda: events("drain"),
            on_serving=lambda: events("serving", restored_nodes=ops.restored_nodes, lost=ops.lost))
        return code
    finally:
        events("exit")
        ops.close()


if __name__ == "__main__":
    sys.exit(main())
