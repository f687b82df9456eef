"""Encoders of notifications (daemon to kernel messages with unique 0)."""

from __future__ import annotations

from collections.abc import Sequence

from . import structs as S
from .constants import EXPIRE_ONLY, NotifyCode

_HDR = S.OUT_HEADER


def _msg(code: NotifyCode, body: bytes) -> bytes:
    return _HDR.pack(16 + len(body), int(code), 0) + body


def poll_wakeup(kh: int) -> bytes:
    """Wake the pollers of the file whose POLL request carried ``kh``."""
    return _msg(NotifyCode.POLL, S.NOTIFY_POLL_WAKEUP_OUT.pack(kh))


def inval_inode(nodeid: int, offset: int = -1, length: int = 0) -> bytes:
    """Drop cached attributes; with ``offset`` >= 0 also cached data from there (``length`` <= 0: to EOF)."""
    return _msg(NotifyCode.INVAL_INODE, S.NOTIFY_INVAL_INODE_OUT.pack(nodeid, offset, length))


def inval_entry(parent: int, name: bytes, expire_only: bool = False) -> bytes:
    """Invalidate (or only expire) the cached entry ``name`` in directory ``parent``."""
    flags = EXPIRE_ONLY if expire_only else 0
    return _msg(NotifyCode.INVAL_ENTRY, S.NOTIFY_INVAL_ENTRY_OUT.pack(parent, len(name), flags) + name + b"\0")


def delete(parent: int, child: int, name: bytes) -> bytes:
    """Tell the kernel ``name`` (nodeid ``child``) was deleted from ``parent``."""
    return _msg(NotifyCode.DELETE, S.NOTIFY_DELETE_OUT.pack(parent, child, len(name), 0) + name + b"\0")


def store(nodeid: int, offset: int, data: bytes) -> bytes:
    """Put ``data`` into the page cache of ``nodeid`` at ``offset``."""
    return _msg(NotifyCode.STORE, S.NOTIFY_STORE_OUT.pack(nodeid, offset, len(data), 0) + data)


def retrieve(notify_unique: int, nodeid: int, offset: int, size: int) -> bytes:
    """Ask for cached data; the kernel answers with a NOTIFY_REPLY request carrying ``notify_unique``."""
    return _msg(NotifyCode.RETRIEVE, S.NOTIFY_RETRIEVE_OUT.pack(notify_unique, nodeid, offset, size, 0))


def resend() -> bytes:
    """Re-queue every request that was read but not answered (with the resend bit set)."""
    return _msg(NotifyCode.RESEND, b"")


def inc_epoch() -> bytes:
    """Invalidate every dentry looked up before now (revalidated lazily)."""
    return _msg(NotifyCode.INC_EPOCH, b"")


def prune(nodeids: Sequence[int]) -> bytes:
    """Ask the kernel to evict these inodes (busy ones stay); FORGETs follow."""
    body = S.NOTIFY_PRUNE_OUT.pack(len(nodeids), 0, 0) + b"".join(S.U64.pack(n) for n in nodeids)
    return _msg(NotifyCode.PRUNE, body)
