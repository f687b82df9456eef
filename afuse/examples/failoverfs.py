"""failoverfs: passthroughfs that survives SIGKILL and in-place upgrades (see docs/failover.md).

``python -m afuse.examples.failoverfs SOURCE MOUNTPOINT --keeper SOCKET --state-dir DIR [--upgrade]
[--take-wait S] [--timeout S] [--readers N] [--events FILE]``

Without ``--keeper`` it uses systemd's fd store (``$NOTIFY_SOCKET`` / ``LISTEN_FDS``).
It is ``python -m afuse.examples.passthroughfs ... --state-dir DIR`` with ``--state-dir``
required: :class:`~afuse.examples.passthroughfs.FailoverPassthroughFS`, a loopback node tree
whose nodes are keyed by file handle, so the node bridge's journaled tables (nodeids, lookup
counts, open files, outcomes of replayable requests) let a successor reopen every inode and
open file the kernel still refers to, and answer replayed requests as their first attempts were.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from afuse.examples.passthroughfs import FailoverPassthroughFS, file_handle, open_by_handle
from afuse.examples.passthroughfs import main as _main

__all__ = ["FailoverPassthroughFS", "file_handle", "main", "open_by_handle"]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m afuse.examples.failoverfs SOURCE MOUNTPOINT --keeper SOCKET --state-dir DIR``."""
    return _main(argv, failover=True)


if __name__ == "__main__":
    sys.exit(main())
