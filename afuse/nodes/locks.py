"""File locks kept by the filesystem: POSIX record locks (fcntl) and flock(2) locks.

A filesystem that answers GETLK/SETLK/SETLKW and flock itself (rather than letting the kernel
keep them locally) gives each file a :class:`FileLocks` sharing one :class:`LockWaits` per
filesystem (for EDEADLK detection across files), and calls them from its handles::

    async def setlk(self, req):                 # on a FileHandle
        await self.node.locks.setlk(req)

Waiting (SETLKW, blocking flock) is cancellable: an INTERRUPT cancels the handler.

A filesystem whose locks are host locks (the loopback: OFD locks and flock(2) on host
descriptors) waits for them in the host kernel instead: :func:`ofd_setlkw` and :func:`flock_wait`
try the lock at once and, when it is taken, wait in a worker thread inside the blocking system
call, so the kernel hands the lock over as soon as it is free. An INTERRUPT (cancellation)
stops that wait: the thread gets :data:`WAKE_SIGNAL` (a no-op handler, so the call fails with
EINTR) until it returns, and a lock granted at that very moment is released again.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import signal
import struct
import threading
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import outcome
import trio

from ..errors import FUSEError, SessionError
from ..wire import requests as r
from ..wire.types import Lock

__all__ = ["F_RDLCK", "F_UNLCK", "F_WRLCK", "WAKE_SIGNAL", "FileLocks", "LockWaits", "OFDLockWaits", "flock_wait",
           "leave_to_successor", "ofd_setlkw",
           "wait_in_thread"]

F_RDLCK, F_WRLCK, F_UNLCK = 0, 1, 2
_EOF = 0x7FFFFFFFFFFFFFFF
#: How far deadlock detection follows the chain of waiting owners (as Linux).
_MAX_DEADLK_STEPS = 10

#: A POSIX lock: owner, type, start, end (inclusive), pid.
PosixLock = tuple[int, int, int, int, int]


def leave_to_successor() -> None:
    """Called by a handler about to wait for a lock: a graceful upgrade (drain) may leave this
    request unanswered instead of waiting for it; the kernel resends it to the successor, which
    waits on (the locks being kept state). Outside a session it does nothing."""
    from ..context import current_request_or_none
    from ..session import current_session

    ctx = current_request_or_none()
    if ctx is not None:
        with contextlib.suppress(SessionError):
            current_session().pool.resendable.add(ctx.request.unique)


class LockWaits:
    """The lock owners waiting in SETLKW on any file of one filesystem (for EDEADLK)."""

    def __init__(self) -> None:
        self.waiting: dict[int, tuple[FileLocks, int, int, int]] = {}
        #: Called with a file's :class:`FileLocks` after its locks changed (e.g. to journal them).
        self.changed: Callable[[FileLocks], None] | None = None

    def deadlock(self, me: int, blocker: int) -> bool:
        """Would ``me`` waiting for ``blocker`` close a cycle of waiting owners?"""
        for _ in range(_MAX_DEADLK_STEPS):
            if blocker == me:
                return True
            w = self.waiting.get(blocker)
            lk = None if w is None else w[0].conflict(blocker, *w[1:])
            if lk is None:
                return False
            blocker = lk[0]
        return False


class _Queued:
    """A SETLKW or blocking flock waiting in a :class:`FileLocks` queue."""

    __slots__ = ("end", "event", "granted", "holder", "owner", "pid", "start", "typ")

    def __init__(self, owner: int, typ: int, start: int, end: int, pid: int, holder: object = None) -> None:
        self.owner, self.typ, self.start, self.end, self.pid, self.holder = owner, typ, start, end, pid, holder
        self.event = trio.Event()
        self.granted = False


class FileLocks:
    """The locks of one file: POSIX record locks by lock owner, flock locks by open file.

    Waiters queue in arrival order; a release hands the lock straight to the first waiters it
    frees (granting it inside the releasing request), so a process that unlocks and locks again
    at once cannot take it back before them: no waiter starves.
    """

    def __init__(self, waits: LockWaits) -> None:
        self.waits = waits
        #: POSIX record locks.
        self.posix: list[PosixLock] = []
        #: flock(2) locks: open file (any hashable) -> F_RDLCK / F_WRLCK.
        self.flocks: dict[object, int] = {}
        #: Whatever the filesystem identifies the file by (for :attr:`LockWaits.changed`).
        self.tag: object = None
        #: Waiting requests, oldest first.
        self.queue: list[_Queued] = []

    def _changed(self) -> None:
        if self.waits.changed is not None:
            self.waits.changed(self)

    def dump(self, fh_of: Callable[[object], int | None]) -> list[Any]:
        """The locks as JSON: [POSIX locks, [fh, type] of each flock lock] (``fh_of``: an open
        file's handle number, None to leave it out)."""
        return [[list(lk) for lk in self.posix],
                [[fh, t] for h, t in self.flocks.items() if (fh := fh_of(h)) is not None]]

    def load(self, state: list[Any], holder_of: Callable[[int], object | None]) -> None:
        """Become the locks of ``state`` (from :meth:`dump`; ``holder_of``: the open file of a handle number)."""
        posix, flocks = state
        self.posix = [(o, t, s, e, p) for o, t, s, e, p in posix]
        self.flocks = {h: t for fh, t in flocks if (h := holder_of(fh)) is not None}
        self._grant()

    def conflict(self, owner: int, typ: int, start: int, end: int) -> PosixLock | None:
        """A POSIX lock of another owner in the way of ``typ`` on [start, end]."""
        return next((lk for lk in self.posix if lk[0] != owner and lk[2] <= end and start <= lk[3]
                     and (typ == F_WRLCK or lk[1] == F_WRLCK)), None)

    def _flock_conflict(self, holder: object, typ: int) -> bool:
        return any(o is not holder and F_WRLCK in (typ, t) for o, t in self.flocks.items())

    def _apply(self, owner: int, typ: int, start: int, end: int, pid: int) -> None:
        keep = []
        for o, t, s, e, p in self.posix:
            if o != owner or e < start - 1 or s > end + 1 or (t != typ and (e < start or s > end)):
                keep.append((o, t, s, e, p))
            elif t == typ:
                start, end = min(s, start), max(e, end)
            else:
                keep += [(o, t, s, start - 1, p)] * (s < start) + [(o, t, end + 1, e, p)] * (e > end)
        self.posix = keep + [(owner, typ, start, end, pid)] * (typ != F_UNLCK)

    def _grant(self) -> None:
        """Give the lock to each waiter, oldest first, that nothing is in the way of any more."""
        i = 0
        while i < len(self.queue):
            w = self.queue[i]
            if w.holder is None:
                if self.conflict(w.owner, w.typ, w.start, w.end) is not None:
                    i += 1
                    continue
                self._apply(w.owner, w.typ, w.start, w.end, w.pid)
            else:
                if self._flock_conflict(w.holder, w.typ):
                    i += 1
                    continue
                self.flocks[w.holder] = w.typ
            del self.queue[i]
            w.granted = True
            w.event.set()

    def set_posix(self, owner: int, typ: int, start: int, end: int, pid: int) -> None:
        """Give ``owner`` ``typ`` on [start, end] without checking (F_UNLCK: drop), merging and
        splitting its own locks as Linux does; waiters it frees get their locks."""
        self._apply(owner, typ, start, end, pid)
        self._grant()
        self._changed()

    def drop_posix(self, owner: int) -> None:
        """Drop ``owner``'s record locks (close(2) of any descriptor of the file does)."""
        if any(lk[0] == owner for lk in self.posix):
            self.set_posix(owner, F_UNLCK, 0, _EOF, 0)

    def drop_flock(self, holder: object) -> None:
        """Drop the flock lock of open file ``holder`` (its release)."""
        if self.flocks.pop(holder, None) is not None:
            self._grant()
            self._changed()

    async def _wait(self, w: _Queued) -> None:
        """Queue ``w`` until it is granted; a cancellation after the grant is too late (the caller
        has the lock, and is answered so)."""
        self.queue.append(w)
        leave_to_successor()
        try:
            await w.event.wait()
        except trio.Cancelled:
            if not w.granted:
                raise
        finally:
            if not w.granted:
                self.queue.remove(w)

    async def getlk(self, req: r.GetlkRequest) -> Lock:
        """F_GETLK: the first conflicting lock, or F_UNLCK."""
        lk = req.lock
        if lk.type not in (F_RDLCK, F_WRLCK):
            raise FUSEError(errno.EINVAL)
        c = self.conflict(req.owner, lk.type, lk.start, lk.end)
        return Lock(lk.start, lk.end, F_UNLCK, 0) if c is None else Lock(c[2], c[3], c[1], c[4])

    async def setlk(self, req: r.SetlkRequest) -> None:
        """F_SETLK / F_SETLKW: EAGAIN when taken (without waiting), EDEADLK when waiting would
        close a cycle of owners waiting for each other."""
        lk, owner, waiting = req.lock, req.owner, self.waits.waiting
        if lk.start < 0 or lk.end < lk.start or lk.type not in (F_RDLCK, F_WRLCK, F_UNLCK):
            raise FUSEError(errno.EINVAL)
        c = None if lk.type == F_UNLCK else self.conflict(owner, lk.type, lk.start, lk.end)
        if c is None:
            self.set_posix(owner, lk.type, lk.start, lk.end, lk.pid)
            return
        if not req.sleep:
            raise FUSEError(errno.EAGAIN)
        if self.waits.deadlock(owner, c[0]):
            raise FUSEError(errno.EDEADLK)
        me = waiting[owner] = (self, lk.type, lk.start, lk.end)
        try:
            await self._wait(_Queued(owner, lk.type, lk.start, lk.end, lk.pid))
        finally:
            if waiting.get(owner) is me:
                del waiting[owner]
        self._changed()

    async def flock(self, req: r.SetlkRequest, holder: object) -> None:
        """flock(2) for open file ``holder``: a conversion drops the old lock first, as Linux does."""
        typ = req.lock.type
        if typ not in (F_RDLCK, F_WRLCK, F_UNLCK):
            raise FUSEError(errno.EINVAL)
        if self.flocks.get(holder) == typ:
            return
        self.drop_flock(holder)
        if typ == F_UNLCK:
            return
        if not self._flock_conflict(holder, typ):
            self.flocks[holder] = typ
        elif not req.sleep:
            raise FUSEError(errno.EWOULDBLOCK)
        else:
            await self._wait(_Queued(0, typ, 0, 0, 0, holder))
        self._changed()


# -- waiting for host locks in a worker thread --------------------------------------------------

F_OFD_GETLK, F_OFD_SETLK, F_OFD_SETLKW = 36, 37, 38
#: The signal that interrupts a worker thread's lock wait (its handler does nothing).
WAKE_SIGNAL = signal.SIGRTMAX - 2
_libc = ctypes.CDLL(None, use_errno=True)
_c_fcntl = _libc.fcntl
_c_fcntl.restype, _c_fcntl.argtypes = ctypes.c_int, [ctypes.c_int, ctypes.c_int, ctypes.c_char_p]
_c_flock = _libc.flock
_c_flock.restype, _c_flock.argtypes = ctypes.c_int, [ctypes.c_int, ctypes.c_int]
_handler_lock = threading.Lock()
_handler_set = False


class _SigAction(ctypes.Structure):
    _fields_ = (("handler", ctypes.c_void_p), ("mask", ctypes.c_ulong * 16),
                ("flags", ctypes.c_int), ("restorer", ctypes.c_void_p))


def _install_handler() -> None:
    """Give WAKE_SIGNAL a handler that does nothing and does not restart system calls (once).

    Python's ``signal.signal`` works only in the main thread and would wake it for every
    signal; libc's ``abs`` (a pure function of one int) serves as a C no-op handler instead.
    """
    global _handler_set
    with _handler_lock:
        if _handler_set:
            return
        act = _SigAction()
        act.handler = ctypes.cast(_libc.abs, ctypes.c_void_p).value
        sigaction = _libc.sigaction
        sigaction.restype = ctypes.c_int
        sigaction.argtypes = [ctypes.c_int, ctypes.POINTER(_SigAction), ctypes.POINTER(_SigAction)]
        if sigaction(int(WAKE_SIGNAL), ctypes.byref(act), None) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e), "sigaction")
        _handler_set = True


