"""FUSE over io_uring: requests and replies through a ring instead of read/write on /dev/fuse.

Opt-in with ``serve(..., io_uring=True)`` (or ``"auto"``). Pure Python: ``ctypes`` for the three
io_uring system calls, ``mmap`` for the rings. The kernel must offer FUSE_OVER_IO_URING at INIT,
which it does only while the fuse module parameter ``enable_uring`` is Y (root:
``echo Y > /sys/module/fuse/parameters/enable_uring``; kernel 6.14 or later).

How it runs (see docs/uring.md):

* :class:`Uring` creates one io_uring (SQE128) *before* INIT, so that a system without io_uring
  never negotiates the flag. After INIT it registers ``depth`` entries for every possible CPU
  (FUSE_IO_URING_CMD_REGISTER); each entry has a header buffer and a payload buffer.
* A completion with result 0 means the entry holds a request. Its header, first argument and
  payload are laid out contiguously in the entry's buffer, so the session's decoder reads it as
  it reads a request from /dev/fuse; the dispatcher handles it; the reply is written into the
  entry's buffers and COMMIT_AND_FETCH both answers and re-arms the entry.
* Ring tasks work leader/follower like the /dev/fuse readers: one task waits on the ring's
  descriptor (``trio.lowlevel.wait_readable``) and serves what completes; a handler that blocks
  hands the ring to another task. INTERRUPT, FORGET and notifications still travel through
  /dev/fuse (the kernel sends them there), so the reader pool keeps running beside the ring.
* Teardown: unmounting or aborting completes every waiting entry with ENOTCONN; the ring is
  closed (its mappings first, then its descriptor) before /dev/fuse.

x86-64 and other little-endian architectures with io_uring syscall numbers 425-427.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import mmap
import os
import struct
import time
from collections import deque
from collections.abc import Coroutine, Generator, Iterator
from typing import TYPE_CHECKING, Any, Literal

import trio

from .context import _CURRENT as _REQUEST
from .context import RequestContext
from .dispatch import Reply
from .errors import SessionError
from .splice import SplicedReply
from .wire import replies
from .wire import requests as r
from .wire.constants import InitFlag
from .wire.describe import describe_reply, describe_request
from .wire.opcodes import NO_REPLY
from .wire.requests import ProtocolError, UnknownOpcode

if TYPE_CHECKING:
    from .session import Session
    from .wire.init import Negotiated

__all__ = [
    "DEFAULT_DEPTH", "ENABLE_URING_PATH", "RELEASE_TIMEOUT", "IoUring", "Uring", "UringUnavailable",
    "negotiated_or_raise", "possible_cpus", "uring_enabled", "uring_parameter",
]

log = logging.getLogger("afuse")

#: ``serve(io_uring=...)``: False (read/write on /dev/fuse), True (io_uring or an error), "auto"
#: (io_uring where the kernel offers it, else /dev/fuse with a log line).
IoUring = bool | Literal["auto"]

#: Ring entries per CPU queue unless ``io_uring_depth`` says otherwise.
DEFAULT_DEPTH = 8

ENABLE_URING_PATH = "/sys/module/fuse/parameters/enable_uring"
_POSSIBLE_PATH = "/sys/devices/system/cpu/possible"

# io_uring ABI (include/uapi/linux/io_uring.h)
_SYS_SETUP, _SYS_ENTER, _SYS_REGISTER = 425, 426, 427
_REGISTER_FILES = 2
_SETUP_SQE128 = 1 << 10
_ENTER_GETEVENTS = 1
_OFF_SQ_RING, _OFF_SQES = 0, 0x10000000
_FEAT_SINGLE_MMAP = 1
_OP_URING_CMD = 46
_SQE_SIZE, _CQE_SIZE = 128, 16
# FUSE over io_uring (include/uapi/linux/fuse.h, 7.42+)
_CMD_REGISTER, _CMD_COMMIT_AND_FETCH = 1, 2
_HEADER_SIZE = 288            # struct fuse_uring_req_header
_OP_IN = 128                  # op_in: the request's first argument
_OP_IN_SIZE = 128
_ENT_COMMIT_ID = 264          # fuse_uring_ent_in_out.commit_id
_ENT_PAYLOAD_SZ = 272         # fuse_uring_ent_in_out.payload_sz
#: Room in front of each payload buffer for the in-header and the first argument, so that a
#: request lies contiguous in memory as read() would have returned it.
_PRE = 256

# The SQE fields afuse sets (the rest of the 128 bytes stays zero): opcode, flags, ioprio, fd,
# cmd_op, pad, addr, len, uring_cmd_flags, user_data, 8 bytes of zero, then fuse_uring_cmd_req
# {flags, commit_id, qid}.
_SQE = struct.Struct("<BBHiIIQIIQ8xQQH")
_CQE = struct.Struct("<QiI")
_IN_HEAD = struct.Struct("<IIQ")        # fuse_in_header: len, opcode, unique
_OUT_HEAD = struct.Struct("<IiQ")       # fuse_out_header: len, error, unique
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_L = ctypes.c_long

#: Replies committed in one io_uring_enter at most while further requests wait to be served.
_BATCH = 4

_END_ERRNOS = (errno.ENOTCONN, errno.ECONNABORTED, errno.ENODEV, errno.ECANCELED)

#: Seconds :meth:`Uring.released` waits for the kernel to free a closed ring at most.
RELEASE_TIMEOUT = 2.0


class UringUnavailable(SessionError):
    """FUSE over io_uring cannot be used here (the message says why)."""


def uring_enabled() -> bool | None:
    """The fuse module parameter ``enable_uring`` (None where the kernel has none)."""
    try:
        with open(ENABLE_URING_PATH) as f:
            return f.read().strip() == "Y"
    except OSError:
        return None


@contextlib.contextmanager
def uring_parameter(enabled: bool = True) -> Iterator[bool | None]:
    """Set the fuse module parameter ``enable_uring`` for the block (root), then restore it,
    however the block ends. Yields the value it had before (None: the kernel has none)."""
    before = uring_enabled()
    if before is None:
        raise UringUnavailable(f"this kernel has no {ENABLE_URING_PATH} (no FUSE over io_uring)")
    if before != enabled:
        _write_parameter(enabled)
    try:
        yield before
    finally:
        if before != enabled:
            _write_parameter(before)


def _write_parameter(enabled: bool) -> None:
    with open(ENABLE_URING_PATH, "w") as f:
        f.write("Y" if enabled else "N")


def possible_cpus() -> int:
    """How many CPUs the kernel may ever run (its number of FUSE ring queues)."""
    try:
        with open(_POSSIBLE_PATH) as f:
            text = f.read().strip()
    except OSError:
        return os.cpu_count() or 1
    top = 0
    for part in text.split(","):
        top = max(top, int(part.split("-")[-1]))
    return top + 1


def _check(res: int, what: str) -> int:
    if res < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return res


class _Entry:
    """One registered ring entry: its buffers and the request it holds."""

    __slots__ = ("data", "data_addr", "hdr", "hdr_addr", "index", "iov", "qid")

    def __init__(self, index: int, qid: int, hdr: memoryview, hdr_addr: int, data: memoryview,
                 data_addr: int, payload_size: int) -> None:
        self.index = index
        self.qid = qid
        self.hdr = hdr                  # fuse_uring_req_header
        self.hdr_addr = hdr_addr
        self.data = data                # _PRE bytes of room, then the payload buffer
        self.data_addr = data_addr
        self.iov = (ctypes.c_uint64 * 4)(hdr_addr, _HEADER_SIZE, data_addr + _PRE, payload_size)


class Uring:
    """One io_uring serving a FUSE connection's requests (see the module docstring)."""

    def __init__(self, depth: int = DEFAULT_DEPTH, queues: int | None = None) -> None:
        if depth < 1:
            raise ValueError(f"io_uring_depth must be at least 1, not {depth}")
        #: Entries per queue.
        self.depth = depth
        #: Queues: one per possible CPU (the kernel needs every one to have an entry).
        self.queues = queues or possible_cpus()
        #: Requests served through the ring.
        self.served = 0
        self.fd = -1
        self._witness = -1            # read end of a pipe whose write end only the ring holds
        self._maps: list[mmap.mmap] = []
        self._views: list[memoryview] = []
        self._entries: list[_Entry] = []
        self._ready: deque[_Entry] = deque()
        self._armed = 0               # commands the kernel holds
        self._to_submit = 0
        self._gone = False            # the connection has ended
        self._session: Session | None = None
        self._buffers: tuple[mmap.mmap, mmap.mmap] | None = None
        self._fuse_fd = -1
        # Shielded like the readers' scope: serving goes on while the session unmounts.
        self._scope = trio.CancelScope(shield=True)
        self._setup()

    # -- the ring ------------------------------------------------------------------------------

    def _setup(self) -> None:
        n = self.queues * self.depth
        entries = 1 << max(0, (n - 1).bit_length())
        params = ctypes.create_string_buffer(120)
        struct.pack_into("<I", params, 8, _SETUP_SQE128)
        res = _syscall(_L(_SYS_SETUP), _L(entries), params)
        if res < 0:
            e = ctypes.get_errno()
            why = {errno.ENOSYS: "the kernel has no io_uring",
                   errno.EPERM: "io_uring is disabled (sysctl kernel.io_uring_disabled)"}.get(e, os.strerror(e))
            raise UringUnavailable(f"io_uring_setup failed: {why}")
        self.fd = res
        try:
            self._map(params)
            self._register_witness()
        except BaseException:
            self.close()
            raise

    def _register_witness(self) -> None:
        """Give the ring the only reference to a pipe's write end (a registered file): the read
        end sees EOF once the kernel has freed the ring, which it does only after it has run its
        teardown task work on every thread that used the ring (see :meth:`released`)."""
        r_fd, w_fd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            fds = (ctypes.c_int32 * 1)(w_fd)
            if _syscall(_L(_SYS_REGISTER), _L(self.fd), _L(_REGISTER_FILES), fds, _L(1)) < 0:
                e = ctypes.get_errno()
                log.debug("io_uring: no registered file to witness the ring's release (%s)", os.strerror(e))
                os.close(r_fd)
                return
        finally:
            os.close(w_fd)
        self._witness = r_fd

    def _map(self, params: ctypes.Array[ctypes.c_char]) -> None:
        sq_entries, cq_entries, _flags, _cpu, _idle, features = struct.unpack_from("<6I", params, 0)
        sq = struct.unpack_from("<8I", params, 40)
        cq = struct.unpack_from("<8I", params, 80)
        if not features & _FEAT_SINGLE_MMAP:
            raise UringUnavailable("io_uring without IORING_FEAT_SINGLE_MMAP (kernel too old)")
        size = max(sq[6] + 4 * sq_entries, cq[5] + _CQE_SIZE * cq_entries)
        ring = mmap.mmap(self.fd, size, mmap.MAP_SHARED | mmap.MAP_POPULATE,
                         mmap.PROT_READ | mmap.PROT_WRITE, offset=_OFF_SQ_RING)
        self._maps.append(ring)
        sqes = mmap.mmap(self.fd, sq_entries * _SQE_SIZE, mmap.MAP_SHARED | mmap.MAP_POPULATE,
                         mmap.PROT_READ | mmap.PROT_WRITE, offset=_OFF_SQES)
        self._maps.append(sqes)
        for m in self._maps:  # a forked child must not keep the ring (and /dev/fuse) alive
            m.madvise(mmap.MADV_DONTFORK)
        self._ring = ring
        self._sqes = sqes
        u32 = memoryview(ring).cast("I")
        self._views.append(u32)
        self._u32 = u32
        self._sq_tail = sq[1] // 4
        self._sq_mask = u32[sq[2] // 4]
        self._cq_head, self._cq_tail = cq[0] // 4, cq[1] // 4
        self._cq_mask = u32[cq[2] // 4]
        self._cqes = cq[5]
        array = sq[6] // 4
        for i in range(sq_entries):  # the SQ index array: slot i holds SQE i, once and for all
            u32[array + i] = i

    def _submit(self, ent: _Entry, cmd_op: int, commit_id: int, addr: int) -> None:
        u32 = self._u32
        tail = u32[self._sq_tail]
        _SQE.pack_into(self._sqes, (tail & self._sq_mask) * _SQE_SIZE, _OP_URING_CMD, 0, 0, self._fuse_fd,
                       cmd_op, 0, addr, 2 if addr else 0, 0, ent.index, 0, commit_id, ent.qid)
        u32[self._sq_tail] = (tail + 1) & 0xFFFFFFFF
        self._to_submit += 1
        self._armed += 1

    def _flush(self) -> None:
        """Hand queued SQEs to the kernel (never blocks)."""
        while self._to_submit:
            res = _syscall(_L(_SYS_ENTER), _L(self.fd), _L(self._to_submit), _L(0), _L(0), None, _L(0))
            if res < 0:
                e = ctypes.get_errno()
                if e in (errno.EINTR, errno.EAGAIN, errno.EBUSY):
                    continue
                raise OSError(e, f"io_uring_enter: {os.strerror(e)}")
            self._to_submit -= res

    def _reap(self) -> None:
        """Move completions off the CQ: requests to :attr:`_ready`, errors logged."""
        u32 = self._u32
        head = u32[self._cq_head]
        tail = u32[self._cq_tail]
        if head == tail:
            return
        ring, mask, base, entries = self._ring, self._cq_mask, self._cqes, self._entries
        while head != tail:
            index, res, _flags = _CQE.unpack_from(ring, base + (head & mask) * _CQE_SIZE)
            head = (head + 1) & 0xFFFFFFFF
            self._armed -= 1
            if res == 0:
                self._ready.append(entries[index])
            elif -res in _END_ERRNOS:
                self._gone = True
            else:
                log.error("io_uring entry %d (queue %d) failed: %s", index, entries[index].qid, os.strerror(-res))
        u32[self._cq_head] = head

    # -- registration ----------------------------------------------------------------------------

    def register(self, session: Session, neg: Negotiated) -> None:
        """Register every entry for the negotiated connection; raises :class:`UringUnavailable`
        if the kernel refuses (the connection then falls back to /dev/fuse)."""
        self._session = session
        self._fuse_fd = session.fd
        payload = max(8192, neg.max_write, neg.max_pages * mmap.PAGESIZE)
        n = self.queues * self.depth
        hdr_size = -(-_HEADER_SIZE // 64) * 64
        data_size = -(-(_PRE + payload) // mmap.PAGESIZE) * mmap.PAGESIZE
        # Anonymous mappings: pages are allocated only when a request touches them.
        hdrs = mmap.mmap(-1, n * hdr_size, mmap.MAP_PRIVATE)
        data = mmap.mmap(-1, n * data_size, mmap.MAP_PRIVATE)
        hbase = ctypes.addressof(ctypes.c_char.from_buffer(hdrs))
        dbase = ctypes.addressof(ctypes.c_char.from_buffer(data))
        self._buffers = (hdrs, data)  # kept alive while the kernel may write into them
        hv, dv = memoryview(hdrs), memoryview(data)
        for i in range(n):
            ent = _Entry(i, i // self.depth, hv[i * hdr_size:(i + 1) * hdr_size], hbase + i * hdr_size,
                         dv[i * data_size:(i + 1) * data_size], dbase + i * data_size, payload)
            self._entries.append(ent)
            self._submit(ent, _CMD_REGISTER, 0, ctypes.addressof(ent.iov))
        self._flush()
        self._reap()  # a refused REGISTER completes at once; accepted ones wait for requests
        refused = n - self._armed - len(self._ready)
        if refused:
            raise UringUnavailable(f"the kernel refused {refused} of {n} io_uring entries (see dmesg)")
        log.info("serving over io_uring: %d queues x %d entries, %d KiB payload each",
                 self.queues, self.depth, payload // 1024)

    # -- serving ---------------------------------------------------------------------------------

    @trio.lowlevel.enable_ki_protection  # Ctrl-C reaches the user's task, never this bookkeeping
    async def run(self, session: Session) -> None:
        """Serve requests from the ring until the connection ends or :meth:`stop`."""
        self._session = session
        self._lot = trio.lowlevel.ParkingLot()
        self._leader = False
        self._idle = 0
        self._workers = 0
        self._max_workers = len(self._entries) + 1
        with self._scope:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._start_worker(permanent=True)

    def stop(self) -> None:
        """Cancel the ring's tasks (and the handlers they run), even before :meth:`run` starts."""
        self._scope.cancel()

    def _start_worker(self, permanent: bool) -> None:
        self._workers += 1
        self._nursery.start_soon(self._worker, permanent)

    async def _next(self) -> _Entry | None:
        """The next request's entry (waiting for one); None once the connection has ended."""
        ready = self._ready
        while True:
            if not ready:
                self._reap()
            if ready and self._to_submit < _BATCH:
                return ready.popleft()  # more requests wait: commit these replies together
            if self._to_submit:
                self._flush()  # one io_uring_enter answers them and arms their entries
                continue
            if ready:
                return ready.popleft()
            if self._gone and not self._armed:
                return None
            await trio.lowlevel.wait_readable(self.fd)

    async def _worker(self, permanent: bool) -> None:
        lot = self._lot
        leader = False
        replace = False
        try:
            with trio.CancelScope() as wscope:  # INTERRUPT cancels it; see ReaderPool._worker
                while True:
                    if not leader:
                        while self._leader:
                            if not permanent and self._idle >= 1:
                                return
                            self._idle += 1
                            try:
                                await lot.park()
                            finally:
                                self._idle -= 1
                        self._leader = leader = True
                    try:
                        ent = await self._next()
                    except BaseException:
                        self._leader = False
                        lot.unpark()
                        raise
                    if ent is None:
                        self._leader = False
                        lot.unpark_all()
                        return
                    leader = not await self._serve(ent, wscope)
                    if wscope.cancel_called:
                        replace = True
                        return
        finally:
            self._workers -= 1
            if replace and not self._scope.cancel_called:
                self._start_worker(permanent)

    def _handoff(self) -> None:
        """The leader's handler blocks: let another task take the ring."""
        self._leader = False
        if self._idle:
            self._lot.unpark()
        elif self._workers < self._max_workers:
            self._start_worker(permanent=False)

    async def _serve(self, ent: _Entry, wscope: trio.CancelScope) -> bool:
        """Serve the request in ``ent`` and commit its reply; True if its handler blocked."""
        session = self._session
        assert session is not None
        hdr, data = ent.hdr, ent.data
        length, opcode, unique = _IN_HEAD.unpack_from(hdr)
        payload_sz = _U32.unpack_from(hdr, _ENT_PAYLOAD_SZ)[0]
        arg0 = length - 40 - payload_sz
        if not 0 <= arg0 <= _OP_IN_SIZE or payload_sz > len(data) - _PRE:
            log.error("malformed io_uring request (len %d, payload %d, opcode %d)", length, payload_sz, opcode)
            self._commit(ent, unique, replies.error(unique, errno.EIO))
            return False
        start = _PRE - 40 - arg0
        data[start:start + 40] = hdr[:40]
        if arg0:
            data[start + 40:_PRE] = hdr[_OP_IN:_OP_IN + arg0]
        try:
            req = session._decode(data[start:_PRE + payload_sz])
        except UnknownOpcode as e:
            log.warning("%s; answering ENOSYS", e)
            self._commit(ent, unique, replies.error(unique, errno.ENOSYS))
            return False
        except ProtocolError as e:
            log.error("malformed request from the kernel: %s", e)
            self._commit(ent, unique, None if opcode in NO_REPLY else replies.error(unique, errno.EIO))
            return False
        debug = log.isEnabledFor(logging.DEBUG)
        t0 = 0.0
        if debug:  # the same lines as for requests read from /dev/fuse
            log.debug("-> %s", describe_request(req))
            t0 = time.perf_counter()
        cls = type(req)
        pool = session.pool
        if cls is r.NotifyReplyRequest:
            session._notify_reply(req)  # type: ignore[arg-type]
            self._commit(ent, unique, None)
            return False
        if cls is r.InterruptRequest:  # the kernel sends these through /dev/fuse, but be safe
            pool.interrupt(req.target)  # type: ignore[attr-defined]
            self._commit(ent, unique, None)
            return False
        if cls is r.ForgetRequest:
            _, blocked = await self._drive(session.dispatcher.forget(req), None, wscope)  # type: ignore[arg-type]
            self._commit(ent, unique, None, blocked)
            return blocked
        ctx = RequestContext(session.connection, req, session.fd, wscope)
        _set_request(ctx)
        blocked = False
        reply: bytes | None
        if pool.early_interrupts and pool.interrupted_early(unique):
            reply = replies.error(unique, errno.EINTR)
        else:
            try:
                result, blocked = await self._drive(session._handle(req), unique, wscope, req)
                reply = _flat(result, unique)
            finally:
                ctx.handling = False
        session.served += 1
        self.served += 1
        written = self._commit(ent, unique, reply, blocked) and reply is not None
        if ctx.callbacks is not None:
            ctx.finish(written)
        if debug:
            log.debug("<- %s unique=%d: %s in %.1f us%s", cls.opcode.name, unique, describe_reply(reply),
                      (time.perf_counter() - t0) * 1e6, "" if written or reply is None else " (not delivered)")
        return blocked

    def _commit(self, ent: _Entry, unique: int, reply: bytes | None, flush: bool = False) -> bool:
        """Put ``reply`` into ``ent``'s buffers and queue COMMIT_AND_FETCH (which re-arms the
        entry; a request without a reply is committed empty). False if nothing can be committed."""
        if self._gone:
            return False
        hdr = ent.hdr
        commit_id = _U64.unpack_from(hdr, _ENT_COMMIT_ID)[0]
        if reply is None:
            _OUT_HEAD.pack_into(hdr, 0, 16, 0, unique)
            size = 0
        else:
            size = len(reply) - 16
            if size > len(ent.data) - _PRE:
                log.error("reply to unique %d (%d bytes) exceeds the ring's payload buffer; answering EIO",
                          unique, size)
                _OUT_HEAD.pack_into(hdr, 0, 16, -errno.EIO, unique)
                size = 0
            else:
                hdr[:16] = reply[:16]
                if size:
                    ent.data[_PRE:_PRE + size] = reply[16:]
        _U32.pack_into(hdr, _ENT_PAYLOAD_SZ, size)
        self._submit(ent, _CMD_COMMIT_AND_FETCH, commit_id, 0)
        if flush:  # the leader may be waiting on the ring: hand the commit over now
            self._flush()
        return True

    async def _drive(self, coro: Coroutine[Any, Any, Any], unique: int | None, wscope: trio.CancelScope,
                     request: object = None) -> tuple[Any, bool]:
        """Run a handler coroutine in this task, as :meth:`ReaderPool.drive` does, handing the
        ring to another task if it blocks; INTERRUPT (through the pool) answers EINTR."""
        try:
            msg = coro.send(None)
        except StopIteration as e:
            return e.value, False
        assert self._session is not None
        return await self._session.pool.resume(coro, msg, unique, wscope, request, handoff=self._handoff), True

    # -- teardown --------------------------------------------------------------------------------

    async def released(self, timeout: float = RELEASE_TIMEOUT) -> bool:
        """After :meth:`close`: wait until the kernel has freed the ring (False if that takes
        longer than ``timeout`` seconds, e.g. while a forked child still holds its descriptor).

        Freeing a ring, the kernel interrupts every thread that ever used it (task work sent
        with TWA_SIGNAL, which counts as a pending signal). Landing on a FUSE request that
        thread makes later — a C caller in the thread that ran a trio loop serving this ring —
        it makes the kernel send INTERRUPT and the caller gets EINTR with no signal sent. Waiting
        here, in the thread that served the ring, lets it land on this wait instead.
        """
        fd, self._witness = self._witness, -1
        if fd < 0:
            return True
        try:
            with trio.move_on_after(timeout):
                while True:
                    try:
                        if not os.read(fd, 1):
                            return True  # EOF: the ring and its registered files are gone
                    except BlockingIOError:
                        await trio.lowlevel.wait_readable(fd)
            log.debug("io_uring: the closed ring was not freed within %.1f s", timeout)
            return False
        finally:
            os.close(fd)

    def close(self) -> None:
        """Unmap and close the ring (before /dev/fuse is closed); :meth:`released` then waits
        until the kernel has freed it. Idempotent."""
        for v in self._views:
            v.release()
        self._views.clear()
        self._u32 = None  # type: ignore[assignment]
        for m in self._maps:
            try:
                m.close()
            except BufferError:  # pragma: no cover - a view still exported
                log.warning("io_uring mapping still in use; left to the garbage collector")
        self._maps.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self._ready.clear()
        self._entries.clear()  # the buffers go with the last entry a handler may still hold
        self._buffers = None


def negotiated_or_raise(neg: Negotiated, mode: IoUring) -> bool:
    """Whether INIT agreed on FUSE_OVER_IO_URING; raises :class:`UringUnavailable` for
    ``mode=True`` when it did not, logs for ``"auto"``."""
    if neg.has(InitFlag.OVER_IO_URING):
        return True
    if not neg.offered & InitFlag.OVER_IO_URING:
        enabled = uring_enabled()
        if enabled is False:
            why = (f"the fuse module parameter enable_uring is N (as root: echo Y > {ENABLE_URING_PATH})")
        elif enabled is None:
            why = "this kernel has no FUSE over io_uring (needs 6.14+ built with CONFIG_FUSE_IO_URING)"
        else:
            why = "the kernel did not offer FUSE_OVER_IO_URING"
    else:
        why = "FUSE_OVER_IO_URING was not negotiated"
    if mode is True:
        raise UringUnavailable(f"cannot serve over io_uring: {why}")
    log.info("io_uring=auto: serving over /dev/fuse, %s", why)
    return False


_set_request = _REQUEST.set


class _Yield:
    """Pass one trap of a hand-driven coroutine up to trio and return what trio sends back."""

    __slots__ = ("msg",)

    def __init__(self, msg: Any) -> None:
        self.msg = msg

    def __await__(self) -> Generator[Any, Any, Any]:
        return (yield self.msg)


def _flat(reply: Reply, unique: int) -> bytes | None:
    """A dispatcher reply as one message for the ring's payload buffer: a vector joined, a
    spliced READ read into memory (its file's error answered as that errno)."""
    if reply is None or isinstance(reply, bytes):
        return reply
    if isinstance(reply, SplicedReply):
        try:
            return reply.to_bytes()
        except OSError as e:
            return replies.error(unique, e.errno or errno.EIO)
    return b"".join(reply)
