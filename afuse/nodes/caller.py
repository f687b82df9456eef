"""Who is asking: the credentials of the request a node method serves."""

from __future__ import annotations

import contextvars
import functools
import os
import stat
from collections.abc import Callable

from ..wire import requests as r

__all__ = ["Caller", "current_caller"]


class Caller:
    """The process behind a request: fsuid, fsgid, pid and supplementary groups.

    ``groups`` comes from the request itself when the kernel sent them (FUSE_EXT_GROUPS with
    ``InitConfig(create_supp_group=True)``, on creating requests), else from ``/proc/PID/status``
    (read once, on first use; empty for kernel-internal requests or a vanished process).
    """

    __slots__ = ("_groups", "gid", "pid", "uid")

    def __init__(self, uid: int, gid: int, pid: int, groups: tuple[int, ...] | None = None) -> None:
        self.uid = uid
        self.gid = gid
        self.pid = pid
        self._groups = groups

    @classmethod
    def of(cls, req: r.Request) -> Caller:
        """The caller of ``req``."""
        supp = getattr(req, "supp_groups", None)
        return cls(req.uid, req.gid, req.pid, tuple(supp) if supp else None)

    @property
    def groups(self) -> tuple[int, ...]:
        """Supplementary group ids (the primary ``gid`` is not repeated unless the process has it)."""
        if self._groups is None:
            self._groups = _proc_groups(self.pid)
        return self._groups

    def in_group(self, gid: int) -> bool:
        """True if ``gid`` is the caller's fsgid or one of its supplementary groups."""
        return gid == self.gid or gid in self.groups

    def may(self, mode: int, uid: int, gid: int, mask: int) -> bool:
        """POSIX permission check of ``mask`` (R_OK|W_OK|X_OK bits) against a file's mode and owner.

        uid 0 passes read/write always and execute if any execute bit is set (or on directories).
        """
        mask &= 7
        if self.uid == 0:
            return not mask & os.X_OK or stat.S_ISDIR(mode) or bool(mode & 0o111)
        if self.uid == uid:
            bits = (mode >> 6) & 7
        elif self.in_group(gid):
            bits = (mode >> 3) & 7
        else:
            bits = mode & 7
        return mask & bits == mask

    def __repr__(self) -> str:
        return f"<Caller uid={self.uid} gid={self.gid} pid={self.pid} groups={self._groups}>"


def _proc_groups(pid: int) -> tuple[int, ...]:
    if pid <= 0:
        return ()
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Groups:"):
                    return tuple(int(g) for g in line.split()[1:])
    except OSError:
        pass
    return ()


#: The request being served, replaced by its Caller once a node asks (most requests never do).
_CALLER: contextvars.ContextVar[Caller | r.Request] = contextvars.ContextVar("afuse_caller")
_NOBODY = Caller(0, 0, 0, ())


def current_caller() -> Caller:
    """The :class:`Caller` of the request being served (uid/gid/pid 0 outside a request)."""
    c = _CALLER.get(_NOBODY)
    if isinstance(c, Caller):
        return c
    caller = Caller.of(c)
    _CALLER.set(caller)  # kept for the rest of the request: /proc is read at most once
    return caller


#: The caller's ``uid`` and ``gid`` (and ``pid``) as attributes, without building a :class:`Caller`
#: (``_CALLER.get`` itself: no Python frame on the hot path).
_ids: Callable[[], Caller | r.Request] = functools.partial(_CALLER.get, _NOBODY)

#: Make ``req`` the request being served (``_CALLER.set`` itself: no Python frame on every request).
_enter: Callable[[r.Request], object] = _CALLER.set
