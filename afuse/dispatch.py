"""From a decoded request to the filesystem's handler, and from its result to the reply bytes.

:class:`Dispatcher` builds one route per request class from the opcode table
(:data:`afuse.wire.opcodes.OPCODES`): the :class:`~afuse.operations.Operations` method that
handles it (or ENOSYS without a call when the method is not overridden), and the reply shape
whose encoder checks the result (:mod:`afuse.wire.results`, through the sans-IO
:class:`~afuse.wire.connection.Connection`). It knows no file descriptors:
:meth:`Dispatcher.handle` takes a request and returns the bytes to write. Errors raised by
handlers become error replies here; cancellation (interrupts, shutdown) is left to the caller.
"""

from __future__ import annotations

import errno
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any

from .context import current_request_or_none
from .errors import FUSEError
from .operations import Operations, overridden
from .splice import FileRange, SplicedReply
from .wire import replies
from .wire import requests as r
from .wire.connection import Connection
from .wire.constants import FOpen, InitFlag, Opcode
from .wire.errors import HandlerResultError
from .wire.init import InitConfig
from .wire.opcodes import HANDLERS, OPCODES, OpSpec, Shape
from .wire.results import ENCODERS, Encoder
from .wire.types import DirSlice

if TYPE_CHECKING:
    from .passthrough import BackingTable

__all__ = ["MAX_KEPT_ERRORS", "Dispatcher", "HandlerResultError", "Reply", "check_operations", "errno_name"]

log = logging.getLogger("afuse")

#: What a route returns: the reply bytes, a large READ reply as buffers for one writev
#: (:func:`afuse.wire.replies.data_vector`), or None when no reply is due.
Reply = bytes | replies.Vector | SplicedReply | None
Route = Callable[[Any], Coroutine[Any, Any, Reply]]

#: Handler errors the dispatcher reports with a traceback are kept for tests; this many at most.
MAX_KEPT_ERRORS = 100

_PASSTHROUGH = int(FOpen.PASSTHROUGH)


def check_operations(ops: Operations) -> None:
    """Raise TypeError, naming the method, for a handler that cannot be awaited.

    Every handler must be an ``async def`` (``readdir``/``readdirplus``: also an async generator);
    a plain ``def`` would otherwise fail only at the first request.
    """
    for name in HANDLERS:
        if not overridden(ops, name):
            continue
        fn = getattr(ops, name)
        plain = inspect.isfunction(fn) or inspect.ismethod(fn)
        if not plain:
            continue  # a callable object, partial, mock...: trust it
        if inspect.iscoroutinefunction(fn) or (name in _LISTING and inspect.isasyncgenfunction(fn)):
            continue
        kind = "an async generator" if inspect.isasyncgenfunction(fn) else "a plain function (def)"
        want = "an async def or an async generator" if name in _LISTING else "an async def"
        raise TypeError(f"{type(ops).__name__}.{name} must be {want}, not {kind}")


_LISTING = frozenset({"readdir", "readdirplus"})


