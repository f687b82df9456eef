"""File contents kept in a directory, one sparse file per inode, opened lazily (memfs ``--state-dir``).

:class:`ContentStore` is the directory; :class:`StoredData` is one file's contents in it, with the
interface of :class:`afuse.nodes.sparse.SparseData`. Every change is written through with
``pwrite``/``ftruncate``/``fallocate`` before the handler returns, so a daemon killed by SIGKILL
loses nothing it acknowledged (the writes are in the page cache, where the successor reads them).
Nothing is read or opened until a request needs it: a successor taking a mount over does not
touch the contents, however large. While the store is :attr:`ContentStore.replaying` (a journal
being redone), changes are not applied again: the files already hold their final contents.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
from collections import OrderedDict

from ..errors import FUSEError
from .sparse import MAX_FILE_SIZE, ChunkPool

__all__ = ["ContentStore", "StoredData"]

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate64
_fallocate.restype, _fallocate.argtypes = ctypes.c_int, [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_KEEP_SIZE, _PUNCH_HOLE = 1, 2


def _falloc(fd: int, mode: int, off: int, length: int) -> None:
    if _fallocate(fd, mode, off, length) < 0:
        raise FUSEError(ctypes.get_errno())


class ContentStore:
    """Directory ``path`` holding one file per inode serial; at most ``max_open`` kept open."""

    def __init__(self, path: str | os.PathLike[str], max_open: int = 256) -> None:
        self.path = os.fspath(path)
        self.max_open = max_open
        #: True while a journal is redone: the contents are already final, changes are skipped.
        self.replaying = False
        #: Files opened so far (takeover opens none).
        self.opened = 0
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._made = False

    def file(self, serial: int) -> str:
        """The path of inode ``serial``'s contents."""
        return os.path.join(self.path, str(serial))

    def fd(self, serial: int) -> int:
        """A read-write descriptor of ``serial``'s file (created if missing)."""
        fd = self._fds.get(serial)
        if fd is not None:
            self._fds.move_to_end(serial)
            return fd
        if not self._made:
            os.makedirs(self.path, exist_ok=True)
            self._made = True
        fd = os.open(self.file(serial), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.opened += 1
        self._fds[serial] = fd
        if len(self._fds) > self.max_open:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def cached(self, serial: int) -> int | None:
        """The open descriptor of ``serial``'s file, if there is one."""
        return self._fds.get(serial)

    def remove(self, serial: int) -> None:
        """Delete ``serial``'s file."""
        fd = self._fds.pop(serial, None)
        if fd is not None:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.file(serial))

    def clear(self) -> None:
        """Delete every file (a fresh filesystem)."""
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)
        self._made = False

    def close(self) -> None:
        """Close the open descriptors (the files stay)."""
        while self._fds:
            os.close(self._fds.popitem()[1])


