"""Errors of the sans-IO layer (re-exported by :mod:`afuse.errors` and :mod:`afuse.dispatch`)."""

from __future__ import annotations


class NotNegotiated(RuntimeError):
    """A feature was used that the kernel does not offer or the session did not negotiate."""


class HandlerResultError(TypeError):
    """A handler returned something that cannot be encoded as the operation's reply."""
