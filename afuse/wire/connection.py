"""One FUSE connection's protocol state, sans-IO: bytes in, objects out, and back.

A :class:`Connection` takes the kernel's INIT and returns the reply, turns request bytes into
request objects, turns a handler's result into reply bytes (checked against the opcode's reply
shape and the negotiated state, raising :class:`~afuse.wire.errors.HandlerResultError` before
any bytes exist), and encodes notifications after checking the kernel can take them. It holds
what was negotiated, its own opcode table (:meth:`register` adds opcodes to this connection
only) and the default cache timeouts. It never touches a file descriptor::

    conn = Connection(InitConfig())
    step = conn.init(first_message)        # InitStep: reply bytes, and the outcome
    os.write(fd, step.reply)
    req = conn.decode(os.read(fd, conn.negotiated.read_buffer_size))
    os.write(fd, conn.reply(req, attr))     # e.g. for a GetattrRequest
"""

from __future__ import annotations

import errno as _errno
from collections.abc import Sequence
from typing import Any

import attrs

from . import notify as _notify
from . import replies
from . import requests as r
from .constants import KERNEL_VERSION, InitFlag
from .decoder import Decoder
from .errors import HandlerResultError, NotNegotiated
from .init import InitConfig, InitError, Negotiated, encode_init_reply, encode_version_reply, negotiate
from .opcodes import OpSpec
from .results import ENCODERS, DirWriter

__all__ = ["Connection", "InitStep"]


@attrs.frozen
class InitStep:
    """What to do with one INIT: write ``reply``; then serve (``negotiated``), fail (``error``),
    or read the next INIT (neither: the kernel spoke a newer major and was told ours)."""

    reply: bytes
    negotiated: Negotiated | None = None
    error: str | None = None


