"""libc's mount(2) and umount2(2) through ctypes, for the device modules."""

from __future__ import annotations

import ctypes
import os

StrPath = str | os.PathLike[str]

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


def sys_mount(source: str, target: str, fstype: str, flags: int, data: str | None) -> int:
    """Call mount(2); return 0 or the errno."""
    res: int = _libc.mount(
        os.fsencode(source),
        os.fsencode(target),
        fstype.encode(),
        flags,
        None if data is None else os.fsencode(data),
    )
    return ctypes.get_errno() if res != 0 else 0


def sys_umount2(target: str, flags: int) -> int:
    """Call umount2(2); return 0 or the errno."""
    res: int = _libc.umount2(os.fsencode(target), flags)
    return ctypes.get_errno() if res != 0 else 0
