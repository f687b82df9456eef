"""afuse.examples.sftpclient: the sans-IO codec on its own, and the trio client against OpenSSH's
own ``sftp-server`` (the program sshd runs for the ``sftp`` subsystem) over real pipes."""

from __future__ import annotations

import errno
import os
import random
import shutil
import stat
import struct
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from afuse.examples.sftpclient import (
    FXF_CREAT,
    FXF_EXCL,
    FXF_READ,
    FXF_WRITE,
    FXP_DATA,
    FXP_LSTAT,
    FXP_NAME,
    FXP_READ,
    FXP_STATUS,
    VIEW_MIN,
    Buffer,
    ConnectionLost,
    FileAttrs,
    ProtocolError,
    Reply,
    SftpClient,
    SftpCodec,
    SftpError,
    data_of,
    encode_attrs,
    parse_attrs,
    string,
)
from afuse.examples.sftpfs import PipeWriter, ReadBuffer, list_directory, read_pipe, write_many
from afuse.readers import reusable_buffer, unviewed

SFTP_SERVER = shutil.which("sftp-server") or "/usr/lib/openssh/sftp-server"


def _packet(pkttype: int, rid: int, payload: bytes) -> bytes:
    return struct.pack(">IBI", len(payload) + 5, pkttype, rid) + payload


def test_codec_returns_whole_packets_however_the_bytes_arrive() -> None:
    rng = random.Random(3)
    packets = [(rng.choice([FXP_STATUS, FXP_NAME, FXP_DATA]), i, os.urandom(rng.choice([0, 1, 9, 4096, 70_000])))
               for i in range(400)]
    stream = b"".join(_packet(*p) for p in packets)
    codec, got, pos = SftpCodec(), [], 0
    while pos < len(stream):
        n = rng.choice([1, 3, 4, 5, 100, 65536, 300_000])
        got += codec.receive(stream[pos:pos + n])
        pos += n
    assert [(t, rid, bytes(p)) for t, rid, p in got] == packets


def test_codec_hands_on_large_data_as_views_and_the_rest_as_bytes() -> None:
    big = _packet(FXP_DATA, 1, os.urandom(VIEW_MIN + 5))
    name = _packet(FXP_NAME, 2, os.urandom(VIEW_MIN + 5))
    small = _packet(FXP_DATA, 3, os.urandom(100))
    got = SftpCodec().receive(big + name + small)
    assert [type(p) for _, _, p in got] == [memoryview, bytes, bytes]


def test_codec_frame_leaves_a_packet_begun_to_be_given_again() -> None:
    """frame(): the whole packets at the start, the bytes they take, the size of the one begun;
    the caller gives the rest again with what follows (no packet is copied to be completed)."""
    rng = random.Random(5)
    packets = [(rng.choice([FXP_STATUS, FXP_NAME, FXP_DATA]), i, os.urandom(rng.choice([0, 1, 9, 4096, 70_000])))
               for i in range(300)]
    stream = b"".join(_packet(*p) for p in packets)
    codec, got, pos, held = SftpCodec(), [], 0, b""
    while pos < len(stream):
        n = rng.choice([1, 3, 4, 5, 100, 65536, 300_000])
        data = held + stream[pos:pos + n]
        pos += n
        out, used, need = codec.frame(memoryview(data))
        got += out
        held = data[used:]
        if held:  # the size of the packet begun: 4 until its length is in
            assert need == (4 + struct.unpack_from(">I", held)[0] if len(held) >= 4 else 4)
        else:
            assert need == 0
    assert not held
    assert [(t, rid, bytes(p)) for t, rid, p in got] == packets
    # DATA of VIEW_MIN or more stays a view of what was given; the rest is bytes.
    assert {type(p) for t, _, p in got if t == FXP_DATA and len(p) >= VIEW_MIN} == {memoryview}
    assert {type(p) for t, _, p in got if t != FXP_DATA} == {bytes}
    with pytest.raises(ProtocolError):
        SftpCodec().frame(struct.pack(">I", 2) + b"xx")


