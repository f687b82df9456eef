"""failoverfs: passthroughfs that survives SIGKILL and in-place upgrades (see docs/failover.md).

``python -m afuse.examples.failoverfs SOURCE MOUNTPOINT --keeper SOCKET --state-dir DIR [--upgrade]``

Without ``--keeper`` it uses systemd's fd store (``$NOTIFY_SOCKET`` / ``LISTEN_FDS``).

What the kernel still refers to after the daemon dies, and how it is kept:

* **nodeids** (with their lookup counts): each new inode is journaled as ``nodeid -> (st_dev,
  st_ino, file handle)``; the file handle comes from ``name_to_handle_at`` and reopens the inode
  with ``open_by_handle_at`` (needs CAP_DAC_READ_SEARCH) after a restart, whatever its name is by
  then. Lookup counts are journaled as deltas. A count journaled for a reply that never reached
  the kernel (the daemon died in between) only over-counts (the inode is kept a little longer);
  the journal is always written before the reply, so nothing is ever under-counted.
* **file handles**: the base class uses the open descriptor as ``fh``. Here every open file's
  descriptor is moved to a number of its own in a high range (never reused soon), journaled as
  ``fh -> (nodeid, open flags)`` and, after a restart, reopened by handle and ``dup2``'ed onto
  the same number, so the hot paths (read, write) stay those of the base class.
* **replayed requests** (the resend bit): creating what exists, removing what is gone and
  renaming what was renamed already succeed when the request is a resend.

Not kept: POSIX/OFD and flock locks (they die with the process), files unlinked while open
(their inode is gone once the dying daemon's descriptor closes) and inodes on other filesystems
than SOURCE's (submounts: no handle can be opened relative to SOURCE).

``AFUSE_FAILOVERFS_SLOW="SECONDS,PROBABILITY"`` makes lookup, write, create, rename and unlink
sleep before or after their work now and then (to be killed with requests in flight, in tests).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import random
import signal
import stat
import struct
import sys
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any

import attrs
import trio

from afuse.errors import FUSEError
from afuse.examples.lowlevel_passthroughfs import PassthroughFS, _Inode
from afuse.wire import requests as r
from afuse.wire.constants import ROOT_ID
from afuse.wire.types import DirEntry, Entry, Handle

log = logging.getLogger("afuse.failoverfs")

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
#: Status flags kept when an open file is reopened (never O_TRUNC, O_CREAT, O_EXCL).
_REOPEN_MASK = os.O_ACCMODE | os.O_APPEND | os.O_NONBLOCK | os.O_NOATIME | os.O_SYNC | os.O_DSYNC


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


def _fd_open(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError:
        return False
    return True


def _fd_limit() -> int:
    import resource

    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


class FailoverPassthroughFS(PassthroughFS):
    """:class:`PassthroughFS` with its state journaled (implements :class:`afuse.state.Persistent`).

    Open files get descriptors from ``fh_range`` (default: the upper half of the descriptor
    limit), handed out round-robin so a number is not reused soon after its release.
    """

    def __init__(self, source: str | os.PathLike[str], *, fh_range: tuple[int, int] | None = None,
                 slow: tuple[float, float] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("passthrough", False)  # backing ids do not survive a restart here
        super().__init__(source, **kwargs)
        #: open_by_handle_at needs a real (not O_PATH) descriptor on the source filesystem.
        self._mount_fd = os.open(self.source, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        limit = _fd_limit()
        self.fh_range = fh_range or (max(limit // 2, 64), limit)
        self._next_fh = self.fh_range[0]
        self._journal: Callable[[Any], None] | None = None
        #: nodeid -> (handle type, handle hex) or None.
        self._handles: dict[int, tuple[int, str] | None] = {}
        #: fh -> [nodeid, flags, kind ("f" file, "d" directory)].
        self._fhs: dict[int, list[Any]] = {}
        #: fhs that could not be reopened after a takeover (a placeholder holds the number).
        self._dead_fhs: set[int] = set()
        self._slow = slow
        self.restored_nodes = 0
        self.restored_fhs = 0
        self.lost: list[str] = []

    # -- Persistent ----------------------------------------------------------------------------

    def set_journal(self, journal: Callable[[Any], None] | None) -> None:
        self._journal = journal

    def _j(self, record: Any) -> None:
        if self._journal is not None:
            self._journal(record)

    def dump_state(self) -> dict[str, Any]:
        nodes = {}
        for nodeid, node in self._inodes.items():
            if nodeid == ROOT_ID:
                continue
            h = self._handles.get(nodeid)
            nodes[str(nodeid)] = [node.key[0], node.key[1], h[0] if h else None, h[1] if h else None, node.nlookup]
        return {"next_nodeid": self._next_nodeid, "next_fh": self._next_fh, "nodes": nodes,
                "fhs": {str(fh): v for fh, v in self._fhs.items()}}

    def fold_record(self, state: dict[str, Any], record: Any) -> None:
        kind = record[0]
        nodes: dict[str, list[Any]] = state["nodes"]
        if kind == "L":
            node = nodes.get(str(record[1]))
            if node is not None:
                node[4] += record[2]
                if node[4] <= 0:
                    del nodes[str(record[1])]
        elif kind == "N":
            _, nodeid, dev, ino, htype, hhex = record
            nodes[str(nodeid)] = [dev, ino, htype, hhex, 0]
            state["next_nodeid"] = max(state["next_nodeid"], nodeid + 1)
        elif kind == "O":
            _, fh, nodeid, flags, fkind = record
            state["fhs"][str(fh)] = [nodeid, flags, fkind]
            state["next_fh"] = fh + 1
        elif kind == "C":
            state["fhs"].pop(str(record[1]), None)
        else:
            raise ValueError(f"unknown journal record {record!r}")

    def restore_state(self, state: dict[str, Any]) -> None:
        """Reopen every inode and open file of ``state`` (open files first: their numbers are fixed)."""
        root_fd = self._mount_fd
        nodes: dict[str, list[Any]] = state["nodes"]
        for fh_s, (nodeid, flags, fkind) in sorted(state["fhs"].items(), key=lambda kv: int(kv[0])):
            fh = int(fh_s)
            meta = nodes.get(str(nodeid))
            fd = -1
            try:
                if meta is None or meta[2] is None:
                    raise OSError(errno.ESTALE, "no file handle")
                extra = os.O_DIRECTORY if fkind == "d" else 0
                fd = open_by_handle(root_fd, meta[2], meta[3], (flags & _REOPEN_MASK) | extra)
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) != (meta[0], meta[1]):
                    raise OSError(errno.ESTALE, "another inode")
            except OSError as e:
                if fd >= 0:
                    os.close(fd)
                self.lost.append(f"fh {fh} of nodeid {nodeid}: {e}")
                fd = os.open("/", os.O_PATH | os.O_CLOEXEC)  # holds the number; read/write fail EBADF
                self._dead_fhs.add(fh)
            if _fd_open(fh):
                os.close(fd)
                raise RuntimeError(f"descriptor {fh} is taken: cannot restore file handle {fh}")
            os.dup2(fd, fh, inheritable=False)
            os.close(fd)
            if fh not in self._dead_fhs:
                self._fhs[fh] = [nodeid, flags, fkind]
                self.restored_fhs += 1
        for nodeid_s, (dev, ino, htype, hhex, nlookup) in nodes.items():
            nodeid = int(nodeid_s)
            if nodeid == ROOT_ID or nlookup <= 0:
                continue
            try:
                if htype is None:
                    raise OSError(errno.ESTALE, "no file handle")
                fd = open_by_handle(root_fd, htype, hhex, os.O_PATH | os.O_NOFOLLOW)
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) != (dev, ino):
                    os.close(fd)
                    raise OSError(errno.ESTALE, "another inode")
            except OSError as e:
                self.lost.append(f"nodeid {nodeid}: {e}")
                continue
            node = _Inode(fd, (dev, ino), nodeid)
            node.nlookup = nlookup
            old = self._by_key.get(node.key)
            if old is not None:  # two nodeids for one inode (cannot happen unless state is off)
                self._unref(old, old.nlookup)
            self._inodes[nodeid] = node
            self._by_key[node.key] = node
            self._handles[nodeid] = (htype, hhex)
            self.restored_nodes += 1
        self._next_nodeid = max(self._next_nodeid, int(state["next_nodeid"]))
        self._next_fh = int(state.get("next_fh", self.fh_range[0]))
        if self.lost:
            log.warning("%d nodeids/handles could not be restored: %s", len(self.lost), self.lost[:5])

    # -- bookkeeping overrides -------------------------------------------------------------------

    def _register(self, fd: int, st: os.stat_result) -> _Inode:
        known = (st.st_dev, st.st_ino) in self._by_key
        node = super()._register(fd, st)
        if not known:
            h = file_handle(node.fd)
            self._handles[node.nodeid] = h
            self._j(["N", node.nodeid, st.st_dev, st.st_ino, h[0] if h else None, h[1] if h else None])
        return node

    def _entry(self, node: _Inode, st: os.stat_result) -> Entry:
        e = super()._entry(node, st)
        self._j(["L", node.nodeid, 1])
        return e

    def _unref(self, node: _Inode, n: int) -> None:
        if n and node.nodeid != ROOT_ID:
            self._j(["L", node.nodeid, -n])
        super()._unref(node, n)
        if self._inodes.get(node.nodeid) is not node:
            self._handles.pop(node.nodeid, None)

    def _entries(self, req: r.ReaddirRequest, parent: _Inode | None) -> Iterator[DirEntry]:
        gen = super()._entries(req, parent)
        assert isinstance(gen, Generator)
        try:
            for de in gen:
                yield de
                # Taken by the reply: the base class counts it when resumed, journal it first.
                if parent is not None and de.entry is not None and de.entry.nodeid:
                    self._j(["L", de.entry.nodeid, 1])
        finally:
            gen.close()

    def _place_fh(self, fd: int, nodeid: int, kind: str) -> int:
        """Move open descriptor ``fd`` to the next free number of the fh range; journal it."""
        lo, hi = self.fh_range
        n = self._next_fh
        for _ in range(hi - lo):
            if n >= hi:
                n = lo
            if n not in self._fhs and n not in self._dead_fhs and not _fd_open(n):
                break
            n += 1
        else:
            os.close(fd)
            raise FUSEError(errno.EMFILE)
        try:
            os.dup2(fd, n, inheritable=False)
        finally:
            os.close(fd)
        self._next_fh = n + 1
        flags = fcntl.fcntl(n, fcntl.F_GETFL)
        self._fhs[n] = [nodeid, flags, kind]
        self._j(["O", n, nodeid, flags, kind])
        return n

    def _close_fh(self, fh: int) -> None:
        if fh in self._dead_fhs:
            self._dead_fhs.discard(fh)
            os.close(fh)
            return
        if fh not in self._fhs:
            # A replayed RELEASE whose first attempt closed it already: the number is not ours.
            log.debug("release of unknown fh %d ignored", fh)
            return
        os.close(fh)
        del self._fhs[fh]
        self._j(["C", fh])

    # -- slow mode (tests) -------------------------------------------------------------------------

    async def _maybe_slow(self) -> None:
        if self._slow is not None and random.random() < self._slow[1]:
            await trio.sleep(self._slow[0])

    # -- handlers ------------------------------------------------------------------------------

    async def lookup(self, req: r.LookupRequest) -> Entry:
        await self._maybe_slow()
        e = await super().lookup(req)
        await self._maybe_slow()
        return e

    async def write(self, req: r.WriteRequest) -> int:
        await self._maybe_slow()
        n = await super().write(req)
        await self._maybe_slow()
        return n

    async def open(self, req: r.OpenRequest) -> Handle:
        h = await super().open(req)
        return attrs.evolve(h, fh=self._place_fh(h.fh, req.nodeid, "f"))

    async def opendir(self, req: r.OpendirRequest) -> Handle:
        h = await super().opendir(req)
        return attrs.evolve(h, fh=self._place_fh(h.fh, req.nodeid, "d"))

    async def create(self, req: r.CreateRequest) -> tuple[Entry, Handle]:
        await self._maybe_slow()
        try:
            e, h = await super().create(req)
        except FileExistsError:
            if not (req.is_resend and req.flags & os.O_EXCL):
                raise
            # The first attempt created it before its daemon died: open what it made.
            req.flags &= ~os.O_EXCL
            e, h = await super().create(req)
        h = attrs.evolve(h, fh=self._place_fh(h.fh, e.nodeid, "f"))
        await self._maybe_slow()
        return e, h

    async def tmpfile(self, req: r.TmpfileRequest) -> tuple[Entry, Handle]:
        e, h = await super().tmpfile(req)
        return e, attrs.evolve(h, fh=self._place_fh(h.fh, e.nodeid, "f"))

    async def release(self, req: r.ReleaseRequest) -> None:
        self._close_fh(req.fh)

    async def releasedir(self, req: r.ReleasedirRequest) -> None:
        self._close_fh(req.fh)

    async def _existing(self, req: r.Request, parent_id: int, name: bytes, fmt: int) -> Entry:
        """The entry of ``name`` a replayed creation made before its daemon died."""
        parent = self._node(parent_id)
        with self._as_caller(req):
            node, st = self._lookup_at(parent, name)
        if stat.S_IFMT(st.st_mode) != fmt:
            self._unref(node, 0)
            raise FUSEError(errno.EEXIST)
        return self._entry(node, st)

    async def mkdir(self, req: r.MkdirRequest) -> Entry:
        try:
            return await super().mkdir(req)
        except FileExistsError:
            if not req.is_resend:
                raise
            return await self._existing(req, req.nodeid, req.name, stat.S_IFDIR)

    async def symlink(self, req: r.SymlinkRequest) -> Entry:
        try:
            return await super().symlink(req)
        except FileExistsError:
            if not req.is_resend:
                raise
            return await self._existing(req, req.nodeid, req.name, stat.S_IFLNK)

    async def mknod(self, req: r.MknodRequest) -> Entry:
        try:
            return await super().mknod(req)
        except FileExistsError:
            if not req.is_resend:
                raise
            return await self._existing(req, req.nodeid, req.name, stat.S_IFMT(req.mode))

    async def link(self, req: r.LinkRequest) -> Entry:
        try:
            return await super().link(req)
        except FileExistsError:
            if not req.is_resend:
                raise
            old = self._node(req.oldnodeid)
            e = await self._existing(req, req.nodeid, req.newname, stat.S_IFMT(os.fstat(old.fd).st_mode))
            if e.nodeid != old.nodeid:
                self._unref(self._node(e.nodeid), 1)
                raise
            return e

    async def unlink(self, req: r.UnlinkRequest) -> None:
        await self._maybe_slow()
        try:
            await super().unlink(req)
        except FileNotFoundError:
            if not req.is_resend:
                raise
        await self._maybe_slow()

    async def rmdir(self, req: r.RmdirRequest) -> None:
        try:
            await super().rmdir(req)
        except FileNotFoundError:
            if not req.is_resend:
                raise

    async def rename(self, req: r.RenameRequest) -> None:
        await self._maybe_slow()
        try:
            await super().rename(req)
        except FileNotFoundError:
            if not req.is_resend:
                raise
            new = self._node(req.newdir)
            try:
                os.lstat(req.newname, dir_fd=new.fd)
            except FileNotFoundError:
                raise FUSEError(errno.ENOENT) from None
        await self._maybe_slow()


def _slow_from_env() -> tuple[float, float] | None:
    spec = os.environ.get("AFUSE_FAILOVERFS_SLOW")
    if not spec:
        return None
    delay, _, prob = spec.partition(",")
    return float(delay), float(prob or 1.0)


class _Events:
    """JSON lines ``{"t", "pid", "event", ...}`` appended to a file (for measurements)."""

    def __init__(self, path: str | None) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644) if path else -1
        self.first = True

    def __call__(self, event: str, **kw: Any) -> None:
        if self.fd >= 0:
            rec = {"t": time.time(), "pid": os.getpid(), "event": event, **kw}
            os.write(self.fd, json.dumps(rec).encode() + b"\n")

    def probe(self, req: r.Request) -> None:
        if self.first:
            self.first = False
            self("first_request", op=type(req).__name__)
        if req.is_resend:
            self("resent", op=type(req).__name__)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m afuse.examples.failoverfs SOURCE MOUNTPOINT --keeper SOCKET --state-dir DIR``."""
    from functools import partial

    from afuse.device import MountOptions
    from afuse.examples._cli import make_parser
    from afuse.failover import serve_failover
    from afuse.running import serve_until_signalled

    parser = make_parser("Mirror SOURCE at MOUNTPOINT, surviving crashes and upgrades.", source=True,
                         prog="python -m afuse.examples.failoverfs")
    parser.add_argument("--keeper", help="the keeper's socket (default: systemd's fd store)")
    parser.add_argument("--state-dir", required=True, help="where nodeids and open files are journaled")
    parser.add_argument("--upgrade", action="store_true",
                        help="take over from the running daemon gracefully (it drains and exits)")
    parser.add_argument("--timeout", type=float, default=0.0,
                        help="entry and attribute cache time (s; default 0: coherent with SOURCE)")
    parser.add_argument("--readers", type=int, default=2, help="descriptors reading requests")
    parser.add_argument("--events", help="append timing events (JSON lines) to this file")
    parser.add_argument("--take-wait", type=float, default=None,
                        help="seconds to wait for a serving daemon to go (a hot standby waits long)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s failoverfs[%(process)d] %(levelname)s %(message)s")
    events = _Events(args.events)
    events("start")
    try:
        options = MountOptions.parse(",".join(args.options))
        ops = FailoverPassthroughFS(args.source, timeout=args.timeout, slow=_slow_from_env())
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    interrupted = False  # Ctrl-C: exit 130 (after draining, like SIGTERM and SIGHUP)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            session = await nursery.start(lambda task_status: serve_failover(
                ops, args.mountpoint, keeper=args.keeper, state_dir=args.state_dir, options=options,
                readers=args.readers, upgrade=args.upgrade, take_wait=args.take_wait,
                probe=events.probe if args.events else None, on_drain=lambda: events("drain"),
                task_status=task_status))
            events("serving", restored_nodes=ops.restored_nodes, restored_fhs=ops.restored_fhs,
                   lost=len(ops.lost))

            async def drain(signum: signal.Signals) -> None:
                nonlocal interrupted
                interrupted = signum == signal.SIGINT
                events("drain", signal=True)
                await session.drain()  # SIGTERM: hand over gracefully, never unmount

            async with trio.open_nursery() as waiting:
                await waiting.start(partial(serve_until_signalled, session, on_signal=drain))
                print("ready", flush=True)
            nursery.cancel_scope.cancel()

    try:
        trio.run(run)
    finally:
        events("exit")
        with contextlib.suppress(OSError):
            ops.close()
    return 128 + signal.SIGINT if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
