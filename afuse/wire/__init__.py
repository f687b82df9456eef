"""The sans-IO FUSE wire protocol: bytes in, attrs objects out, and back.

Nothing here imports trio or touches a file descriptor. :mod:`.structs` is the only place that
knows byte layouts.
"""

from . import constants, notify, replies, requests, structs
from .constants import ROOT_ID, FAttr, FOpen, InitFlag, NotifyCode, Opcode
from .init import InitConfig, InitError, Negotiated, encode_init_reply, negotiate
from .requests import Decoder, ProtocolError, Request, UnknownOpcode
from .types import Attr, DirEntries, DirEntry, Entry, FsStats, Handle, IoctlReply, Lock, Statx, Timestamp

__all__ = [
    "ROOT_ID", "Attr", "Decoder", "DirEntries", "DirEntry", "Entry", "FAttr", "FOpen", "FsStats",
    "Handle", "InitConfig", "InitError", "InitFlag", "IoctlReply", "Lock", "Negotiated", "NotifyCode",
    "Opcode", "ProtocolError", "Request", "Statx", "Timestamp", "UnknownOpcode", "constants",
    "encode_init_reply", "negotiate", "notify", "replies", "requests", "structs",
]
