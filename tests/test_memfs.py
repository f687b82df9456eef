"""MemFS (afuse/examples/memfs.py) against the real kernel: plain syscalls on a mounted MemFS."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import select
import stat
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncGenerator, Callable, Generator, Iterator

import pytest
import trio

from afuse.errors import FUSEError
from afuse.examples.memfs import CHUNK, XATTR_SPACE, File, MemFS
from afuse.nodes.sparse import SparseData
from afuse.pytest_plugin import fuse_unavailable_reason
from afuse.testing import MountedFS, mounted, mounted_process
from afuse.wire import requests as r
from afuse.wire.constants import FAttr
from afuse.wire.types import DirEntry, Lock

needs_fuse = pytest.mark.skipif(fuse_unavailable_reason() is not None, reason=str(fuse_unavailable_reason()))
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT = 1, 2, 4
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 1, 2, 0x10
STATX_BASIC_STATS, STATX_BTIME = 0x7FF, 0x800
MiB = 1 << 20


@pytest.fixture
def m() -> Iterator[MountedFS]:
    reason = fuse_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with mounted(MemFS()) as mfs:
        yield mfs


def memfs(m: MountedFS) -> MemFS:
    assert isinstance(m.ops, MemFS)
    return m.ops


@contextlib.contextmanager
def raises_errno(code: int) -> Iterator[None]:
    """``pytest.raises(OSError)`` that also checks the errno."""
    with pytest.raises(OSError) as info:
        yield
    assert info.value.errno == code, f"expected {errno.errorcode[code]}, got {info.value!r}"


def renameat2(old: str, new: str, flags: int) -> None:
    if libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), ctypes.c_uint(flags)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), old)


def linkat_follow(src: str, dst: str) -> None:
    """linkat(AT_FDCWD, src, AT_FDCWD, dst, AT_SYMLINK_FOLLOW) (os.link uses link(2) by default)."""
    if libc.linkat(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), 0x400) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), src, None, dst)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def statx(path: str, mask: int) -> dict[str, int]:
    buf = ctypes.create_string_buffer(256)
    libc.statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_char_p]
    if libc.statx(AT_FDCWD, os.fsencode(path), 0, mask, buf) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), path)
    raw = buf.raw
    mask_, blksize = struct.unpack_from("<II", raw, 0)
    nlink, uid, gid, mode = struct.unpack_from("<IIIH", raw, 16)
    ino, size, blocks = struct.unpack_from("<QQQ", raw, 32)

    def ts(off: int) -> int:
        sec, nsec = struct.unpack_from("<qI", raw, off)
        return int(sec) * 1_000_000_000 + int(nsec)

    return {"mask": mask_, "blksize": blksize, "nlink": nlink, "uid": uid, "gid": gid, "mode": mode,
            "ino": ino, "size": size, "blocks": blocks, "atime": ts(64), "btime": ts(80), "ctime": ts(96),
            "mtime": ts(112)}


def child(code: str, *args: str, user: int | None = None, check: bool = True,
          timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a separate Python process (locks belong to processes)."""
    exe = sys.executable if user is None else "/usr/bin/python3"
    as_user = user is not None  # in that user's process, with no extra groups, in /
    p = subprocess.run(
        [exe, "-c", textwrap.dedent(code), *args], capture_output=True, text=True, timeout=timeout,
        user=user, group=user, extra_groups=[] if as_user else None, cwd="/" if as_user else None)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def spawn(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(cond: Callable[[], object], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return bool(cond())


# ---------------------------------------------------------------------------------------------
# Regular files


@needs_fuse
def test_create_read_write_truncate_append(m: MountedFS) -> None:
    p = m.join("f")
    with open(p, "wb") as f:
        f.write(b"hello world")
    with open(p, "rb") as f:
        assert f.read() == b"hello world"
    st = os.stat(p)
    assert stat.S_ISREG(st.st_mode) and st.st_size == 11 and st.st_nlink == 1
    assert st.st_uid == os.getuid() and st.st_gid == os.getgid()
    os.truncate(p, 5)
    with open(p, "rb") as f:
        assert f.read() == b"hello"
    os.truncate(p, 8)
    with open(p, "rb") as f:
        assert f.read() == b"hello\0\0\0"
    with open(p, "ab") as f:
        f.write(b"!!")
    with open(p, "rb") as f:
        assert f.read() == b"hello\0\0\0!!"
    fd = os.open(p, os.O_WRONLY | os.O_APPEND)
    try:
        os.pwrite(fd, b"??", 0)  # O_APPEND: pwrite's offset is ignored on Linux
        os.ftruncate(fd, 3)
        os.write(fd, b"X")
    finally:
        os.close(fd)
    with open(p, "rb") as f:
        assert f.read() == b"hel" + b"X"
    with open(p, "wb") as f:  # O_TRUNC
        pass
    assert os.stat(p).st_size == 0
    with raises_errno(errno.EEXIST):
        os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    with raises_errno(errno.ENOENT):
        os.open(m.join("missing"), os.O_RDONLY)
    with raises_errno(errno.ENOENT):
        os.stat(m.join("missing"))


@needs_fuse
def test_large_io(m: MountedFS) -> None:
    p = m.join("big")
    data = os.urandom(MiB)
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        assert os.pwrite(fd, data, 0) == MiB
        assert os.pread(fd, MiB, 0) == data
        # Unaligned, spanning chunks, past the end (leaving a hole).
        assert os.pwrite(fd, data, 3 * MiB + 12345) == MiB
        assert os.fstat(fd).st_size == 4 * MiB + 12345
        got = b""
        while len(got) < 4 * MiB + 12345:
            piece = os.pread(fd, MiB, len(got))
            assert piece
            got += piece
        assert got == data + bytes(2 * MiB + 12345) + data
    finally:
        os.close(fd)
    with open(p, "rb") as f:
        assert f.read(MiB) == data


@needs_fuse
def test_mtime_ctime_updates(m: MountedFS) -> None:
    d = m.join("d")
    os.mkdir(d)
    p = os.path.join(d, "f")
    t0 = os.stat(d)
    time.sleep(0.01)
    with open(p, "wb") as f:
        f.write(b"x")
    t1 = os.stat(d)
    assert t1.st_mtime_ns > t0.st_mtime_ns and t1.st_ctime_ns > t0.st_ctime_ns
    f0 = os.stat(p)
    time.sleep(0.01)
    with open(p, "ab") as f:
        f.write(b"y")
    f1 = os.stat(p)
    assert f1.st_mtime_ns > f0.st_mtime_ns and f1.st_ctime_ns > f0.st_ctime_ns
    time.sleep(0.01)
    os.link(p, p + "2")
    f2 = os.stat(p)
    assert f2.st_ctime_ns > f1.st_ctime_ns and f2.st_mtime_ns == f1.st_mtime_ns
    time.sleep(0.01)
    os.unlink(p + "2")
    t2 = os.stat(d)
    assert t2.st_mtime_ns > t1.st_mtime_ns
    time.sleep(0.01)
    os.rename(p, p + "3")
    t3 = os.stat(d)
    assert t3.st_mtime_ns > t2.st_mtime_ns


# ---------------------------------------------------------------------------------------------
# Directories


@needs_fuse
def test_mkdir_rmdir_errors(m: MountedFS) -> None:
    d = m.join("d")
    os.mkdir(d, 0o750)
    st = os.stat(d)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o750 & ~_umask()
    assert st.st_nlink == 2
    assert os.stat(m.path).st_nlink == 3
    os.mkdir(os.path.join(d, "sub"))
    assert os.stat(d).st_nlink == 3
    with raises_errno(errno.EEXIST):
        os.mkdir(d)
    with raises_errno(errno.ENOTEMPTY):
        os.rmdir(d)
    with open(os.path.join(d, "f"), "w"):
        pass
    with raises_errno(errno.ENOTDIR):
        os.rmdir(os.path.join(d, "f"))
    with raises_errno(errno.ENOTDIR):
        os.listdir(os.path.join(d, "f"))
    with raises_errno(errno.EISDIR):
        os.unlink(os.path.join(d, "sub"))
    with raises_errno(errno.EISDIR):
        open(os.path.join(d, "sub"), "w")
    with raises_errno(errno.ENOENT):
        os.rmdir(os.path.join(d, "nope"))
    with raises_errno(errno.ENOENT):
        os.unlink(os.path.join(d, "nope"))
    with raises_errno(errno.ENOENT):
        os.mkdir(os.path.join(d, "nope", "x"))
    with raises_errno(errno.ENAMETOOLONG):
        os.mkdir(os.path.join(d, "x" * 256))
    with raises_errno(errno.ENAMETOOLONG):
        open(os.path.join(d, "y" * 256), "w")
    with raises_errno(errno.ENAMETOOLONG):
        os.stat(os.path.join(d, "z" * 256))
    os.mkdir(os.path.join(d, "n" * 255))  # exactly NAME_MAX is fine
    os.rmdir(os.path.join(d, "n" * 255))
    os.rmdir(os.path.join(d, "sub"))
    assert os.stat(d).st_nlink == 2
    os.unlink(os.path.join(d, "f"))
    os.rmdir(d)
    assert os.stat(m.path).st_nlink == 2
    assert os.listdir(m.path) == []


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@needs_fuse
def test_readdir_10000(m: MountedFS) -> None:
    d = m.join("many")
    os.mkdir(d)
    names = {f"file-{i:05d}-{'x' * (i % 40)}" for i in range(10_000)}
    for name in names:
        os.close(os.open(os.path.join(d, name), os.O_CREAT | os.O_WRONLY, 0o644))
    assert sorted(os.listdir(d)) == sorted(names)
    # scandir types and inode numbers agree with stat.
    for i, entry in enumerate(os.scandir(d)):
        assert entry.is_file(follow_symlinks=False)
        if i % 500 == 0:
            assert entry.inode() == os.stat(entry.path).st_ino
    # Deleting while reading: every entry that is not deleted is seen exactly once.
    seen: list[str] = []
    deleted: set[str] = set()
    victims = sorted(names)
    with os.scandir(d) as it:
        for k, entry in enumerate(it):
            seen.append(entry.name)
            if k % 10 == 0 and victims:
                for _ in range(5):
                    v = victims.pop()
                    if v not in seen:
                        os.unlink(os.path.join(d, v))
                        deleted.add(v)
    assert len(seen) == len(set(seen))
    assert set(seen) >= names - deleted
    for name in os.listdir(d):
        os.unlink(os.path.join(d, name))
    os.rmdir(d)
    # Every inode is gone once the kernel forgot them.
    fs = memfs(m)
    assert wait_for(lambda: fs.inode_count == 1), fs.inode_count


@needs_fuse
def test_dot_entries_and_dirent_types(m: MountedFS) -> None:
    os.mkdir(m.join("d"))
    os.symlink("target", m.join("l"))
    os.mkfifo(m.join("p"))
    with open(m.join("f"), "w"):
        pass
    libc_entries = {e.name: e for e in os.scandir(m.path)}
    assert set(libc_entries) == {"d", "l", "p", "f"}
    assert libc_entries["d"].is_dir(follow_symlinks=False)
    assert libc_entries["l"].is_symlink()
    assert libc_entries["f"].is_file(follow_symlinks=False)
    out = child("""
        import ctypes, os, sys
        fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
        buf = ctypes.create_string_buffer(65536)
        libc = ctypes.CDLL(None, use_errno=True)
        n = libc.syscall(217, fd, buf, 65536)  # getdents64
        raw = buf.raw[:n]
        pos = 0
        while pos < n:
            ino, off, reclen, typ = __import__("struct").unpack_from("<QqHB", raw, pos)
            name = raw[pos + 19:pos + reclen].split(b"\\0")[0].decode()
            print(name, typ)
            pos += reclen
    """, m.path).stdout
    types = dict(line.split() for line in out.splitlines())
    assert types == {".": "4", "..": "4", "d": "4", "l": "10", "p": "1", "f": "8"}


# ---------------------------------------------------------------------------------------------
# Links


@needs_fuse
def test_symlink_readlink(m: MountedFS) -> None:
    os.symlink("some/where", m.join("l"))
    assert os.readlink(m.join("l")) == "some/where"
    st = os.lstat(m.join("l"))
    assert stat.S_ISLNK(st.st_mode) and st.st_size == len("some/where")
    with raises_errno(errno.ENOENT):
        os.stat(m.join("l"))
    with open(m.join("t"), "w") as f:
        f.write("via link")
    os.symlink("t", m.join("l2"))
    with open(m.join("l2")) as f:
        assert f.read() == "via link"
    with raises_errno(errno.EEXIST):
        os.symlink("x", m.join("l"))
    with raises_errno(errno.EINVAL):
        os.readlink(m.join("t"))


@needs_fuse
def test_hard_links(m: MountedFS) -> None:
    a, b = m.join("a"), m.join("b")
    with open(a, "w") as f:
        f.write("shared")
    os.link(a, b)
    sa, sb = os.stat(a), os.stat(b)
    assert sa.st_ino == sb.st_ino and sa.st_nlink == 2
    os.mkdir(m.join("d"))
    os.link(a, m.join("d", "c"))
    assert os.stat(a).st_nlink == 3
    with raises_errno(errno.EEXIST):
        os.link(a, b)
    with raises_errno(errno.EPERM):
        os.link(m.join("d"), m.join("dlink"))
    os.unlink(a)
    assert os.stat(b).st_nlink == 2
    with open(m.join("d", "c")) as f:
        assert f.read() == "shared"
    os.unlink(b)
    os.unlink(m.join("d", "c"))
    with raises_errno(errno.ENOENT):
        os.stat(b)


@needs_fuse
def test_unlinked_open_file_lives_on(m: MountedFS) -> None:
    p = m.join("f")
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.write(fd, b"still here")
        os.unlink(p)
        assert os.fstat(fd).st_nlink == 0
        assert os.pread(fd, 100, 0) == b"still here"
        os.pwrite(fd, b"S", 0)
        assert os.pread(fd, 100, 0) == b"Still here"
        assert memfs(m).inode_count == 2
    finally:
        os.close(fd)
    fs = memfs(m)
    assert wait_for(lambda: fs.inode_count == 1), fs.inode_count


# ---------------------------------------------------------------------------------------------
# Rename


@needs_fuse
def test_rename(m: MountedFS) -> None:
    a, b = m.join("a"), m.join("b")
    with open(a, "w") as f:
        f.write("A")
    with open(b, "w") as f:
        f.write("B")
    ino_a = os.stat(a).st_ino
    os.rename(a, m.join("a2"))
    assert os.stat(m.join("a2")).st_ino == ino_a
    with raises_errno(errno.ENOENT):
        os.stat(a)
    os.rename(m.join("a2"), b)  # over an existing file
    with open(b) as f:
        assert f.read() == "A"
    assert sorted(os.listdir(m.path)) == ["b"]
    # Directories.
    os.makedirs(m.join("d1", "sub", "deep"))
    os.mkdir(m.join("d2"))
    os.mkdir(m.join("empty"))
    with raises_errno(errno.EINVAL):
        os.rename(m.join("d1"), m.join("d1", "sub", "d1"))
    with raises_errno(errno.EISDIR):
        os.rename(b, m.join("d2"))
    with raises_errno(errno.ENOTDIR):
        os.rename(m.join("d2"), b)
    with raises_errno(errno.ENOTEMPTY):
        os.rename(m.join("d2"), m.join("d1"))
    with raises_errno(errno.ENOENT):
        os.rename(m.join("nope"), m.join("x"))
    os.rename(m.join("d1", "sub"), m.join("empty"))  # over an empty directory, across parents
    assert os.listdir(m.join("empty")) == ["deep"]
    assert os.stat(m.join("d1")).st_nlink == 2
    assert os.stat(m.path).st_nlink == 2 + 3
    os.rename(m.join("empty", "deep"), m.join("d2", "deep"))
    assert os.stat(m.join("d2")).st_nlink == 3 and os.stat(m.join("empty")).st_nlink == 2


@needs_fuse
def test_renameat2(m: MountedFS) -> None:
    a, b = m.join("a"), m.join("b")
    with open(a, "w") as f:
        f.write("A")
    with open(b, "w") as f:
        f.write("B")
    with raises_errno(errno.EEXIST):
        renameat2(a, b, RENAME_NOREPLACE)
    renameat2(a, m.join("c"), RENAME_NOREPLACE)
    renameat2(m.join("c"), a, RENAME_NOREPLACE)
    renameat2(a, b, RENAME_EXCHANGE)
    with open(a) as f:
        assert f.read() == "B"
    with open(b) as f:
        assert f.read() == "A"
    with raises_errno(errno.ENOENT):
        renameat2(a, m.join("missing"), RENAME_EXCHANGE)
    with raises_errno(errno.EINVAL):
        renameat2(a, b, RENAME_EXCHANGE | RENAME_NOREPLACE)
    # Exchange a file and a directory in different parents.
    os.makedirs(m.join("d", "inner"))
    os.mkdir(m.join("e"))
    renameat2(a, m.join("d"), RENAME_EXCHANGE)
    assert os.path.isdir(a) and os.listdir(a) == ["inner"]
    with open(m.join("d")) as f:
        assert f.read() == "B"
    renameat2(m.join("a", "inner"), m.join("d"), RENAME_EXCHANGE)
    assert os.path.isfile(m.join("a", "inner")) and os.path.isdir(m.join("d"))
    assert os.stat(m.join("a")).st_nlink == 2
    assert os.stat(m.path).st_nlink == 2 + 3  # a, d, e


@needs_fuse
@needs_root
def test_rename_whiteout(m: MountedFS) -> None:
    a = m.join("a")
    with open(a, "w") as f:
        f.write("A")
    renameat2(a, m.join("b"), RENAME_WHITEOUT)
    st = os.lstat(a)
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    with open(m.join("b")) as f:
        assert f.read() == "A"


# ---------------------------------------------------------------------------------------------
# Attributes


@needs_fuse
def test_xattrs(m: MountedFS) -> None:
    p = m.join("f")
    with open(p, "w"):
        pass
    assert os.listxattr(p) == []
    os.setxattr(p, "user.one", b"1")
    os.setxattr(p, "user.two", b"22")
    assert os.getxattr(p, "user.one") == b"1"
    assert sorted(os.listxattr(p)) == ["user.one", "user.two"]
    with raises_errno(errno.EEXIST):
        os.setxattr(p, "user.one", b"x", os.XATTR_CREATE)
    with raises_errno(errno.ENODATA):
        os.setxattr(p, "user.three", b"x", os.XATTR_REPLACE)
    os.setxattr(p, "user.one", b"one", os.XATTR_REPLACE)
    assert os.getxattr(p, "user.one") == b"one"
    os.setxattr(p, "user.big", b"v" * 60000)
    assert os.getxattr(p, "user.big") == b"v" * 60000
    with raises_errno(errno.ENODATA):
        os.getxattr(p, "user.nope")
    os.removexattr(p, "user.one")
    with raises_errno(errno.ENODATA):
        os.removexattr(p, "user.one")
    with raises_errno(errno.ENODATA):
        os.getxattr(p, "user.one")
    assert sorted(os.listxattr(p)) == ["user.big", "user.two"]
    os.setxattr(p, "user.empty", b"")
    assert os.getxattr(p, "user.empty") == b""
    # Directories take user xattrs too.
    os.mkdir(m.join("d"))
    os.setxattr(m.join("d"), "user.d", b"dir")
    assert os.getxattr(m.join("d"), "user.d") == b"dir"


def _fill_xattrs(path: str, value: bytes) -> int:
    """Set user.n00000, user.n00001, ... (12 bytes each, with the NUL) to ``value`` until ENOSPC;
    how many were set."""
    n = 0
    while True:
        try:
            os.setxattr(path, b"user.n%05d" % n, value, os.XATTR_CREATE)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
            return n
        n += 1


@needs_fuse
def test_xattr_space(m: MountedFS) -> None:
    """One inode's xattrs (names + 1, values) fit in XATTR_SPACE bytes; more is ENOSPC, as on ext4."""
    p, q = m.join("f"), m.join("g")
    for f in (p, q):
        with open(f, "w"):
            pass
    value = b"v" * 16
    n = _fill_xattrs(p, value)
    assert n == XATTR_SPACE // (12 + 16)
    free = XATTR_SPACE - n * (12 + 16)
    with raises_errno(errno.ENODATA):
        os.getxattr(p, b"user.n%05d" % n)  # the refused one is not there
    assert len(os.listxattr(p)) == n
    assert os.getxattr(p, b"user.n00000") == value
    os.setxattr(p, b"user.n00000", b"w" * 16, os.XATTR_REPLACE)  # same size: fits
    os.setxattr(p, b"user.n00000", b"w" * (16 + free))  # takes the last free bytes
    with raises_errno(errno.ENOSPC):
        os.setxattr(p, b"user.n00000", b"w" * (17 + free))
    assert os.getxattr(p, b"user.n00000") == b"w" * (16 + free)
    with raises_errno(errno.ENOSPC):
        os.setxattr(p, b"user.new", b"")  # 9 bytes, none free
    os.removexattr(p, b"user.n00001")  # frees 28
    os.setxattr(p, b"user.new", b"x" * 19)  # 9 + 19
    with raises_errno(errno.ENOSPC):
        os.setxattr(p, b"user.n00001", value)
    os.setxattr(p, b"user.new", b"x")  # smaller values always fit
    # Each inode has its own space; the kernel's own limits come first.
    os.setxattr(q, b"user.big", b"v" * (1 << 16))
    with raises_errno(errno.E2BIG):
        os.setxattr(q, b"user.bigger", b"v" * ((1 << 16) + 1))
    with raises_errno(errno.ERANGE):
        os.setxattr(q, b"user." + b"n" * 251, b"")
    assert memfs(m).node(os.stat(q).st_ino).xattr_used == len(b"user.big") + 1 + (1 << 16)  # type: ignore[attr-defined]


@needs_fuse
def test_xattr_space_ext4_like() -> None:
    """xattr_space=4096 takes about what ext4 takes in one inode (ext4 on / here: 104 of stress-ng's
    xattrs; memfs: 4096 // (len("user.var_N") + 1 + len("orig-value-N")))."""
    with mounted(MemFS(xattr_space=4096)) as m:
        p = m.join("f")
        with open(p, "w"):
            pass
        used = i = 0
        while True:
            name, value = b"user.var_%d" % i, b"orig-value-%d" % i
            try:
                os.setxattr(p, name, value, os.XATTR_CREATE)
            except OSError as e:
                assert e.errno == errno.ENOSPC
                break
            used, i = used + len(name) + 1 + len(value), i + 1
        assert used <= 4096 < used + len(name) + 1 + len(value)
        assert 100 <= i <= 200
        with raises_errno(errno.ENOSPC):
            os.setxattr(m.join("."), b"user.big", b"v" * 60000)  # ext4 without ea_inode refuses it too


def test_xattr_space_bad() -> None:
    with pytest.raises(ValueError, match="xattr_space"):
        MemFS(xattr_space=-1)


@needs_fuse
def test_chmod_chown_utime(m: MountedFS) -> None:
    p = m.join("f")
    with open(p, "w"):
        pass
    os.chmod(p, 0o4751)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o4751
    assert stat.S_ISREG(os.stat(p).st_mode)
    if os.geteuid() == 0:
        c0 = os.stat(p).st_ctime_ns
        time.sleep(0.01)
        os.chown(p, 1234, 5678)
        st = os.stat(p)
        assert (st.st_uid, st.st_gid) == (1234, 5678)
        assert st.st_ctime_ns > c0
        assert not st.st_mode & stat.S_ISUID  # chown clears set-user-id
        os.chown(p, -1, 42)
        assert (os.stat(p).st_uid, os.stat(p).st_gid) == (1234, 42)
    os.utime(p, ns=(1_000_000_123, 2_000_000_456))
    st = os.stat(p)
    assert st.st_atime_ns == 1_000_000_123 and st.st_mtime_ns == 2_000_000_456
    os.utime(p, ns=(-5_000_000_000, 0))  # before the epoch
    assert os.stat(p).st_atime_ns == -5_000_000_000
    before = time.time_ns()
    os.utime(p)  # both UTIME_NOW
    st = os.stat(p)
    assert st.st_mtime_ns >= before - 10_000_000 and st.st_atime_ns >= before - 10_000_000
    # A symlink's own mode stays 0777; chmod follows it.
    os.symlink("f", m.join("l"))
    os.chmod(m.join("l"), 0o600)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    assert stat.S_IMODE(os.lstat(m.join("l")).st_mode) == 0o777


@needs_fuse
def test_mknod_fifo_and_devices(m: MountedFS) -> None:
    os.mkfifo(m.join("fifo"), 0o640)
    st = os.stat(m.join("fifo"))
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640 & ~_umask()
    # The fifo works (the kernel runs it locally).
    fd_r = os.open(m.join("fifo"), os.O_RDONLY | os.O_NONBLOCK)
    fd_w = os.open(m.join("fifo"), os.O_WRONLY)
    os.write(fd_w, b"through the pipe")
    assert os.read(fd_r, 100) == b"through the pipe"
    os.close(fd_w)
    os.close(fd_r)
    if os.geteuid() == 0:
        os.mknod(m.join("null"), stat.S_IFCHR | 0o666, os.makedev(1, 3))
        st = os.stat(m.join("null"))
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
        os.mknod(m.join("blk"), stat.S_IFBLK | 0o600, os.makedev(259, 70000))
        st = os.stat(m.join("blk"))
        assert stat.S_ISBLK(st.st_mode)
        assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (259, 70000)
    os.mknod(m.join("reg"), stat.S_IFREG | 0o600)
    assert stat.S_ISREG(os.stat(m.join("reg")).st_mode)
    import socket

    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(m.join("sock"))
        assert stat.S_ISSOCK(os.stat(m.join("sock")).st_mode)
    finally:
        s.close()
    with raises_errno(errno.EEXIST):
        os.mkfifo(m.join("fifo"))


@needs_fuse
def test_statx_btime(m: MountedFS) -> None:
    before = time.time_ns()
    p = m.join("f")
    with open(p, "w") as f:
        f.write("x")
    after = time.time_ns()
    sx = statx(p, STATX_BASIC_STATS | STATX_BTIME)
    assert sx["mask"] & STATX_BTIME
    assert sx["mask"] & STATX_BASIC_STATS == STATX_BASIC_STATS
    assert before - 10_000_000 <= sx["btime"] <= after + 10_000_000
    st = os.stat(p)
    assert sx["ino"] == st.st_ino and sx["size"] == 1 and sx["nlink"] == 1
    assert sx["mode"] == st.st_mode
    time.sleep(0.01)
    with open(p, "a") as f:
        f.write("y")
    sx2 = statx(p, STATX_BASIC_STATS | STATX_BTIME)
    assert sx2["btime"] == sx["btime"] and sx2["mtime"] > sx["btime"]


@needs_fuse
def test_statvfs(m: MountedFS) -> None:
    sv = os.statvfs(m.path)
    assert sv.f_bsize == 4096 and sv.f_frsize == 4096
    assert sv.f_namemax == 255
    assert sv.f_blocks > 0 and 0 <= sv.f_bfree <= sv.f_blocks and sv.f_bavail <= sv.f_bfree
    assert sv.f_files > 0 and 0 < sv.f_ffree < sv.f_files
    with open(m.join("f"), "wb") as f:
        f.write(os.urandom(4 * MiB))
    sv2 = os.statvfs(m.path)
    assert sv2.f_bfree <= sv.f_bfree - (4 * MiB) // 4096
    assert sv2.f_ffree == sv.f_ffree - 1


@needs_fuse
def test_access(m: MountedFS) -> None:
    p = m.join("f")
    with open(p, "w"):
        pass
    os.chmod(p, 0o644)
    assert os.access(p, os.R_OK | os.W_OK)
    assert os.access(p, os.F_OK)
    if os.geteuid() == 0:
        assert not os.access(p, os.X_OK)  # root needs some x bit to execute
        os.chmod(p, 0o001)
        assert os.access(p, os.X_OK)
        assert os.access(p, os.R_OK | os.W_OK)  # root reads and writes anyway
    assert os.access(m.path, os.X_OK)
    assert not os.access(m.join("nope"), os.F_OK)


# ---------------------------------------------------------------------------------------------
# Space: fallocate, holes, copy_file_range


@needs_fuse
def test_fallocate(m: MountedFS) -> None:
    p = m.join("f")
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fallocate(fd, 0, 0, 3 * CHUNK)
        assert os.fstat(fd).st_size == 3 * CHUNK
        assert os.fstat(fd).st_blocks >= 3 * CHUNK // 512
        assert os.pread(fd, 3 * CHUNK, 0) == bytes(3 * CHUNK)
        fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, 10 * CHUNK)
        assert os.fstat(fd).st_size == 3 * CHUNK
        data = os.urandom(4 * CHUNK)
        os.pwrite(fd, data, 0)
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 100, 2 * CHUNK)
        assert os.fstat(fd).st_size == 4 * CHUNK
        expect = data[:100] + bytes(2 * CHUNK) + data[100 + 2 * CHUNK:]
        assert os.pread(fd, 4 * CHUNK, 0) == expect
        with open(p, "rb") as f:  # through another open file, too
            assert f.read() == expect
        with raises_errno(errno.EOPNOTSUPP):
            fallocate(fd, FALLOC_FL_ZERO_RANGE, 0, 10)
        with raises_errno(errno.EOPNOTSUPP):
            fallocate(fd, FALLOC_FL_PUNCH_HOLE, 0, 10)  # punching needs KEEP_SIZE
        with raises_errno(errno.EINVAL):
            fallocate(fd, 0, 0, 0)
        fallocate(fd, 0, 10 * CHUNK, 1)
        assert os.fstat(fd).st_size == 10 * CHUNK + 1
    finally:
        os.close(fd)


