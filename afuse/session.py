"""The FUSE session: a mounted connection's life cycle, and one request's way through it.

A :class:`Session` owns the connection's protocol state (:class:`~afuse.wire.connection.Connection`),
its :class:`~afuse.dispatch.Dispatcher` and its :class:`~afuse.readers.ReaderPool`. For each
request a reader has read, :meth:`Session._serve` decodes it, gives it a
:class:`~afuse.context.RequestContext`, lets the pool drive the dispatcher's coroutine, writes
the reply to the descriptor the request came from (in one write) and settles what the request
held. :func:`serve` and :func:`mount` run a session from mounting to unmounting.
"""

from __future__ import annotations

import contextvars
import errno
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from . import device, uring
from .context import _CURRENT as _REQUEST
from .context import RequestContext, current_request_or_none
from .device import Mount, MountOptions
from .dispatch import Dispatcher, Reply, check_operations
from .errors import MountError, NotNegotiated, SessionError
from .operations import Mountable, Operations, as_operations
from .passthrough import BackingFile, BackingTable
from .readers import END_ERRNOS, ReaderPool, read_one
from .splice import SplicedReply, SplicePipe
from .uring import IoUring, Uring
from .wire import replies
from .wire import requests as r
from .wire.connection import Connection
from .wire.constants import InitFlag
from .wire.decoder import Decoder
from .wire.describe import describe_notification, describe_reply, describe_request, flag_names
from .wire.init import InitConfig, Negotiated
from .wire.opcodes import BY_OPCODE, NO_REPLY
from .wire.requests import ProtocolError, UnknownOpcode

__all__ = ["NotNegotiated", "Session", "Takeover", "current_session", "mount", "serve"]

log = logging.getLogger("afuse")

_CURRENT: contextvars.ContextVar[Session] = contextvars.ContextVar("afuse_session")


def current_session() -> Session:
    """The :class:`Session` serving the calling handler.

    Set by :func:`serve` (and so :func:`mount`) for ``Operations.init`` and every handler, and
    inherited by tasks and threads they start. Raises :class:`SessionError` elsewhere.
    """
    try:
        return _CURRENT.get()
    except LookupError:
        raise SessionError("no afuse session is being served in this context") from None


