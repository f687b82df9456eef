"""Notifications: the filesystem telling the kernel something changed.

Each function takes a serving :class:`~afuse.session.Session`. Each fails with
:class:`~afuse.errors.NotNegotiated` where the kernel lacks the feature, and with the kernel's
errno as :class:`OSError` (ENOENT: the inode or entry is not cached — usually harmless).

Notifications are written from a worker thread: the kernel may hold an inode lock while a
caller waits for one of this filesystem's replies, and a notification needing that lock must
not stop the event loop that would send the reply.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import trio

from .errors import NotNegotiated
from .session import Session
from .wire import notify as wire
from .wire.constants import KERNEL_VERSION, InitFlag

_retrieve_ids = itertools.count(1)


def _minor(session: Session, minor: int, what: str) -> None:
    neg = session.negotiated
    if neg is None or neg.minor < minor:
        have = f"{KERNEL_VERSION}.{neg.minor}" if neg else "no session"
        raise NotNegotiated(f"{what} needs protocol {KERNEL_VERSION}.{minor}; negotiated {have}")


async def inval_inode(session: Session, nodeid: int, offset: int = -1, length: int = 0) -> None:
    """Drop the kernel's cached attributes of ``nodeid``; with ``offset`` >= 0 also its cached
    data from ``offset`` for ``length`` bytes (``length`` <= 0: to the end)."""
    await session.notify(wire.inval_inode(nodeid, offset, length))


async def inval_entry(session: Session, parent: int, name: bytes, expire_only: bool = False) -> None:
    """Forget the cached lookup of ``name`` in ``parent``; the next access looks it up again.

    ``expire_only`` marks it expired without dropping it (needs FUSE_HAS_EXPIRE_ONLY).
    """
    if expire_only:
        session.require(InitFlag.HAS_EXPIRE_ONLY, "inval_entry(expire_only=True)")
    await session.notify(wire.inval_entry(parent, name, expire_only))


async def delete(session: Session, parent: int, child: int, name: bytes) -> None:
    """Tell the kernel ``name`` (nodeid ``child``) is gone from ``parent``."""
    await session.notify(wire.delete(parent, child, name))


async def store(session: Session, nodeid: int, offset: int, data: bytes) -> None:
    """Put ``data`` into the page cache of ``nodeid`` at ``offset`` (may extend its size)."""
    await session.notify(wire.store(nodeid, offset, data))


async def retrieve(session: Session, nodeid: int, offset: int, size: int, timeout: float = 10.0) -> bytes:
    """The bytes the kernel has cached for ``nodeid`` from ``offset`` (up to ``size``; fewer,
    or none, where the cache holds less)."""
    notify_unique = next(_retrieve_ids)
    recv = session.expect_notify_reply(notify_unique)
    try:
        await session.notify(wire.retrieve(notify_unique, nodeid, offset, size))
        with trio.fail_after(timeout):
            reply = await recv.receive()
    finally:  # the kernel refused it (ENOENT: not cached) or never answered: stop waiting
        session._retrieve_waiters.pop(notify_unique, None)
    return reply.data


async def poll_wakeup(session: Session, kh: int) -> None:
    """Wake the pollers of the file whose POLL request carried ``kh``."""
    await session.notify(wire.poll_wakeup(kh))


async def resend(session: Session) -> None:
    """Ask the kernel to send again every request that was read but not answered.

    Resent requests carry the resend bit (``req.is_resend``). Needs protocol 7.40.
    """
    _minor(session, 40, "resend")
    await session.notify(wire.resend())


async def inc_epoch(session: Session) -> None:
    """Invalidate every dentry cached so far; each is revalidated on next use (7.44)."""
    _minor(session, 44, "inc_epoch")
    await session.notify(wire.inc_epoch())


async def prune(session: Session, nodeids: Sequence[int]) -> None:
    """Ask the kernel to evict these inodes from its caches; FORGETs follow for those it drops
    (busy ones stay). Needs protocol 7.45."""
    _minor(session, 45, "prune")
    if not nodeids:
        return
    await session.notify(wire.prune(nodeids))