def test_read_buffer_reads_in_place_and_reuses_a_buffer_once_unviewed() -> None:
    rb = ReadBuffer()
    first = rb.buf
    room = rb.room()
    room[:5] = b"hello"
    room.release()
    view = rb.filled(5)
    rb.consumed(3)  # "lo" is left: the next read lands after it
    assert bytes(rb.filled(0)) == b"lo"
    kept = view[:3]  # a packet handed on, still in use
    del view
    rb.end = rb.start = len(rb.buf) - 10  # (as if the buffer had been read to its end)
    rb.buf[rb.start:rb.end + 2] = b"lo"
    rb.end += 2
    room = rb.room()  # too little room: the next buffer, the rest copied to its start
    assert rb.buf is not first and bytes(rb.buf[:2]) == b"lo" and rb.start == 0 and rb.end == 2
    room.release()
    assert bytes(kept) == b"hel"  # the old buffer is not written while viewed
    rb.start = rb.end = len(rb.buf) - 10
    rb.room().release()
    assert rb.buf is not first  # still viewed: not used again
    del kept
    rb.start = rb.end = len(rb.buf) - 10
    rb.room().release()
    assert rb.buf is first  # no view left: used again


def test_unviewed_tells_whether_a_view_of_a_buffer_is_left() -> None:
    buf = reusable_buffer(1 << 20)
    assert len(buf) == 1 << 20 and not any(buf[:4096])
    assert unviewed(buf)
    view = memoryview(buf)[10:20]
    assert not unviewed(buf)
    part = view[2:4]
    del view
    assert not unviewed(buf)  # a view of a view holds it too
    del part
    assert unviewed(buf) and len(buf) == 1 << 20


def test_read_pipe_frames_packets_in_place_and_keeps_handed_on_data_intact() -> None:
    """Packets of every size (DATA larger than a buffer too) arrive through read_pipe and
    SftpClient-like framing intact, while views of earlier ones are kept or dropped at random:
    buffers are read into again only once no view of them is left."""
    rng = random.Random(11)
    sizes = [0, 9, 4096, VIEW_MIN, 128 * 1024, 200_000, 3 << 19]
    packets = [(FXP_DATA if rng.random() < 0.7 else FXP_NAME, i, os.urandom(rng.choice(sizes))) for i in range(160)]
    stream = b"".join(_packet(*p) for p in packets)
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    os.set_blocking(w, True)

    def writer() -> None:
        pos = 0
        while pos < len(stream):
            pos += os.write(w, stream[pos:pos + rng.choice([1, 13, 4096, 65536, 300_000])])
        os.close(w)

    codec = SftpCodec()
    got: list[tuple[int, int, bytes]] = []
    live: list[tuple[int, int, Buffer]] = []  # handed-on payloads still in use

    def feed(data: memoryview) -> tuple[int, int]:
        out, used, need = codec.frame(data)
        live.extend(out)
        while live and rng.random() < 0.5:  # used and let go, in any order
            t, rid, p = live.pop(rng.randrange(len(live)))
            got.append((t, rid, bytes(p)))
        return used, need

    async def main() -> None:
        t = threading.Thread(target=writer)
        t.start()
        try:
            with trio.fail_after(30):
                await read_pipe(r, feed)
        finally:
            await trio.to_thread.run_sync(t.join)

    trio.run(main)
    got += [(t, rid, bytes(p)) for t, rid, p in live]
    assert sorted(got, key=lambda p: p[1]) == packets


def test_codec_refuses_impossible_lengths() -> None:
    with pytest.raises(ProtocolError):
        SftpCodec().receive(struct.pack(">I", 2) + b"xx")
    with pytest.raises(ProtocolError):
        SftpCodec().receive(struct.pack(">I", 1 << 30))


def test_requests_get_ids_in_order_and_keep_their_arguments() -> None:
    codec = SftpCodec()
    view = memoryview(b"data")
    rid, pieces = codec.request(FXP_READ, [b"ab", view])
    assert rid == 0 and pieces[0] == struct.pack(">IBI", 11, FXP_READ, 0) and pieces[2] is view
    assert codec.request(FXP_READ, [])[0] == 1