class StoredData:
    """The bytes of one file, in ``store``'s file for ``serial`` (see :class:`~afuse.nodes.sparse.SparseData`).

    ``size`` is the file's size (None until asked: then the backing file's, read with one stat)."""

    def __init__(self, store: ContentStore, serial: int, pool: ChunkPool) -> None:
        self.store, self.serial, self.pool = store, serial, pool
        self._size: int | None = 0 if not store.replaying else None

    def _fd(self) -> int:
        return self.store.fd(self.serial)

    def _stat(self) -> os.stat_result | None:
        fd = self.store.cached(self.serial)
        try:
            return os.fstat(fd) if fd is not None else os.stat(self.store.file(self.serial))
        except FileNotFoundError:
            return None

    def forget_size(self) -> None:
        """Read the size from the file when next asked (after a journal is redone)."""
        self._size = None

    @property
    def size(self) -> int:
        """The file size."""
        if self._size is None:
            st = self._stat()
            self._size = st.st_size if st is not None else 0
        return self._size

    @size.setter
    def size(self, size: int) -> None:
        if not self.store.replaying:
            self._size = size

    def set_mtime(self, ns: int) -> None:
        """Set the stored file's mtime (what a successor takes as the file's; an empty file never
        written has none)."""
        if self.store.replaying:
            return
        fd = self.store.cached(self.serial)
        if fd is None and self._size == 0:
            return
        os.utime(self._fd() if fd is None else fd, ns=(ns, ns))

    def mtime_ns(self) -> int:
        """The backing file's mtime (0 if it has none yet)."""
        st = self._stat()
        return st.st_mtime_ns if st is not None else 0

    @property
    def blocks(self) -> int:
        """512-byte blocks in use."""
        if self._size == 0 and self.store.cached(self.serial) is None:
            return 0
        st = self._stat()
        return st.st_blocks if st is not None else 0

    def free(self) -> None:
        """Delete the contents (the inode is gone)."""
        if not self.store.replaying:
            self.store.remove(self.serial)

    def read(self, off: int, size: int) -> bytes:
        """The bytes at ``off`` (zeros in holes; nothing past the end)."""
        end = min(off + size, self.size)
        if end <= off:
            return b""
        got = os.pread(self._fd(), end - off, off)
        return got if len(got) == end - off else got + bytes(end - off - len(got))

    def write(self, off: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``off`` through to the file (EFBIG past the largest file size)."""
        if off + len(data) > MAX_FILE_SIZE:
            raise FUSEError(errno.EFBIG)
        if self.store.replaying:
            return
        fd, mv, pos = self._fd(), memoryview(data), 0
        try:
            while pos < len(mv):
                pos += os.pwrite(fd, mv[pos:], off + pos)
        except OSError as e:
            raise FUSEError(e.errno or errno.EIO) from None
        self._size = max(self.size, off + len(mv))

    def truncate(self, size: int) -> None:
        """Cut or extend with a hole."""
        if not 0 <= size <= MAX_FILE_SIZE:
            raise FUSEError(errno.EFBIG if size > 0 else errno.EINVAL)
        if self.store.replaying:
            return
        if size == 0 and self._size == 0:
            return
        os.ftruncate(self._fd(), size)
        self._size = size

    def punch(self, off: int, end: int) -> None:
        """Make [off, end) read as zeros, freeing its blocks."""
        if not self.store.replaying and end > off:
            _falloc(self._fd(), _PUNCH_HOLE | _KEEP_SIZE, off, end - off)

    def allocate(self, off: int, end: int, keep_size: bool) -> bool:
        """Allocate [off, end) (ENOSPC when the disk is full); True if the size grew."""
        if self.store.replaying:
            return False
        old = self.size
        _falloc(self._fd(), _KEEP_SIZE if keep_size else 0, off, end - off)
        if keep_size or end <= old:
            return False
        self._size = end
        return True

    def seek(self, off: int, whence: int) -> int:
        """SEEK_DATA (3) / SEEK_HOLE (4) from ``off``, as the backing file answers."""
        if whence not in (3, 4):
            raise FUSEError(errno.EINVAL)
        if off < 0 or off >= self.size:
            raise FUSEError(errno.ENXIO)
        try:
            return min(os.lseek(self._fd(), off, whence), self.size)
        except OSError as e:
            raise FUSEError(e.errno or errno.EIO) from None

    def copy_to(self, off: int, dst: StoredData, dst_off: int, length: int) -> int:
        """Copy up to ``length`` bytes at ``off`` to ``dst`` at ``dst_off``; the count copied."""
        count = min(length, self.size - off)
        if count <= 0:
            return 0
        if dst is self and off < dst_off + count and dst_off < off + count:
            raise FUSEError(errno.EINVAL)
        if dst_off + count > MAX_FILE_SIZE:
            raise FUSEError(errno.EFBIG)
        if self.store.replaying:
            return count
        src_fd, dst_fd, pos = self._fd(), dst._fd(), 0
        while pos < count:
            n = os.copy_file_range(src_fd, dst_fd, count - pos, off + pos, dst_off + pos)
            if n <= 0:
                break
            pos += n
        if pos < count:  # the source ended early (cannot happen: size is known): zeros
            dst.write(dst_off + pos, bytes(count - pos))
        dst._size = max(dst.size, dst_off + count)
        return count
