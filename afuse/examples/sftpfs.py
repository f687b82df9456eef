"""sftpfs: a directory of an SSH server, mounted over SFTP (like sshfs), on afuse's node API.

::

    python -m afuse.examples.sftpfs [USER@]HOST:[DIR] MOUNTPOINT [-p PORT] [-i IDENTITY] [-o OPTIONS]
        [--transport ssh|asyncssh] [--connections N] [--reconnect] [--timeout SECONDS]
        [--poll SECONDS] [--poll-us US]

The worked example of a network filesystem on afuse (docs/sftpfs.md explains it):

* **SFTP** is spoken by :mod:`afuse.examples.sftpclient`: a sans-IO codec and a trio client that
  writes each request the moment it is made and hands each reply to the waiter of its request id.
* **Transport.** SSH runs in OpenSSH's ``ssh`` client, a child process, as sshfs runs it (its
  configuration, agent and known hosts apply; its crypto costs this process nothing); the client
  talks over its pipes from trio (:class:`_SshProcess`), and the whole program is one trio run
  with no other event loop. ``--transport asyncssh`` runs SSH in this process with asyncssh, an
  asyncio library: the program then runs an asyncio loop with trio as its guest, asyncssh's
  calls are made with :func:`afuse.asyncio.run_asyncio`, and the channel's data is fed to the
  client with ``run_sync_soon`` (:class:`_AsyncsshLink`).
* **Nodes** are dynamic, one per remote path (:class:`SftpNode`); the filesystem keeps a path ->
  node map (renames move nodes and their subtrees). Attributes come from listings (READDIRPLUS
  answers without a request per entry) and are cached for ``cache_stat_timeout`` seconds, the time
  the kernel is told it may cache them too. Listings keep READDIRs in flight, decode the replies
  with :func:`parse_names` as they arrive (:func:`list_directory`) and reach the kernel as they
  arrive; after three lookups miss a directory's listing, it is listed.
* **Connections** (:class:`Pool`): ``--connections N`` SSH connections with one SFTP session each;
  a request goes to the least busy one, an open file to the one it was opened on. Each request
  has ``--timeout``; a lost or timed-out connection answers EIO, and with ``--reconnect`` the next
  request connects again (open files are reopened by path on first use).
* **Data** (:class:`RemoteFile`): reads of a sequential reader are served from read-ahead chunks
  requested in parallel (the window grows to ``readahead``); writes are pipelined (answered once
  sent, errors reported at the next write, flush, fsync or close).
* **--poll SECONDS** re-stats what the kernel holds and sends invalidations for what changed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import errno
import fcntl
import gc
import getpass
import importlib.util
import itertools
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import struct
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import attrs
import outcome
import trio

import afuse
import afuse.asyncio
from afuse.device import MountOptions
from afuse.errors import FUSEError, MountError
from afuse.examples._cli import _poll_us
from afuse.examples.sftpclient import (
    FX_EOF,
    FXF_APPEND,
    FXF_CREAT,
    FXF_EXCL,
    FXF_READ,
    FXF_TRUNC,
    FXF_WRITE,
    FXP_ATTRS,
    FXP_CLOSE,
    FXP_LSTAT,
    FXP_NAME,
    FXP_READ,
    FXP_READDIR,
    FXP_STAT,
    FXP_WRITE,
    Buffer,
    ConnectionLost,
    FileAttrs,
    ProtocolError,
    Reply,
    SftpClient,
    SftpError,
    check_status,
    data_of,
    parse_attrs,
    parse_names,
    string,
)
from afuse.nodes import DirItem, FileHandle, Node, NodeFS
from afuse.readers import reusable_buffer, unviewed
from afuse.wire.init import InitConfig
from afuse.wire.replies import valid_name, valid_names
from afuse.wire.requests import OpendirRequest, SetattrRequest
from afuse.wire.types import Attr, FsStats, Handle

__all__ = ["FileAttrs", "IdMap", "Pool", "RemoteFile", "SftpFS", "SftpHandle", "SftpNode", "SftpOptions",
           "list_directory", "main", "parse_names", "parse_remote"]

log = logging.getLogger("afuse.sftpfs")
T = TypeVar("T")

_ACCMODE = os.O_RDONLY | os.O_WRONLY | os.O_RDWR
#: Read-ahead chunk: one SFTP READ request (OpenSSH serves up to 256 KiB per request).
CHUNK = 128 * 1024
#: Data read: bytes, a view of a reply packet, or several of them in order (a READ's reply).
Chunk = bytes | memoryview
Data = Chunk | list[Chunk]


@attrs.define
class SftpOptions:
    """What to connect to and how to serve it (the command line's options)."""

    host: str
    #: None: the SSH client's default (its configuration, else 22).
    port: int | None = None
    user: str | None = None
    #: The remote directory to mount ("" = the login directory).
    path: str = ""
    identities: list[str] = attrs.Factory(list)
    #: A known_hosts file; None: the SSH client's default (~/.ssh/known_hosts); "none": no host key check.
    known_hosts: str | None = None
    connections: int = 1
    #: How SSH runs: "ssh", OpenSSH's client as a child process (as sshfs runs it; its configuration,
    #: agent and keys apply), or "asyncssh", in this process.
    transport: str = "ssh"
    #: The ``ssh`` command and arguments of its own (the "ssh" transport), as sshfs's ``ssh_command``.
    ssh_command: str = "ssh"
    #: The SFTP server to run (sshfs's ``sftp_server``): a subsystem name, or with a ``/`` a
    #: command the remote shell runs (e.g. ``sudo -n /usr/lib/openssh/sftp-server``).
    sftp_server: str = "sftp"
    #: sshfs's ``directport``: SFTP straight over TCP to this port, no SSH (None: over SSH).
    directport: int | None = None
    #: sshfs's ``passive`` (``slave``): SFTP over this process's stdin and stdout, which another
    #: program connects to an SFTP server (no SSH started here; ``ready`` goes to stderr).
    passive: bool = False
    #: Options for the ``ssh`` client as ``NAME=VALUE`` (``-o ProxyJump=...``, as sshfs passes
    #: them); they come first, so they win over sftpfs's own (ssh takes an option's first value).
    ssh_options: list[str] = attrs.Factory(list)
    reconnect: bool = False
    #: Seconds a request (or connecting) may take before it fails with EIO.
    timeout: float = 15.0
    #: Seconds between polls for remote changes (0: no polling).
    poll: float = 0.0
    #: Seconds attributes and names are cached (here and by the kernel), as sshfs's cache_stat_timeout.
    stat_timeout: float = 20.0
    #: Seconds a directory listing is cached, as sshfs's cache_dir_timeout.
    dir_timeout: float = 20.0
    #: Seconds a symlink's target is cached, as sshfs's cache_link_timeout.
    link_timeout: float = 20.0
    #: Largest read-ahead window of a sequential reader, bytes. Readers at once share twice this:
    #: eight get a quarter each (the server serves no faster, and the data waits in memory).
    readahead: int = 8 << 20
    #: Bytes of pipelined writes a handle may have in flight.
    write_window: int = 16 << 20
    #: "user": the remote user's uid and gid (the owner of the login directory) are shown as this
    #: process's, and chown to these sets those (sshfs's ``idmap=user``); "none": ids as they are.
    idmap: str = "none"
    #: ``idmap=file``'s maps (sshfs's ``uidfile``, ``gidfile``) and ``nomap`` ("ignore" or "error").
    uidfile: str | None = None
    gidfile: str | None = None
    #: libfuse's (and so sshfs's) ``uid=``, ``gid=`` and ``umask=``: every file shown with this
    #: owner, group, and permission bits ``0o777 & ~umask`` (None: as the server has them). What
    #: is shown only: chmod and chown still go to the server.
    uid: int | None = None
    gid: int | None = None
    umask: int | None = None
    nomap: str = "ignore"
    #: Show a symlink on the server as what it points to (sshfs's ``follow_symlinks``): its type
    #: and attributes are its target's (a dangling one stays a symlink).
    follow_symlinks: bool = False
    #: Show an absolute symlink target inside the mounted directory as a relative one (sshfs's
    #: ``transform_symlinks``), so it still points inside the mount.
    transform_symlinks: bool = False
    #: SSH ciphers in order of preference; None: the client's own (``ssh``'s configuration; for
    #: asyncssh :data:`ASYNCSSH_CIPHERS`).
    ciphers: list[str] | None = None


#: asyncssh's ciphers unless told: AES-GCM first (one call into OpenSSL per packet; asyncssh's
#: chacha20-poly1305, OpenSSH's first choice, costs several).
ASYNCSSH_CIPHERS = ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com",
                    "aes128-ctr", "aes256-ctr"]


class ConnectError(Exception):
    """The first connection could not be made (bad host, key, path)."""


class _Dropped(Exception):
    """A read-ahead chunk was dropped (a write, a jump) before its reader took it."""


#: What a request may meet besides an answer: the connection unusable (lost, broken, timed out).
_LOST = (ConnectionLost, OSError, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError)


# -- connections ------------------------------------------------------------------------------------