def test_attrs_round_trip_and_extended_attrs_are_skipped() -> None:
    a = FileAttrs(5, 1, 2, 0o100644, 10, 20)
    assert parse_attrs(encode_attrs(a), 0) == (a, 32)
    assert parse_attrs(encode_attrs(FileAttrs(permissions=0o755)), 0)[0] == FileAttrs(permissions=0o755)
    ext = struct.pack(">II", 0x80000004, 0o600) + struct.pack(">I", 1) + string(b"t") + string(b"d") + b"!"
    assert parse_attrs(ext, 0) == (FileAttrs(permissions=0o600), len(ext) - 1)
    with pytest.raises(struct.error):
        parse_attrs(struct.pack(">I", 0x1) + b"\0\0", 0)


def test_data_of_reads_data_eof_and_errors() -> None:
    assert data_of(FXP_DATA, string(b"abc")) == b"abc"
    assert data_of(FXP_STATUS, struct.pack(">I", 1) + string(b"eof") + string(b"")) == b""
    with pytest.raises(SftpError) as e:
        data_of(FXP_STATUS, struct.pack(">I", 2) + string(b"gone") + string(b""))
    assert e.value.errno == errno.ENOENT
    with pytest.raises(ProtocolError):
        data_of(FXP_DATA, struct.pack(">I", 10) + b"abc")
    with pytest.raises(ProtocolError):
        data_of(FXP_NAME, b"")


def test_a_lost_transport_fails_every_waiter_and_later_requests() -> None:
    sent: list[list[bytes | memoryview]] = []
    client = SftpClient(sent.append)
    r = client.send(FXP_READ, b"x")
    client.lost(OSError("gone"))
    assert r.done and isinstance(r.error, ConnectionLost)
    later = client.send(FXP_READ, b"y")
    assert later.done and isinstance(later.error, ConnectionLost) and len(sent) == 1


def test_a_reply_to_no_request_is_a_protocol_error() -> None:
    client = SftpClient(lambda pieces: None)
    waiting = client.send(FXP_READ, b"x")
    client.feed(_packet(FXP_STATUS, 77, struct.pack(">I", 0)))
    assert isinstance(waiting.error, ProtocolError) and isinstance(client.closed, ProtocolError)


# -- against OpenSSH's sftp-server ------------------------------------------------------------------

@asynccontextmanager
async def _server(nursery: trio.Nursery, cwd: Path) -> AsyncIterator[SftpClient]:
    in_r, in_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    out_r, out_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    os.set_blocking(in_r, True)
    os.set_blocking(out_w, True)
    proc = await trio.lowlevel.open_process([SFTP_SERVER], stdin=in_r, stdout=out_w, cwd=str(cwd))
    os.close(in_r)
    os.close(out_w)
    writer = PipeWriter(in_w, nursery)
    client = SftpClient(writer.write)

    async def reader() -> None:
        await read_pipe(out_r, client.feed_frames)
        client.lost(ConnectionLost("sftp-server ended"))

    nursery.start_soon(reader)
    try:
        await client.start()
        yield client
    finally:
        writer.close()
        with trio.move_on_after(5):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.trio
