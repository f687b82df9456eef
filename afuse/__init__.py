"""afuse: FUSE filesystems in pure Python on trio, speaking the kernel protocol over /dev/fuse."""

from .context import RequestContext, current_request
from .device import MountOptions
from .dispatch import Dispatcher
from .errors import FUSEError, MountError, NotNegotiated, SessionError
from .nodes import Caller, DirItem, FileHandle, Node, NodeFS, current_caller
from .operations import DirListing, Operations
from .passthrough import BackingFile
from .running import run
from .session import Session, Takeover, current_session, mount, serve
from .wire import requests as _requests
from .wire.constants import ROOT_ID, FAttr, FOpen, InitFlag, Opcode
from .wire.init import InitConfig, Negotiated
from .wire.requests import *  # noqa: F403  (every request class; its __all__ lists them)
from .wire.types import Attr, DirEntries, DirEntry, DirSlice, Entry, FsStats, Handle, IoctlReply, Lock, Statx, Timestamp

__version__ = "0.1.0"

__all__ = [
    "ROOT_ID", "Attr", "BackingFile", "Caller", "DirEntries", "DirEntry", "DirItem", "DirListing", "DirSlice",
    "Dispatcher", "Entry", "FAttr", "FOpen", "FUSEError", "FileHandle", "FsStats", "Handle", "InitConfig", "InitFlag",
    "IoctlReply", "Lock", "MountError", "MountOptions", "Negotiated", "Node", "NodeFS", "NotNegotiated", "Opcode",
    "Operations", "RequestContext", "Session", "SessionError", "Statx", "Takeover", "Timestamp", "__version__",
    "current_caller", "current_request", "current_session", "mount", "run", "serve",
]
__all__ += _requests.__all__
