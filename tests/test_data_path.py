"""Daemon-served reads and writes: large READ replies written with one writev, reads spliced from
the source file (afuse.splice), the mount's readahead window, FOPEN_KEEP_CACHE in passthroughfs."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import afuse
from afuse import device
from afuse.examples import lowlevel_passthroughfs
from afuse.examples.passthroughfs import PassthroughFS
from afuse.nodes import Dir, LoopbackHandle, LoopbackNode, NodeFS
from afuse.nodes.loopback import LoopbackFS
from afuse.pytest_plugin import fuse_unavailable_reason
from afuse.splice import SPLICE_MIN, FileRange, SplicedReply, SplicePipe
from afuse.testing import MountFactory
from afuse.wire import replies
from afuse.wire.init import InitConfig

MiB = 1 << 20
HEADER = struct.Struct("<IiQ")
mounts = pytest.mark.skipif(fuse_unavailable_reason() is not None or os.geteuid() != 0,
                            reason="needs root and /dev/fuse")


def _direct_read(path: str, block: int) -> bytes:
    """The whole file read with O_DIRECT in ``block``-byte reads (one READ request each)."""
    buf = mmap.mmap(-1, block)
    out = bytearray()
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        while n := os.readv(fd, [buf]):
            out += buf[:n]
    finally:
        os.close(fd)
        buf.close()
    return bytes(out)


@pytest.fixture
def source(tmp_path: Path) -> Iterator[Path]:
    src = tmp_path / "src"
    src.mkdir()
    yield src


# -- SplicePipe, without a mount (a pipe stands in for /dev/fuse) ----------------------------


def _spliced(size: int, offset: int, content: bytes, tmp_path: Path, fd: int | None = None) -> bytes:
    f = tmp_path / "data"
    f.write_bytes(content)
    src = os.open(f, os.O_RDONLY)
    pipe = SplicePipe(MiB)
    r, w = os.pipe()
    fcntl.fcntl(w, 1031, MiB)  # F_SETPIPE_SZ: takes each message whole, as /dev/fuse does
    try:
        pipe.write(w, SplicedReply(7, FileRange(src if fd is None else fd, offset, size)))
        os.close(w)
        out = b""
        while chunk := os.read(r, MiB):
            out += chunk
        return out
    finally:
        os.close(r)
        os.close(src)
        pipe.close()


@pytest.mark.parametrize("size", [100, SPLICE_MIN, 300_000])
def test_splice_pipe_writes_header_then_data(size: int, tmp_path: Path) -> None:
    content = os.urandom(400_000)
    out = _spliced(size, 5000, content, tmp_path)
    length, error, unique = HEADER.unpack_from(out)
    assert (length, error, unique) == (16 + size, 0, 7)
    assert out[16:] == content[5000:5000 + size]


def test_splice_pipe_short_at_end_of_file(tmp_path: Path) -> None:
    content = os.urandom(SPLICE_MIN * 3 + 123)
    out = _spliced(SPLICE_MIN * 2, SPLICE_MIN * 2, content, tmp_path)
    assert HEADER.unpack_from(out) == (16 + SPLICE_MIN + 123, 0, 7)
    assert out[16:] == content[SPLICE_MIN * 2:]


@pytest.mark.parametrize("size", [100, SPLICE_MIN * 2])
def test_splice_pipe_answers_a_file_error(size: int, tmp_path: Path) -> None:
    (tmp_path / "w").write_bytes(b"x" * size)
    bad = os.open(tmp_path / "w", os.O_WRONLY)  # reading it is EBADF
    try:
        out = _spliced(size, 0, b"x", tmp_path, fd=bad)
    finally:
        os.close(bad)
    assert HEADER.unpack(out) == (16, -errno.EBADF, 7)


def test_large_read_route_returns_header_and_data() -> None:
    """The dispatcher answers a large READ as [header, data] for one writev (no concatenation)."""
    import trio

    data = os.urandom(replies.VECTOR_MIN)

    class FS(afuse.Operations):
        async def read(self, req: afuse.ReadRequest) -> bytes:
            return data[: req.size]

    d = afuse.Dispatcher(FS())
    req = afuse.ReadRequest(9, 2, 0, 0, 0, fh=1, offset=0, size=len(data), read_flags=0, lock_owner=0, flags=0)
    out = trio.run(d.handle, req)
    assert isinstance(out, list) and out[1] is data
    assert HEADER.unpack(out[0]) == (16 + len(data), 0, 9)
    small = afuse.ReadRequest(11, 2, 0, 0, 0, fh=1, offset=0, size=100, read_flags=0, lock_owner=0, flags=0)
    assert trio.run(d.handle, small) == HEADER.pack(116, 0, 11) + data[:100]


# -- mounted -----------------------------------------------------------------------------------


@mounts
def test_large_read_reply_is_written_with_one_writev(fuse_mount: MountFactory,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(MiB + 5)
    m = fuse_mount(NodeFS(Dir({b"big": data})))
    calls: list[list[int]] = []
    real = os.writev

    def writev(fd: int, buffers: Any) -> int:
        calls.append([memoryview(b).nbytes for b in buffers])
        return real(fd, buffers)

    monkeypatch.setattr(os, "writev", writev)
    assert _direct_read(m.join("big"), 256 * 1024) == data
    assert [16, 256 * 1024] in calls  # header and data in one writev per READ
    assert all(len(c) == 2 for c in calls)


@mounts
@pytest.mark.parametrize("kind", ["nodes", "lowlevel"])
def test_reads_are_spliced_from_the_source(kind: str, source: Path, fuse_mount: MountFactory,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(3 * MiB + 4321)
    (source / "f").write_bytes(data)
    ops: afuse.Operations = (PassthroughFS(source, passthrough=False) if kind == "nodes"
                             else lowlevel_passthroughfs.PassthroughFS(str(source), passthrough=False))
    m = fuse_mount(ops)
    spliced: list[int] = []
    real = os.splice

    def splice(src: int, dst: int, count: int, **kw: Any) -> int:
        n = real(src, dst, count, **kw)
        spliced.append(n)
        return n

    monkeypatch.setattr(os, "splice", splice)
    with open(m.join("f"), "rb") as f:
        assert f.read() == data
    assert _direct_read(m.join("f"), 512 * 1024) == data
    assert _direct_read(m.join("f"), 4096) == data  # small reads: pread
    assert spliced, "no READ reply was spliced"
    if kind == "nodes":
        ops.close()  # type: ignore[attr-defined]


@mounts
@pytest.mark.parametrize("want", [1024, 128])
def test_readahead_window_is_raised_to_max_readahead(want: int, fuse_mount: MountFactory) -> None:
    m = fuse_mount(NodeFS(Dir({b"f": b"x"})), config=InitConfig(max_readahead=want * 1024))
    path = device.read_ahead_path(m.session.mount.connection_id())
    assert int(Path(path).read_text()) == want


class _CountingHandle(LoopbackHandle):
    reads = 0

    async def read(self, offset: int, size: int) -> FileRange:
        type(self).reads += 1
        return FileRange(self.fd, offset, size)


class _CountingFS(LoopbackFS):
    def handle_of(self, fd: int, node: LoopbackNode) -> LoopbackHandle:
        h = _CountingHandle(node, fd)
        h.fopen = self.file_fopen
        return h


@mounts
@pytest.mark.parametrize("keep_cache", [True, False])
def test_keep_cache_keeps_pages_across_opens(keep_cache: bool, source: Path, fuse_mount: MountFactory) -> None:
    data = os.urandom(256 * 1024)
    (source / "f").write_bytes(data)
    ops = _CountingFS(source, passthrough=False, keep_cache=keep_cache)
    m = fuse_mount(ops)
    _CountingHandle.reads = 0
    for _ in range(2):
        with open(m.join("f"), "rb") as f:
            assert f.read() == data
    first = _CountingHandle.reads
    with open(m.join("f"), "rb") as f:
        assert f.read() == data
    assert first > 0
    if keep_cache:
        assert _CountingHandle.reads == first  # the third open was served from the page cache
    else:
        assert _CountingHandle.reads > first
    ops.close()