async def test_client_against_openssh_sftp_server(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    for i in range(250):  # more than one READDIR's worth (OpenSSH: 100 names)
        (tmp_path / "d" / f"f{i:03}").write_bytes(b"x" * i)
    async with trio.open_nursery() as nursery:
        async with _server(nursery, tmp_path) as c:
            assert c.version == 3 and c.has(b"posix-rename@openssh.com") and c.max_write > 0
            root = await c.realpath(b".")
            assert root == str(tmp_path).encode()
            a = await c.lstat(b"d/f007")
            assert (a.size, stat.S_IFMT(a.permissions or 0)) == (7, stat.S_IFREG)
            with pytest.raises(SftpError) as e:
                await c.lstat(b"nope")
            assert e.value.errno == errno.ENOENT
            listing = await list_directory(c, b"d")
            assert sorted(listing) == sorted(os.listdir(os.fsencode(tmp_path / "d")))
            assert all(listing[n].size == int(n[1:]) for n in listing)
            # create, pipelined writes larger than one WRITE, read back across a short tail
            h = await c.open(b"new", FXF_WRITE | FXF_CREAT | FXF_EXCL, FileAttrs(permissions=0o600))
            data = os.urandom(600_000)
            await write_many(c, h, 0, data, 200_000)
            await c.fsync(h)
            assert (await c.fstat(h)).size == len(data)
            await c.close(h)
            assert (tmp_path / "new").read_bytes() == data
            with pytest.raises(SftpError):  # O_EXCL on an existing name: FX_FAILURE
                await c.open(b"new", FXF_WRITE | FXF_CREAT | FXF_EXCL)
            h = await c.open(b"new", FXF_READ)
            got = bytes(data_of(*await c.send(FXP_READ, c.read_args(h, 599_990, 100)).get()))
            assert got == data[599_990:]
            assert data_of(*await c.send(FXP_READ, c.read_args(h, len(data), 10)).get()) == b""
            await c.close(h)
            # names
            await c.status(c.send_mkdir(b"sub", FileAttrs(permissions=0o750)), "MKDIR")
            assert stat.S_ISDIR((await c.stat(b"sub")).permissions or 0)
            await c.status(c.send_symlink(b"new", b"sub/link"), "SYMLINK")
            assert await c.readlink(b"sub/link") == b"new"
            await c.status(c.send_link(b"new", b"hard"), "HARDLINK")
            assert os.stat(tmp_path / "hard").st_ino == os.stat(tmp_path / "new").st_ino
            with pytest.raises(SftpError):
                await c.rename(b"sub/link", b"new")  # plain RENAME does not replace
            await c.posix_rename(b"hard", b"sub/link")  # replaces
            assert stat.S_ISREG(os.lstat(tmp_path / "sub" / "link").st_mode)
            await c.setstat(b"new", FileAttrs(permissions=0o640, atime=1000, mtime=2000))
            st = os.stat(tmp_path / "new")
            assert (st.st_mode & 0o777, int(st.st_mtime)) == (0o640, 2000)
            v = await c.statvfs(b".")
            assert v.bsize > 0 and v.blocks > 0
            await c.remove(b"sub/link")
            await c.rmdir(b"sub")
            await c.remove(b"new")
            assert sorted(os.listdir(tmp_path)) == ["d"]
            # many requests in flight at once, answered in order
            replies = [c.send(FXP_LSTAT, string(b"d/f%03d" % i)) for i in range(200)]
            sizes = [(await c.attrs(r)).size for r in replies]
            assert sizes == list(range(200))
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_requests_fail_when_the_server_goes_away(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        async with _server(nursery, tmp_path) as c:
            r: Reply = c.send(FXP_READ, b"")  # a malformed request: sftp-server gives up
            with trio.fail_after(10), pytest.raises(ConnectionLost):
                await r.get()
            with pytest.raises(ConnectionLost):
                await c.lstat(b".")
        nursery.cancel_scope.cancel()


def test_a_listing_leaves_out_names_no_directory_can_hold(caplog: pytest.LogCaptureFixture) -> None:
    """A broken or hostile server's names with ``/`` or NUL, or empty, are left out of a listing
    with a warning; the rest of the batch arrives."""
    from afuse.examples.sftpfs import ListingProgress, _Listing

    def entry(name: bytes) -> bytes:
        return string(name) + string(b"-rw-r--r-- 1 u g 0 Jan 1 00:00 " + name) + encode_attrs(
            FileAttrs(0, 0, 0, 0o100644, 0, 0))

    names = [b"ok", b"a/b", b"", b"n\0ul", b"fine"]
    payload = struct.pack(">I", len(names)) + b"".join(entry(n) for n in names)
    progress = ListingProgress()
    listing = _Listing(SftpClient(lambda pieces: None), b"h", progress)
    listing.reply(FXP_NAME, payload)
    assert progress.names == [b"ok", b"fine"] and sorted(progress.by_name) == [b"fine", b"ok"]
    assert sum("left out" in r.getMessage() for r in caplog.records) == 3


def test_a_waiter_that_breaks_fails_its_request_and_the_session_goes_on() -> None:
    class Broken(Reply):
        def reply(self, pkttype: int, payload: bytes | memoryview) -> None:
            raise RuntimeError("a bug in a waiter")

    client = SftpClient(lambda pieces: None)
    broken = client.send(FXP_READ, b"x", waiter=Broken())
    fine = client.send(FXP_READ, b"y")
    ok_status = struct.pack(">I", 0)
    client.feed(_packet(FXP_STATUS, 0, ok_status) + _packet(FXP_STATUS, 1, ok_status))
    assert isinstance(broken.error, RuntimeError)
    assert fine.done and fine.error is None and client.closed is None
