"""The /dev/fuse device: opening, mounting, cloning, unmounting, aborting and ioctls.

Synchronous and trio-free; the session layer calls these from a thread or before it starts.
Mounting uses mount(2) when running as root and the setuid helper ``fusermount3`` otherwise.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import shutil
import socket
import stat
import struct
import subprocess
import tempfile
from typing import Any, Final, Self

import attrs

from afuse.errors import MountError
from afuse.wire.constants import (
    FUSE_DEV_IOC_BACKING_CLOSE,
    FUSE_DEV_IOC_BACKING_OPEN,
    FUSE_DEV_IOC_CLONE,
    FUSE_DEV_IOC_SYNC_INIT,
)
from afuse.wire.structs import BACKING_MAP

__all__ = [
    "Mount",
    "MountOptions",
    "abort_connection",
    "backing_close",
    "backing_open",
    "check_mountpoint",
    "clone_device",
    "find_mounts",
    "mount",
    "open_device",
    "set_nonblocking",
    "sync_init",
    "unmount",
]

StrPath = str | os.PathLike[str]

DEVICE_PATH: Final = "/dev/fuse"
FUSECTL_PATH: Final = "/sys/fs/fuse/connections"
MOUNTINFO_PATH: Final = "/proc/self/mountinfo"

# <sys/mount.h>
MS_RDONLY: Final = 1
MS_NOSUID: Final = 2
MS_NODEV: Final = 4
MS_NOEXEC: Final = 8
MS_SYNCHRONOUS: Final = 16
MS_DIRSYNC: Final = 128
MS_NOATIME: Final = 1024
MS_NODIRATIME: Final = 2048
MS_LAZYTIME: Final = 1 << 25
MNT_DETACH: Final = 2
UMOUNT_NOFOLLOW: Final = 8

#: Seconds ``Mount.close`` waits for an auto_unmount fusermount3 to finish.
AUTO_UNMOUNT_WAIT: Final = 5.0

_U32: Final = struct.Struct("=I")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.mount.restype = ctypes.c_int
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.umount2.restype = ctypes.c_int


def _sys_mount(source: str, target: str, fstype: str, flags: int, data: str | None) -> int:
    """Call mount(2); return 0 or the errno."""
    res: int = _libc.mount(
        os.fsencode(source),
        os.fsencode(target),
        fstype.encode(),
        flags,
        None if data is None else os.fsencode(data),
    )
    return ctypes.get_errno() if res != 0 else 0


def _sys_umount2(target: str, flags: int) -> int:
    """Call umount2(2); return 0 or the errno."""
    res: int = _libc.umount2(os.fsencode(target), flags)
    return ctypes.get_errno() if res != 0 else 0


# --------------------------------------------------------------------------- options


def _parse_int(text: str, name: str, base: int = 10) -> int:
    try:
        return int(text, base)
    except ValueError:
        kind = "an octal" if base == 8 else "an"
        raise MountError(errno.EINVAL, f"mount option {name} needs {kind} integer, not {text!r}") from None


def _check_max_read(_inst: object, _attr: object, value: int | None) -> None:
    if value is not None and value < 4096:
        raise MountError(errno.EINVAL, f"max_read must be at least 4096, not {value}")


def _check_blksize(_inst: object, _attr: object, value: int | None) -> None:
    if value is not None and (value < 512 or value & (value - 1)):
        raise MountError(errno.EINVAL, f"blksize must be a power of two >= 512, not {value}")


_ROOT_TYPES: Final = frozenset(
    {stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK}
)


def _check_rootmode(_inst: object, _attr: object, value: int | None) -> None:
    if value is not None and (not 0 <= value <= 0o177777 or stat.S_IFMT(value) not in _ROOT_TYPES):
        raise MountError(
            errno.EINVAL,
            f"rootmode must be an octal file mode with a file type (40000 for a directory, "
            f"100000 for a regular file), not {oct(value)}",
        )


def _check_id(_inst: object, attr: attrs.Attribute[int | None], value: int | None) -> None:
    if value is not None and not 0 <= value < 0xFFFFFFFF:
        raise MountError(errno.EINVAL, f"{attr.name} must be a uid/gid between 0 and 4294967294, not {value}")


def _check_text(_inst: object, attr: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None and ("\0" in value or value == ""):
        raise MountError(errno.EINVAL, f"{attr.name} must be non-empty and free of NUL characters")


#: Boolean options of ``MountOptions.parse``: name -> (field, value).
_FLAG_OPTIONS: Final[dict[str, tuple[str, bool]]] = {
    "allow_other": ("allow_other", True),
    "default_permissions": ("default_permissions", True),
    "ro": ("ro", True),
    "rw": ("ro", False),
    "nosuid": ("nosuid", True),
    "suid": ("nosuid", False),
    "nodev": ("nodev", True),
    "dev": ("nodev", False),
    "noexec": ("noexec", True),
    "exec": ("noexec", False),
    "noatime": ("noatime", True),
    "atime": ("noatime", False),
    "nodiratime": ("nodiratime", True),
    "diratime": ("nodiratime", False),
    "sync": ("sync", True),
    "async": ("sync", False),
    "dirsync": ("dirsync", True),
    "lazytime": ("lazytime", True),
    "nolazytime": ("lazytime", False),
    "auto_unmount": ("auto_unmount", True),
}

#: Options of ``MountOptions.parse`` that take a value: name -> number base (0 for text).
_VALUE_OPTIONS: Final[dict[str, int]] = {
    "max_read": 10,
    "blksize": 10,
    "rootmode": 8,
    "user_id": 10,
    "group_id": 10,
    "fsname": 0,
    "subtype": 0,
    "blockdev": 0,
}

#: MountOptions fields that map to MS_* flags (fusermount3 knows them by the same names).
_MS_FIELDS: Final[tuple[tuple[str, int], ...]] = (
    ("ro", MS_RDONLY),
    ("nosuid", MS_NOSUID),
    ("nodev", MS_NODEV),
    ("noexec", MS_NOEXEC),
    ("noatime", MS_NOATIME),
    ("nodiratime", MS_NODIRATIME),
    ("sync", MS_SYNCHRONOUS),
    ("dirsync", MS_DIRSYNC),
    ("lazytime", MS_LAZYTIME),
)


def _split_options(text: str) -> list[str]:
    """Split at commas not escaped by a backslash; drop empty items and backslash escapes."""
    items: list[str] = []
    current: list[str] = []
    chars = iter(text)
    for ch in chars:
        if ch == "\\":
            current.append(next(chars, "\\"))
        elif ch == ",":
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    items.append("".join(current))
    return [item.strip() for item in items if item.strip()]


def _escape_option(value: str) -> str:
    return value.replace("\\", "\\\\").replace(",", "\\,")


@attrs.define
class MountOptions:
    """How to mount: kernel options, identity, MS_* flags and afuse/fusermount3 choices.

    ``rootmode`` defaults to the mountpoint's file type, ``user_id``/``group_id`` to ours;
    ``blksize`` needs ``blockdev`` (a fuseblk mount, root only); ``use_fusermount=None`` means
    fusermount3 unless running as root. ``auto_unmount`` needs fusermount3; fusermount3 before
    3.15 only auto-unmounts a user's mount if it also has ``allow_other`` (libfuse#586).
    """

    # kernel options
    allow_other: bool = False
    default_permissions: bool = False
    max_read: int | None = attrs.field(default=None, validator=_check_max_read)
    blksize: int | None = attrs.field(default=None, validator=_check_blksize)
    rootmode: int | None = attrs.field(default=None, validator=_check_rootmode)
    user_id: int | None = attrs.field(default=None, validator=_check_id)
    group_id: int | None = attrs.field(default=None, validator=_check_id)
    # identity
    fsname: str = attrs.field(default="afuse", validator=_check_text)
    subtype: str | None = attrs.field(default=None, validator=_check_text)
    # generic MS_* flags
    ro: bool = False
    nosuid: bool = False
    nodev: bool = False
    noexec: bool = False
    noatime: bool = False
    nodiratime: bool = False
    sync: bool = False
    dirsync: bool = False
    lazytime: bool = False
    # afuse / fusermount3
    auto_unmount: bool = False
    blockdev: str | None = attrs.field(default=None, validator=_check_text)
    use_fusermount: bool | None = None

    @classmethod
    def parse(cls, text: str) -> Self:
        """Parse a comma-separated option string such as ``"allow_other,max_read=65536,ro"``."""
        options = cls()
        for item in _split_options(text):
            name, eq, value = item.partition("=")
            name = name.strip()
            if name in _FLAG_OPTIONS:
                if eq:
                    raise MountError(errno.EINVAL, f"mount option {name} takes no value (got {item!r})")
                field, flag = _FLAG_OPTIONS[name]
                setattr(options, field, flag)
            elif name in _VALUE_OPTIONS:
                if not eq or not value:
                    raise MountError(errno.EINVAL, f"mount option {name} needs a value ({name}=...)")
                base = _VALUE_OPTIONS[name]
                setattr(options, name, _parse_int(value, name, base) if base else value)
            else:
                valid = sorted(_FLAG_OPTIONS) + sorted(f"{key}=" for key in _VALUE_OPTIONS)
                raise MountError(errno.EINVAL, f"unknown mount option {name!r}; valid options: {', '.join(valid)}")
        return options

    def kernel_data(self, fd: int, rootmode: int) -> str:
        """The mount(2) data string; ``rootmode`` is used unless the options set one."""
        if self.blksize is not None and self.blockdev is None:
            raise MountError(errno.EINVAL, "blksize is only valid for a fuseblk mount (set blockdev)")
        mode = self.rootmode if self.rootmode is not None else rootmode
        uid = self.user_id if self.user_id is not None else os.getuid()
        gid = self.group_id if self.group_id is not None else os.getgid()
        parts = [f"fd={fd}", f"rootmode={mode:o}", f"user_id={uid}", f"group_id={gid}"]
        if self.default_permissions:
            parts.append("default_permissions")
        if self.allow_other:
            parts.append("allow_other")
        if self.max_read is not None:
            parts.append(f"max_read={self.max_read}")
        if self.blksize is not None:
            parts.append(f"blksize={self.blksize}")
        return ",".join(parts)

    def ms_flags(self) -> int:
        """The MS_* flags word for mount(2)."""
        flags = 0
        for name, bit in _MS_FIELDS:
            if getattr(self, name):
                flags |= bit
        return flags

    def fusermount_options(self) -> str:
        """The ``-o`` argument for ``fusermount3`` (it adds fd, rootmode, user_id, group_id)."""
        parts = [f"fsname={_escape_option(self.fsname)}"]
        if self.subtype is not None:
            parts.append(f"subtype={_escape_option(self.subtype)}")
        if self.allow_other:
            parts.append("allow_other")
        if self.default_permissions:
            parts.append("default_permissions")
        if self.max_read is not None:
            parts.append(f"max_read={self.max_read}")
        parts.extend(name for name, _bit in _MS_FIELDS if getattr(self, name))
        if self.auto_unmount:
            parts.append("auto_unmount")
        return ",".join(parts)


# --------------------------------------------------------------------------- /proc parsing


_ESCAPE = re.compile(rb"\\([0-7]{3})")


def _unescape(field: bytes) -> str:
    return os.fsdecode(_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8) & 0xFF]), field))


@attrs.frozen
class _MountEntry:
    mountpoint: str
    fstype: str
    source: str
    dev: int  # kernel dev_t: major << 20 | minor


def _mountinfo() -> list[_MountEntry]:
    entries = []
    with open(MOUNTINFO_PATH, "rb") as f:
        for line in f:
            fields = line.rstrip(b"\n").split(b" ")
            try:
                sep = fields.index(b"-", 6)
                major, minor = (int(x) for x in fields[2].split(b":"))
                entries.append(
                    _MountEntry(
                        mountpoint=_unescape(fields[4]),
                        fstype=_unescape(fields[sep + 1]),
                        source=_unescape(fields[sep + 2]),
                        dev=(major << 20) | minor,
                    )
                )
            except (ValueError, IndexError):
                continue
    return entries


def _is_fuse_type(fstype: str) -> bool:
    return fstype.split(".", 1)[0] in ("fuse", "fuseblk")


def find_mounts(fstype_prefix: str = "fuse") -> list[tuple[str, str, str]]:
    """(mountpoint, fstype, source) of each mount whose type starts with ``fstype_prefix``.

    The control filesystem ``fusectl`` is listed only when asked for by that name.
    """
    return [
        (entry.mountpoint, entry.fstype, entry.source)
        for entry in _mountinfo()
        if entry.fstype.startswith(fstype_prefix) and (entry.fstype != "fusectl" or fstype_prefix.startswith("fusectl"))
    ]


def _fdinfo_connection(fd: int) -> int | None:
    try:
        with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
            for line in f:
                key, _, value = line.partition(b":")
                if key.strip() == b"fuse_connection":
                    return int(value)
    except (OSError, ValueError):
        pass
    return None


def _find_connection(fd: int, mountpoint: str) -> int | None:
    conn = _fdinfo_connection(fd)
    if conn is not None:
        return conn
    for entry in reversed(_mountinfo()):
        if entry.mountpoint == mountpoint and _is_fuse_type(entry.fstype):
            return entry.dev
    return None


# --------------------------------------------------------------------------- device


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


# --------------------------------------------------------------------------- mountpoint


def resolve_mountpoint(path: str) -> str:
    """Make ``path`` absolute and symlink-free without stat()ing a mount point.

    Stat on the root of a FUSE mount blocks until its daemon answers, so the last component is
    only followed (readlink) after making sure it is not a mount point.
    """
    path = os.path.abspath(path)
    mountpoints = {entry.mountpoint for entry in _mountinfo()}
    for _ in range(40):
        parent, name = os.path.split(path)
        path = os.path.join(os.path.realpath(parent), name)
        if path in mountpoints:
            return path
        try:
            target = os.readlink(path)
        except OSError:
            return path
        path = os.path.normpath(os.path.join(os.path.dirname(path), target))
    raise MountError(errno.ELOOP, f"too many symbolic links in mountpoint {path!r}")


def _check_mountpoint(path: str) -> os.stat_result:
    for entry in _mountinfo():
        if entry.mountpoint == path:
            hint = (
                f" (a FUSE mount, perhaps of a dead daemon: umount {path} / fusermount3 -u {path})"
                if _is_fuse_type(entry.fstype)
                else ""
            )
            raise MountError(
                errno.EBUSY, f"{path!r} is already a mount point{hint}: unmount it first or choose another one"
            )
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MountError(errno.ENOENT, f"mountpoint {path!r} does not exist") from None
    except OSError as exc:
        raise MountError(exc.errno or errno.EIO, f"cannot stat mountpoint {path!r}: {exc.strerror}") from None
    if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise MountError(errno.ENOTDIR, f"mountpoint {path!r} is not a directory or a regular file")
    return st


def check_mountpoint(mountpoint: StrPath) -> os.stat_result:
    """Stat ``mountpoint``; MountError unless it is an existing directory or file not mounted on.

    A mount point is recognised from /proc/self/mountinfo before anything touches it, so an
    unresponsive FUSE mount there fails with EBUSY instead of hanging.
    """
    return _check_mountpoint(resolve_mountpoint(os.fspath(mountpoint)))


# --------------------------------------------------------------------------- Mount


@attrs.define(eq=False)
class Mount:
    """A mounted FUSE filesystem and its session fd."""

    fd: int
    mountpoint: str
    options: MountOptions
    via_fusermount: bool
    _connection: int | None = None
    _sock: socket.socket | None = None
    _process: subprocess.Popen[bytes] | None = None
    _closed: bool = attrs.field(default=False, init=False)

    def connection_id(self) -> int:
        """The connection's number (its directory name under /sys/fs/fuse/connections)."""
        if self._connection is None:
            self._connection = _find_connection(self.fd, self.mountpoint) if not self._closed else None
        if self._connection is None:
            raise MountError(errno.ENOENT, f"cannot find the FUSE connection of {self.mountpoint!r}")
        return self._connection

    def is_mounted(self) -> bool:
        """Whether this connection is still mounted on ``mountpoint``."""
        try:
            conn: int | None = self.connection_id()
        except MountError:
            conn = None
        return any(
            entry.mountpoint == self.mountpoint and _is_fuse_type(entry.fstype) and (conn is None or entry.dev == conn)
            for entry in _mountinfo()
        )

    def unmount(self, lazy: bool = False) -> None:
        """Unmount (a no-op if already unmounted); EBUSY raises MountError suggesting ``lazy``.

        A non-lazy unmount of a fuseblk mount sends DESTROY and waits for its reply.
        """
        if not self.is_mounted():
            return
        try:
            _unmount(self.mountpoint, lazy, self.via_fusermount)
        except MountError:
            if self.is_mounted():
                raise

    def abort(self) -> None:
        """Abort the connection through fusectl: callers get ENOTCONN, the daemon ENODEV.

        (ECONNABORTED instead of ENODEV if FUSE_ABORT_ERROR was negotiated.)
        """
        abort_connection(self.connection_id())

    def close(self) -> None:
        """Close the session fd and, for auto_unmount, the fusermount3 socket (idempotent).

        Closing the last fd of a still-mounted connection aborts it (ENOTCONN until unmounted).
        """
        if self._closed:
            return
        self._closed = True
        try:
            os.close(self.fd)
        except OSError:
            pass
        if self._sock is not None:
            keep = _WATCHDOG_SOCKETS.pop(self._sock.fileno(), None)
            if keep is not None:
                keep.close()
            self._sock.close()
        if self._process is not None:
            try:
                self._process.wait(timeout=AUTO_UNMOUNT_WAIT)
            except subprocess.TimeoutExpired:
                pass


