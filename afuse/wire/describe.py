"""One-line descriptions of requests, replies and notifications, for debug logs.

Pure functions of the decoded objects and bytes: ``describe_request(req)`` gives
``LOOKUP unique=12 nodeid=1 uid=1000 gid=1000 pid=4242 name=b'hello.txt'``.
"""

from __future__ import annotations

import enum
import errno as _errno
from typing import Any

import attrs

from . import structs as S
from .constants import InitFlag, NotifyCode
from .requests import ForgetRequest, Request

__all__ = ["describe_notification", "describe_reply", "describe_request", "flag_names"]

_HEAD = ("unique", "nodeid", "uid", "gid", "pid")
_MAX_BYTES = 48
_MAX_ITEMS = 4
_OCTAL = frozenset({"mode", "umask"})
_HEX = frozenset({"flags", "open_flags", "lock_owner", "owner", "cmd", "arg"})


def flag_names(flags: int, kind: type[enum.IntFlag] = InitFlag) -> str:
    """``ASYNC_READ|POSIX_LOCKS|...`` for a flag word (unknown bits as hex); ``0`` for none."""
    value = int(flags)
    names = [m.name for m in kind if m.name and m.value and value & m.value == m.value and m.value & (m.value - 1) == 0]
    known = 0
    for m in kind:
        if m.name in names:
            known |= m.value
    rest = value & ~known
    if rest:
        names.append(hex(rest))
    return "|".join(names) or "0"


def _value(v: Any) -> str:
    if isinstance(v, bytes | bytearray | memoryview):
        b = bytes(v)
        return repr(b) if len(b) <= _MAX_BYTES else f"<{len(b)} bytes>"
    if isinstance(v, enum.IntFlag):
        return flag_names(v, type(v))
    if isinstance(v, enum.Enum):
        return v.name
    if isinstance(v, list):
        shown = ", ".join(_value(x) for x in v[:_MAX_ITEMS])
        more = f", ... {len(v)} in all" if len(v) > _MAX_ITEMS else ""
        return f"[{shown}{more}]"
    if attrs.has(type(v)):
        return "(" + " ".join(f"{f.name}={_value(getattr(v, f.name))}" for f in attrs.fields(type(v))) + ")"
    return repr(v)


def describe_request(req: Request) -> str:
    """The opcode, header and every argument that is set (long data as its length)."""
    op = type(req).opcode.name
    if isinstance(req, ForgetRequest) and req.nodeid == 0:
        op = "BATCH_FORGET"
    parts = [op, f"unique={req.unique:#x}" if req.is_resend else f"unique={req.unique}", f"nodeid={req.nodeid}"]
    if req.has_ids:
        parts.append(f"uid={req.uid} gid={req.gid}")
    parts.append(f"pid={req.pid}")
    for f in attrs.fields(type(req)):
        if f.name in _HEAD:
            continue
        v = getattr(req, f.name)
        if v is None or (f.name in ("security_context", "supp_groups") and not v):
            continue
        if f.name in _OCTAL and isinstance(v, int):
            parts.append(f"{f.name}={v:#o}")
        elif f.name in _HEX and isinstance(v, int) and not isinstance(v, enum.Enum):
            parts.append(f"{f.name}={v:#x}")
        else:
            parts.append(f"{f.name}={_value(v)}")
    if req.is_resend:
        parts.append("(resent)")
    return " ".join(parts)


def describe_reply(reply: Any) -> str:
    """``OK, 144 bytes`` or ``ENOENT``; ``no reply`` for None; a list is a header and its body,
    an ``afuse.splice.SplicedReply`` data spliced from a file."""
    if reply is None:
        return "no reply"
    if not isinstance(reply, (bytes, bytearray, memoryview, list)):  # spliced: afuse.splice
        return f"OK, up to {reply.range.size} bytes spliced"
    length, error, _unique = S.OUT_HEADER.unpack_from(reply[0] if isinstance(reply, list) else reply)
    if error:
        return _errno.errorcode.get(-error, str(-error))
    return f"OK, {length - 16} bytes" if length > 16 else "OK"


def describe_notification(message: bytes) -> str:
    """``INVAL_ENTRY (40 bytes)`` for an encoded notification."""
    _length, code, _unique = S.OUT_HEADER.unpack_from(message)
    try:
        name = NotifyCode(code).name
    except ValueError:
        name = f"code {code}"
    return f"{name} ({len(message)} bytes)"
