"""The reader pool: tasks reading requests from /dev/fuse, and the handler driver.

Readers work leader/follower: one reader at a time waits on the device; when it has read a
request it hands the device to the next idle reader and serves the request itself. When no
reader is left idle a new one is started, each on its own descriptor cloned with
FUSE_DEV_IOC_CLONE, up to ``max_requests``. A handler coroutine is driven by hand in its
reader's task: one that finishes without blocking costs no task switch and no cancel scope;
one that blocks first hands the device on, and is registered for INTERRUPT.

The pool knows nothing of requests' contents: it reads bytes and calls ``serve(fd, data, scope)``
(the session's), which decodes, dispatches and writes the reply.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any

import trio

from . import device
from .wire import replies
from .wire.constants import UNIQUE_RESEND

log = logging.getLogger("afuse")

__all__ = ["END_ERRNOS", "MAX_EARLY_INTERRUPTS", "ReaderPool", "only_cancelled", "poll", "read_one"]

#: Interrupts whose request has not been read yet are remembered; this many at most.
MAX_EARLY_INTERRUPTS = 1024
#: errnos of a read or write that mean the connection has ended.
END_ERRNOS = (errno.ENODEV, errno.ECONNABORTED, errno.EBADF)

#: ``serve(fd, data, worker_scope)``: serve one request; True if its handler blocked.
Serve = Callable[[int, memoryview, trio.CancelScope], Awaitable[bool]]


async def read_one(fd: int, buf: bytearray) -> int | None:
    """Read one message from non-blocking ``fd`` into ``buf`` (waiting for one); its length, or
    None when the connection has ended. For a session's first message; readers use the pool."""
    while True:
        try:
            return os.readv(fd, (buf,))
        except BlockingIOError:
            await trio.lowlevel.wait_readable(fd)
        except InterruptedError:
            pass
        except OSError as e:
            if e.errno == errno.ENOENT:  # interrupted while being read
                continue
            if e.errno in END_ERRNOS:
                return None
            raise


def reusable_buffer(size: int) -> bytearray:
    """A zeroed bytearray of ``size`` bytes with room to grow by one without moving, so that
    :func:`unviewed` costs no copy."""
    buf = bytearray(size + 1)
    del buf[size:]
    return buf


def unviewed(buf: bytearray) -> bool:
    """Whether no view of ``buf`` is left (its memory can be written again): a bytearray with a
    view of it cannot change size."""
    try:
        buf.append(0)
    except BufferError:
        return False
    del buf[-1]
    return True


