"""The sans-IO FUSE wire protocol: bytes in, attrs objects out, and back.

Nothing here imports trio or touches a file descriptor. :mod:`.structs` is the only place that
knows byte layouts; :mod:`.opcodes` is the one table of what each opcode is;
:class:`~.connection.Connection` holds one connection's negotiated state and does the
conversions in both directions.
"""

from . import constants, notify, opcodes, replies, requests, results, structs
from .connection import Connection, InitStep
from .constants import ROOT_ID, FAttr, FOpen, InitFlag, NotifyCode, Opcode
from .decoder import Decoder
from .errors import HandlerResultError, NotNegotiated
from .init import InitConfig, InitError, Negotiated, encode_init_reply, negotiate
from .opcodes import OPCODES, OpSpec, Shape
from .requests import ProtocolError, Request, UnknownOpcode
from .types import Attr, DirEntries, DirEntry, DirSlice, Entry, FsStats, Handle, IoctlReply, Lock, Statx, Timestamp

__all__ = [
    "OPCODES", "ROOT_ID", "Attr", "Connection", "Decoder", "DirEntries", "DirEntry", "DirSlice", "Entry", "FAttr",
    "FOpen", "FsStats", "Handle", "HandlerResultError", "InitConfig", "InitError", "InitFlag", "InitStep", "IoctlReply",
    "Lock", "Negotiated", "NotNegotiated", "NotifyCode", "OpSpec", "Opcode", "ProtocolError", "Request", "Shape",
    "Statx", "Timestamp", "UnknownOpcode", "constants", "encode_init_reply", "negotiate", "notify", "opcodes",
    "replies", "requests", "results", "structs",
]
