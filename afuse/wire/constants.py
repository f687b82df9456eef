"""Numbers of the FUSE kernel protocol 7.45 (``include/uapi/linux/fuse.h``)."""

from __future__ import annotations

import enum

#: The protocol version afuse speaks.
KERNEL_VERSION = 7
KERNEL_MINOR_VERSION = 45
#: The oldest minor afuse accepts from a kernel.
OLDEST_MINOR_VERSION = 31

ROOT_ID = 1
MIN_READ_BUFFER = 8192
#: libfuse's FUSE_BUFFER_HEADER_SIZE: room for the headers of the largest request.
BUFFER_HEADER_SIZE = 0x1000
INVALID_UIDGID = 0xFFFFFFFF
#: Bit 0 of ``unique`` marks an INTERRUPT message.
INT_REQ_BIT = 1 << 0
#: Bit 63 of ``unique`` marks a request re-queued by FUSE_NOTIFY_RESEND.
UNIQUE_RESEND = 1 << 63
MAX_NR_SECCTX = 31
EXT_GROUPS = 32
CUSE_INIT_INFO_MAX = 4096
IOCTL_MAX_IOV = 256
COMPAT_SETXATTR_IN_SIZE = 8


class Opcode(enum.IntEnum):
    """Request opcodes (``enum fuse_opcode``)."""

    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51
    STATX = 52
    COPY_FILE_RANGE_64 = 53
    CUSE_INIT = 4096
    #: Proposed, not merged in any kernel (see :mod:`afuse.wire.iomap`).
    IOMAP_BEGIN = 4094
    IOMAP_END = 4095


class InitFlag(enum.IntFlag):
    """INIT flags as one 64-bit word (bits 32-63 travel in ``flags2``)."""

    ASYNC_READ = 1 << 0
    POSIX_LOCKS = 1 << 1
    FILE_OPS = 1 << 2
    ATOMIC_O_TRUNC = 1 << 3
    EXPORT_SUPPORT = 1 << 4
    BIG_WRITES = 1 << 5
    DONT_MASK = 1 << 6
    SPLICE_WRITE = 1 << 7
    SPLICE_MOVE = 1 << 8
    SPLICE_READ = 1 << 9
    FLOCK_LOCKS = 1 << 10
    HAS_IOCTL_DIR = 1 << 11
    AUTO_INVAL_DATA = 1 << 12
    DO_READDIRPLUS = 1 << 13
    READDIRPLUS_AUTO = 1 << 14
    ASYNC_DIO = 1 << 15
    WRITEBACK_CACHE = 1 << 16
    NO_OPEN_SUPPORT = 1 << 17
    PARALLEL_DIROPS = 1 << 18
    HANDLE_KILLPRIV = 1 << 19
    POSIX_ACL = 1 << 20
    ABORT_ERROR = 1 << 21
    MAX_PAGES = 1 << 22
    CACHE_SYMLINKS = 1 << 23
    NO_OPENDIR_SUPPORT = 1 << 24
    EXPLICIT_INVAL_DATA = 1 << 25
    MAP_ALIGNMENT = 1 << 26
    SUBMOUNTS = 1 << 27
    HANDLE_KILLPRIV_V2 = 1 << 28
    SETXATTR_EXT = 1 << 29
    INIT_EXT = 1 << 30
    INIT_RESERVED = 1 << 31
    SECURITY_CTX = 1 << 32
    HAS_INODE_DAX = 1 << 33
    CREATE_SUPP_GROUP = 1 << 34
    HAS_EXPIRE_ONLY = 1 << 35
    DIRECT_IO_ALLOW_MMAP = 1 << 36
    PASSTHROUGH = 1 << 37
    NO_EXPORT_SUPPORT = 1 << 38
    HAS_RESEND = 1 << 39
    ALLOW_IDMAP = 1 << 40
    OVER_IO_URING = 1 << 41
    REQUEST_TIMEOUT = 1 << 42


class FOpen(enum.IntFlag):
    """Flags of an OPEN/CREATE/OPENDIR reply (``FOPEN_*``)."""

    DIRECT_IO = 1 << 0
    KEEP_CACHE = 1 << 1
    NONSEEKABLE = 1 << 2
    CACHE_DIR = 1 << 3
    STREAM = 1 << 4
    NOFLUSH = 1 << 5
    PARALLEL_DIRECT_WRITES = 1 << 6
    PASSTHROUGH = 1 << 7


class FAttr(enum.IntFlag):
    """Which fields of a SETATTR request are valid (``FATTR_*``)."""

    MODE = 1 << 0
    UID = 1 << 1
    GID = 1 << 2
    SIZE = 1 << 3
    ATIME = 1 << 4
    MTIME = 1 << 5
    FH = 1 << 6
    ATIME_NOW = 1 << 7
    MTIME_NOW = 1 << 8
    LOCKOWNER = 1 << 9
    CTIME = 1 << 10
    KILL_SUIDGID = 1 << 11


class NotifyCode(enum.IntEnum):
    """Notification codes, written in ``fuse_out_header.error`` with unique 0."""

    POLL = 1
    INVAL_INODE = 2
    INVAL_ENTRY = 3
    STORE = 4
    RETRIEVE = 5
    DELETE = 6
    RESEND = 7
    INC_EPOCH = 8
    PRUNE = 9


# Per-operation flag bits.
GETATTR_FH = 1 << 0
READ_LOCKOWNER = 1 << 1
WRITE_CACHE = 1 << 0
WRITE_LOCKOWNER = 1 << 1
WRITE_KILL_SUIDGID = 1 << 2
RELEASE_FLUSH = 1 << 0
RELEASE_FLOCK_UNLOCK = 1 << 1
FSYNC_FDATASYNC = 1 << 0
LK_FLOCK = 1 << 0
OPEN_KILL_SUIDGID = 1 << 0
SETXATTR_ACL_KILL_SGID = 1 << 0
POLL_SCHEDULE_NOTIFY = 1 << 0
ATTR_SUBMOUNT = 1 << 0
ATTR_DAX = 1 << 1
EXPIRE_ONLY = 1 << 0
CUSE_UNRESTRICTED_IOCTL = 1 << 0

IOCTL_COMPAT = 1 << 0
IOCTL_UNRESTRICTED = 1 << 1
IOCTL_RETRY = 1 << 2
IOCTL_32BIT = 1 << 3
IOCTL_DIR = 1 << 4
IOCTL_COMPAT_X32 = 1 << 5

# /dev/fuse ioctls (x86_64 and every architecture with the generic _IOC layout).
FUSE_DEV_IOC_CLONE = 0x8004E500
FUSE_DEV_IOC_BACKING_OPEN = 0x4010E501
FUSE_DEV_IOC_BACKING_CLOSE = 0x4004E502
FUSE_DEV_IOC_SYNC_INIT = 0x0000E503
