"""Serving a filesystem that survives its daemon's crash or upgrade (see docs/failover.md).

:func:`serve_failover` either takes over a live connection (from a keeper, see
:mod:`afuse.keeper`, or from systemd's fd store through ``LISTEN_FDS``), restoring the
filesystem's state from its :class:`~afuse.state.FileStateStore` and asking the kernel to resend
what the previous daemon had read but not answered; or mounts anew and hands the descriptors to
the keeper / the fd store. It never unmounts on exit and serves only on descriptors the keeper
also holds (requests read on a descriptor only this process held would die with it).

Graceful upgrade: the new daemon calls :func:`serve_failover` with ``upgrade=True``; the keeper
asks the old one to drain (stop reading, finish what is in flight), and hands the descriptors
over once it has; nothing is replayed. Under systemd, SIGTERM drains (see the example CLI in
:mod:`afuse.examples.failoverfs`).

``python -m afuse.failover {list,unmount} --socket PATH [MOUNTPOINT]`` talks to a keeper.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from .device import MountOptions
from .keeper import (
    Handover,
    KeeperClient,
    KeptDescriptors,
    canonical,
    fdstore_save,
    fdstore_take,
    listen_fds,
    sd_notify,
)
from .operations import Operations, overridden
from .session import Session, Takeover, serve
from .state import FileStateStore, Persistent
from .wire import requests as r
from .wire.constants import Opcode
from .wire.init import InitConfig, Negotiated
from .wire.opcodes import OPCODES

log = logging.getLogger("afuse.failover")

NEGOTIATED_FILE = "negotiated.json"

#: Handlers a request probe is put in front of: every handler of a request that is answered.
_PROBED = tuple(dict.fromkeys(
    h for s in OPCODES if s.replies and s.opcode != Opcode.DESTROY for h in (s.handler, s.alt_handler) if h))


def probe_requests(ops: Operations, probe: Callable[[r.Request], None]) -> None:
    """Call ``probe(req)`` before each handler of ``ops`` (for measurements and tests).

    Must be called before serving starts (the dispatcher binds the handlers then).
    """
    for name in _PROBED:
        if not overridden(ops, name):
            continue
        orig = getattr(ops, name)
        if not inspect.iscoroutinefunction(orig):
            continue

        def wrap(orig: Callable[[Any], Awaitable[Any]]) -> Callable[[Any], Awaitable[Any]]:
            @functools.wraps(orig)
            async def probed(req: Any) -> Any:
                probe(req)
                return await orig(req)
            return probed

        setattr(ops, name, wrap(orig))


async def _acquire(mp: str, keeper: str | None, upgrade: bool, store: FileStateStore,
                   take_wait: float | None) -> tuple[KeeperClient | None, Handover | None]:
    if keeper is not None:
        client = await KeeperClient.connect(keeper)
        try:
            got = await (client.upgrade(mp, take_wait) if upgrade else client.take(mp, take_wait))
        except BaseException:
            client.close()
            raise
        return client, got
    if listen_fds():
        return None, fdstore_take(mp, store.read_json(NEGOTIATED_FILE))
    return None, None


async def serve_failover(
    ops: Operations,
    mountpoint: str,
    *,
    keeper: str | None = None,
    state_dir: str,
    options: MountOptions | str | None = None,
    config: InitConfig | None = None,
    readers: int = 2,
    max_requests: int = 64,
    upgrade: bool = False,
    take_wait: float | None = None,
    probe: Callable[[r.Request], None] | None = None,
    on_drain: Callable[[], None] | None = None,
    task_status: trio.TaskStatus[Session] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``ops`` (which must implement :class:`~afuse.state.Persistent`) on ``mountpoint``,
    taking over a live connection if the keeper (socket path ``keeper``) or systemd has one.

    Returns when the session ends: drained (the keeper's ``drain`` for an upgrade, or
    ``session.drain()`` called by the caller, e.g. on SIGTERM) or unmounted. The mount is never
    unmounted here; ask the keeper (``KeeperClient.unmount``) or ``umount`` it.
    ``upgrade``: ask the keeper to drain the serving daemon and take over from it.
    """
    if not isinstance(ops, Persistent):
        raise TypeError(f"{type(ops).__name__} does not implement afuse.state.Persistent")
    mp = canonical(mountpoint)
    store = FileStateStore(state_dir)
    client, handover = await _acquire(mp, keeper, upgrade, store, take_wait)
    if probe is not None:
        probe_requests(ops, probe)
    kw: dict[str, Any] = {"readers": readers, "max_requests": max_requests, "unmount": False,
                          "private_clones": False}
    attach_keeper = getattr(ops, "attach_keeper", None)  # a filesystem keeping lock descriptors there
    try:
        async with trio.open_nursery() as nursery:
            if handover is not None:
                if not store.load_into(ops):
                    log.error("taking over %s without saved state: the kernel's nodeids will be stale", mp)
                if client is not None and attach_keeper is not None:
                    attach_keeper(KeptDescriptors(client, mp, await client.kept(mp)))
                store.attach(ops)
                takeover = Takeover(handover.fds[0], handover.negotiated, handover.fds[1:], resend=handover.resend)
                kw["readers"] = max(readers, len(handover.fds))
                session: Session = await nursery.start(functools.partial(
                    serve, ops, mp, takeover=takeover, config=config, **kw))
                log.info("took over %s (%d descriptors, %s)", mp, len(handover.fds),
                         "resent" if handover.resend else "drained")
            else:
                store.clear()
                if client is not None and attach_keeper is not None:
                    attach_keeper(KeptDescriptors(client, mp))
                store.attach(ops)
                session = await nursery.start(functools.partial(
                    serve, ops, mp, options=options, config=config, **kw))
                neg: Negotiated | None = session.negotiated
                assert neg is not None
                store.write_json(NEGOTIATED_FILE, neg.to_dict())
                if client is not None:
                    await client.register(mp, neg, session.reader_fds)
                elif not fdstore_save(mp, neg, session.reader_fds):
                    log.warning("no keeper and no systemd fd store: %s will not survive this daemon", mp)
                log.info("mounted %s", mp)
            sd_notify("READY=1")
            task_status.started(session)
            if client is not None:
                nursery.start_soon(_control, client, session, on_drain)
            await session.wait_closed()
            nursery.cancel_scope.cancel()
    finally:
        store.close()
        if client is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                try:
                    await client.drained(mp, resend=bool(session.pool.left_unanswered))
                except OSError:
                    pass
            client.close()


