"""The FUSE session: INIT, reader tasks, the in-flight table, interrupts and shutdown.

Readers work leader/follower: one reader at a time waits on the device; when it has read a
request it hands the device to the next idle reader and serves the request itself. When no
reader is left idle a new one is started, each on its own descriptor cloned with
FUSE_DEV_IOC_CLONE, up to ``max_requests``. A reply is written to the descriptor its request
came from, in one write.
"""

from __future__ import annotations

import contextvars
import errno
import logging
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Coroutine, Generator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from . import device
from .device import Mount, MountOptions
from .dispatch import Dispatcher, errno_name
from .errors import MountError, NotNegotiated, SessionError
from .operations import Operations
from .passthrough import BackingFile, BackingTable
from .wire import notify as wire_notify
from .wire import replies
from .wire import requests as r
from .wire.constants import UNIQUE_RESEND, InitFlag, Opcode
from .wire.init import InitConfig, InitError, Negotiated, encode_init_reply, encode_version_reply, negotiate
from .wire.requests import Decoder, ProtocolError, UnknownOpcode

log = logging.getLogger("afuse")

#: Interrupts whose request has not been read yet are remembered; this many at most.
MAX_EARLY_INTERRUPTS = 1024
_END_ERRNOS = (errno.ENODEV, errno.ECONNABORTED, errno.EBADF)

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

    Obtained from :func:`mount` or ``await nursery.start(serve, ...)``.
    """

    def __init__(self, ops: Operations, mnt: Mount, config: InitConfig, readers: int,
                 max_requests: int, private_clones: bool = True) -> None:
        if readers < 1 or max_requests < readers:
            raise ValueError("need readers >= 1 and max_requests >= readers")
        self.ops = ops
        self.mount = mnt
        self.config = config
        self.dispatcher = Dispatcher(ops)
        self.decoder = Decoder()
        self.readers = readers
        self.max_requests = max_requests
        self.negotiated: Negotiated | None = None
        #: unique -> cancel scope of the worker whose handler for it is blocked.
        self._inflight: dict[int, trio.CancelScope] = {}
        self._early_interrupts: OrderedDict[int, None] = OrderedDict()
        self._lot = trio.lowlevel.ParkingLot()
        self._leader = False
        self._idle = 0
        self._workers = 0
        self._closed = trio.Event()
        self._workers_done = trio.Event()
        self._draining = False
        self._nursery: trio.Nursery | None = None
        self._fds: set[int] = set()
        #: Descriptors of the permanent readers: the session fd first, then its clones.
        self.reader_fds: list[int] = []
        #: Whether readers beyond the permanent ones get private clones (else share theirs).
        #: A failover-capable daemon shares: requests read on a private clone die with it.
        self.private_clones = private_clones
        self._bufsize = 0
        self._retrieve_waiters: dict[int, trio.MemorySendChannel[r.NotifyReplyRequest]] = {}
        #: Requests served so far (for tests and statistics).
        self.served = 0
        #: Backing files for passthrough (set once FUSE_PASSTHROUGH is negotiated).
        self.backing: BackingTable | None = None

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
    def errors(self) -> list[BaseException]:
        """Unexpected exceptions raised by handlers (each was answered EIO and logged)."""
        return self.dispatcher.errors

    def has(self, flag: InitFlag) -> bool:
        """True if ``flag`` was negotiated at INIT."""
        return self.negotiated is not None and self.negotiated.has(flag)

    async def wait_closed(self) -> None:
        """Wait until serving has ended (unmounted from outside, aborted, or shut down)."""
        await self._closed.wait()

    @property
    def closed(self) -> bool:
        """True once serving has ended."""
        return self._closed.is_set()

    def write_notification(self, message: bytes) -> int:
        """Write an encoded notification now, from a thread other than the serving loop's
        (from the loop use :meth:`notify`); OSError (e.g. ENOENT) as the kernel answers."""
        if self._closed.is_set():
            raise SessionError("the session is closed")
        return os.write(self.mount.fd, message)

    async def notify(self, message: bytes) -> int:
        """Write an encoded notification from a worker thread (see :mod:`afuse.notify`)."""
        if self._closed.is_set():
            raise SessionError("the session is closed")
        return await trio.to_thread.run_sync(os.write, self.mount.fd, message)

    def require(self, flag: InitFlag, what: str) -> None:
        """Raise :class:`NotNegotiated` unless ``flag`` was negotiated."""
        if not self.has(flag):
            offered = self.negotiated is not None and bool(self.negotiated.offered & flag)
            why = "was not asked for" if offered else "is not offered by this kernel"
            raise NotNegotiated(f"{what} needs {flag.name}, which {why}")

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
        return self.backing.open(fd)

    def expect_notify_reply(self, notify_unique: int) -> trio.MemoryReceiveChannel[r.NotifyReplyRequest]:
        """A channel that receives the kernel's NOTIFY_REPLY for ``notify_unique``."""
        send, recv = trio.open_memory_channel[r.NotifyReplyRequest](1)
        self._retrieve_waiters[notify_unique] = send
        return recv

    async def drain(self) -> None:
        """Stop reading requests, let those in flight finish and answer, then end serving.

        The mount stays: another daemon holding the descriptor (see :mod:`afuse.failover`)
        serves on with nothing to replay.
        """
        if self._closed.is_set():
            return
        self._draining = True
        self._lot.unpark_all()
        for fd in (self.mount.fd, *self._fds):
            trio.lowlevel.notify_closing(fd)
        await self._workers_done.wait()
        self._closed.set()

    @property
    def in_flight(self) -> int:
        """Requests whose handlers are blocked right now."""
        return len(self._inflight)

    # -- INIT ------------------------------------------------------------------------------

    async def _init(self) -> None:
        fd = self.mount.fd
        buf = bytearray(1 << 16)
        while True:
            n = await self._read(fd, buf)
            if n is None:
                raise SessionError("the connection closed before INIT")
            try:
                req = self.decoder.decode(memoryview(buf)[:n])
            except ProtocolError as e:
                raise SessionError(f"bad first request from the kernel: {e}") from e
            if not isinstance(req, r.InitRequest):
                raise SessionError(f"expected INIT from the kernel, got {type(req).opcode.name}")
            if req.major > 7:
                os.write(fd, encode_version_reply(req.unique))
                continue
            wanted = self.dispatcher.wanted_flags(self.config)
            try:
                neg = negotiate(req, self.config, wanted)
            except InitError as e:
                os.write(fd, replies.error(req.unique, errno.EPROTO))
                raise SessionError(str(e)) from e
            os.write(fd, encode_init_reply(req.unique, neg))
            break
        if neg.refused:
            log.info("kernel did not offer: %s", neg.refused)
        log.debug("INIT: kernel 7.%d, negotiated 7.%d, flags %s, max_write %d",
                  neg.kernel_minor, neg.minor, neg.flags, neg.max_write)
        self._adopt(neg)

    def _adopt(self, neg: Negotiated) -> None:
        """Serve with ``neg``: just negotiated, or taken over from an earlier daemon."""
        self.negotiated = neg
        self.decoder.setxattr_ext = neg.has(InitFlag.SETXATTR_EXT)
        self._bufsize = neg.read_buffer_size
        if neg.has(InitFlag.PASSTHROUGH) and self.backing is None:
            self.backing = BackingTable(self.mount.fd)
            self.dispatcher.enable_passthrough(self.backing)
        self.ops.init(neg)

    # -- reading and writing ------------------------------------------------------------------

    async def _read(self, fd: int, buf: bytearray) -> int | None:
        """Read one request; None when the connection has ended, -1 when draining."""
        while True:
            try:
                return os.readv(fd, (buf,))
            except BlockingIOError:
                try:
                    await trio.lowlevel.wait_readable(fd)
                except trio.ClosedResourceError:
                    if self._draining:
                        return -1
                    raise
            except InterruptedError:
                pass
            except OSError as e:
                if e.errno == errno.ENOENT:  # the request was interrupted while being read
                    continue
                if e.errno in _END_ERRNOS:
                    return None
                raise

    def _write(self, fd: int, data: bytes, unique: int) -> bool:
        """Write one reply; False if the kernel did not take it."""
        try:
            os.write(fd, data)
            return True
        except OSError as e:
            if e.errno == errno.ENOENT:  # interrupted/aborted/resent meanwhile: nobody waits
                log.debug("reply to unique %d: nobody waits (ENOENT)", unique)
            elif e.errno in _END_ERRNOS:
                log.debug("reply to unique %d after the connection ended", unique)
            else:
                log.error("kernel rejected the reply to unique %d (%d bytes): %s", unique, len(data), e)
            return False

    # -- workers ----------------------------------------------------------------------------

    async def _run_workers(self, scope: trio.CancelScope) -> None:
        with scope:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for fd in self.reader_fds:
                    self._start_worker(fd, permanent=True)
                for i in range(self.readers - len(self.reader_fds)):
                    self._start_worker(self.reader_fds[i % len(self.reader_fds)], permanent=True)
        self._workers_done.set()

    def _open_readers(self, clones: list[int] | None) -> None:
        """The permanent readers' descriptors: the session fd and its clones."""
        if clones is None:
            clones = []
            for _ in range(self.readers - 1):
                try:
                    clones.append(device.clone_device(self.mount.fd))
                except OSError as e:
                    log.warning("cannot clone /dev/fuse (%s); readers share one descriptor", e)
                    break
        for fd in clones:
            device.set_nonblocking(fd)
        self._fds.update(clones)
        self.reader_fds = [self.mount.fd, *clones]

    def _start_worker(self, fd: int | None, permanent: bool, owned: bool = False) -> None:
        if fd is None:
            if self.private_clones:
                try:
                    fd = device.clone_device(self.mount.fd)
                except OSError as e:
                    log.warning("cannot clone /dev/fuse (%s); sharing a descriptor", e)
                else:
                    device.set_nonblocking(fd)
                    self._fds.add(fd)
                    owned = True
            if fd is None:
                fd = self.reader_fds[self._workers % len(self.reader_fds)]
        self._workers += 1
        assert self._nursery is not None
        self._nursery.start_soon(self._worker, fd, permanent, owned)

    async def _worker(self, fd: int, permanent: bool, owned: bool) -> None:
        buf = bytearray(self._bufsize)
        mv = memoryview(buf)
        lot = self._lot
        leader = False
        replace = False
        try:
            # One cancel scope for the worker's whole life, entered before any handler runs (so
            # handlers' own scopes nest inside it). INTERRUPT cancels it; the worker then
            # answers EINTR and hands its descriptor to a fresh worker.
            with trio.CancelScope() as wscope:
                while True:
                    if self._draining:
                        return
                    if not leader:
                        # Follow until the device is free, then lead.
                        while self._leader:
                            if self._draining or (not permanent and self._idle >= self.readers):
                                return
                            self._idle += 1
                            try:
                                await lot.park()
                            finally:
                                self._idle -= 1
                        if self._draining:
                            return
                        self._leader = leader = True
                    try:
                        n = await self._read(fd, buf)
                    except BaseException:
                        self._leader = False
                        lot.unpark()
                        raise
                    if n is None or n < 0:
                        self._leader = False
                        if n is None:
                            self._closed.set()
                        lot.unpark_all()
                        return
                    # Serve it; a handler that blocks hands the device to a follower first.
                    leader = not await self._process(fd, mv[:n], wscope)
                    if wscope.cancel_called:
                        replace = True
                        return
        finally:
            self._workers -= 1
            if replace and not self._draining and not self._closed.is_set():
                self._start_worker(fd, permanent, owned)
            elif owned:
                self._fds.discard(fd)
                os.close(fd)

    def _handoff(self) -> None:
        """The leader is about to block in a handler: let another reader take the device."""
        self._leader = False
        if self._idle:
            self._lot.unpark()
        elif self._workers < self.max_requests:
            self._start_worker(None, permanent=False)

    async def _drive(self, coro: Coroutine[Any, Any, Any], unique: int | None,
                     wscope: trio.CancelScope) -> tuple[Any, bool]:
        """Run a handler coroutine in this task: (its result, whether it blocked).

        A coroutine that finishes without blocking costs nothing more; one that blocks hands
        the device to another reader and is registered for INTERRUPT, which cancels
        ``wscope`` (the worker's scope) and makes the result an EINTR reply.
        """
        try:
            msg = coro.send(None)
        except StopIteration as e:
            return e.value, False
        self._handoff()
        if unique is not None:
            self._inflight[unique] = wscope
        try:
            while True:
                try:
                    sent = await _Yield(msg)
                except BaseException as exc:
                    msg = coro.throw(exc)
                else:
                    msg = coro.send(sent)
        except StopIteration as e:
            return e.value, True
        except trio.Cancelled:
            if unique is None or not wscope.cancel_called:
                raise
            return replies.error(unique, errno.EINTR), True  # interrupted
        finally:
            if unique is not None:
                del self._inflight[unique]

    async def _process(self, fd: int, data: memoryview, wscope: trio.CancelScope) -> bool:
        """Serve one request; True if its handler blocked (and the device was handed off)."""
        try:
            req = self.decoder.decode(data)
        except UnknownOpcode as e:
            log.warning("%s; answering ENOSYS", e)
            self._write(fd, replies.error(e.unique, errno.ENOSYS), e.unique)
            return False
        except ProtocolError as e:
            log.error("malformed request from the kernel: %s", e)
            if e.unique and e.opcode not in _NO_REPLY:
                self._write(fd, replies.error(e.unique, errno.EIO), e.unique)
            return False
        cls = type(req)
        if cls is r.ForgetRequest:
            return (await self._drive(self.dispatcher.forget(req), None, wscope))[1]  # type: ignore[arg-type]
        if cls is r.InterruptRequest:
            self._interrupt(req)  # type: ignore[arg-type]
            return False
        if cls is r.NotifyReplyRequest:
            self._notify_reply(req)  # type: ignore[arg-type]
            return False
        unique = req.unique
        debug = log.isEnabledFor(logging.DEBUG)
        t0 = time.perf_counter() if debug else 0.0
        if self._early_interrupts and unique & ~UNIQUE_RESEND in self._early_interrupts:
            del self._early_interrupts[unique & ~UNIQUE_RESEND]
            reply: bytes | None = replies.error(unique, errno.EINTR)
            blocked = False
        else:
            reply, blocked = await self._drive(self.dispatcher.handle(req), unique, wscope)
        self.served += 1
        if reply is not None:
            written = self._write(fd, reply, unique)
        backing = self.backing
        if backing is not None and (backing.pending or backing.claims):
            # After the reply: the open file took its own reference if the kernel has it.
            backing.reply_done(unique, reply is not None and written)
        if debug:
            code = -int.from_bytes(reply[4:8], "little", signed=True) if reply else 0
            log.debug("%s unique=%d nodeid=%d -> %s (%d bytes) in %.1f us",
                      cls.opcode.name, unique, req.nodeid, errno_name(code),
                      len(reply) if reply else 0, (time.perf_counter() - t0) * 1e6)
        return blocked

    def _interrupt(self, req: r.InterruptRequest) -> None:
        target = req.target
        scope = self._inflight.get(target)
        if scope is None:
            scope = self._inflight.get(target | UNIQUE_RESEND)
        if scope is not None:
            log.debug("INTERRUPT of unique %d: cancelling its handler", target)
            scope.cancel()
            return
        # Not read yet (another daemon read it, or it is being resent): remember it.
        self._early_interrupts[target & ~UNIQUE_RESEND] = None
        if len(self._early_interrupts) > MAX_EARLY_INTERRUPTS:
            self._early_interrupts.popitem(last=False)

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

    # -- shutdown ---------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        """Unmount (if still mounted) while the readers keep serving, then wait for them."""
        if not self._closed.is_set():
            try:
                await trio.to_thread.run_sync(self._unmount)
            except Exception as e:  # pragma: no cover - logged, the fds are closed anyway
                log.error("unmounting %s failed: %s", self.mountpoint, e)
            with trio.move_on_after(5):
                await self._closed.wait()

    def _unmount(self) -> None:
        try:
            self.mount.unmount()
        except MountError as e:
            if e.errno == errno.EBUSY:
                log.warning("%s is busy; detaching it lazily", self.mountpoint)
                self.mount.unmount(lazy=True)
            else:
                raise

    def _close_fds(self) -> None:
        for fd in list(self._fds):
            self._fds.discard(fd)
            try:
                os.close(fd)
            except OSError:
                pass
        if self.backing is not None:
            self.backing.end()
        self.mount.close()
        self._closed.set()


