"""Exceptions of afuse."""

from __future__ import annotations

import errno as _errno
import os

from .wire.errors import NotNegotiated

__all__ = ["FUSEError", "MountError", "NotNegotiated", "SessionError"]


class FUSEError(Exception):
    """Raise from a handler to answer the request with ``errno`` (a positive errno value)."""

    def __init__(self, errno: int, message: str | None = None) -> None:
        if not isinstance(errno, int) or not 0 < errno < 512:
            raise ValueError(f"FUSEError needs a positive errno below 512, not {errno!r}")
        super().__init__(errno, message or os.strerror(errno))
        self.errno = errno

    def __str__(self) -> str:
        name = _errno.errorcode.get(self.errno, str(self.errno))
        return f"[{name}] {self.args[1]}"


class MountError(OSError):
    """Mounting or unmounting failed; the message says why and what to do."""


class SessionError(RuntimeError):
    """The FUSE session cannot continue (a failed INIT, an aborted connection)."""
