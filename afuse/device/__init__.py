"""The /dev/fuse device: opening, mounting, cloning, unmounting, aborting and ioctls.

Synchronous and trio-free; the session layer calls these from a thread or before it starts.
Mounting uses mount(2) when running as root and the setuid helper ``fusermount3`` otherwise.

By concern: ``options`` (``MountOptions``), ``mountinfo`` (/proc/self/mountinfo, connection
lookup), ``ioctls`` (the /dev/fuse fd, its ioctls, fusectl abort) and ``mounting`` (``Mount``,
mount(2), fusermount3, unmount, mountpoint checks). Every name is re-exported here.
"""

from __future__ import annotations

from afuse.errors import MountError

from ._sys import StrPath
from .ioctls import (
    DEVICE_PATH,
    FUSECTL_PATH,
    abort_connection,
    backing_close,
    backing_open,
    clone_device,
    open_device,
    set_nonblocking,
    sync_init,
)
from .mountinfo import MOUNTINFO_PATH, find_mounts
from .mounting import (
    AUTO_UNMOUNT_WAIT,
    MNT_DETACH,
    UMOUNT_NOFOLLOW,
    Mount,
    check_mountpoint,
    mount,
    resolve_mountpoint,
    unmount,
)
from .options import (
    MS_DIRSYNC,
    MS_LAZYTIME,
    MS_NOATIME,
    MS_NODEV,
    MS_NODIRATIME,
    MS_NOEXEC,
    MS_NOSUID,
    MS_RDONLY,
    MS_SYNCHRONOUS,
    MountOptions,
    raise_read_ahead,
    read_ahead_path,
)

__all__ = [
    "AUTO_UNMOUNT_WAIT",
    "DEVICE_PATH",
    "FUSECTL_PATH",
    "MNT_DETACH",
    "MOUNTINFO_PATH",
    "MS_DIRSYNC",
    "MS_LAZYTIME",
    "MS_NOATIME",
    "MS_NODEV",
    "MS_NODIRATIME",
    "MS_NOEXEC",
    "MS_NOSUID",
    "MS_RDONLY",
    "MS_SYNCHRONOUS",
    "UMOUNT_NOFOLLOW",
    "Mount",
    "MountError",
    "MountOptions",
    "StrPath",
    "abort_connection",
    "backing_close",
    "backing_open",
    "check_mountpoint",
    "clone_device",
    "find_mounts",
    "mount",
    "open_device",
    "raise_read_ahead",
    "read_ahead_path",
    "resolve_mountpoint",
    "set_nonblocking",
    "sync_init",
    "unmount",
]