class Session:
    """A mounted, negotiated FUSE connection being served.

    Obtained from :func:`mount` or ``await nursery.start(serve, ...)``. Its life cycle, as
    :func:`serve` drives it: :meth:`start` (INIT, or adopting a taken-over connection),
    :meth:`run` (the reader pool serves requests), :meth:`shutdown` (unmount, let the readers
    finish), :meth:`close` (release the descriptors).
    """

    def __init__(self, ops: Operations, mnt: Mount, config: InitConfig, readers: int,
                 max_requests: int, private_clones: bool = True) -> None:
        self.ops = ops
        self.mount = mnt
        self.config = config
        #: The protocol state (sans-IO): negotiation, decoding, reply encoding.
        self.connection = Connection(config, entry_timeout=ops.entry_timeout, attr_timeout=ops.attr_timeout)
        #: Backing files for passthrough (set once FUSE_PASSTHROUGH is negotiated).
        self.backing: BackingTable | None = None
        self.dispatcher = Dispatcher(ops, self.connection)
        self.pool = ReaderPool(mnt.fd if mnt is not None else -1, readers, max_requests, private_clones)
        self._decode = self.connection.decoder.decode  # the hot path's bound methods
        self._handle = self.dispatcher.call
        self._retrieve_waiters: dict[int, trio.MemorySendChannel[r.NotifyReplyRequest]] = {}
        self._workers_scope = trio.CancelScope(shield=True)
        #: Requests served so far (for tests and statistics).
        self.served = 0
        self._splice_pipe: SplicePipe | None = None
        #: Seconds a handler may stay blocked before a warning names its request (None: never).
        self.warn_after: float | None = 10.0
        #: The io_uring transport hook (:mod:`afuse.uring`): set by :func:`serve` for
        #: ``io_uring=True``/``"auto"``, None when requests come through /dev/fuse only.
        self.uring: Uring | None = None
        self.io_uring: IoUring = False

    # -- public ----------------------------------------------------------------------------

    @property
    def mountpoint(self) -> str:
        """Where the filesystem is mounted."""
        return self.mount.mountpoint

    @property
    def fd(self) -> int:
        """The session's /dev/fuse descriptor (notifications are written here)."""
        return self.mount.fd

    @property
    def negotiated(self) -> Negotiated | None:
        """The outcome of INIT (None before it)."""
        return self.connection.negotiated

    @negotiated.setter
    def negotiated(self, neg: Negotiated | None) -> None:
        self.connection.negotiated = neg

    @property
    def decoder(self) -> Decoder:
        """The connection's request decoder."""
        return self.connection.decoder

    @property
    def readers(self) -> int:
        """Descriptors that always wait for requests."""
        return self.pool.readers

    @property
    def max_requests(self) -> int:
        """Requests served at once, at most."""
        return self.pool.max_requests

    @property
    def reader_fds(self) -> list[int]:
        """Descriptors of the permanent readers: the session fd first, then its clones."""
        return self.pool.reader_fds

    @property
    def private_clones(self) -> bool:
        """Whether readers beyond the permanent ones get private cloned descriptors."""
        return self.pool.private_clones

    @property
    def errors(self) -> list[BaseException]:
        """Unexpected exceptions raised by handlers (each was answered EIO and logged)."""
        return self.dispatcher.errors

    def has(self, flag: InitFlag) -> bool:
        """True if ``flag`` was negotiated at INIT."""
        return self.connection.has(flag)

    async def wait_closed(self) -> None:
        """Wait until serving has ended (unmounted from outside, aborted, or shut down)."""
        await self.pool.ended.wait()

    @property
    def closed(self) -> bool:
        """True once serving has ended."""
        return self.pool.ended.is_set()

    def write_notification(self, message: bytes) -> int:
        """Write an encoded notification now, from a thread other than the serving loop's
        (from the loop use :meth:`notify`); OSError (e.g. ENOENT) as the kernel answers."""
        if self.closed:
            raise SessionError("the session is closed")
        if log.isEnabledFor(logging.DEBUG):
            log.debug("notify %s", describe_notification(message))
        return os.write(self.mount.fd, message)

    async def notify(self, message: bytes) -> int:
        """Write an encoded notification from a worker thread (see :mod:`afuse.notify`)."""
        if self.closed:
            raise SessionError("the session is closed")
        if log.isEnabledFor(logging.DEBUG):
            log.debug("notify %s", describe_notification(message))
        return await trio.to_thread.run_sync(os.write, self.mount.fd, message)

    def require(self, flag: InitFlag, what: str) -> None:
        """Raise :class:`NotNegotiated` unless ``flag`` was negotiated."""
        self.connection.require(flag, what)

    def open_backing(self, fd: int) -> BackingFile:
        """Register open regular file ``fd`` as a passthrough backing file (BACKING_OPEN).

        Answer an open with ``Handle(fh, FOpen.PASSTHROUGH, backing_id=bf.id)``. Called in an
        open/create/tmpfile handler the reference is that request's (dropped once its reply is
        written; the open file keeps its own until RELEASE); elsewhere it is the caller's to
        :meth:`~afuse.passthrough.BackingFile.release`. See :mod:`afuse.passthrough`.
        Raises :class:`NotNegotiated` without FUSE_PASSTHROUGH, OSError as the kernel answers
        (EPERM without CAP_SYS_ADMIN in the initial user namespace, EINVAL for a file that is not
        regular, ELOOP if the file's filesystem is stacked too deep for ``max_stack_depth``).
        """
        self.require(InitFlag.PASSTHROUGH, "open_backing()")
        assert self.backing is not None
        bf = self.backing.open(fd)
        ctx = current_request_or_none()
        if ctx is not None and ctx.handling and ctx.connection is self.connection:
            spec = BY_OPCODE.get(ctx.request.opcode)
            if spec is not None and spec.backing:  # the reference is the request's
                ctx.after_reply(lambda written: bf.release())
        return bf

    def expect_notify_reply(self, notify_unique: int) -> trio.MemoryReceiveChannel[r.NotifyReplyRequest]:
        """A channel that receives the kernel's NOTIFY_REPLY for ``notify_unique``."""
        send, recv = trio.open_memory_channel[r.NotifyReplyRequest](1)
        self._retrieve_waiters[notify_unique] = send
        return recv

    def forget_notify_reply(self, notify_unique: int) -> None:
        """Stop waiting for the NOTIFY_REPLY of ``notify_unique``."""
        self._retrieve_waiters.pop(notify_unique, None)

    async def drain(self) -> None:
        """Stop reading requests, let those in flight finish and answer, then end serving.

        The mount stays: another daemon holding the descriptor (see :mod:`afuse.failover`)
        serves on with nothing to replay.
        """
        if self.closed:
            return
        await self.pool.drain()

    @property
    def in_flight(self) -> int:
        """Requests whose handlers are blocked right now."""
        return len(self.pool.inflight)

    # -- life cycle --------------------------------------------------------------------------

    async def start(self, takeover: Takeover | None = None) -> None:
        """Make the connection ready to serve: INIT (or adopt ``takeover``'s), then the readers' descriptors."""
        device.set_nonblocking(self.mount.fd)
        if takeover is None:
            with trio.fail_after(30):
                await self._handshake()
        else:
            self.adopt(takeover.negotiated)
        if self.uring is not None:
            self._start_uring()
        self.pool.open(None if takeover is None else list(takeover.clones))

    def _start_uring(self) -> None:
        """The io_uring hook: register the ring's entries, or fall back to /dev/fuse."""
        assert self.uring is not None and self.negotiated is not None
        try:
            if uring.negotiated_or_raise(self.negotiated, self.io_uring):
                self.uring.register(self, self.negotiated)
                return
        except uring.UringUnavailable as e:
            if self.io_uring is True:
                raise
            log.warning("io_uring=auto: %s; serving over /dev/fuse", e)
        self.uring.close()
        self.uring = None

    @property
    def transport(self) -> str:
        """``"io_uring"`` if requests come through the ring, else ``"/dev/fuse"``."""
        return "io_uring" if self.uring is not None else "/dev/fuse"

    async def _handshake(self) -> None:
        fd = self.mount.fd
        buf = bytearray(1 << 16)
        wanted = self.dispatcher.wanted_flags(self.config)
        if self.uring is not None:
            wanted |= InitFlag.OVER_IO_URING
        while True:
            n = await read_one(fd, buf)
            if n is None:
                raise SessionError("the connection closed before INIT")
            try:
                step = self.connection.init(memoryview(buf)[:n], wanted)
            except ProtocolError as e:
                raise SessionError(f"bad first request from the kernel: {e}") from e
            os.write(fd, step.reply)
            if step.error is not None:
                raise SessionError(step.error)
            if step.negotiated is not None:
                break
        neg = step.negotiated
        if neg.refused:
            log.info("kernel did not offer: %s", flag_names(neg.refused))
        if log.isEnabledFor(logging.DEBUG):
            log.debug("INIT: kernel %d.%d offered %s", neg.kernel_major, neg.kernel_minor, flag_names(neg.offered))
            log.debug("INIT: negotiated 7.%d, flags %s, max_write %d, max_pages %d, max_readahead %d, "
                      "time_gran %d", neg.minor, flag_names(neg.flags), neg.max_write, neg.max_pages,
                      neg.max_readahead, neg.time_gran)
        self.adopt(neg)
        self._raise_read_ahead(neg)

    def _raise_read_ahead(self, neg: Negotiated) -> None:
        """Widen the mount's readahead to ``InitConfig.max_readahead`` where INIT could only lower it."""
        want = self.config.max_readahead
        if neg.max_readahead >= want:
            return
        try:
            now = device.raise_read_ahead(self.mount.connection_id(), want // 1024)
        except (OSError, ValueError, MountError) as e:
            log.debug("readahead stays at %d KiB: %s", neg.max_readahead // 1024, e)
        else:
            log.debug("readahead raised to %d KiB", now)

    def adopt(self, neg: Negotiated) -> None:
        """Serve with ``neg``: just negotiated, or taken over from an earlier daemon."""
        self.connection.adopt(neg)
        self.pool.bufsize = neg.read_buffer_size
        if neg.has(InitFlag.PASSTHROUGH) and self.backing is None:
            self.backing = self.dispatcher.backing = BackingTable(self.mount.fd)
        self.ops.init(neg)

    @trio.lowlevel.enable_ki_protection  # Ctrl-C reaches the user's task, never this bookkeeping
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve requests with the reader pool until the connection ends or :meth:`stop_readers`."""
        async with trio.open_nursery() as nursery:
            if self.warn_after is not None:
                nursery.start_soon(self._watch_slow_requests, self.warn_after)
            if self.uring is not None:
                nursery.start_soon(self.uring.run, self)
            task_status.started()
            await self.pool.run(self._serve, self._workers_scope)
            nursery.cancel_scope.cancel()

    def stop_readers(self) -> None:
        """Cancel the readers (and the handlers they run)."""
        self._workers_scope.cancel()
        if self.uring is not None:
            self.uring.stop()

    async def shutdown(self, grace: float = 5.0) -> None:
        """Unmount (if still mounted) while the readers keep serving; wait up to ``grace``
        seconds for them to see the connection end."""
        if not self.closed:
            try:
                await trio.to_thread.run_sync(self.unmount)
            except Exception as e:  # pragma: no cover - logged, the fds are closed anyway
                log.error("unmounting %s failed: %s", self.mountpoint, e)
            with trio.move_on_after(grace):
                await self.wait_closed()

    def unmount(self) -> None:
        """Unmount now (lazily if busy); blocking: call from a thread."""
        try:
            self.mount.unmount()
        except MountError as e:
            if e.errno == errno.EBUSY:
                log.warning("%s is busy; detaching it lazily", self.mountpoint)
                self.mount.unmount(lazy=True)
            else:
                raise

    def close(self) -> None:
        """Release the connection's descriptors and backing files; serving has ended."""
        self.pool.notify_closing()
        self.pool.close()
        if self.uring is not None:  # the ring before /dev/fuse: its commands hold the device
            if self.uring.fd >= 0:
                trio.lowlevel.notify_closing(self.uring.fd)
            self.uring.close()
        if self.backing is not None:
            self.backing.end()
        if self._splice_pipe is not None:
            self._splice_pipe.close()
            self._splice_pipe = None
        self.mount.close()
        self.pool.ended.set()

    # -- one request -------------------------------------------------------------------------

    async def _serve(self, fd: int, data: memoryview, wscope: trio.CancelScope) -> bool:
        """Serve one request read from ``fd``; True if its handler blocked."""
        try:
            req = self._decode(data)
        except UnknownOpcode as e:
            log.warning("%s; answering ENOSYS", e)
            _write(fd, replies.error(e.unique, errno.ENOSYS), e.unique)
            return False
        except ProtocolError as e:
            log.error("malformed request from the kernel: %s", e)
            if e.unique and e.opcode not in NO_REPLY:
                _write(fd, replies.error(e.unique, errno.EIO), e.unique)
            return False
        debug = _debugging(_DEBUG)
        if debug:
            log.debug("-> %s", describe_request(req))
        cls = type(req)
        if cls in _NOT_ANSWERED:
            return await self._unanswered(req, wscope)
        unique = req.unique
        t0 = time.perf_counter() if debug else 0.0
        ctx = RequestContext(self.connection, req, fd, wscope)  # handling, until the handler is done
        _set_request(ctx)
        pool = self.pool
        if pool.early_interrupts and pool.interrupted_early(unique):
            reply: Reply = replies.error(unique, errno.EINTR)
            blocked = False
        else:
            coro = self._handle(req)
            try:
                # pool.drive(coro, ...) without its frame: a handler that does not block ends here.
                try:
                    msg = coro.send(None)
                except StopIteration as e:
                    reply, blocked = e.value, False
                else:
                    reply, blocked = await pool.resume(coro, msg, unique, wscope, req), True
            finally:
                ctx.handling = False
        self.served += 1
        if reply is None:
            written = False
        elif type(reply) is bytes:  # the common case, written inline
            try:
                _os_write(fd, reply)
                written = True
            except OSError as e:
                written = _write_failed(e, reply, unique)
        elif isinstance(reply, SplicedReply):
            written = self._write_spliced(fd, reply)
        else:
            written = _write(fd, reply, unique)
        if ctx.callbacks is not None:
            ctx.finish(written)
        if debug:
            log.debug("<- %s unique=%d: %s in %.1f us%s", cls.opcode.name, unique, describe_reply(reply),
                      (time.perf_counter() - t0) * 1e6, "" if written or reply is None else " (not delivered)")
        return blocked

    async def _unanswered(self, req: r.Request, wscope: trio.CancelScope) -> bool:
        """FORGET, INTERRUPT, NOTIFY_REPLY: served here, never answered; True if a forget blocked."""
        cls = type(req)
        if cls is r.ForgetRequest:
            return (await self.pool.drive(self.dispatcher.forget(req), None, wscope))[1]  # type: ignore[arg-type]
        if cls is r.InterruptRequest:
            self.pool.interrupt(req.target)  # type: ignore[attr-defined]
        else:
            self._notify_reply(req)  # type: ignore[arg-type]
        return False

    def _write_spliced(self, fd: int, reply: SplicedReply) -> bool:
        """Write a READ reply spliced from its file (pread if no pipe can be had)."""
        pipe = self._splice_pipe
        if pipe is None:
            try:
                neg = self.connection.negotiated
                pipe = self._splice_pipe = SplicePipe(neg.max_write if neg is not None else 1 << 20)
            except OSError as e:
                log.debug("no pipe for spliced replies (%s): reading them with pread", e)
                try:
                    message = reply.to_bytes()
                except OSError as err:
                    message = replies.error(reply.unique, err.errno or errno.EIO)
                return _write(fd, message, reply.unique)
        try:
            pipe.write(fd, reply)
            return True
        except OSError as e:
            if e.errno not in (errno.ENOENT, *END_ERRNOS):
                log.error("kernel rejected the spliced reply to unique %d: %s", reply.unique, e)
            return False

    async def _watch_slow_requests(self, after: float) -> None:
        """Warn once about each request whose handler has been blocked longer than ``after`` seconds."""
        warned: set[int] = set()
        while True:
            await trio.sleep(min(after / 2, 1.0))
            now = trio.current_time()
            blocked = self.pool.blocked
            warned &= blocked.keys()
            for unique, (since, req) in list(blocked.items()):
                if unique not in warned and now - since >= after:
                    warned.add(unique)
                    what = describe_request(req) if isinstance(req, r.Request) else f"unique={unique}"
                    log.warning("still unanswered after %.1f s: %s", now - since, what)

    def _notify_reply(self, req: r.NotifyReplyRequest) -> None:
        send = self._retrieve_waiters.pop(req.unique, None)
        if send is None:
            log.warning("NOTIFY_REPLY for unknown retrieve %d ignored", req.unique)
            return
        try:
            send.send_nowait(req)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        send.close()


_set_request = _REQUEST.set
_debugging = log.isEnabledFor
_DEBUG = logging.DEBUG
#: Requests the session serves itself, without a reply (see :meth:`Session._unanswered`).
_NOT_ANSWERED = frozenset({r.ForgetRequest, r.InterruptRequest, r.NotifyReplyRequest})


_os_write = os.write


def _write(fd: int, data: bytes | replies.Vector, unique: int) -> bool:
    """Write one reply (a list of buffers with one writev); False if the kernel did not take it."""
    try:
        if type(data) is list:
            os.writev(fd, data)
        else:
            _os_write(fd, data)  # type: ignore[arg-type]
        return True
    except OSError as e:
        return _write_failed(e, data, unique)


def _write_failed(e: OSError, data: bytes | replies.Vector, unique: int) -> bool:
    """Log why the reply to ``unique`` was not taken; False."""
    if e.errno == errno.ENOENT:  # interrupted/aborted/resent meanwhile: nobody waits
        log.debug("reply to unique %d: nobody waits (ENOENT)", unique)
    elif e.errno in END_ERRNOS:
        log.debug("reply to unique %d after the connection ended", unique)
    else:
        size = sum(memoryview(b).nbytes for b in data) if type(data) is list else len(data)
        log.error("kernel rejected the reply to unique %d (%d bytes): %s", unique, size, e)
    return False


@attrs.define
class Takeover:
    """A live, negotiated /dev/fuse descriptor to serve instead of mounting anew."""

    fd: int
    negotiated: Negotiated
    #: Further descriptors of the same connection (clones) to read from.
    clones: list[int] = attrs.field(factory=list)
    #: Send FUSE_NOTIFY_RESEND once serving, so requests a dead daemon had read come again.
    resend: bool = True


@trio.lowlevel.enable_ki_protection  # Ctrl-C reaches the user's task (or, run alone, its next wait)
async def serve(
    ops: Operations | Mountable,
    mountpoint: str | os.PathLike[str],
    *,
    options: MountOptions | str | None = None,
    config: InitConfig | None = None,
    readers: int = 2,
    max_requests: int = 64,
    takeover: Takeover | None = None,
    unmount: bool = True,
    private_clones: bool = True,
    shutdown_grace: float = 5.0,
    warn_after: float | None = 10.0,
    io_uring: IoUring = False,
    io_uring_depth: int = uring.DEFAULT_DEPTH,
    poll_us: float = 0.0,
    task_status: trio.TaskStatus[Session] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Mount ``ops`` (an :class:`Operations`, or a root :class:`afuse.Node`) on ``mountpoint``
    and serve it until unmounted or cancelled.

    For ``await nursery.start(serve, ops, path)``: returns the :class:`Session` once the
    filesystem answers requests. Cancelling unmounts (unless ``unmount`` is False).
    ``readers`` descriptors always wait for requests; at most ``max_requests`` requests are
    served at once; beyond ``readers`` they get private cloned descriptors unless
    ``private_clones`` is False. With ``takeover``, serve an already mounted, negotiated connection instead
    of mounting: INIT is skipped and, by default, unanswered requests are resent.
    When serving ends by cancellation, the filesystem is unmounted and requests in flight get
    ``shutdown_grace`` seconds to finish; a mount still busy then is detached lazily. A request
    unanswered for ``warn_after`` seconds is logged as a warning (None: never).
    ``io_uring=True`` serves requests through FUSE over io_uring (``io_uring_depth`` entries per
    CPU; see :mod:`afuse.uring`) and raises :class:`~afuse.uring.UringUnavailable` where the kernel
    refuses; ``"auto"`` falls back to /dev/fuse there, with a log line.
    ``poll_us`` > 0: a reader that finds /dev/fuse empty keeps reading it for up to that many
    microseconds before it waits in trio (busy polling: a CPU spent, so that a client on another
    CPU finds the daemon awake; nothing else in trio runs meanwhile). It is off where the process
    may use only one CPU, where polling would keep the client from running, and unused over
    io_uring (its tasks wait for completions, not on an empty device).
    """
    if not poll_us >= 0:
        raise ValueError(f"poll_us must be >= 0 microseconds, not {poll_us!r}")
    if warn_after is not None and not warn_after > 0:
        raise ValueError(f"warn_after must be positive seconds or None, not {warn_after!r}")
    if not shutdown_grace >= 0:
        raise ValueError(f"shutdown_grace must be >= 0 seconds, not {shutdown_grace!r}")
    ops = as_operations(ops)
    check_operations(ops)  # before mounting: a plain ``def`` handler would fail only when called
    opts = MountOptions.parse(options) if isinstance(options, str) else (options or MountOptions())
    cfg = config or InitConfig()
    if cfg.allow_idmap and not opts.default_permissions and not cfg.posix_acl:
        # The kernel fails INIT (and with it every request) for ALLOW_IDMAP without them.
        raise MountError(errno.EINVAL, "InitConfig(allow_idmap=True) needs the default_permissions "
                         "mount option (or posix_acl=True): the kernel does permission checks "
                         "on idmapped mounts")
    ring: Uring | None = None
    if io_uring not in (False, True, "auto"):
        raise ValueError(f"io_uring must be True, False or 'auto', not {io_uring!r}")
    if io_uring:
        if takeover is not None:
            raise ValueError("io_uring cannot be combined with takeover (failover serves /dev/fuse)")
        try:
            ring = Uring(io_uring_depth)  # before mounting: no io_uring, no flag asked at INIT
        except uring.UringUnavailable as e:
            if io_uring is True:
                raise
            log.info("io_uring=auto: %s; serving over /dev/fuse", e)
    if takeover is None:
        try:
            mnt = await trio.to_thread.run_sync(device.mount, os.fspath(mountpoint), opts)
        except BaseException:
            if ring is not None:
                ring.close()
                with trio.CancelScope(shield=True):
                    await ring.released()
            raise
    else:
        mnt = Mount(takeover.fd, device.resolve_mountpoint(os.fspath(mountpoint)), opts, False)
    session = Session(ops, mnt, cfg, readers, max_requests, private_clones)
    session.warn_after = warn_after
    if poll_us and len(os.sched_getaffinity(0)) < 2:
        log.info("poll_us=%g: off, this process may run on one CPU only", poll_us)
    elif poll_us:
        session.pool.poll_ns = int(poll_us * 1000)
    session.uring, session.io_uring = ring, io_uring
    current = _CURRENT.set(session)
    try:
        await session.start(takeover)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.run)
            # From here on the readers run in a shielded scope: every way out must stop them.
            try:
                if takeover is not None and takeover.resend:
                    await session.notify(session.connection.resend())
                task_status.started(session)
                await session.wait_closed()
            finally:
                if unmount:
                    with trio.CancelScope(shield=True):
                        await session.shutdown(shutdown_grace)
                session.stop_readers()
    except BaseException:
        if unmount and not session.closed:
            with trio.CancelScope(shield=True):
                try:
                    await trio.to_thread.run_sync(session.unmount)
                except Exception as e:
                    log.debug("unmount after failure: %s", e)
        raise
    finally:
        session.close()
        _CURRENT.reset(current)
        if ring is not None:  # the kernel's goodbye to this thread lands here (Uring.released)
            with trio.CancelScope(shield=True):
                await ring.released()


@asynccontextmanager
async def mount(
    ops: Operations | Mountable,
    mountpoint: str | os.PathLike[str],
    **kwargs: Any,
) -> AsyncIterator[Session]:
    """Serve ``ops`` on ``mountpoint`` for the duration of the ``async with`` block.

    Keyword arguments are those of :func:`serve`. Leaving the block unmounts, however it is left
    (an exception, KeyboardInterrupt, cancellation); the block's exception propagates as itself.
    """
    started = False
    raised: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            session: Session = await nursery.start(_serve_kw, ops, mountpoint, kwargs)
            started = True
            try:
                yield session
            except BaseException as e:
                raised = e
                raise
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # A failure to mount or negotiate is one plain exception for the caller.
        if not started and len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        ki, rest = group.split(KeyboardInterrupt)
        if ki is not None and (rest is None or rest.split(trio.Cancelled)[1] is None):
            # Ctrl-C delivered to one of the session's tasks rather than the block's: as itself.
            own = _first_leaf(ki)
        elif raised is None or len(group.exceptions) != 1 or _leaves(group) != _leaves(raised):
            raise
        else:
            own = raised
    else:
        return
    # The block's own exception (unmounted by now) reaches the caller as itself, not in a group;
    # raised outside the handler so that the group does not become its context.
    raise own


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _leaves(exc: BaseException) -> list[int]:
    """The ids of the exceptions in ``exc`` that are not groups (trio may copy a group, not them)."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [id(exc)]


async def _serve_kw(ops: Operations | Mountable, mountpoint: str | os.PathLike[str], kwargs: dict[str, Any],
                    task_status: trio.TaskStatus[Session] = trio.TASK_STATUS_IGNORED) -> None:
    await serve(ops, mountpoint, task_status=task_status, **kwargs)
