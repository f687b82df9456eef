"""File locks kept by the filesystem: POSIX record locks (fcntl) and flock(2) locks.

A filesystem that answers GETLK/SETLK/SETLKW and flock itself (rather than letting the kernel
keep them locally) gives each file a :class:`FileLocks` sharing one :class:`LockWaits` per
filesystem (for EDEADLK detection across files), and calls them from its handles::

    async def setlk(self, req):                 # on a FileHandle
        await self.node.locks.setlk(req)

Waiting (SETLKW, blocking flock) is cancellable: an INTERRUPT cancels the handler.
"""

from __future__ import annotations

import errno

import trio

from ..errors import FUSEError
from ..wire import requests as r
from ..wire.types import Lock

__all__ = ["F_RDLCK", "F_UNLCK", "F_WRLCK", "FileLocks", "LockWaits"]

F_RDLCK, F_WRLCK, F_UNLCK = 0, 1, 2
_EOF = 0x7FFFFFFFFFFFFFFF
#: How far deadlock detection follows the chain of waiting owners (as Linux).
_MAX_DEADLK_STEPS = 10

#: A POSIX lock: owner, type, start, end (inclusive), pid.
PosixLock = tuple[int, int, int, int, int]


class LockWaits:
    """The lock owners waiting in SETLKW on any file of one filesystem (for EDEADLK)."""

    def __init__(self) -> None:
        self.waiting: dict[int, tuple[FileLocks, int, int, int]] = {}

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


class FileLocks:
    """The locks of one file: POSIX record locks by lock owner, flock locks by open file."""

    def __init__(self, waits: LockWaits) -> None:
        self.waits = waits
        #: POSIX record locks.
        self.posix: list[PosixLock] = []
        #: flock(2) locks: open file (any hashable) -> F_RDLCK / F_WRLCK.
        self.flocks: dict[object, int] = {}
        self._event: trio.Event | None = None

    def _wake(self) -> None:
        ev, self._event = self._event, None
        if ev is not None:
            ev.set()

    async def _wait(self) -> None:
        if self._event is None:
            self._event = trio.Event()
        await self._event.wait()

    def conflict(self, owner: int, typ: int, start: int, end: int) -> PosixLock | None:
        """A POSIX lock of another owner in the way of ``typ`` on [start, end]."""
        return next((lk for lk in self.posix if lk[0] != owner and lk[2] <= end and start <= lk[3]
                     and (typ == F_WRLCK or lk[1] == F_WRLCK)), None)

    def set_posix(self, owner: int, typ: int, start: int, end: int, pid: int) -> None:
        """Give ``owner`` ``typ`` on [start, end] without checking (F_UNLCK: drop), merging and
        splitting its own locks as Linux does; waiters are woken."""
        keep = []
        for o, t, s, e, p in self.posix:
            if o != owner or e < start - 1 or s > end + 1 or (t != typ and (e < start or s > end)):
                keep.append((o, t, s, e, p))
            elif t == typ:
                start, end = min(s, start), max(e, end)
            else:
                keep += [(o, t, s, start - 1, p)] * (s < start) + [(o, t, end + 1, e, p)] * (e > end)
        self.posix = keep + [(owner, typ, start, end, pid)] * (typ != F_UNLCK)
        self._wake()

    def drop_posix(self, owner: int) -> None:
        """Drop ``owner``'s record locks (close(2) of any descriptor of the file does)."""
        if any(lk[0] == owner for lk in self.posix):
            self.set_posix(owner, F_UNLCK, 0, _EOF, 0)

    def drop_flock(self, holder: object) -> None:
        """Drop the flock lock of open file ``holder`` (its release)."""
        if self.flocks.pop(holder, None) is not None:
            self._wake()

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
        while lk.type != F_UNLCK and (c := self.conflict(owner, lk.type, lk.start, lk.end)) is not None:
            if not req.sleep:
                raise FUSEError(errno.EAGAIN)
            if self.waits.deadlock(owner, c[0]):
                raise FUSEError(errno.EDEADLK)
            waiting[owner] = (self, lk.type, lk.start, lk.end)
            try:
                await self._wait()
            finally:
                waiting.pop(owner, None)
        self.set_posix(owner, lk.type, lk.start, lk.end, lk.pid)

    async def flock(self, req: r.SetlkRequest, holder: object) -> None:
        """flock(2) for open file ``holder``: a conversion drops the old lock first, as Linux does."""
        typ = req.lock.type
        if typ not in (F_RDLCK, F_WRLCK, F_UNLCK):
            raise FUSEError(errno.EINVAL)
        if self.flocks.get(holder) == typ:
            return
        self.drop_flock(holder)
        while typ != F_UNLCK and any(o != holder and F_WRLCK in (typ, t) for o, t in self.flocks.items()):
            if not req.sleep:
                raise FUSEError(errno.EWOULDBLOCK)
            await self._wait()
        if typ != F_UNLCK:
            self.flocks[holder] = typ
