"""Answering replayed requests: what a handler must do to be safe under FUSE_NOTIFY_RESEND.

When a daemon takes over a live connection (:class:`afuse.session.Takeover`, or
:func:`afuse.notify.resend`), the kernel sends again every request that had been read but not
answered, with bit 63 of ``unique`` set: ``req.is_resend`` is True and ``req.request_id`` equals
the first attempt's ``unique``. The first attempt may have done all, part or none of its work
before its daemon died; only its reply is known to be lost. (``FUSE_HAS_RESEND``, INIT bit 39,
is asked for by default — see :meth:`afuse.wire.init.InitConfig.wanted_flags` — but it is
informational only: the kernel always advertises it from 7.40 on and ignores it in the reply.
Resent requests arrive whether or not it was negotiated.)

Idempotent operations are safe as they are: lookup, getattr, readlink, open, read, statfs,
getxattr, listxattr, access, readdir, poll, lseek, fsync, flush, setattr (it sets absolute
values), write at an offset without ``O_APPEND`` (a plain rewrite of the same bytes),
fallocate, setxattr without flags, removexattr (ENODATA on a replay is mostly harmless), getlk.

Non-idempotent operations are not: a replay of one whose first attempt took effect fails or does
it twice. ``create`` / ``mkdir`` / ``mknod`` / ``symlink`` / ``link`` fail EEXIST; ``unlink`` /
``rmdir`` fail ENOENT; ``rename`` fails ENOENT (or EEXIST under RENAME_NOREPLACE, or undoes
itself under RENAME_EXCHANGE); ``write`` with ``O_APPEND`` appends twice; ``setxattr`` with
XATTR_CREATE fails EEXIST; ``copy_file_range`` is a rewrite (safe) but ``tmpfile`` makes a second
file; ``open`` with ``O_TRUNC`` truncates again (data written after it is lost only if the
caller wrote before its open returned: impossible); lookup counting (``Entry`` replies,
``forget``) must count a replayed reply once.

Two tools here:

* Per-operation helpers (:func:`replay_mkdir`, :func:`replay_create`, :func:`replay_unlink`, ...)
  run the handler and, only for a resent request that failed the way a replay of a successful
  first attempt fails, check that the first attempt's effect is visible and answer as it would
  have. The generic form is :func:`replay_safe`. They work on any filesystem whose ``lookup``
  handler reports names and counts lookups.
* :class:`ReplayJournal` records the result of each non-idempotent request (keyed by
  ``request_id``) before it is answered, so a replay gets that result back exactly — including
  for operations whose effect cannot be recognised afterwards (``O_APPEND`` writes, tmpfile).
  It is in memory, optionally backed by an append-only file so a successor daemon sees it.

Lookup counts: an ``Entry`` returned for a replay counts one lookup, as any ``Entry`` does. The
helpers get it from the filesystem's own ``lookup`` (which counts it). If the first attempt had
counted its lost reply too, the inode keeps one extra count: it then lives until unmount, which
is safe; counting one too few would not be. :class:`ReplayJournal` returns the first attempt's
own ``Entry``, whose count was taken once: exact.

Example::

    class FS(afuse.Operations):
        async def mkdir(self, req):
            return await replay_mkdir(self, req, self._mkdir)
        async def unlink(self, req):
            await replay_unlink(req, self._unlink)
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import stat
import struct
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import attrs

from .errors import FUSEError
from .operations import Operations
from .wire import requests as r
from .wire.types import Attr, Entry, Handle

__all__ = [
    "NOT_DONE",
    "NotDone",
    "ReplayJournal",
    "error_code",
    "lookup_entry",
    "peek_attr",
    "replay_create",
    "replay_link",
    "replay_mkdir",
    "replay_mknod",
    "replay_rename",
    "replay_rmdir",
    "replay_safe",
    "replay_setxattr",
    "replay_symlink",
    "replay_unlink",
]

log = logging.getLogger("afuse.resend")

T = TypeVar("T")

RENAME_NOREPLACE: Final = 1
RENAME_EXCHANGE: Final = 2
XATTR_CREATE: Final = 1


class NotDone:
    """The type of :data:`NOT_DONE`: "the first attempt did not take effect (visibly)"."""

    _instance: NotDone | None = None

    def __new__(cls) -> NotDone:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NOT_DONE"


#: Returned by an ``already_done`` callback of :func:`replay_safe` to re-raise the error.
NOT_DONE: Final = NotDone()


def error_code(exc: BaseException) -> int | None:
    """The errno a handler exception answers (FUSEError or OSError), else None."""
    if isinstance(exc, FUSEError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return None


async def replay_safe(
    req: r.Request,
    attempt: Callable[[], Awaitable[T]],
    *,
    already_done: Callable[[int], Awaitable[T | NotDone]],
    errnos: frozenset[int] | None = None,
) -> T:
    """Run ``attempt()``; if ``req`` is a resend and it fails with an errno (one of ``errnos``
    if given), ask ``already_done(errno)`` whether the first attempt's effect is visible: its
    answer (anything but :data:`NOT_DONE`) becomes the result, else the error stands.

    First attempts (``not req.is_resend``) are never second-guessed.
    """
    try:
        return await attempt()
    except (FUSEError, OSError) as exc:
        code = error_code(exc)
        if not req.is_resend or code is None or (errnos is not None and code not in errnos):
            raise
        result = await already_done(code)
        if isinstance(result, NotDone):
            raise
        log.debug("%s request %d: replay of a completed request, answered as the first attempt",
                  type(req).opcode.name, req.request_id)
        return result


# -- looking names up --------------------------------------------------------------------------


def _lookup_req(req: r.Request, parent: int, name: bytes) -> r.LookupRequest:
    return r.LookupRequest(req.unique, parent, req.uid, req.gid, req.pid, name)


async def lookup_entry(ops: Operations, req: r.Request, parent: int, name: bytes) -> Entry | None:
    """``ops.lookup`` of ``name`` in ``parent`` on behalf of ``req``: the Entry (one lookup
    counted, to be handed to the kernel) or None if there is no such name."""
    try:
        entry = await ops.lookup(_lookup_req(req, parent, name))
    except (FUSEError, OSError) as exc:
        if error_code(exc) == errno.ENOENT:
            return None
        raise
    return entry if entry.nodeid else None


async def _unlookup(ops: Operations, req: r.Request, nodeid: int) -> None:
    """Give back the lookup count :func:`lookup_entry` took (the Entry is not handed out)."""
    forget = r.ForgetRequest(0, nodeid, req.uid, req.gid, req.pid, [r.ForgetItem(nodeid, 1)])
    await ops.forget(forget)


async def peek_attr(ops: Operations, req: r.Request, parent: int, name: bytes) -> Attr | None:
    """The attributes of ``name`` in ``parent`` if it exists (no lookup count is kept)."""
    entry = await lookup_entry(ops, req, parent, name)
    if entry is None:
        return None
    await _unlookup(ops, req, entry.nodeid)
    return entry.attr


def _same_owner(attr: Attr, req: r.Request) -> bool:
    return not req.has_ids or attr.uid == req.uid


async def _existing(ops: Operations, req: r.Request, parent: int, name: bytes, fmt: int,
                    same_owner: bool, nodeid: int = 0) -> Entry | NotDone:
    """The counted Entry of ``name`` if it is what ``req`` would have made, else NOT_DONE."""
    entry = await lookup_entry(ops, req, parent, name)
    if entry is None:
        return NOT_DONE
    ok = stat.S_IFMT(entry.attr.mode) == fmt and (not same_owner or _same_owner(entry.attr, req))
    if nodeid and entry.nodeid != nodeid:
        ok = False
    if not ok:
        await _unlookup(ops, req, entry.nodeid)
        return NOT_DONE
    return entry


_EEXIST = frozenset({errno.EEXIST})
_ENOENT = frozenset({errno.ENOENT})


# -- per-operation helpers ---------------------------------------------------------------------


async def replay_mkdir(ops: Operations, req: r.MkdirRequest, attempt: Callable[[r.MkdirRequest], Awaitable[Entry]],
                       *, same_owner: bool = True) -> Entry:
    """``attempt(req)``; a resent mkdir failing EEXIST answers the existing directory's Entry
    (if it is a directory and, with ``same_owner``, owned by the caller)."""
    async def done(_code: int) -> Entry | NotDone:
        return await _existing(ops, req, req.nodeid, req.name, stat.S_IFDIR, same_owner)
    return await replay_safe(req, lambda: attempt(req), already_done=done, errnos=_EEXIST)


async def replay_mknod(ops: Operations, req: r.MknodRequest, attempt: Callable[[r.MknodRequest], Awaitable[Entry]],
                       *, same_owner: bool = True) -> Entry:
    """As :func:`replay_mkdir`, for mknod (the same file type; a device's rdev must match)."""
    fmt = stat.S_IFMT(req.mode) or stat.S_IFREG

    async def done(_code: int) -> Entry | NotDone:
        entry = await _existing(ops, req, req.nodeid, req.name, fmt, same_owner)
        if isinstance(entry, Entry) and fmt in (stat.S_IFCHR, stat.S_IFBLK) and entry.attr.rdev != req.rdev:
            await _unlookup(ops, req, entry.nodeid)
            return NOT_DONE
        return entry
    return await replay_safe(req, lambda: attempt(req), already_done=done, errnos=_EEXIST)


async def replay_symlink(ops: Operations, req: r.SymlinkRequest,
                         attempt: Callable[[r.SymlinkRequest], Awaitable[Entry]],
                         *, same_owner: bool = True) -> Entry:
    """As :func:`replay_mkdir`, for symlink (a symlink whose target is ``req.target``, if the
    filesystem implements readlink)."""
    async def done(_code: int) -> Entry | NotDone:
        entry = await _existing(ops, req, req.nodeid, req.name, stat.S_IFLNK, same_owner)
        if isinstance(entry, Entry):
            try:
                target = await ops.readlink(r.ReadlinkRequest(req.unique, entry.nodeid, req.uid, req.gid, req.pid))
            except (FUSEError, OSError) as exc:
                if error_code(exc) != errno.ENOSYS:
                    target = b""
                else:
                    target = req.target
            if target != req.target:
                await _unlookup(ops, req, entry.nodeid)
                return NOT_DONE
        return entry
    return await replay_safe(req, lambda: attempt(req), already_done=done, errnos=_EEXIST)


async def replay_create(
    ops: Operations, req: r.CreateRequest, attempt: Callable[[r.CreateRequest], Awaitable[tuple[Entry, Handle]]],
    open: Callable[[r.OpenRequest], Awaitable[Handle]] | None = None, *, same_owner: bool = True,
) -> tuple[Entry, Handle]:
    """``attempt(req)``; a resent create failing EEXIST (O_EXCL) answers the existing regular
    file, opened by ``open`` (default ``ops.open``) with the request's flags less O_CREAT,
    O_EXCL and O_TRUNC (the first attempt made it empty; anything written since is kept)."""
    opener = ops.open if open is None else open

    async def done(_code: int) -> tuple[Entry, Handle] | NotDone:
        entry = await _existing(ops, req, req.nodeid, req.name, stat.S_IFREG, same_owner)
        if isinstance(entry, NotDone):
            return entry
        flags = req.flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC)
        try:
            handle = await opener(r.OpenRequest(req.unique, entry.nodeid, req.uid, req.gid, req.pid,
                                                flags, req.open_flags))
        except BaseException:
            await _unlookup(ops, req, entry.nodeid)
            raise
        return entry, handle
    return await replay_safe(req, lambda: attempt(req), already_done=done, errnos=_EEXIST)


