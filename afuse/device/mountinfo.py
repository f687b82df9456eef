"""Reading /proc: mounts from /proc/self/mountinfo, and the FUSE connection behind an fd or mountpoint."""

from __future__ import annotations

import os
import re
from typing import Final

import attrs

MOUNTINFO_PATH: Final = "/proc/self/mountinfo"

_ESCAPE = re.compile(rb"\\([0-7]{3})")


def _unescape(field: bytes) -> str:
    return os.fsdecode(_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8) & 0xFF]), field))


@attrs.frozen
class MountEntry:
    """One line of /proc/self/mountinfo: where, what type, from what, and the superblock's dev_t."""

    mountpoint: str
    fstype: str
    source: str
    dev: int  # kernel dev_t: major << 20 | minor


def read_mountinfo() -> list[MountEntry]:
    """The mounts of this process's mount namespace, in mount order (unparseable lines skipped)."""
    entries = []
    with open(MOUNTINFO_PATH, "rb") as f:
        for line in f:
            fields = line.rstrip(b"\n").split(b" ")
            try:
                sep = fields.index(b"-", 6)
                major, minor = (int(x) for x in fields[2].split(b":"))
                entries.append(
                    MountEntry(
                        mountpoint=_unescape(fields[4]),
                        fstype=_unescape(fields[sep + 1]),
                        source=_unescape(fields[sep + 2]),
                        dev=(major << 20) | minor,
                    )
                )
            except (ValueError, IndexError):
                continue
    return entries


def is_fuse_type(fstype: str) -> bool:
    """Whether ``fstype`` is ``fuse``/``fuseblk``, with or without a ``.subtype``."""
    return fstype.split(".", 1)[0] in ("fuse", "fuseblk")


def find_mounts(fstype_prefix: str = "fuse") -> list[tuple[str, str, str]]:
    """(mountpoint, fstype, source) of each mount whose type starts with ``fstype_prefix``.

    The control filesystem ``fusectl`` is listed only when asked for by that name.
    """
    return [
        (entry.mountpoint, entry.fstype, entry.source)
        for entry in read_mountinfo()
        if entry.fstype.startswith(fstype_prefix) and (entry.fstype != "fusectl" or fstype_prefix.startswith("fusectl"))
    ]


def fdinfo_connection(fd: int) -> int | None:
    """The connection number of /dev/fuse ``fd`` from /proc/self/fdinfo (None on older kernels)."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
            for line in f:
                key, _, value = line.partition(b":")
                if key.strip() == b"fuse_connection":
                    return int(value)
    except (OSError, ValueError):
        pass
    return None


def find_connection(fd: int, mountpoint: str) -> int | None:
    """The connection number of ``fd``, else of the last FUSE mount on ``mountpoint``, else None."""
    conn = fdinfo_connection(fd)
    if conn is not None:
        return conn
    for entry in reversed(read_mountinfo()):
        if entry.mountpoint == mountpoint and is_fuse_type(entry.fstype):
            return entry.dev
    return None


def escape_mountinfo(path: str) -> str:
    """``path`` as /proc/self/mountinfo writes it."""
    return path.replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011").replace("\n", "\\012")
