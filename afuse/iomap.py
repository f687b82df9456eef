"""EXPERIMENTAL, UNMERGED: serving the proposed FUSE iomap operations.

The FUSE iomap series (see :mod:`afuse.wire.iomap`) is not in any released kernel; nothing here
can be exercised against a real mount today. It exists so that a filesystem can be written and
tested (byte for byte, without a kernel) against the proposed protocol, and its numbers may
change when the series is merged.

Use::

    class MyFS(afuse.Operations, IomapOperations):
        async def iomap_begin(self, req: IomapBeginRequest) -> IomapBeginReply: ...
        async def iomap_end(self, req: IomapEndRequest) -> None: ...

    session = await nursery.start(afuse.serve, fs, mnt)
    install(session.dispatcher)

:func:`install` registers the request decoders on the dispatcher's connection
(:func:`afuse.wire.iomap.enable`) and routes
IOMAP_BEGIN/IOMAP_END to the handlers through :meth:`afuse.Dispatcher.register`. Errors follow
the usual handler contract (``FUSEError`` answers its errno, anything else EIO).
"""

from __future__ import annotations

import errno

from .dispatch import Dispatcher, HandlerResultError, Reply
from .errors import FUSEError
from .wire import iomap as wire
from .wire import replies
from .wire.iomap import (
    IomapBeginReply,
    IomapBeginRequest,
    IomapEndRequest,
    IomapFlag,
    IomapMapping,
    IomapOp,
    IomapType,
)

__all__ = [
    "IomapBeginReply", "IomapBeginRequest", "IomapEndRequest", "IomapFlag", "IomapMapping",
    "IomapOp", "IomapOperations", "IomapType", "install",
]


class IomapOperations:
    """Mixin with the iomap handlers; both answer ENOSYS unless overridden."""

    async def iomap_begin(self, req: IomapBeginRequest) -> IomapBeginReply:
        """Map ``req.count`` bytes at ``req.pos``: the read mapping and, for writes, the write one.

        Set ``IomapFlag.WANT_IOMAP_END`` in a mapping's flags to be sent IOMAP_END for it.
        """
        raise FUSEError(errno.ENOSYS)

    async def iomap_end(self, req: IomapEndRequest) -> None:
        """The kernel finished with ``req.map``; ``req.written`` bytes were written through it."""
        raise FUSEError(errno.ENOSYS)


def install(dispatcher: Dispatcher) -> None:
    """Decode IOMAP_BEGIN/IOMAP_END and route them to ``dispatcher.ops``'s handlers.

    Raises TypeError if the filesystem is not an :class:`IomapOperations`.
    """
    ops = dispatcher.ops
    if not isinstance(ops, IomapOperations):
        raise TypeError(f"{type(ops).__name__} does not implement IomapOperations")
    wire.enable(dispatcher.connection)

    async def begin(req: IomapBeginRequest) -> Reply:
        res = await ops.iomap_begin(req)
        if type(res) is not IomapBeginReply:
            raise HandlerResultError(f"iomap_begin must return an IomapBeginReply, not {type(res).__name__}")
        return wire.encode_begin_reply(req.unique, res)

    async def end(req: IomapEndRequest) -> Reply:
        await ops.iomap_end(req)
        return replies.empty(req.unique)

    dispatcher.register(IomapBeginRequest, begin)
    dispatcher.register(IomapEndRequest, end)