async def replay_link(ops: Operations, req: r.LinkRequest,
                      attempt: Callable[[r.LinkRequest], Awaitable[Entry]]) -> Entry:
    """``attempt(req)``; a resent link failing EEXIST where the new name already is the same
    inode answers its Entry."""
    async def done(_code: int) -> Entry | NotDone:
        entry = await lookup_entry(ops, req, req.nodeid, req.newname)
        if entry is None:
            return NOT_DONE
        if entry.nodeid != req.oldnodeid:
            await _unlookup(ops, req, entry.nodeid)
            return NOT_DONE
        return entry
    return await replay_safe(req, lambda: attempt(req), already_done=done, errnos=_EEXIST)


async def replay_unlink(req: r.UnlinkRequest, attempt: Callable[[r.UnlinkRequest], Awaitable[None]]) -> None:
    """``attempt(req)``; a resent unlink failing ENOENT succeeds (the first attempt removed it)."""
    async def done(_code: int) -> None:
        return None
    await replay_safe(req, lambda: attempt(req), already_done=done, errnos=_ENOENT)


async def replay_rmdir(req: r.RmdirRequest, attempt: Callable[[r.RmdirRequest], Awaitable[None]]) -> None:
    """``attempt(req)``; a resent rmdir failing ENOENT succeeds."""
    async def done(_code: int) -> None:
        return None
    await replay_safe(req, lambda: attempt(req), already_done=done, errnos=_ENOENT)


