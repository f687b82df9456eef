"""Command-line scaffolding shared by the examples: foreground serving, -o, --debug, signals."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

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
    p.add_argument("--poll-us", type=_poll_us, default=0.0, metavar="US",
                   help="busy-poll /dev/fuse this many microseconds before sleeping (default 0: never); "
                        "lower latency when the caller runs on another CPU, at the cost of that CPU")
    return p


def _poll_us(text: str) -> float:
    try:
        us = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of microseconds: {text!r}") from None
    if not 0 <= us <= 1_000_000:
        raise argparse.ArgumentTypeError(f"must be 0 to 1000000 microseconds, not {text}")
    return us


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
                                         io_uring=io_uring_choice(args), poll_us=args.poll_us)
    except (MountError, UringUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 128 + signal.SIGINT if stopped_by == signal.SIGINT else 0


def add_failover_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """``--keeper SOCKET``, ``--state-dir DIR``, ``--upgrade``, ``--take-wait S``, ``--no-standby``,
    ``--readers N`` and ``--events FILE`` (see :func:`run_failover`)."""
    parser.add_argument("--keeper", metavar="SOCKET", help="failover: keep the mount's descriptors in the afuse "
                        f"keeper at SOCKET; a restarted {name} takes over the live mount (needs --state-dir)")
    parser.add_argument("--state-dir", metavar="DIR", help="failover: where contents and handles are journaled")
    parser.add_argument("--upgrade", action="store_true", help="failover: take over gracefully from the running one")
    parser.add_argument("--take-wait", type=float, default=None, metavar="SECONDS",
                        help="failover: how long to wait for a serving daemon to go (a hot standby waits long)")
    parser.add_argument("--no-standby", action="store_true",
                        help="failover: do not keep a warm standby daemon at the keeper (by default one waits "
                             "there and takes over the moment the serving daemon dies)")
    parser.add_argument("--standby", action="store_true",
                        help="failover: be the warm standby: wait at the keeper, serve once the serving daemon dies")
    parser.add_argument("--readers", type=int, default=2, help="failover: descriptors reading requests")
    parser.add_argument("--events", metavar="FILE", help="failover: append timing events (JSON lines) to FILE")


class Events:
    """JSON lines ``{"t", "pid", "event", ...}`` appended to a file (for measurements; nothing without one)."""

    def __init__(self, path: str | None) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644) if path else -1
        self.first = True

    def __call__(self, event: str, **kw: Any) -> None:
        """Append one event."""
        if self.fd >= 0:
            os.write(self.fd, json.dumps({"t": time.time(), "pid": os.getpid(), "event": event, **kw}).encode() + b"\n")

    def probe(self, req: Request) -> None:
        """A request probe: the first request served, and each resent one."""
        if self.first:
            self.first = False
            self("first_request", op=type(req).__name__)
        if req.is_resend:
            self("resent", op=type(req).__name__)


def standby_command(module: str, argv: Sequence[str]) -> list[str]:
    """The command line of a warm standby for a daemon run as ``python -m module *argv``."""
    out, skip = [sys.executable, "-m", module], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--upgrade", "--standby"):
            pass
        elif a == "--take-wait":
            skip = True
        elif not a.startswith("--take-wait="):
            out.append(a)
    return [*out, "--standby"]


def start_standby(command: Sequence[str]) -> subprocess.Popen[bytes]:
    """Start ``command`` detached (own session, no stdin/stdout; stderr shared); reaped when it exits."""
    proc = subprocess.Popen(list(command), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True)
    threading.Thread(target=proc.wait, daemon=True, name="afuse-standby-reaper").start()
    return proc


def run_failover(
    ops: Operations, args: argparse.Namespace, name: str, *, probe: Callable[[Request], None] | None = None,
    on_drain: Callable[[], None] | None = None, on_serving: Callable[[], None] | None = None,
    module: str | None = None, argv: Sequence[str] | None = None,
) -> int:
    """Serve ``ops`` under :func:`afuse.failover.serve_failover` (the options of
    :func:`add_failover_arguments`), printing ``ready`` once serving, until unmounted or signalled:
    SIGTERM, SIGHUP and SIGINT drain (the mount stays for the next daemon). ``probe`` sees each
    request, ``on_drain`` is called when draining starts, ``on_serving`` once serving. With
    ``--keeper`` (and no ``--no-standby``) a warm standby, ``python -m module *argv --standby``
    (``argv`` defaults to ``sys.argv[1:]``), is started once serving if none waits at the keeper.
    Exit status 130 after SIGINT, else 0 (also for a dismissed standby); 1 if serving failed, 2
    for bad options."""
    from functools import partial

    import trio

    from ..failover import StandbyDismissed, serve_failover
    from ..running import serve_until_signalled

    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format=f"%(asctime)s {name}[%(process)d] %(levelname)s %(message)s")
    if io_uring_choice(args):
        print("error: --io-uring cannot be combined with failover (a taken-over connection is served "
              "over /dev/fuse)", file=sys.stderr)
        return 2
    if getattr(args, "poll_us", 0.0):
        print("error: --poll-us is not available with failover yet", file=sys.stderr)
        return 2
    try:
        options = MountOptions.parse(",".join(args.options))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    signals: list[signal.Signals] = []
    standby = bool(getattr(args, "standby", False))
    if standby and not args.keeper:
        print("error: --standby needs --keeper", file=sys.stderr)
        return 2
    successor: Callable[[], object] | None = None
    if args.keeper and module is not None and not getattr(args, "no_standby", False):
        command = standby_command(module, sys.argv[1:] if argv is None else argv)
        successor = partial(start_standby, command)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            session = await nursery.start(lambda task_status: serve_failover(
                ops, args.mountpoint, keeper=args.keeper, state_dir=args.state_dir, options=options,
                upgrade=args.upgrade, take_wait=getattr(args, "take_wait", None), standby=standby,
                successor=successor, readers=getattr(args, "readers", 2), probe=probe, on_drain=on_drain,
                task_status=task_status))
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
    except BaseExceptionGroup as group:
        dismissed, rest = group.split(StandbyDismissed)
        if rest is not None:
            raise
        assert dismissed is not None
        logging.getLogger("afuse.failover").info("standby dismissed: %s", args.mountpoint)
        return 0
    except StandbyDismissed:
        logging.getLogger("afuse.failover").info("standby dismissed: %s", args.mountpoint)
        return 0
    return 128 + signal.SIGINT if signal.SIGINT in signals else 0