class Connection:
    """The protocol state of one FUSE connection (see the module docstring)."""

    __slots__ = ("attr_timeout", "config", "decoder", "entry_timeout", "negotiated")

    def __init__(self, config: InitConfig | None = None, *, entry_timeout: float = 1.0,
                 attr_timeout: float = 1.0) -> None:
        self.config = config or InitConfig()
        self.decoder = Decoder()
        #: The outcome of INIT (None before it).
        self.negotiated: Negotiated | None = None
        #: Cache timeouts for replies whose values leave theirs unset (seconds).
        self.entry_timeout = float(entry_timeout)
        self.attr_timeout = float(attr_timeout)

    # -- INIT ------------------------------------------------------------------------------

    def init(self, data: bytes | bytearray | memoryview, wanted: InitFlag | None = None) -> InitStep:
        """Answer the kernel's INIT; ``wanted`` overrides ``config.wanted_flags()``.

        Raises :class:`~afuse.wire.requests.ProtocolError` for bytes that are not a request.
        """
        req = self.decoder.decode(data)
        if not isinstance(req, r.InitRequest):
            return InitStep(replies.error(req.unique, _errno.EIO),
                            error=f"expected INIT from the kernel, got {type(req).opcode.name}")
        if req.major > KERNEL_VERSION:
            return InitStep(encode_version_reply(req.unique))
        try:
            neg = negotiate(req, self.config, wanted)
        except InitError as e:
            return InitStep(replies.error(req.unique, _errno.EPROTO), error=str(e))
        self.adopt(neg)
        return InitStep(encode_init_reply(req.unique, neg), negotiated=neg)

    def adopt(self, neg: Negotiated) -> None:
        """Serve with ``neg``: just negotiated, or taken over from an earlier daemon."""
        self.negotiated = neg
        self.decoder.setxattr_ext = neg.has(InitFlag.SETXATTR_EXT)

    def has(self, flag: InitFlag) -> bool:
        """True if ``flag`` was negotiated."""
        neg = self.negotiated
        return neg is not None and bool(neg.flags & flag)

    def require(self, flag: InitFlag, what: str) -> None:
        """Raise :class:`NotNegotiated` unless ``flag`` was negotiated."""
        if not self.has(flag):
            offered = self.negotiated is not None and bool(self.negotiated.offered & flag)
            why = "was not asked for" if offered else "is not offered by this kernel"
            raise NotNegotiated(f"{what} needs {flag.name}, which {why}")

    def require_minor(self, minor: int, what: str) -> None:
        """Raise :class:`NotNegotiated` unless protocol 7.``minor`` or newer is in force."""
        neg = self.negotiated
        if neg is None or neg.minor < minor:
            have = f"{KERNEL_VERSION}.{neg.minor}" if neg else "nothing yet (no session)"
            raise NotNegotiated(f"{what} needs protocol {KERNEL_VERSION}.{minor}; negotiated {have}")

    # -- requests and replies ----------------------------------------------------------------

    def register(self, *specs: OpSpec) -> None:
        """Decode and answer these opcodes too, on this connection only."""
        self.decoder.register(*specs)

    def decode(self, data: bytes | bytearray | memoryview) -> r.Request:
        """One request from its bytes; :class:`~afuse.wire.requests.ProtocolError` if malformed."""
        return self.decoder.decode(data)

    def spec(self, req: r.Request) -> OpSpec:
        """The table's record for ``req``."""
        spec = self.decoder.spec(req.opcode)
        if spec is None:
            raise HandlerResultError(f"no opcode for {type(req).__name__}")
        return spec

    def reply(self, req: r.Request, value: Any, what: str | None = None) -> bytes:
        """The reply carrying ``value``, the result of handler ``what`` for ``req`` (checked)."""
        spec = self.spec(req)
        return ENCODERS[spec.reply](self, req, value, what or spec.handler or spec.name)

    @staticmethod
    def error(unique: int, errno: int) -> bytes:
        """An error reply."""
        return replies.error(unique, errno)

    def dir_writer(self, req: r.ReaddirRequest, what: str = "readdir") -> DirWriter:
        """A READDIR/READDIRPLUS reply to fill with checked entries."""
        return DirWriter(self, req, what)

    # -- notifications -------------------------------------------------------------------------

    def poll_wakeup(self, kh: int) -> bytes:
        """Wake the pollers of the file whose POLL request carried ``kh``."""
        return _notify.poll_wakeup(kh)

    def inval_inode(self, nodeid: int, offset: int = -1, length: int = 0) -> bytes:
        """Drop cached attributes (and data from ``offset`` >= 0) of ``nodeid``."""
        return _notify.inval_inode(nodeid, offset, length)

    def inval_entry(self, parent: int, name: bytes, expire_only: bool = False) -> bytes:
        """Invalidate (or only expire: FUSE_HAS_EXPIRE_ONLY) the entry ``name`` in ``parent``."""
        if expire_only:
            self.require(InitFlag.HAS_EXPIRE_ONLY, "inval_entry(expire_only=True)")
        return _notify.inval_entry(parent, name, expire_only)

    def delete(self, parent: int, child: int, name: bytes) -> bytes:
        """``name`` (nodeid ``child``) is gone from ``parent``."""
        return _notify.delete(parent, child, name)

    def store(self, nodeid: int, offset: int, data: bytes) -> bytes:
        """Put ``data`` into the page cache of ``nodeid`` at ``offset``."""
        return _notify.store(nodeid, offset, data)

    def retrieve(self, notify_unique: int, nodeid: int, offset: int, size: int) -> bytes:
        """Ask for cached data; answered by a NOTIFY_REPLY request carrying ``notify_unique``."""
        return _notify.retrieve(notify_unique, nodeid, offset, size)

    def resend(self) -> bytes:
        """Re-queue every request read but not answered (7.40)."""
        self.require_minor(40, "resend")
        return _notify.resend()

    def inc_epoch(self) -> bytes:
        """Invalidate every dentry looked up so far (7.44)."""
        self.require_minor(44, "inc_epoch")
        return _notify.inc_epoch()

    def prune(self, nodeids: Sequence[int]) -> bytes:
        """Ask the kernel to evict these inodes (7.45)."""
        self.require_minor(45, "prune")
        return _notify.prune(nodeids)
