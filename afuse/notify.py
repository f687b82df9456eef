"""Notifications: the filesystem telling the kernel something changed.

Each function takes a serving :class:`~afuse.session.Session`; the session's sans-IO
:class:`~afuse.wire.connection.Connection` encodes the message and checks that the kernel can
take it. Each fails with :class:`~afuse.errors.NotNegotiated` where the kernel lacks the
feature, and with the kernel's errno as :class:`OSError` (ENOENT: the inode or entry is not
cached — usually harmless).

Notifications are written from a worker thread: the kernel may hold an inode lock while a
caller waits for one of this filesystem's replies, and a notification needing that lock must
not stop the event loop that would send the reply.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import trio

from .session import Session

#: RETRIEVE's notify_unique comes back as the NOTIFY_REPLY request's unique. Over io_uring that
#: reply is committed by its unique (the kernel finds the request to end by it in the ring queue),
#: so it must be even (odd uniques are interrupt replies to the kernel) and never one of the
#: kernel's own request ids (2, 4, 6, ...): from 2**62, stepping by 2.
_retrieve_ids = itertools.count(1 << 62, 2)


async def inval_inode(session: Session, nodeid: int, offset: int = -1, length: int = 0) -> None:
    """Drop the kernel's cached attributes of ``nodeid``; with ``offset`` >= 0 also its cached
    data from ``offset`` for ``length`` bytes (``length`` <= 0: to the end)."""
    await session.notify(session.connection.inval_inode(nodeid, offset, length))


async def inval_entry(session: Session, parent: int, name: bytes, expire_only: bool = False) -> None:
    """Forget the cached lookup of ``name`` in ``parent``; the next access looks it up again.

    ``expire_only`` marks it expired without dropping it (needs FUSE_HAS_EXPIRE_ONLY).
    """
    await session.notify(session.connection.inval_entry(parent, name, expire_only))


async def delete(session: Session, parent: int, child: int, name: bytes) -> None:
    """Tell the kernel ``name`` (nodeid ``child``) is gone from ``parent``."""
    await session.notify(session.connection.delete(parent, child, name))


async def store(session: Session, nodeid: int, offset: int, data: bytes) -> None:
    """Put ``data`` into the page cache of ``nodeid`` at ``offset`` (may extend its size)."""
    await session.notify(session.connection.store(nodeid, offset, data))


async def retrieve(session: Session, nodeid: int, offset: int, size: int, timeout: float = 10.0) -> bytes:
    """The bytes the kernel has cached for ``nodeid`` from ``offset`` (up to ``size``; fewer,
    or none, where the cache holds less)."""
    notify_unique = next(_retrieve_ids)
    recv = session.expect_notify_reply(notify_unique)
    try:
        await session.notify(session.connection.retrieve(notify_unique, nodeid, offset, size))
        with trio.fail_after(timeout):
            reply = await recv.receive()
    finally:  # the kernel refused it (ENOENT: not cached) or never answered: stop waiting
        session.forget_notify_reply(notify_unique)
    return reply.data


async def poll_wakeup(session: Session, kh: int) -> None:
    """Wake the pollers of the file whose POLL request carried ``kh``."""
    await session.notify(session.connection.poll_wakeup(kh))


async def resend(session: Session) -> None:
    """Ask the kernel to send again every request that was read but not answered.

    Resent requests carry the resend bit (``req.is_resend``). Needs protocol 7.40.
    """
    await session.notify(session.connection.resend())


async def inc_epoch(session: Session) -> None:
    """Invalidate every dentry cached so far; each is revalidated on next use (7.44)."""
    await session.notify(session.connection.inc_epoch())


async def prune(session: Session, nodeids: Sequence[int]) -> None:
    """Ask the kernel to evict these inodes from its caches; FORGETs follow for those it drops
    (busy ones stay). Needs protocol 7.45."""
    message = session.connection.prune(nodeids)
    if nodeids:
        await session.notify(message)