async def replay_rename(ops: Operations, req: r.RenameRequest,
                        attempt: Callable[[r.RenameRequest], Awaitable[None]]) -> None:
    """``attempt(req)``; a resent rename failing ENOENT (or EEXIST under RENAME_NOREPLACE)
    succeeds when the old name is gone and the new name exists. RENAME_EXCHANGE cannot be
    recognised afterwards (use :class:`ReplayJournal`)."""
    async def done(code: int) -> NotDone | None:
        if req.flags & RENAME_EXCHANGE:
            return NOT_DONE
        if code == errno.EEXIST and not req.flags & RENAME_NOREPLACE:
            return NOT_DONE
        if await peek_attr(ops, req, req.newdir, req.newname) is None:
            return NOT_DONE
        if (req.nodeid, req.name) != (req.newdir, req.newname) and \
                await peek_attr(ops, req, req.nodeid, req.name) is not None:
            return NOT_DONE
        return None
    await replay_safe(req, lambda: attempt(req), already_done=done,
                      errnos=frozenset({errno.ENOENT, errno.EEXIST}))


async def replay_setxattr(ops: Operations, req: r.SetxattrRequest,
                          attempt: Callable[[r.SetxattrRequest], Awaitable[None]]) -> None:
    """``attempt(req)``; a resent setxattr with XATTR_CREATE failing EEXIST succeeds when the
    attribute holds the requested value."""
    async def done(_code: int) -> NotDone | None:
        if not req.flags & XATTR_CREATE:
            return NOT_DONE
        try:
            value = await ops.getxattr(r.GetxattrRequest(req.unique, req.nodeid, req.uid, req.gid, req.pid,
                                                         req.name, len(req.value)))
        except (FUSEError, OSError):
            return NOT_DONE
        return None if value == req.value else NOT_DONE
    await replay_safe(req, lambda: attempt(req), already_done=done, errnos=_EEXIST)