# --------------------------------------------------------------------------- mount


def mount(mountpoint: StrPath, options: MountOptions | None = None, *, device_fd: int | None = None) -> Mount:
    """Mount a FUSE filesystem on ``mountpoint``; the returned Mount owns the session fd.

    ``device_fd`` mounts an already-open /dev/fuse fd (e.g. after ``sync_init``) instead of
    opening one; it needs mount(2), and the caller keeps ownership if mounting fails.
    """
    opts = options if options is not None else MountOptions()
    path = resolve_mountpoint(os.fspath(mountpoint))
    st = _check_mountpoint(path)
    if stat.S_ISREG(st.st_mode) and opts.rootmode is None:
        raise MountError(
            errno.ENOTDIR,
            f"mountpoint {path!r} is not a directory; to mount a filesystem whose root is a file "
            f"on it, say so with rootmode=100000",
        )
    rootmode = opts.rootmode if opts.rootmode is not None else stat.S_IFMT(st.st_mode)
    if stat.S_ISDIR(rootmode) != stat.S_ISDIR(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a directory"
        raise MountError(
            errno.ENOTDIR,
            f"rootmode={rootmode:o} does not match mountpoint {path!r}, which is {kind} "
            f"(a directory needs rootmode=40000, a file 100000)",
        )
    if opts.blksize is not None and opts.blockdev is None:
        raise MountError(errno.EINVAL, "blksize is only valid for a fuseblk mount (set blockdev)")
    use_fusermount = opts.use_fusermount if opts.use_fusermount is not None else os.geteuid() != 0
    if use_fusermount:
        if device_fd is not None:
            raise MountError(errno.EINVAL, "device_fd needs mount(2); fusermount3 opens its own fd")
        return _mount_fusermount(path, opts, st)
    return _mount_direct(path, opts, rootmode, device_fd)


def _mount_direct(path: str, opts: MountOptions, rootmode: int, device_fd: int | None) -> Mount:
    if opts.auto_unmount:
        raise MountError(errno.EINVAL, "auto_unmount works only through fusermount3: set use_fusermount=True")
    if opts.blockdev is not None:
        try:
            is_block = stat.S_ISBLK(os.stat(opts.blockdev).st_mode)
        except OSError as exc:
            raise MountError(exc.errno or errno.EIO, f"blockdev {opts.blockdev!r}: {exc.strerror}") from None
        if not is_block:
            raise MountError(errno.ENOTBLK, f"blockdev {opts.blockdev!r} is not a block device")
    fd = open_device() if device_fd is None else device_fd
    try:
        data = opts.kernel_data(fd, rootmode)
        base = "fuse" if opts.blockdev is None else "fuseblk"
        fstype = base if opts.subtype is None else f"{base}.{opts.subtype}"
        source = opts.fsname if opts.blockdev is None else opts.blockdev
        flags = opts.ms_flags()
        err = _sys_mount(source, path, fstype, flags, data)
        if err == errno.ENODEV and opts.subtype is not None:
            # A kernel without subtype support: libfuse's fallback puts it into the source.
            fallback = source if opts.blockdev is not None else f"{opts.subtype}#{opts.fsname}"
            err = _sys_mount(fallback, path, base, flags, data)
        if err:
            raise _mount_error(err, path, fstype, source, data, flags)
    except BaseException:
        if device_fd is None:
            os.close(fd)
        raise
    return Mount(
        fd=fd,
        mountpoint=path,
        options=opts,
        via_fusermount=False,
        connection=_find_connection(fd, path),
    )


def _mount_error(err: int, path: str, fstype: str, source: str, data: str, flags: int) -> MountError:
    what = f"mount(2) of {fstype} on {path!r}"
    hints = {
        errno.EINVAL: f"{what} rejected the options: data={data!r}, flags={flags:#x}",
        errno.EPERM: f"{what} needs CAP_SYS_ADMIN: run as root or mount through fusermount3 (use_fusermount=True)",
        errno.EACCES: f"{what}: permission denied (source {source!r})",
        errno.ENOTDIR: f"{what}: the root's type (rootmode in {data!r}) does not match the mountpoint",
        errno.EBUSY: f"{what}: the mountpoint or device is busy (already mounted?)",
        errno.ENODEV: f"{what}: the kernel does not know {fstype}; load the module (modprobe fuse)",
        errno.ENOTBLK: f"{what}: {source!r} is not a block device",
        errno.ENOENT: f"{what}: {path!r} or {source!r} does not exist",
    }
    return MountError(err, hints.get(err, f"{what} failed: {os.strerror(err)} (data={data!r})"))


def _fusermount() -> str:
    prog = shutil.which("fusermount3")
    if prog is None:
        raise MountError(errno.ENOENT, "fusermount3 not found: install fuse3 (apt install fuse3) or mount as root")
    return prog


def _fusermount_errno(text: str) -> int:
    lowered = text.lower()
    for needle, code in (
        ("busy", errno.EBUSY),
        ("not found in", errno.EINVAL),
        ("not mounted", errno.EINVAL),
        ("permission denied", errno.EPERM),
        ("not owned by", errno.EPERM),
        ("no write access", errno.EACCES),
        ("only allowed if", errno.EPERM),
        ("no such file", errno.ENOENT),
        ("unknown option", errno.EINVAL),
        ("too many", errno.EMFILE),
    ):
        if needle in lowered:
            return code
    return errno.EIO


def _mount_fusermount(path: str, opts: MountOptions, st: os.stat_result) -> Mount:
    if opts.blockdev is not None:
        raise MountError(errno.EINVAL, "blockdev needs mount(2) as root; fusermount3 refuses it for users")
    if opts.rootmode is not None and stat.S_IFMT(opts.rootmode) != stat.S_IFMT(st.st_mode):
        raise MountError(errno.EINVAL, "fusermount3 takes rootmode from the mountpoint; leave rootmode unset")
    if opts.user_id not in (None, os.getuid()) or opts.group_id not in (None, os.getgid()):
        raise MountError(errno.EINVAL, "fusermount3 mounts with the caller's uid/gid; leave user_id/group_id unset")
    prog = _fusermount()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with tempfile.TemporaryFile() as errlog:
        try:
            env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
            try:
                process = subprocess.Popen(
                    [prog, "-o", opts.fusermount_options(), "--", path],
                    env=env,
                    pass_fds=(theirs.fileno(),),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=errlog,
                )
            except OSError as exc:
                raise MountError(exc.errno or errno.EIO, f"cannot run {prog}: {exc.strerror}") from None
            finally:
                theirs.close()
            try:
                _msg, fds, _flags, _addr = socket.recv_fds(ours, 1, 1, socket.MSG_CMSG_CLOEXEC)
            except OSError:
                fds = []
            if not fds:
                code = process.wait()
                errlog.seek(0)
                text = errlog.read().decode(errors="replace").strip()
                hint = " (this fusermount3 does not know it: drop it)" if "unknown option" in text else ""
                raise MountError(
                    _fusermount_errno(text),
                    f"fusermount3 could not mount {path!r} (exit {code}): {text or 'no message'}{hint}",
                )
        except BaseException:
            ours.close()
            raise
    fd = fds[0]
    for extra in fds[1:]:
        os.close(extra)
    if not opts.auto_unmount:
        process.wait()
        ours.close()
        return Mount(fd=fd, mountpoint=path, options=opts, via_fusermount=True, connection=_find_connection(fd, path))
    # fusermount3 stays, holding its end of the socket; EOF on it makes it unmount a dead mount.
    connection = _find_connection(fd, path)
    if os.geteuid() != 0 and not opts.allow_other and _fusermount_version(prog) < (3, 15) and connection:
        # fusermount3 before 3.15 checks the dead mount by opening it as root, which a mount
        # without allow_other refuses (libfuse issue #586), so it never unmounts: watch ourselves.
        _start_watchdog(ours, path, connection)
    return Mount(
        fd=fd,
        mountpoint=path,
        options=opts,
        via_fusermount=True,
        connection=connection,
        sock=ours,
        process=process,
    )


# sh -c SCRIPT sh PATH DEV ESCAPED: wait for EOF on stdin (the daemon is gone), then unmount
# lazily if that connection is still mounted there.
_WATCHDOG = (
    'while read -r _; do :; done; '
    'if D="$2" P="$3" awk \'$3 == ENVIRON["D"] && $5 == ENVIRON["P"] {f = 1} END {exit !f}\' '
    '/proc/self/mountinfo; '
    'then exec fusermount3 -u -z -- "$1"; fi'
)


def _fusermount_version(prog: str) -> tuple[int, ...]:
    out = subprocess.run([prog, "-V"], capture_output=True, text=True, check=False).stdout
    try:
        return tuple(int(x) for x in out.rsplit(" ", 1)[-1].strip().split("."))
    except ValueError:
        return (0,)


def _start_watchdog(sock: socket.socket, path: str, connection: int) -> None:
    """A process, in its own session, that lazily unmounts ``path`` once ``sock``'s peer end
    (kept by this process) is closed and the same connection is still mounted there."""
    keep, watch = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    subprocess.Popen(
        ["/bin/sh", "-c", _WATCHDOG, "sh", path, f"0:{connection}", _escape_mountinfo(path)],
        stdin=watch.fileno(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, close_fds=True,
    )
    watch.close()
    # Tie the watchdog's lifetime to ``sock`` (closed by Mount.close or by our death).
    _WATCHDOG_SOCKETS[sock.fileno()] = keep


_WATCHDOG_SOCKETS: dict[int, socket.socket] = {}


def _escape_mountinfo(path: str) -> str:
    """``path`` as /proc/self/mountinfo writes it."""
    return path.replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011").replace("\n", "\\012")


# --------------------------------------------------------------------------- unmount / abort


def _unmount(mountpoint: str, lazy: bool, via_fusermount: bool) -> None:
    if via_fusermount:
        prog = _fusermount()
        args = [prog, "-u", "-z", "--", mountpoint] if lazy else [prog, "-u", "--", mountpoint]
        result = subprocess.run(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False
        )
        if result.returncode != 0:
            text = result.stderr.decode(errors="replace").strip()
            code = _fusermount_errno(text)
            hint = "; try a lazy unmount (lazy=True / fusermount3 -uz)" if code == errno.EBUSY else ""
            raise MountError(code, f"fusermount3 could not unmount {mountpoint!r}: {text}{hint}")
        return
    err = _sys_umount2(mountpoint, UMOUNT_NOFOLLOW | (MNT_DETACH if lazy else 0))
    if err == errno.EBUSY:
        raise MountError(
            err,
            f"{mountpoint!r} is busy (open files or a working directory inside); close them "
            f"or unmount lazily (lazy=True)",
        )
    if err == errno.EINVAL:
        raise MountError(err, f"{mountpoint!r} is not a mount point")
    if err == errno.EPERM:
        raise MountError(err, f"unmounting {mountpoint!r} needs root; as a user use fusermount3 -u")
    if err:
        raise MountError(err, f"cannot unmount {mountpoint!r}: {os.strerror(err)}")


def unmount(mountpoint: StrPath, lazy: bool = False) -> None:
    """Unmount by path: umount2(2) as root, ``fusermount3 -u [-z]`` otherwise."""
    _unmount(os.path.abspath(os.fspath(mountpoint)), lazy, os.geteuid() != 0)


def _fusectl_mounted() -> bool:
    return any(e.mountpoint == FUSECTL_PATH and e.fstype == "fusectl" for e in _mountinfo())


def abort_connection(connection_id: int) -> None:
    """Abort a FUSE connection by writing to its fusectl ``abort`` file (mounting fusectl if needed)."""
    target = f"{FUSECTL_PATH}/{connection_id}/abort"
    if not os.path.exists(target) and not _fusectl_mounted():
        err = _sys_mount("fusectl", FUSECTL_PATH, "fusectl", 0, None)
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