class Connection:
    """One SSH connection with an SFTP session; ``generation`` counts (re)connects."""

    def __init__(self, pool: Pool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.link: _Link | None = None
        self.sftp: SftpClient | None = None
        self.generation = 0
        self.busy = 0
        self._connecting = trio.Lock()

    async def client(self) -> SftpClient:
        """The SFTP session, connecting first if there is none (and reconnecting is allowed)."""
        if self.sftp is not None:
            return self.sftp
        if self.generation and not self.pool.options.reconnect:
            raise FUSEError(errno.EIO, "the connection was lost (no --reconnect)")
        async with self._connecting:
            if self.sftp is None:
                await self._connect()
            assert self.sftp is not None
            return self.sftp

    async def _connect(self) -> None:
        o = self.pool.options
        start = (_TcpLink.start if o.directport is not None else _StdioLink.start if o.passive
                 else _AsyncsshLink.start if o.transport == "asyncssh" else _SshProcess.start)
        link = await start(o, self.pool.tasks())
        self.link, self.sftp = link, link.client
        self.generation += 1
        if self.generation > 1:
            log.info("connection %d: reconnected to %s", self.index, o.host)
        self.pool.tasks().start_soon(self._watch, link)

    async def _watch(self, link: _Link) -> None:
        await link.closed.wait()
        if self.link is link:
            if not self.pool.closing:
                log.warning("connection %d to %s lost", self.index, self.pool.options.host)
            self.drop()

    def drop(self) -> None:
        """Forget the connection (aborting it): the next request fails, or reconnects with --reconnect."""
        link, self.link, self.sftp = self.link, None, None
        if link is not None:
            link.abort()

    async def close(self) -> None:
        """Close the connection."""
        link, self.link, self.sftp = self.link, None, None
        if link is not None:
            await link.close()


class _Link:
    """One SSH transport carrying one SFTP session (:attr:`client`); :attr:`closed` is set once it is gone."""

    client: SftpClient
    closed: trio.Event

    def abort(self) -> None:
        """Drop the transport now (requests in flight fail)."""
        raise NotImplementedError

    async def close(self) -> None:
        """Close the transport politely (at most 2 s)."""
        raise NotImplementedError


class _AsyncsshLink(_Link):
    """SSH in this process: asyncssh's connection and an ``sftp`` subsystem channel (its crypto runs
    here, in Python and OpenSSL). asyncssh is asyncio code: this runs only with trio as the guest
    of an asyncio loop (:func:`run` arranges it). Requests are written to the channel directly
    (both loops run in this thread); what arrives is fed to the client in trio with
    ``run_sync_soon``, one hop per batch of data, not per request."""

    def __init__(self, ssh: Any, token: trio.lowlevel.TrioToken) -> None:
        self.ssh = ssh
        self.token = token
        self.chan: Any = None
        self.client = SftpClient(self._write)
        self.closed = trio.Event()

    @classmethod
    async def start(cls, o: SftpOptions, nursery: trio.Nursery) -> _AsyncsshLink:
        import asyncssh

        kwargs: dict[str, Any] = {"username": o.user or getpass.getuser(),
                                  "keepalive_interval": max(1.0, o.timeout / 3), "keepalive_count_max": 3,
                                  "encryption_algs": o.ciphers or ASYNCSSH_CIPHERS}
        if o.port is not None:
            kwargs["port"] = o.port
        if o.identities:
            kwargs["client_keys"] = o.identities
        if o.known_hosts is not None:
            kwargs["known_hosts"] = None if o.known_hosts == "none" else o.known_hosts
        async def connect() -> asyncssh.SSHClientConnection:
            return await asyncssh.connect(o.host, **kwargs)

        ssh = await afuse.asyncio.run_asyncio(connect())
        self = cls(ssh, trio.lowlevel.current_trio_token())
        link = self

        class Session(asyncssh.SSHClientSession[bytes]):
            def data_received(self, data: bytes, datatype: Any) -> None:
                link._soon(link.client.feed, data)

            def connection_lost(self, exc: Exception | None) -> None:
                link._soon(link._lost, exc)

        try:
            # The channel window bounds the data in flight towards us: asyncssh's 2 MiB caps reads
            # at 2 MiB per round trip (100 MiB/s at 20 ms).
            self.chan, _ = await afuse.asyncio.run_asyncio(ssh.create_session(
                Session, subsystem="sftp", encoding=None, window=max(2 << 20, 2 * o.readahead)))
            await self.client.start()
        except BaseException:
            ssh.abort()
            raise
        return self

    def _soon(self, fn: Callable[..., Any], *args: Any) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            self.token.run_sync_soon(fn, *args)

    def _write(self, pieces: list[Buffer]) -> None:
        if self.chan is not None and not self.closed.is_set():
            self.chan.write(b"".join(pieces))

    def _lost(self, exc: BaseException | None) -> None:
        self.client.lost(ConnectionLost(str(exc) if exc else "the SSH channel closed"))
        self.closed.set()

    def abort(self) -> None:
        self.ssh.abort()
        self._lost(None)

    async def close(self) -> None:
        self.ssh.close()
        with contextlib.suppress(Exception):
            await afuse.asyncio.run_asyncio(asyncio.wait_for(self.ssh.wait_closed(), 2))
        self._lost(None)


def ssh_argv(o: SftpOptions) -> list[str]:
    """The ``ssh`` command line that starts the remote SFTP server (the ``sftp`` subsystem, or
    ``sftp_server``), as sshfs runs it: no
    forwarding, no prompts (``BatchMode``), keepalives that notice a dead server within about the
    timeout, the options' port, user, keys, known hosts and ciphers."""
    argv = shlex.split(o.ssh_command)
    argv += [f"-o{opt}" for opt in o.ssh_options]
    argv += ["-x", "-a", "-oClearAllForwardings=yes", "-oBatchMode=yes",
             f"-oServerAliveInterval={max(1, round(o.timeout / 3))}", "-oServerAliveCountMax=3",
             f"-oConnectTimeout={max(1, round(o.timeout))}"]
    if o.port is not None:
        argv += ["-p", str(o.port)]
    if o.ciphers:
        argv += ["-c", ",".join(o.ciphers)]
    if o.user:
        argv += ["-l", o.user]
    for key in o.identities:
        argv += ["-i", key]
    if o.identities:
        argv.append("-oIdentitiesOnly=yes")
    if o.known_hosts == "none":
        argv += ["-oStrictHostKeyChecking=no", "-oUserKnownHostsFile=/dev/null", "-oLogLevel=ERROR"]
    elif o.known_hosts is not None:
        argv += ["-oStrictHostKeyChecking=yes", f"-oUserKnownHostsFile={o.known_hosts}"]
    if "/" in o.sftp_server:
        return [*argv, "--", o.host, o.sftp_server]
    return [*argv, "-s", "--", o.host, o.sftp_server]


class ReadBuffer:
    """Where :func:`read_pipe` reads: the free part of a large buffer, each read after the last,
    the unconsumed bytes (a packet begun) kept in place for the next read to complete, so that
    packets are views of it, never copied.

    A region once read into is not written again while the buffer is in use; when too little is
    free, the reader goes on in a buffer of which no view is left
    (:func:`afuse.readers.unviewed`), or a new one, the unconsumed bytes copied to its start.
    So the pages stay mapped: a new ``bytes`` per read of 1 MiB gets fresh pages from glibc
    every time (faulted in, zeroed, and unmapped again: a tenth of the CPU of parallel reads),
    and costs an ``mmap``, ``mremap`` and ``munmap``."""

    SIZE = 1 << 20  # a buffer
    MIN_ROOM = 256 << 10  # the least a read is given (a read-ahead DATA is 128 KiB)
    KEEP = 32  # buffers in the rotation (read-ahead keeps up to 16 MiB of DATA in views)

    def __init__(self) -> None:
        self.buf = reusable_buffer(self.SIZE)
        self.start = 0  # unconsumed bytes: buf[start:end]
        self.end = 0
        self.rotation: collections.deque[bytearray] = collections.deque()

    def room(self, need: int = 0) -> memoryview:
        """Where the next read goes (with room for the rest of a packet of ``need`` bytes begun)."""
        if len(self.buf) - self.end < max(self.MIN_ROOM, need - (self.end - self.start)):
            self._next(need)
        return memoryview(self.buf)[self.end:]

    def filled(self, n: int) -> memoryview:
        """``n`` bytes were read into the room: the unconsumed bytes, those included."""
        self.end += n
        return memoryview(self.buf)[self.start:self.end]

    def consumed(self, n: int) -> None:
        self.start += n

    def _next(self, need: int) -> None:
        rest = memoryview(self.buf)[self.start:self.end]
        size = max(self.SIZE, need + self.MIN_ROOM)
        rotation = self.rotation
        if len(self.buf) == self.SIZE:
            rotation.append(self.buf)
        buf = None
        for _ in range(len(rotation)):
            b = rotation.popleft()
            if len(b) >= size and b is not self.buf and unviewed(b):
                buf = b
                break
            rotation.append(b)
        if len(rotation) > self.KEEP:  # still viewed: it goes when its views do
            rotation.popleft()
        if buf is None:
            buf = reusable_buffer(size)
        kept = len(rest)
        buf[:kept] = rest
        rest.release()
        self.buf, self.start, self.end = buf, 0, kept


async def read_pipe(fd: int, feed: Callable[[memoryview], tuple[int, int] | None],
                    stop: Callable[[], bool] = lambda: False) -> None:
    """Read the non-blocking pipe ``fd`` into ``feed`` until its end, ``stop()``, or
    :func:`trio.lowlevel.notify_closing`; closes ``fd`` after.

    ``feed`` is given the bytes read, as a view of a :class:`ReadBuffer`, after those it left
    before; it returns how many it took and the size of the packet begun after them (as
    :meth:`SftpClient.feed_frames`), or None for all."""
    rb = ReadBuffer()
    need = 0
    try:
        while not stop():
            await trio.lowlevel.wait_readable(fd)
            room = rb.room(need)
            try:
                n = os.readv(fd, (room,))
            except BlockingIOError:
                continue
            finally:
                room.release()
            if not n:
                return
            data = rb.filled(n)
            took = feed(data)
            used, need = (len(data), 0) if took is None else took
            rb.consumed(used)
            del data
    except (OSError, trio.ClosedResourceError):
        return
    finally:
        os.close(fd)


class PipeWriter:
    """Writes to a non-blocking pipe (the ``ssh`` client's stdin) in order: at once with
    ``writev`` when the pipe has room, else queued (no copy) and written by a task of
    ``nursery`` as it drains."""

    def __init__(self, fd: int, nursery: trio.Nursery) -> None:
        self.fd = fd
        self.nursery = nursery
        self.queue: collections.deque[Buffer] = collections.deque()
        self.waiting = False  # a task waits for room
        self.closing = False
        self.eof_pending = False
        self.broken: OSError | None = None

    def write(self, pieces: Sequence[Buffer]) -> None:
        """Queue ``pieces`` to be written in order (written now if nothing waits before them)."""
        if self.closing:
            return
        idle = not self.queue
        self.queue.extend(pieces)
        if idle:
            self._flush()
            if self.queue and not self.closing and not self.waiting:
                self.waiting = True
                self.nursery.start_soon(self._drain)

    async def _drain(self) -> None:
        try:
            while self.queue and not self.closing:
                await trio.lowlevel.wait_writable(self.fd)
                self._flush()
        except (OSError, trio.ClosedResourceError):
            pass
        finally:
            self.waiting = False
        if self.eof_pending and not self.queue:
            self.abort()

    def _flush(self) -> None:
        q = self.queue
        while q:
            try:
                n = os.writev(self.fd, list(itertools.islice(q, 0, 512)))
            except BlockingIOError:
                return
            except OSError as e:  # the reader is gone: its end shows on the other pipe
                self.broken = e
                self.abort()
                return
            while q and len(q[0]) <= n:  # (empty pieces go too)
                n -= len(q.popleft())
            if n:
                q[0] = memoryview(q[0])[n:]

    def close(self) -> None:
        """Close once what is queued is written."""
        if not self.queue:
            self.abort()
        else:
            self.eof_pending = True

    def abort(self) -> None:
        """Close now, dropping what is queued."""
        if self.closing:
            return
        self.closing = True
        self.queue.clear()
        trio.lowlevel.notify_closing(self.fd)
        with contextlib.suppress(OSError):  # a socket (directport): the peer sees the end, though
            sock = socket.socket(fileno=self.fd)  # the reader's descriptor of it stays open
            try:
                sock.shutdown(socket.SHUT_WR)
            finally:
                sock.detach()
        os.close(self.fd)


class _FdLink(_Link):
    """SFTP over a pair of descriptors in this process: ``writer`` for requests, ``out_fd`` read
    by a task (:func:`read_pipe`) into the client."""

    def __init__(self, writer: PipeWriter, out_fd: int) -> None:
        self.writer, self.out_fd = writer, out_fd
        self.client = SftpClient(writer.write)
        self.closed = trio.Event()
        self.aborted = False

    async def _read(self) -> None:
        try:
            await read_pipe(self.out_fd, self.client.feed_frames, lambda: self.aborted)
        finally:
            self.client.lost(ConnectionLost(self._gone))
            self.closed.set()
            await self._ended()

    _gone = "the connection ended"

    async def _ended(self) -> None:
        """After the reader's end."""

    def abort(self) -> None:
        self.writer.abort()
        if not self.aborted:
            self.aborted = True
            if not self.closed.is_set():
                trio.lowlevel.notify_closing(self.out_fd)  # the reader ends (and closes it)

    async def close(self) -> None:
        self.writer.close()  # the peer sees the end
        with trio.move_on_after(2):
            await self.closed.wait()
        self.abort()
        await self.closed.wait()


class _SshProcess(_FdLink):
    """SSH in a child process, as sshfs does it: OpenSSH's ``ssh`` client (``-s ... sftp``), the SFTP
    client speaking over its stdin and stdout from trio. Encryption then costs this process nothing:
    it runs in C, in the child, on another CPU."""

    _gone = "the ssh client ended the session"

    def __init__(self, proc: trio.Process, writer: PipeWriter, out_fd: int) -> None:
        super().__init__(writer, out_fd)
        self.proc = proc

    @classmethod
    async def start(cls, o: SftpOptions, nursery: trio.Nursery) -> _SshProcess:
        in_r, in_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        out_r, out_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        for fd in (in_w, out_w):  # room for whole read and write requests (the default is 64 KiB)
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1 << 20)
        for fd in (in_r, out_w):  # ssh's ends block, as a terminal's would
            os.set_blocking(fd, True)
        try:
            # Its own session: a Ctrl-C meant for sftpfs must not kill the transport under it.
            proc = await trio.lowlevel.open_process(ssh_argv(o), stdin=in_r, stdout=out_w, start_new_session=True)
        except BaseException:
            for fd in (in_w, out_r):
                os.close(fd)
            raise
        finally:
            os.close(in_r)
            os.close(out_w)
        self = cls(proc, PipeWriter(in_w, nursery), out_r)
        nursery.start_soon(self._read)
        try:
            await self.client.start()
        except BaseException as e:
            self.abort()
            with trio.CancelScope(shield=True):
                code = await proc.wait()
            if isinstance(e, ConnectionLost) and not isinstance(e, ProtocolError):
                raise ConnectionError(f"ssh exited with status {code} (its message is above)") from None
            raise
        return self

    async def _ended(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            with trio.CancelScope(shield=True):
                await self.proc.wait()

    def abort(self) -> None:
        super().abort()
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

    async def close(self) -> None:
        self.writer.close()  # ssh sees EOF and ends the session
        with trio.move_on_after(2):
            await self.proc.wait()
        self.abort()
        await self.closed.wait()


class _TcpLink(_FdLink):
    """``-o directport=PORT`` (sshfs's): SFTP straight over TCP, no SSH, to a server that speaks it
    unencrypted (``sftp-server`` behind ``socat`` or ``inetd``, on a trusted network)."""

    _gone = "the server closed the connection"

    @classmethod
    async def start(cls, o: SftpOptions, nursery: trio.Nursery) -> _TcpLink:
        assert o.directport is not None
        stream = await trio.open_tcp_stream(o.host, o.directport)
        fd = stream.socket.detach()  # non-blocking, TCP_NODELAY
        self = cls(PipeWriter(os.dup(fd), nursery), fd)
        nursery.start_soon(self._read)
        try:
            await self.client.start()
        except BaseException:
            self.abort()
            raise
        return self


class _StdioLink(_FdLink):
    """``-o passive`` (sshfs's): SFTP over this process's stdin and stdout, connected to a server
    by whoever started it (``dpipe``, ``socat``, an ``ssh`` the other way round). Once lost, it
    is gone: there is nothing to reconnect to."""

    _gone = "the SFTP server on stdin and stdout went away"

    @classmethod
    async def start(cls, o: SftpOptions, nursery: trio.Nursery) -> _StdioLink:
        # Copies of the descriptors, so that closing them leaves 0 and 1 open (nothing else here
        # may write to stdout: it is the server's). Non-blocking affects the pipes' other users
        # too, as with any pipe trio reads.
        rfd, wfd = os.dup(0), os.dup(1)
        for fd in (rfd, wfd):
            os.set_blocking(fd, False)
        self = cls(PipeWriter(wfd, nursery), rfd)
        nursery.start_soon(self._read)
        try:
            await self.client.start()
        except BaseException:
            self.abort()
            raise
        return self


class Pool:
    """``options.connections`` connections; :meth:`run` runs one SFTP operation with the timeout.
    Its transports' tasks (and background work: writes, listings, closes) run in ``nursery``."""

    def __init__(self, options: SftpOptions, nursery: trio.Nursery | None = None) -> None:
        self.options = options
        self.nursery = nursery
        self.conns = [Connection(self, i) for i in range(max(1, options.connections))]
        #: SFTP requests answered EIO because of a lost connection or a timeout.
        self.failures = 0
        self.closing = False
        #: Open files reading ahead (they share ``2 * options.readahead``).
        self.streaming: set[RemoteFile] = set()

    def tasks(self) -> trio.Nursery:
        """Where background tasks run."""
        if self.nursery is None:
            raise RuntimeError("the pool has no nursery")
        return self.nursery

    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Reply:
        """Run ``fn(*args)`` in the background: its result (or error) goes to the Reply returned."""
        r = Reply()

        async def run() -> None:
            try:
                r.set(await fn(*args))
            except Exception as e:
                r.fail(e)
            except trio.Cancelled:
                r.fail(FUSEError(errno.EIO, "shutting down"))
                raise

        self.tasks().start_soon(run)
        return r

    def readahead(self) -> int:
        """The read-ahead window a sequential reader may grow to now."""
        o = self.options
        return max(2 * CHUNK, min(o.readahead, 2 * o.readahead // max(1, len(self.streaming))))

    async def start(self) -> None:
        """Connect every connection now (errors are ConnectError with the reason)."""
        try:
            with trio.fail_after(self.options.timeout):
                async with trio.open_nursery() as n:
                    for c in self.conns:
                        n.start_soon(c.client)
        except BaseException as e:
            found = _first_error(e, (OSError, ConnectionLost, trio.TooSlowError, FUSEError, SftpError))
            with trio.CancelScope(shield=True):
                await self.close()
            if found is None:
                raise
            where = self.options.host if self.options.port is None else f"{self.options.host}:{self.options.port}"
            if isinstance(found, trio.TooSlowError):
                found = TimeoutError(f"no answer within {self.options.timeout:g} s")
            raise ConnectError(f"cannot connect to {where}: {found or type(found).__name__}") from found

    def pick(self) -> Connection:
        """The least busy connection."""
        return min(self.conns, key=lambda c: (c.sftp is None, c.busy))

    async def run(self, op: Callable[[SftpClient], Awaitable[T]], via: Connection | None = None) -> T:
        """``await op(client)`` on ``via`` (or the least busy connection) within the timeout.

        SFTP errors become FUSEError with the nearest errno; a timeout or a lost connection is EIO
        (and drops the connection, so later requests fail at once or reconnect).
        """
        c = via or self.pick()
        c.busy += 1
        try:
            with trio.fail_after(self.options.timeout):
                sftp = c.sftp or await c.client()
                return await op(sftp)
        except (SftpError, *_LOST) as e:
            raise self.failed(c, e) from None
        finally:
            c.busy -= 1

    def failed(self, c: Connection, e: BaseException) -> FUSEError:
        """The FUSEError for ``e`` met on ``c``: an SFTP error's nearest errno; else (a timeout, a
        lost connection) EIO, and the connection is dropped."""
        if isinstance(e, FUSEError):
            return e
        if isinstance(e, SftpError):
            return FUSEError(e.errno, str(e))
        if isinstance(e, trio.TooSlowError):
            e = TimeoutError(f"no answer within {self.options.timeout:g} s")
        self.failures += 1
        if not self.closing:
            log.warning("connection %d: %s", c.index, e or type(e).__name__)
        c.drop()
        return FUSEError(errno.EIO, str(e) or type(e).__name__)

    async def then_lstat(self, send: Callable[[SftpClient], Reply], finish: Callable[[SftpClient, Reply], Awaitable[T]],
                         path: bytes, via: Connection | None = None) -> tuple[T, FileAttrs | None]:
        """A request (``send`` writes it, ``finish`` waits for its answer) and an LSTAT of ``path``
        written right after it, without waiting in between: the server answers in order, so the
        LSTAT sees what the request made (one round trip for both). The LSTAT's answer is None if
        it failed."""
        async def both(client: SftpClient) -> tuple[T, FileAttrs | None]:
            first = send(client)
            second = client.send(FXP_LSTAT, string(path))
            result = await finish(client, first)
            try:
                return result, await client.attrs(second, "LSTAT")
            except SftpError:
                return result, None
        return await self.run(both, via)

    async def close(self) -> None:
        """Close every connection."""
        self.closing = True
        async with trio.open_nursery() as n:
            for c in self.conns:
                n.start_soon(c.close)


def _first_error(e: BaseException, types: tuple[type[BaseException], ...]) -> BaseException | None:
    """``e``, or the first exception of ``types`` in the group ``e``."""
    if isinstance(e, BaseExceptionGroup):
        for sub in e.exceptions:
            found = _first_error(sub, types)
            if found is not None:
                return found
        return None
    return e if isinstance(e, types) else None


# -- requests pipelined -----------------------------------------------------------------------------

class _Batch(Reply):
    """The waiter of several requests answered by status (a batch of WRITEs): done when all are
    answered; the first failure is its error."""

    __slots__ = ("left", "what")

    def __init__(self, n: int, what: str) -> None:
        super().__init__()
        self.left, self.what = n, what

    def reply(self, pkttype: int, payload: Buffer) -> None:
        if self.error is None:
            try:
                check_status(pkttype, payload, self.what)
            except (SftpError, ProtocolError) as e:
                self.error = e
        self.left -= 1
        if not self.left:
            self._finish()

    def fail(self, exc: BaseException) -> None:
        self.error = self.error or exc
        self._finish()


async def write_many(client: SftpClient, handle: bytes, offset: int, data: bytes, chunk: int) -> None:
    """Write ``data`` at ``offset`` of the open file ``handle`` as WRITE requests of at most
    ``chunk`` bytes, all written at once, without copying the data on the way (the server does
    them in order); raises the first error any of them got."""
    view = memoryview(data)
    head = string(handle)
    args = [(head + _U64.pack(offset + i) + _U32.pack(len(view[i:i + chunk])), view[i:i + chunk])
            for i in range(0, len(data), chunk)]
    batch = _Batch(len(args), "WRITE")
    if not args:
        return
    client.send_many(FXP_WRITE, args, batch)
    await batch.get()


_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


class ListingProgress:
    """The entries of a listing as they arrive: :func:`list_directory` adds each batch to
    :attr:`by_name` and its names to :attr:`names` as it is decoded; readers wait with
    :meth:`wait_beyond`."""

    def __init__(self) -> None:
        #: The names so far, in the server's order (without ``.`` and ``..``).
        self.names: list[bytes] = []
        #: Their attributes.
        self.by_name: dict[bytes, FileAttrs] = {}
        #: No more entries will come (the listing ended, or failed).
        self.done = False
        self._waiter: trio.Event | None = None
        self._until = sys.maxsize  # wake the waiters once more than this many arrived

    def arrived(self, names: list[bytes]) -> None:
        """``names`` (already in :attr:`by_name`) arrived."""
        self.names += names
        if len(self.names) > self._until:
            self._wake()

    def finish(self) -> None:
        self.done = True
        self._wake()

    def _wake(self) -> None:
        w, self._waiter = self._waiter, None
        self._until = sys.maxsize
        if w is not None:
            w.set()

    async def wait_beyond(self, n: int) -> None:
        """Return once more than ``n`` entries arrived, or none will (woken only then: not by
        each batch before)."""
        while len(self.names) <= n and not self.done:
            if self._waiter is None:
                self._waiter = trio.Event()
            self._until = min(self._until, n)
            await self._waiter.wait()


async def list_directory(sftp: SftpClient, path: bytes, progress: ListingProgress | None = None,
                         follow_symlinks: bool = False) -> dict[bytes, FileAttrs]:
    """The entries of directory ``path`` (without ``.`` and ``..``) and their attributes, in the
    server's order, READDIR requests pipelined.

    SFTP lists a directory in batches (OpenSSH: 100 names per READDIR). Here
    :data:`_READDIR_WINDOW` READDIRs on the handle are in flight at once (replies send more), the
    server answering them in order with successive batches until SSH_FX_EOF; each reply is decoded
    by :func:`parse_names` where it arrives (and handed to ``progress``), while the server reads on.
    The handle's CLOSE is written at the end, its answer not waited for. ``follow_symlinks``: a
    symlink's attributes are its target's (a STAT each, sent as its batch arrives; the batch is
    handed on once they are answered, batches in order; a dangling one keeps its own).
    """
    progress = progress or ListingProgress()
    handle = await sftp.opendir(path)
    listing = _Listing(sftp, handle, progress, _join(path, b"") if follow_symlinks else None)
    try:
        listing.send(_READDIR_WINDOW)
        await listing.get()
        return progress.by_name
    finally:
        listing.ended = True
        sftp.send(FXP_CLOSE, string(handle))  # nobody waits for its answer


class _Listing(Reply):
    """One directory listing's READDIRs: a window of requests in flight, each reply decoded where
    it arrives (the client hands every READDIR's answer to this one waiter)."""

    def __init__(self, client: SftpClient, handle: bytes, progress: ListingProgress,
                 follow: bytes | None = None) -> None:
        super().__init__()
        self.client = client
        self.progress = progress  # the entries, as they arrive
        self.arg = (string(handle),)
        self.ended = False
        self.owed = 0
        #: follow_symlinks: the directory's path prefix; batches waiting for their symlinks'
        #: STATs ([names, STATs unanswered]), in order; the end seen (released once they are).
        self.follow = follow
        self.held: collections.deque[list[Any]] = collections.deque()
        self.eof = False

    def send(self, n: int) -> None:
        self.client.send_many(FXP_READDIR, [self.arg] * n, self)

    def reply(self, pkttype: int, payload: Buffer) -> None:
        if self.ended or self.eof:
            return  # a READDIR sent before the end was seen: SSH_FX_EOF again
        try:
            if pkttype == FXP_NAME:
                try:
                    names = parse_names(payload, self.progress.by_name)
                except ValueError as e:
                    raise ProtocolError(str(e)) from None
                self.owed += 1
                if self.owed >= _READDIR_TOPUP:  # first: the server reads on while this batch is handed over
                    self.send(self.owed)
                    self.owed = 0
                names = _valid_names(names, self.progress.by_name)
                if self.follow is None:
                    self.progress.arrived(names)
                else:
                    self._hold(names)
                return
            try:
                check_status(pkttype, payload, "READDIR")
            except SftpError as e:
                if e.code == FX_EOF:  # the end
                    self.eof = True
                    self.release()
                    return
                raise
            raise ProtocolError("SSH_FX_OK in reply to READDIR")
        except Exception as e:
            self.ended = True
            super().fail(e)

    def fail(self, exc: BaseException) -> None:
        if not self.ended:
            self.ended = True
            super().fail(exc)

    def _hold(self, names: list[bytes]) -> None:
        """follow_symlinks: STAT the batch's symlinks; hand it on once they are answered."""
        by_name, prefix = self.progress.by_name, self.follow
        assert prefix is not None
        links = [n for n in names if (by_name[n][3] or 0) & 0o170000 == 0o120000]
        batch = [names, len(links)]
        self.held.append(batch)
        for name in links:
            self.client.send(FXP_STAT, string(prefix + name), waiter=_LinkStat(self, batch, name))
        self.release()

    def release(self) -> None:
        """Hand on the batches whose symlinks are all answered, in order; end after the last."""
        while self.held and self.held[0][1] == 0:
            self.progress.arrived(self.held.popleft()[0])
        if self.eof and not self.held and not self.ended:
            self.ended = True
            self.set(None)


class _LinkStat(Reply):
    """The STAT of a listed symlink (``follow_symlinks``): the target's attributes replace the
    link's in the listing; a failure (dangling, no permission) keeps the link's own."""

    __slots__ = ("batch", "listing", "name")

    def __init__(self, listing: _Listing, batch: list[Any], name: bytes) -> None:
        super().__init__()
        self.listing, self.batch, self.name = listing, batch, name

    def reply(self, pkttype: int, payload: Buffer) -> None:
        listing = self.listing
        if listing.ended:
            return
        if pkttype == FXP_ATTRS:
            try:
                listing.progress.by_name[self.name] = parse_attrs(payload, 0)[0]
            except struct.error:
                listing.fail(ProtocolError("truncated SSH_FXP_ATTRS"))
                return
        self.batch[1] -= 1
        listing.release()

    def fail(self, exc: BaseException) -> None:
        self.listing.fail(exc)


def _valid_names(names: list[bytes], attrs: dict[bytes, FileAttrs]) -> list[bytes]:
    """``names`` without those no local directory can hold (empty, too long, with ``/`` or NUL: a
    broken or hostile server), each left out with a warning (checked for the batch at once)."""
    if valid_names(names):
        return names
    good = []
    for name in names:
        if valid_name(name):
            good.append(name)
        else:
            attrs.pop(name, None)
            log.warning("the server listed a name no directory can hold: %r (left out)", name)
    return good


#: READDIRs a listing keeps in flight, sent again :data:`_READDIR_TOPUP` at a time (one write, one
#: wake-up of ``ssh``, for several).
_READDIR_WINDOW, _READDIR_TOPUP = 16, 8


def _write_chunk(client: SftpClient) -> int:
    """The largest WRITE to send: the server's limit (OpenSSH: about 255 KiB), at most 256 KiB."""
    return max(4096, min(client.max_write or CHUNK, 256 * 1024))


def _pflags(flags: int) -> int:
    acc = flags & _ACCMODE
    p = FXF_READ if acc == os.O_RDONLY else FXF_WRITE if acc == os.O_WRONLY else FXF_READ | FXF_WRITE
    if flags & os.O_APPEND:
        p |= FXF_APPEND
    if flags & os.O_CREAT:
        p |= FXF_CREAT
    if flags & os.O_EXCL:
        p |= FXF_EXCL
    if flags & os.O_TRUNC:
        p |= FXF_TRUNC
    return p


# -- open files -------------------------------------------------------------------------------------

class _ReadReply(Reply):
    """The answer to a READ written by :meth:`RemoteFile._send_read`, decoded where it arrives:
    SSH_FXP_DATA's bytes (a view of the packet), EOF as b"", errors as FUSEError. A short answer
    is not the end of the file (a server may read less than asked: older OpenSSH 64 KiB): the rest
    is asked for, and the reply gets both."""

    __slots__ = ("conn", "offset", "rf", "size")

    def __init__(self, rf: RemoteFile, conn: Connection, offset: int, size: int) -> None:
        super().__init__()
        self.rf, self.conn = rf, conn
        self.offset, self.size = offset, size

    def reply(self, pkttype: int, payload: Buffer) -> None:
        try:
            data = data_of(pkttype, payload)
        except (SftpError, ProtocolError) as e:
            self.fail(e)
            return
        if self.done:
            return
        if 0 < len(data) < self.size and not self.rf.ends_at(self.offset + len(data)):
            rest = self.rf._send_read(self.offset + len(data), self.size - len(data))
            if rest is not None:
                rest.add_callback(lambda r: self._joined(data, r))
                return
        self.set(data)

    def _joined(self, head: Chunk, rest: Reply) -> None:
        if rest.error is not None:
            self.fail(rest.error)
        else:
            self.set(bytes(head) + bytes(rest.value))

    def fail(self, exc: BaseException) -> None:
        if not self.done:
            super().fail(exc if isinstance(exc, FUSEError | _Dropped) else self.rf.pool.failed(self.conn, exc))


class RemoteFile:
    """An open remote file: read-ahead for sequential readers, pipelined writes.

    Tied to the connection it was opened on; after a reconnect it is reopened by path (without
    O_CREAT, O_EXCL, O_TRUNC) at its next use.
    """

    def __init__(self, pool: Pool, path: bytes, flags: int, mode: int = 0o644) -> None:
        self.pool = pool
        self.path = path
        self.flags = flags
        self.mode = mode
        self.conn = pool.pick()
        self.handle: bytes | None = None
        self.generation = 0
        #: Read-ahead: chunk offset -> the reply reading CHUNK bytes there.
        self.chunks: dict[int, Reply] = {}
        self.window = 0
        self.next_offset = -1
        #: Size known to the reader (read-ahead stops there); None: unknown.
        self.size: int | None = None
        #: Pipelined writes in flight.
        self.writes: set[Reply] = set()
        self.write_bytes = 0
        self._wrote: trio.Event | None = None
        self.error: FUSEError | None = None
        self.closed = False

    def send_open(self, client: SftpClient) -> Reply:
        """Write the OPEN (O_CREAT, O_EXCL, O_TRUNC only the first time: a reopen after a reconnect
        finds the file as it is)."""
        if self.closed:
            r = Reply()
            r.fail(FUSEError(errno.EBADF))
            return r
        flags = self.flags if self.generation == 0 else self.flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC)
        if self.generation:
            log.info("reopening %r after a reconnect", self.path)
        return client.send_open(self.path, _pflags(flags), FileAttrs(permissions=self.mode & 0o7777))

    async def opened(self, client: SftpClient, reply: Reply) -> None:
        """The OPEN's answer: the handle, on this connection's current session."""
        self.handle = await client.handle(reply)
        self.generation = self.conn.generation

    async def _handle(self, client: SftpClient) -> bytes:
        if self.handle is not None and self.generation == self.conn.generation:
            return self.handle
        await self.opened(client, self.send_open(client))
        assert self.handle is not None
        return self.handle

    async def run(self, op: Callable[[SftpClient, bytes], Awaitable[T]]) -> T:
        """``await op(client, handle)`` on this file's connection, (re)opening it as needed."""
        async def go(client: SftpClient) -> T:
            return await op(client, await self._handle(client))
        return await self.pool.run(go, self.conn)

    async def open(self, prefetch: bool = False) -> None:
        """Open the file on the server. ``prefetch``: start reading the first chunk at once (most
        files opened for reading are read from the start: the first READ then finds its data on
        the way or in)."""
        await self.pool.run(lambda c: self.opened(c, self.send_open(c)), self.conn)
        if prefetch:
            self.next_offset, self.window = 0, CHUNK
            self.chunks[0] = self._spawn_chunk(0)

    # reads -----------------------------------------------------------------------------------------

    def _spawn_chunk(self, offset: int) -> Reply:
        r = self._send_read(offset, CHUNK)
        return r if r is not None else self.pool.spawn(self._read_piece, offset, CHUNK)

    def _send_read(self, offset: int, size: int) -> Reply | None:
        """A READ written now on the file's open handle, its reply decoded where it arrives (no
        task); None if the file is not open on a live connection."""
        c, handle = self.conn, self.handle
        if handle is None or self.generation != c.generation or c.sftp is None or c.sftp.closed is not None:
            return None
        return c.sftp.send(FXP_READ, c.sftp.read_args(handle, offset, size), waiter=_ReadReply(self, c, offset, size))

    def ends_at(self, end: int) -> bool:
        """Whether a read ending at ``end`` reached the end of the file as far as the attributes
        known say (a small file's one READ is then not followed by another that finds EOF)."""
        return self.size is not None and end >= self.size

    async def _read_piece(self, offset: int, size: int) -> Chunk:
        async def read(client: SftpClient, handle: bytes) -> Chunk:
            return data_of(*await client.send(FXP_READ, client.read_args(handle, offset, size)).get())
        data = await self.run(read)
        # a short read is not the end of the file (unless it ends at the size known): ask for the rest
        while 0 < len(data) < size and not self.ends_at(offset + len(data)):
            more = await self._read_piece(offset + len(data), size - len(data))
            if not more:
                break
            data = bytes(data) + bytes(more)
        return data

    def _drop_chunks(self, keep: Callable[[int], bool] = lambda off: False, cancel: bool = True) -> None:
        for off in [o for o in self.chunks if not keep(o)]:
            r = self.chunks.pop(off)
            if cancel:
                r.fail(_Dropped())

    async def _part(self, off: int) -> Chunk:
        r = self.chunks.get(off)
        if r is None:
            r = self.chunks[off] = self._spawn_chunk(off)
        try:
            if not r.done:
                try:
                    with trio.fail_after(self.pool.options.timeout):
                        await r.get()
                except trio.TooSlowError as e:
                    raise self.pool.failed(self.conn, e) from None
            return r.result()  # type: ignore[no-any-return]
        except _Dropped:
            return await self._read_piece(off, CHUNK)  # the chunk was dropped (a write, a jump) meanwhile

    def plan(self, offset: int, size: int) -> range | None:
        """A READ's bookkeeping (no waiting): a sequential reader (the kernel sends its read-ahead
        as several READs at once, in any order) gets read-ahead chunks started and the chunk offsets
        it needs returned; after a jump, None: read just what was asked."""
        if abs(offset - self.next_offset) > self.window + size:  # a jump: no read-ahead
            self.window = 0
            self.pool.streaming.discard(self)
            self._drop_chunks()
        self.next_offset = max(self.next_offset, offset + size) if self.window else offset + size
        if self.window == 0 and offset != 0:
            self.window = CHUNK  # the first read after a jump: start small
            return None
        self.pool.streaming.add(self)
        self.window = min(max(2 * self.window, 2 * CHUNK), self.pool.readahead())
        first = offset - offset % CHUNK
        end = offset + size + self.window
        if self.size is not None:
            end = min(end, max(self.size, offset + size))
        for off in range(first, end, CHUNK):
            if off not in self.chunks:
                self.chunks[off] = self._spawn_chunk(off)
        return range(first, offset + size, CHUNK)

    def _assemble(self, offset: int, size: int, parts: list[tuple[int, Chunk]]) -> Data:
        out: list[Chunk] = []
        for off, part in parts:
            out.append(part[max(0, offset - off):offset + size - off])
            if len(part) < CHUNK:  # end of file
                break
        # Chunks behind the reader are done with (others may still be awaiting them: no cancel).
        self._drop_chunks(lambda off: off + CHUNK > self.next_offset - self.window, cancel=False)
        return out[0] if len(out) == 1 else out  # a list: the reply is written without joining

    def ready(self, offset: int, size: int, chunks: range) -> Data | None:
        """The READ's data if the read-ahead chunks it needs are all in (no waiting), else None."""
        parts: list[tuple[int, Chunk]] = []
        for off in chunks:
            r = self.chunks.get(off)
            if r is None or not r.done or r.error is not None:
                return None
            parts.append((off, r.value))
            if len(parts[-1][1]) < CHUNK:
                break
        return self._assemble(offset, size, parts)

    async def finish(self, offset: int, size: int, chunks: range | None) -> Data:
        """The READ planned by :meth:`plan`: wait for its chunks, or read directly (``chunks`` None)."""
        if chunks is None:  # CHUNK-sized requests at once (no read-ahead)
            offsets = range(offset, offset + size, CHUNK)
            pieces: list[Chunk] = [b""] * len(offsets)

            async def piece(i: int, off: int) -> None:
                pieces[i] = await self._read_piece(off, min(CHUNK, offset + size - off))

            if len(offsets) == 1:
                await piece(0, offset)
            else:
                async with trio.open_nursery() as n:
                    for i, off in enumerate(offsets):
                        n.start_soon(piece, i, off)
            out: list[Chunk] = []
            for off, part in zip(offsets, pieces, strict=True):
                out.append(part)
                if len(part) < min(CHUNK, offset + size - off):  # end of file
                    break
            return out[0] if len(out) == 1 else out
        parts: list[tuple[int, Chunk]] = []
        for off in chunks:
            parts.append((off, await self._part(off)))
            if len(parts[-1][1]) < CHUNK:
                break
        return self._assemble(offset, size, parts)

    async def read(self, offset: int, size: int) -> Data:
        """Read ``size`` bytes at ``offset`` after this file's pipelined writes (:meth:`plan`)."""
        await self.drain()
        return await self.finish(offset, size, self.plan(offset, size))

    # writes ----------------------------------------------------------------------------------------

    def _raise_error(self) -> None:
        if self.error is not None:
            e, self.error = self.error, None
            raise e

    async def _write(self, offset: int, data: bytes) -> None:
        try:
            # The largest WRITEs the server takes, all sent at once (the server does them in order)
            await self.run(lambda c, h: write_many(c, h, offset, data, _write_chunk(c)))
        except FUSEError as e:
            if self.error is None:
                self.error = e
        except trio.Cancelled:
            if self.error is None:
                self.error = FUSEError(errno.EIO, "write cancelled")
            raise
        finally:
            self.write_bytes -= len(data)

    def _written(self, r: Reply) -> None:
        self.writes.discard(r)
        w, self._wrote = self._wrote, None
        if w is not None:
            w.set()

    def write_now(self, offset: int, data: bytes) -> int | None:
        """Send a write without waiting (pipelined) and return its length; None if it must wait
        (the window is full, or an earlier write failed: :meth:`write` then raises)."""
        if self.error is not None or (self.writes and self.write_bytes + len(data) > self.pool.options.write_window):
            return None
        if self.chunks:
            self._drop_chunks()
        self.write_bytes += len(data)
        r = self.pool.spawn(self._write, offset, bytes(data))
        self.writes.add(r)
        r.add_callback(self._written)
        if self.size is not None and offset + len(data) > self.size:
            self.size = offset + len(data)
        return len(data)

    async def _a_write_ended(self) -> None:
        if self._wrote is None:
            self._wrote = trio.Event()
        await self._wrote.wait()

    async def write(self, offset: int, data: bytes) -> int:
        """:meth:`write_now`, waiting for room first; an earlier write's error is raised here."""
        while True:
            self._raise_error()
            n = self.write_now(offset, data)
            if n is not None:
                return n
            await self._a_write_ended()

    async def drain(self) -> None:
        """Wait for the pipelined writes; raise the first error among them."""
        while self.writes:
            await self._a_write_ended()
        self._raise_error()

    async def fsync(self) -> None:
        """Drain, then fsync@openssh.com (nothing more if the server lacks it)."""
        await self.drain()
        try:
            await self.run(lambda c, h: c.fsync(h))
        except FUSEError as e:
            if e.errno != errno.EOPNOTSUPP:
                raise

    async def close(self) -> None:
        """Drain (errors raised after closing), stop read-ahead, close the remote handle."""
        try:
            await self.drain()
        finally:
            self._drop_chunks()
            self.pool.streaming.discard(self)
            self.closed = True
            handle, self.handle = self.handle, None
            if handle is not None and self.generation == self.conn.generation and self.conn.sftp is not None:
                with contextlib.suppress(FUSEError):
                    await self.pool.run(lambda c: c.close(handle), self.conn)


# -- nodes (trio side) ------------------------------------------------------------------------------

def _join(parent: bytes, name: bytes) -> bytes:
    return parent + name if parent.endswith(b"/") else parent + b"/" + name


def _relative_target(target: bytes, link: bytes, root: bytes) -> bytes:
    """``transform_symlinks``: ``target`` made relative to the directory of ``link`` when it is an
    absolute path inside ``root`` (the mounted directory), as sshfs does; else as it is."""
    inside = root.rstrip(b"/") + b"/"
    if not target.startswith(b"/") or not (target + b"/").startswith(inside):
        return target
    return os.path.relpath(target, os.path.dirname(link) or b"/")


def _ino(path: bytes) -> int:
    """An inode number for a remote path (SFTP v3 carries none): a 63-bit hash of the path, the
    same for the life of the process (as sshfs's numbers, not across mounts)."""
    return hash(path) & _INO_MASK or 1


_INO_MASK = (1 << 63) - 1


def _dir_items(prefix: bytes, names: Iterable[bytes], attrs: dict[bytes, FileAttrs]) -> list[DirItem]:
    """The DirItems of ``names`` (with their ``attrs``) in the directory whose paths start with ``prefix``."""
    new, mask = tuple.__new__, _INO_MASK
    return [new(DirItem, (name, (attrs[name][3] or 0) & 0o170000, hash(prefix + name) & mask or 1))
            for name in names]


class IdMap:
    """Ids on the server and the ids shown here for them (``idmap=user``, ``idmap=file``).

    ``uids`` and ``gids`` map remote ids to local ones. An id without a mapping passes unchanged,
    or with ``error`` (sshfs's ``nomap=error``) is refused: EPERM for the file's attributes or
    the chown."""

    def __init__(self, uids: dict[int, int], gids: dict[int, int], error: bool = False) -> None:
        self.uids, self.gids, self.error = uids, gids, error
        self._ruids = {v: k for k, v in uids.items()}
        self._rgids = {v: k for k, v in gids.items()}

    @classmethod
    def user(cls, remote_uid: int, remote_gid: int, local_uid: int, local_gid: int) -> IdMap:
        """``idmap=user``: the remote user's ids shown as the local user's."""
        return cls({remote_uid: local_uid}, {remote_gid: local_gid})

    @classmethod
    def from_files(cls, uidfile: str | None, gidfile: str | None, error: bool = False) -> IdMap:
        """``idmap=file``: sshfs's files, a ``NAME:REMOTE_ID`` per line; NAME is a local user (in
        ``uidfile``) or group (in ``gidfile``), shown for REMOTE_ID. ValueError says what is wrong."""
        import grp
        import pwd

        def read(path: str | None, local: Callable[[str], int], what: str) -> dict[int, int]:
            if path is None:
                return {}
            out: dict[int, int] = {}
            try:
                with open(path, encoding="utf-8") as f:
                    lines = f.read().splitlines()
            except OSError as e:
                raise ValueError(f"{what}file {path}: {e.strerror}") from None
            for n, line in enumerate(lines, 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                name, sep, rid = line.rpartition(":")
                if not sep or not name or not rid.isdigit():
                    raise ValueError(f"{path}:{n}: not NAME:ID: {line!r}")
                try:
                    out[int(rid)] = local(name)
                except KeyError:
                    raise ValueError(f"{path}:{n}: no local {what} named {name!r}") from None
            return out

        return cls(read(uidfile, lambda name: pwd.getpwnam(name).pw_uid, "user"),
                   read(gidfile, lambda name: grp.getgrnam(name).gr_gid, "group"), error)

    def local(self, uid: int, gid: int) -> tuple[int, int]:
        """Remote ids as shown here."""
        u, g = self.uids.get(uid), self.gids.get(gid)
        if self.error and ((u is None and self.uids) or (g is None and self.gids)):
            raise FUSEError(errno.EPERM, f"no mapping for remote uid {uid} or gid {gid} (nomap=error)")
        return (uid if u is None else u, gid if g is None else g)

    def remote(self, uid: int, gid: int) -> tuple[int, int]:
        """Ids given here (chown; -1: unchanged) as set on the server."""
        u, g = self._ruids.get(uid), self._rgids.get(gid)
        if self.error and ((u is None and uid != -1 and self._ruids) or (g is None and gid != -1 and self._rgids)):
            raise FUSEError(errno.EPERM, f"no mapping for uid {uid} or gid {gid} (nomap=error)")
        return (uid if u is None else u, gid if g is None else g)


def _attr(a: FileAttrs, ino: int, idmap: IdMap | None = None,
          shown: tuple[int | None, int | None, int | None] | None = None) -> Attr:
    """The kernel's attributes for ``a``; ``shown``: the ``uid=``, ``gid=``, ``umask=`` options."""
    mtime = (a.mtime or 0) * 1_000_000_000
    atime = (a.atime or 0) * 1_000_000_000
    size = a.size or 0
    mode = a.permissions or 0
    uid, gid = a.uid or 0, a.gid or 0
    if idmap is not None:
        uid, gid = idmap.local(uid, gid)
    if shown is not None:
        uid = uid if shown[0] is None else shown[0]
        gid = gid if shown[1] is None else shown[1]
        if shown[2] is not None:
            mode = (mode & 0o170000) | (0o777 & ~shown[2])
    return Attr(ino=ino, mode=mode, nlink=1, uid=uid, gid=gid, size=size,
                blocks=(size + 511) // 512, atime_ns=atime, mtime_ns=mtime, ctime_ns=mtime,
                blksize=_DIR_BLKSIZE if mode & 0o170000 == stat.S_IFDIR else CHUNK)


#: A directory's st_blksize. glibc sizes its getdents buffer by it (32 KiB at least), and the kernel
#: asks READDIR(PLUS) for that much: 4 KiB, as local filesystems and sshfs report, makes a listing's
#: first READDIRPLUS (the kernel's choice at offset 0, even for a plain ``ls``) ~200 entries, where
#: CHUNK would make it ~800, each a node and its attributes.
_DIR_BLKSIZE = 4096


_NONE: set[bytes] = set()  # never added to (only directories add names)
_NO_FILES: set[RemoteFile] = set()  # never added to (SftpHandle gives a directory a set of its own)


class SftpNode(Node):
    """A remote file, directory or symlink, by path. Attributes come from listings or LSTAT and
    are kept ``stat_timeout`` seconds."""

    def __init__(self, fs: SftpFS, path: bytes, a: FileAttrs) -> None:
        super().__init__(stat.S_IFMT(a.permissions or 0) or stat.S_IFREG, ino=_ino(path))
        self.fs = fs
        self.path = path
        self.sattrs = a
        self.fetched = time.monotonic()
        #: When it last changed through the mount (attributes read before are out of date).
        self.changed = 0.0
        #: Directory listing cache: name -> attributes, and when it was read.
        self.listing: dict[bytes, FileAttrs] | None = None
        self.listed = 0.0
        self.listing_version = 0
        #: The listing on its way (shared by the readdir and lookups waiting for it), its version and start.
        self.listing_task: Reply | None = None
        self.listing_progress = ListingProgress()
        self.listing_task_from = (0, 0.0)
        #: Lookups that missed the listing since it was last read (3 in a row: read it instead), and
        #: the names they missed (a miss followed by making that name does not count).
        self.misses = 0
        #: Names of the listing whose attributes changed through the mount since (looked up anew).
        #: (Directories only: other nodes share one empty set, as directories share one for ``files``:
        #: a listing makes thousands of nodes, and each container is more for the garbage collector.)
        self.missed: set[bytes] = set() if self.is_dir else _NONE
        self.stale: set[bytes] = set() if self.is_dir else _NONE
        self.target: bytes | None = None
        self.target_at = 0.0
        #: Open files (their writes are drained before this node's attributes are read).
        self.files: set[RemoteFile] = _NO_FILES if self.is_dir else set()

    def forgotten(self) -> None:
        """The kernel forgot the node: drop it from the path map."""
        if self.fs.live.get(self.path) is self:
            del self.fs.live[self.path]

    # helpers -------------------------------------------------------------------------------------

    async def _drain(self) -> None:
        for f in list(self.files):
            if f.writes or f.error:
                await f.drain()

    def _set(self, a: FileAttrs, when: float | None = None) -> None:
        """New attributes, read at ``when`` (now): older ones than those held are ignored."""
        when = time.monotonic() if when is None else when
        if when >= self.fetched and when >= self.changed:
            self.sattrs, self.fetched = a, when

    def _stale(self) -> None:
        """Changed through the mount: ask the server next time (the parent's listing keeps the
        name, its attributes are looked up anew)."""
        self.fetched = -1e9
        self.changed = time.monotonic()
        parent_path, _, name = self.path.rpartition(b"/")
        parent = self.fs.live.get(parent_path or b"/")
        if parent is not None:
            if parent.listing_task is not None:
                parent._drop_listing()  # a listing on its way may hold the old attributes
            elif parent.listing is not None:
                parent.stale.add(name)

    def _made(self, name: bytes, a: FileAttrs | None, stale: bool = False) -> None:
        """``name`` was made (or replaced) in this directory through the mount, with attributes
        ``a`` (None: unknown; ``stale``: out of date, looked up anew): the listing is updated in
        place; a lookup that missed the name before does not count towards listing the directory."""
        self.fetched = -1e9
        if name in self.missed:
            self.missed.discard(name)
            self.misses = max(0, self.misses - 1)
        if self.listing_task is not None or a is None:
            self._drop_listing()
        elif self.listing is not None:
            self.listing[name] = a
            if stale:
                self.stale.add(name)
            else:
                self.stale.discard(name)

    def _removed(self, name: bytes) -> None:
        """``name`` was removed from this directory through the mount: the listing is updated in place."""
        self.fetched = -1e9
        if self.listing_task is not None:
            self._drop_listing()
        elif self.listing is not None:
            self.listing.pop(name, None)
            self.stale.discard(name)

    def _changed_listing(self) -> None:
        self._drop_listing()
        self.fetched = -1e9

    def _drop_listing(self) -> None:
        """Forget the listing (a listing on its way is not kept either)."""
        self.listing = None
        self.listing_version += 1
        self.stale.clear()

    async def _lstat(self, path: bytes | None = None) -> FileAttrs | None:
        """The name's own attributes (LSTAT); None if it does not exist."""
        try:
            return await self.fs.call(lambda s: s.lstat(path or self.path))
        except FUSEError as e:
            if e.errno == errno.ENOENT:
                return None
            raise

    async def _attrs(self, path: bytes | None = None) -> FileAttrs | None:
        """The attributes shown for the name: LSTAT's, or with ``follow_symlinks`` STAT's (LSTAT's
        for a dangling symlink); None if it does not exist."""
        if not self.fs.options.follow_symlinks:
            return await self._lstat(path)
        try:
            return await self.fs.call(lambda s: s.stat(path or self.path))
        except FUSEError as e:
            if e.errno == errno.ENOENT:
                return await self._lstat(path)  # dangling, or gone
            raise

    async def _then_status(self, send: Callable[[SftpClient], Reply], path: bytes, what: str) -> FileAttrs | None:
        """A request answered by status, and an LSTAT of ``path`` in the same round trip."""
        async def status(client: SftpClient, r: Reply) -> None:
            await client.status(r, what)
        return (await self.fs.pool.then_lstat(send, status, path))[1]

    async def _child(self, name: bytes, a: FileAttrs | None = None) -> SftpNode:
        path = _join(self.path, name)
        if a is None:
            a = await self._lstat(path)
            if a is None:
                raise FUSEError(errno.EIO, f"{path!r} vanished after it was made")
        return self.fs.node_for(path, a)

    # lookups and attributes ---------------------------------------------------------------------

    def _fresh_listing(self) -> dict[bytes, FileAttrs] | None:
        if self.listing is not None and time.monotonic() - self.listed < self.fs.options.dir_timeout:
            return self.listing
        return None

    async def _fetch_listing(self) -> tuple[dict[bytes, FileAttrs], bool]:
        """Read the listing, or wait for the one on its way; True if it is kept (the directory did
        not change through the mount meanwhile)."""
        task = self._start_listing()
        version, started = self.listing_task_from
        listing: dict[bytes, FileAttrs] = await task.get()
        if self.listing_version == version and self.listing is not None and self.listed == started:
            return self.listing, True
        return listing, False

    def _start_listing(self) -> Reply:
        """The listing on its way, or a new one (its entries arrive in :attr:`listing_progress`)."""
        task = self.listing_task
        if task is None:
            version, started = self.listing_version, time.monotonic()
            progress = self.listing_progress = ListingProgress()
            path, follow = self.path, self.fs.options.follow_symlinks
            task = self.listing_task = self.fs.pool.spawn(
                self.fs.pool.run, lambda s: list_directory(s, path, progress, follow))
            self.listing_task_from = (version, started)
            task.add_callback(lambda r: self._listed(progress, r))
            task.add_callback(lambda _r: progress.finish())
        return task

    def _listed(self, progress: ListingProgress, task: Reply) -> None:
        """A listing arrived: keep it (once, for every waiter), and refresh the children's attributes."""
        if self.listing_task is task:
            self.listing_task = None
        version, started = self.listing_task_from
        if task.error is not None or self.listing_version != version:
            return
        listing = self.listing = progress.by_name  # the listing, as it arrived
        self.listed, self.misses = started, 0
        self.missed.clear()
        self.stale.clear()
        live, prefix = self.fs.live, _join(self.path, b"")
        if len(live) < len(listing):  # the nodes the kernel holds are fewer: look through them
            cut = len(prefix)
            held = [(path[cut:], child) for path, child in live.items()
                    if path.startswith(prefix) and b"/" not in path[cut:] and path[cut:] in listing]
        else:
            get = live.get
            held = [(name, child) for name in listing if (child := get(prefix + name)) is not None]
        for name, child in held:  # fresher attributes for the nodes the kernel holds
            a = listing[name]
            if (a.permissions or 0) & 0o170000 == child.mode & 0o170000:
                child._set(a, started)

    async def lookup(self, name: bytes) -> Node | None:
        """A child: from a fresh listing, else LSTAT; after three misses in a row, the directory is
        listed instead (later lookups of its names are then answered without asking the server)."""
        path = _join(self.path, name)
        listing = self._fresh_listing()
        if listing is None and self.listing_task is not None and name not in self.stale:
            version, started = self.listing_task_from
            a = self.listing_progress.by_name.get(name)
            if a is not None and version == self.listing_version:  # arrived already: no need to wait
                return self.fs.node_for(path, a, started)
        if listing is None and self.fs.options.dir_timeout > 0:
            if self.listing_task is not None or self.misses >= 3:
                try:
                    listing, kept = await self._fetch_listing()
                    if not kept:  # changed through the mount meanwhile: it may lack a new name
                        listing = None
                except FUSEError:  # e.g. a directory one may search but not read
                    self.misses = -1000
            else:
                self.misses += 1
                self.missed.add(name)
        if listing is not None and name not in self.stale:
            a = listing.get(name)
            return None if a is None else self.fs.node_for(path, a, self.listed)
        when = time.monotonic()
        a = await self._attrs(path)
        if listing is not None and listing is self.listing and name in self.stale:
            self.stale.discard(name)  # changed through the mount before ``when``: ``a`` is current
            if a is None:
                listing.pop(name, None)
            else:
                listing[name] = a
        return None if a is None else self.fs.node_for(path, a, when)

    async def getattr(self) -> Attr:
        """Cached attributes, or LSTAT (after this node's pipelined writes are done)."""
        if self.files:
            await self._drain()
        timeout = self.fs.options.stat_timeout
        if time.monotonic() - self.fetched >= timeout or timeout == 0:
            when = time.monotonic()
            a = await self._attrs()
            if a is None:
                if not self.files:
                    raise FUSEError(errno.ENOENT)
                f = next(iter(self.files))  # unlinked but open: ask the open handle
                a = await f.run(lambda c, h: c.fstat(h))
            self.fetched = -1e9  # answer what was just read, even if it changed meanwhile
            self._set(a, max(when, self.changed))
        return _attr(self.sattrs, self.ino, self.fs.idmap, self.fs.shown)

    async def setattr(self, changes: SetattrRequest) -> Attr:
        """chmod, chown, truncate, utimens: SETSTAT (FSETSTAT on an open file)."""
        await self._drain()
        cur = self.sattrs
        perm = uid = gid = atime = mtime = None
        if changes.mode is not None:
            perm = changes.mode & 0o7777
        if changes.new_uid is not None or changes.new_gid is not None:
            if changes.new_uid is None or changes.new_gid is None:
                cur = await self._attrs() or cur
            idmap = self.fs.idmap
            uid, gid = changes.new_uid, changes.new_gid
            if idmap is not None:  # ids given here; the current ones are the server's already
                uid, gid = idmap.remote(uid if uid is not None else -1, gid if gid is not None else -1)
            uid = uid if uid is not None and uid >= 0 else cur.uid
            gid = gid if gid is not None and gid >= 0 else cur.gid
        now = time.time_ns()
        at = now if changes.atime_now else changes.atime_ns
        mt = now if changes.mtime_now else changes.mtime_ns
        if at is not None or mt is not None:
            if at is None or mt is None:
                cur = await self._attrs() or cur
            at = at if at is not None else (cur.atime or 0) * 1_000_000_000
            mt = mt if mt is not None else (cur.mtime or 0) * 1_000_000_000
            atime, mtime = at // 1_000_000_000, mt // 1_000_000_000  # SFTP v3: seconds
        new = FileAttrs(changes.size, uid, gid, perm, atime, mtime)
        handle = None
        if changes.fh:
            with contextlib.suppress(FUSEError):
                handle = self.fs.handle(changes.fh)
        if isinstance(handle, SftpHandle):
            await handle.rf.run(lambda c, h: c.fsetstat(h, new))
        else:
            # lsetstat@openssh.com for a symlink's own times (it takes no size); plain SETSTAT otherwise
            nofollow = stat.S_ISLNK(self.mode)
            path = self.path
            await self.fs.call(lambda s: s.setstat(path, new, follow_symlinks=not nofollow))
        if changes.size is not None:
            for f in self.files:
                f._drop_chunks()
                f.size = changes.size
        self._stale()
        return await self.getattr()

    async def readlink(self) -> bytes:
        """The symlink's target (cached ``link_timeout`` seconds); with ``transform_symlinks`` an
        absolute target inside the mounted directory is made relative to the link."""
        if self.target is None or time.monotonic() - self.target_at >= self.fs.options.link_timeout:
            path = self.path
            self.target = await self.fs.call(lambda s: s.readlink(path))
            self.target_at = time.monotonic()
        if self.fs.options.transform_symlinks:
            return _relative_target(self.target, self.path, self.fs.root_path)
        return self.target

    async def readdir(self) -> list[DirItem] | AsyncIterator[list[DirItem]]:
        """The listing (names, types and attributes, kept ``dir_timeout``); a listing not at hand
        is streamed as it arrives (READDIRs pipelined): the kernel gets the first entries while
        the server reads the rest."""
        listing = self._fresh_listing()
        prefix = _join(self.path, b"")
        if listing is not None:
            return _dir_items(prefix, listing, listing)
        task = self._start_listing()
        return self._arriving(self.listing_progress, task, prefix)

    async def _arriving(self, progress: ListingProgress, task: Reply,
                        prefix: bytes) -> AsyncGenerator[list[DirItem], int | None]:
        """The listing's entries as they arrive, in batches. The node layer sends (as the value of
        the ``yield``) how many more the kernel's buffer could take: the next batch waits for as
        many (or the end): one wake-up per READDIR rather than one per SFTP reply."""
        i, want = 0, 1
        while True:
            names = progress.names
            if len(names) >= i + want or (i < len(names) and progress.done):
                batch, i = names[i:], len(names)
                more = yield _dir_items(prefix, batch, progress.by_name)
                want = more if type(more) is int and more > 0 else 1
                continue
            if progress.done:
                task.result()  # the listing's error (a FUSEError), if it failed
                return
            await progress.wait_beyond(i + want - 1)

    async def statfs(self) -> FsStats:
        """statvfs@openssh.com (huge counts if the server lacks it, as sshfs)."""
        try:
            path = self.path
            v = await self.fs.call(lambda s: s.statvfs(path))
        except FUSEError as e:
            if e.errno != errno.EOPNOTSUPP:
                raise
            return FsStats(blocks=1 << 30, bfree=1 << 30, bavail=1 << 30, files=1 << 20, ffree=1 << 20)
        return FsStats(blocks=v.blocks, bfree=v.bfree, bavail=v.bavail, files=v.files, ffree=v.ffree,
                       bsize=v.bsize, namelen=v.namemax, frsize=v.frsize)

    # open files ------------------------------------------------------------------------------------

    async def open(self, flags: int) -> FileHandle:
        """OPEN (O_TRUNC included); the page cache is dropped at each open, as sshfs does."""
        await self._drain()
        rf = RemoteFile(self.fs.pool, self.path, flags & ~(os.O_CREAT | os.O_EXCL))
        rf.size = 0 if flags & os.O_TRUNC else (self.sattrs.size or 0)
        await rf.open(prefetch=flags & _ACCMODE == os.O_RDONLY and rf.size > 0)
        if flags & os.O_TRUNC:
            self._stale()
        return SftpHandle(self, rf)

    async def create(self, name: bytes, flags: int, mode: int) -> tuple[Node, FileHandle]:
        """OPEN with FXF_CREAT (and EXCL, TRUNC); EEXIST when O_EXCL finds the name taken."""
        path = _join(self.path, name)
        rf = RemoteFile(self.fs.pool, path, flags | os.O_CREAT, mode)
        try:
            _, a = await self.fs.pool.then_lstat(rf.send_open, rf.opened, path, rf.conn)
        except FUSEError as e:
            await self._explain(e, path, want=None)
            self._made(name, None)  # it may exist after all
            raise
        rf.size = 0
        if a is None or not stat.S_ISREG(a.permissions or 0):
            try:
                a = await rf.run(lambda c, h: c.fstat(h))
            except BaseException:
                self._made(name, None)
                with trio.CancelScope(shield=True):
                    await rf.close()
                raise
        a = await self._exact_mode(path, a, mode)
        self._made(name, a)
        node = self.fs.node_for(path, a)
        return node, SftpHandle(node, rf)

    async def _exact_mode(self, path: bytes, a: FileAttrs, mode: int) -> FileAttrs:
        """The server applies its own umask (sshd's, often 022) to a new name's mode: set the mode
        the caller asked for (the kernel already applied the caller's umask) if it differs, as a
        local filesystem would have made it."""
        want = mode & 0o7777
        if a.permissions is None or a.permissions & 0o7777 == want:
            return a
        await self.fs.call(lambda s: s.setstat(path, FileAttrs(permissions=want)))
        return a._replace(permissions=(a.permissions & ~0o7777) | want)

    async def _explain(self, e: FUSEError, path: bytes, want: str | None) -> None:
        """SFTP v3 answers most failures FX_FAILURE: find the errno a local filesystem would give."""
        if e.errno != errno.EIO or "connection" in str(e).lower() or "timed out" in str(e).lower():
            return
        try:
            a = await self._lstat(path)
        except FUSEError:
            return
        if want is None:  # making a name: it exists
            if a is not None:
                raise FUSEError(errno.EEXIST) from None
        elif want == "dir":  # removing a directory
            if a is None:
                raise FUSEError(errno.ENOENT) from None
            if not stat.S_ISDIR(a.permissions or 0):
                raise FUSEError(errno.ENOTDIR) from None
            raise FUSEError(errno.ENOTEMPTY) from None
        elif want == "file":  # removing a file
            if a is None:
                raise FUSEError(errno.ENOENT) from None
            if stat.S_ISDIR(a.permissions or 0):
                raise FUSEError(errno.EISDIR) from None

    # names ---------------------------------------------------------------------------------------

    async def mkdir(self, name: bytes, mode: int) -> Node:
        """MKDIR (EEXIST if the name is taken)."""
        path = _join(self.path, name)
        try:
            a = await self._then_status(lambda s: s.send_mkdir(path, FileAttrs(permissions=mode & 0o7777)),
                                        path, "MKDIR")
        except FUSEError as e:
            await self._explain(e, path, want=None)
            raise
        if a is not None:
            a = await self._exact_mode(path, a, mode)
        self._made(name, a)
        return await self._child(name, a)

    async def symlink(self, name: bytes, target: bytes) -> Node:
        """SYMLINK."""
        path = _join(self.path, name)
        try:
            a = await self._then_status(lambda s: s.send_symlink(target, path), path, "SYMLINK")
        except FUSEError as e:
            await self._explain(e, path, want=None)
            raise
        self._made(name, a)
        return await self._child(name, a)

    async def link(self, name: bytes, node: Node) -> Node:
        """hardlink@openssh.com; the new name is a node of its own (SFTP has no inode identity)."""
        if not isinstance(node, SftpNode):
            raise FUSEError(errno.EXDEV)
        path = _join(self.path, name)
        try:
            old = node.path
            a = await self._then_status(lambda s: s.send_link(old, path), path, "HARDLINK")
        except FUSEError as e:
            await self._explain(e, path, want=None)
            raise
        self._made(name, a)
        node._stale()
        return await self._child(name, a)

    async def unlink(self, name: bytes) -> None:
        """REMOVE."""
        path = _join(self.path, name)
        try:
            await self.fs.call(lambda s: s.remove(path))
        except FUSEError as e:
            await self._explain(e, path, want="file")
            raise
        self._removed(name)

    async def rmdir(self, name: bytes) -> None:
        """RMDIR (ENOTEMPTY, ENOTDIR, ENOENT found out after an FX_FAILURE)."""
        path = _join(self.path, name)
        try:
            await self.fs.call(lambda s: s.rmdir(path))
        except FUSEError as e:
            await self._explain(e, path, want="dir")
            raise
        self._removed(name)
        self.fs.moved(path, None)

    async def rename(self, name: bytes, newparent: Node, newname: bytes, flags: int) -> None:
        """posix-rename@openssh.com (replaces the target); RENAME_NOREPLACE: plain RENAME."""
        if not isinstance(newparent, SftpNode) or flags & ~1:
            raise FUSEError(errno.EINVAL)  # RENAME_EXCHANGE, RENAME_WHITEOUT: SFTP has neither
        old, new = _join(self.path, name), _join(newparent.path, newname)
        try:
            if flags & 1 or not self.fs.posix_rename:
                await self.fs.call(lambda s: s.rename(old, new))
            else:
                await self.fs.call(lambda s: s.posix_rename(old, new))
        except FUSEError as e:
            if e.errno == errno.EIO and not flags & 1 and not self.fs.posix_rename:
                # No posix-rename: replace the target by hand (not atomic), as sshfs's workaround.
                target = await self._lstat(new)
                if target is not None:
                    remove = "rmdir" if stat.S_ISDIR(target.permissions or 0) else "remove"
                    await self.fs.call(lambda s: getattr(s, remove)(new))
                    await self.fs.call(lambda s: s.rename(old, new))
                    e = None  # type: ignore[assignment]
            if e is not None:
                if flags & 1 and e.errno == errno.EIO and await self._lstat(new) is not None:
                    raise FUSEError(errno.EEXIST) from None
                raise
        moving = self.fs.live.get(old)
        a = moving.sattrs if moving is not None else (self.listing or {}).get(name)
        # changed through the mount since read: the type is right, the rest is looked up anew
        stale = moving.fetched < 0 if moving is not None else name in self.stale
        self._removed(name)
        newparent._made(newname, a, stale)
        self.fs.moved(old, new)


class SftpHandle(FileHandle):
    """The trio side of an open :class:`RemoteFile`."""

    def __init__(self, node: SftpNode, rf: RemoteFile) -> None:
        self.node = node
        self.rf = rf
        if node.files is _NO_FILES:
            node.files = set()
        node.files.add(rf)

    async def read(self, offset: int, size: int) -> Data:
        """READ: from read-ahead without leaving trio when it holds the data; after the file's
        pipelined writes (through any handle)."""
        rf = self.rf
        if any(f.writes or f.error for f in self.node.files):
            for f in list(self.node.files):
                if f is not rf and f.writes:
                    await f.drain()
            return await rf.read(offset, size)
        chunks = rf.plan(offset, size)
        if chunks is not None:
            data = rf.ready(offset, size, chunks)
            if data is not None:
                return data
        return await rf.finish(offset, size, chunks)

    async def write(self, offset: int, data: bytes) -> int:
        """WRITE, pipelined: sent without waiting while the write window has room."""
        self.node._stale()
        for f in self.node.files:
            if f is not self.rf:
                f._drop_chunks()
        n = self.rf.write_now(offset, data)
        return n if n is not None else await self.rf.write(offset, data)

    async def flush(self) -> None:
        """FLUSH (close(2)): the pipelined writes are done, or their error is returned."""
        if self.rf.writes or self.rf.error:
            await self.rf.drain()

    async def fsync(self, datasync: int) -> None:
        """FSYNC: drain, then fsync@openssh.com."""
        await self.rf.fsync()

    async def release(self) -> None:
        """RELEASE: close the remote handle (in the background when no writes are pending: the
        application does not wait for RELEASE, and its errors could reach no one)."""
        self.node.files.discard(self.rf)
        if not self.rf.writes and self.rf.error is None:
            self.rf.pool.spawn(self.rf.close)
            return
        with trio.CancelScope(shield=True):
            try:
                await self.rf.close()
            except FUSEError as e:
                log.warning("closing %r: %s", self.rf.path, e)


# -- the filesystem ---------------------------------------------------------------------------------

class SftpFS(NodeFS):
    """A remote directory over a :class:`Pool` of SFTP connections."""

    def __init__(self, pool: Pool, root_path: bytes, root_attrs: FileAttrs, idmap: IdMap | None = None) -> None:
        self.pool = pool
        self.options = pool.options
        #: ``idmap=user`` or ``idmap=file``'s mapping, or None.
        self.idmap = idmap
        #: The ``uid=``, ``gid=``, ``umask=`` options (None: none given).
        o = self.options
        self.shown = None if o.uid is None and o.gid is None and o.umask is None else (o.uid, o.gid, o.umask)
        #: Path -> the live node for it (nodes the kernel holds, and the root).
        self.live: dict[bytes, SftpNode] = {}
        root = SftpNode(self, root_path, root_attrs)
        self.live[root_path] = root
        #: The mounted directory's path on the server.
        self.root_path = root_path
        self.entry_timeout = self.attr_timeout = pool.options.stat_timeout
        super().__init__(root, types=[SftpNode, SftpHandle])
        sftp = pool.conns[0].sftp
        self.posix_rename = sftp is None or sftp.has(b"posix-rename@openssh.com")

    async def call(self, op: Callable[[SftpClient], Awaitable[T]]) -> T:
        """Run one SFTP operation on the least busy connection."""
        return await self.pool.run(op)

    async def opendir(self, req: OpendirRequest) -> Handle:
        """OPENDIR: a directory whose listing is not at hand starts being listed now, as sshfs
        opens it here: the READDIRPLUS that follows finds it on its way."""
        handle = await super().opendir(req)
        node = self.node(req.nodeid)
        if isinstance(node, SftpNode) and self.options.dir_timeout > 0 and node._fresh_listing() is None:
            node._start_listing()
        return handle

    def node_for(self, path: bytes, a: FileAttrs, when: float | None = None) -> SftpNode:
        """The live node for ``path`` with attributes ``a`` read at ``when`` (now), or a new one."""
        n = self.live.get(path)
        if n is not None and stat.S_IFMT(a.permissions or 0) == stat.S_IFMT(n.mode):
            n._set(a, when)
            return n
        n = SftpNode(self, path, a)
        if when is not None:
            n.fetched = when
        self.live[path] = n
        return n

    def moved(self, old: bytes, new: bytes | None) -> None:
        """``old`` (and everything under it) is now ``new`` (None: gone)."""
        prefix = old + b"/"
        for path in [p for p in self.live if p == old or p.startswith(prefix)]:
            n = self.live.pop(path)
            if new is not None:
                n.path = new + path[len(old):]
                for f in n.files:
                    f.path = n.path
                self.live[n.path] = n

    async def poll_once(self) -> int:
        """Re-stat what the kernel holds; invalidate what changed elsewhere. Returns the number changed."""
        changed = 0
        limit = trio.Semaphore(32)

        async def check(n: SftpNode) -> None:
            nonlocal changed
            if any(f.writes for f in n.files):
                return
            async with limit:
                try:
                    a = await n._attrs()
                except FUSEError:
                    return
            old = n.sattrs
            if a is None or stat.S_IFMT(a.permissions or 0) != stat.S_IFMT(n.mode):
                # gone, or replaced by another type: the kernel drops the name (looked up anew)
                parent_path, _, name = n.path.rpartition(b"/")
                parent = self.live.get(parent_path or b"/")
                if parent is not None and name:
                    parent._changed_listing()
                    changed += 1
                    if self.live.get(n.path) is n:
                        del self.live[n.path]
                    await parent.notify_delete(name, n)
                return
            if (a.size, a.mtime, a.permissions, a.uid, a.gid) == (old.size, old.mtime, old.permissions, old.uid,
                                                                  old.gid):
                return
            changed += 1
            n._set(a)
            if n.is_dir:
                # The kernel caches no absent names (negative_timeout 0) and vanished children are
                # found by their own checks: dropping the listing and the attributes is enough.
                n._drop_listing()
                await n.notify_content()
            else:
                for f in n.files:
                    f._drop_chunks()
                    f.size = a.size
                n.target = None
                await n.notify_content()

        async with trio.open_nursery() as nursery:
            for n in list(self.nodes.values()):
                if isinstance(n, SftpNode) and n.known:
                    nursery.start_soon(check, n)
        return changed

    async def poll_forever(self) -> None:
        """:meth:`poll_once` every ``options.poll`` seconds."""
        while True:
            await trio.sleep(self.options.poll)
            try:
                await self.poll_once()
            except Exception:  # one bad round never stops polling
                log.exception("poll failed")


# -- command line -----------------------------------------------------------------------------------

_REMOTE = re.compile(r"^(?:(?P<user>[^@/]+)@)?(?P<host>\[[^\]]+\]|[^:/@\[\]]*):(?P<path>.*)$")


def parse_remote(spec: str) -> tuple[str | None, str, str]:
    """``[USER@]HOST:[DIR]`` -> (user, host, dir); ValueError if it is not that (HOST may be
    empty here: ``-o passive`` connects to no host)."""
    m = _REMOTE.match(spec)
    if m is None:
        raise ValueError(f"remote {spec!r} is not [USER@]HOST:[DIR]")
    return m["user"], m["host"].strip("[]"), m["path"]


#: ``ssh`` options passed on as ``-oNAME=VALUE`` with ``--transport ssh`` (sshfs's list, less those
#: sftpfs reads itself: Port, IdentityFile, Ciphers, UserKnownHostsFile, StrictHostKeyChecking).
SSH_OPTIONS = frozenset("""AddressFamily BatchMode BindAddress BindInterface CertificateFile CheckHostIP
    Compression ConnectionAttempts ConnectTimeout ControlMaster ControlPath ControlPersist FingerprintHash
    GlobalKnownHostsFile GSSAPIAuthentication GSSAPIDelegateCredentials HostbasedAuthentication
    HostKeyAlgorithms HostKeyAlias HostName IdentitiesOnly IdentityAgent IPQoS KbdInteractiveAuthentication
    KexAlgorithms LogLevel MACs NoHostAuthenticationForLocalhost NumberOfPasswordPrompts
    PasswordAuthentication PKCS11Provider PreferredAuthentications ProxyCommand ProxyJump
    PubkeyAcceptedAlgorithms PubkeyAuthentication RekeyLimit RevokedHostKeys ServerAliveCountMax
    ServerAliveInterval TCPKeepAlive UpdateHostKeys User VerifyHostKeyDNS""".split())

_OWN_OPTIONS = {"cache_timeout", "cache_stat_timeout", "cache_dir_timeout", "cache_link_timeout", "cache",
                "known_hosts", "UserKnownHostsFile", "IdentityFile", "Port", "readahead", "write_window",
                "reconnect", "StrictHostKeyChecking", "Ciphers", "ssh_command", "idmap", "uidfile", "gidfile", "nomap",
                "sftp_server", "directport", "transform_symlinks", "passive", "slave",
                "follow_symlinks", "max_conns", "dir_cache", "dcache_timeout", "dcache_stat_timeout",
                "dcache_dir_timeout", "dcache_link_timeout", "uid", "gid", "umask"}

#: sshfs's options that sftpfs does not take, and why (a clear error rather than "unknown").
_NOT_TAKEN = {
    "password_stdin": "sftpfs logs in with keys (-i, an ssh agent, ~/.ssh/config) and never asks for a "
                      "password",
}


def _int_option(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{key} must be a number, not {value!r}") from None


def _options(args: argparse.Namespace) -> tuple[SftpOptions, MountOptions]:
    user, host, path = parse_remote(args.remote)
    o = SftpOptions(host=host, user=user, path=path, port=args.port, identities=list(args.identity),
                    connections=args.connections, transport=args.transport, reconnect=args.reconnect,
                    timeout=args.timeout, poll=args.poll)
    if o.connections < 1 or o.timeout <= 0 or o.poll < 0:
        raise ValueError("--connections must be >= 1, --timeout > 0, --poll >= 0")
    if o.port is not None and not 0 < o.port < 65536:
        raise ValueError(f"port {o.port} is not 1-65535")
    mount: list[str] = []
    for opt in ",".join(args.options).split(","):
        if not opt:
            continue
        key, eq, value = opt.partition("=")
        if key in SSH_OPTIONS:
            if not eq or not value:
                raise ValueError(f"ssh option {key} needs a value")
            o.ssh_options.append(f"{key}={value}")
            continue
        if key in _NOT_TAKEN:
            raise ValueError(f"-o {key}: {_NOT_TAKEN[key]}")
        if key not in _OWN_OPTIONS:
            mount.append(opt)
            continue
        if key.startswith("dcache_"):  # sshfs 3's names for the cache_ options
            key = key[1:]
        if key in ("cache_timeout", "cache_stat_timeout", "cache_dir_timeout", "cache_link_timeout"):
            t = float(value)
            if t < 0:
                raise ValueError(f"{key} must be >= 0")
            if key in ("cache_timeout", "cache_stat_timeout"):
                o.stat_timeout = t
            if key in ("cache_timeout", "cache_dir_timeout"):
                o.dir_timeout = t
            if key in ("cache_timeout", "cache_link_timeout"):
                o.link_timeout = t
        elif key == "cache":
            if value not in ("yes", "no"):
                raise ValueError("cache must be yes or no")
            if value == "no":
                o.stat_timeout = o.dir_timeout = o.link_timeout = 0.0
        elif key == "dir_cache":
            if value not in ("yes", "no"):
                raise ValueError("dir_cache must be yes or no")
            if value == "no":
                o.dir_timeout = 0.0
        elif key == "max_conns":
            o.connections = _int_option(key, value)
            if o.connections < 1:
                raise ValueError("max_conns must be >= 1")
        elif key in ("uid", "gid"):
            n = _int_option(key, value)
            if not 0 <= n < 0xFFFFFFFF:
                raise ValueError(f"{key} {n} is not a valid id")
            setattr(o, key, n)
        elif key == "umask":
            try:
                o.umask = int(value, 8)
            except ValueError:
                raise ValueError(f"umask must be octal, not {value!r}") from None
            if not 0 <= o.umask <= 0o777:
                raise ValueError(f"umask {value} is not 0-777")
        elif key in ("known_hosts", "UserKnownHostsFile"):
            o.known_hosts = value
        elif key == "StrictHostKeyChecking":
            if value == "no":
                o.known_hosts = "none"
        elif key == "IdentityFile":
            o.identities.append(value)
        elif key == "Port":
            o.port = int(value)
            if not 0 < o.port < 65536:
                raise ValueError(f"port {o.port} is not 1-65535")
        elif key in ("readahead", "write_window"):
            n = int(value)
            if n < CHUNK:
                raise ValueError(f"{key} must be at least {CHUNK}")
            setattr(o, key, n)
        elif key == "reconnect":
            o.reconnect = True
        elif key == "follow_symlinks":
            o.follow_symlinks = True
        elif key == "transform_symlinks":
            o.transform_symlinks = True
        elif key in ("passive", "slave"):
            o.passive = True
        elif key == "Ciphers":
            o.ciphers = value.replace(",", ":").split(":")
        elif key == "idmap":
            if value not in ("user", "file", "none"):
                raise ValueError(f"idmap must be user, file or none, not {value!r}")
            o.idmap = value
        elif key in ("uidfile", "gidfile"):
            setattr(o, key, value)
        elif key == "nomap":
            if value not in ("ignore", "error"):
                raise ValueError(f"nomap must be ignore or error, not {value!r}")
            o.nomap = value
        elif key == "directport":
            o.directport = int(value)
            if not 0 < o.directport < 65536:
                raise ValueError(f"directport {o.directport} is not 1-65535")
        elif key == "sftp_server":
            if not value.strip():
                raise ValueError("sftp_server is empty")
            o.sftp_server = value
        elif key == "ssh_command":
            if not shlex.split(value):
                raise ValueError("ssh_command is empty")
            o.ssh_command = value
        if not eq and key not in ("reconnect", "follow_symlinks", "transform_symlinks", "passive", "slave"):
            raise ValueError(f"option {key} needs a value")
    if o.idmap == "file":
        if o.uidfile is None and o.gidfile is None:
            raise ValueError("idmap=file needs uidfile=FILE or gidfile=FILE")
        IdMap.from_files(o.uidfile, o.gidfile)  # its errors now, before connecting
    elif o.uidfile is not None or o.gidfile is not None:
        raise ValueError("uidfile and gidfile go with idmap=file")
    if o.sftp_server != "sftp" and o.transport != "ssh":
        raise ValueError("-o sftp_server needs --transport ssh")
    if o.ssh_options and o.transport != "ssh":
        raise ValueError(f"-o {o.ssh_options[0]} is an option of the ssh client: it needs --transport ssh")
    if o.transport == "asyncssh" and importlib.util.find_spec("asyncssh") is None:
        raise ValueError("--transport asyncssh needs asyncssh: pip install 'afuse[sftp]'")
    if o.directport is not None and (o.transport != "ssh" or o.ssh_options or o.sftp_server != "sftp"):
        raise ValueError("directport speaks SFTP over TCP, without SSH: not with --transport asyncssh, "
                         "ssh options or sftp_server")
    if not o.host and not o.passive:
        raise ValueError(f"remote {args.remote!r} names no HOST (only -o passive goes without one)")
    if o.passive:
        if o.directport is not None or o.transport != "ssh" or o.ssh_options or o.sftp_server != "sftp":
            raise ValueError("passive speaks SFTP over stdin and stdout: not with directport, "
                             "--transport asyncssh, ssh options or sftp_server")
        if o.connections != 1 or o.reconnect:
            raise ValueError("passive has one connection (stdin and stdout): not with --connections or --reconnect")
        for fd, name in ((0, "stdin"), (1, "stdout")):
            try:
                mode = os.fstat(fd).st_mode
            except OSError:
                raise ValueError(f"passive: {name} is closed (connect it to an SFTP server)") from None
            if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
                raise ValueError(f"passive: {name} is not a pipe or a socket (connect it to an SFTP server, "
                                 "e.g. with dpipe or socat)")
    if (o.transport == "ssh" and o.directport is None and not o.passive
            and shutil.which(shlex.split(o.ssh_command)[0]) is None):
        raise ValueError(f"{shlex.split(o.ssh_command)[0]!r} not found (apt-get install openssh-client, "
                         "or --transport asyncssh)")
    return o, MountOptions.parse(",".join(mount))


async def connect(pool: Pool) -> SftpFS:
    """Connect the pool and find the remote directory; ConnectError says why not."""
    options = pool.options
    await pool.start()
    sftp = pool.conns[0].sftp
    assert sftp is not None
    try:
        with trio.fail_after(options.timeout):
            root = await sftp.realpath((options.path or ".").encode())
            a = await sftp.stat(root)
            # idmap=user: the remote user is taken to own the login directory, as sshfs does.
            home = await sftp.stat(b".") if options.idmap == "user" else None
    except (SftpError, *_LOST) as e:
        with trio.CancelScope(shield=True):
            await pool.close()
        if isinstance(e, trio.TooSlowError):
            e = TimeoutError(f"no answer within {options.timeout:g} s")
        raise ConnectError(f"{options.path or '~'}: {e}") from e
    if not stat.S_ISDIR(a.permissions or 0):
        with trio.CancelScope(shield=True):
            await pool.close()
        raise ConnectError(f"{root!r} is not a directory")
    idmap = None
    if home is not None:
        idmap = IdMap.user(home.uid or 0, home.gid or 0, os.getuid(), os.getgid())
        log.info("idmap=user: remote uid %d gid %d shown as %d %d", home.uid or 0, home.gid or 0, os.getuid(),
                 os.getgid())
    elif options.idmap == "file":
        idmap = IdMap.from_files(options.uidfile, options.gidfile, options.nomap == "error")
    return SftpFS(pool, root, a, idmap)


#: The signals that stop :func:`serve` (and unmount).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


async def serve(options: SftpOptions, mountpoint: str, mount_options: MountOptions,
                ready: Callable[[], None] = lambda: None, poll_us: float = 0.0) -> int | None:
    """Connect, mount, serve until unmounted or SIGINT/SIGTERM/SIGHUP; returns the signal, if any.
    ``poll_us``: :func:`afuse.serve`'s busy polling of /dev/fuse. trio code: with the asyncssh
    transport, trio must run as the guest of an asyncio loop (:func:`run`)."""
    got: int | None = None
    config = InitConfig(max_background=128, congestion_threshold=96)
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        async with trio.open_nursery() as background:
            pool = Pool(options, background)
            try:
                fs = await connect(pool)
                async with trio.open_nursery() as serving:
                    async def on_signal() -> None:
                        nonlocal got
                        async for signum in signals:
                            got = signum
                            serving.cancel_scope.cancel()
                            return

                    async def mounted(task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
                        await afuse.serve(fs, mountpoint, options=mount_options, config=config, max_requests=256,
                                          poll_us=poll_us, task_status=task_status)
                        serving.cancel_scope.cancel()  # unmounted

                    serving.start_soon(on_signal)
                    await serving.start(mounted)
                    if options.poll > 0:
                        serving.start_soon(fs.poll_forever)
                    ready()
            finally:
                with trio.CancelScope(shield=True):
                    await pool.close()
                background.cancel_scope.cancel()
    return got


def run(options: SftpOptions, mountpoint: str, mount_options: MountOptions,
        ready: Callable[[], None] = lambda: None, poll_us: float = 0.0) -> int | None:
    """:func:`serve` in a new trio run: on its own with the ``ssh`` transport; as the guest of an
    asyncio loop with ``asyncssh`` (asyncssh is asyncio code)."""
    if options.transport != "asyncssh":
        return trio.run(serve, options, mountpoint, mount_options, ready, poll_us)

    async def host() -> int | None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[outcome.Outcome[int | None]] = loop.create_future()
        trio.lowlevel.start_guest_run(serve, options, mountpoint, mount_options, ready, poll_us,
                                      run_sync_soon_threadsafe=loop.call_soon_threadsafe,
                                      run_sync_soon_not_threadsafe=loop.call_soon,
                                      done_callback=done.set_result, host_uses_signal_set_wakeup_fd=True)
        return (await done).unwrap()

    return asyncio.run(host())


def make_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m afuse.examples.sftpfs",
                                description="Mount a directory of an SSH server over SFTP (like sshfs).")
    p.add_argument("remote", help="[USER@]HOST:[DIR] (DIR empty: the login directory)")
    p.add_argument("mountpoint", help="empty directory to mount on")
    p.add_argument("-p", "--port", type=int, default=None, help="SSH port (default: the SSH client's, 22)")
    p.add_argument("-i", "--identity", action="append", default=[], help="private key file (repeatable)")
    p.add_argument("-o", dest="options", action="append", default=[],
                   help="comma-separated: cache_timeout=S, cache_stat_timeout=S, cache_dir_timeout=S, "
                        "cache_link_timeout=S, cache=yes|no, known_hosts=FILE (none: no check), IdentityFile=F, "
                        "Port=N, Ciphers=A:B, ssh_command=CMD, sftp_server=NAME|PATH, directport=PORT, "
                        "passive (slave), "
                        "readahead=BYTES, write_window=BYTES, reconnect, idmap=user|file|none, uidfile=F, gidfile=F, "
                        "nomap=ignore|error, follow_symlinks, transform_symlinks, uid=N, gid=N, umask=M, "
                        "sshfs's max_conns=N, dir_cache=yes|no, dcache_timeout=S (and dcache_stat/dir/link_timeout), "
                        "ssh's own (ProxyJump=, "
                        "ServerAliveInterval=, Compression=, ...); others are mount options")
    p.add_argument("--transport", choices=("ssh", "asyncssh"), default="ssh",
                   help="ssh: OpenSSH's client as a child process, as sshfs runs it (the default); "
                        "asyncssh: SSH in this process")
    p.add_argument("--connections", type=int, default=1, help="SSH connections to spread requests over")
    p.add_argument("--reconnect", action="store_true", help="reconnect when the connection is lost")
    p.add_argument("--timeout", type=float, default=15.0, help="seconds before a request fails with EIO")
    p.add_argument("--poll", type=float, default=0.0, help="seconds between checks for remote changes (0: off)")
    p.add_argument("--poll-us", type=_poll_us, default=0.0, metavar="US",
                   help="busy-poll /dev/fuse this many microseconds before sleeping (default 0: never): "
                        "one request after another (stat, ls -l) finds the daemon awake, at the cost of "
                        "that CPU time")
    p.add_argument("--debug", action="store_true", help="log every request")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: 0 after an unmount, SIGTERM or SIGHUP; 130 after Ctrl-C; 1 if it cannot connect or
    mount; 2 for bad arguments. Prints ``ready`` once mounted (to stderr with ``-o passive``,
    whose stdout is the SFTP server's)."""
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s sftpfs %(levelname)s %(message)s")
    logging.getLogger("asyncssh").setLevel(logging.DEBUG if args.debug else logging.WARNING)
    try:
        options, mount_options = _options(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    def ready() -> None:
        # What exists now (modules, the connections, the mount) lives as long as the process:
        # the cyclic garbage collector need not walk it again at every full collection.
        gc.freeze()
        print("ready", file=sys.stderr if options.passive else sys.stdout, flush=True)

    try:
        stopped_by = run(options, args.mountpoint, mount_options, ready, poll_us=args.poll_us)
    except (ConnectError, MountError, BaseExceptionGroup) as e:
        found = _first_error(e, (ConnectError, MountError))
        if found is None:
            raise
        print(f"error: {found}", file=sys.stderr)
        return 1
    return 128 + signal.SIGINT if stopped_by == signal.SIGINT else 0


if __name__ == "__main__":
    sys.exit(main())
