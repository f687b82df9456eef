"""Persistent filesystem state for daemons that fail over (see docs/failover.md).

A replacement daemon sees no new INIT and no new lookups: the kernel keeps using the nodeids it
looked up (with their lookup counts) and the file handles it was given. A filesystem that wants
to survive its own death keeps that state outside the process:

* :class:`Persistent` is what the filesystem implements: a full snapshot (:meth:`dump_state`),
  restoring from one (:meth:`restore_state`), and folding one journal record into a snapshot
  (:meth:`fold_record`). It calls the journal it was given (:meth:`set_journal`) for every change, *before* the reply
  that makes the change visible to the kernel is written (a handler's synchronous code runs
  before the session writes its reply, so journaling inside the handler is enough).
* :class:`FileStateStore` keeps a snapshot file plus an append-only journal of compact JSON
  lines, and compacts atomically (write a temporary file, fsync, rename).

Durability: records are written with plain ``write(2)`` (no fsync). A daemon killed with SIGKILL
leaves its writes in the page cache, which the replacement reads: that is the failure this
module is for. A machine crash loses the mount anyway (and with it every nodeid and handle the
kernel held), so fsync-per-record would buy nothing. Compaction renames a complete temporary
file over the snapshot, so a dying process never leaves a torn one; with ``durable=True`` (the
default; ``serve_failover`` uses False) it also fsyncs, for stores meant to outlive the machine
(``MemFS(persist=DIR)``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

log = logging.getLogger("afuse.state")

SNAPSHOT = "state.json"
JOURNAL = "journal-{gen}.jsonl"
#: A subdirectory for file contents kept outside the snapshot (memfs's content store); cleared with the state.
CONTENT_DIR = "data"
#: By default :meth:`FileStateStore.journal` compacts once the journal holds this many records
#: and one per this many bytes of snapshot (redoing a record costs about what reading that much
#: snapshot does), or is as big as the snapshot: a restore then costs about twice reading the
#: snapshot, whatever the history.
COMPACT_MIN_RECORDS, COMPACT_BYTES_PER_RECORD = 200, 500

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode


@runtime_checkable
class Persistent(Protocol):
    """What a failover-capable filesystem implements (besides :class:`~afuse.Operations`)."""

    def dump_state(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot of everything the kernel may still refer to."""
        ...

    def restore_state(self, state: dict[str, Any]) -> None:
        """Become the filesystem described by ``state`` (a snapshot with the journal folded in)."""
        ...

    def fold_record(self, state: dict[str, Any], record: Any) -> None:
        """Apply one journal record to a snapshot dict, in place (pure data, no I/O)."""
        ...

    def set_journal(self, journal: Callable[[Any], None] | None) -> None:
        """Where to send journal records from now on (None: stop journaling)."""
        ...


