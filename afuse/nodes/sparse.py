"""File contents in memory, sparse: fixed-size chunks, holes where nothing was written.

:class:`SparseData` is the data of one file; a :class:`ChunkPool` per filesystem counts the chunks
in use against a capacity (statfs, ENOSPC from fallocate). Holes are real: they read as zeros,
take no memory, and SEEK_DATA/SEEK_HOLE report them.
"""

from __future__ import annotations

import errno

from ..errors import FUSEError

__all__ = ["CHUNK", "MAX_FILE_SIZE", "ChunkPool", "SparseData"]

#: Bytes per chunk.
CHUNK = 1 << 16
#: The largest file size (the kernel's MAX_LFS_FILESIZE).
MAX_FILE_SIZE = 0x7FFFFFFFFFFFFFFF
_ZEROS = memoryview(bytes(CHUNK))
_BLK = 4096


class ChunkPool:
    """How many chunks a filesystem may hold (``capacity``, from bytes) and holds (``used``)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity // CHUNK)
        self.used = 0


class SparseData:
    """The bytes of one file: ``chunks`` maps a chunk index to its bytes (shorter than CHUNK: the
    rest reads as zeros; None: allocated but unwritten; absent: a hole). ``size`` is the file size;
    bytes at or past it are always zero."""

    def __init__(self, pool: ChunkPool) -> None:
        self.pool = pool
        self.chunks: dict[int, bytearray | None] = {}
        self.size = 0

    @property
    def blocks(self) -> int:
        """512-byte blocks in use (written chunks rounded up to 4 KiB, allocated ones whole)."""
        return sum(CHUNK if b is None else (len(b) + _BLK - 1) & ~(_BLK - 1) for b in self.chunks.values()) >> 9

    def free(self) -> None:
        """Give every chunk back to the pool."""
        self.pool.used -= len(self.chunks)
        self.chunks.clear()

    def read(self, off: int, size: int) -> bytes:
        """The bytes at ``off`` (zeros in holes; nothing past the end)."""
        end = min(off + size, self.size)
        parts: list[bytes | bytearray | memoryview] = []
        while off < end:
            idx, rel = divmod(off, CHUNK)
            take = min(CHUNK - rel, end - off)
            got = memoryview(self.chunks.get(idx) or b"")[rel : rel + take]
            parts += [got, _ZEROS[: take - len(got)]]
            off += take
        out = b"".join(parts)
        parts.clear()  # release the memoryviews: the bytearrays stay resizable
        return out

    def write(self, off: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``off`` (EFBIG past the largest file size)."""
        if off + len(data) > MAX_FILE_SIZE:
            raise FUSEError(errno.EFBIG)
        mv, pos = memoryview(data), 0
        while pos < len(data):
            idx, rel = divmod(off + pos, CHUNK)
            take = min(CHUNK - rel, len(data) - pos)
            ba = self.chunks.get(idx)
            if ba is None:
                self.pool.used += idx not in self.chunks
                self.chunks[idx] = ba = bytearray(rel)
            elif len(ba) < rel:
                ba += _ZEROS[: rel - len(ba)]
            ba[rel : rel + take] = mv[pos : pos + take]
            pos += take
        self.size = max(self.size, off + len(data))

    def truncate(self, size: int) -> None:
        """Cut (freeing chunks) or extend with a hole."""
        if not 0 <= size <= MAX_FILE_SIZE:
            raise FUSEError(errno.EFBIG if size > 0 else errno.EINVAL)
        if size < self.size:
            self.punch(size, self.size)
        self.size = size

    def punch(self, off: int, end: int) -> None:
        """Make [off, end) read as zeros, freeing the chunks left holding nothing."""
        first, last = off // CHUNK, (end - 1) // CHUNK
        keys = range(first, last + 1) if last - first < len(self.chunks) else sorted(
            k for k in self.chunks if first <= k <= last)
        for k in keys:
            if k not in self.chunks:
                continue
            a, b, ba = max(off - k * CHUNK, 0), min(end - k * CHUNK, CHUNK), self.chunks[k]
            if ba is not None and a < len(ba):
                ba[a:b] = b"" if b >= len(ba) else _ZEROS[: b - a]
            if (a == 0 and b == CHUNK) or (ba is not None and not any(ba)):
                del self.chunks[k]
                self.pool.used -= 1

    def allocate(self, off: int, end: int, keep_size: bool) -> bool:
        """Allocate [off, end) (ENOSPC beyond the pool's capacity); True if the size grew."""
        missing = [k for k in range(off // CHUNK, (end - 1) // CHUNK + 1) if k not in self.chunks]
        if len(missing) > self.pool.capacity - self.pool.used:
            raise FUSEError(errno.ENOSPC)
        self.chunks.update(dict.fromkeys(missing))
        self.pool.used += len(missing)
        if keep_size or end <= self.size:
            return False
        self.size = end
        return True

    def seek(self, off: int, whence: int) -> int:
        """SEEK_DATA (3) / SEEK_HOLE (4) from ``off``: a chunk holding bytes is data."""
        if whence not in (3, 4):
            raise FUSEError(errno.EINVAL)
        if off < 0 or off >= self.size:
            raise FUSEError(errno.ENXIO)
        k = off // CHUNK
        if whence == 3:
            if self.chunks.get(k):
                return off
            after = min((i for i, b in self.chunks.items() if i > k and b), default=self.size)
            if after * CHUNK >= self.size:
                raise FUSEError(errno.ENXIO)
            return after * CHUNK
        while self.chunks.get(k):
            k += 1
        return min(max(off, k * CHUNK), self.size)

    def copy_to(self, off: int, dst: SparseData, dst_off: int, length: int) -> int:
        """Copy up to ``length`` bytes at ``off`` to ``dst`` at ``dst_off`` (holes stay holes); the
        count copied."""
        count = min(length, self.size - off)
        if count <= 0:
            return 0
        if dst is self and off < dst_off + count and dst_off < off + count:
            raise FUSEError(errno.EINVAL)
        if dst_off + count > MAX_FILE_SIZE:
            raise FUSEError(errno.EFBIG)
        pos = 0
        while pos < count:
            k, rel = divmod(off + pos, CHUNK)
            take, at = min(CHUNK - rel, count - pos), dst_off + pos
            if self.chunks.get(k):
                dst.write(at, self.read(off + pos, take))
            else:
                dst.punch(at, at + take)
                dst.size = max(dst.size, at + take)
            pos += take
        return count
