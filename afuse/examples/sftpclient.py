"""An SFTP v3 client for trio: a sans-IO codec (:class:`SftpCodec`, bytes in, packets out, like
afuse's wire) and a client (:class:`SftpClient`) that sends requests through any byte transport and
hands each reply to the waiter registered for its request id.

sftpfs's transports feed it: OpenSSH's ``ssh`` client over pipes (trio code, no other event loop)
or asyncssh's channel (asyncio, the client's trio side fed by ``run_sync_soon``). A request is
written the moment it is made (:meth:`SftpClient.send` is synchronous), so requests made one after
another reach the server in that order: the server answers in order too, which sftpfs uses (a
change and an LSTAT of its result in one round trip, READDIRs and READs pipelined).

Only what sftpfs needs of SFTP v3 (draft-ietf-secsh-filexfer-02) and OpenSSH's extensions
(posix-rename, statvfs, hardlink, fsync, lsetstat, limits) is here.
"""

from __future__ import annotations

import errno
import logging
import struct
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import trio

__all__ = ["ConnectionLost", "FileAttrs", "Reply", "SftpClient", "SftpCodec", "SftpError", "StatVfs",
           "encode_attrs", "parse_names"]

# Packet types (SSH_FXP_*)
FXP_INIT, FXP_VERSION, FXP_OPEN, FXP_CLOSE, FXP_READ, FXP_WRITE, FXP_LSTAT, FXP_FSTAT = 1, 2, 3, 4, 5, 6, 7, 8
FXP_SETSTAT, FXP_FSETSTAT, FXP_OPENDIR, FXP_READDIR, FXP_REMOVE, FXP_MKDIR, FXP_RMDIR = 9, 10, 11, 12, 13, 14, 15
FXP_REALPATH, FXP_STAT, FXP_RENAME, FXP_READLINK, FXP_SYMLINK = 16, 17, 18, 19, 20
FXP_STATUS, FXP_HANDLE, FXP_DATA, FXP_NAME, FXP_ATTRS = 101, 102, 103, 104, 105
FXP_EXTENDED, FXP_EXTENDED_REPLY = 200, 201

# Open flags (SSH_FXF_*)
FXF_READ, FXF_WRITE, FXF_APPEND, FXF_CREAT, FXF_TRUNC, FXF_EXCL = 0x1, 0x2, 0x4, 0x8, 0x10, 0x20

# Status codes (SSH_FX_*): v3's, and later drafts' that servers may send anyway.
FX_OK, FX_EOF, FX_NO_SUCH_FILE, FX_PERMISSION_DENIED, FX_FAILURE, FX_BAD_MESSAGE = 0, 1, 2, 3, 4, 5
FX_NO_CONNECTION, FX_CONNECTION_LOST, FX_OP_UNSUPPORTED = 6, 7, 8

_ERRNO = {FX_NO_SUCH_FILE: errno.ENOENT, FX_PERMISSION_DENIED: errno.EACCES, FX_OP_UNSUPPORTED: errno.EOPNOTSUPP,
          10: errno.ENOENT,  # NO_SUCH_PATH
          11: errno.EEXIST,  # FILE_ALREADY_EXISTS
          12: errno.EACCES,  # WRITE_PROTECT
          14: errno.ENOSPC,  # NO_SPACE_ON_FILESYSTEM
          15: errno.EDQUOT,  # QUOTA_EXCEEDED
          18: errno.ENOTEMPTY,  # DIR_NOT_EMPTY
          19: errno.ENOTDIR,  # NOT_A_DIRECTORY
          20: errno.ENAMETOOLONG,  # INVALID_FILENAME
          21: errno.ELOOP,  # LINK_LOOP
          24: errno.EISDIR}  # FILE_IS_A_DIRECTORY

#: The largest packet accepted from the server (OpenSSH sends at most 256 KiB of data per packet).
MAX_PACKET = 4 << 20
#: SSH_FXP_DATA packets at least this long are handed on as views of what was read (no copy).
VIEW_MIN = 16 * 1024

