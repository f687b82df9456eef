"""passthroughfs: mirror a directory, node by node (like go-fuse's LoopbackNode, libfuse's passthrough_hp).

``python -m afuse.examples.passthroughfs SOURCE MOUNTPOINT [-o OPTS] [--timeout S] [--cache-dir]``

The filesystem is :class:`afuse.nodes.LoopbackFS`: each :class:`afuse.nodes.LoopbackNode` holds
an ``O_PATH | O_NOFOLLOW`` descriptor of its source object and is keyed by its
``(st_dev, st_ino)``, so the bridge gives one source inode one nodeid, and drops (closing the
descriptor) what the kernel forgets. Operations are ``*at()`` system calls on such descriptors
with a single name component, or go through ``/proc/self/fd/N``, which reaches the object itself
without following a symlink: nothing the source tree contains can make the daemon act outside it.

Run as root, each request is carried out under the caller's identity: the serving thread's
fsuid, fsgid and supplementary groups are switched to the caller's for the system call (per-thread
credentials; no ``await`` inside). Files are created owned by the caller, and permission checks
are the source filesystem's, with or without ``-o default_permissions``. Run as another user,
everything happens with that user's rights. Attributes report the source's inode numbers.

The mount is coherent with the source by default: the kernel caches no names, attributes or
listings (entry and attribute timeouts 0, no directory cache), so a change made directly in
SOURCE shows in the mount at once. ``--timeout SECONDS`` and ``--cache-dir`` trade that
coherence for speed: the kernel then keeps names and attributes that long, and listings until
the directory's mtime changes, and may show stale results meanwhile.

Regular files are opened in FUSE passthrough mode where the kernel and privileges allow it
(FUSE_PASSTHROUGH negotiated, as the command line asks unless ``--no-passthrough``, and
BACKING_OPEN permitted: CAP_SYS_ADMIN): the kernel then reads, writes and maps the source file
itself. Otherwise one log line says why, and the daemon serves reads and writes.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from afuse.nodes.loopback import LoopbackFS
from afuse.wire.init import InitConfig

__all__ = ["PassthroughFS", "main"]


class PassthroughFS(LoopbackFS):
    """Mirror the directory ``source``: :class:`~afuse.nodes.LoopbackFS`, logging as ``afuse.passthroughfs``.

    ``PassthroughFS(source, timeout=0.0, negative_timeout=0.0, cache_dir=False,
    switch_credentials=None, passthrough=True)``: see :class:`~afuse.nodes.LoopbackFS`.
    """

    log = logging.getLogger("afuse.passthroughfs")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m afuse.examples.passthroughfs SOURCE MOUNTPOINT [-o OPTS] [--debug]``."""
    from afuse.examples._cli import make_parser, run_example

    parser = make_parser("Mirror the directory SOURCE at MOUNTPOINT.", source=True,
                         prog="python -m afuse.examples.passthroughfs")
    parser.add_argument("--timeout", type=float, default=0.0, metavar="SECONDS",
                        help="let the kernel cache names and attributes this long: faster, but changes "
                             "made directly in SOURCE may show only after it (default 0: coherent)")
    parser.add_argument("--cache-dir", action="store_true",
                        help="let the kernel cache directory listings until a directory's mtime changes: "
                             "faster, but may hide changes made directly in SOURCE")
    parser.add_argument("--no-cache-dir", action="store_true", help=argparse.SUPPRESS)  # the default now
    parser.add_argument("--no-passthrough", action="store_true",
                        help="serve reads and writes in the daemon (no FUSE passthrough)")
    args = parser.parse_args(argv)
    try:
        ops = PassthroughFS(args.source, timeout=args.timeout, cache_dir=args.cache_dir,
                            passthrough=not args.no_passthrough)
    except OSError as e:
        print(f"error: cannot open {args.source}: {e.strerror}", file=sys.stderr)
        return 1
    try:
        return run_example(ops, args, InitConfig(passthrough=not args.no_passthrough))
    finally:
        ops.close()


if __name__ == "__main__":
    sys.exit(main())