class ReaderPool:
    """Reader tasks over one connection's descriptors (see the module docstring)."""

    def __init__(self, session_fd: int, readers: int, max_requests: int, private_clones: bool = True) -> None:
        if readers < 1 or max_requests < readers:
            raise ValueError("need readers >= 1 and max_requests >= readers")
        self.session_fd = session_fd
        self.readers = readers
        self.max_requests = max_requests
        #: Whether readers beyond the permanent ones get private clones (else share theirs).
        #: A failover-capable daemon shares: requests read on a private clone die with it.
        self.private_clones = private_clones
        #: Descriptors of the permanent readers: the session fd first, then its clones.
        self.reader_fds: list[int] = []
        #: Bytes a read needs to hold the largest request (set from the negotiation).
        self.bufsize = 1 << 16
        #: Set once reading has ended: the connection closed, or :meth:`drain` finished.
        self.ended = trio.Event()
        #: unique -> cancel scope of the worker whose handler for it is blocked.
        self.inflight: dict[int, trio.CancelScope] = {}
        #: unique -> (when it blocked, on trio's clock; the request) for blocked handlers.
        self.blocked: dict[int, tuple[float, object]] = {}
        #: Requests whose handlers a drain may leave unanswered, for the kernel to resend to the
        #: successor (lock waits: see :func:`afuse.nodes.locks.leave_to_successor`).
        self.resendable: set[int] = set()
        #: Requests a drain left unanswered (the successor must ask the kernel to resend them).
        self.left_unanswered: set[int] = set()
        #: Interrupts that arrived before their request (request id -> None), oldest first.
        self.early_interrupts: OrderedDict[int, None] = OrderedDict()
        self._fds: set[int] = set()  # descriptors this pool opened (and closes)
        #: Request buffers of workers that ended, for the next ones (see :meth:`_worker`).
        self._buffers: list[bytearray] = []
        self._lot = trio.lowlevel.ParkingLot()
        self._leader = False
        self._idle = 0
        self._workers = 0
        self._draining = False
        self._nursery: trio.Nursery | None = None
        self._serve: Serve | None = None
        self._done = trio.Event()
        #: Before waiting for a request in trio, yield the CPU once and read again: the process
        #: whose request is next often runs on this CPU (woken by the last reply) and sends it.
        #: Off by default (it measured no better under load); ``AFUSE_YIELD_BEFORE_WAIT=1`` turns it on.
        self.yield_before_wait = os.environ.get("AFUSE_YIELD_BEFORE_WAIT") == "1"
        #: Before waiting in trio for an empty device, keep reading it for this many nanoseconds
        #: (0: never; see :func:`afuse.serve`'s ``poll_us``).
        self.poll_ns = 0

    # -- descriptors -----------------------------------------------------------------------

    def open(self, clones: list[int] | None = None) -> None:
        """Set up the permanent readers' descriptors: the session fd and ``clones`` (cloned now if None)."""
        if clones is None:
            clones = []
            for _ in range(self.readers - 1):
                try:
                    clones.append(device.clone_device(self.session_fd))
                except OSError as e:
                    log.warning("cannot clone /dev/fuse (%s); readers share one descriptor", e)
                    break
        for fd in clones:
            device.set_nonblocking(fd)
        self._fds.update(clones)
        self.reader_fds = [self.session_fd, *clones]

    def notify_closing(self) -> None:
        """Wake every task waiting on one of the pool's descriptors (before they are closed)."""
        for fd in (self.session_fd, *self._fds):
            trio.lowlevel.notify_closing(fd)

    def close(self) -> None:
        """Close the descriptors the pool opened."""
        for fd in list(self._fds):
            self._fds.discard(fd)
            try:
                os.close(fd)
            except OSError:
                pass

    # -- running ---------------------------------------------------------------------------

    @trio.lowlevel.enable_ki_protection  # Ctrl-C reaches the user's task, never this bookkeeping
    async def run(self, serve: Serve, scope: trio.CancelScope) -> None:
        """Read and ``serve`` requests until the connection ends, :meth:`drain`, or ``scope`` is cancelled."""
        self._serve = serve
        with scope:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for fd in self.reader_fds:
                    self._start_worker(fd, permanent=True)
                for i in range(self.readers - len(self.reader_fds)):
                    self._start_worker(self.reader_fds[i % len(self.reader_fds)], permanent=True)
        self._done.set()

    async def drain(self) -> None:
        """Stop reading; return once every request in flight has been answered."""
        self._draining = True
        for unique in self.resendable & self.inflight.keys():
            self.left_unanswered.add(unique)
            self.inflight[unique].cancel()
        self._lot.unpark_all()
        self.notify_closing()
        await self._done.wait()
        self.ended.set()

    # -- interrupts --------------------------------------------------------------------------

    def interrupt(self, target: int) -> None:
        """INTERRUPT of request ``target``: cancel its handler, or remember it for later."""
        scope = self.inflight.get(target)
        if scope is None:
            scope = self.inflight.get(target | UNIQUE_RESEND)
        if scope is not None:
            log.debug("INTERRUPT of unique %d: cancelling its handler", target)
            scope.cancel()
            return
        # Not read yet (another daemon read it, or it is being resent): remember it.
        self.early_interrupts[target & ~UNIQUE_RESEND] = None
        if len(self.early_interrupts) > MAX_EARLY_INTERRUPTS:
            self.early_interrupts.popitem(last=False)

    def interrupted_early(self, unique: int) -> bool:
        """True (once) if an INTERRUPT of ``unique`` arrived before the request itself."""
        if self.early_interrupts:
            key = unique & ~UNIQUE_RESEND
            if key in self.early_interrupts:
                del self.early_interrupts[key]
                return True
        return False

    # -- reading -------------------------------------------------------------------------------

    async def _read(self, fd: int, buf: bytearray, failed: OSError | None = None) -> int | None:
        """Read one request; None when the connection has ended, -1 when draining.

        ``failed``: how the read the caller just tried failed (the next step is then to wait).
        With :attr:`yield_before_wait`, the first time the device has nothing the reader yields
        its CPU once and tries again before it waits in trio.
        """
        yielded = not self.yield_before_wait
        while True:
            if failed is None:
                try:
                    return os.readv(fd, (buf,))
                except OSError as exc:
                    failed = exc
            e, failed = failed, None
            if isinstance(e, BlockingIOError):
                if self.poll_ns:
                    n = poll(fd, buf, self.poll_ns)
                    if n is not None:
                        return n
                if not yielded:
                    yielded = True
                    os.sched_yield()
                    continue
                try:
                    await trio.lowlevel.wait_readable(fd)
                except trio.ClosedResourceError:
                    if self._draining:
                        return -1
                    raise
            elif isinstance(e, InterruptedError):
                pass
            elif e.errno == errno.ENOENT:  # the request was interrupted while being read
                pass
            elif e.errno in END_ERRNOS:
                return None
            else:
                raise e

    # -- workers ----------------------------------------------------------------------------

    def _start_worker(self, fd: int | None, permanent: bool, owned: bool = False) -> None:
        if fd is None:
            if self.private_clones:
                try:
                    fd = device.clone_device(self.session_fd)
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
        # Workers come and go with blocking handlers; a new bytearray each time would fault in
        # and zero ``bufsize`` (about 1 MiB) of fresh pages. A request's bytes are valid while
        # it is served (a worker reads its next request into the same buffer), so an ended
        # worker's buffer goes to the next one (not if a view of it was kept against that rule).
        buffers = self._buffers
        buf = buffers.pop() if buffers and len(buffers[-1]) == self.bufsize else reusable_buffer(self.bufsize)
        mv = memoryview(buf)
        bufs = (buf,)
        readv = os.readv
        lot = self._lot
        serve = self._serve
        assert serve is not None
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
                        try:
                            # A request is often waiting already: read it without a coroutine call.
                            n: int | None = readv(fd, bufs)
                        except OSError as e:
                            n = await self._read(fd, buf, e)
                    except BaseException:
                        self._leader = False
                        lot.unpark()
                        raise
                    if n is None or n < 0:
                        self._leader = False
                        if n is None:
                            self.ended.set()
                        lot.unpark_all()
                        return
                    # Serve it; a handler that blocks hands the device to a follower first.
                    leader = not await serve(fd, mv[:n], wscope)
                    if wscope.cancel_called:
                        replace = True
                        return
        finally:
            self._workers -= 1
            try:
                mv.release()  # (its slices hold the buffer on their own)
            except BufferError:
                pass
            else:
                if len(buffers) < self.max_requests and len(buf) == self.bufsize and unviewed(buf):
                    buffers.append(buf)
            if replace and not self._draining and not self.ended.is_set():
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

    async def drive(self, coro: Coroutine[Any, Any, Any], unique: int | None,
                    wscope: trio.CancelScope, request: object = None) -> tuple[Any, bool]:
        """Run a handler coroutine in this task: (its result, whether it blocked).

        A coroutine that finishes without blocking costs nothing more; one that blocks goes on
        in :meth:`resume`. The session's hot path makes the first step itself (the same as this,
        one coroutine frame fewer).
        """
        try:
            msg = coro.send(None)
        except StopIteration as e:
            return e.value, False
        return await self.resume(coro, msg, unique, wscope, request), True

    async def resume(self, coro: Coroutine[Any, Any, Any], msg: Any, unique: int | None,
                     wscope: trio.CancelScope, request: object = None,
                     handoff: Callable[[], None] | None = None) -> Any:
        """Go on with a handler coroutine that blocked, yielding ``msg`` to trio: its result.

        It first hands the device to another reader (or calls ``handoff``: the io_uring
        transport hands its ring over instead) and is registered for INTERRUPT, which cancels
        ``wscope`` (the worker's scope) and makes the result an EINTR reply. ``request`` is what
        :attr:`blocked` reports while it waits.
        """
        (handoff or self._handoff)()
        if unique is not None:
            self.inflight[unique] = wscope
            self.blocked[unique] = (trio.current_time(), request)
        try:
            while True:
                try:
                    sent = await _Yield(msg)
                except BaseException as exc:
                    msg = coro.throw(exc)
                else:
                    msg = coro.send(sent)
        except StopIteration as e:
            return e.value
        except BaseException as exc:
            # Cancelled, or a group of nothing but Cancelled: what a handler waiting in a nursery
            # of its own raises when the worker's scope is cancelled (strict exception groups).
            if unique is None or not wscope.cancel_called or not only_cancelled(exc):
                raise
            if unique in self.left_unanswered:
                return None  # left for the successor: the kernel resends it there
            return replies.error(unique, errno.EINTR)  # interrupted
        finally:
            if unique is not None:
                del self.inflight[unique]
                del self.blocked[unique]
                self.resendable.discard(unique)


def only_cancelled(exc: BaseException) -> bool:
    """True if ``exc`` is :class:`trio.Cancelled` or an exception group holding nothing else."""
    if isinstance(exc, BaseExceptionGroup):
        return all(only_cancelled(e) for e in exc.exceptions)
    return isinstance(exc, trio.Cancelled)


def poll(fd: int, buf: bytearray, ns: int) -> int | None:
    """Read non-blocking ``fd`` into ``buf`` again and again for up to ``ns`` nanoseconds: the
    length of the first message read, or None (nothing came, or the read failed otherwise)."""
    readv = os.readv
    bufs = (buf,)
    clock = time.perf_counter_ns
    end = clock() + ns
    while clock() < end:
        try:
            return readv(fd, bufs)
        except BlockingIOError:
            pass
        except OSError:
            return None  # the caller's next read reports it
    return None


class _Yield:
    """Pass one trap of a hand-driven coroutine up to trio and return what trio sends back."""

    __slots__ = ("msg",)

    def __init__(self, msg: Any) -> None:
        self.msg = msg

    def __await__(self) -> Generator[Any, Any, Any]:
        return (yield self.msg)