async def _control(client: KeeperClient, session: Session, on_drain: Callable[[], None] | None) -> None:
    """Follow the keeper's requests on the control connection."""
    while True:
        msg = await client.control()
        if msg is None:
            log.warning("the keeper went away; %s lives only as long as this daemon", session.mountpoint)
            return
        if msg.get("op") == "drain":
            log.info("draining %s for an upgrade", session.mountpoint)
            if on_drain is not None:
                on_drain()
            await session.drain()
            return
        log.warning("unexpected message from the keeper: %s", msg)


# -- command line --------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m afuse.failover {list,unmount} --socket PATH [MOUNTPOINT]``."""
    p = argparse.ArgumentParser(description="Talk to an afuse keeper.")
    p.add_argument("command", choices=["list", "unmount"])
    p.add_argument("mountpoint", nargs="?")
    p.add_argument("--socket", required=True, help="the keeper's unix socket")
    args = p.parse_intermixed_args(argv)

    async def run() -> int:
        client = await KeeperClient.connect(args.socket)
        try:
            if args.command == "list":
                for m in await client.list():
                    print(f"{m['mountpoint']}\t{m['nfds']} fds\towner pid {m['owner_pid'] or '-'}")
            else:
                if not args.mountpoint:
                    p.error("unmount needs MOUNTPOINT")
                await client.unmount(args.mountpoint)
        finally:
            client.close()
        return 0

    return trio.run(run)


if __name__ == "__main__":
    sys.exit(main())
