"""CUSE: character devices served from Python.

Subclass :class:`DeviceOperations`, then serve it as /dev/NAME::

    class Zero(afuse.cuse.DeviceOperations):
        async def read(self, req):
            return bytes(req.size)

    async with afuse.cuse.device(Zero(), "myzero", mode=0o666) as dev:
        await dev.wait_closed()

The device exists while it is served: opening /dev/cuse and answering CUSE_INIT creates it,
closing the channel removes it. Requests are served by the same machinery as a FUSE session
(:class:`afuse.Session`: reader tasks, async handlers, INTERRUPT cancelling a blocked handler,
which answers EINTR). Handlers take the decoded request (:mod:`afuse.wire.requests`) and return a
value or raise :class:`afuse.FUSEError`; any other exception answers EIO, is logged and is kept
in :attr:`CuseSession.errors`.

Ioctls: with ``unrestricted_ioctl=True`` (the default, as libfuse's CUSE example) every ioctl first
arrives with no data (``in_size == out_size == 0``); the handler returns :func:`retry` naming the
caller's memory it wants (address, length), and is called again with those bytes — as often as it
takes to follow pointers in the caller's argument. With ``unrestricted_ioctl=False`` the kernel
copies what the ioctl number's ``_IOC`` direction and size say, once. See docs/cuse.md.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from .device import Mount, MountOptions, set_nonblocking
from .errors import FUSEError, MountError, SessionError
from .operations import Operations
from .readers import read_one
from .session import _CURRENT, Session, Takeover
from .wire import replies
from .wire import requests as r
from .wire.constants import IOCTL_COMPAT, IOCTL_UNRESTRICTED
from .wire.cuse import IOCTL_MAX_TRANSFER, CuseConfig, CuseInitError, CuseNegotiated, encode_cuse_init_reply
from .wire.cuse import ioctl_retry as _encode_retry
from .wire.cuse import negotiate_cuse as _negotiate
from .wire.errors import HandlerResultError
from .wire.init import InitConfig
from .wire.types import Handle, IoctlReply

__all__ = ["CUSE_PATH", "CuseSession", "DeviceError", "DeviceOperations", "device", "is_compat",
           "is_unrestricted", "retry", "serve_device"]

log = logging.getLogger("afuse")

#: The CUSE channel device (misc 10:203; the ``cuse`` kernel module).
CUSE_PATH = "/dev/cuse"
#: How long to wait for /dev/NAME to appear when devtmpfs does not create it at once (udev).
NODE_WAIT = 5.0


class DeviceError(OSError):
    """The character device could not be created or set up; the message says why."""


def retry(in_iovs: Sequence[tuple[int, int]] = (), out_iovs: Sequence[tuple[int, int]] = ()) -> IoctlReply:
    """An ioctl answer asking for the caller's memory: copy ``in_iovs`` in, ``out_iovs`` back.

    Each range is (address in the caller, length). The handler is called again with the
    in-ranges' bytes concatenated in ``req.in_data`` and ``req.out_size`` their out-ranges' total;
    its final :class:`~afuse.IoctlReply` data is scattered over the out-ranges in order.
    Only with unrestricted ioctls (see :func:`is_unrestricted`).
    """
    return IoctlReply(in_iovs=list(in_iovs), out_iovs=list(out_iovs))


def is_unrestricted(req: r.IoctlRequest) -> bool:
    """Whether ``req`` may be answered with :func:`retry` (CUSE_UNRESTRICTED_IOCTL in effect)."""
    return bool(req.flags & IOCTL_UNRESTRICTED)


def is_compat(req: r.IoctlRequest) -> bool:
    """Whether the caller is a 32-bit process on a 64-bit kernel (pointers and sizes are 32-bit)."""
    return bool(req.flags & IOCTL_COMPAT)


def _enosys() -> FUSEError:
    return FUSEError(errno.ENOSYS)


class DeviceOperations:
    """Base class of a character device: one async method per device operation.

    An operation that is not overridden answers ENOSYS (for POLL the kernel then stops asking and
    reports the device readable and writable; an ioctl's caller sees ENOTTY); ``open`` succeeds
    with file handle 0 and ``release`` succeeds. READ and WRITE are direct I/O: each read(2) or
    write(2) is one request, or several at increasing offsets from 0 when larger than
    ``max_read``/``max_write`` (a CUSE device has no file position). The kernel sends no FLUSH and
    no FSYNC to a CUSE server (its character-device file operations have neither: fsync(2) fails
    EINVAL), so there are no such methods.
    """

    def init(self, session: CuseSession) -> None:
        """Called once the device exists (after CUSE_INIT), before any request is served."""

    async def open(self, req: r.OpenRequest) -> Handle:
        """An open(2) of the device; ``req.flags`` are its flags. Return the file handle."""
        return Handle()

    async def read(self, req: r.ReadRequest) -> bytes:
        """read(2) of at most ``req.size`` bytes on ``req.fh``."""
        raise _enosys()

    async def write(self, req: r.WriteRequest) -> int:
        """write(2) of ``req.data`` on ``req.fh``; return how many bytes were taken."""
        raise _enosys()

    async def ioctl(self, req: r.IoctlRequest) -> IoctlReply:
        """ioctl(2) ``req.cmd`` with argument ``req.arg``; see :func:`retry` for the caller's memory."""
        raise _enosys()

    async def poll(self, req: r.PollRequest) -> int:
        """The ready events (POLLIN, ...) of ``req.fh`` among ``req.events``.

        If ``req.flags`` has POLL_SCHEDULE_NOTIFY, call :meth:`CuseSession.poll_wakeup` with
        ``req.kh`` when readiness changes.
        """
        raise _enosys()

    async def release(self, req: r.ReleaseRequest) -> None:
        """The last close of ``req.fh`` (its error, if any, is not seen by anyone)."""


def _overridden(ops: DeviceOperations, name: str) -> bool:
    return getattr(type(ops), name, None) is not getattr(DeviceOperations, name)


@attrs.define(eq=False)
class CuseChannel(Mount):
    """The /dev/cuse descriptor of a device, in the place of a mount (``mountpoint`` is /dev/NAME)."""

    def is_mounted(self) -> bool:
        """Whether the channel is still open."""
        return not self._closed

    def unmount(self, lazy: bool = False) -> None:
        """Nothing to unmount: closing the channel removes the device."""

    def connection_id(self) -> int:
        """CUSE connections are not in fusectl; use :meth:`CuseSession.abort`."""
        raise MountError(errno.ENOENT, "a CUSE device has no fusectl connection (see /sys/class/cuse)")


class CuseSession(Session):
    """A character device being served. Obtained from :func:`device` or ``nursery.start(serve_device, ...)``.

    ``mountpoint`` is the device node's path; ``fd`` the /dev/cuse channel (notifications go there).
    """

    # Hooks into Session (see docs/cuse.md, "Reusing the FUSE session"): start() does the CUSE_INIT
    # handshake instead of INIT and opens no clones; shutdown() does nothing (closing the channel
    # removes the device). run(), stop_readers() and close() are Session's, on the one channel fd.

    def __init__(self, ops: DeviceOperations, chan: CuseChannel, config: CuseConfig, readers: int,
                 max_requests: int) -> None:
        super().__init__(Operations(), chan, InitConfig(), readers, max_requests, private_clones=False)
        self.device_ops = ops
        self.cuse_config = config
        #: The outcome of CUSE_INIT (None before it).
        self.cuse_negotiated: CuseNegotiated | None = None
        self._install()

    @property
    def name(self) -> str:
        """The device's name (DEVNAME)."""
        return self.cuse_config.devname

    @property
    def path(self) -> str:
        """The device node, /dev/NAME."""
        return self.mount.mountpoint

    @property
    def sysfs(self) -> str:
        """The device's sysfs directory (``dev``, ``waiting``, ``abort``)."""
        return "/sys/class/cuse/" + self.name.replace("/", "!")

    @property
    def devno(self) -> int:
        """The device number (st_rdev of /dev/NAME), as the kernel registered it."""
        try:
            with open(self.sysfs + "/dev") as f:
                major, minor = f.read().split(":")
        except OSError as e:
            raise DeviceError(e.errno, f"the device {self.name!r} is not registered: {e}") from None
        return os.makedev(int(major), int(minor))

    async def poll_wakeup(self, kh: int) -> None:
        """Wake the pollers whose POLL request carried ``kh`` (FUSE_NOTIFY_POLL)."""
        from .notify import poll_wakeup

        await poll_wakeup(self, kh)

    def abort(self) -> None:
        """Abort the connection (sysfs ``abort``): callers get ENODEV, serving ends."""
        with open(self.sysfs + "/abort", "w") as f:
            f.write("1")

    # -- the handshake -----------------------------------------------------------------------

    async def start(self, takeover: Takeover | None = None) -> None:
        """Answer CUSE_INIT (the kernel creates the device), then ready the readers."""
        if takeover is not None:
            raise SessionError("a CUSE device cannot be taken over")
        set_nonblocking(self.mount.fd)
        with trio.fail_after(30):
            await self._cuse_handshake()
        self.pool.open([])  # /dev/cuse cannot be cloned: every reader shares the channel

    async def _cuse_handshake(self) -> None:
        fd = self.mount.fd
        buf = bytearray(8192)
        n = await read_one(fd, buf)
        if n is None:
            raise SessionError("the CUSE channel closed before CUSE_INIT")
        req = self.decoder.decode(memoryview(buf)[:n])
        if not isinstance(req, r.CuseInitRequest):
            raise SessionError(f"expected CUSE_INIT from the kernel, got {type(req).opcode.name}")
        try:
            neg = _negotiate(req, self.cuse_config)
        except CuseInitError as e:
            os.write(fd, replies.error(req.unique, errno.EPROTO))
            raise DeviceError(errno.EPROTO, str(e)) from None
        os.write(fd, encode_cuse_init_reply(req.unique, neg, self.cuse_config))
        # The kernel creates the device while taking the reply and aborts the channel if it can't.
        if _aborted(fd):
            if os.path.exists(self.sysfs):
                raise DeviceError(errno.EEXIST, f"a CUSE device named {self.name!r} already exists "
                                  f"({self.sysfs})")
            raise DeviceError(errno.EIO, f"the kernel refused to create the CUSE device {self.name!r} "
                              "(device number taken? see dmesg)")
        self.cuse_negotiated = neg
        self.pool.bufsize = max(neg.max_write, neg.max_read, IOCTL_MAX_TRANSFER) + 4096
        log.debug("CUSE_INIT: kernel 7.%d, negotiated 7.%d, %s ioctls, device %s", neg.kernel_minor,
                  neg.minor, "unrestricted" if neg.unrestricted_ioctl else "restricted", self.path)

    async def shutdown(self, grace: float = 5.0) -> None:
        """Nothing before closing: closing the channel removes the device."""

    # -- requests ------------------------------------------------------------------------------

    def _install(self) -> None:
        ops = self.device_ops
        reg: Callable[[type[r.Request], Callable[[Any], Awaitable[bytes | None]]], None]
        reg = self.dispatcher.register

        async def open_(req: r.OpenRequest) -> bytes:
            h = await ops.open(req)
            if type(h) is not Handle:
                raise HandlerResultError(f"open must return a Handle, not {type(h).__name__}")
            if h.backing_id:
                raise HandlerResultError("a CUSE device cannot use passthrough (backing_id)")
            return replies.open_(req.unique, h)

        async def read(req: r.ReadRequest) -> bytes:
            data = await ops.read(req)
            if not isinstance(data, bytes | bytearray | memoryview):
                raise HandlerResultError(f"read must return bytes, not {type(data).__name__}")
            if len(data) > req.size:
                raise HandlerResultError(f"read returned {len(data)} bytes for a request of {req.size}")
            return replies.data(req.unique, data)

        async def write(req: r.WriteRequest) -> bytes:
            n = await ops.write(req)
            if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= len(req.data):
                raise HandlerResultError(f"write must return a count from 0 to {len(req.data)}, not {n!r}")
            return replies.write(req.unique, n)

        async def ioctl(req: r.IoctlRequest) -> bytes:
            res = await ops.ioctl(req)
            if type(res) is not IoctlReply:
                raise HandlerResultError(f"ioctl must return an IoctlReply, not {type(res).__name__}")
            if res.in_iovs is not None or res.out_iovs is not None:
                if not is_unrestricted(req):
                    raise HandlerResultError(
                        f"ioctl {req.cmd:#x} answered with retry(), but this device's ioctls are restricted "
                        "(serve it with unrestricted_ioctl=True)")
                try:
                    return _encode_retry(req.unique, res.in_iovs or [], res.out_iovs or [])
                except ValueError as e:
                    raise HandlerResultError(f"ioctl {req.cmd:#x}: {e}") from None
            if len(res.data) > req.out_size:
                raise HandlerResultError(
                    f"ioctl {req.cmd:#x} returned {len(res.data)} bytes; the caller takes {req.out_size}"
                    + (" (ask for the caller's memory with retry() first)" if is_unrestricted(req) else ""))
            if not -(1 << 31) <= res.result < 1 << 31:
                raise HandlerResultError(f"ioctl result {res.result} is out of the int range")
            return replies.ioctl(req.unique, res)

        async def poll(req: r.PollRequest) -> bytes:
            revents = await ops.poll(req)
            if not isinstance(revents, int) or isinstance(revents, bool) or not 0 <= revents < 1 << 32:
                raise HandlerResultError(f"poll must return an event mask, not {revents!r}")
            return replies.poll(req.unique, revents)

        def empty(fn: Callable[[Any], Awaitable[None]]) -> Callable[[Any], Awaitable[bytes]]:
            async def op(req: r.Request) -> bytes:
                await fn(req)
                return replies.empty(req.unique)
            return op

        reg(r.OpenRequest, open_)
        reg(r.ReleaseRequest, empty(ops.release))
        for cls, name, fn in (
            (r.ReadRequest, "read", read), (r.WriteRequest, "write", write), (r.IoctlRequest, "ioctl", ioctl),
            (r.PollRequest, "poll", poll),
        ):
            if _overridden(ops, name):
                reg(cls, fn)


def _aborted(fd: int) -> bool:
    """Whether the kernel has aborted the channel (it then polls POLLERR)."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return any(ev & select.POLLERR for _fd, ev in p.poll(0))


def _open_channel(path: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise DeviceError(errno.ENOENT, f"{path} does not exist: this kernel has no CUSE (load it with "
                          "`modprobe cuse`)") from None
    except PermissionError:
        raise DeviceError(errno.EACCES, f"cannot open {path}: creating a CUSE device needs root") from None


async def _setup_node(session: CuseSession, mode: int | None, uid: int | None, gid: int | None) -> None:
    """Wait for /dev/NAME to be the new device, then set its mode and owner."""
    devno = session.devno
    path = session.path
    with trio.move_on_after(NODE_WAIT):
        while True:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                st = None
            if st is not None and (not stat.S_ISCHR(st.st_mode) or st.st_rdev != devno):
                await trio.sleep(0.5)  # another node there: give udev a moment to replace it
                st = os.stat(path)
                break
            if st is not None:
                break
            await trio.sleep(0.01)
    if st is None:
        raise DeviceError(errno.ENOENT, f"{path} did not appear within {NODE_WAIT} s (no devtmpfs or udev?)")
    if not stat.S_ISCHR(st.st_mode) or st.st_rdev != devno:
        raise DeviceError(errno.EEXIST, f"{path} already exists and is not this device "
                          f"({os.major(devno)}:{os.minor(devno)}); choose another name")
    if mode is not None:
        os.chmod(path, mode)
    if uid is not None or gid is not None:
        os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid)


async def serve_device(
    ops: DeviceOperations,
    name: str,
    *,
    mode: int | None = None,
    uid: int | None = None,
    gid: int | None = None,
    dev_major: int = 0,
    dev_minor: int = 0,
    unrestricted_ioctl: bool = True,
    max_read: int = 128 * 1024,
    max_write: int = 128 * 1024,
    readers: int = 2,
    max_requests: int = 64,
    warn_after: float | None = None,
    cuse_path: str = CUSE_PATH,
    task_status: trio.TaskStatus[CuseSession] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Create character device /dev/``name`` served by ``ops`` until cancelled or aborted.

    For ``await nursery.start(serve_device, ops, name)``: returns the :class:`CuseSession` once
    /dev/NAME exists with ``mode`` (e.g. 0o666) and owner ``uid``/``gid`` (defaults: the kernel's
    0600 root:root). ``dev_major`` 0 means a dynamically allocated major number. A request
    unanswered for ``warn_after`` seconds is logged (default never: a device's read may wait for
    data indefinitely). Cancelling
    removes the device. Raises :class:`DeviceError` with the reason when it cannot be created
    (no CUSE in this kernel, not root, a taken name or device number).
    """
    if mode is not None and not 0 <= mode <= 0o7777:
        raise ValueError(f"mode {mode:#o} is not a permission mode")
    try:
        config = CuseConfig(name, dev_major, dev_minor, unrestricted_ioctl, max_read, max_write)
    except CuseInitError as e:
        raise DeviceError(errno.EINVAL, str(e)) from None
    fd = _open_channel(cuse_path)
    chan = CuseChannel(fd, "/dev/" + name, MountOptions(), False)
    session = CuseSession(ops, chan, config, readers, max_requests)
    session.warn_after = warn_after
    current = _CURRENT.set(session)
    try:
        await session.start()
        await _setup_node(session, mode, uid, gid)
        ops.init(session)
        async with trio.open_nursery() as nursery:
            await nursery.start(session.run)
            task_status.started(session)
            try:
                await session.wait_closed()
            finally:
                session.stop_readers()
    finally:
        session.close()  # closes the channel: the kernel removes the device
        _CURRENT.reset(current)


@asynccontextmanager
async def device(ops: DeviceOperations, name: str, **kwargs: Any) -> AsyncIterator[CuseSession]:
    """Serve ``ops`` as /dev/``name`` for the duration of the ``async with`` block.

    Keyword arguments are those of :func:`serve_device`. Leaving the block removes the device.
    """
    started = False
    try:
        async with trio.open_nursery() as nursery:
            session: CuseSession = await nursery.start(_serve_kw, ops, name, kwargs)
            started = True
            try:
                yield session
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        if not started and len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


async def _serve_kw(ops: DeviceOperations, name: str, kwargs: dict[str, Any],
                    task_status: trio.TaskStatus[CuseSession] = trio.TASK_STATUS_IGNORED) -> None:
    await serve_device(ops, name, task_status=task_status, **kwargs)