class _Waiter:
    """One blocking lock call in a worker thread, stoppable from outside."""

    def __init__(self, call: Callable[[], int]) -> None:
        self.call = call
        self.mutex = threading.Lock()
        self.stopped = False
        self.ident: int | None = None

    def run(self) -> int:
        """In the worker: repeat the call until it succeeds, fails, or :meth:`stop` (an errno or 0)."""
        with self.mutex:
            if self.stopped:
                return errno.EINTR
            self.ident = threading.get_ident()
        try:
            while True:
                if self.call() == 0:
                    return 0
                e = ctypes.get_errno()
                if e != errno.EINTR:
                    return e
                if self.stopped:
                    return errno.EINTR
        finally:
            with self.mutex:
                self.ident = None

    def stop(self) -> bool:
        """Ask the worker to stop waiting; True while it still has to notice (signal it again later)."""
        with self.mutex:
            self.stopped = True
            if self.ident is None:
                return False
            signal.pthread_kill(self.ident, WAKE_SIGNAL)
            return True


async def _keep_waking(w: _Waiter) -> None:
    # The first signal may land just before the thread enters the system call: repeat it.
    delay = 0.0005
    while w.stop():
        await trio.sleep(delay)
        delay = min(delay * 2, 0.02)


async def wait_in_thread(call: Callable[[], int], undo: Callable[[], object]) -> None:
    """Run the blocking ``call`` (a libc call returning 0 or -1 with errno) in a worker thread.

    Raises OSError with its errno on failure. Cancellation interrupts the call; if it succeeded
    all the same, ``undo`` runs before Cancelled propagates.
    """
    _install_handler()
    w = _Waiter(call)
    task, token = trio.lowlevel.current_task(), trio.lowlevel.current_trio_token()
    cancel: list[trio.lowlevel.RaiseCancelT] = []

    def deliver(result: outcome.Outcome[int]) -> None:
        try:
            token.run_sync_soon(trio.lowlevel.reschedule, task, result)
        except trio.RunFinishedError:
            pass

    def abort(raise_cancel: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
        cancel.append(raise_cancel)
        if w.stop():
            trio.lowlevel.spawn_system_task(_keep_waking, w)
        return trio.lowlevel.Abort.FAILED  # the thread's result reschedules the task

    leave_to_successor()
    trio.lowlevel.start_thread_soon(w.run, deliver)
    err: int = await trio.lowlevel.wait_task_rescheduled(abort)
    if cancel:
        if err == 0:
            undo()
        cancel[0]()
    if err:
        raise OSError(err, os.strerror(err))


async def ofd_setlkw(fd: int, flock: bytes) -> None:
    """F_OFD_SETLKW on ``fd`` with ``struct flock`` bytes: at once if free, else waiting in a
    worker thread (cancellable; see :func:`wait_in_thread`)."""
    buf = ctypes.create_string_buffer(flock, len(flock))
    if _c_fcntl(fd, F_OFD_SETLK, buf) == 0:
        return
    e = ctypes.get_errno()
    if e not in (errno.EAGAIN, errno.EACCES):
        raise OSError(e, os.strerror(e))
    waiter_fd = os.dup(fd)  # the same open file description, whatever happens to ``fd`` meanwhile
    try:
        unlock = ctypes.create_string_buffer(struct.pack("=h", fcntl.F_UNLCK) + flock[2:], len(flock))
        await wait_in_thread(lambda: int(_c_fcntl(waiter_fd, F_OFD_SETLKW, buf)),
                             lambda: _c_fcntl(waiter_fd, F_OFD_SETLK, unlock))
    finally:
        os.close(waiter_fd)


async def flock_wait(fd: int, op: int) -> None:
    """flock(2) ``op`` (LOCK_SH / LOCK_EX) on ``fd``: at once if free, else waiting in a worker
    thread (cancellable; see :func:`wait_in_thread`)."""
    try:
        fcntl.flock(fd, op | fcntl.LOCK_NB)  # half the cost of the ctypes call, the usual case
        return
    except BlockingIOError:
        pass
    waiter_fd = os.dup(fd)
    try:
        await wait_in_thread(lambda: int(_c_flock(waiter_fd, op)), lambda: _c_flock(waiter_fd, fcntl.LOCK_UN))
    finally:
        os.close(waiter_fd)


class _HasFd(Protocol):
    fd: int


#: One file's lock descriptors: lock owner -> what holds its OFD descriptor (``.fd``).
OwnerFds = Mapping[int, _HasFd]


class OFDLockWaits:
    """POSIX locks kept as OFD locks on host files, one descriptor per lock owner and file: the
    owners waiting in SETLKW, so that a wait that would close a cycle of owners waiting for each
    other fails with EDEADLK, as the kernel's own POSIX locks do (OFD locks alone never do)."""

    def __init__(self) -> None:
        #: Waiting owner -> (its file's owner descriptors, the ``struct flock`` it waits for).
        self.waiting: dict[int, tuple[OwnerFds, bytes]] = {}

    @staticmethod
    def holder(owners: OwnerFds, owner: int, flock: bytes) -> int | None:
        """The owner holding a lock in the way of ``owner``'s ``flock`` (None: free, or held
        by no owner of this filesystem); only the holder does not see that lock as a conflict."""
        mine = owners.get(owner)
        if mine is None:
            return None
        seen = fcntl.fcntl(mine.fd, F_OFD_GETLK, flock)
        if struct.unpack_from("=h", seen)[0] == fcntl.F_UNLCK:
            return None
        return next((o for o, lf in owners.items()
                     if o != owner and fcntl.fcntl(lf.fd, F_OFD_GETLK, flock) != seen), None)

    def deadlock(self, owner: int, blocker: int) -> bool:
        """Would ``owner`` waiting for ``blocker`` close a cycle of waiting owners?"""
        for _ in range(_MAX_DEADLK_STEPS):
            if blocker == owner:
                return True
            w = self.waiting.get(blocker)
            nxt = None if w is None else self.holder(w[0], blocker, w[1])
            if nxt is None:
                return False
            blocker = nxt
        return False

    async def setlk(self, owners: OwnerFds, owner: int, flock: bytes, sleep: bool) -> None:
        """F_SETLK(W) of ``owner`` (whose descriptor ``owners`` holds) with ``struct flock`` bytes:
        EAGAIN when taken and not ``sleep``; EDEADLK when waiting would deadlock; else it waits
        in the host kernel (:func:`ofd_setlkw`)."""
        fd = owners[owner].fd
        try:
            fcntl.fcntl(fd, F_OFD_SETLK, flock)
            return
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            if not sleep or struct.unpack_from("=h", flock)[0] == fcntl.F_UNLCK:
                raise FUSEError(errno.EAGAIN) from None
        blocker = self.holder(owners, owner, flock)
        if blocker is not None and self.deadlock(owner, blocker):
            raise FUSEError(errno.EDEADLK)
        me = self.waiting[owner] = (owners, flock)
        try:
            await ofd_setlkw(fd, flock)
        finally:
            if self.waiting.get(owner) is me:
                del self.waiting[owner]
