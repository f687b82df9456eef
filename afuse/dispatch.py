"""Maps a decoded request to the filesystem's handler, and the handler's result to a reply.

:class:`Dispatcher` knows no file descriptors: :meth:`Dispatcher.handle` takes a request and
returns the bytes to write (or None when the request gets no reply). Errors raised by handlers
become error replies here; cancellation (interrupts, shutdown) is left to the caller.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

from .errors import FUSEError
from .operations import Operations, overridden
from .wire import replies
from .wire import requests as r
from .wire.constants import FOpen, InitFlag
from .wire.init import InitConfig
from .wire.types import Attr, DirEntry, Entry, FsStats, Handle, IoctlReply, Lock, Statx

if TYPE_CHECKING:
    from .passthrough import BackingTable

log = logging.getLogger("afuse")

Reply = bytes | None
_Fn = Callable[[Any], Awaitable[Reply]]

#: Handler errors the dispatcher reports with a traceback are kept for tests; this many at most.
MAX_KEPT_ERRORS = 100


class HandlerResultError(TypeError):
    """A handler returned something that cannot be encoded as the operation's reply."""


_BYTES = (bytes, bytearray, memoryview)


def _check(value: Any, cls: type | tuple[type, ...], what: str) -> None:
    """Raise HandlerResultError unless ``value`` is a ``cls``."""
    if not isinstance(value, cls) or isinstance(value, bool):
        want = cls.__name__ if isinstance(cls, type) else "bytes"
        raise HandlerResultError(f"{what} must return {want}, not {type(value).__name__}")


