"""Mount options: ``MountOptions``, parsing an option string, and what mount(2) and fusermount3 are given."""

from __future__ import annotations

import errno
import os
import stat
from typing import Any, Final, Self

import attrs

from afuse.errors import MountError

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


#: Where the kernel lists backing device infos (a FUSE mount's is ``0:N``, N its connection).
BDI_PATH: Final = "/sys/class/bdi"


def read_ahead_path(connection: int) -> str:
    """The ``read_ahead_kb`` file of FUSE connection ``connection``'s bdi (OSError if none)."""
    for name in (f"0:{connection}", f"0:{connection}-fuseblk"):
        path = os.path.join(BDI_PATH, name, "read_ahead_kb")
        if os.path.exists(path):
            return path
    raise FileNotFoundError(errno.ENOENT, "no bdi for FUSE connection", f"{BDI_PATH}/0:{connection}")


def raise_read_ahead(connection: int, kib: int) -> int:
    """Raise connection ``connection``'s readahead window to ``kib`` KiB if it is smaller; return
    the window now in force (KiB). The kernel's INIT offers its default (128 KiB) and only lets a
    reply lower it; writing the bdi's ``read_ahead_kb`` needs root (OSError otherwise)."""
    path = read_ahead_path(connection)
    with open(path) as f:
        now = int(f.read())
    if now < kib:
        with open(path, "w") as f:
            f.write(f"{kib}\n")
        with open(path) as f:
            now = int(f.read())
    return now


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
