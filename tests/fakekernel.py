"""A fake kernel for fast dispatcher tests: requests go through the wire both ways, no /dev/fuse.

Each call builds a request, encodes it as the kernel would (:func:`afuse.wire.kernel.encode_request`),
decodes it with :class:`afuse.wire.decoder.Decoder` (checking the round trip), runs
``await dispatcher.handle(req)`` (whose sans-IO :class:`afuse.wire.connection.Connection` checks and
encodes the reply) and checks the reply's header; the reply body is then decoded
with the :mod:`afuse.wire.kernel` decoders.
"""

from __future__ import annotations

import errno as _errno
from collections.abc import Callable
from typing import Any, TypeVar

import attrs

from afuse.dispatch import Dispatcher
from afuse.operations import Operations
from afuse.splice import SplicedReply
from afuse.wire import kernel
from afuse.wire import requests as r
from afuse.wire.init import InitConfig

T = TypeVar("T")
R = TypeVar("R", bound=r.Request)


@attrs.define
class Reply:
    """One reply as the kernel received it."""

    error: int  # 0 or a negative errno
    unique: int
    body: bytes

    @property
    def errno(self) -> int:
        """The positive errno (0 for success)."""
        return -self.error

    def ok(self) -> bytes:
        """The body; fails the test if this is an error reply."""
        assert self.error == 0, f"expected success, got {_errno.errorcode.get(-self.error, self.error)}"
        return self.body


class FakeKernel:
    """Drives a :class:`Dispatcher` for ``ops`` the way the session would, minus the device."""

    def __init__(self, ops: Operations, *, setxattr_ext: bool = True, uid: int = 1000, gid: int = 1000,
                 pid: int = 4242) -> None:
        self.ops = ops
        self.dispatcher = Dispatcher(ops)
        self.connection = self.dispatcher.connection
        self.setxattr_ext = setxattr_ext
        self.decoder = self.connection.decoder
        self.decoder.setxattr_ext = setxattr_ext
        self.uid, self.gid, self.pid = uid, gid, pid
        self._unique = 0
        #: Every request handed to the dispatcher, decoded.
        self.sent: list[r.Request] = []

    def make(self, cls: type[R], nodeid: int = 1, **fields: Any) -> R:
        """A request of ``cls`` with a fresh unique and this kernel's caller ids."""
        self._unique += 2
        return cls(unique=self._unique, nodeid=nodeid, uid=self.uid, gid=self.gid, pid=self.pid, **fields)

    async def send(self, req: r.Request) -> Reply | None:
        """Put ``req`` through the wire and the dispatcher; None if no reply was produced."""
        raw = kernel.encode_request(req, self.setxattr_ext)
        decoded = self.decoder.decode(raw)
        assert decoded == req, (decoded, req)
        self.sent.append(decoded)
        out = await self.dispatcher.handle(decoded)
        if out is None:
            return None
        if isinstance(out, list):  # a large READ reply, written with one writev
            out = b"".join(out)
        elif isinstance(out, SplicedReply):  # a READ reply spliced from a file
            out = out.to_bytes()
        error, unique, body = kernel.split_reply(out)
        assert unique == req.unique, f"reply for unique {unique}, expected {req.unique}"
        return Reply(error, unique, body)

    async def call(self, cls: type[r.Request], nodeid: int = 1, **fields: Any) -> Reply:
        """Build, send and return the reply (which must exist)."""
        reply = await self.send(self.make(cls, nodeid, **fields))
        assert reply is not None
        return reply

    async def ok(self, decode: Callable[[bytes], T], cls: type[r.Request], nodeid: int = 1, **fields: Any) -> T:
        """Send a request that must succeed and decode its reply body with ``decode``."""
        return decode((await self.call(cls, nodeid, **fields)).ok())

    async def errno(self, cls: type[r.Request], nodeid: int = 1, **fields: Any) -> int:
        """Send a request and return the errno of its reply (0 for success)."""
        return (await self.call(cls, nodeid, **fields)).errno

    def wanted_flags(self, config: InitConfig | None = None) -> int:
        """The INIT flags the dispatcher would ask for."""
        return int(self.dispatcher.wanted_flags(config or InitConfig()))