class Dispatcher:
    """Calls ``ops``'s handlers; one instance per session."""

    def __init__(self, ops: Operations) -> None:
        self.ops = ops
        self.entry_timeout = float(ops.entry_timeout)
        self.attr_timeout = float(ops.attr_timeout)
        #: Unexpected exceptions raised by handlers (newest last), for tests to re-raise.
        self.errors: list[BaseException] = []
        o = ops
        t: dict[type[r.Request], _Fn] = {
            r.LookupRequest: self._entry_op(o.lookup),
            r.GetattrRequest: self._attr_op(o.getattr),
            r.SetattrRequest: self._attr_op(o.setattr),
            r.ReadlinkRequest: self._data_op(o.readlink),
            r.SymlinkRequest: self._entry_op(o.symlink),
            r.MknodRequest: self._entry_op(o.mknod),
            r.MkdirRequest: self._entry_op(o.mkdir),
            r.UnlinkRequest: self._empty_op(o.unlink),
            r.RmdirRequest: self._empty_op(o.rmdir),
            r.RenameRequest: self._empty_op(o.rename),
            r.LinkRequest: self._entry_op(o.link),
            r.OpenRequest: self._open_op(o.open),
            r.ReadRequest: self._read,
            r.WriteRequest: self._write,
            r.StatfsRequest: self._statfs,
            r.ReleaseRequest: self._empty_op(o.release),
            r.FsyncRequest: self._empty_op(o.fsync),
            r.SetxattrRequest: self._empty_op(o.setxattr),
            r.GetxattrRequest: self._getxattr,
            r.ListxattrRequest: self._listxattr,
            r.RemovexattrRequest: self._empty_op(o.removexattr),
            r.FlushRequest: self._empty_op(o.flush),
            r.OpendirRequest: self._open_op(o.opendir),
            r.ReaddirRequest: self._readdir,
            r.ReaddirplusRequest: self._readdir,
            r.ReleasedirRequest: self._empty_op(o.releasedir),
            r.FsyncdirRequest: self._empty_op(o.fsyncdir),
            r.GetlkRequest: self._getlk,
            r.SetlkRequest: self._setlk,
            r.AccessRequest: self._empty_op(o.access),
            r.CreateRequest: self._create_op(o.create),
            r.TmpfileRequest: self._create_op(o.tmpfile),
            r.BmapRequest: self._u64_op(o.bmap),
            r.DestroyRequest: self._empty_op(o.destroy),
            r.IoctlRequest: self._ioctl,
            r.PollRequest: self._poll,
            r.FallocateRequest: self._empty_op(o.fallocate),
            r.LseekRequest: self._u64_op(o.lseek),
            r.CopyFileRangeRequest: self._copy_file_range,
            r.SyncfsRequest: self._empty_op(o.syncfs),
            r.StatxRequest: self._statx,
        }
        # Not overridden: answer ENOSYS without a call (or the documented default).
        names = {
            r.LookupRequest: "lookup", r.GetattrRequest: "getattr", r.SetattrRequest: "setattr",
            r.ReadlinkRequest: "readlink", r.SymlinkRequest: "symlink", r.MknodRequest: "mknod",
            r.MkdirRequest: "mkdir", r.UnlinkRequest: "unlink", r.RmdirRequest: "rmdir",
            r.RenameRequest: "rename", r.LinkRequest: "link", r.OpenRequest: "open",
            r.ReadRequest: "read", r.WriteRequest: "write", r.FsyncRequest: "fsync",
            r.SetxattrRequest: "setxattr", r.GetxattrRequest: "getxattr",
            r.ListxattrRequest: "listxattr", r.RemovexattrRequest: "removexattr",
            r.FlushRequest: "flush", r.OpendirRequest: "opendir", r.ReaddirRequest: "readdir",
            r.ReaddirplusRequest: "readdirplus", r.FsyncdirRequest: "fsyncdir",
            r.GetlkRequest: "getlk", r.AccessRequest: "access", r.CreateRequest: "create",
            r.TmpfileRequest: "tmpfile", r.BmapRequest: "bmap", r.IoctlRequest: "ioctl",
            r.PollRequest: "poll", r.FallocateRequest: "fallocate", r.LseekRequest: "lseek",
            r.CopyFileRangeRequest: "copy_file_range", r.SyncfsRequest: "syncfs",
            r.StatxRequest: "statx",
        }
        for cls, name in names.items():
            if not overridden(ops, name):
                t[cls] = _enosys
        self._table = t
        self._has_setlk = overridden(ops, "setlk")
        self._has_flock = overridden(ops, "flock")

    def register(self, cls: type[r.Request], fn: Callable[[Any], Awaitable[Reply]]) -> None:
        """Route requests of type ``cls`` to ``fn(req)``, which returns the reply bytes (or None).

        For protocol parts outside the :class:`Operations` API, such as the experimental
        :mod:`afuse.iomap`. Exceptions ``fn`` raises are answered as a handler's would be.
        """
        self._table[cls] = fn

    # -- negotiation ---------------------------------------------------------------------------

    def wanted_flags(self, config: InitConfig) -> InitFlag:
        """INIT flags to ask for: the config's, less those whose handlers are missing."""
        want = config.wanted_flags()
        if not (overridden(self.ops, "getlk") and self._has_setlk):
            want &= ~InitFlag.POSIX_LOCKS
        if not self._has_flock:
            want &= ~InitFlag.FLOCK_LOCKS
        if not overridden(self.ops, "readdirplus"):
            want &= ~(InitFlag.DO_READDIRPLUS | InitFlag.READDIRPLUS_AUTO)
        return InitFlag(want)

    # -- the entry point -----------------------------------------------------------------------

    async def handle(self, req: r.Request) -> Reply:
        """Run the handler for ``req``; return the reply bytes (None: no reply is due)."""
        try:
            return await self._table[type(req)](req)
        except FUSEError as e:
            return replies.error(req.unique, e.errno)
        except OSError as e:
            return replies.error(req.unique, e.errno if e.errno and 0 < e.errno < 512 else errno.EIO)
        except KeyError:
            if type(req) not in self._table:
                return replies.error(req.unique, errno.ENOSYS)
            return self._unexpected(req)
        except Exception:
            return self._unexpected(req)

    def _unexpected(self, req: r.Request) -> bytes:
        import sys

        exc = sys.exc_info()[1]
        assert exc is not None
        log.error("handler for %s (unique %d, nodeid %d) failed; answering EIO",
                  type(req).opcode.name, req.unique, req.nodeid, exc_info=exc)
        if len(self.errors) < MAX_KEPT_ERRORS:
            self.errors.append(exc)
        return replies.error(req.unique, errno.EIO)

    async def forget(self, req: r.ForgetRequest) -> None:
        """FORGET/BATCH_FORGET: call the handler; nothing is answered, errors are logged."""
        try:
            await self.ops.forget(req)
        except Exception as exc:
            log.error("forget handler failed (ignored: FORGET has no reply)", exc_info=exc)
            if len(self.errors) < MAX_KEPT_ERRORS:
                self.errors.append(exc)

    # -- reply shapes --------------------------------------------------------------------------

    def _entry_op(self, fn: Callable[[Any], Awaitable[Entry]]) -> _Fn:
        async def op(req: r.Request) -> Reply:
            e = await fn(req)
            if type(e) is not Entry:
                raise HandlerResultError(f"{fn.__name__} must return an Entry, not {type(e).__name__}")
            return replies.entry(req.unique, e, self.entry_timeout, self.attr_timeout)
        return op

    def _attr_op(self, fn: Callable[[Any], Awaitable[Any]]) -> _Fn:
        async def op(req: r.Request) -> Reply:
            a = await fn(req)
            _check(a, Attr, fn.__name__)
            return replies.attr(req.unique, a, self.attr_timeout)
        return op

    def _empty_op(self, fn: Callable[[Any], Awaitable[None]]) -> _Fn:
        async def op(req: r.Request) -> Reply:
            await fn(req)
            return replies.empty(req.unique)
        return op

    def _data_op(self, fn: Callable[[Any], Awaitable[bytes]]) -> _Fn:
        async def op(req: r.Request) -> Reply:
            res = await fn(req)
            _check(res, _BYTES, fn.__name__)
            return replies.data(req.unique, res)
        return op

    def _open_op(self, fn: Callable[[Any], Awaitable[Handle]]) -> _Fn:
        async def op(req: r.Request) -> Reply:
            h = await fn(req)
            if type(h) is not Handle:
                raise HandlerResultError(f"{fn.__name__} must return a Handle, not {type(h).__name__}")
            if int(h.flags) & _PASSTHROUGH or h.backing_id:
                _passthrough_refused(fn.__name__, h)
            return replies.open_(req.unique, h)
        return op

    def _create_op(self, fn: Callable[[Any], Awaitable[tuple[Entry, Handle]]]) -> _Fn:
        async def op(req: r.Request) -> Reply:
            res = await fn(req)
            try:
                e, h = res
            except (TypeError, ValueError):
                raise HandlerResultError(f"{fn.__name__} must return (Entry, Handle), not {res!r}") from None
            if type(e) is not Entry or type(h) is not Handle:
                raise HandlerResultError(f"{fn.__name__} must return (Entry, Handle), not {res!r}")
            if int(h.flags) & _PASSTHROUGH or h.backing_id:
                _passthrough_refused(fn.__name__, h)
            return replies.create(req.unique, e, h, self.entry_timeout, self.attr_timeout)
        return op

    # -- passthrough -----------------------------------------------------------------------------

    def enable_passthrough(self, table: BackingTable) -> None:
        """PASSTHROUGH was negotiated: open/create/tmpfile replies may carry ``table``'s backing ids.

        Replaces the OPEN, CREATE, TMPFILE and RELEASE entries (other requests are untouched):
        handlers run with :data:`afuse.passthrough.OPENING` set, replies are checked and claim
        their backing file, RELEASE drops the open file's reference (see :mod:`afuse.passthrough`).
        """
        from .passthrough import OPENING, _Opening, check_flags

        o = self.ops
        t = self._table

        async def run(fn: Callable[[Any], Awaitable[Any]], req: r.Request) -> Any:
            opening = _Opening()
            token = OPENING.set(opening)
            try:
                return await fn(req)
            finally:
                OPENING.reset(token)
                table.handler_done(req.unique, opening)

        def claim(what: str, req: r.Request, nodeid: int, h: Handle) -> None:
            if not int(h.flags) & _PASSTHROUGH:
                if h.backing_id:
                    raise HandlerResultError(f"{what} returned backing_id {h.backing_id} without FOpen.PASSTHROUGH")
                return
            why = check_flags(h.flags)
            if why is not None:
                raise HandlerResultError(f"{what}: {why}")
            try:
                table.claim(req.unique, nodeid, h.fh, h.backing_id)
            except KeyError:
                raise HandlerResultError(
                    f"{what} returned FOpen.PASSTHROUGH with backing_id {h.backing_id}, which is not an open "
                    "backing file of this session (use Session.open_backing())") from None

        def open_op(fn: Callable[[Any], Awaitable[Handle]]) -> _Fn:
            async def op(req: r.Request) -> Reply:
                h = await run(fn, req)
                if type(h) is not Handle:
                    raise HandlerResultError(f"{fn.__name__} must return a Handle, not {type(h).__name__}")
                reply = replies.open_(req.unique, h)
                claim(fn.__name__, req, req.nodeid, h)  # last: nothing may fail after it
                return reply
            return op

        def create_op(fn: Callable[[Any], Awaitable[tuple[Entry, Handle]]]) -> _Fn:
            async def op(req: r.Request) -> Reply:
                res = await run(fn, req)
                try:
                    e, h = res
                except (TypeError, ValueError):
                    raise HandlerResultError(f"{fn.__name__} must return (Entry, Handle), not {res!r}") from None
                if type(e) is not Entry or type(h) is not Handle:
                    raise HandlerResultError(f"{fn.__name__} must return (Entry, Handle), not {res!r}")
                reply = replies.create(req.unique, e, h, self.entry_timeout, self.attr_timeout)
                claim(fn.__name__, req, e.nodeid, h)  # last: nothing may fail after it
                return reply
            return op

        if t.get(r.OpenRequest) is not _enosys:
            t[r.OpenRequest] = open_op(o.open)
        if t.get(r.CreateRequest) is not _enosys:
            t[r.CreateRequest] = create_op(o.create)
        if t.get(r.TmpfileRequest) is not _enosys:
            t[r.TmpfileRequest] = create_op(o.tmpfile)
        release = t.get(r.ReleaseRequest, _enosys)

        async def release_op(req: r.ReleaseRequest) -> Reply:
            if table.held:
                table.released(req.nodeid, req.fh)
            return await release(req)

        t[r.ReleaseRequest] = release_op

    def _u64_op(self, fn: Callable[[Any], Awaitable[int]]) -> _Fn:
        async def op(req: r.Request) -> Reply:
            n = await fn(req)
            _check(n, int, fn.__name__)
            if not 0 <= n < 1 << 64:
                raise HandlerResultError(f"{fn.__name__} returned {n}, out of the u64 range")
            return replies.u64(req.unique, n)
        return op

    # -- operations with their own rules ---------------------------------------------------------

    async def _read(self, req: r.ReadRequest) -> Reply:
        buf = await self.ops.read(req)
        _check(buf, _BYTES, "read")
        if len(buf) > req.size:
            raise HandlerResultError(f"read returned {len(buf)} bytes for a request of {req.size}")
        return replies.data(req.unique, buf)

    async def _write(self, req: r.WriteRequest) -> Reply:
        n = await self.ops.write(req)
        if not isinstance(n, int) or not 0 <= n <= len(req.data):
            raise HandlerResultError(f"write must return a count from 0 to {len(req.data)}, not {n!r}")
        return replies.write(req.unique, n)

    async def _statfs(self, req: r.StatfsRequest) -> Reply:
        st = await self.ops.statfs(req)
        _check(st, FsStats, "statfs")
        return replies.statfs(req.unique, st)

    async def _getxattr(self, req: r.GetxattrRequest) -> Reply:
        value = await self.ops.getxattr(req)
        _check(value, _BYTES, "getxattr")
        if req.size == 0:
            return replies.xattr_size(req.unique, len(value))
        if len(value) > req.size:
            return replies.error(req.unique, errno.ERANGE)
        return replies.data(req.unique, value)

    async def _listxattr(self, req: r.ListxattrRequest) -> Reply:
        names = list(await self.ops.listxattr(req))
        for n in names:
            if not n or b"\0" in n:
                raise HandlerResultError(f"listxattr returned an invalid name {n!r}")
        body = replies.xattr_names(names)
        if req.size == 0:
            return replies.xattr_size(req.unique, len(body))
        if len(body) > req.size:
            return replies.error(req.unique, errno.ERANGE)
        return replies.data(req.unique, body)

    async def _readdir(self, req: r.ReaddirRequest) -> Reply:
        plus = type(req) is r.ReaddirplusRequest
        call: Any = self.ops.readdirplus(req) if plus else self.ops.readdir(req)  # type: ignore[arg-type]
        # ``async def readdir(...): yield ...`` is an async generator function: nothing to await.
        result = call if hasattr(call, "__aiter__") else await call
        buf = replies.DirBuffer(req.size, plus, self.entry_timeout, self.attr_timeout)
        if hasattr(result, "__aiter__"):
            agen: AsyncIterator[DirEntry] = result.__aiter__()
            try:
                async for d in agen:
                    if not self._add(buf, d, plus):
                        break
            finally:
                aclose = getattr(agen, "aclose", None)
                if aclose is not None:
                    await aclose()
        else:
            it: Iterator[DirEntry] = iter(result)
            try:
                for d in it:
                    if not self._add(buf, d, plus):
                        break
            finally:
                close = getattr(it, "close", None)
                if close is not None:
                    close()
        return buf.reply(req.unique)

    @staticmethod
    def _add(buf: replies.DirBuffer, d: DirEntry, plus: bool) -> bool:
        name = d.name
        if not isinstance(name, bytes) or not name or b"/" in name or b"\0" in name or len(name) > 4095:
            raise HandlerResultError(f"invalid directory entry name {name!r}")
        if d.offset <= 0:
            raise HandlerResultError(f"directory entry {name!r} has offset {d.offset}; offsets start at 1")
        if plus:
            if d.entry is None:
                raise HandlerResultError(f"readdirplus entry {name!r} has no entry")
            return buf.add_plus(name, d.offset, d.entry)
        a = d.entry.attr if d.entry is not None else d.attr
        if a is None:
            raise HandlerResultError(f"readdir entry {name!r} has neither attr nor entry")
        return buf.add(name, d.offset, a.ino, a.mode)

    async def _getlk(self, req: r.GetlkRequest) -> Reply:
        lock = await self.ops.getlk(req)
        _check(lock, Lock, "getlk")
        return replies.lk(req.unique, lock)

    async def _setlk(self, req: r.SetlkRequest) -> Reply:
        if req.is_flock:
            if not self._has_flock:
                return replies.error(req.unique, errno.ENOSYS)
            await self.ops.flock(req)
        else:
            if not self._has_setlk:
                return replies.error(req.unique, errno.ENOSYS)
            await self.ops.setlk(req)
        return replies.empty(req.unique)

    async def _ioctl(self, req: r.IoctlRequest) -> Reply:
        res = await self.ops.ioctl(req)
        _check(res, IoctlReply, "ioctl")
        if len(res.data) > req.out_size and res.in_iovs is None and res.out_iovs is None:
            raise HandlerResultError(f"ioctl returned {len(res.data)} bytes; the caller takes {req.out_size}")
        return replies.ioctl(req.unique, res)

    async def _poll(self, req: r.PollRequest) -> Reply:
        revents = await self.ops.poll(req)
        _check(revents, int, "poll")
        return replies.poll(req.unique, revents)

    async def _copy_file_range(self, req: r.CopyFileRangeRequest) -> Reply:
        n = await self.ops.copy_file_range(req)
        _check(n, int, "copy_file_range")
        if not 0 <= n <= req.length:
            raise HandlerResultError(f"copy_file_range returned {n} for a length of {req.length}")
        if req.wide:
            return replies.u64(req.unique, n)
        return replies.write(req.unique, min(n, 0xFFFFFFFF))

    async def _statx(self, req: r.StatxRequest) -> Reply:
        sx = await self.ops.statx(req)
        _check(sx, Statx, "statx")
        return replies.statx(req.unique, sx, self.attr_timeout)


_PASSTHROUGH = int(FOpen.PASSTHROUGH)


def _passthrough_refused(what: str, h: Handle) -> None:
    """A Handle with PASSTHROUGH (or a backing id) where passthrough is not negotiated."""
    if not int(h.flags) & _PASSTHROUGH:
        raise HandlerResultError(f"{what} returned backing_id {h.backing_id} without FOpen.PASSTHROUGH")
    if what == "opendir":
        raise HandlerResultError("opendir cannot answer FOpen.PASSTHROUGH (files only)")
    from .passthrough import check_flags

    why = check_flags(h.flags)
    raise HandlerResultError(f"{what}: {why}" if why else
                             f"{what} returned FOpen.PASSTHROUGH, but FUSE_PASSTHROUGH is not negotiated "
                             "(InitConfig(passthrough=True), and the kernel must offer it)")


async def _enosys(req: r.Request) -> Reply:
    return replies.error(req.unique, errno.ENOSYS)


def errno_name(code: int) -> str:
    """``ENOENT`` for 2, and so on."""
    return errno.errorcode.get(code, str(code)) if code else "OK"

