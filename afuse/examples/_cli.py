"""Command-line scaffolding shared by the examples: foreground serving, -o, --debug, signals."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence

import trio

from ..device import MountOptions
from ..errors import MountError
from ..operations import Operations
from ..wire.init import InitConfig


def make_parser(description: str, source: bool = False) -> argparse.ArgumentParser:
    """A parser with ``[SOURCE] MOUNTPOINT``, ``-o OPTIONS`` and ``--debug``."""
    p = argparse.ArgumentParser(description=description)
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
    """Mount ``ops`` on ``args.mountpoint`` in the foreground until Ctrl-C, SIGTERM or unmount."""
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
        trio.run(_serve, ops, args.mountpoint, options, config)
    except MountError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


async def _serve(ops: Operations, mountpoint: str, options: MountOptions, config: InitConfig | None) -> None:
    from ..session import mount

    async with mount(ops, mountpoint, options=options, config=config) as session:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                async def stop_on_signal() -> None:
                    async for _ in signals:
                        break
                    nursery.cancel_scope.cancel()

                async def stop_on_unmount() -> None:
                    await session.wait_closed()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(stop_on_signal)
                nursery.start_soon(stop_on_unmount)