log = logging.getLogger("afuse.sftpfs")

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_HEAD = struct.Struct(">IBI")  # a packet's length, type and request id
#: ATTRS fields after flags 0xF (SIZE, UIDGID, PERMISSIONS, ACMODTIME), as OpenSSH sends them for every file.
_ATTRS_ALL = struct.Struct(">QIIIII")
_A_SIZE, _A_UIDGID, _A_PERMISSIONS, _A_ACMODTIME, _A_EXTENDED = 0x1, 0x2, 0x4, 0x8, 0x80000000

Buffer = bytes | memoryview


class SftpError(Exception):
    """The server answered a request with a failure status (SSH_FX_*): ``code``, its message, and
    :attr:`errno`, the nearest errno (EIO for FX_FAILURE, which v3 sends for most failures)."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message or f"SFTP status {code}")
        self.code = code
        self.errno = _ERRNO.get(code, errno.EIO)


class ConnectionLost(Exception):
    """The transport ended (or the server broke the protocol): the request was not answered."""


class ProtocolError(ConnectionLost):
    """The server sent what SFTP v3 does not allow (the connection is unusable after it)."""


class FileAttrs(NamedTuple):
    """A file's attributes as SFTP v3 carries them, in wire order (None: the server sent none).

    Small tuples: a listing makes one per entry."""

    size: int | None = None
    uid: int | None = None
    gid: int | None = None
    #: The whole ``st_mode`` (type and permission bits), as SFTP v3 sends it.
    permissions: int | None = None
    atime: int | None = None
    mtime: int | None = None


class StatVfs(NamedTuple):
    """statvfs@openssh.com's answer."""

    bsize: int
    frsize: int
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    favail: int
    fsid: int
    flag: int
    namemax: int


def string(b: Buffer) -> bytes:
    """An SSH ``string``: a length and the bytes."""
    return _U32.pack(len(b)) + bytes(b)


def encode_attrs(a: FileAttrs) -> bytes:
    """SFTP v3 ATTRS with the fields of ``a`` that are not None (uid and gid go together)."""
    flags, out = 0, []
    if a.size is not None:
        flags |= _A_SIZE
        out.append(_U64.pack(a.size))
    if a.uid is not None and a.gid is not None:
        flags |= _A_UIDGID
        out.append(struct.pack(">II", a.uid, a.gid))
    if a.permissions is not None:
        flags |= _A_PERMISSIONS
        out.append(_U32.pack(a.permissions))
    if a.atime is not None and a.mtime is not None:
        flags |= _A_ACMODTIME
        out.append(struct.pack(">II", a.atime & 0xFFFFFFFF, a.mtime & 0xFFFFFFFF))
    return _U32.pack(flags) + b"".join(out)


def parse_attrs(payload: Buffer, off: int) -> tuple[FileAttrs, int]:
    """SFTP v3 ATTRS at ``off``: the attributes and the offset after them (struct.error if short)."""
    (flags,) = _U32.unpack_from(payload, off)
    off += 4
    if flags == 0xF:
        return tuple.__new__(FileAttrs, _ATTRS_ALL.unpack_from(payload, off)), off + 28
    size = uid = gid = perm = atime = mtime = None
    if flags & _A_SIZE:
        (size,) = _U64.unpack_from(payload, off)
        off += 8
    if flags & _A_UIDGID:
        uid, gid = struct.unpack_from(">II", payload, off)
        off += 8
    if flags & _A_PERMISSIONS:
        (perm,) = _U32.unpack_from(payload, off)
        off += 4
    if flags & _A_ACMODTIME:
        atime, mtime = struct.unpack_from(">II", payload, off)
        off += 8
    if flags & _A_EXTENDED:
        (pairs,) = _U32.unpack_from(payload, off)
        off += 4
        for _ in range(2 * pairs):  # (type, data) strings
            (n,) = _U32.unpack_from(payload, off)
            off += 4 + n
    if off > len(payload):
        raise struct.error("ATTRS past the end of the packet")
    return FileAttrs(size, uid, gid, perm, atime, mtime), off


