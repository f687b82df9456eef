"""One precompiled :class:`struct.Struct` per kernel struct (protocol 7.45, host order).

The kernel speaks host byte order with natural alignment; afuse targets little-endian Linux, so
every format is explicit little-endian with no implicit padding. Sizes are asserted at import.
"""

from __future__ import annotations

from struct import Struct

IN_HEADER = Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid total_extlen padding
OUT_HEADER = Struct("<IiQ")  # len error unique

ATTR = Struct("<QQQqqqIIIIIIIIII")
ENTRY_OUT = Struct("<QQQQII")  # nodeid generation entry_valid attr_valid entry_nsec attr_nsec (+ attr)
ENTRY_OUT_FULL = Struct("<QQQQIIQQQqqqIIIIIIIIII")  # entry_out with its fuse_attr flattened; times signed
ATTR_OUT_FULL = Struct("<QIIQQQqqqIIIIIIIIII")  # attr_out with its fuse_attr flattened
FORGET_IN = Struct("<Q")
FORGET_ONE = Struct("<QQ")
BATCH_FORGET_IN = Struct("<II")
GETATTR_IN = Struct("<IIQ")
STATX_IN = Struct("<IIQII")
SX_TIME = Struct("<qIi")
# fuse_statx with its four fuse_sx_time fields flattened; __spare0 u16 and __spare2[14] u64 as pad.
STATX = Struct("<IIQIIIH2xQQQQqIiqIiqIiqIiIIII112x")
STATX_OUT_HEAD = Struct("<QII16x")  # attr_valid attr_valid_nsec flags spare[2]
MKNOD_IN = Struct("<IIII")
MKDIR_IN = Struct("<II")
RENAME_IN = Struct("<Q")
RENAME2_IN = Struct("<QII")
LINK_IN = Struct("<Q")
SETATTR_IN = Struct("<IIQQQqqqIIIIIIII")  # atime mtime ctime signed: pre-1970 times
OPEN_IN = Struct("<II")
CREATE_IN = Struct("<IIII")
OPEN_OUT = Struct("<QIi")
RELEASE_IN = Struct("<QIIQ")
FLUSH_IN = Struct("<QIIQ")
READ_IN = Struct("<QQIIQII")
WRITE_IN = Struct("<QQIIQII")
WRITE_OUT = Struct("<II")
KSTATFS = Struct("<QQQQQIIII24x")
FSYNC_IN = Struct("<QII")
SETXATTR_IN = Struct("<IIII")
SETXATTR_IN_COMPAT = Struct("<II")
GETXATTR_IN = Struct("<II")
GETXATTR_OUT = Struct("<II")
FILE_LOCK = Struct("<QQII")
LK_IN = Struct("<QQQQIIII")  # fh owner start end type pid lk_flags padding
LK_OUT = Struct("<QQII")
ACCESS_IN = Struct("<II")
INIT_IN = Struct("<IIIII44x")
INIT_IN_HEAD = Struct("<IIII")  # major minor max_readahead flags (kernels before 7.36)
INIT_OUT = Struct("<IIIIHHIIHHIIH22x")
CUSE_INIT_IN = Struct("<IIII")
CUSE_INIT_OUT = Struct("<IIIIIIII40x")
INTERRUPT_IN = Struct("<Q")
BMAP_IN = Struct("<QII")
BMAP_OUT = Struct("<Q")
IOCTL_IN = Struct("<QIIQII")
IOCTL_IOVEC = Struct("<QQ")
IOCTL_OUT = Struct("<iIII")
POLL_IN = Struct("<QQII")
POLL_OUT = Struct("<II")
NOTIFY_POLL_WAKEUP_OUT = Struct("<Q")
FALLOCATE_IN = Struct("<QQQII")
DIRENT = Struct("<QQII")
NOTIFY_INVAL_INODE_OUT = Struct("<Qqq")
NOTIFY_INVAL_ENTRY_OUT = Struct("<QII")
NOTIFY_DELETE_OUT = Struct("<QQII")
NOTIFY_STORE_OUT = Struct("<QQII")
NOTIFY_RETRIEVE_OUT = Struct("<QQQII")
NOTIFY_RETRIEVE_IN = Struct("<QQIIQQ")
NOTIFY_PRUNE_OUT = Struct("<IIQ")
BACKING_MAP = Struct("<iIQ")
LSEEK_IN = Struct("<QQII")
LSEEK_OUT = Struct("<Q")
COPY_FILE_RANGE_IN = Struct("<QQQQQQQ")
COPY_FILE_RANGE_OUT = Struct("<Q")
SETUPMAPPING_IN = Struct("<QQQQQ")
REMOVEMAPPING_IN = Struct("<I")
REMOVEMAPPING_ONE = Struct("<QQ")
SYNCFS_IN = Struct("<Q")
SECCTX = Struct("<II")
SECCTX_HEADER = Struct("<II")
EXT_HEADER = Struct("<II")
SUPP_GROUPS = Struct("<I")
U32 = Struct("<I")
U64 = Struct("<Q")
# Proposed FUSE iomap (NOT in any released kernel; see afuse.wire.iomap). Layouts of the 2026 series.
IOMAP_IO = Struct("<QQQHHI")  # fuse_iomap_io: offset length addr type flags dev
IOMAP_BEGIN_IN = Struct("<IIQQQ")  # opflags reserved attr_ino pos count
IOMAP_BEGIN_OUT = Struct("<" + IOMAP_IO.format[1:] * 2)  # read, write: fuse_iomap_io each
IOMAP_END_IN = Struct("<IIQQQq" + IOMAP_IO.format[1:])  # opflags reserved attr_ino pos count written map

_SIZES = {
    IN_HEADER: 40, OUT_HEADER: 16, ATTR: 88, ENTRY_OUT_FULL: 128, ATTR_OUT_FULL: 104,
    STATX: 256, STATX_OUT_HEAD: 32, SETATTR_IN: 88, OPEN_OUT: 16, READ_IN: 40, WRITE_IN: 40,
    KSTATFS: 80, LK_IN: 48, LK_OUT: 24, INIT_IN: 64, INIT_OUT: 64, CUSE_INIT_OUT: 72,
    IOCTL_IN: 32, IOCTL_OUT: 16, POLL_IN: 24, FALLOCATE_IN: 32, DIRENT: 24,
    NOTIFY_RETRIEVE_IN: 40, NOTIFY_RETRIEVE_OUT: 32, COPY_FILE_RANGE_IN: 56, SETUPMAPPING_IN: 40,
    STATX_IN: 24, RELEASE_IN: 24, FLUSH_IN: 24, BACKING_MAP: 16, NOTIFY_PRUNE_OUT: 16,
    IOMAP_IO: 32, IOMAP_BEGIN_IN: 32, IOMAP_BEGIN_OUT: 64, IOMAP_END_IN: 72,
}
for _s, _n in _SIZES.items():
    assert _s.size == _n, (_s.format, _s.size, _n)
del _s, _n
