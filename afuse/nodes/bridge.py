"""The bridge: an :class:`afuse.Operations` serving a tree of nodes, doing the kernel's bookkeeping.

It owns nodeids (never reused for another node, so the generation stays constant), lookup
counts (LOOKUP, CREATE, MKNOD, MKDIR, SYMLINK, LINK and each READDIRPLUS entry the kernel takes),
FORGET/BATCH_FORGET, dropping forgotten nodes that are not in the persistent tree, file and
directory handles, directory snapshots (offsets stay valid while the directory changes),
passthrough backing files (one per node while open) and the caller of each request.

It also answers replayed requests (the kernel's resend after a daemon crash or takeover) as their
first attempts were answered, and implements :class:`afuse.state.Persistent` for its own tables
(nodeids and keys, lookup counts, open handles, the outcomes of recent non-idempotent requests),
so a tree of nodes with stable keys can fail over (see docs/nodes.md, "Failover").
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
import time
import zlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Iterable, Iterator
from typing import Any, TypeVar

import attrs

from ..dispatch import HandlerResultError
from ..errors import FUSEError, NotNegotiated
from ..operations import DirEntries, Operations
from ..passthrough import PASSTHROUGH_COMPATIBLE, unavailable_reason
from ..session import Session, current_session
from ..splice import FileRange
from ..wire import requests as r
from ..wire.constants import ROOT_ID, UNIQUE_RESEND, FOpen, InitFlag
from ..wire.init import Negotiated
from ..wire.types import Attr, DirEntry, DirSlice, Entry, FsStats, Handle, IoctlReply, Lock
from .caller import _enter as _set_caller
from .node import DirItem, FDHandle, FileHandle, Node, _Cookies
from .tables import KINDS, NOT_DONE, OUTCOMES_KEPT, NotDone, decode_key, encode_key, error_code, fold, new_state

__all__ = ["NodeFS"]

log = logging.getLogger("afuse")
_T = TypeVar("_T")
#: A result kept for replays (NodeFS._compact): None, a nodeid, or (nodeid, fh, flags, backing id).
_Small = None | int | tuple[int, int, int, int]


def _fingerprint(req: r.Request) -> int:
    """What a request asked, in 32 bits: an outcome kept under its request id is only given to
    a replay asking the same (request ids restart with each connection)."""
    what = (f"{int(type(req).opcode)}/{req.nodeid}/{getattr(req, 'newdir', 0)}/{getattr(req, 'oldnodeid', 0)}/"
            f"{getattr(req, 'flags', 0)}/").encode()
    return zlib.crc32(getattr(req, "newname", b""), zlib.crc32(getattr(req, "name", b""), zlib.crc32(what)))


# Bridge operations answered only if some known node or handle class has one of these methods;
# otherwise the dispatcher answers ENOSYS, which the kernel remembers (it stops sending them, or
# falls back: CREATE to MKNOD+OPEN, xattrs to EOPNOTSUPP, locks to local ones, ...). Operations
# whose ENOSYS the kernel would pass on to every caller are always forwarded and answered as a
# local filesystem would (EPERM, EINVAL, EBADF).
_NEEDS: dict[str, tuple[str, ...]] = {
    "create": ("create",), "flush": ("flush",), "fsync": ("fsync", "backing_fd"),
    "setxattr": ("setxattr",), "getxattr": ("getxattr",), "listxattr": ("listxattr",),
    "removexattr": ("removexattr",), "access": ("access",), "getlk": ("getlk",),
    "setlk": ("setlk",), "flock": ("flock",), "fallocate": ("fallocate",), "lseek": ("lseek",),
    "copy_file_range": ("copy_file_range",), "ioctl": ("ioctl",), "poll": ("poll",),
    "tmpfile": ("tmpfile",),
}
_DOTS = (b".", b"..")
_NO_GETATTR = object()
_ENOENT = os.strerror(errno.ENOENT)
_ACCMODE = os.O_ACCMODE
_IFMT, _IFDIR = 0o170000, stat.S_IFDIR  # node.mode & _IFMT == _IFDIR: node.is_dir without a call
_DEFAULT_POLL = 0x0001 | 0x0004 | 0x0040 | 0x0100  # POLLIN|POLLOUT|POLLRDNORM|POLLWRNORM


def _has(cls: type, method: str) -> bool:
    if method == "backing_fd":
        return issubclass(cls, FDHandle) or any("backing_fd" in k.__dict__ for k in cls.__mro__
                                                if k is not FileHandle)
    return callable(getattr(cls, method, None))


def _classes(root: Node) -> set[type]:
    seen: set[type] = set()
    stack, visited = [root], set()
    while stack:
        n = stack.pop()
        if id(n) in visited:
            continue
        visited.add(id(n))
        seen.add(type(n))
        if n.children:
            stack.extend(n.children.values())
    return seen


_GENERATED: dict[tuple[type, frozenset[str]], type] = {}
_DIR_ITEM = frozenset({DirItem})


class _DirStream:
    __slots__ = ("items", "node", "sends", "source", "what")

    def __init__(self, node: Node) -> None:
        self.node = node
        #: (name, mode, ino, node or None) from the first READDIR at offset 0.
        self.items: list[tuple[Any, ...]] | None = None
        #: The rest of a listing still arriving (the node's ``readdir`` is an async iterator), or None.
        self.source: AsyncIterator[Any] | None = None
        #: The source has started and takes ``asend``: it is sent how many more items would fit.
        self.sends = False
        self.what = ""

    async def stop(self) -> None:
        """Close a listing still arriving."""
        src, self.source = self.source, None
        aclose = getattr(src, "aclose", None)
        if aclose is not None:
            await aclose()


class NodeFS(Operations):
    """Serve the tree of nodes under ``root`` (a directory node): ``afuse.mount(NodeFS(root), path)``.

    ``types`` names node and handle classes that appear only later (returned by lookups, creates
    or opens): operations none of the known classes implement are left to the dispatcher, which
    answers ENOSYS, so the kernel stops sending them. ``generation`` is reported in every entry.
    """

    #: How long the kernel may cache a name's absence (0: not at all; each miss asks again).
    negative_timeout: float = 0.0
    #: Entries (``.`` and ``..`` included; at least 3) in the first READDIRPLUS of a listing when
    #: the kernel chooses between READDIR and READDIRPLUS (READDIRPLUS_AUTO): see :meth:`readdirplus`.
    first_readdirplus: int = 3

    def __init__(self, root: Node, *, types: Iterable[type] = (), generation: int = 0) -> None:
        if not isinstance(root, Node) or not root.is_dir:
            raise TypeError(f"the root must be a directory Node, not {root!r}")
        self.root = root
        self.generation = generation
        self._nodes: dict[int, Node] = {}
        self._by_key: dict[Any, Node] = {}
        self._next_nodeid = ROOT_ID + 1
        self._handles: dict[int, tuple[Node, FileHandle]] = {}
        #: fh -> open(2) flags of each open file (with or without a handle object), for snapshots.
        self._fh_flags: dict[int, int] = {}
        #: Open files of a restored snapshot, reopened at their first use: fh -> (nodeid, flags).
        self._pending: dict[int, tuple[int, int]] = {}
        self._dirs: dict[int, _DirStream] = {}
        self._journal: Callable[[Any], None] | None = None
        #: request_id -> outcome (see afuse.nodes.tables) of recent non-idempotent requests.
        self._outcomes: OrderedDict[int, list[Any] | tuple[r.Request, _Small, int]] = OrderedDict()
        self._next_fh = 1
        self._session: Session | None = None
        self._passthrough = False
        #: Entries in the first READDIRPLUS of a listing (None: as many as fit); see :meth:`readdirplus`.
        self._first_plus: int | None = None
        #: Lookups the kernel forgot beyond the bridge's count (0 unless something answered an
        #: entry behind the bridge's back, e.g. an overridden ``lookup``).
        self.excess_forgets = 0
        self._default_attr = (os.getuid(), os.getgid(), time.time_ns())
        classes = _classes(root) | set(types)
        self._forwarded = {op for op, methods in _NEEDS.items()
                           if any(_has(c, m) for c in classes for m in methods)}
        self._checked: set[type] = set(classes)
        root._nodeid = ROOT_ID
        self._attach(root)
        missing = frozenset(_NEEDS) - self._forwarded
        cls = type(self)
        key = (cls, missing)
        sub = _GENERATED.get(key)
        if sub is None:
            ns = {op: getattr(Operations, op) for op in missing
                  if getattr(cls, op) is getattr(NodeFS, op)}  # a subclass's own override stays
            sub = type(cls.__name__, (cls,), ns)
            sub.__qualname__ = cls.__qualname__
            sub.__module__ = cls.__module__
            _GENERATED[key] = sub
        self.__class__ = sub

    # -- the node table ---------------------------------------------------------------------------

    @property
    def nodes(self) -> dict[int, Node]:
        """Nodes by nodeid: the persistent tree and every node the kernel holds a lookup of."""
        return self._nodes

    def node(self, nodeid: int) -> Node:
        """The node with ``nodeid`` (ESTALE if there is none)."""
        n = self._nodes.get(nodeid)
        if n is None:
            raise FUSEError(errno.ESTALE)
        return n

    def _register(self, n: Node, dedup: bool) -> Node:
        if n._bridge is not None and n._bridge is not self:
            raise ValueError(f"{n!r} belongs to another NodeFS")
        if dedup and n.key is not None and self._by_key.get(n.key, n) is not n:  # no call for a new key
            ex = self._canonical(n)
            if ex is not n:
                return ex
        new = not n._nodeid
        if new:
            n._nodeid = self._next_nodeid
            self._next_nodeid += 1
        n._bridge = self
        self._nodes[n._nodeid] = n
        if n.key is not None and n.key not in self._by_key:
            self._by_key[n.key] = n
        if new and self._journal is not None:  # journal after the change: the store may snapshot now
            self._journal(["N", n._nodeid, encode_key(n.key)])
        if type(n) not in self._checked:
            self._check_class(type(n))
        return n

    def node_by_key(self, key: Hashable) -> Node | None:
        """The live node with ``key``, if any (a lookup may return it rather than build another)."""
        return self._by_key.get(key)

    def _canonical(self, n: Node) -> Node:
        """The live node with ``n``'s key (``n`` itself if none); a duplicate ``n`` is discarded."""
        if n.key is None:
            return n
        ex = self._by_key.get(n.key)
        if ex is None or ex is n:
            return n
        if not n._nodeid and not n._links:  # never known: it is dropped now
            self._forgotten(n)
        return ex

    def _forgotten(self, n: Node) -> None:
        hook = getattr(n, "forgotten", None)
        if hook is not None:
            try:
                hook()
            except Exception as exc:  # a bug in the node: logged and kept, never stops forgetting
                log.error("%s.forgotten failed", type(n).__qualname__, exc_info=exc)
                if self._session is not None and len(self._session.errors) < 100:
                    self._session.errors.append(exc)

    def _attach(self, node: Node) -> None:
        """``node`` joined the persistent tree: give it and its subtree nodeids."""
        stack = [node]
        while stack:
            n = stack.pop()
            was = self._nodes.get(n._nodeid) is n and n._nodeid != 0
            self._register(n, dedup=False)
            if n.children and not was:
                stack.extend(reversed(n.children.values()))

    def _detached(self, node: Node) -> None:
        """``node`` left the persistent tree (or was forgotten): drop what nobody refers to."""
        stack = [node]
        while stack:
            n = stack.pop()
            if n._lookups > 0 or n is self.root or self._nodes.get(n._nodeid) is not n:
                continue
            if n._links > (0 if n is node else 1):
                continue
            del self._nodes[n._nodeid]
            if n.key is not None and self._by_key.get(n.key) is n:
                del self._by_key[n.key]
            if n.children:
                stack.extend(n.children.values())
            self._forgotten(n)

    def _check_class(self, cls: type) -> None:
        if cls in self._checked:
            return
        self._checked.add(cls)
        lacking = [op for op, methods in _NEEDS.items()
                   if op not in self._forwarded and any(_has(cls, m) for m in methods)]
        if lacking:
            log.warning("%s implements %s, but the filesystem was set up without it: pass the class "
                        "in NodeFS(types=...) so the kernel is sent those requests", cls.__qualname__,
                        ", ".join(lacking))

    async def _attr(self, node: Node) -> Attr:
        fn = getattr(node, "getattr", None)
        return self._checked_attr(node, await fn() if fn is not None else _NO_GETATTR)

    def _checked_attr(self, node: Node, got: object) -> Attr:
        """``got`` (what ``node.getattr()`` returned) with inode number and type filled in."""
        if type(got) is Attr:
            a = got
        elif got is _NO_GETATTR:
            uid, gid, t = self._default_attr
            a = Attr(mode=node.mode, nlink=2 if node.is_dir else 1, uid=uid, gid=gid,
                     atime_ns=t, mtime_ns=t, ctime_ns=t)
        else:
            raise HandlerResultError(f"{type(node).__qualname__}.getattr must return an Attr, "
                                     f"not {type(got).__name__}")
        ino = a.ino or node.ino or node._nodeid
        mode = a.mode if stat.S_IFMT(a.mode) else a.mode | stat.S_IFMT(node.mode)
        if ino != a.ino or mode != a.mode:  # a copy: the node's Attr may be shared or kept
            a = attrs.evolve(a, ino=ino, mode=mode)
        return a

    async def _entry(self, node: Node) -> Entry:
        """The entry reply for ``node``; counts one lookup."""
        key = node.key
        if key is not None and self._by_key.get(key, node) is not node:
            node = self._canonical(node)
        fn = getattr(node, "getattr", None)  # self._attr(node), one coroutine less
        got = await fn() if fn is not None else _NO_GETATTR
        # An Attr with inode number and file type needs no checking (self._checked_attr, inline).
        attr = got if type(got) is Attr and got.ino and got.mode & _IFMT else self._checked_attr(node, got)
        key = node.key  # registered (again, if a node with its key went live meanwhile) unless it is as it was
        if self._nodes.get(node._nodeid) is not node or (key is not None and self._by_key.get(key) is not node):
            node = self._register(node, dedup=True)
        node._lookups += 1
        if self._journal is not None:
            self._journal(["L", node._nodeid, 1])
        if not attr.ino:  # a new node: its nodeid is its inode number
            attr = attrs.evolve(attr, ino=node._nodeid)
        return Entry(node._nodeid, attr, self.generation)

    @staticmethod
    def _node_result(owner: Node, method: str, res: object) -> Node:
        if not isinstance(res, Node):
            raise HandlerResultError(f"{type(owner).__qualname__}.{method} must return a Node, "
                                     f"not {type(res).__name__}")
        return res

    @staticmethod
    def _handle_result(owner: Node, method: str, res: object) -> str:
        """``method`` (the name :meth:`_opened` reports), once ``res`` is known to be a handle or None."""
        if res is not None and not isinstance(res, FileHandle):
            raise HandlerResultError(f"{type(owner).__qualname__}.{method} must return a FileHandle or None, "
                                     f"not {type(res).__name__}")
        return method

    # -- Operations: lifecycle and lookups --------------------------------------------------------

    def init(self, negotiated: Negotiated) -> None:
        """Remember the serving session (notifications, passthrough)."""
        self._session = current_session()
        self._passthrough = negotiated.has(InitFlag.PASSTHROUGH)
        auto = negotiated.has(InitFlag.READDIRPLUS_AUTO)
        self._first_plus = max(3, self.first_readdirplus) if auto else None

    async def forget(self, req: r.ForgetRequest) -> None:
        """Drop lookup counts; a node left with none and outside the persistent tree is dropped."""
        for item in req.items:
            n = self._nodes.get(item.nodeid)
            if n is None:
                continue
            if item.nlookup > n._lookups:
                self.excess_forgets += item.nlookup - n._lookups
            was = n._lookups
            n._lookups = max(0, was - item.nlookup)
            if self._journal is not None and was:
                self._journal(["L", n._nodeid, n._lookups - was])
            if n._lookups == 0:
                self._detached(n)

    async def _child(self, parent: Node, name: bytes) -> Node | None:
        if parent.children is not None:
            return parent.children.get(name)
        fn = getattr(parent, "lookup", None)
        if fn is None:
            raise FUSEError(errno.ENOTDIR if not parent.is_dir else errno.ENOENT)
        res = await fn(name)
        return None if res is None else self._node_result(parent, "lookup", res)

    async def lookup(self, req: r.LookupRequest) -> Entry:
        """LOOKUP: the persistent child or the node's ``lookup``."""
        _set_caller(req)
        parent = self._nodes.get(req.nodeid)
        if parent is None:
            raise FUSEError(errno.ESTALE)
        if parent.mode & _IFMT != _IFDIR:
            raise FUSEError(errno.ENOTDIR)
        child = await self._child(parent, req.name)
        if child is None:
            if self.negative_timeout > 0:
                return Entry(0, Attr(), entry_timeout=self.negative_timeout)
            raise FileNotFoundError(errno.ENOENT, _ENOENT)  # the common miss: cheaper than a FUSEError
        return await self._entry(child)

    async def getattr(self, req: r.GetattrRequest) -> Attr:
        """GETATTR: the node's ``getattr`` (or attributes from its mode)."""
        _set_caller(req)
        return await self._attr(self.node(req.nodeid))

    async def setattr(self, req: r.SetattrRequest) -> Attr:
        """SETATTR: the handle's (ftruncate, fchmod, ...) or node's ``setattr(changes)``; EPERM without."""
        _set_caller(req)
        node, h = await self._open_file(req, req.fh) if req.fh else (self.node(req.nodeid), None)
        fn = self._method(node, h, "setattr")
        if fn is None:
            raise FUSEError(errno.EPERM)
        a = await fn(req)
        if type(a) is not Attr:
            raise HandlerResultError(f"{type(node).__qualname__}.setattr must return an Attr, not {type(a).__name__}")
        if not a.ino:
            a = attrs.evolve(a, ino=node.ino or node._nodeid)
        return a

    async def readlink(self, req: r.ReadlinkRequest) -> bytes:
        """READLINK: the node's ``readlink``; EINVAL for other nodes."""
        _set_caller(req)
        fn = getattr(self.node(req.nodeid), "readlink", None)
        if fn is None:
            raise FUSEError(errno.EINVAL)
        res: bytes = await fn()
        return res

    async def statfs(self, req: r.StatfsRequest) -> FsStats:
        """STATFS: the node's or else the root's ``statfs``; zero counts without one."""
        _set_caller(req)
        node = self._nodes.get(req.nodeid, self.root)
        fn = getattr(node, "statfs", None) or getattr(self.root, "statfs", None)
        if fn is None:
            return FsStats(bsize=512, frsize=512)
        res: FsStats = await fn()
        return res

    async def access(self, req: r.AccessRequest) -> None:
        """ACCESS: the node's ``access(mask)``; allowed without one."""
        _set_caller(req)
        fn = getattr(self.node(req.nodeid), "access", None)
        if fn is not None:
            await fn(req.mask)

    async def getxattr(self, req: r.GetxattrRequest) -> bytes:
        """GETXATTR: the node's ``getxattr(name)``; EOPNOTSUPP without one."""
        _set_caller(req)
        fn = getattr(self.node(req.nodeid), "getxattr", None)
        if fn is None:
            raise FUSEError(errno.EOPNOTSUPP)
        res: bytes = await fn(req.name)
        return res

    async def setxattr(self, req: r.SetxattrRequest) -> None:
        """SETXATTR: the node's ``setxattr(name, value, flags)``; EOPNOTSUPP without one."""
        _set_caller(req)
        fn = getattr(self.node(req.nodeid), "setxattr", None)
        if fn is None:
            raise FUSEError(errno.EOPNOTSUPP)
        await fn(req.name, req.value, req.flags)

    async def listxattr(self, req: r.ListxattrRequest) -> Iterable[bytes]:
        """LISTXATTR: the node's ``listxattr()``; none without one."""
        _set_caller(req)
        fn = getattr(self.node(req.nodeid), "listxattr", None)
        if fn is None:
            return []
        res: Iterable[bytes] = await fn()
        return res

    async def removexattr(self, req: r.RemovexattrRequest) -> None:
        """REMOVEXATTR: the node's ``removexattr(name)``; EOPNOTSUPP without one."""
        _set_caller(req)
        fn = getattr(self.node(req.nodeid), "removexattr", None)
        if fn is None:
            raise FUSEError(errno.EOPNOTSUPP)
        await fn(req.name)

    # -- creating and removing names --------------------------------------------------------------

    def _creating(self, req: r.Request, name: bytes, method: str) -> tuple[Node, Any]:
        _set_caller(req)
        parent = self._nodes.get(req.nodeid)
        if parent is None:
            raise FUSEError(errno.ESTALE)
        if parent.mode & _IFMT != _IFDIR:
            raise FUSEError(errno.ENOTDIR)
        if parent.children is not None and name in parent.children:
            raise FUSEError(errno.EEXIST)
        fn = getattr(parent, method, None)
        if fn is None:
            raise FUSEError(errno.EPERM)
        return parent, fn

    def _adopt(self, parent: Node, name: bytes, child: Node) -> None:
        if parent.children is not None:
            if parent.children.get(name, child) is not child:
                raise FUSEError(errno.EEXIST)  # a concurrent create of the same name won
            parent.add_child(name, child)

    async def _made(self, parent: Node, name: bytes, what: str, res: object) -> Entry:
        child = self._node_result(parent, what, res)
        self._adopt(parent, name, child)
        return await self._entry(child)

    async def _mkdir(self, req: r.MkdirRequest) -> Entry:
        parent, fn = self._creating(req, req.name, "mkdir")
        return await self._made(parent, req.name, "mkdir", await fn(req.name, stat.S_IFDIR | (req.mode & 0o7777)))

    async def mkdir(self, req: r.MkdirRequest) -> Entry:
        """MKDIR: the parent's ``mkdir(name, mode)``; the new node joins a persistent parent."""
        return await self._once(req, lambda: self._mkdir(req),
                                lambda _c: self._existing(req, req.nodeid, req.name, stat.S_IFDIR))

    async def _mknod(self, req: r.MknodRequest) -> Entry:
        parent, fn = self._creating(req, req.name, "mknod")
        return await self._made(parent, req.name, "mknod", await fn(req.name, req.mode, req.rdev))

    async def mknod(self, req: r.MknodRequest) -> Entry:
        """MKNOD: the parent's ``mknod(name, mode, rdev)``."""
        fmt = stat.S_IFMT(req.mode) or stat.S_IFREG

        async def same(node: Node) -> bool:
            return fmt not in (stat.S_IFCHR, stat.S_IFBLK) or (await self._attr(node)).rdev == req.rdev
        return await self._once(req, lambda: self._mknod(req),
                                lambda _c: self._existing(req, req.nodeid, req.name, fmt, same))

    async def _symlink(self, req: r.SymlinkRequest) -> Entry:
        parent, fn = self._creating(req, req.name, "symlink")
        return await self._made(parent, req.name, "symlink", await fn(req.name, req.target))

    async def symlink(self, req: r.SymlinkRequest) -> Entry:
        """SYMLINK: the parent's ``symlink(name, target)``."""
        async def same(node: Node) -> bool:
            fn = getattr(node, "readlink", None)
            return fn is not None and await fn() == req.target
        return await self._once(req, lambda: self._symlink(req),
                                lambda _c: self._existing(req, req.nodeid, req.name, stat.S_IFLNK, same))

    async def _link(self, req: r.LinkRequest) -> Entry:
        target = self.node(req.oldnodeid)
        if target.is_dir:
            raise FUSEError(errno.EPERM)
        parent, fn = self._creating(req, req.newname, "link")
        return await self._made(parent, req.newname, "link", await fn(req.newname, target))

    async def link(self, req: r.LinkRequest) -> Entry:
        """LINK: the parent's ``link(name, node)``."""
        async def same(node: Node) -> bool:
            return node is self._nodes.get(req.oldnodeid)
        return await self._once(req, lambda: self._link(req),
                                lambda _c: self._existing(req, req.nodeid, req.newname, 0, same))

    async def _create(self, req: r.CreateRequest) -> tuple[Entry, Handle]:
        parent, fn = self._creating(req, req.name, "create")
        res = await fn(req.name, req.flags, stat.S_IFREG | (req.mode & 0o7777))
        handle: object = None
        if isinstance(res, tuple) and len(res) == 2:
            res, handle = res
        if not isinstance(res, Node):  # self._node_result and self._handle_result, inline
            self._node_result(parent, "create", res)
        if handle is not None and not isinstance(handle, FileHandle):
            self._handle_result(parent, "create", handle)
        if parent.children is not None:
            self._adopt(parent, req.name, res)
        entry = await self._entry(res)
        return entry, self._opened(self._nodes[entry.nodeid], handle, "create", req.flags)

    async def create(self, req: r.CreateRequest) -> tuple[Entry, Handle]:
        """CREATE: the parent's ``create(name, flags, mode)``, then the file is open."""
        if not req.unique & UNIQUE_RESEND:  # self._first(req, self._create(req)), one coroutine less
            try:
                res = await self._create(req)
            except (FUSEError, OSError) as exc:
                code = error_code(exc)
                if code is not None:
                    self._outcome(req, None, code)
                raise
            self._outcome(req, res)
            return res

        async def existing(_code: int) -> tuple[Entry, Handle] | NotDone:
            parent = self._nodes.get(req.nodeid)
            child = None if parent is None else await self._named(parent, req.name)
            if child is None or not await self._made_by(req, child, stat.S_IFREG):
                return NOT_DONE
            flags = req.flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC)
            fn = getattr(child, "open", None)
            handle = None if fn is None else await fn(flags)
            entry = await self._entry(child)
            what = self._handle_result(child, "open", handle)
            return entry, self._opened(self._nodes[entry.nodeid], handle, what, flags)
        return await self._once(req, lambda: self._create(req), existing)

    # -- replayed requests ------------------------------------------------------------------------

    async def _first(self, req: r.Request, attempt: Awaitable[_T]) -> _T:
        """``await attempt`` of a request that is not a replay, its outcome kept for replays."""
        try:
            res = await attempt
        except (FUSEError, OSError) as exc:
            code = error_code(exc)
            if code is not None:
                self._outcome(req, None, code)
            raise
        self._outcome(req, res)
        return res

    async def _once(self, req: r.Request, attempt: Callable[[], Awaitable[_T]],
                    recover: Callable[[int], Awaitable[_T | NotDone]]) -> _T:
        """``attempt()``, its outcome kept for replays. A replayed request is answered with the
        outcome of its first attempt if it is known, else by ``recover(errno)`` when the attempt
        fails the way a replay of a successful first attempt fails (EEXIST, ENOENT)."""
        if not req.is_resend:
            return await self._first(req, attempt())
        done = self._kept_outcome(req.request_id)
        if done is not None and done[1] == _fingerprint(req):
            again = await self._answer_again(done)
            if not isinstance(again, NotDone):
                log.debug("%s %d: replay answered as its first attempt", type(req).opcode.name, req.request_id)
                return again  # type: ignore[no-any-return]
        try:
            res = await attempt()
        except (FUSEError, OSError) as exc:
            code = error_code(exc)
            if code is None:
                raise
            if code in (errno.EEXIST, errno.ENOENT):
                found = await recover(code)
                if not isinstance(found, NotDone):
                    log.debug("%s %d: replay of a request that took effect", type(req).opcode.name, req.request_id)
                    self._outcome(req, found)
                    return found
            self._outcome(req, None, code)
            raise
        self._outcome(req, res)
        return res

    def _outcome(self, req: r.Request, res: object, code: int = 0) -> None:
        rid = req.unique & ~UNIQUE_RESEND  # req.request_id
        outcomes = self._outcomes
        # The result as plain numbers: no Entry, Attr or Handle kept alive for the garbage
        # collector to scan, one tuple of ints per created file.
        small = self._compact(res)
        if self._journal is None:
            outcomes[rid] = (req, small, code)  # encoded when a replay or a snapshot needs it: most never are
        else:
            out = self._encode_outcome(req, small, code)
            outcomes[rid] = out
            self._journal(["R", rid, out])
        if len(outcomes) > OUTCOMES_KEPT:
            outcomes.popitem(last=False)

    def _kept_outcome(self, rid: int) -> list[Any] | None:
        """The outcome kept for request id ``rid`` (see :mod:`afuse.nodes.tables`), if any."""
        out = self._outcomes.get(rid)
        if isinstance(out, tuple):
            encoded = self._outcomes[rid] = self._encode_outcome(*out)
            return encoded
        return out

    @staticmethod
    def _compact(res: object) -> _Small:
        """A result kept for replays as numbers: None, an entry's nodeid, or (nodeid, fh, FOPEN
        flags, backing id) of a create."""
        if res is None:
            return None
        if isinstance(res, Entry):
            return res.nodeid
        assert isinstance(res, tuple)
        entry, h = res
        return (entry.nodeid, h.fh, int(h.flags), h.backing_id)

    @staticmethod
    def _encode_outcome(req: r.Request, small: _Small, code: int) -> list[Any]:
        fp = _fingerprint(req)
        if code:
            out: list[Any] = ["x", fp, code]
        elif small is None:
            out = ["ok", fp]
        elif isinstance(small, int):
            out = ["e", fp, small]
        else:
            out = ["c", fp, *small]
        return out

    async def _answer_again(self, out: list[Any]) -> Any:
        kind = out[0]
        if kind == "ok":
            return None
        if kind == "x":
            raise FUSEError(out[2])
        node = self._nodes.get(out[2])
        if node is None:
            return NOT_DONE
        entry = Entry(node._nodeid, await self._attr(node), self.generation)  # counted by the first attempt
        if kind == "e":
            return entry
        return entry, Handle(out[3], out[4], out[5])

    async def _named(self, parent: Node, name: bytes) -> Node | None:
        try:
            child = await self._child(parent, name)
        except (FUSEError, OSError) as e:
            if error_code(e) in (errno.ENOENT, errno.ENOTDIR):
                return None
            raise
        return None if child is None else self._canonical(child)

    async def _made_by(self, req: r.Request, node: Node, fmt: int) -> bool:
        """Could ``node`` be what ``req`` made: its file type, and owned by the caller?"""
        if fmt and stat.S_IFMT(node.mode) != fmt:
            return False
        return not req.has_ids or (await self._attr(node)).uid == req.uid

    async def _existing(self, req: r.Request, parent_id: int, name: bytes, fmt: int,
                        same: Callable[[Node], Awaitable[bool]] | None = None) -> Entry | NotDone:
        """The counted entry of ``name`` if it is what the first attempt of ``req`` made."""
        parent = self._nodes.get(parent_id)
        child = None if parent is None else await self._named(parent, name)
        if child is None or not await self._made_by(req, child, fmt) or (same is not None and not await same(child)):
            return NOT_DONE
        return await self._entry(child)

    async def _removing(self, req: r.Request, name: bytes, method: str, want_dir: bool) -> None:
        _set_caller(req)
        parent = self._nodes.get(req.nodeid)
        if parent is None:
            raise FUSEError(errno.ESTALE)
        if parent.mode & _IFMT != _IFDIR:
            raise FUSEError(errno.ENOTDIR)
        child = None
        if parent.children is not None:
            child = parent.children.get(name)
            if child is None:
                raise FUSEError(errno.ENOENT)
            if want_dir and not child.is_dir:
                raise FUSEError(errno.ENOTDIR)
            if not want_dir and child.is_dir:
                raise FUSEError(errno.EISDIR)
            if want_dir and child.children:
                raise FUSEError(errno.ENOTEMPTY)
        fn = getattr(parent, method, None)
        if fn is None:
            raise FUSEError(errno.EPERM)
        await fn(name)
        if child is not None and parent.children is not None and parent.children.get(name) is child:
            parent.remove_child(name)

    async def unlink(self, req: r.UnlinkRequest) -> None:
        """UNLINK: the parent's ``unlink(name)`` allows it; a persistent parent drops the child."""
        if not req.unique & UNIQUE_RESEND:  # self._first(req, ...), one coroutine less
            try:
                await self._removing(req, req.name, "unlink", False)
            except (FUSEError, OSError) as exc:
                code = error_code(exc)
                if code is not None:
                    self._outcome(req, None, code)
                raise
            self._outcome(req, None)
            return
        await self._once(req, lambda: self._removing(req, req.name, "unlink", False), self._gone)

    async def rmdir(self, req: r.RmdirRequest) -> None:
        """RMDIR: the parent's ``rmdir(name)`` allows it (ENOTEMPTY for a persistent non-empty one)."""
        await self._once(req, lambda: self._removing(req, req.name, "rmdir", True), self._gone)

    @staticmethod
    async def _gone(code: int) -> NotDone | None:
        return None if code == errno.ENOENT else NOT_DONE

    async def _rename_again(self, req: r.RenameRequest) -> None:
        """A replayed RENAME (see :meth:`_once`)."""
        async def moved(code: int) -> NotDone | None:
            # Done if the old name is gone and the new one is there (an exchange leaves no trace).
            if req.flags & 2 or (code == errno.EEXIST and not req.flags & 1):
                return NOT_DONE
            old, new = self._nodes.get(req.nodeid), self._nodes.get(req.newdir)
            if old is None or new is None or await self._named(new, req.newname) is None:
                return NOT_DONE
            if (req.nodeid, req.name) != (req.newdir, req.newname) and await self._named(old, req.name) is not None:
                return NOT_DONE
            return None
        await self._once(req, lambda: self._rename(req), moved)

    async def rename(self, req: r.RenameRequest) -> None:
        """RENAME: the parent's ``rename(name, newparent, newname, flags)``; persistent trees are
        checked (NOREPLACE, EXCHANGE, type and emptiness) and updated after it."""
        if req.is_resend:
            return await self._rename_again(req)
        return await self._first(req, self._rename(req))

    async def _rename(self, req: r.RenameRequest) -> None:
        _set_caller(req)
        parent, newparent = self.node(req.nodeid), self.node(req.newdir)
        if not parent.is_dir or not newparent.is_dir:
            raise FUSEError(errno.ENOTDIR)
        exchange = bool(req.flags & 2)
        persistent = parent.children is not None and newparent.children is not None
        child = target = None
        if persistent:
            assert parent.children is not None and newparent.children is not None
            child = parent.children.get(req.name)
            target = newparent.children.get(req.newname)
            if child is None:
                raise FUSEError(errno.ENOENT)
            if req.flags & 1 and target is not None:
                raise FUSEError(errno.EEXIST)
            if exchange and target is None:
                raise FUSEError(errno.ENOENT)
            if target is child:
                return
            if target is not None and not exchange:
                if child.is_dir and not target.is_dir:
                    raise FUSEError(errno.ENOTDIR)
                if not child.is_dir and target.is_dir:
                    raise FUSEError(errno.EISDIR)
                if target.children:
                    raise FUSEError(errno.ENOTEMPTY)
        fn = getattr(parent, "rename", None)
        if fn is None:
            raise FUSEError(errno.EPERM)
        await fn(req.name, newparent, req.newname, req.flags)
        if not persistent:
            return
        assert child is not None and parent.children is not None and newparent.children is not None
        if parent.children.get(req.name) is not child or newparent.children.get(req.newname) is not target:
            return  # the node rearranged the tree itself
        if exchange:
            assert target is not None
            parent.children[req.name], newparent.children[req.newname] = target, child
            return
        newparent.add_child(req.newname, child)  # before removing: the child never leaves the tree
        parent.remove_child(req.name)

    # -- open files -----------------------------------------------------------------------------

    def _opened(self, node: Node, handle: object, what: str, open_flags: int) -> Handle:
        """Give ``handle`` an fh; set up passthrough when it offers a descriptor. No awaits."""
        if handle is None:
            return Handle(0, getattr(node, "fopen", 0))
        if not isinstance(handle, FileHandle):
            raise HandlerResultError(f"{what} must return a FileHandle or None, not {type(handle).__name__}")
        if type(handle) not in self._checked:
            self._check_class(type(handle))
        fh = self._next_fh
        self._next_fh += 1
        self._fh_flags[fh] = open_flags
        self._handles[fh] = (node, handle)
        if self._journal is not None:
            self._journal(["O", fh, node._nodeid, open_flags])
        flags = int(handle.fopen)
        if handle.backing_fd is not None and self._passthrough:
            bf = node._backing
            if bf is None or bf.closed:
                bf = None
                try:
                    assert self._session is not None
                    bf = node._backing = self._session.open_backing(handle.backing_fd)
                except OSError as e:
                    log.warning("passthrough off: %s", unavailable_reason(e))
                    self._passthrough = False
            if bf is not None:
                return Handle(fh, (flags & int(PASSTHROUGH_COMPATIBLE)) | FOpen.PASSTHROUGH, bf.id)
        return Handle(fh, flags)

    async def open(self, req: r.OpenRequest) -> Handle:
        """OPEN: the node's ``open(flags)``; without one, I/O goes to the node itself (EACCES for
        a write open of a node without ``write``)."""
        _set_caller(req)
        node = self._nodes.get(req.nodeid)
        if node is None:
            raise FUSEError(errno.ESTALE)
        if node.mode & _IFMT == _IFDIR:
            raise FUSEError(errno.EISDIR)
        fn = getattr(node, "open", None)
        if fn is None:
            if req.flags & _ACCMODE != os.O_RDONLY and getattr(node, "write", None) is None:
                raise FUSEError(errno.EACCES)
            return self._opened(node, None, "open", req.flags)
        handle = await fn(req.flags)
        if handle is not None and not isinstance(handle, FileHandle):  # self._handle_result, inline
            self._handle_result(node, "open", handle)
        return self._opened(node, handle, "open", req.flags)

    async def tmpfile(self, req: r.TmpfileRequest) -> tuple[Entry, Handle]:
        """TMPFILE (O_TMPFILE): the directory's ``tmpfile(flags, mode) -> (Node, FileHandle | None)``;
        the unnamed node joins no persistent tree."""
        _set_caller(req)
        parent = self.node(req.nodeid)
        if not parent.is_dir:
            raise FUSEError(errno.ENOTDIR)
        fn = getattr(parent, "tmpfile", None)
        if fn is None:
            raise FUSEError(errno.EOPNOTSUPP)
        what = f"{type(parent).__qualname__}.tmpfile"
        res = await fn(req.flags, stat.S_IFREG | (req.mode & 0o7777))
        if not (isinstance(res, tuple) and len(res) == 2):
            raise HandlerResultError(f"{what} must return (Node, FileHandle | None)")
        entry = await self._entry(self._node_result(parent, "tmpfile", res[0]))
        return entry, self._opened(self._nodes[entry.nodeid], res[1], what, req.flags)

    def handle(self, fh: int) -> FileHandle:
        """The open file handle with ``fh`` (EBADF if there is none)."""
        got = self._handles.get(fh)
        if got is None:
            raise FUSEError(errno.EBADF)
        return got[1]

    async def _open_file(self, req: r.Request, fh: int) -> tuple[Node, FileHandle | None]:
        _set_caller(req)
        if fh:
            got = self._handles.get(fh)
            if got is None:
                got = await self._reopen(fh)
            return got
        return self.node(req.nodeid), None

    async def _reopen(self, fh: int) -> tuple[Node, FileHandle]:
        """The handle of a restored open file, opened again at its first use (EBADF if it cannot be)."""
        pending = self._pending.pop(fh, None)
        if pending is None:
            raise FUSEError(errno.EBADF)
        nodeid, flags = pending
        node = self._nodes.get(nodeid)
        fn = getattr(node, "open", None)
        handle = None
        if fn is not None:
            try:
                handle = await fn(flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC))
            except (FUSEError, OSError) as e:
                log.warning("open file %d (nodeid %d) cannot be reopened: %s", fh, nodeid, e)
        if node is None or not isinstance(handle, FileHandle):
            self._pending[fh] = pending  # still open for the kernel: its RELEASE will drop it
            raise FUSEError(errno.EBADF)
        self._handles[fh] = (node, handle)
        self._fh_flags[fh] = flags
        return node, handle

    @staticmethod
    def _method(node: Node, handle: FileHandle | None, name: str) -> Any:
        fn = getattr(handle, name, None) if handle is not None else None
        return fn if fn is not None else getattr(node, name, None)

    async def read(self, req: r.ReadRequest) -> bytes | FileRange:
        """READ: the handle's or node's ``read(offset, size)``, else its ``backing_fd``'s range
        (spliced into the reply: :class:`afuse.splice.FileRange`)."""
        _set_caller(req)  # self._open_file(req, req.fh), one coroutine less when the handle is open
        got = self._handles.get(req.fh) if req.fh else None
        node, h = got if got is not None else await self._open_file(req, req.fh)
        fn = getattr(h, "read", None)
        if fn is None and h is not None and h.backing_fd is not None:
            return FileRange(h.backing_fd, req.offset, req.size)
        fn = fn or getattr(node, "read", None)
        if fn is None:
            raise FUSEError(errno.EINVAL)
        res: bytes = await fn(req.offset, req.size)
        return res

    async def write(self, req: r.WriteRequest) -> int:
        """WRITE: the handle's or node's ``write(offset, data)``, else pwrite on its ``backing_fd``."""
        _set_caller(req)  # self._open_file(req, req.fh), one coroutine less when the handle is open
        got = self._handles.get(req.fh) if req.fh else None
        node, h = got if got is not None else await self._open_file(req, req.fh)
        fn = getattr(h, "write", None)
        if fn is None and h is not None and h.backing_fd is not None:
            return os.pwrite(h.backing_fd, req.data, req.offset)
        fn = fn or getattr(node, "write", None)
        if fn is None:
            raise FUSEError(errno.EBADF)
        res: int = await fn(req.offset, req.data)
        return res

    async def flush(self, req: r.FlushRequest) -> None:
        """FLUSH: the handle's or node's ``flush()``."""
        node, h = await self._open_file(req, req.fh)
        fn = self._method(node, h, "flush")
        if fn is not None:
            await fn()

    async def fsync(self, req: r.FsyncRequest) -> None:
        """FSYNC: the handle's or node's ``fsync(datasync)``, else fsync of its ``backing_fd``."""
        node, h = await self._open_file(req, req.fh)
        fn = getattr(h, "fsync", None)
        if fn is None and h is not None and h.backing_fd is not None:
            (os.fdatasync if req.datasync else os.fsync)(h.backing_fd)
            return
        fn = fn or getattr(node, "fsync", None)
        if fn is not None:
            await fn(req.datasync)

    async def release(self, req: r.ReleaseRequest) -> None:
        """RELEASE: forget the fh; the handle's ``release()``."""
        _set_caller(req)
        fh = req.fh
        got = self._handles.pop(fh, None)
        self._fh_flags.pop(fh, None)
        if got is None:  # an fh is either open or pending (a restored open file not used yet)
            self._pending.pop(fh, None)
        if self._journal is not None and fh:
            self._journal(["C", fh])
        if got is not None:
            fn = getattr(got[1], "release", None)
            if fn is not None:
                await fn()

    async def fallocate(self, req: r.FallocateRequest) -> None:
        """FALLOCATE: ``fallocate(offset, length, mode)``; EOPNOTSUPP without one."""
        node, h = await self._open_file(req, req.fh)
        fn = self._method(node, h, "fallocate")
        if fn is None:
            raise FUSEError(errno.EOPNOTSUPP)
        await fn(req.offset, req.length, req.mode)

    async def lseek(self, req: r.LseekRequest) -> int:
        """LSEEK (SEEK_DATA/SEEK_HOLE): ``lseek(offset, whence)``; without one the file is all data."""
        node, h = await self._open_file(req, req.fh)
        fn = self._method(node, h, "lseek")
        if fn is not None:
            res: int = await fn(req.offset, req.whence)
            return res
        size = (await self._attr(node)).size
        if req.offset >= size:
            raise FUSEError(errno.ENXIO)
        return req.offset if req.whence == os.SEEK_DATA else size

    async def copy_file_range(self, req: r.CopyFileRangeRequest) -> int:
        """COPY_FILE_RANGE: ``copy_file_range(offset, out_handle, out_offset, length, flags)``."""
        node, h = await self._open_file(req, req.fh_in)
        out = await self._open_file(req, req.fh_out) if req.fh_out else None
        fn = self._method(node, h, "copy_file_range")
        if fn is None:
            raise FUSEError(errno.EOPNOTSUPP)
        res: int = await fn(req.off_in, out[1] if out else None, req.off_out, req.length, req.flags)
        return res

    async def getlk(self, req: r.GetlkRequest) -> Lock:
        """GETLK: ``getlk(req)``; ENOLCK without one."""
        fn = self._method(*await self._open_file(req, req.fh), "getlk")
        if fn is None:
            raise FUSEError(errno.ENOLCK)
        res: Lock = await fn(req)
        return res

    async def setlk(self, req: r.SetlkRequest) -> None:
        """SETLK/SETLKW: ``setlk(req)``; ENOLCK without one."""
        fn = self._method(*await self._open_file(req, req.fh), "setlk")
        if fn is None:
            raise FUSEError(errno.ENOLCK)
        await fn(req)

    async def flock(self, req: r.SetlkRequest) -> None:
        """flock(2): ``flock(req)``; ENOLCK without one."""
        fn = self._method(*await self._open_file(req, req.fh), "flock")
        if fn is None:
            raise FUSEError(errno.ENOLCK)
        await fn(req)

    async def ioctl(self, req: r.IoctlRequest) -> IoctlReply:
        """IOCTL: ``ioctl(req)``; ENOTTY without one."""
        fn = self._method(*await self._open_file(req, req.fh), "ioctl")
        if fn is None:
            raise FUSEError(errno.ENOTTY)
        res: IoctlReply = await fn(req)
        return res

    async def poll(self, req: r.PollRequest) -> int:
        """POLL: ``poll(req)``; always ready without one."""
        fn = self._method(*await self._open_file(req, req.fh), "poll")
        if fn is None:
            return _DEFAULT_POLL
        res: int = await fn(req)
        return res

    # -- directories ----------------------------------------------------------------------------

    async def opendir(self, req: r.OpendirRequest) -> Handle:
        """OPENDIR: a directory stream (listed at the first READDIR from offset 0); the node's
        ``fopen`` attribute, if any, are the FOPEN flags (CACHE_DIR, KEEP_CACHE)."""
        _set_caller(req)
        node = self.node(req.nodeid)
        if not node.is_dir:
            raise FUSEError(errno.ENOTDIR)
        fh = self._next_fh
        self._next_fh += 1
        self._dirs[fh] = _DirStream(node)
        if self._journal is not None:
            self._journal(["D", fh, node._nodeid])
        return Handle(fh, getattr(node, "fopen", 0))

    async def releasedir(self, req: r.ReleasedirRequest) -> None:
        """RELEASEDIR: drop the stream (closing a listing still arriving)."""
        stream = self._dirs.pop(req.fh, None)
        if stream is not None:
            if self._journal is not None:
                self._journal(["C", req.fh])
            if stream.source is not None:
                await stream.stop()

    def _stream(self, req: r.ReaddirRequest) -> _DirStream:
        _set_caller(req)
        stream = self._dirs.get(req.fh)
        if stream is None:
            raise FUSEError(errno.EBADF)
        return stream

    @staticmethod
    def _cookies(node: Node) -> _Cookies | None:
        """The stable offsets of a persistent directory listed from its children (None: snapshots)."""
        if node.children is None or getattr(node, "readdir", None) is not None:
            return None
        ck = node._cookies
        if ck is None:
            ck = node._cookies = _Cookies(node.children)
        else:
            ck.sync(node.children)
        return ck

    @staticmethod
    def _kept(node: Node, ck: _Cookies, offset: int) -> Iterator[tuple[int, bytes, int, int, Node | None]]:
        """(offset, name, mode, ino, node) of a persistent directory's entries after ``offset``."""
        if offset < 1:
            yield 1, b".", node.mode, node.ino or node._nodeid, None
        if offset < 2:
            yield 2, b"..", stat.S_IFDIR, 0, None
        children = node.children
        assert children is not None
        while True:
            nxt = ck.after(offset)  # looked up again each time: the directory may change meanwhile
            if nxt is None:
                return
            offset, name = nxt
            c = children.get(name)
            if c is not None:
                yield offset, name, c.mode, c.ino or c._nodeid, c

    async def _items(self, stream: _DirStream, offset: int, want: int) -> list[tuple[Any, ...]]:
        """The stream's snapshot (taken at offset 0): ``(name, mode, ino)`` or ``(name, mode,
        ino, node)`` per entry, entry ``i`` at offset ``i + 1``.

        A node whose ``readdir`` is an async iterator is listed as it yields: the snapshot grows
        until it holds ``want`` entries after ``offset`` (as many as the kernel's buffer could
        take) or the listing ends, and the READDIR is answered from that; the next one goes on."""
        if stream.items is None or offset == 0:
            if stream.source is not None:
                await stream.stop()
            node = stream.node
            ino = node.ino or node._nodeid
            items: list[tuple[Any, ...]] = [(b".", node.mode, ino, None), (b"..", stat.S_IFDIR, 0, None)]
            fn = getattr(node, "readdir", None)
            if fn is not None:
                res: Any = fn()
                listing = res if hasattr(res, "__aiter__") else await res
                what = f"{type(node).__qualname__}.readdir"
                if hasattr(listing, "__aiter__"):
                    stream.source, stream.what, stream.sends = listing.__aiter__(), what, False
                else:
                    items += self._dir_items(what, listing)
            elif node.children is not None:
                items += [(name, c.mode, c.ino or c._nodeid, c) for name, c in node.children.items()]
            stream.items = items
        if stream.source is not None:
            await self._arrive(stream, offset + want)
        assert stream.items is not None
        return stream.items

    async def _arrive(self, stream: _DirStream, upto: int) -> None:
        """Take what the stream's source yields (a DirItem, or a list of them: a batch as it
        arrived) until the snapshot holds ``upto`` entries or the source ends."""
        items, src, what = stream.items, stream.source, stream.what
        assert items is not None and src is not None
        while len(items) < upto:
            try:
                # An async generator is sent how many more items would fit (it may wait for as many).
                d = await (src.asend(upto - len(items)) if stream.sends else src.__anext__())  # type: ignore[attr-defined]
                stream.sends = hasattr(src, "asend")
            except StopAsyncIteration:
                stream.source = None
                return
            except BaseException:
                stream.source, stream.items = None, None  # the next READDIR lists again
                raise
            items += self._dir_items(what, d if type(d) is list else (d,))

    @staticmethod
    def _dir_items(what: str, batch: Iterable[object]) -> list[DirItem]:
        """``batch`` as a list of DirItems (checked all at once: a listing has thousands)."""
        items: list[Any] = batch if type(batch) is list else list(batch)
        if set(map(type, items)) <= _DIR_ITEM:
            return items
        checked: list[DirItem] = []
        for d in items:
            if not isinstance(d, DirItem):
                raise HandlerResultError(f"{what} must yield DirItem, not {type(d).__name__}")
            checked.append(DirItem(*d))  # a subclass of DirItem: its three fields
        return checked

    async def readdir(self, req: r.ReaddirRequest) -> DirEntries:
        """READDIR: the entries after ``req.offset``: a persistent directory's stable cookies, else
        positions in the stream's snapshot (a :class:`afuse.wire.types.DirSlice`)."""
        stream = self._stream(req)
        ck = self._cookies(stream.node)
        if ck is not None:
            return ((name, off, ino or 0xFFFFFFFF, mode)
                    for off, name, mode, ino, _n in self._kept(stream.node, ck, req.offset))
        return DirSlice(await self._items(stream, req.offset, req.size // 32), req.offset)  # 32: the shortest record

    async def readdirplus(self, req: r.ReaddirplusRequest) -> DirEntries:
        """READDIRPLUS: as READDIR with entries; each entry the kernel takes counts one lookup.

        With READDIRPLUS_AUTO the kernel asks for READDIRPLUS at offset 0 of every listing, even
        a plain ``ls``, and afterwards only when entries are being looked up (a lookup, or a
        path walk through an entry a READDIRPLUS made, advises it). So the first answer holds
        :attr:`first_readdirplus` entries (3: the dots and one entry): a plain listing goes on
        with plain READDIRs, without a node and attributes per entry, while ``ls -l`` or
        ``scandir`` + ``stat``, by the ``stat`` of that one entry, go on with READDIRPLUS."""
        stream = self._stream(req)
        ck = self._cookies(stream.node)
        first = self._first_plus if req.offset == 0 else None
        if ck is not None:
            return self._plus(stream.node, itertools.islice(self._kept(stream.node, ck, req.offset), first))
        items = await self._items(stream, req.offset, first or req.size // 160)
        return self._plus(stream.node, ((i + 1, it[0], it[1], it[2], it[3] if len(it) > 3 else None) for i, it
                                        in enumerate(itertools.islice(items, req.offset, first), req.offset)))

    async def _plus(self, parent: Node, listing: Iterator[tuple[int, bytes, int, int, Node | None]]
                    ) -> AsyncIterator[DirEntry]:
        fresh: list[Node] = []
        try:
            for off, name, mode, ino, child in listing:
                if name in _DOTS:
                    yield DirEntry(name, off, entry=Entry(0, Attr(ino=ino or 0xFFFFFFFF, mode=mode)))
                    continue
                if child is None:
                    try:
                        child = await self._child(parent, name)
                    except (FUSEError, OSError) as e:
                        if e.errno != errno.ENOENT:  # e.g. EACCES: a directory readable, not searchable
                            yield DirEntry(name, off, entry=Entry(0, Attr(ino=ino or 0xFFFFFFFF, mode=mode)))
                            continue
                    if child is None:
                        continue  # vanished since the listing
                    child = self._canonical(child)
                else:
                    child = self._canonical(child)
                attr = await self._attr(child)
                child = self._register(child, dedup=True)
                if not attr.ino:
                    attr = attrs.evolve(attr, ino=child._nodeid)
                fresh.append(child)
                yield DirEntry(name, off, entry=Entry(child._nodeid, attr, self.generation))
                child._lookups += 1  # runs only once the kernel took the entry
                if self._journal is not None:
                    self._journal(["L", child._nodeid, 1])
        finally:
            for c in fresh:
                if c._lookups == 0:
                    self._detached(c)

    # -- failover: afuse.state.Persistent ---------------------------------------------------------

    def restore_node(self, key: Hashable) -> Node | None:
        """The node with ``key`` in a restarted daemon (:meth:`restore_state`), if the tree does not
        hold it: a subclass reopens it (e.g. by file handle). None: its nodeid goes stale (ESTALE)."""
        return None

    def set_journal(self, journal: Callable[[Any], None] | None) -> None:
        """Send a record (a JSON list, see :mod:`afuse.nodes.tables`) of each change to the tables
        to ``journal`` before the reply that shows it to the kernel (None: stop)."""
        self._journal = journal

    def dump_state(self) -> dict[str, Any]:
        """A JSON snapshot: ``{"bridge": tables}`` (a subclass adds its own items)."""
        st = new_state(self.generation)
        st["next_nodeid"], st["next_fh"] = self._next_nodeid, self._next_fh
        st["nodes"] = {str(i): [encode_key(n.key), n._lookups] for i, n in self._nodes.items()
                       if n._lookups > 0 or n is self.root}
        handles = {str(fh): [node._nodeid, self._fh_flags.get(fh, 0)] for fh, (node, _h) in self._handles.items()}
        handles.update((str(fh), [nodeid, flags]) for fh, (nodeid, flags) in self._pending.items())
        st["handles"] = handles
        st["dirs"] = {str(fh): d.node._nodeid for fh, d in self._dirs.items()}
        st["outcomes"] = [[rid, self._kept_outcome(rid)] for rid in self._outcomes]
        return {"bridge": st}

    def fold_record(self, state: dict[str, Any], record: Any) -> None:
        """Apply one of the bridge's journal records to a snapshot (ValueError for another record:
        a subclass journaling its own records handles those first)."""
        if not isinstance(record, list) or not record or record[0] not in KINDS:
            raise ValueError(f"not a NodeFS journal record: {record!r}")
        fold(state["bridge"], record)

    def restore_state(self, state: dict[str, Any]) -> None:
        """Take over the tables of ``state`` (a snapshot with the journal folded in): each node the
        kernel holds is found by key in the tree or by :meth:`restore_node` (keyless nodes of the
        initial tree by their nodeid: the same tree numbers them alike); open files are reopened
        (``open`` without O_CREAT/O_EXCL/O_TRUNC) at their first use; open directories list afresh."""
        b = state["bridge"]
        root = self.root
        initial = dict(self._nodes)
        by_key = {n.key: n for n in initial.values() if n.key is not None}
        for n in initial.values():
            if n is not root:
                n._nodeid = n._lookups = 0
        self._nodes = {ROOT_ID: root}
        self._by_key = {} if root.key is None else {root.key: root}
        stale = 0
        for sid, (enc, lookups) in b["nodes"].items():
            nodeid = int(sid)
            if nodeid == ROOT_ID:
                root._lookups = lookups
                continue
            if lookups <= 0:
                continue
            key = decode_key(enc)
            node = by_key.get(key) if key is not None else initial.get(nodeid)
            if node is not None and node._nodeid:
                node = None  # one node, two saved nodeids: the tree changed
            if node is None and key is not None:
                node = self.restore_node(key)
            if node is None or (key is None and node.key is not None):
                stale += 1
                continue
            if node._bridge is not None and node._bridge is not self:
                raise ValueError(f"restore_node returned {node!r}, which belongs to another NodeFS")
            node._nodeid, node._lookups, node._bridge = nodeid, lookups, self
            self._nodes[nodeid] = node
            if key is not None:
                self._by_key.setdefault(key, node)
            self._check_class(type(node))
        self._next_nodeid = max(self._next_nodeid, int(b["next_nodeid"]), max(self._nodes) + 1)
        first = {id(n): nid for nid, n in initial.items()}
        stack, seen = [root], set()  # the rest of the persistent tree: its first nodeids, or new ones
        while stack:
            n = stack.pop()
            if id(n) in seen:
                continue
            seen.add(id(n))
            if self._nodes.get(n._nodeid) is not n:
                nid = first.get(id(n), 0)
                n._nodeid = nid if nid not in self._nodes else 0
                self._register(n, dedup=False)
            if n.children:
                stack.extend(reversed(n.children.values()))
        self._handles, self._fh_flags = {}, {}
        self._pending = {int(fh): (nodeid, flags) for fh, (nodeid, flags) in b["handles"].items()}
        self._dirs = {int(fh): _DirStream(self._nodes[nodeid]) for fh, nodeid in b["dirs"].items()
                      if nodeid in self._nodes}
        self._next_fh = max(self._next_fh, int(b["next_fh"]))
        self._outcomes = OrderedDict((int(rid), out) for rid, out in b["outcomes"][-OUTCOMES_KEPT:])
        if stale:
            log.warning("restore: %d nodes the kernel holds were not found: their nodeids are stale", stale)

    # -- notifications --------------------------------------------------------------------------

    async def _notify(self, what: str, coro: Any) -> None:
        try:
            await coro
        except NotNegotiated:
            raise
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise
            log.debug("%s: not cached", what)

    async def _notify_inode(self, node: Node, offset: int, length: int) -> None:
        from .. import notify

        if self._session is not None:
            await self._notify("inval_inode", notify.inval_inode(self._session, node._nodeid, offset, length))

    async def _notify_entry(self, parent: Node, name: bytes) -> None:
        from .. import notify

        if self._session is not None:
            await self._notify("inval_entry", notify.inval_entry(self._session, parent._nodeid, name))

    async def _notify_delete(self, parent: Node, name: bytes, child: Node) -> None:
        from .. import notify

        if self._session is not None:
            await self._notify("delete", notify.delete(self._session, parent._nodeid, child._nodeid, name))

    async def _notify_store(self, node: Node, offset: int, data: bytes) -> None:
        from .. import notify

        if self._session is not None:
            await self._notify("store", notify.store(self._session, node._nodeid, offset, data))
