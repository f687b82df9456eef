"""The /dev/fuse descriptor: opening and cloning it, its ioctls, and aborting a connection through fusectl."""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from typing import Final

from afuse.errors import MountError
from afuse.wire.constants import (
    FUSE_DEV_IOC_BACKING_CLOSE,
    FUSE_DEV_IOC_BACKING_OPEN,
    FUSE_DEV_IOC_CLONE,
    FUSE_DEV_IOC_SYNC_INIT,
)
from afuse.wire.structs import BACKING_MAP

from ._sys import StrPath, sys_mount
from .mountinfo import read_mountinfo

DEVICE_PATH: Final = "/dev/fuse"
FUSECTL_PATH: Final = "/sys/fs/fuse/connections"

_U32: Final = struct.Struct("=I")


def open_device(path: StrPath = DEVICE_PATH) -> int:
    """Open the FUSE device read-write and close-on-exec; return the fd."""
    name = os.fspath(path)
    try:
        return os.open(name, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise MountError(
            errno.ENOENT,
            f"{name} does not exist: load the FUSE module (modprobe fuse) or create the node (mknod {name} c 10 229)",
        ) from None
    except PermissionError as exc:
        raise MountError(
            exc.errno,
            f"no permission to open {name}: it is usually mode 0666 (crw-rw-rw-); "
            f"fix its permissions, run as root, or mount through fusermount3",
        ) from None
    except OSError as exc:
        if exc.errno in (errno.ENODEV, errno.ENXIO):
            raise MountError(exc.errno, f"{name} has no driver: load the FUSE module (modprobe fuse)") from None
        raise MountError(exc.errno or errno.EIO, f"cannot open {name}: {exc.strerror}") from None


def clone_device(session_fd: int, path: StrPath = DEVICE_PATH) -> int:
    """Open a new fd on the same FUSE connection as ``session_fd`` (with its own request queue)."""
    fd = open_device(path)
    try:
        fcntl.ioctl(fd, FUSE_DEV_IOC_CLONE, bytearray(_U32.pack(session_fd)), True)
    except OSError as exc:
        os.close(fd)
        raise MountError(exc.errno or errno.EIO, f"cannot clone FUSE session fd {session_fd}: {exc.strerror}") from None
    return fd


def set_nonblocking(fd: int) -> None:
    """Put ``fd`` in O_NONBLOCK mode (reads fail EAGAIN when no request is queued)."""
    os.set_blocking(fd, False)


def backing_open(session_fd: int, backing_fd: int) -> int:
    """Register ``backing_fd`` for passthrough; return its backing id (OSError on failure)."""
    arg = bytearray(BACKING_MAP.pack(backing_fd, 0, 0))
    backing_id: int = fcntl.ioctl(session_fd, FUSE_DEV_IOC_BACKING_OPEN, arg, True)
    return backing_id


def backing_close(session_fd: int, backing_id: int) -> None:
    """Unregister a passthrough backing id (OSError on failure)."""
    fcntl.ioctl(session_fd, FUSE_DEV_IOC_BACKING_CLOSE, bytearray(_U32.pack(backing_id)), True)


def sync_init(fd: int) -> bool:
    """Make the next mount of the unmounted ``fd`` wait for INIT; False if the kernel lacks it.

    Until that mount, read() and even poll() on ``fd`` block (poll ignores its timeout).
    """
    try:
        fcntl.ioctl(fd, FUSE_DEV_IOC_SYNC_INIT, 0)
    except OSError as exc:
        if exc.errno == errno.ENOTTY:
            return False
        raise
    return True


def _fusectl_mounted() -> bool:
    return any(e.mountpoint == FUSECTL_PATH and e.fstype == "fusectl" for e in read_mountinfo())


def abort_connection(connection_id: int) -> None:
    """Abort a FUSE connection by writing to its fusectl ``abort`` file (mounting fusectl if needed)."""
    target = f"{FUSECTL_PATH}/{connection_id}/abort"
    if not os.path.exists(target) and not _fusectl_mounted():
        err = sys_mount("fusectl", FUSECTL_PATH, "fusectl", 0, None)
        if err == errno.EPERM:
            raise MountError(
                err, f"fusectl is not mounted and mounting it needs root (mount -t fusectl none {FUSECTL_PATH})"
            )
        if err and err != errno.EBUSY:
            raise MountError(err, f"cannot mount fusectl on {FUSECTL_PATH}: {os.strerror(err)}")
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise MountError(errno.ENOENT, f"no FUSE connection {connection_id} in {FUSECTL_PATH}") from None
    except OSError as exc:
        raise MountError(exc.errno or errno.EIO, f"cannot open {target}: {exc.strerror}") from None
    try:
        os.write(fd, b"1")
    finally:
        os.close(fd)