class FileStateStore:
    """A snapshot plus an append-only journal of JSON lines in directory ``path``.

    Generation ``g`` is ``state.json`` (which names ``g``) followed by ``journal-g.jsonl``.
    :meth:`compact` writes generation ``g+1`` with an atomic rename and only then switches the
    journal, so a crash at any point leaves one consistent generation to :meth:`load`.
    """

    def __init__(self, path: str | os.PathLike[str], compact_every: int | None = None, durable: bool = True,
                 auto_compact: bool = True) -> None:
        self.path = os.fspath(path)
        os.makedirs(self.path, exist_ok=True)
        #: Compact after this many records (None: by the sizes, see :data:`COMPACT_MIN_RECORDS`).
        self.compact_every = compact_every
        #: fsync snapshots (False: a process crash still never sees a torn one; a machine crash might)
        self.durable = durable
        #: Compact inside :meth:`journal` when due (False: only set :attr:`compact_due`; the owner
        #: compacts at a moment when no handler is half-way, e.g. from its own task).
        self.auto_compact = auto_compact
        self.compact_due = False
        self.generation = 0
        self._fd = -1
        self._records = self._bytes = self._snapshot_bytes = 0
        self._loaded = self._good = 0
        self._source: Persistent | None = None

    # -- reading ---------------------------------------------------------------------------

    def load(self) -> tuple[dict[str, Any] | None, list[Any]]:
        """The newest snapshot (None if there is none) and the journal records written after it.

        A torn last line (the writer died in the middle of it) is ignored.
        """
        snap_path = os.path.join(self.path, SNAPSHOT)
        try:
            with open(snap_path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None, []
        doc = json.loads(raw)
        self._snapshot_bytes = len(raw)
        self.generation = int(doc["generation"])
        records: list[Any] = []
        try:
            with open(os.path.join(self.path, JOURNAL.format(gen=self.generation)), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            data = b""
        lines = data.split(b"\n")
        good = 0
        for i, line in enumerate(lines):
            if not line:
                good += 1 if i < len(lines) - 1 else 0
                continue
            try:
                records.append(json.loads(line))
            except ValueError:
                if i >= len(lines) - 2:  # the last (unterminated) line may be torn
                    log.warning("ignoring a torn last journal record in %s", self.path)
                    break
                raise
            good += len(line) + (i < len(lines) - 1)  # the last one may lack its newline
        self._good = good
        state: dict[str, Any] = doc["state"]
        self._loaded = len(records)
        return state, records

    def load_into(self, ops: Persistent) -> bool:
        """Restore ``ops`` from the snapshot and journal; False if there is no saved state."""
        state, records = self.load()
        if state is None:
            return False
        for rec in records:
            ops.fold_record(state, rec)
        ops.restore_state(state)
        return True

    @property
    def loaded(self) -> int:
        """Journal records the last :meth:`load` read."""
        return self._loaded

    # -- writing ---------------------------------------------------------------------------

    def attach(self, ops: Persistent, compact: bool = True) -> None:
        """Start a fresh generation from ``ops.dump_state()``; journal calls append to it. With
        ``compact=False`` after :meth:`load`, append to the loaded generation's journal instead (a
        takeover serves at once and compacts later)."""
        self._source = ops
        if compact or self.generation == 0:
            self.compact()
        else:
            self._fd = os.open(os.path.join(self.path, JOURNAL.format(gen=self.generation)),
                               os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            self._records, self._bytes = self._loaded, self._good
            os.ftruncate(self._fd, self._good)  # a torn last record (its writer died) must not swallow the next
            if self._good and os.pread(self._fd, 1, self._good - 1) != b"\n":
                os.write(self._fd, b"\n")
        ops.set_journal(self.journal)

    def journal(self, record: Any) -> None:
        """Append one record (a JSON-serialisable value); compact when due (see :data:`COMPACT_MIN_RECORDS`)."""
        if self._fd < 0:
            raise RuntimeError("FileStateStore.journal before attach()")
        line = _dumps(record).encode() + b"\n"
        os.write(self._fd, line)
        self._records += 1
        self._bytes += len(line)
        if self._source is not None and self._due():
            if self.auto_compact:
                self.compact()
            else:
                self.compact_due = True

    def _due(self) -> bool:
        if self.compact_every is not None:
            return self._records >= self.compact_every
        return self._records >= max(COMPACT_MIN_RECORDS, self._snapshot_bytes // COMPACT_BYTES_PER_RECORD) or \
            self._bytes >= max(COMPACT_MIN_RECORDS * COMPACT_BYTES_PER_RECORD, self._snapshot_bytes)

    def compact(self) -> None:
        """Write ``dump_state()`` as the next generation and start its empty journal."""
        if self._source is None:
            raise RuntimeError("FileStateStore.compact before attach()")
        gen = self.generation + 1
        new_journal = os.path.join(self.path, JOURNAL.format(gen=gen))
        fd = os.open(new_journal, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            raw = _dumps({"generation": gen, "state": self._source.dump_state()}).encode()
            write_atomic(os.path.join(self.path, SNAPSHOT), raw, self.durable)
        except BaseException:
            os.close(fd)
            raise
        old_fd, old_gen = self._fd, self.generation
        self._fd, self.generation, self._records, self._bytes, self._snapshot_bytes = fd, gen, 0, 0, len(raw)
        self.compact_due = False
        if old_fd >= 0:
            os.close(old_fd)
        for name in os.listdir(self.path):  # every older journal (also ones a dead writer left)
            if name.startswith("journal-") and name != JOURNAL.format(gen=gen):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.path, name))
        log.debug("state compacted to generation %d (was %d): %d bytes", gen, old_gen, len(raw))

    def clear(self) -> None:
        """Forget all saved state, contents (:data:`CONTENT_DIR`) included: a new mount starts from nothing."""
        self.close()
        for name in os.listdir(self.path):
            if name == SNAPSHOT or name.startswith("journal-"):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.path, name))
        shutil.rmtree(os.path.join(self.path, CONTENT_DIR), ignore_errors=True)
        self.generation = 0

    def close(self) -> None:
        """Stop journaling (the files stay)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # -- small files next to the state -------------------------------------------------------------

    def write_json(self, name: str, value: Any) -> None:
        """Save ``value`` as ``name`` in the state directory, atomically."""
        write_atomic(os.path.join(self.path, name), _dumps(value).encode())

    def read_json(self, name: str) -> Any:
        """A value saved with :meth:`write_json`; None if there is none."""
        try:
            with open(os.path.join(self.path, name), "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None


def write_atomic(path: str, data: bytes, durable: bool = True) -> None:
    """Replace ``path`` by ``data`` all at once: temporary file, fsync, rename, fsync of the directory
    (``durable=False``: no fsyncs; still never torn for a process that dies)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    if not durable:
        return
    dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
