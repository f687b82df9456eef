"""Keeping a FUSE connection alive across daemon crashes and upgrades (see docs/failover.md).

The kernel keeps a FUSE connection alive as long as any process holds a /dev/fuse descriptor
of it. Two holders are supported here:

* **the keeper**, a small separate process (``python -m afuse.keeper --socket PATH``) holding
  each mountpoint's descriptors (the session fd and its clones) and the negotiated INIT result,
  handing them to a started or restarted daemon over a unix socket (SCM_RIGHTS). Only peers
  running as the keeper's uid or as root are served (SO_PEERCRED). It unmounts only when asked.
* **systemd's file descriptor store** (``FileDescriptorStoreMax=``): the daemon stores its
  descriptors with ``sd_notify("FDSTORE=1")``; a restarted one receives them through
  ``LISTEN_FDS``. Pure Python, no libsystemd: :func:`fdstore_save`, :func:`fdstore_take`.

Keeper protocol: newline-delimited JSON messages on a SOCK_STREAM unix socket; a message with
``"nfds": n`` carries n descriptors (SCM_RIGHTS) on the same ``sendmsg``.

* ``{"op": "register", "mountpoint", "negotiated", "nfds"}`` + fds -> ``{"ok": true}``; the
  connection becomes the mountpoint's *owner* (its control connection).
* ``{"op": "take", "mountpoint"[, "wait": s]}`` -> ``{"ok": true, "negotiated", "nfds", "resend"}``
  + fds, or ``{"ok": false}`` if the keeper has nothing for it. While another owner is alive
  (a crashed daemon whose end of the socket the kernel has not closed yet) it waits up to
  ``wait`` seconds for it to go.
* ``{"op": "upgrade", "mountpoint"}``: graceful handover. The keeper sends ``{"op": "drain",
  "mountpoint"}`` to the current owner, which stops reading, answers what it has in flight and
  replies ``{"op": "drained", "mountpoint"}``; then (or when the owner's connection closes: it
  died) the keeper answers the new daemon as for ``take`` (``"resend": false`` after a drain).
* ``{"op": "standby", "mountpoint"}``: wait as a *warm successor*; answered as for ``take``
  (``"resend": true``) when the owner dies (EOF, not drained) and no explicit take or upgrade
  waits, or ``{"ok": false}`` when dismissed: another daemon took over (it starts its own
  standby), the owner drained, or the mount was unmounted. ``take``/``upgrade``/``standby``
  answers carry ``"standbys"``: how many still wait.
* ``{"op": "release", "mountpoint"}``: the owner gives the connection up without unmounting.
* ``{"op": "unmount", "mountpoint"}`` -> ``{"ok": true}``: unmount (lazily if busy), close.
* ``{"op": "list"}`` -> ``{"ok": true, "mounts": [{"mountpoint", "nfds", "owner_pid", "standby_pids"}]}``.
* ``{"op": "keep", "mountpoint", "tag", "nfds": 1}`` + fd (owner only, no reply): keep a
  descriptor for the mount under ``tag`` (e.g. one holding a file lock, so that the lock outlives
  the daemon); ``{"op": "unkeep", "mountpoint", "tag"}`` closes it; ``{"op": "kept",
  "mountpoint"[, "start": i]}`` -> ``{"ok": true, "tags": [...], "nfds"}`` + fds (at most
  MAX_FDS from the ``start``-th on; the keeper keeps its own copies).

A daemon's death is seen as EOF on its control connection.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import errno
import json
import logging
import os
import signal
import socket
import struct
import sys
from collections.abc import Sequence
from typing import Any

import attrs
import trio

from . import device
from .errors import MountError
from .wire.init import Negotiated

log = logging.getLogger("afuse.keeper")

#: Descriptors one message may carry.
MAX_FDS = 64
_CRED = struct.Struct("3i")


# -- messages with descriptors ------------------------------------------------------------------


class Channel:
    """Newline-delimited JSON messages (with SCM_RIGHTS descriptors) on a trio unix socket."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self._buf = bytearray()
        self._fds: list[int] = []
        self._send_lock = trio.Lock()
        self.closed = False

    async def send(self, msg: dict[str, Any], fds: Sequence[int] = ()) -> None:
        """Send ``msg`` (``nfds`` is set from ``fds``) and ``fds`` with it."""
        if fds:
            msg = {**msg, "nfds": len(fds)}
        data = (json.dumps(msg, separators=(",", ":")) + "\n").encode()
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        async with self._send_lock:
            sent = await self.sock.sendmsg([data], anc)
            while sent < len(data):
                data = data[sent:]
                sent = await self.sock.send(data)

    async def receive(self) -> tuple[dict[str, Any], list[int]] | None:
        """The next message and its descriptors; None at EOF."""
        while b"\n" not in self._buf:
            try:
                data, anc, flags, _addr = await self.sock.recvmsg(
                    65536, socket.CMSG_SPACE(MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC)
            except (ConnectionResetError, BrokenPipeError):
                data, anc, flags = b"", [], 0
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    got = array.array("i")
                    got.frombytes(cdata[: len(cdata) - len(cdata) % got.itemsize])
                    self._fds.extend(got)
            if flags & socket.MSG_CTRUNC:
                log.error("descriptors were truncated (more than %d in one message)", MAX_FDS)
            if not data:
                self.closed = True
                self._close_pending()
                return None
            self._buf += data
        line, _, rest = self._buf.partition(b"\n")
        self._buf = bytearray(rest)
        msg: dict[str, Any] = json.loads(line)
        n = int(msg.get("nfds", 0))
        fds = list(self._fds[:n])
        del self._fds[:n]
        if len(fds) < n:
            for fd in fds:
                os.close(fd)
            raise ValueError(f"message announced {n} descriptors, {len(fds)} came")
        return msg, fds

    def _close_pending(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()

    def close(self) -> None:
        """Close the socket (and descriptors received but not taken)."""
        self.closed = True
        self._close_pending()
        self.sock.close()


def peer_credentials(sock: trio.socket.SocketType) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a unix socket."""
    return _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))


def canonical(mountpoint: str | os.PathLike[str]) -> str:
    """The key of a mountpoint: absolute and symlink-free, never stat()ing a mount."""
    return device.resolve_mountpoint(os.fspath(mountpoint))


# -- the keeper -----------------------------------------------------------------------------------


@attrs.define(eq=False)
class _Standby:
    chan: Channel
    pid: int
    dismissed: bool = False


@attrs.define(eq=False)
class _Entry:
    mountpoint: str
    fds: list[int]
    negotiated: dict[str, int]
    owner: Channel | None = None
    owner_pid: int = 0
    released: trio.Event = attrs.field(factory=trio.Event)
    drained: bool = False
    #: Descriptors kept for the daemon by tag (``keep``), e.g. ones holding file locks.
    kept: dict[str, int] = attrs.field(factory=dict)
    #: Warm successors waiting for the owner to die, first come first served.
    standbys: list[_Standby] = attrs.field(factory=list)
    #: Explicit take/upgrade requests waiting: they go before standbys.
    takers: int = 0
    changed: trio.Event = attrs.field(factory=trio.Event)

    def kick(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def set_owner(self, chan: Channel, pid: int) -> None:
        self.owner, self.owner_pid = chan, pid
        self.released = trio.Event()
        self.drained = False
        self.kick()

    def release(self, drained: bool) -> None:
        self.owner, self.owner_pid = None, 0
        self.drained = drained
        self.released.set()
        if drained:  # stopped on purpose: standbys are not for this
            self.dismiss_standbys()
        self.kick()

    def dismiss_standbys(self) -> None:
        for sb in self.standbys:
            sb.dismissed = True
        self.standbys.clear()
        self.kick()

    def close(self) -> None:
        for fd in [*self.fds, *self.kept.values()]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds, self.kept = [], {}

    def unkeep(self, tag: str) -> None:
        fd = self.kept.pop(tag, None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


class Keeper:
    """Holds descriptors per mountpoint and hands them over (see the module docstring)."""

    def __init__(self, state_dir: str | None = None, owner_wait: float = 10.0, drain_timeout: float = 30.0) -> None:
        self.entries: dict[str, _Entry] = {}
        self.state_dir = state_dir
        self.owner_wait = owner_wait
        self.drain_timeout = drain_timeout
        self.uid = os.getuid()

    async def serve(self, path: str, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on unix socket ``path`` until cancelled."""
        if self.state_dir:
            os.makedirs(self.state_dir, exist_ok=True)
        _remove_stale_socket(path)
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock = trio.socket.from_stdlib_socket(raw)
        try:
            # Created 0600, never wider for a moment (peers: SO_PEERCRED too). The umask is the
            # process's: bound without an await in between, so no other task runs under it.
            old_umask = os.umask(0o177)
            try:
                raw.bind(path)
            finally:
                os.umask(old_umask)
            os.chmod(path, 0o600)
            sock.listen(64)
            task_status.started()
            async with trio.open_nursery() as nursery:
                while True:
                    conn, _ = await sock.accept()
                    nursery.start_soon(self._connection, conn)
        finally:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(path)
            for entry in self.entries.values():
                entry.close()

    async def _connection(self, sock: trio.socket.SocketType) -> None:
        try:
            pid, uid, _gid = peer_credentials(sock)
        except OSError:
            sock.close()
            return
        if uid not in (0, self.uid):
            log.warning("refusing pid %d: uid %d is neither root nor %d", pid, uid, self.uid)
            sock.close()
            return
        chan = Channel(sock)
        try:
            while True:
                got = await chan.receive()
                if got is None:
                    break
                msg, fds = got
                try:
                    await self._request(chan, pid, msg, fds)
                except (KeyError, TypeError, ValueError) as e:
                    for fd in fds:
                        os.close(fd)
                    await chan.send({"ok": False, "error": f"bad request: {e!r}"})
        except (OSError, ValueError) as e:
            log.info("connection of pid %d failed: %s", pid, e)
        finally:
            for entry in self.entries.values():
                if entry.owner is chan:
                    log.info("owner of %s (pid %d) is gone", entry.mountpoint, pid)
                    entry.release(drained=False)
            chan.close()

    async def _request(self, chan: Channel, pid: int, msg: dict[str, Any], fds: list[int]) -> None:
        op = msg["op"]
        if op == "list":
            await chan.send({"ok": True, "mounts": [
                {"mountpoint": e.mountpoint, "nfds": len(e.fds), "owner_pid": e.owner_pid,
                 "standby_pids": [sb.pid for sb in e.standbys]}
                for e in self.entries.values()]})
            return
        mp = str(msg["mountpoint"])
        entry = self.entries.get(mp)
        if op == "register":
            if not fds:
                raise ValueError("register without descriptors")
            if entry is not None:
                entry.close()
                entry.dismiss_standbys()
                entry.release(drained=False)
            entry = self.entries[mp] = _Entry(mp, fds, dict(msg["negotiated"]))
            entry.set_owner(chan, pid)
            self._save(entry)
            log.info("registered %s: %d descriptors from pid %d", mp, len(fds), pid)
            await chan.send({"ok": True, "standbys": 0})
        elif op in ("take", "upgrade"):
            if entry is None:
                await chan.send({"ok": False, "error": "no descriptors for this mountpoint"})
                return
            if entry.owner is not None and entry.owner is not chan:
                if op == "upgrade":
                    log.info("asking pid %d to drain %s", entry.owner_pid, mp)
                    with contextlib.suppress(OSError):
                        await entry.owner.send({"op": "drain", "mountpoint": mp})
                    wait = float(msg.get("wait", self.drain_timeout))
                else:
                    wait = float(msg.get("wait", self.owner_wait))
                entry.takers += 1
                try:
                    with trio.move_on_after(wait):
                        while entry.owner is not None and entry.owner is not chan:
                            await entry.released.wait()
                finally:
                    entry.takers -= 1
                    entry.kick()
                if entry.owner is not None and entry.owner is not chan:
                    await chan.send({"ok": False, "error": f"busy: pid {entry.owner_pid} serves it"})
                    return
                if self.entries.get(mp) is not entry:  # unmounted meanwhile
                    await chan.send({"ok": False, "error": "unmounted"})
                    return
            resend = not entry.drained
            entry.set_owner(chan, pid)
            entry.dismiss_standbys()  # the new owner starts its own (of its own version)
            log.info("handing %s to pid %d (%s)", mp, pid, "resend" if resend else "drained")
            await chan.send({"ok": True, "negotiated": entry.negotiated, "resend": resend, "standbys": 0},
                            entry.fds)
        elif op == "standby":
            if entry is None:
                await chan.send({"ok": False, "error": "no descriptors for this mountpoint"})
                return
            await self._standby(chan, pid, entry)
        elif op in ("keep", "unkeep"):
            if entry is None or entry.owner is not chan:
                for fd in fds:
                    os.close(fd)
                return
            entry.unkeep(str(msg["tag"]))
            if op == "keep" and fds:
                entry.kept[str(msg["tag"])] = fds[0]
                for fd in fds[1:]:
                    os.close(fd)
        elif op == "kept":
            items = [] if entry is None else list(entry.kept.items())
            start = int(msg.get("start", 0))
            chunk = items[start:start + MAX_FDS]
            await chan.send({"ok": True, "tags": [t for t, _ in chunk], "more": start + MAX_FDS < len(items)},
                            [fd for _, fd in chunk])
        elif op in ("drained", "release"):
            if entry is not None and entry.owner is chan:
                # A drain that left requests unanswered (lock waits) needs them resent.
                entry.release(drained=op == "drained" and not msg.get("resend"))
            if op == "release":
                await chan.send({"ok": True})
        elif op == "unmount":
            if entry is None:
                await chan.send({"ok": False, "error": "no descriptors for this mountpoint"})
                return
            del self.entries[mp]
            entry.dismiss_standbys()
            err = await trio.to_thread.run_sync(_unmount, mp)
            entry.close()
            entry.release(drained=False)
            await chan.send({"ok": err is None, **({"error": err} if err else {})})
        else:
            raise ValueError(f"unknown op {op!r}")

    async def _standby(self, chan: Channel, pid: int, entry: _Entry) -> None:
        """Wait as a warm successor: get the descriptors when the owner dies (not when it drains, nor
        while an explicit take or upgrade waits); ``{"ok": false}`` when dismissed."""
        me = _Standby(chan, pid)
        entry.standbys.append(me)
        log.info("pid %d stands by for %s", pid, entry.mountpoint)
        try:
            while not me.dismissed and self.entries.get(entry.mountpoint) is entry:
                if entry.owner is None and not entry.drained and not entry.takers and entry.standbys[0] is me:
                    entry.standbys.pop(0)
                    entry.set_owner(chan, pid)
                    log.info("handing %s to standby pid %d (resend)", entry.mountpoint, pid)
                    await chan.send({"ok": True, "negotiated": entry.negotiated, "resend": True,
                                     "standbys": len(entry.standbys)}, entry.fds)
                    return
                await entry.changed.wait()
        finally:
            if me in entry.standbys:
                entry.standbys.remove(me)
                entry.kick()
        await chan.send({"ok": False, "error": "dismissed"})

    def _save(self, entry: _Entry) -> None:
        if not self.state_dir:
            return
        from .state import write_atomic

        name = escape_name(entry.mountpoint) + ".negotiated.json"
        write_atomic(os.path.join(self.state_dir, name), json.dumps(entry.negotiated).encode())


def _unmount(mp: str) -> str | None:
    try:
        device.unmount(mp)
    except MountError as e:
        if e.errno != errno.EBUSY:
            return str(e)
        try:
            device.unmount(mp, lazy=True)
        except MountError as e2:
            return str(e2)
    return None


def _remove_stale_socket(path: str) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except FileNotFoundError:
        return
    except ConnectionRefusedError:
        os.unlink(path)
        return
    finally:
        s.close()
    raise OSError(errno.EADDRINUSE, f"a keeper already listens on {path}")


# -- the client -------------------------------------------------------------------------------------


@attrs.define
class Handover:
    """Descriptors of a live connection and its negotiated INIT, from a keeper or systemd."""

    fds: list[int]
    negotiated: Negotiated
    #: Whether unanswered requests must be resent (False after a graceful drain).
    resend: bool = True
    #: Warm successors still waiting at the keeper (-1: unknown, e.g. from systemd).
    standbys: int = -1


class KeeperError(Exception):
    """The keeper refused a request."""


class KeeperClient:
    """A connection to a keeper; a daemon keeps it open as its control connection."""

    def __init__(self, chan: Channel) -> None:
        self.chan = chan

    @classmethod
    async def connect(cls, path: str) -> KeeperClient:
        """Connect to the keeper listening on ``path``."""
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            await sock.connect(path)
        except BaseException:
            sock.close()
            raise
        return cls(Channel(sock))

    async def _call(self, msg: dict[str, Any], fds: Sequence[int] = ()) -> tuple[dict[str, Any], list[int]]:
        await self.chan.send(msg, fds)
        got = await self.chan.receive()
        if got is None:
            raise KeeperError("the keeper closed the connection")
        return got

    async def _handover(self, op: str, mountpoint: str, wait: float | None) -> Handover | None:
        msg: dict[str, Any] = {"op": op, "mountpoint": canonical(mountpoint)}
        if wait is not None:
            msg["wait"] = wait
        reply, fds = await self._call(msg)
        if not reply.get("ok"):
            if "busy" in str(reply.get("error", "")):
                raise KeeperError(str(reply["error"]))
            return None
        return Handover(fds, Negotiated.from_dict(reply["negotiated"]), bool(reply.get("resend", True)),
                        int(reply.get("standbys", -1)))

    async def take(self, mountpoint: str, wait: float | None = None) -> Handover | None:
        """The kept descriptors of ``mountpoint`` (None: the keeper has none; mount anew).

        This connection becomes the owner. Waits up to ``wait`` seconds (the keeper's default:
        10) for a previous owner that is still connected to go away.
        """
        return await self._handover("take", mountpoint, wait)

    async def upgrade(self, mountpoint: str, wait: float | None = None) -> Handover | None:
        """Have the current owner drain and exit, then take its descriptors."""
        return await self._handover("upgrade", mountpoint, wait)

    async def standby(self, mountpoint: str) -> Handover | None:
        """Wait as a warm successor of ``mountpoint``'s owner: its descriptors once it dies (resend
        on); None when dismissed (a new owner took over, the owner drained, or it was unmounted)."""
        return await self._handover("standby", mountpoint, None)

    async def register(self, mountpoint: str, negotiated: Negotiated, fds: Sequence[int]) -> None:
        """Give the keeper (dups of) this connection's descriptors; become their owner."""
        reply, _ = await self._call(
            {"op": "register", "mountpoint": canonical(mountpoint), "negotiated": negotiated.to_dict()}, fds)
        if not reply.get("ok"):
            raise KeeperError(str(reply.get("error")))

    async def unmount(self, mountpoint: str) -> None:
        """Ask the keeper to unmount ``mountpoint`` and drop its descriptors."""
        reply, _ = await self._call({"op": "unmount", "mountpoint": canonical(mountpoint)})
        if not reply.get("ok"):
            raise KeeperError(str(reply.get("error")))

    async def release(self, mountpoint: str) -> None:
        """Stop owning ``mountpoint`` (the keeper keeps the descriptors)."""
        await self._call({"op": "release", "mountpoint": canonical(mountpoint)})

    async def keep(self, mountpoint: str, tag: str, fd: int) -> None:
        """Have the keeper keep a copy of ``fd`` for ``mountpoint`` under ``tag`` (no reply)."""
        await self.chan.send({"op": "keep", "mountpoint": canonical(mountpoint), "tag": tag}, [fd])

    async def unkeep(self, mountpoint: str, tag: str) -> None:
        """Have the keeper close the descriptor kept under ``tag`` (no reply)."""
        await self.chan.send({"op": "unkeep", "mountpoint": canonical(mountpoint), "tag": tag})

    async def kept(self, mountpoint: str) -> dict[str, int]:
        """Copies of the descriptors kept for ``mountpoint``, by tag (call before serving)."""
        got: dict[str, int] = {}
        while True:
            reply, fds = await self._call({"op": "kept", "mountpoint": canonical(mountpoint), "start": len(got)})
            got.update(zip(reply.get("tags", []), fds, strict=True))
            if not reply.get("more"):
                return got

    async def drained(self, mountpoint: str, resend: bool = False) -> None:
        """Tell the keeper this daemon has drained ``mountpoint`` (no reply); ``resend``: it left
        requests unanswered (lock waits), so the successor asks the kernel to resend them."""
        await self.chan.send({"op": "drained", "mountpoint": canonical(mountpoint), "resend": resend})

    async def list(self) -> list[dict[str, Any]]:
        """The kept mountpoints."""
        reply, _ = await self._call({"op": "list"})
        mounts: list[dict[str, Any]] = reply["mounts"]
        return mounts

    async def control(self) -> dict[str, Any] | None:
        """The next message the keeper sends on its own (``{"op": "drain", ...}``); None at EOF."""
        got = await self.chan.receive()
        if got is None:
            return None
        msg, fds = got
        for fd in fds:
            os.close(fd)
        return msg

    def close(self) -> None:
        """Close the connection (the keeper takes it as this daemon's exit)."""
        self.chan.close()


# -- systemd's file descriptor store ---------------------------------------------------------------------

_listen_fds: dict[str, list[int]] | None = None


def escape_name(mountpoint: str) -> str:
    """A mountpoint as an FDNAME-safe string (letters, digits and ``.``; ``/`` as ``-``; ``_xx`` hex)."""
    out = []
    for ch in mountpoint.strip("/").encode():
        c = chr(ch)
        if c.isascii() and (c.isalnum() or c == "."):
            out.append(c)
        elif c == "/":
            out.append("-")
        else:
            out.append(f"_{ch:02x}")
    return "".join(out) or "-"


def fdname_prefix(mountpoint: str) -> str:
    """The FDNAME prefix of ``mountpoint``'s descriptors in the store."""
    return f"afuse-{escape_name(mountpoint)}-"


def sd_notify(state: str, fds: Sequence[int] = ()) -> bool:
    """Send ``state`` (and ``fds``) to ``$NOTIFY_SOCKET``; False if it is not set."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr[0] == "@":
        addr = "\0" + addr[1:]
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.sendmsg([state.encode()], anc, 0, addr)
    return True


def fdstore_save(mountpoint: str, negotiated: Negotiated, fds: Sequence[int]) -> bool:
    """Store ``fds`` and the negotiated INIT (a memfd) in systemd's fd store; False without systemd."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return False
    prefix = fdname_prefix(canonical(mountpoint))
    mfd = os.memfd_create("afuse-negotiated", os.MFD_CLOEXEC)
    try:
        os.write(mfd, json.dumps(negotiated.to_dict()).encode())
        sd_notify(f"FDSTORE=1\nFDNAME={prefix}negotiated", [mfd])
    finally:
        os.close(mfd)
    for i, fd in enumerate(fds):
        sd_notify(f"FDSTORE=1\nFDNAME={prefix}{i}", [fd])
    return True


def listen_fds(unset_environment: bool = True) -> dict[str, list[int]]:
    """Descriptors passed by systemd (``LISTEN_FDS``, from 3), by name; read once per process."""
    global _listen_fds
    if _listen_fds is not None:
        return _listen_fds
    fds: dict[str, list[int]] = {}
    try:
        pid = int(os.environ.get("LISTEN_PID", "0"))
        n = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        pid = n = 0
    if pid == os.getpid() and n > 0:
        names = os.environ.get("LISTEN_FDNAMES", "").split(":")
        for i in range(n):
            fd = 3 + i
            os.set_inheritable(fd, False)
            name = names[i] if i < len(names) and names[i] else "unknown"
            fds.setdefault(name, []).append(fd)
    if unset_environment:
        for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(var, None)
    _listen_fds = fds
    return fds


def fdstore_take(mountpoint: str, negotiated_fallback: dict[str, int] | None = None) -> Handover | None:
    """The descriptors of ``mountpoint`` that systemd passed in; None if there are none."""
    passed = listen_fds()
    prefix = fdname_prefix(canonical(mountpoint))
    numbered: list[tuple[int, int]] = []
    neg: dict[str, int] | None = negotiated_fallback
    for name, fds in passed.items():
        if not name.startswith(prefix):
            continue
        tail = name[len(prefix):]
        if tail == "negotiated":
            data = b""
            while chunk := os.pread(fds[0], 65536, len(data)):
                data += chunk
            neg = json.loads(data)
        elif tail.isdigit():
            numbered.extend((int(tail), fd) for fd in fds)
    if not numbered:
        return None
    if neg is None:
        raise KeeperError(f"systemd passed descriptors of {mountpoint} but no negotiated INIT")
    return Handover([fd for _, fd in sorted(numbered)], Negotiated.from_dict(neg), True)


# -- command line ----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m afuse.keeper --socket PATH [--state-dir DIR] [--debug]``."""
    p = argparse.ArgumentParser(description="Hold FUSE descriptors across daemon restarts.")
    p.add_argument("--socket", required=True, help="unix socket to listen on")
    p.add_argument("--state-dir", help="directory to save each mount's negotiated INIT in")
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s keeper %(levelname)s %(message)s")

    async def run() -> None:
        keeper = Keeper(args.state_dir)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
            async with trio.open_nursery() as nursery:
                await nursery.start(keeper.serve, args.socket)
                print("ready", flush=True)
                async for _ in sigs:
                    break
                nursery.cancel_scope.cancel()

    trio.run(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())


class KeptDescriptors:
    """A daemon's side of ``keep``/``unkeep`` for one mountpoint: descriptors (holding file locks)
    that the keeper keeps open while the daemon changes; :attr:`taken` holds the copies a
    successor got back (by tag)."""

    def __init__(self, client: KeeperClient, mountpoint: str, taken: dict[str, int] | None = None) -> None:
        self.client, self.mountpoint = client, canonical(mountpoint)
        self.taken: dict[str, int] = taken or {}
        self._serial = 0

    def tag(self, *parts: object) -> str:
        """A new unique tag made of ``parts`` (space-separated) and a serial number."""
        self._serial += 1
        return " ".join(map(str, (*parts, os.getpid(), self._serial)))

    async def keep(self, tag: str, fd: int) -> None:
        """Keep ``fd`` under ``tag`` (done once this returns)."""
        await self.client.keep(self.mountpoint, tag, fd)

    def unkeep(self, tag: str) -> None:
        """Drop what is kept under ``tag`` (sent soon, from a system task)."""
        async def send() -> None:
            with contextlib.suppress(OSError, trio.ClosedResourceError, trio.BrokenResourceError):
                await self.client.unkeep(self.mountpoint, tag)
        with contextlib.suppress(RuntimeError):  # no trio run any more: the keeper keeps it until unmount
            trio.lowlevel.spawn_system_task(send)
