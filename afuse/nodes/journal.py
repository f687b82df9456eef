"""Persistence for node filesystems whose state changes only through requests (memfs).

:class:`JournaledNodeFS` journals every request that changes something — the handler's name, the
request, the time it took effect and the caller's supplementary groups — and each READDIRPLUS
entry the kernel took (a lookup count), before the reply. Restoring a snapshot redoes the
journaled requests through the same handlers, which reproduces the contents, nodeids, lookup
counts and open files exactly, provided the handlers are deterministic and never block: nodes
read the time with :func:`now` and the caller with :func:`caller`, which give the recorded values
while a request is redone. A resent request whose first attempt was journaled gets that
attempt's result. Without a journal set, no handler is wrapped and nothing costs anything.

A subclass adds its own contents to :meth:`NodeFS.dump_state` and rebuilds them in
``restore_state`` before calling this one (which restores the bridge's tables, reopens the open
files and redoes the journal). With :class:`afuse.state.FileStateStore` it is failover-capable.
"""

from __future__ import annotations

import base64
import contextvars
import logging
import pickle
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from typing import Any

from ..errors import FUSEError
from ..wire import requests as r
from ..wire.opcodes import STATEFUL_HANDLERS
from ..wire.types import DirEntry
from .bridge import NodeFS
from .caller import Caller, current_caller

__all__ = ["JournaledNodeFS", "caller", "now"]

log = logging.getLogger("afuse.nodes")
_JOURNALED = tuple(h for h in STATEFUL_HANDLERS if h != "readdirplus")
_CLOCK: contextvars.ContextVar[int | None] = contextvars.ContextVar("afuse_journal_clock", default=None)
_CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("afuse_journal_caller", default=None)
#: Results of redone requests kept for their resent copies.
_KEPT = 4096


def now() -> int:
    """The time (ns) of the request being served: one reading per journaled request, the recorded
    one while it is redone."""
    t = _CLOCK.get()
    return time.time_ns() if t is None else t


def caller() -> Caller:
    """:func:`afuse.nodes.current_caller`, or the recorded caller while a request is redone."""
    return _CALLER.get() or current_caller()


def _run_now(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a handler that does not block (journaled ones never do)."""
    try:
        coro.send(None)
    except StopIteration as e:
        return e.value
    coro.close()
    raise RuntimeError("a journaled handler blocked while being redone")


class JournaledNodeFS(NodeFS):
    """A :class:`NodeFS` persisted as a snapshot plus the requests since (see the module)."""

    _sink: Callable[[list[Any]], None] | None = None

    def set_journal(self, journal: Callable[[Any], None] | None) -> None:
        """Journal every change to ``journal`` (JSON lists; None: stop): the changing handlers
        become instance attributes wrapping the class's."""
        self._sink = journal
        for name in (*_JOURNALED, "readdirplus"):
            self.__dict__.pop(name, None)
        if journal is not None:
            for name in _JOURNALED:
                setattr(self, name, self._journaled(name, getattr(self, name)))
            self.readdirplus = self._journaled_readdirplus  # type: ignore[method-assign]

    @property
    def _replayed(self) -> OrderedDict[int, Any]:
        got: OrderedDict[int, Any] | None = self.__dict__.get("_replayed_results")
        if got is None:
            got = self.__dict__["_replayed_results"] = OrderedDict()
        return got

    def _journaled(self, name: str, handler: Callable[[Any], Coroutine[Any, Any, Any]]) -> Callable[[Any], Any]:
        async def run(req: r.Request) -> Any:
            if req.is_resend and req.request_id in self._replayed:
                return self._replayed[req.request_id]  # the first attempt's result, restored
            ts = time.time_ns()
            token = _CLOCK.set(ts)
            try:
                result = await handler(req)
            finally:
                _CLOCK.reset(token)
            if self._sink is not None and not (name == "lookup" and not result.nodeid):
                groups = list(current_caller().groups) if req.pid > 0 else []
                self._sink(["r", ts, name, base64.b64encode(pickle.dumps(req)).decode(), groups])
            return result
        return run

    async def _journaled_readdirplus(self, req: r.ReaddirplusRequest) -> AsyncIterator[DirEntry]:
        return self._count_taken(await type(self).readdirplus(self, req))  # type: ignore[arg-type]

    async def _count_taken(self, entries: AsyncIterator[DirEntry]) -> AsyncIterator[DirEntry]:
        async for de in entries:
            yield de  # resumed only when the kernel took the entry: one lookup to journal
            if de.name not in (b".", b"..") and de.entry is not None and self._sink is not None:
                self._sink(["i", de.entry.nodeid])

    def fold_record(self, state: dict[str, Any], record: Any) -> None:
        """Keep a record pending: :meth:`restore_state` redoes it through the handlers."""
        state.setdefault("pending", []).append(record)

    def restore_state(self, state: dict[str, Any]) -> None:
        """The bridge's tables (the subclass rebuilt its nodes first), the open files reopened now
        (opens must not block), then the journaled requests redone."""
        super().restore_state(state)
        later = []
        for fh in list(self._pending):
            try:
                _run_now(self._reopen(fh))
            except FUSEError:  # its node is made by a request the journal redoes: after those
                later.append(fh)
        self.restore_locks(state.get("locks", ()))
        self._redoing = True
        try:
            for rec in state.get("pending", ()):
                self._redo(rec)
        finally:
            self._redoing = False
        for fh in later:
            if fh in self._pending:
                try:
                    _run_now(self._reopen(fh))
                except FUSEError:  # stays pending: the kernel's next use of it is answered EBADF
                    log.warning("restore: open file %d cannot be reopened", fh)

    #: True while :meth:`restore_state` redoes the journal (changes then are not journaled again).
    _redoing = False

    def restore_locks(self, locks: Iterable[list[Any]]) -> None:
        """Take back the file locks of a snapshot or of an ``["L", key, locks]`` journal record:
        ``[node key, locks]`` pairs (a subclass that keeps locks restores them; this one keeps none)."""

    def journal_locks(self, key: Any, locks: Any) -> None:
        """Journal that the locks of the file with node key ``key`` are now ``locks`` (JSON)."""
        if self._sink is not None and not self._redoing:
            self._sink(["L", key, locks])

    def _redo(self, rec: list[Any]) -> None:
        if rec[0] == "i" and (n := self.nodes.get(rec[1])) is not None:
            n._lookups += 1
        if rec[0] == "L":
            self.restore_locks([rec[1:]])
        if rec[0] != "r":
            return
        _, ts, name, blob, groups = rec
        req = pickle.loads(base64.b64decode(blob))
        tokens = _CLOCK.set(ts), _CALLER.set(Caller(req.uid, req.gid, req.pid, tuple(groups)))
        try:
            self._replayed[req.request_id] = _run_now(getattr(type(self), name)(self, req))
            if len(self._replayed) > _KEPT:
                self._replayed.popitem(last=False)
        except FUSEError as e:  # pragma: no cover - a journal from another version
            log.warning("journal: %s of request %d failed again: %s", name, req.request_id, e)
        finally:
            _CLOCK.reset(tokens[0])
            _CALLER.reset(tokens[1])