@needs_fuse
def test_seek_data_hole(m: MountedFS) -> None:
    p = m.join("sparse")
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.pwrite(fd, b"a" * CHUNK, 0)
        os.pwrite(fd, b"b" * CHUNK, MiB)
        os.ftruncate(fd, 2 * MiB)
        assert os.lseek(fd, 0, os.SEEK_DATA) == 0
        assert os.lseek(fd, 0, os.SEEK_HOLE) == CHUNK
        assert os.lseek(fd, 100, os.SEEK_HOLE) == CHUNK
        assert os.lseek(fd, CHUNK, os.SEEK_DATA) == MiB
        assert os.lseek(fd, MiB + 10, os.SEEK_DATA) == MiB + 10
        assert os.lseek(fd, MiB, os.SEEK_HOLE) == MiB + CHUNK
        assert os.lseek(fd, MiB + CHUNK, os.SEEK_HOLE) == MiB + CHUNK
        with raises_errno(errno.ENXIO):
            os.lseek(fd, MiB + CHUNK, os.SEEK_DATA)  # only a hole up to EOF
        with raises_errno(errno.ENXIO):
            os.lseek(fd, 2 * MiB, os.SEEK_DATA)
        with raises_errno(errno.ENXIO):
            os.lseek(fd, 2 * MiB, os.SEEK_HOLE)
        with raises_errno(errno.ENXIO):
            os.lseek(fd, 3 * MiB, os.SEEK_HOLE)
        # Punching a whole chunk makes a hole there.
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, CHUNK)
        assert os.lseek(fd, 0, os.SEEK_DATA) == MiB
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 0
        assert os.pread(fd, 10, 0) == bytes(10)
        # The blocks count follows the data.
        assert os.fstat(fd).st_blocks * 512 < 2 * MiB
    finally:
        os.close(fd)


