"""afuse: FUSE filesystems in pure Python on trio, speaking the kernel protocol over /dev/fuse."""

from .device import MountOptions
from .dispatch import Dispatcher
from .errors import FUSEError, MountError, NotNegotiated, SessionError
from .operations import Operations
from .passthrough import BackingFile
from .running import run
from .session import Session, Takeover, current_session, mount, serve
from .wire.constants import FAttr, FOpen, InitFlag, Opcode
from .wire.init import InitConfig, Negotiated
from .wire.requests import (
    AccessRequest,
    BmapRequest,
    CopyFileRangeRequest,
    CreateRequest,
    DestroyRequest,
    FallocateRequest,
    FlushRequest,
    ForgetItem,
    ForgetRequest,
    FsyncdirRequest,
    FsyncRequest,
    GetattrRequest,
    GetlkRequest,
    GetxattrRequest,
    InitRequest,
    IoctlRequest,
    LinkRequest,
    ListxattrRequest,
    LookupRequest,
    LseekRequest,
    MkdirRequest,
    MknodRequest,
    OpendirRequest,
    OpenRequest,
    PollRequest,
    ReaddirplusRequest,
    ReaddirRequest,
    ReadlinkRequest,
    ReadRequest,
    ReleasedirRequest,
    ReleaseRequest,
    RemovexattrRequest,
    RenameRequest,
    Request,
    RmdirRequest,
    SecurityContext,
    SetattrRequest,
    SetlkRequest,
    SetxattrRequest,
    StatfsRequest,
    StatxRequest,
    SymlinkRequest,
    SyncfsRequest,
    TmpfileRequest,
    UnlinkRequest,
    WriteRequest,
)
from .wire.types import Attr, DirEntry, Entry, FsStats, Handle, IoctlReply, Lock, Statx, Timestamp

__version__ = "0.1.0"

__all__ = [
    "AccessRequest", "Attr", "BmapRequest", "CopyFileRangeRequest", "CreateRequest",
    "DestroyRequest", "DirEntry", "Dispatcher", "Entry", "FAttr", "FOpen", "FUSEError",
    "FallocateRequest", "FlushRequest", "ForgetItem", "ForgetRequest", "FsStats",
    "FsyncRequest", "FsyncdirRequest", "GetattrRequest", "GetlkRequest", "GetxattrRequest",
    "Handle", "InitConfig", "InitFlag", "InitRequest", "IoctlReply", "IoctlRequest",
    "LinkRequest", "ListxattrRequest", "Lock", "LookupRequest", "LseekRequest", "MkdirRequest",
    "MknodRequest", "MountError", "MountOptions", "Negotiated", "NotNegotiated", "Opcode",
    "OpenRequest", "OpendirRequest", "Operations", "PollRequest", "ReadRequest",
    "ReaddirRequest", "ReaddirplusRequest", "ReadlinkRequest", "ReleaseRequest",
    "ReleasedirRequest", "RemovexattrRequest", "RenameRequest", "Request", "RmdirRequest",
    "SecurityContext", "Session", "SessionError", "SetattrRequest", "SetlkRequest",
    "SetxattrRequest", "StatfsRequest", "Statx", "StatxRequest", "SymlinkRequest",
    "SyncfsRequest", "Timestamp", "TmpfileRequest", "UnlinkRequest", "WriteRequest",
    "BackingFile", "Takeover", "__version__", "current_session", "mount", "run", "serve",
]