@attrs.define
class Takeover:
    """A live, negotiated /dev/fuse descriptor to serve instead of mounting anew."""

    fd: int
    negotiated: Negotiated
    #: Further descriptors of the same connection (clones) to read from.
    clones: list[int] = attrs.field(factory=list)
    #: Send FUSE_NOTIFY_RESEND once serving, so requests a dead daemon had read come again.
    resend: bool = True


class _Yield:
    """Pass one trap of a hand-driven coroutine up to trio and return what trio sends back."""

    __slots__ = ("msg",)

    def __init__(self, msg: Any) -> None:
        self.msg = msg

    def __await__(self) -> Generator[Any, Any, Any]:
        return (yield self.msg)


_NO_REPLY = (Opcode.FORGET, Opcode.BATCH_FORGET, Opcode.NOTIFY_REPLY, Opcode.INTERRUPT)


async def serve(
    ops: Operations,
    mountpoint: str | os.PathLike[str],
    *,
    options: MountOptions | str | None = None,
    config: InitConfig | None = None,
    readers: int = 2,
    max_requests: int = 64,
    takeover: Takeover | None = None,
    unmount: bool = True,
    private_clones: bool = True,
    task_status: trio.TaskStatus[Session] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Mount ``ops`` on ``mountpoint`` and serve it until unmounted or cancelled.

    For ``await nursery.start(serve, ops, path)``: returns the :class:`Session` once the
    filesystem answers requests. Cancelling unmounts (unless ``unmount`` is False).
    ``readers`` descriptors always wait for requests; at most ``max_requests`` requests are
    served at once; beyond ``readers`` they get private cloned descriptors unless
    ``private_clones`` is False. With ``takeover``, serve an already mounted, negotiated connection instead
    of mounting: INIT is skipped and, by default, unanswered requests are resent.
    """
    opts = MountOptions.parse(options) if isinstance(options, str) else (options or MountOptions())
    cfg = config or InitConfig()
    if cfg.allow_idmap and not opts.default_permissions and not cfg.posix_acl:
        # The kernel fails INIT (and with it every request) for ALLOW_IDMAP without them.
        raise MountError(errno.EINVAL, "InitConfig(allow_idmap=True) needs the default_permissions "
                         "mount option (or posix_acl=True): the kernel does permission checks "
                         "on idmapped mounts")
    if takeover is None:
        mnt = await trio.to_thread.run_sync(device.mount, os.fspath(mountpoint), opts)
    else:
        mnt = Mount(takeover.fd, device.resolve_mountpoint(os.fspath(mountpoint)), opts, False)
    session = Session(ops, mnt, cfg, readers, max_requests, private_clones)
    current = _CURRENT.set(session)
    try:
        device.set_nonblocking(mnt.fd)
        if takeover is None:
            with trio.fail_after(30):
                await session._init()
        else:
            session._adopt(takeover.negotiated)
        session._open_readers(None if takeover is None else list(takeover.clones))
        async with trio.open_nursery() as nursery:
            worker_scope = trio.CancelScope(shield=True)
            nursery.start_soon(session._run_workers, worker_scope)
            if takeover is not None and takeover.resend:
                await session.notify(wire_notify.resend())
            task_status.started(session)
            try:
                await session._closed.wait()
            finally:
                if unmount:
                    with trio.CancelScope(shield=True):
                        await session._shutdown()
                worker_scope.cancel()
    except BaseException:
        if unmount and not session.closed:
            with trio.CancelScope(shield=True):
                try:
                    await trio.to_thread.run_sync(session._unmount)
                except Exception as e:
                    log.debug("unmount after failure: %s", e)
        raise
    finally:
        for fd in (mnt.fd, *session._fds):
            trio.lowlevel.notify_closing(fd)
        session._close_fds()
        _CURRENT.reset(current)


@asynccontextmanager
async def mount(
    ops: Operations,
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
        if raised is None or len(group.exceptions) != 1 or _leaves(group) != _leaves(raised):
            raise
        own = raised
    else:
        return
    # The block's own exception (unmounted by now) reaches the caller as itself, not in a group;
    # raised outside the handler so that the group does not become its context.
    raise own


def _leaves(exc: BaseException) -> list[int]:
    """The ids of the exceptions in ``exc`` that are not groups (trio may copy a group, not them)."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [id(exc)]


async def _serve_kw(ops: Operations, mountpoint: str | os.PathLike[str], kwargs: dict[str, Any],
                    task_status: trio.TaskStatus[Session] = trio.TASK_STATUS_IGNORED) -> None:
    await serve(ops, mountpoint, task_status=task_status, **kwargs)
