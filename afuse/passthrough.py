"""FUSE passthrough (kernel 6.9+, protocol 7.40): backing files and their lifetimes.

Negotiate with ``InitConfig(passthrough=True, max_stack_depth=1 or 2)`` (never with
``writeback_cache``). An open file answered with ``FOpen.PASSTHROUGH`` and a backing id has its
reads, writes, splices and mmaps carried out by the kernel on the backing file: the daemon gets
no READ or WRITE for it. Registering a backing file (``FUSE_DEV_IOC_BACKING_OPEN``) needs
CAP_SYS_ADMIN in the initial user namespace.

In an ``open`` / ``create`` / ``tmpfile`` handler::

    session = afuse.session.current_session()
    bf = session.open_backing(fd)          # a BackingFile: the kernel's id and a reference count
    return Handle(fh, FOpen.PASSTHROUGH, backing_id=bf.id)

Lifetimes (all handled by the framework; a backing id never leaks and is never closed while a
reply or an open file may still need it):

* A :class:`BackingFile` opened while an OPEN, CREATE or TMPFILE request is being served holds
  one reference *for that request*, dropped once the request's reply has been written, or
  failed to be written, or the handler raised or was interrupted.
* A reply carrying ``FOpen.PASSTHROUGH`` and the id takes a reference *for the open file*,
  kept until that file's RELEASE (or dropped at once if the reply could not be written). The
  kernel looks the id up only after the reply has been read, in the opening process, so the
  id must stay registered past the reply; and every further open of an inode that is open in
  passthrough mode must name the *same* backing registration. So a filesystem remembers the
  :class:`BackingFile` of each inode and answers later opens with it while it is not
  :attr:`~BackingFile.closed` (check and reply without an ``await`` in between, or hold it
  with :meth:`BackingFile.acquire`); once the inode's last passthrough file is released the
  id is closed and the next open registers the backing file anew.
* Opened elsewhere (in ``init``, another handler, a background task), the reference is the
  caller's: :meth:`BackingFile.release` it, or use the file as a context manager.

Only ``DIRECT_IO``, ``PARALLEL_DIRECT_WRITES`` and ``NOFLUSH`` may accompany ``PASSTHROUGH``
(the kernel fails the open with EIO otherwise); the dispatcher rejects other combinations with a
:class:`~afuse.dispatch.HandlerResultError` (the open is answered EIO and the error logged).
"""

from __future__ import annotations

import errno
import logging
from types import TracebackType
from typing import TYPE_CHECKING

from . import device
from .errors import SessionError
from .wire.results import PASSTHROUGH_COMPATIBLE
from .wire.results import passthrough_flags_problem as check_flags

if TYPE_CHECKING:
    from collections.abc import Callable

    from .wire.types import Handle

log = logging.getLogger("afuse")

__all__ = ["PASSTHROUGH_COMPATIBLE", "BackingFile", "BackingTable", "check_flags"]


class BackingFile:
    """A backing file registered with the kernel: its id and a reference count.

    The id is closed (``FUSE_DEV_IOC_BACKING_CLOSE``) when the count drops to 0.
    """

    __slots__ = ("_table", "id", "refs")

    def __init__(self, table: BackingTable, backing_id: int) -> None:
        self._table = table
        #: The kernel's backing id, for :attr:`afuse.Handle.backing_id`.
        self.id = backing_id
        #: References held (by requests being answered, open files, and callers).
        self.refs = 1

    @property
    def closed(self) -> bool:
        """True once the id has been closed (it may then name another file: never reuse it)."""
        return self.refs <= 0

    def acquire(self) -> BackingFile:
        """Take one more reference (give it back with :meth:`release`)."""
        if self.refs <= 0:
            raise SessionError(f"backing id {self.id} is closed")
        self.refs += 1
        return self

    def release(self) -> None:
        """Drop one reference; the last one closes the id."""
        if self.refs <= 0:
            raise SessionError(f"backing id {self.id} released more often than acquired")
        self.refs -= 1
        if self.refs == 0:
            self._table._close(self)

    def __enter__(self) -> BackingFile:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<BackingFile id={self.id} refs={self.refs}>"


class BackingTable:
    """A session's backing files (one per connection; see :meth:`afuse.Session.open_backing`)."""

    def __init__(self, session_fd: int) -> None:
        self.fd = session_fd
        #: Open backing files by id.
        self.files: dict[int, BackingFile] = {}
        #: (nodeid, fh) of an open passthrough file -> the backing files its opens hold.
        self.held: dict[tuple[int, int], list[BackingFile]] = {}
        #: BACKING_OPEN / BACKING_CLOSE calls made (statistics, tests).
        self.opened = 0
        self.closed = 0
        self._ended = False

    def open(self, fd: int) -> BackingFile:
        """Register ``fd`` (a regular file); OSError as the kernel answers (EPERM, EINVAL, ELOOP, ...).

        The one reference is the caller's (:meth:`afuse.Session.open_backing` gives it to the
        request being served when that is an OPEN/CREATE/TMPFILE).
        """
        if self._ended:
            raise SessionError("the session is closed")
        bid = device.backing_open(self.fd, fd)
        self.opened += 1
        bf = BackingFile(self, bid)
        self.files[bid] = bf
        return bf

    def _close(self, bf: BackingFile) -> None:
        if self.files.get(bf.id) is bf:
            del self.files[bf.id]
        if self._ended:
            return
        try:
            device.backing_close(self.fd, bf.id)
            self.closed += 1
        except OSError as e:  # the connection is gone (the ids with it)
            log.debug("BACKING_CLOSE of %d: %s", bf.id, e)

    # -- the framework's side ------------------------------------------------------------------

    def claim(self, nodeid: int, h: Handle, what: str) -> Callable[[bool], None]:
        """A reply being written opens ``(nodeid, h.fh)`` on ``h.backing_id``: returns what to call
        with whether the reply was written (the open file then keeps a reference until its RELEASE).

        Raises :class:`~afuse.errors.HandlerResultError` for an id that is not ours.
        """
        bf = self.files.get(h.backing_id)
        if bf is None or bf.refs <= 0:
            from .wire.errors import HandlerResultError

            raise HandlerResultError(
                f"{what} returned FOpen.PASSTHROUGH with backing_id {h.backing_id}, which is not an open "
                "backing file of this session (use Session.open_backing())")
        bf.refs += 1
        key = (nodeid, h.fh)

        def settle(written: bool) -> None:
            if written:
                self.held.setdefault(key, []).append(bf)
            else:
                bf.release()

        return settle

    def released(self, nodeid: int, fh: int) -> None:
        """RELEASE of ``(nodeid, fh)``: drop the reference its open took."""
        refs = self.held.get((nodeid, fh))
        if refs:
            bf = refs.pop()
            if not refs:
                del self.held[(nodeid, fh)]
            bf.release()

    def end(self) -> None:
        """The connection has ended: its ids are gone with it."""
        self._ended = True
        for bf in list(self.files.values()):
            bf.refs = 0
        self.files.clear()
        self.held.clear()


def unavailable_reason(err: OSError) -> str:
    """A one-line reason for a failed BACKING_OPEN."""
    if err.errno == errno.EPERM:
        return ("BACKING_OPEN refused (EPERM): it needs CAP_SYS_ADMIN in the initial user namespace")
    return f"BACKING_OPEN failed: {err.strerror or err}"