@needs_fuse
def test_copy_file_range(m: MountedFS) -> None:
    src, dst = m.join("src"), m.join("dst")
    data = os.urandom(3 * CHUNK + 77)
    with open(src, "wb") as f:
        f.write(data)
    fi = os.open(src, os.O_RDONLY)
    fo = os.open(dst, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        n = os.copy_file_range(fi, fo, len(data), 0, 0)
        assert n == len(data)
        n = os.copy_file_range(fi, fo, 1000, 10, 5 * CHUNK)
        assert n == 1000
        assert os.copy_file_range(fi, fo, 100, len(data), 0) == 0  # at EOF
    finally:
        os.close(fi)
        os.close(fo)
    with open(dst, "rb") as f:
        got = f.read()
    assert got[: len(data)] == data
    assert got[len(data) : 5 * CHUNK] == bytes(5 * CHUNK - len(data))
    assert got[5 * CHUNK :] == data[10:1010]


# ---------------------------------------------------------------------------------------------
# Locks

_LOCK_CHILD = """
    import errno, fcntl, os, struct, sys
    path, what = sys.argv[1], sys.argv[2]
    fd = os.open(path, os.O_RDWR)
    if what == "try":
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 0)
        except OSError as e:
            print("busy", errno.errorcode[e.errno])
        else:
            print("got")
    elif what == "try-read":
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 10, 50)
        except OSError as e:
            print("busy", errno.errorcode[e.errno])
        else:
            print("got")
    elif what == "getlk":
        fl = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        res = fcntl.fcntl(fd, fcntl.F_GETLK, fl)
        typ, _, start, length, pid = struct.unpack("hhqqi4x", res)
        print(typ, start, length, pid)
    elif what == "wait":
        print("waiting", flush=True)
        fcntl.lockf(fd, fcntl.LOCK_EX, 10, 0)
        print("got", flush=True)
    elif what == "interrupted":
        import signal
        def alarm(*a):
            raise TimeoutError
        signal.signal(signal.SIGALRM, alarm)
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX, 10, 0)
        except TimeoutError:
            print("interrupted")
        else:
            print("got")
"""


@needs_fuse
def test_posix_locks_between_processes(m: MountedFS) -> None:
    p = m.join("locked")
    with open(p, "wb") as f:
        f.write(bytes(100))
    fd = os.open(p, os.O_RDWR)
    try:
        assert child(_LOCK_CHILD, p, "try").stdout.split() == ["got"]  # its lock died with it
        fcntl.lockf(fd, fcntl.LOCK_EX, 10, 0)  # bytes 0..9
        assert child(_LOCK_CHILD, p, "try").stdout.split() == ["busy", "EAGAIN"]
        assert child(_LOCK_CHILD, p, "try-read").stdout.split() == ["got"]  # 50..59 is free
        typ, start, length, pid = map(int, child(_LOCK_CHILD, p, "getlk").stdout.split())
        assert (typ, start, length) == (fcntl.F_WRLCK, 0, 10)
        assert pid == os.getpid()
        fcntl.lockf(fd, fcntl.LOCK_UN, 10, 0)
        assert child(_LOCK_CHILD, p, "try").stdout.split() == ["got"]
        typ, *_ = map(int, child(_LOCK_CHILD, p, "getlk").stdout.split())
        assert typ == fcntl.F_UNLCK

        # A blocked F_SETLKW waits until the lock is dropped.
        fcntl.lockf(fd, fcntl.LOCK_EX, 10, 0)
        w = spawn(_LOCK_CHILD, p, "wait")
        try:
            assert w.stdout is not None
            assert w.stdout.readline().strip() == "waiting"
            time.sleep(0.5)
            assert w.poll() is None
            fcntl.lockf(fd, fcntl.LOCK_UN, 10, 0)
            out, err = w.communicate(timeout=10)
            assert out.strip() == "got", err
        finally:
            if w.poll() is None:
                w.kill()
                w.wait()

        # Closing any descriptor of the file drops the process's locks (FLUSH carries the owner).
        fcntl.lockf(fd, fcntl.LOCK_EX, 10, 0)
        assert child(_LOCK_CHILD, p, "try").stdout.split() == ["busy", "EAGAIN"]
        os.close(os.open(p, os.O_RDONLY))
        assert child(_LOCK_CHILD, p, "try").stdout.split() == ["got"]

        # A signal interrupts a waiting F_SETLKW; the interrupted waiter must not get the lock later.
        fcntl.lockf(fd, fcntl.LOCK_EX, 10, 0)
        assert child(_LOCK_CHILD, p, "interrupted").stdout.split() == ["interrupted"]
        fcntl.lockf(fd, fcntl.LOCK_UN, 10, 0)
        assert child(_LOCK_CHILD, p, "try").stdout.split() == ["got"]
    finally:
        os.close(fd)


@needs_fuse
def test_posix_lock_ranges_in_one_process(m: MountedFS) -> None:
    p = m.join("f")
    with open(p, "wb") as f:
        f.write(bytes(100))
    fd = os.open(p, os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX, 0, 0)  # whole file, to EOF and beyond
        fcntl.lockf(fd, fcntl.LOCK_UN, 20, 10)  # a hole at 10..29
        fcntl.lockf(fd, fcntl.LOCK_SH, 20, 45)  # 45..64 becomes shared
        assert child(_LOCK_CHILD, p, "try-read").stdout.split() == ["got"]  # 50..59
        assert child(_LOCK_CHILD, p, "try").stdout.split() == ["busy", "EAGAIN"]  # 0..9
        typ, start, length, pid = map(int, child(_LOCK_CHILD, p, "getlk").stdout.split())
        assert pid == os.getpid()
        assert (typ, start, length) in {
            (fcntl.F_WRLCK, 0, 10), (fcntl.F_WRLCK, 30, 15), (fcntl.F_RDLCK, 45, 20), (fcntl.F_WRLCK, 65, 0)}
        fcntl.lockf(fd, fcntl.LOCK_UN, 10, 0)
        fcntl.lockf(fd, fcntl.LOCK_UN, 15, 30)
        fcntl.lockf(fd, fcntl.LOCK_UN, 0, 65)
        typ, start, length, pid = map(int, child(_LOCK_CHILD, p, "getlk").stdout.split())
        assert (typ, start, length) == (fcntl.F_RDLCK, 45, 20)
        fcntl.lockf(fd, fcntl.LOCK_SH, 0, 0)  # merges into one shared lock
        locked = [n for n in memfs(m).nodes.values() if isinstance(n, File) and n.locks.posix]
        assert [lk[1:4] for lk in locked[0].locks.posix] == [(fcntl.F_RDLCK, 0, 0x7FFFFFFFFFFFFFFF)]
    finally:
        os.close(fd)


@needs_fuse
def test_flock(m: MountedFS) -> None:
    p = m.join("f")
    with open(p, "w"):
        pass
    a = os.open(p, os.O_RDWR)
    b = os.open(p, os.O_RDWR)
    try:
        fcntl.flock(a, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(BlockingIOError):
            fcntl.flock(b, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(BlockingIOError):
            fcntl.flock(b, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(a, fcntl.LOCK_SH)  # downgrade
        fcntl.flock(b, fcntl.LOCK_SH | fcntl.LOCK_NB)
        with pytest.raises(BlockingIOError):
            fcntl.flock(b, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(a, fcntl.LOCK_UN)
        fcntl.flock(b, fcntl.LOCK_EX | fcntl.LOCK_NB)  # upgrade
        os.close(b)  # the last close drops it
        b = -1
        fcntl.flock(a, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # dup'ed descriptors share the open file description and its lock.
        c = os.dup(a)
        fcntl.flock(c, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(c)
        # Another process blocks until it is released.
        w = spawn("""
            import fcntl, os, sys
            fd = os.open(sys.argv[1], os.O_RDWR)
            print("waiting", flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
            print("got", flush=True)
        """, p)
        try:
            assert w.stdout is not None
            assert w.stdout.readline().strip() == "waiting"
            time.sleep(0.5)
            assert w.poll() is None
            fcntl.flock(a, fcntl.LOCK_UN)
            out, err = w.communicate(timeout=10)
            assert out.strip() == "got", err
        finally:
            if w.poll() is None:
                w.kill()
                w.wait()
    finally:
        os.close(a)
        if b >= 0:
            os.close(b)


# ---------------------------------------------------------------------------------------------
# O_TMPFILE, poll, ioctl


@needs_fuse
def test_o_tmpfile(m: MountedFS) -> None:
    os.mkdir(m.join("d"))
    fd = os.open(m.join("d"), os.O_TMPFILE | os.O_RDWR, 0o600)
    try:
        os.write(fd, b"anonymous")
        assert os.listdir(m.join("d")) == []
        assert os.fstat(fd).st_nlink == 0
        linkat_follow(f"/proc/self/fd/{fd}", m.join("d", "named"))
        assert os.fstat(fd).st_nlink == 1
    finally:
        os.close(fd)
    assert os.listdir(m.join("d")) == ["named"]
    with open(m.join("d", "named"), "rb") as f:
        assert f.read() == b"anonymous"
    # One that is never linked goes away.
    fd = os.open(m.join("d"), os.O_TMPFILE | os.O_RDWR, 0o600)
    os.write(fd, b"x" * CHUNK)
    os.close(fd)
    fs = memfs(m)
    assert wait_for(lambda: fs.inode_count == 3), fs.inode_count  # root, d, named


@needs_fuse
def test_poll_and_ioctl(m: MountedFS) -> None:
    p = m.join("f")
    with open(p, "w"):
        pass
    fd = os.open(p, os.O_RDWR)
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLOUT)
        events = dict(poller.poll(1000))
        assert events[fd] & select.POLLIN and events[fd] & select.POLLOUT
        FS_IOC_GETFLAGS = 0x80086601
        with raises_errno(errno.ENOTTY):
            fcntl.ioctl(fd, FS_IOC_GETFLAGS, b"\0" * 8)
        os.fsync(fd)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    dfd = os.open(m.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


@needs_fuse
def test_shared_mmap() -> None:
    """Page-cache writeback (WRITE_CACHE) lands where the page is, even for an O_APPEND descriptor."""
    import mmap

    with mounted_process("afuse.examples.memfs:MemFS") as m:  # page faults must not wait on our GIL
        p = m.join("f")
        with open(p, "wb") as f:
            f.write(b"a" * 10000)
        with open(p, "r+b") as f:
            mm = mmap.mmap(f.fileno(), 0)
            mm[0:5] = b"hello"
            mm[8000:8003] = b"XYZ"
            mm.flush()
            mm.close()
        fd = os.open(p, os.O_RDWR | os.O_APPEND)
        try:
            mm = mmap.mmap(fd, 0)
            mm[5:6] = b"!"
            mm.flush()
            mm.close()
        finally:
            os.close(fd)
        with open(p, "rb") as f:
            data = f.read()
        assert data == b"hello!" + b"a" * 7994 + b"XYZ" + b"a" * 1997


# ---------------------------------------------------------------------------------------------
# Other users (permission checks without default_permissions)

NOBODY = 65534


@needs_fuse
@needs_root
@pytest.mark.skipif(not os.path.exists("/usr/bin/python3"), reason="no system python for the unprivileged child")
def test_other_users() -> None:
    reason = fuse_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with mounted(MemFS(), options="allow_other") as m:
        os.chmod(m.path, 0o755)
        pub = m.join("pub")
        os.mkdir(pub, 0o777)
        os.chmod(pub, 0o777)
        secret = m.join("pub", "secret")
        with open(secret, "w") as f:
            f.write("s")
        os.chmod(secret, 0o600)
        out = child("""
            import errno, os, sys
            pub = sys.argv[1]
            def attempt(fn, *a):
                try:
                    fn(*a)
                    return "ok"
                except OSError as e:
                    return errno.errorcode[e.errno]
            print(attempt(lambda: open(os.path.join(pub, "secret")).read()))
            print(attempt(os.unlink, os.path.join(os.path.dirname(pub), "nope")))
            print(attempt(os.mkdir, os.path.join(os.path.dirname(pub), "x")))
            with open(os.path.join(pub, "mine"), "w") as f:
                f.write("m")
            st = os.stat(os.path.join(pub, "mine"))
            print(st.st_uid, st.st_gid)
            print(attempt(os.chmod, os.path.join(pub, "secret"), 0o777))
            print(attempt(os.chown, os.path.join(pub, "mine"), 0, -1))
            print(int(os.access(os.path.join(pub, "secret"), os.R_OK)))
            print(int(os.access(os.path.join(pub, "mine"), os.W_OK)))
            os.chmod(os.path.join(pub, "mine"), 0o640)
            print(attempt(os.utime, os.path.join(pub, "secret"), (1, 1)))
        """, pub, user=NOBODY).stdout.split()
        assert out[0] == "EACCES"
        assert out[1] in ("EACCES", "ENOENT")
        assert out[2] == "EACCES"
        assert out[3:5] == [str(NOBODY), str(NOBODY)]
        assert out[5] == "EPERM"
        assert out[6] == "EPERM"
        assert out[7:9] == ["0", "1"]
        assert out[9] == "EPERM"
        assert stat.S_IMODE(os.stat(m.join("pub", "mine")).st_mode) == 0o640

        # Writing to a set-user-id file as another user clears the bit (the kernel asks for it).
        suid = m.join("pub", "suid")
        with open(suid, "w"):
            pass
        os.chmod(suid, 0o6777)
        child("""
            import sys
            with open(sys.argv[1], "a") as f:
                f.write("x")
        """, suid, user=NOBODY)
        st = os.stat(suid)
        assert not st.st_mode & stat.S_ISUID and st.st_size == 1

        # A setgid directory hands its group down; subdirectories inherit the bit.
        sg = m.join("sgid")
        os.mkdir(sg)
        os.chown(sg, 0, 4242)
        os.chmod(sg, 0o2777)
        child("""
            import os, sys
            open(os.path.join(sys.argv[1], "f"), "w").close()
            os.mkdir(os.path.join(sys.argv[1], "sub"))
        """, sg, user=NOBODY)
        st = os.stat(os.path.join(sg, "f"))
        assert st.st_gid == 4242 and st.st_uid == NOBODY
        st = os.stat(os.path.join(sg, "sub"))
        assert st.st_gid == 4242 and st.st_mode & stat.S_ISGID

        # Sticky directories: only the owner may remove.
        tmp = m.join("tmp")
        os.mkdir(tmp)
        os.chmod(tmp, 0o1777)
        with open(os.path.join(tmp, "roots"), "w"):
            pass
        p = child("""
            import os, sys
            try:
                os.unlink(os.path.join(sys.argv[1], "roots"))
            except PermissionError as e:
                print(e.errno)
        """, tmp, user=NOBODY)
        assert p.stdout.strip() == str(errno.EPERM)


# ---------------------------------------------------------------------------------------------
# Memory: inodes go away when the kernel forgets them


@needs_fuse
def test_inodes_are_dropped(m: MountedFS) -> None:
    fs = memfs(m)
    d = m.join("d")
    os.mkdir(d)
    for i in range(2000):
        p = os.path.join(d, str(i))
        with open(p, "wb") as f:
            f.write(b"x" * 100)
        os.stat(p)
    assert fs.inode_count == 2002
    for i in range(2000):
        os.unlink(os.path.join(d, str(i)))
    os.rmdir(d)
    assert wait_for(lambda: fs.inode_count == 1), fs.inode_count
    assert fs.pool.used == 0


# ---------------------------------------------------------------------------------------------
# Handlers called directly (no kernel): what a mount cannot easily show


def _h(nodeid: int = 1, uid: int = 0, gid: int = 0) -> tuple[int, int, int, int, int]:
    return (2, nodeid, uid, gid, 100)


def test_direct_lookup_counting_and_forget() -> None:
    async def main() -> None:
        fs = MemFS()
        e, h = await fs.create(r.CreateRequest(*_h(), name=b"f", flags=os.O_RDWR, mode=0o644))
        for _ in range(1000):
            await fs.lookup(r.LookupRequest(*_h(), b"f"))
        await fs.unlink(r.UnlinkRequest(*_h(), b"f"))
        assert fs.inode_count == 2  # still looked up and open
        await fs.release(r.ReleaseRequest(*_h(e.nodeid), h.fh, 0, 0, 0))
        assert fs.inode_count == 2
        await fs.forget(r.ForgetRequest(*_h(0), [r.ForgetItem(e.nodeid, 1000)]))
        assert fs.inode_count == 2
        await fs.forget(r.ForgetRequest(*_h(0), [r.ForgetItem(e.nodeid, 1)]))
        assert fs.inode_count == 1
        # Negative lookups allocate nothing.
        neg = await fs.lookup(r.LookupRequest(*_h(), b"f"))
        assert neg.nodeid == 0
        # Nodeids are never reused.
        e2 = await fs.mkdir(r.MkdirRequest(*_h(), name=b"d", mode=0o755))
        assert e2.nodeid > e.nodeid

    trio.run(main)


def test_direct_readdirplus_counts_only_taken_entries() -> None:
    async def main() -> None:
        fs = MemFS()
        ids = []
        for i in range(5):
            e = await fs.mknod(r.MknodRequest(*_h(), name=b"n%d" % i, mode=stat.S_IFREG | 0o600))
            ids.append(e.nodeid)
        od = await fs.opendir(r.OpendirRequest(*_h(), flags=0, open_flags=0))
        gen = await fs.readdirplus(r.ReaddirplusRequest(*_h(), od.fh, 0, 4096))
        assert isinstance(gen, AsyncGenerator)
        taken = [await gen.__anext__() for _ in range(4)]  # ".", "..", n0, n1 ...
        await gen.aclose()  # ... and the buffer was full at n1: n1 was not taken
        assert [d.name for d in taken] == [b".", b"..", b"n0", b"n1"]
        counts = [fs.nodes[i].lookups for i in ids]
        assert counts == [2, 1, 1, 1, 1]
        # Resuming after n0's offset yields n1 next.
        listing = await fs.readdir(r.ReaddirRequest(*_h(), od.fh, taken[2].offset, 4096))
        assert isinstance(listing, Generator)
        assert [d.name if isinstance(d, DirEntry) else d[0] for d in listing] == [b"n1", b"n2", b"n3", b"n4"]

    trio.run(main)


def test_direct_setlk_waits_and_is_cancellable() -> None:
    async def main() -> None:
        fs = MemFS()
        e, h = await fs.create(r.CreateRequest(*_h(), name=b"f", flags=os.O_RDWR, mode=0o644))
        eof = 0x7FFFFFFFFFFFFFFF
        await fs.setlk(r.SetlkRequest(*_h(e.nodeid), h.fh, 1, Lock(0, eof, 1, 10), 0, False))
        with trio.move_on_after(0.1) as cs:
            await fs.setlk(r.SetlkRequest(*_h(e.nodeid), h.fh, 2, Lock(5, 5, 0, 20), 0, True))
        assert cs.cancelled_caught
        lk = await fs.getlk(r.GetlkRequest(*_h(e.nodeid), h.fh, 3, Lock(0, 0, 0, 30), 0))
        assert (lk.start, lk.end, lk.type, lk.pid) == (0, eof, 1, 10)
        got = []
        async with trio.open_nursery() as n:
            async def waiter() -> None:
                await fs.setlk(r.SetlkRequest(*_h(e.nodeid), h.fh, 2, Lock(5, 5, 0, 20), 0, True))
                got.append(1)

            n.start_soon(waiter)
            await trio.sleep(0.05)
            assert not got
            await fs.release(r.ReleaseRequest(*_h(e.nodeid), h.fh, 0, 0, 1))
        assert got
        # Deadlock between two owners is detected.
        e2, h2 = await fs.create(r.CreateRequest(*_h(), name=b"g", flags=os.O_RDWR, mode=0o644))
        await fs.setlk(r.SetlkRequest(*_h(e2.nodeid), h2.fh, 1, Lock(0, 0, 1, 10), 0, False))
        await fs.setlk(r.SetlkRequest(*_h(e2.nodeid), h2.fh, 2, Lock(1, 1, 1, 20), 0, False))
        async with trio.open_nursery() as n:
            n.start_soon(fs.setlk, r.SetlkRequest(*_h(e2.nodeid), h2.fh, 1, Lock(1, 1, 1, 10), 0, True))
            await trio.sleep(0.02)
            try:
                await fs.setlk(r.SetlkRequest(*_h(e2.nodeid), h2.fh, 2, Lock(0, 0, 1, 20), 0, True))
            except FUSEError as exc:
                assert exc.errno == errno.EDEADLK
            else:
                raise AssertionError("no EDEADLK")
            await fs.setlk(r.SetlkRequest(*_h(e2.nodeid), h2.fh, 2, Lock(0, eof, 2, 20), 0, False))

    trio.run(main)


def test_direct_random_file_ops_match_a_model() -> None:
    """Writes, truncates, punches, fallocates and copies at random offsets, checked against a bytearray."""
    import random

    async def main() -> None:
        rng = random.Random(1234)
        fs = MemFS()
        e, h = await fs.create(r.CreateRequest(*_h(), name=b"f", flags=os.O_RDWR, mode=0o644))
        e2, h2 = await fs.create(r.CreateRequest(*_h(), name=b"g", flags=os.O_RDWR, mode=0o644))
        model = bytearray()
        span = 5 * CHUNK

        def at() -> int:
            return rng.choice([0, CHUNK, 2 * CHUNK - 1, rng.randrange(span), rng.randrange(span)])

        for step in range(3000):
            op = rng.randrange(6)
            if op == 0:
                off, data = at(), rng.randbytes(rng.choice([1, 100, CHUNK, CHUNK + 7, 3 * CHUNK]))
                await fs.write(r.WriteRequest(*_h(e.nodeid), h.fh, off, data, 0, 0, 0))
                if len(model) < off:
                    model.extend(bytes(off - len(model)))
                model[off : off + len(data)] = data
            elif op == 1:
                size = at()
                await fs.setattr(r.SetattrRequest(*_h(e.nodeid), FAttr.SIZE, h.fh, size, None, None, None,
                                                  None, None, None, None, False, False, False))
                del model[size:]
                model.extend(bytes(size - len(model)))
            elif op == 2:
                off, length = at(), rng.randrange(1, 2 * CHUNK)
                await fs.fallocate(r.FallocateRequest(*_h(e.nodeid), h.fh, off, length, 3))
                end = min(off + length, len(model))
                if off < end:
                    model[off:end] = bytes(end - off)
            elif op == 3:
                off, length = at(), rng.randrange(1, 2 * CHUNK)
                keep = rng.random() < 0.5
                await fs.fallocate(r.FallocateRequest(*_h(e.nodeid), h.fh, off, length, 1 if keep else 0))
                if not keep and off + length > len(model):
                    model.extend(bytes(off + length - len(model)))
            elif op == 4:
                off, size = at(), rng.randrange(1, 3 * CHUNK)
                got = await fs.read(r.ReadRequest(*_h(e.nodeid), h.fh, off, size, 0, 0, 0))
                assert got == bytes(model[off : off + size]), step
            else:
                # Copy a range to g and compare g wholesale with the model's range.
                off, length = at(), rng.randrange(1, 3 * CHUNK)
                await fs.setattr(r.SetattrRequest(*_h(e2.nodeid), FAttr.SIZE, h2.fh, 0, None, None, None,
                                                  None, None, None, None, False, False, False))
                n = await fs.copy_file_range(r.CopyFileRangeRequest(
                    *_h(e.nodeid), h.fh, off, e2.nodeid, h2.fh, 3, length, 0, True))
                expect = bytes(3) + bytes(model[off : off + length]) if n else b""
                got = await fs.read(r.ReadRequest(*_h(e2.nodeid), h2.fh, 0, 4 * CHUNK, 0, 0, 0))
                assert n == max(0, min(length, len(model) - off)) and got == expect, step
            attr = await fs.getattr(r.GetattrRequest(*_h(e.nodeid), None))
            assert attr.size == len(model), step
            if model and rng.random() < 0.2:
                # SEEK_HOLE / SEEK_DATA agree with the bytes: data is never reported as a hole.
                pos = rng.randrange(len(model))
                hole = await fs.lseek(r.LseekRequest(*_h(e.nodeid), h.fh, pos, 4))
                assert pos <= hole <= len(model)
                assert not any(model[hole : hole + 1]) or hole == len(model)
                try:
                    data_at = await fs.lseek(r.LseekRequest(*_h(e.nodeid), h.fh, pos, 3))
                except FUSEError as exc:
                    assert exc.errno == errno.ENXIO
                    data_at = len(model)
                assert pos <= data_at <= len(model) and not any(model[pos:data_at])
        used = sum(len(n.data.chunks) for n in fs.nodes.values()
                   if isinstance(n, File) and isinstance(n.data, SparseData))
        assert used == fs.pool.used

    trio.run(main)


def test_directory_offsets_survive_a_snapshot() -> None:
    """A successor answers the directory offsets its predecessor gave the kernel: the offsets
    (with the gaps removals leave) are in the snapshot, and kept from a directory's start, so a
    journal redone makes them alike (a listing continued across a takeover loses no name)."""
    import json

    from afuse.examples.memfs import Dir

    fs = MemFS()
    root = fs.root
    assert isinstance(root, Dir)
    d = Dir(fs, stat.S_IFDIR | 0o755, 0, 0, root)
    root.add_child(b"d", d)
    for i in range(40):
        d.add_child(b"f%02d" % i, File(fs, stat.S_IFREG | 0o644, 0, 0))
    for i in range(0, 40, 3):
        d.remove_child(b"f%02d" % i)  # gaps
    d.add_child(b"late", File(fs, stat.S_IFREG | 0o644, 0, 0))
    assert d._cookies is not None
    before = dict(d._cookies.by_name)
    assert max(before.values()) > len(before) + 2  # there are gaps to keep
    successor = MemFS()
    successor.restore_state(json.loads(json.dumps(fs.dump_state())))
    d2 = successor.root.children[b"d"]  # type: ignore[index]
    assert d2._cookies is not None and d2._cookies.by_name == before
    offset = before[b"f20"]  # the kernel continues after this entry
    assert d2._cookies.after(offset) == d._cookies.after(offset)
    d2.add_child(b"new", File(successor, stat.S_IFREG | 0o644, 0, 0))
    assert d2._cookies.by_name[b"new"] == d._cookies.next  # new names still come after every old one