def parse_names(payload: Buffer, into: dict[bytes, FileAttrs]) -> list[bytes]:
    """The names of the entries of an ``SSH_FXP_NAME`` reply, given the payload after the request
    id (``uint32 count``, then per entry ``string filename, string longname, ATTRS``), in order;
    each one's attributes are added to ``into``. ``.`` and ``..`` are left out, the long names
    skipped. ValueError if the payload is not that.

    A listing decodes thousands of these: one tuple per entry (its FileAttrs), no pairs."""
    u32, full, new = _U32.unpack_from, _ATTRS_ALL.unpack_from, tuple.__new__
    names: list[bytes] = []
    if type(payload) is not bytes:
        payload = bytes(payload)
    try:
        (count,) = u32(payload, 0)
        off = 4
        for _ in range(count):
            (n,) = u32(payload, off)
            name = payload[off + 4:off + 4 + n]
            off += 4 + n
            (n,) = u32(payload, off)  # the long name ("ls -l" line): not used
            off += 4 + n
            (flags,) = u32(payload, off)
            if flags == 0xF:  # the usual case: every field, no extensions
                a = new(FileAttrs, full(payload, off + 4))
                off += 32
            else:
                a, off = parse_attrs(payload, off)
            if len(name) > 2 or (name != b"." and name != b".."):
                into[name] = a
                names.append(name)
    except struct.error as e:
        raise ValueError(f"truncated SSH_FXP_NAME reply: {e}") from None
    if off > len(payload):
        raise ValueError("truncated SSH_FXP_NAME reply")
    return names


# -- sans-IO --------------------------------------------------------------------------------------

class SftpCodec:
    """SFTP packets from a byte stream, and requests to one: no I/O (the caller moves the bytes).

    :meth:`receive` takes what was read and returns the packets it completes as ``(type, id,
    payload)`` (for SSH_FXP_VERSION the id is the version), the payload being what follows the
    id: bytes, or for an SSH_FXP_DATA of :data:`VIEW_MIN` bytes or more that arrived within one
    read, a view of what was read (the data then goes on without a copy).

    :meth:`frame` is the same for a reader that keeps a packet begun in its own buffer and gives
    it again with what follows it (then no packet is ever copied to be completed).
    """

    def __init__(self) -> None:
        self._parts: list[Buffer] = []
        self._have = 0
        self._need = 0
        self._next_id = 0

    def init(self, version: int = 3) -> bytes:
        """SSH_FXP_INIT."""
        return struct.pack(">IBI", 5, FXP_INIT, version)

    def request(self, pkttype: int, args: Sequence[Buffer]) -> tuple[int, list[Buffer]]:
        """A request of type ``pkttype`` with the encoded arguments ``args``: its id and the
        pieces to write, in order (the arguments are not copied)."""
        rid = self._next_id
        self._next_id = (rid + 1) & 0xFFFFFFFF
        return rid, [_HEAD.pack(sum(map(len, args)) + 5, pkttype, rid), *args]

    def receive(self, data: Buffer) -> list[tuple[int, int, Buffer]]:
        """The packets ``data`` completes (with what came before). ProtocolError for a packet
        too short or too long to be SFTP.

        A packet cut by the end of a read is completed by copying just its own bytes (not the
        next read's); packets within one read are not copied before their payload is sliced."""
        out: list[tuple[int, int, Buffer]] = []
        u32 = _U32.unpack_from
        off, n = 0, len(data)
        if self._parts:
            parts = self._parts
            while True:
                take = self._need - self._have
                if n - off < take:  # still not whole
                    parts.append(memoryview(data)[off:])
                    self._have += n - off
                    return out
                parts.append(memoryview(data)[off:off + take])
                self._have += take
                off += take
                if self._need == 4:  # the length is in: now the whole packet
                    head = b"".join(parts)
                    (length,) = u32(head, 0)
                    if length < 5 or length > MAX_PACKET:
                        raise ProtocolError(f"SFTP packet of {length} bytes")
                    parts[:] = [head]
                    self._need = 4 + length
                    continue
                packet = b"".join(parts)
                self._parts = []
                self._emit(out, packet, 0, len(packet))
                break
        while n - off >= 4:
            (length,) = u32(data, off)
            if length < 5 or length > MAX_PACKET:
                raise ProtocolError(f"SFTP packet of {length} bytes")
            end = off + 4 + length
            if end > n:
                break
            self._emit(out, data, off, end)
            off = end
        if off < n:
            rest = memoryview(data)[off:]
            self._parts = [rest]
            self._have = n - off
            self._need = 4 + u32(data, off)[0] if n - off >= 4 else 4
        return out

    def frame(self, data: Buffer) -> tuple[list[tuple[int, int, Buffer]], int, int]:
        """The whole packets at the start of ``data`` (as :meth:`receive` returns them), the bytes
        they take, and the size of the packet begun after them (4 while its length is not in; 0
        for none). The rest of ``data`` is to be given again, with what follows it.
        ProtocolError for a packet too short or too long to be SFTP."""
        out: list[tuple[int, int, Buffer]] = []
        u32 = _U32.unpack_from
        off, n = 0, len(data)
        while n - off >= 4:
            (length,) = u32(data, off)
            if length < 5 or length > MAX_PACKET:
                raise ProtocolError(f"SFTP packet of {length} bytes")
            end = off + 4 + length
            if end > n:
                return out, off, 4 + length
            self._emit(out, data, off, end)
            off = end
        return out, off, 4 if off < n else 0

    @staticmethod
    def _emit(out: list[tuple[int, int, Buffer]], data: Buffer, off: int, end: int) -> None:
        pkttype = data[off + 4]
        (rid,) = _U32.unpack_from(data, off + 5)
        if pkttype == FXP_DATA and end - off >= VIEW_MIN:
            out.append((pkttype, rid, memoryview(data)[off + 9:end]))
        elif type(data) is bytes:
            out.append((pkttype, rid, data[off + 9:end]))
        else:  # a view of a read buffer, which is read into again: the payload is copied
            out.append((pkttype, rid, bytes(data[off + 9:end])))


