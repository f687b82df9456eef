"""Command-line scaffolding shared by the examples: foreground serving, -o, --debug, signals."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable, Sequence

from ..device import MountOptions
from ..errors import MountError
from ..operations import Operations
from ..running import run_until_signalled
from ..uring import IoUring, UringUnavailable
from ..wire.init import InitConfig
from ..wire.requests import Request


def make_parser(description: str, source: bool = False, *, prog: str | None = None) -> argparse.ArgumentParser:
    """A parser with ``[SOURCE] MOUNTPOINT``, ``-o OPTIONS`` and ``--debug``; ``prog`` names the command."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    if source:
        p.add_argument("source", help="directory to mirror")
    p.add_argument("mountpoint", help="empty directory to mount on")
    p.add_argument("-o", dest="options", action="append", default=[],
                   help="mount options, comma-separated (e.g. allow_other,default_permissions)")
    p.add_argument("--debug", action="store_true", help="log every request")
    p.add_argument("--io-uring", dest="io_uring", action="store_const", const="on", default=None,
                   help="serve requests over FUSE-over-io_uring (needs the fuse module parameter enable_uring=Y)")
    p.add_argument("--io-uring-auto", dest="io_uring", action="store_const", const="auto",
                   help="like --io-uring, but serve over /dev/fuse where the kernel refuses io_uring")
    return p


def io_uring_choice(args: argparse.Namespace) -> IoUring:
    """The ``io_uring`` argument of :func:`afuse.serve` that ``--io-uring`` asks for."""
    choice = getattr(args, "io_uring", None)
    return "auto" if choice == "auto" else choice == "on"


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
        stopped_by = run_until_signalled(ops, args.mountpoint, options=options, config=config,
                                         io_uring=io_uring_choice(args))
    except (MountError, UringUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 128 + signal.SIGINT if stopped_by == signal.SIGINT else 0


def add_failover_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """``--keeper SOCKET``, ``--state-dir DIR`` and ``--upgrade`` (see :func:`run_failover`)."""
    parser.add_argument("--keeper", metavar="SOCKET", help="failover: keep the mount's descriptors in the afuse "
                        f"keeper at SOCKET; a restarted {name} takes over the live mount (needs --state-dir)")
    parser.add_argument("--state-dir", metavar="DIR", help="failover: where contents and handles are journaled")
    parser.add_argument("--upgrade", action="store_true", help="failover: take over gracefully from the running one")


def run_failover(
    ops: Operations, args: argparse.Namespace, name: str, *, probe: Callable[[Request], None] | None = None,
    on_drain: Callable[[], None] | None = None, on_serving: Callable[[], None] | None = None,
) -> int:
    """Serve ``ops`` under :func:`afuse.failover.serve_failover` (``--keeper``, ``--state-dir``,
    ``--upgrade``, and ``--take-wait``/``--readers`` if ``args`` has them), printing ``ready`` once
    serving, until unmounted or signalled: SIGTERM, SIGHUP and SIGINT drain (the mount stays for the
    next daemon). ``probe`` sees each request, ``on_drain`` is called when draining starts,
    ``on_serving`` once serving. Exit status 130 after SIGINT, else 0; 1 if serving failed, 2 for
    bad options."""
    from functools import partial

    import trio

    from ..failover import serve_failover
    from ..running import serve_until_signalled

    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format=f"%(asctime)s {name}[%(process)d] %(levelname)s %(message)s")
    if io_uring_choice(args):
        print("error: --io-uring cannot be combined with failover (a taken-over connection is served "
              "over /dev/fuse)", file=sys.stderr)
        return 2
    try:
        options = MountOptions.parse(",".join(args.options))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    signals: list[signal.Signals] = []

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            session = await nursery.start(lambda task_status: serve_failover(
                ops, args.mountpoint, keeper=args.keeper, state_dir=args.state_dir, options=options,
                upgrade=args.upgrade, take_wait=getattr(args, "take_wait", None),
                readers=getattr(args, "readers", 2), probe=probe, on_drain=on_drain, task_status=task_status))
            if on_serving is not None:
                on_serving()

            async def drain(signum: signal.Signals) -> None:
                signals.append(signum)
                if on_drain is not None:
                    on_drain()
                await session.drain()  # hand over gracefully; the mount stays

            async with trio.open_nursery() as waiting:
                await waiting.start(partial(serve_until_signalled, session, on_signal=drain))
                print("ready", flush=True)
            nursery.cancel_scope.cancel()

    try:
        trio.run(run)
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 128 + signal.SIGINT if signal.SIGINT in signals else 0
