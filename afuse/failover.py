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
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from .device import MountOptions
from .keeper import (
    Handover,
    KeeperClient,
    KeeperError,
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


class StandbyDismissed(Exception):
    """A standby's wait ended without a handover: a new owner took over, the owner drained, or the
    mount went away."""


#: Seconds after a takeover before the state is compacted (the first requests are served first).
COMPACT_AFTER = 0.5
#: How often the serving daemon looks whether its journal asks for a compaction (seconds).
COMPACT_POLL = 0.1
#: Seconds after serving starts before a warm successor is started (it competes for the CPU).
SUCCESSOR_AFTER = 0.3


async def _acquire(mp: str, keeper: str | None, upgrade: bool, store: FileStateStore,
                   take_wait: float | None, standby: bool) -> tuple[KeeperClient | None, Handover | None]:
    if keeper is not None:
        client = await KeeperClient.connect(keeper)
        try:
            if standby:
                try:
                    got = await client.standby(mp)
                except KeeperError as e:  # the keeper went away: nothing to stand by for
                    raise StandbyDismissed(f"{mp}: {e}") from None
                if got is None:
                    raise StandbyDismissed(mp)
            else:
                got = await (client.upgrade(mp, take_wait) if upgrade else client.take(mp, take_wait))
        except BaseException:
            client.close()
            raise
        return client, got
    if standby:
        raise ValueError("a standby needs a keeper")
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
    standby: bool = False,
    successor: Callable[[], object] | None = None,
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
    ``standby``: wait at the keeper as a warm successor, and serve once the serving daemon dies
    (:class:`StandbyDismissed` if the wait ends otherwise). ``successor``: called once serving
    (with a keeper) when no standby waits at the keeper: start one (e.g. a process running this
    with ``standby=True``). A takeover restores the state, serves, and compacts it a little later.
    """
    if not isinstance(ops, Persistent):
        raise TypeError(f"{type(ops).__name__} does not implement afuse.state.Persistent")
    mp = canonical(mountpoint)
    # No fsync on the serving path (a process crash never sees a torn snapshot); compaction from a
    # task of its own, never inside a handler (a READDIRPLUS entry is journaled before its count).
    store = FileStateStore(state_dir, durable=False, auto_compact=False)
    client, handover = await _acquire(mp, keeper, upgrade, store, take_wait, standby)
    kw: dict[str, Any] = {"readers": readers, "max_requests": max_requests, "unmount": False,
                          "private_clones": False}
    attach_keeper = getattr(ops, "attach_keeper", None)  # a filesystem keeping lock descriptors there
    try:
        async with trio.open_nursery() as nursery:
            if handover is not None:
                t_load = time.perf_counter()
                loaded = store.load_into(ops)
                load_ms = (time.perf_counter() - t_load) * 1000
                if not loaded:
                    log.error("taking over %s without saved state: the kernel's nodeids will be stale", mp)
                if client is not None and attach_keeper is not None:
                    attach_keeper(KeptDescriptors(client, mp, await client.kept(mp)))
                store.attach(ops, compact=not loaded)  # compacted later: serve first
                if probe is not None:  # after attach: journaling may wrap the handlers
                    probe_requests(ops, probe)
                takeover = Takeover(handover.fds[0], handover.negotiated, handover.fds[1:], resend=handover.resend)
                kw["readers"] = max(readers, len(handover.fds))
                session: Session = await nursery.start(functools.partial(
                    serve, ops, mp, takeover=takeover, config=config, **kw))
                log.info("took over %s (%d descriptors, %s; state restored in %.1f ms: %d journal records)",
                         mp, len(handover.fds), "resent" if handover.resend else "drained", load_ms, store.loaded)
            else:
                store.clear()
                if client is not None and attach_keeper is not None:
                    attach_keeper(KeptDescriptors(client, mp))
                store.attach(ops)
                if probe is not None:
                    probe_requests(ops, probe)
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
            nursery.start_soon(_compact_when_due, store, handover is not None)
            if successor is not None and client is not None and (handover is None or handover.standbys <= 0):
                nursery.start_soon(_start_successor, successor)
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


async def _compact_when_due(store: FileStateStore, took_over: bool) -> None:
    """Compact after a takeover (:data:`COMPACT_AFTER`), then whenever the journal asks for it."""
    if took_over:
        await trio.sleep(COMPACT_AFTER)
        store.compact()
    while True:
        await trio.sleep(COMPACT_POLL)
        if store.compact_due:
            store.compact()


async def _start_successor(successor: Callable[[], object]) -> None:
    await trio.sleep(SUCCESSOR_AFTER)
    try:
        successor()
    except OSError as e:
        log.warning("could not start a standby: %s", e)


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
                    standbys = ",".join(map(str, m.get("standby_pids", []))) or "-"
                    print(f"{m['mountpoint']}\t{m['nfds']} fds\towner pid {m['owner_pid'] or '-'}"
                          f"\tstandby pids {standbys}")
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