# -- the journal -------------------------------------------------------------------------------


@attrs.define(slots=True, frozen=True)
class _Outcome:
    ok: bool
    value: Any  # the result, or the errno of the error


_LEN = struct.Struct("<I")


class ReplayJournal:
    """Results of non-idempotent requests by ``request_id``, so a replay gets them back exactly.

    ``await journal.run(req, attempt)`` runs ``attempt()`` for a first attempt and records its
    result (or its errno) before returning it to be answered; for a resent request whose first
    attempt was recorded it returns (or raises) the recorded outcome without running anything.
    A resent request not recorded runs ``attempt()`` (combine with the per-operation helpers:
    ``journal.run(req, lambda: replay_mkdir(ops, req, self._mkdir))``).

    With ``path`` every record is also appended to that file in one ``write`` (length-prefixed
    pickles), before the reply: a successor constructing a journal on the same path sees it.
    Plain writes survive the daemon's SIGKILL (the page cache is the kernel's); they do not
    survive a machine crash — but neither do the kernel's requests. Only the last ``keep``
    records are kept (replays concern requests in flight at a crash: at most the session's
    ``max_requests``); :meth:`compact` rewrites the file with those. Request ids are those of
    one connection: call :meth:`clear` when mounting anew. Results must pickle (``Entry``,
    ``Handle``, ``Attr``, ints, bytes, None, tuples of those do).

    The file is trusted input (pickle): keep it where only the daemon can write.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *, keep: int = 4096) -> None:
        self.path = None if path is None else os.fspath(path)
        self.keep = keep
        self._outcomes: OrderedDict[int, _Outcome] = OrderedDict()
        self._fd: int | None = None
        if self.path is not None:
            self._load()
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def _load(self) -> None:
        assert self.path is not None
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return
        pos = 0
        while pos + 4 <= len(data):
            (n,) = _LEN.unpack_from(data, pos)
            if pos + 4 + n > len(data):
                break  # a record cut short by a crash while appending
            try:
                rid, outcome = pickle.loads(data[pos + 4 : pos + 4 + n])
            except Exception as exc:  # pragma: no cover - a damaged tail
                log.warning("replay journal %s: damaged record at %d ignored: %s", self.path, pos, exc)
                break
            self._remember(rid, outcome)
            pos += 4 + n

    def _remember(self, request_id: int, outcome: _Outcome) -> None:
        self._outcomes[request_id] = outcome
        self._outcomes.move_to_end(request_id)
        while len(self._outcomes) > self.keep:
            self._outcomes.popitem(last=False)

    def record(self, request_id: int, ok: bool, value: Any) -> None:
        """Record the outcome of ``request_id`` (result, or errno when not ``ok``)."""
        outcome = _Outcome(ok, value)
        if self._fd is not None:
            blob = pickle.dumps((request_id, outcome), protocol=pickle.HIGHEST_PROTOCOL)
            os.write(self._fd, _LEN.pack(len(blob)) + blob)
        self._remember(request_id, outcome)

    def __contains__(self, request_id: int) -> bool:
        return request_id in self._outcomes

    def __len__(self) -> int:
        return len(self._outcomes)

    def outcome(self, request_id: int) -> tuple[bool, Any] | None:
        """(ok, result or errno) recorded for ``request_id``, or None."""
        o = self._outcomes.get(request_id)
        return None if o is None else (o.ok, o.value)

    async def run(self, req: r.Request, attempt: Callable[[], Awaitable[T]]) -> T:
        """The recorded outcome of a replayed request, else ``attempt()``'s, recorded."""
        if req.is_resend:
            o = self._outcomes.get(req.request_id)
            if o is not None:
                log.debug("%s request %d: replay answered from the journal",
                          type(req).opcode.name, req.request_id)
                if o.ok:
                    return o.value  # type: ignore[no-any-return]
                raise FUSEError(o.value)
        try:
            result = await attempt()
        except (FUSEError, OSError) as exc:
            code = error_code(exc)
            if code is not None:
                self.record(req.request_id, False, code)
            raise
        self.record(req.request_id, True, result)
        return result

    def clear(self) -> None:
        """Forget everything (a new connection reuses request ids)."""
        self._outcomes.clear()
        if self.path is not None:
            with open(self.path, "wb"):
                pass

    def compact(self) -> None:
        """Rewrite the file with only the records kept (atomically, by rename)."""
        if self.path is None:
            return
        tmp = self.path + ".tmp"
        with open(tmp, "wb") as f:
            for rid, outcome in self._outcomes.items():
                blob = pickle.dumps((rid, outcome), protocol=pickle.HIGHEST_PROTOCOL)
                f.write(_LEN.pack(len(blob)) + blob)
        os.replace(tmp, self.path)
        if self._fd is not None:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def close(self) -> None:
        """Close the file (records stay in memory)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
