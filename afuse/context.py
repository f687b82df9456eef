"""The context of one request while it is served.

A :class:`RequestContext` carries what a request owns from the moment it is read until its
reply has been written: its ``unique``, the descriptor it came from (its reply goes there), the
cancel scope INTERRUPT cancels, and callbacks to run once the reply has been written or has
failed to be (resources such as passthrough backing references). :func:`current_request`
returns it inside a handler, and in tasks and threads the handler starts.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from .errors import SessionError

if TYPE_CHECKING:
    import trio

    from .wire.connection import Connection
    from .wire.requests import Request

log = logging.getLogger("afuse")

__all__ = ["RequestContext", "current_request"]

_CURRENT: contextvars.ContextVar[RequestContext] = contextvars.ContextVar("afuse_request")


class RequestContext:
    """One request being served (see the module docstring)."""

    __slots__ = ("callbacks", "connection", "fd", "handling", "request", "scope")

    def __init__(self, connection: Connection | None, request: Request, fd: int,
                 scope: trio.CancelScope | None = None) -> None:
        #: The connection the request came on (its session: :func:`afuse.current_session`).
        self.connection = connection
        self.request = request
        #: The descriptor the request was read from; its reply is written there.
        self.fd = fd
        #: The cancel scope an INTERRUPT of this request cancels.
        self.scope = scope
        #: True while the handler runs (resources taken then belong to the request).
        self.handling = True
        #: What :meth:`after_reply` registered (None: nothing).
        self.callbacks: list[Callable[[bool], None]] | None = None

    @property
    def unique(self) -> int:
        """The request's ``unique``."""
        return self.request.unique

    def after_reply(self, fn: Callable[[bool], None]) -> None:
        """Call ``fn(written)`` once the reply has been written (True) or could not be (False)."""
        if self.callbacks is None:
            self.callbacks = []
        self.callbacks.append(fn)

    def finish(self, written: bool) -> None:
        """The reply was written (or not, or there is none): run the :meth:`after_reply` callbacks."""
        after, self.callbacks = self.callbacks, None
        if after:
            for fn in after:
                try:
                    fn(written)
                except Exception as exc:  # a resource's cleanup must not stop serving
                    log.error("cleanup after the reply to unique %d failed", self.unique, exc_info=exc)

    def enter(self) -> contextvars.Token[RequestContext]:
        """Make this the current request of the calling task."""
        return _CURRENT.set(self)


def current_request() -> RequestContext:
    """The request being served by the calling handler (or a task or thread it started).

    Raises :class:`~afuse.errors.SessionError` outside a handler.
    """
    try:
        return _CURRENT.get()
    except LookupError:
        raise SessionError("no afuse request is being served in this context") from None


def current_request_or_none() -> RequestContext | None:
    """Like :func:`current_request`, None outside a handler."""
    return _CURRENT.get(None)
