"""Command-line scaffolding shared by the examples: foreground serving, -o, --debug, signals."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence

from ..device import MountOptions
from ..errors import MountError
from ..operations import Operations
from ..running import run_until_signalled
from ..wire.init import InitConfig


def make_parser(description: str, source: bool = False, *, prog: str | None = None) -> argparse.ArgumentParser:
    """A parser with ``[SOURCE] MOUNTPOINT``, ``-o OPTIONS`` and ``--debug``; ``prog`` names the command."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    if source:
        p.add_argument("source", help="directory to mirror")
    p.add_argument("mountpoint", help="empty directory to mount on")
    p.add_argument("-o", dest="options", action="append", default=[],
                   help="mount options, comma-separated (e.g. allow_other,default_permissions)")
    p.add_argument("--debug", action="store_true", help="log every request")
    return p


def run_example(
    ops: Operations, args: argparse.Namespace, config: InitConfig | None = None,
    argv: Sequence[str] | None = None,
) -> int:
    """Mount ``ops`` on ``args.mountpoint`` in the foreground until unmounted or signalled.

    Returns the exit status: 0 once unmounted from outside or after SIGTERM or SIGHUP (which
    unmount), 130 after Ctrl-C (SIGINT, which unmounts too), 1 if mounting failed, 2 for bad
    options. An exception raised by ``ops`` unmounts and propagates.
    """
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        options = MountOptions.parse(",".join(args.options))
    except (MountError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        stopped_by = run_until_signalled(ops, args.mountpoint, options=options, config=config)
    except MountError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 128 + signal.SIGINT if stopped_by == signal.SIGINT else 0