# -- replies --------------------------------------------------------------------------------------

class Reply:
    """The answer to a request, once it arrives: what the transport delivered (:meth:`reply`) or
    why none will come (:meth:`fail`). Waited for with :meth:`get` from any number of trio tasks;
    a waiter cancelled leaves the request and its answer to the others."""

    __slots__ = ("_callbacks", "_event", "done", "error", "value")

    def __init__(self) -> None:
        self.done = False
        self.value: Any = None
        self.error: BaseException | None = None
        self._event: trio.Event | None = None
        self._callbacks: list[Callable[[Reply], None]] | None = None

    def reply(self, pkttype: int, payload: Buffer) -> None:
        """The server's answer (a subclass may decode it here)."""
        self.set((pkttype, payload))

    def fail(self, exc: BaseException) -> None:
        """No answer will come: ``exc`` is raised to the waiters."""
        if not self.done:
            self.error = exc
            self._finish()

    def set(self, value: Any) -> None:
        """The value the waiters get."""
        if not self.done:
            self.value = value
            self._finish()

    def _finish(self) -> None:
        self.done = True
        if self._event is not None:
            self._event.set()
        callbacks, self._callbacks = self._callbacks, None
        for cb in callbacks or ():
            cb(self)

    def add_callback(self, cb: Callable[[Reply], None]) -> None:
        """Call ``cb(self)`` once done (at once if done)."""
        if self.done:
            cb(self)
        elif self._callbacks is None:
            self._callbacks = [cb]
        else:
            self._callbacks.append(cb)

    def result(self) -> Any:
        """The value, or the error raised (only once done)."""
        if self.error is not None:
            raise self.error
        return self.value

    async def get(self) -> Any:
        """Wait for the value (or its error)."""
        if not self.done:
            if self._event is None:
                self._event = trio.Event()
            await self._event.wait()
        if self.error is not None:
            raise self.error
        return self.value


def check_status(pkttype: int, payload: Buffer, what: str) -> None:
    """Raise what an SSH_FXP_STATUS other than FX_OK says (SftpError; EOF is code FX_EOF), or
    ProtocolError if the reply is not a status."""
    if pkttype != FXP_STATUS:
        raise ProtocolError(f"unexpected reply {pkttype} to {what}")
    code, message = _status(payload)
    if code != FX_OK:
        raise SftpError(code, message)


def _status(payload: Buffer) -> tuple[int, str]:
    try:
        (code,) = _U32.unpack_from(payload, 0)
    except struct.error:
        raise ProtocolError("truncated SSH_FXP_STATUS") from None
    message = ""
    if len(payload) >= 8:
        (n,) = _U32.unpack_from(payload, 4)
        message = bytes(payload[8:8 + n]).decode("utf-8", "replace")
    return code, message