class Dispatcher:
    """Calls ``ops``'s handlers; one instance per session.

    ``connection`` is the session's :class:`~afuse.wire.connection.Connection` (a fresh one with
    ``ops``'s timeouts if omitted); ``backing`` its passthrough backing files, if any.
    """

    def __init__(self, ops: Operations, connection: Connection | None = None,
                 backing: BackingTable | None = None) -> None:
        check_operations(ops)
        self.ops = ops
        self.connection = connection or Connection(entry_timeout=ops.entry_timeout, attr_timeout=ops.attr_timeout)
        self.backing = backing
        #: Unexpected exceptions raised by handlers (newest last), for tests to re-raise.
        self.errors: list[BaseException] = []
        self._routes: dict[type[r.Request], Route] = {}
        for spec in OPCODES:
            if (spec.handler is not None and spec.replies and spec.reply is not Shape.CUSTOM
                    and spec.request not in self._routes):
                self._routes[spec.request] = self._route(spec)

    def implements(self, handler: str | None) -> bool:
        """True if the filesystem overrides ``handler`` (an :class:`Operations` method name)."""
        return handler is not None and overridden(self.ops, handler)

    def register(self, cls: type[r.Request], fn: Callable[[Any], Awaitable[Reply]]) -> None:
        """Route requests of type ``cls`` to ``fn(req)``, which returns the reply bytes (or None).

        For protocol parts outside the :class:`Operations` API, such as the experimental
        :mod:`afuse.iomap`. Exceptions ``fn`` raises are answered as a handler's would be.
        """
        failed = self._failed

        async def route(req: r.Request) -> Reply:
            try:
                return await fn(req)
            except Exception as e:
                return failed(req, e)
        self._routes[cls] = route

    # -- negotiation ---------------------------------------------------------------------------

    def wanted_flags(self, config: InitConfig) -> InitFlag:
        """INIT flags to ask for: the config's, less those needed only by missing handlers."""
        want = config.wanted_flags()
        for spec in OPCODES:
            if spec.needs and not self.implements(spec.handler):
                want &= ~spec.needs
            if spec.alt_needs and not self.implements(spec.alt_handler):
                want &= ~spec.alt_needs
        return InitFlag(want)

    # -- the entry point -----------------------------------------------------------------------

    async def handle(self, req: r.Request) -> Reply:
        """Run the handler for ``req``; return the reply bytes (None: no reply is due)."""
        return await self.call(req)

    def call(self, req: r.Request) -> Coroutine[Any, Any, Reply]:
        """The coroutine :meth:`handle` awaits, for a caller that drives it itself (one frame fewer)."""
        route = self._routes.get(type(req))
        if route is None:
            return _enosys(req)
        return route(req)

    def _failed(self, req: r.Request, exc: Exception) -> bytes:
        """The reply to ``req`` whose handler raised ``exc`` (every route's ``except``)."""
        if isinstance(exc, FUSEError):
            return replies.error(req.unique, exc.errno)
        if isinstance(exc, OSError):
            return replies.error(req.unique, exc.errno if exc.errno and 0 < exc.errno < 512 else errno.EIO)
        return self._unexpected(req, exc)

    def _unexpected(self, req: r.Request, exc: BaseException) -> bytes:
        log.error("handler for %s (unique %d, nodeid %d) failed; answering EIO",
                  type(req).opcode.name, req.unique, req.nodeid, exc_info=exc)
        self.keep(exc)
        return replies.error(req.unique, errno.EIO)

    def keep(self, exc: BaseException) -> None:
        """Remember an unexpected handler error (at most :data:`MAX_KEPT_ERRORS`)."""
        if len(self.errors) < MAX_KEPT_ERRORS:
            self.errors.append(exc)

    async def forget(self, req: r.ForgetRequest) -> None:
        """FORGET/BATCH_FORGET: call the handler; nothing is answered, errors are logged."""
        try:
            await self.ops.forget(req)
        except Exception as exc:
            log.error("forget handler failed (ignored: FORGET has no reply)", exc_info=exc)
            self.keep(exc)

    # -- routes, one per request class, from the table -------------------------------------------

    def _route(self, spec: OpSpec) -> Route:
        if spec.alt_handler is not None:
            return self._lock_route(spec)
        if not spec.defaulted and not self.implements(spec.handler):
            return _enosys
        assert spec.handler is not None
        fn: Callable[[Any], Awaitable[Any]] = getattr(self.ops, spec.handler)
        if spec.reply is Shape.DIRENTS:
            return self._readdir_route(fn, spec.handler)
        if spec.backing:
            return self._opening_route(spec, fn)
        encode = ENCODERS[spec.reply]
        conn = self.connection
        name = spec.handler
        if spec.opcode == Opcode.RELEASE:
            return self._release_route(fn, encode, name)
        if spec.opcode == Opcode.READ:
            return self._read_route(fn, encode, name)
        failed = self._failed

        async def route(req: r.Request) -> Reply:
            try:
                return encode(conn, req, await fn(req), name)
            except Exception as e:
                return failed(req, e)
        return route

    def _read_route(self, fn: Callable[[Any], Awaitable[Any]], encode: Encoder, name: str) -> Route:
        """READ: a large result is answered as ``[header, data]`` (one writev, no copy), a list of
        buffers as ``[header, *buffers]``; a :class:`~afuse.splice.FileRange` is spliced from its
        file by the session."""
        conn = self.connection
        vector_min = replies.VECTOR_MIN
        failed = self._failed

        async def route(req: r.ReadRequest) -> Reply:
            try:
                buf = await fn(req)
                cls = type(buf)
                if cls is FileRange:
                    if not 0 <= buf.size <= req.size or buf.offset < 0:
                        raise HandlerResultError(f"{name} returned {buf!r} for a request of {req.size} bytes")
                    return SplicedReply(req.unique, buf)
                if cls is bytes or cls is bytearray:
                    size = len(buf)
                elif cls is memoryview and buf.c_contiguous:
                    size = buf.nbytes
                elif cls is list:
                    return _scattered(req, buf, name)
                else:
                    size = 0
                if vector_min <= size <= req.size:
                    return replies.data_vector(req.unique, buf, size)
                return encode(conn, req, buf, name)  # checked (and a clear error for a bad result)
            except Exception as e:
                return failed(req, e)
        return route

    def _lock_route(self, spec: OpSpec) -> Route:
        """SETLK/SETLKW: POSIX locks to ``setlk``, BSD (flock) locks to ``flock``."""
        posix = getattr(self.ops, spec.handler or "") if self.implements(spec.handler) else None
        bsd = getattr(self.ops, spec.alt_handler or "") if self.implements(spec.alt_handler) else None

        failed = self._failed

        async def route(req: r.SetlkRequest) -> Reply:
            fn = bsd if req.is_flock else posix
            if fn is None:
                return replies.error(req.unique, errno.ENOSYS)
            try:
                await fn(req)
            except Exception as e:
                return failed(req, e)
            return replies.empty(req.unique)
        return route

    def _opening_route(self, spec: OpSpec, fn: Callable[[Any], Awaitable[Any]]) -> Route:
        """OPEN/CREATE/TMPFILE: the reply may open the file in passthrough mode."""
        encode = ENCODERS[spec.reply]
        conn = self.connection
        name = spec.handler or spec.name
        create = spec.reply is Shape.CREATE
        failed = self._failed

        async def route(req: r.Request) -> Reply:
            try:
                res = await fn(req)
                reply = encode(conn, req, res, name)
                h = res[1] if create else res
                if int(h.flags) & _PASSTHROUGH:  # checked against the negotiation by encode()
                    ctx = current_request_or_none()
                    if self.backing is None or ctx is None:
                        raise HandlerResultError(f"{name} returned FOpen.PASSTHROUGH outside a serving session")
                    # Last: nothing may fail after the claim.
                    ctx.after_reply(self.backing.claim(res[0].nodeid if create else req.nodeid, h, name))
            except Exception as e:
                return failed(req, e)
            return reply
        return route

    def _release_route(self, fn: Callable[[Any], Awaitable[Any]], encode: Encoder, name: str) -> Route:
        """RELEASE: a passthrough file's own backing reference goes with it."""
        conn = self.connection
        failed = self._failed

        async def route(req: r.ReleaseRequest) -> Reply:
            try:
                backing = self.backing
                if backing is not None and backing.held:
                    backing.released(req.nodeid, req.fh)
                return encode(conn, req, await fn(req), name)
            except Exception as e:
                return failed(req, e)
        return route

    def _readdir_route(self, fn: Callable[[Any], Any], name: str) -> Route:
        conn = self.connection
        failed = self._failed

        async def route(req: r.ReaddirRequest) -> Reply:
            try:
                return await listing(req)
            except Exception as e:
                return failed(req, e)

        async def listing(req: r.ReaddirRequest) -> Reply:
            call = fn(req)
            # ``async def readdir(...): yield ...`` is an async generator function: nothing to await.
            result = call if hasattr(call, "__aiter__") else await call
            out = conn.dir_writer(req, name)
            if type(result) is DirSlice:
                out.add_slice(result)
            elif hasattr(result, "__aiter__"):
                agen: AsyncIterator[Any] = result.__aiter__()
                try:
                    async for d in agen:
                        if not out.add(d):
                            break
                finally:
                    aclose = getattr(agen, "aclose", None)
                    if aclose is not None:
                        await aclose()
            else:
                try:
                    it: Iterator[Any] = iter(result)
                except TypeError:
                    raise HandlerResultError(f"{name} must return or yield DirEntry items, "
                                             f"not {type(result).__name__}") from None
                try:
                    for d in it:
                        if not out.add(d):
                            break
                finally:
                    close = getattr(it, "close", None)
                    if close is not None:
                        close()
            return out.reply(req.unique)
        return route


def _scattered(req: r.ReadRequest, parts: list[Any], name: str) -> replies.Vector:
    """A READ answered with a list of buffers: written in order with one writev (no join)."""
    size = 0
    for p in parts:
        if type(p) is memoryview:
            if not p.c_contiguous:
                raise HandlerResultError(f"{name} returned a non-contiguous memoryview in its list")
            size += p.nbytes
        elif type(p) is bytes or type(p) is bytearray:
            size += len(p)
        else:
            raise HandlerResultError(f"{name} returned a list holding {type(p).__name__}, not bytes")
    if size > req.size:
        raise HandlerResultError(f"{name} returned {size} bytes for a request of {req.size}")
    return [replies.data_header(req.unique, size), *parts]


async def _enosys(req: r.Request) -> Reply:
    return replies.error(req.unique, errno.ENOSYS)


def errno_name(code: int) -> str:
    """``ENOENT`` for 2, and so on."""
    return errno.errorcode.get(code, str(code)) if code else "OK"
