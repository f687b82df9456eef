"""A node filesystem that fails over: a loopback tree whose node keys are file handles.

``python tests/nodes_failover_daemon.py SOURCE MOUNTPOINT SOCKET STATE_DIR EVENTS [SLOW]`` serves
SOURCE on MOUNTPOINT with :func:`afuse.failover.serve_failover` (the keeper at SOCKET) and prints
``ready``. Each node's key is ``(st_dev, st_ino, handle type, handle)``, so a restarted daemon
reopens every node the kernel holds with ``open_by_handle_at`` (:meth:`NodeFS.restore_node`).
``SLOW`` (a probability) makes creating and removing requests wait 50 ms after taking effect —
half of them inside the node (before the bridge records the outcome), half after the bridge
answered (outcome recorded, reply not yet written) — so a SIGKILL catches requests in flight.
EVENTS gets a JSON line per request the kernel resent.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from collections.abc import Hashable
from typing import Any

import trio

from afuse.examples.passthroughfs import file_handle, open_by_handle
from afuse.failover import serve_failover
from afuse.nodes import LoopbackFS, LoopbackNode, Node
from afuse.wire import requests as r
from afuse.wire.types import Entry, Handle

SLOW = 0.0


async def _maybe_slow() -> None:
    if SLOW and random.random() < SLOW / 2:
        await trio.sleep(0.05)


class HandleNode(LoopbackNode):
    """A loopback node that is slow, on request, after its changes took effect."""

    async def create(self, name: bytes, flags: int, mode: int) -> Any:
        res = await super().create(name, flags, mode)
        await _maybe_slow()
        return res

    async def mkdir(self, name: bytes, mode: int) -> Node:
        res = await super().mkdir(name, mode)
        await _maybe_slow()
        return res

    async def symlink(self, name: bytes, target: bytes) -> Node:
        res = await super().symlink(name, target)
        await _maybe_slow()
        return res

    async def link(self, name: bytes, node: Node) -> Node:
        res = await super().link(name, node)
        await _maybe_slow()
        return res

    async def unlink(self, name: bytes) -> None:
        await super().unlink(name)
        await _maybe_slow()

    async def rmdir(self, name: bytes) -> None:
        await super().rmdir(name)
        await _maybe_slow()

    async def rename(self, name: bytes, newparent: Node, newname: bytes, flags: int) -> None:
        await super().rename(name, newparent, newname, flags)
        await _maybe_slow()


class HandleFS(LoopbackFS):
    """A loopback filesystem whose node keys survive the daemon: (dev, ino, handle type, handle);
    a successor restores nodes by file handle."""

    node_class = HandleNode

    def __init__(self, source: str) -> None:
        self.mount_fd = os.open(source, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        super().__init__(source)

    def node_key(self, fd: int, st: os.stat_result) -> Hashable:
        fh = file_handle(fd)
        if fh is None:
            raise OSError("the source filesystem has no file handles")
        return (st.st_dev, st.st_ino, fh[0], fh[1])

    def restore_node(self, key: Hashable) -> Node | None:
        assert isinstance(key, tuple)
        dev, ino, kind, handle = key
        try:
            fd = open_by_handle(self.mount_fd, kind, handle, os.O_PATH | os.O_NOFOLLOW)
        except OSError:
            return None
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (dev, ino):
            os.close(fd)
            return None
        return self.reopened(fd, st)

    async def create(self, req: r.CreateRequest) -> tuple[Entry, Handle]:
        res = await super().create(req)
        await _maybe_slow()  # the outcome is recorded, the reply not yet written
        return res

    async def mkdir(self, req: r.MkdirRequest) -> Entry:
        res = await super().mkdir(req)
        await _maybe_slow()
        return res

    async def unlink(self, req: r.UnlinkRequest) -> None:
        await super().unlink(req)
        await _maybe_slow()

    async def rename(self, req: r.RenameRequest) -> None:
        await super().rename(req)
        await _maybe_slow()


def main(argv: list[str]) -> int:
    global SLOW
    source, mountpoint, sock, state_dir, events = argv[:5]
    SLOW = float(argv[5]) if len(argv) > 5 else 0.0
    fs = HandleFS(source)
    ev = os.open(events, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)

    def probe(req: r.Request) -> None:
        if req.is_resend:
            line = {"t": time.time(), "pid": os.getpid(), "op": type(req).__name__, "id": req.request_id}
            os.write(ev, json.dumps(line).encode() + b"\n")

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            session = await nursery.start(lambda task_status: serve_failover(
                fs, mountpoint, keeper=sock, state_dir=state_dir, probe=probe, task_status=task_status))
            print("ready", flush=True)
            await session.wait_closed()
            nursery.cancel_scope.cancel()

    trio.run(run)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