def _string_at(payload: Buffer, off: int = 0) -> tuple[bytes, int]:
    (n,) = _U32.unpack_from(payload, off)
    if off + 4 + n > len(payload):
        raise ProtocolError("truncated string in a reply")
    return bytes(payload[off + 4:off + 4 + n]), off + 4 + n


# -- the client -------------------------------------------------------------------------------------

class SftpClient:
    """One SFTP session over a byte transport: ``write`` sends pieces (in order, at once or queued),
    the transport calls :meth:`feed` with what it reads and :meth:`lost` when it ends.

    Every request is written when made; its :class:`Reply` (or the waiter given) gets the answer.
    The typed calls (:meth:`lstat`, :meth:`open`, ...) raise SftpError for a failure status,
    ConnectionLost if the transport ended first.
    """

    def __init__(self, write: Callable[[list[Buffer]], None]) -> None:
        self._write = write
        self.codec = SftpCodec()
        self.waiters: dict[int, Reply] = {}
        self.version = 0
        #: The server's extensions (name -> data), from SSH_FXP_VERSION.
        self.extensions: dict[bytes, bytes] = {}
        #: limits@openssh.com's largest WRITE (0: unknown).
        self.max_write = 0
        self.closed: BaseException | None = None
        self._version = Reply()

    # transport side

    def feed(self, data: Buffer) -> None:
        """What the transport read: each packet completed goes to its request's waiter."""
        try:
            packets = self.codec.receive(data)
        except ProtocolError as e:
            self.lost(e)
            return
        self._deliver(packets)

    def feed_frames(self, data: Buffer) -> tuple[int, int]:
        """What the transport read, after what the last call left (:meth:`SftpCodec.frame`):
        each whole packet goes to its request's waiter. Returns the bytes taken and the size of
        the packet begun after them (0: none); (all, 0) once the connection is lost."""
        try:
            packets, used, need = self.codec.frame(data)
        except ProtocolError as e:
            self.lost(e)
            return len(data), 0
        self._deliver(packets)
        return used, need

    def _deliver(self, packets: list[tuple[int, int, Buffer]]) -> None:
        pop = self.waiters.pop
        for pkttype, rid, payload in packets:
            if pkttype == FXP_VERSION:  # the id is the version
                self._version.set((rid, payload))
                continue
            waiter = pop(rid, None)
            if waiter is None:
                self.lost(ProtocolError(f"a reply ({pkttype}) to request {rid}, which was not sent"))
                return
            try:
                waiter.reply(pkttype, payload)
            except Exception as e:  # a waiter's own bug: its request fails, the session goes on
                log.exception("SFTP reply %d to request %d", pkttype, rid)
                waiter.fail(e)

    def lost(self, exc: BaseException) -> None:
        """The transport ended: every request waiting (and every later one) fails with ``exc``."""
        if self.closed is None:
            self.closed = exc if isinstance(exc, ConnectionLost) else ConnectionLost(str(exc) or type(exc).__name__)
        waiters, self.waiters = self.waiters, {}
        for w in waiters.values():
            w.fail(self.closed)
        self._version.fail(self.closed)

    # requests

    def send(self, pkttype: int, *args: Buffer, waiter: Reply | None = None) -> Reply:
        """Write a request now; its answer goes to ``waiter`` (a new :class:`Reply` if None)."""
        w = Reply() if waiter is None else waiter
        if self.closed is not None:
            w.fail(self.closed)
            return w
        rid, pieces = self.codec.request(pkttype, args)
        self.waiters[rid] = w
        self._write(pieces)
        return w

    def send_many(self, pkttype: int, args: Sequence[Sequence[Buffer]], waiter: Reply) -> None:
        """Write one request per item of ``args`` in one write, all answered to ``waiter``."""
        if self.closed is not None:
            waiter.fail(self.closed)
            return
        out: list[Buffer] = []
        for a in args:
            rid, pieces = self.codec.request(pkttype, a)
            self.waiters[rid] = waiter
            out += pieces
        self._write(out)

    def extended(self, name: bytes, *args: Buffer) -> Reply:
        """An SSH_FXP_EXTENDED request."""
        return self.send(FXP_EXTENDED, string(name), *args)

    async def start(self) -> None:
        """INIT, and the server's VERSION and extensions (limits@openssh.com asked if offered)."""
        if self.closed is None:
            self._write([self.codec.init()])
        self.version, payload = await self._version.get()
        if self.version != 3:
            raise ProtocolError(f"the server speaks SFTP version {self.version}, not 3")
        off = 0
        try:
            while off < len(payload):
                name, off = _string_at(payload, off)
                data, off = _string_at(payload, off)
                self.extensions[name] = data
        except struct.error:
            raise ProtocolError("bad SSH_FXP_VERSION") from None
        if b"limits@openssh.com" in self.extensions:
            t, p = await self.extended(b"limits@openssh.com").get()
            if t == FXP_EXTENDED_REPLY and len(p) >= 32:
                self.max_write = struct.unpack_from(">QQQQ", p, 0)[2]

    def has(self, extension: bytes) -> bool:
        """Whether the server offered ``extension`` (e.g. ``b"posix-rename@openssh.com"``)."""
        return extension in self.extensions

    # typed calls

    async def status(self, reply: Reply, what: str) -> None:
        """Wait for a status reply; raise its failure."""
        pkttype, payload = await reply.get()
        check_status(pkttype, payload, what)

    async def _expect(self, reply: Reply, pkttype: int, what: str) -> Buffer:
        """The payload of ``reply`` if it is a ``pkttype``; a failure status is raised, anything
        else is a ProtocolError."""
        got, payload = await reply.get()
        if got == pkttype:
            return payload  # type: ignore[no-any-return]
        check_status(got, payload, what)
        raise ProtocolError(f"SSH_FX_OK in reply to {what}")

    async def handle(self, reply: Reply, what: str = "OPEN") -> bytes:
        """Wait for an SSH_FXP_HANDLE reply."""
        return _string_at(await self._expect(reply, FXP_HANDLE, what))[0]

    async def attrs(self, reply: Reply, what: str = "STAT") -> FileAttrs:
        """Wait for an SSH_FXP_ATTRS reply."""
        payload = await self._expect(reply, FXP_ATTRS, what)
        try:
            return parse_attrs(payload, 0)[0]
        except struct.error:
            raise ProtocolError("truncated SSH_FXP_ATTRS") from None

    async def _name(self, reply: Reply, what: str) -> bytes:
        payload = await self._expect(reply, FXP_NAME, what)
        try:
            (count,) = _U32.unpack_from(payload, 0)
            if count < 1:
                raise ProtocolError(f"no name in reply to {what}")
            return _string_at(payload, 4)[0]
        except struct.error:
            raise ProtocolError(f"truncated SSH_FXP_NAME in reply to {what}") from None

    async def lstat(self, path: bytes) -> FileAttrs:
        return await self.attrs(self.send(FXP_LSTAT, string(path)), "LSTAT")

    async def stat(self, path: bytes) -> FileAttrs:
        return await self.attrs(self.send(FXP_STAT, string(path)), "STAT")

    async def fstat(self, handle: bytes) -> FileAttrs:
        return await self.attrs(self.send(FXP_FSTAT, string(handle)), "FSTAT")

    async def setstat(self, path: bytes, a: FileAttrs, follow_symlinks: bool = True) -> None:
        """SETSTAT; ``follow_symlinks=False``: lsetstat@openssh.com where offered."""
        if not follow_symlinks and self.has(b"lsetstat@openssh.com"):
            await self.status(self.extended(b"lsetstat@openssh.com", string(path), encode_attrs(a)), "LSETSTAT")
        else:
            await self.status(self.send(FXP_SETSTAT, string(path), encode_attrs(a)), "SETSTAT")

    async def fsetstat(self, handle: bytes, a: FileAttrs) -> None:
        await self.status(self.send(FXP_FSETSTAT, string(handle), encode_attrs(a)), "FSETSTAT")

    def send_open(self, path: bytes, pflags: int, a: FileAttrs, waiter: Reply | None = None) -> Reply:
        return self.send(FXP_OPEN, string(path), _U32.pack(pflags), encode_attrs(a), waiter=waiter)

    async def open(self, path: bytes, pflags: int, a: FileAttrs | None = None) -> bytes:
        """OPEN: the handle."""
        return await self.handle(self.send_open(path, pflags, a or FileAttrs()))

    async def opendir(self, path: bytes) -> bytes:
        return await self.handle(self.send(FXP_OPENDIR, string(path)), "OPENDIR")

    async def close(self, handle: bytes) -> None:
        await self.status(self.send(FXP_CLOSE, string(handle)), "CLOSE")

    async def remove(self, path: bytes) -> None:
        await self.status(self.send(FXP_REMOVE, string(path)), "REMOVE")

    def send_mkdir(self, path: bytes, a: FileAttrs) -> Reply:
        return self.send(FXP_MKDIR, string(path), encode_attrs(a))

    async def rmdir(self, path: bytes) -> None:
        await self.status(self.send(FXP_RMDIR, string(path)), "RMDIR")

    async def realpath(self, path: bytes) -> bytes:
        return await self._name(self.send(FXP_REALPATH, string(path)), "REALPATH")

    async def readlink(self, path: bytes) -> bytes:
        return await self._name(self.send(FXP_READLINK, string(path)), "READLINK")

    def send_symlink(self, target: bytes, path: bytes) -> Reply:
        """SYMLINK making ``path`` point at ``target``. OpenSSH's server takes the target first
        (the draft's order is the other way); sftpfs assumes OpenSSH, as sshfs does."""
        return self.send(FXP_SYMLINK, string(target), string(path))

    def send_link(self, old: bytes, new: bytes) -> Reply:
        """hardlink@openssh.com (an SftpError FX_OP_UNSUPPORTED if not offered)."""
        if not self.has(b"hardlink@openssh.com"):
            r = Reply()
            r.fail(SftpError(FX_OP_UNSUPPORTED, "the server offers no hardlink@openssh.com"))
            return r
        return self.extended(b"hardlink@openssh.com", string(old), string(new))

    async def rename(self, old: bytes, new: bytes) -> None:
        """RENAME (fails if ``new`` exists)."""
        await self.status(self.send(FXP_RENAME, string(old), string(new)), "RENAME")

    async def posix_rename(self, old: bytes, new: bytes) -> None:
        """posix-rename@openssh.com (replaces ``new``)."""
        if not self.has(b"posix-rename@openssh.com"):
            raise SftpError(FX_OP_UNSUPPORTED, "the server offers no posix-rename@openssh.com")
        await self.status(self.extended(b"posix-rename@openssh.com", string(old), string(new)), "POSIX-RENAME")

    async def statvfs(self, path: bytes) -> StatVfs:
        """statvfs@openssh.com."""
        if not self.has(b"statvfs@openssh.com"):
            raise SftpError(FX_OP_UNSUPPORTED, "the server offers no statvfs@openssh.com")
        p = await self._expect(self.extended(b"statvfs@openssh.com", string(path)), FXP_EXTENDED_REPLY,
                               "STATVFS")
        try:
            return StatVfs(*struct.unpack_from(">11Q", p, 0))
        except struct.error:
            raise ProtocolError("truncated statvfs@openssh.com reply") from None

    async def fsync(self, handle: bytes) -> None:
        """fsync@openssh.com."""
        if not self.has(b"fsync@openssh.com"):
            raise SftpError(FX_OP_UNSUPPORTED, "the server offers no fsync@openssh.com")
        await self.status(self.extended(b"fsync@openssh.com", string(handle)), "FSYNC")

    def read_args(self, handle: bytes, offset: int, size: int) -> bytes:
        """A READ's arguments."""
        return _U32.pack(len(handle)) + handle + _U64.pack(offset) + _U32.pack(size)


def data_of(pkttype: int, payload: Buffer) -> Buffer:
    """A READ's answer: SSH_FXP_DATA's data (a view of a view, bytes of bytes), b"" at EOF;
    SftpError for other failures, ProtocolError for what is not an answer to READ."""
    if pkttype == FXP_DATA:
        (n,) = _U32.unpack_from(payload, 0)
        if 4 + n > len(payload):
            raise ProtocolError("truncated SSH_FXP_DATA")
        return payload[4:4 + n]
    if pkttype == FXP_STATUS:
        code, message = _status(payload)
        if code == FX_EOF:
            return b""
        if code != FX_OK:
            raise SftpError(code, message)
    raise ProtocolError(f"unexpected reply {pkttype} to READ")
