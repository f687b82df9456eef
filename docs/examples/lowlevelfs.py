"""The filesystem of docs/lowlevel.md: one directory of in-memory files.

Run it with ``python docs/examples/lowlevelfs.py MOUNTPOINT [--debug] [-o OPTIONS]``.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import stat
import sys
import time
from collections.abc import AsyncIterator

import afuse
from afuse import ROOT_ID


class Node:
    """A file: its attributes, its bytes and how many lookups the kernel holds on it."""

    def __init__(self, attr: afuse.Attr) -> None:
        self.attr = attr
        self.data = bytearray()
        self.lookups = 0


class LowLevelFS(afuse.Operations):
    """A root directory holding regular files, kept in memory."""

    def __init__(self) -> None:
        now = time.time_ns()
        self.root = afuse.Attr(ino=ROOT_ID, mode=stat.S_IFDIR | 0o755, nlink=2, uid=os.getuid(),
                               gid=os.getgid(), atime_ns=now, mtime_ns=now, ctime_ns=now)
        self.names: dict[bytes, int] = {}  # file name -> nodeid
        self.nodes: dict[int, Node] = {}  # nodeid -> file, until unlinked and forgotten
        self.next_id = ROOT_ID + 1

    def node(self, nodeid: int) -> Node:
        if nodeid not in self.nodes:  # the root: it cannot be opened, truncated or chmod-ed here
            raise afuse.FUSEError(errno.EPERM if nodeid == ROOT_ID else errno.ENOENT)
        return self.nodes[nodeid]

    def touch(self, attr: afuse.Attr) -> None:
        attr.mtime_ns = attr.ctime_ns = time.time_ns()

    def resize(self, node: Node, size: int) -> None:
        if size < len(node.data):
            del node.data[size:]
        else:
            node.data.extend(bytes(size - len(node.data)))
        node.attr.size = size
        node.attr.blocks = (size + 511) // 512

    async def lookup(self, req: afuse.LookupRequest) -> afuse.Entry:
        if req.nodeid != ROOT_ID or req.name not in self.names:
            raise afuse.FUSEError(errno.ENOENT)
        nodeid = self.names[req.name]
        self.nodes[nodeid].lookups += 1  # every Entry returned counts one lookup
        return afuse.Entry(nodeid, self.nodes[nodeid].attr)

    async def forget(self, req: afuse.ForgetRequest) -> None:
        for item in req.items:
            node = self.nodes[item.nodeid]
            node.lookups -= item.nlookup
            if node.lookups == 0 and node.attr.nlink == 0:
                del self.nodes[item.nodeid]  # unlinked and unknown to the kernel: free it

    async def getattr(self, req: afuse.GetattrRequest) -> afuse.Attr:
        return self.root if req.nodeid == ROOT_ID else self.node(req.nodeid).attr

    async def setattr(self, req: afuse.SetattrRequest) -> afuse.Attr:
        node = self.node(req.nodeid)
        if req.size is not None:  # truncate(2), ftruncate(2)
            self.resize(node, req.size)
            self.touch(node.attr)
        if req.mode is not None:  # chmod(2); other changes are accepted and ignored
            node.attr.mode = stat.S_IFMT(node.attr.mode) | stat.S_IMODE(req.mode)
        return node.attr

    async def readdir(self, req: afuse.ReaddirRequest) -> AsyncIterator[afuse.DirEntry]:
        # Each entry carries the cookie of the next one: "." 1, ".." 2, a file nodeid + 2.
        # Listing files in nodeid order keeps cookies valid while files come and go.
        if req.offset < 1:
            yield afuse.DirEntry(b".", 1, self.root)
        if req.offset < 2:
            yield afuse.DirEntry(b"..", 2, self.root)
        for nodeid, name in sorted((nodeid, name) for name, nodeid in self.names.items()):
            if nodeid + 2 > req.offset:
                yield afuse.DirEntry(name, nodeid + 2, self.nodes[nodeid].attr)

    async def open(self, req: afuse.OpenRequest) -> afuse.Handle:
        node = self.node(req.nodeid)
        if req.flags & os.O_TRUNC:  # open(O_TRUNC) comes here, not to setattr
            self.resize(node, 0)
            self.touch(node.attr)
        return afuse.Handle()  # fh 0: read and write find the file by req.nodeid

    async def read(self, req: afuse.ReadRequest) -> bytes:
        return bytes(self.node(req.nodeid).data[req.offset : req.offset + req.size])

    async def write(self, req: afuse.WriteRequest) -> int:
        node = self.node(req.nodeid)
        end = req.offset + len(req.data)
        if end > len(node.data):
            self.resize(node, end)
        node.data[req.offset : end] = req.data
        self.touch(node.attr)
        return len(req.data)

    async def create(self, req: afuse.CreateRequest) -> tuple[afuse.Entry, afuse.Handle]:
        if req.nodeid != ROOT_ID:
            raise afuse.FUSEError(errno.ENOENT)
        if req.name in self.names:
            raise afuse.FUSEError(errno.EEXIST)
        nodeid, self.next_id = self.next_id, self.next_id + 1
        now = time.time_ns()
        node = Node(afuse.Attr(ino=nodeid, mode=req.mode, uid=req.uid, gid=req.gid,
                               atime_ns=now, mtime_ns=now, ctime_ns=now))
        node.lookups = 1  # the Entry returned counts one lookup, as in lookup()
        self.nodes[nodeid] = node
        self.names[req.name] = nodeid
        self.touch(self.root)
        return afuse.Entry(nodeid, node.attr), afuse.Handle()

    async def unlink(self, req: afuse.UnlinkRequest) -> None:
        if req.nodeid != ROOT_ID or req.name not in self.names:
            raise afuse.FUSEError(errno.ENOENT)
        nodeid = self.names.pop(req.name)
        self.nodes[nodeid].attr.nlink = 0  # the kernel may still use it; forget() frees it
        self.touch(self.root)
        if self.nodes[nodeid].lookups == 0:
            del self.nodes[nodeid]


def main(argv: list[str] | None = None) -> None:
    """Serve on MOUNTPOINT in the foreground until Ctrl-C, SIGTERM, SIGHUP or an unmount."""
    parser = argparse.ArgumentParser(description="A directory of in-memory files.")
    parser.add_argument("mountpoint")
    parser.add_argument("-o", dest="options", action="append", default=[], help="mount options, comma-separated")
    parser.add_argument("--debug", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        afuse.run(LowLevelFS(), args.mountpoint, options=",".join(args.options))
    except afuse.MountError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
