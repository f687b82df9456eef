"""The opcode table and the sans-IO Connection, driven directly (no kernel, no trio)."""

from __future__ import annotations

import errno
import inspect
from typing import Any

import pytest

import afuse
from afuse.dispatch import Dispatcher
from afuse.operations import Operations
from afuse.wire import kernel as k
from afuse.wire import notify as wire_notify
from afuse.wire import requests as r
from afuse.wire.connection import Connection
from afuse.wire.constants import KERNEL_MINOR_VERSION, FOpen, InitFlag, NotifyCode, Opcode
from afuse.wire.errors import HandlerResultError, NotNegotiated
from afuse.wire.init import InitConfig, Negotiated, negotiate
from afuse.wire.opcodes import BY_OPCODE, HANDLERS, NO_REPLY, OPCODES, STATEFUL_HANDLERS, Shape
from afuse.wire.results import ENCODERS
from afuse.wire.types import Attr, DirEntry, Entry, Handle

HEAD = (4, 1, 1000, 1000, 77)  # unique nodeid uid gid pid


def _init_bytes(minor: int = 45, flags: int = int(InitFlag.INIT_EXT | InitFlag.SETXATTR_EXT), major: int = 7) -> bytes:
    return k.encode_request(r.InitRequest(2, 0, 0, 0, 0, major, minor, 131072, InitFlag(flags)))


def _connection(minor: int = 45, flags: InitFlag = InitFlag.INIT_EXT | InitFlag.SETXATTR_EXT) -> Connection:
    conn = Connection(InitConfig())
    step = conn.init(_init_bytes(minor, int(flags)))
    assert step.negotiated is not None and step.error is None
    return conn


# -- the table ------------------------------------------------------------------------------------


def test_every_opcode_has_one_record() -> None:
    known = {o for o in Opcode if o not in (Opcode.IOMAP_BEGIN, Opcode.IOMAP_END)}
    assert {s.opcode for s in OPCODES} == known
    assert len(OPCODES) == len(known)
    for spec in OPCODES:
        assert BY_OPCODE[spec.opcode] is spec
        assert spec.request.opcode in {s.opcode for s in OPCODES if s.request is spec.request}
        assert spec.reply in ENCODERS


def test_every_handler_is_an_operations_method() -> None:
    listing = {"readdir", "readdirplus"}  # plain def in the base: a coroutine or an async generator
    for name in HANDLERS:
        method = getattr(Operations, name)
        assert inspect.iscoroutinefunction(method) or name in listing, name
    # And every async Operations method handles some opcode (nothing is listed only there).
    own = {n for n, m in vars(Operations).items() if inspect.iscoroutinefunction(m)} | listing
    assert own == set(HANDLERS)


def test_derived_lists() -> None:
    assert NO_REPLY == {Opcode.FORGET, Opcode.BATCH_FORGET, Opcode.INTERRUPT, Opcode.NOTIFY_REPLY}
    assert {"create", "mkdir", "unlink", "rename", "write", "release", "forget"} <= set(STATEFUL_HANDLERS)
    assert not {"getattr", "read", "readdir", "statfs"} & set(STATEFUL_HANDLERS)
    non_idempotent = {s.handler for s in OPCODES if not s.idempotent and s.handler}
    assert {"create", "mkdir", "mknod", "symlink", "link", "unlink", "rmdir", "rename", "tmpfile"} <= non_idempotent
    # Extensions only on creating requests.
    assert {s.request for s in OPCODES if s.extensions} == {
        r.SymlinkRequest, r.MknodRequest, r.MkdirRequest, r.CreateRequest, r.TmpfileRequest}


def test_flags_follow_handlers() -> None:
    """INIT flags that need handlers are asked for only when the handlers exist (from the table)."""
    class Locks(Operations):
        async def getlk(self, req: r.GetlkRequest) -> afuse.Lock:
            raise afuse.FUSEError(errno.ENOSYS)

        async def setlk(self, req: r.SetlkRequest) -> None:
            pass

    bare = Dispatcher(Operations()).wanted_flags(InitConfig())
    assert not bare & (InitFlag.POSIX_LOCKS | InitFlag.FLOCK_LOCKS | InitFlag.DO_READDIRPLUS)
    locks = Dispatcher(Locks()).wanted_flags(InitConfig())
    assert locks & InitFlag.POSIX_LOCKS and not locks & InitFlag.FLOCK_LOCKS


# -- INIT -----------------------------------------------------------------------------------------


def test_init_negotiates_and_adopts() -> None:
    conn = Connection(InitConfig())
    step = conn.init(_init_bytes(41))
    assert step.error is None and step.negotiated is conn.negotiated
    assert step.negotiated is not None and step.negotiated.minor == 41
    err, unique, body = k.split_reply(step.reply)
    assert (err, unique) == (0, 2)
    assert k.decode_init_reply(body).minor == 41
    assert conn.decoder.setxattr_ext  # followed the negotiation


def test_init_newer_major_gets_our_version_then_negotiates() -> None:
    conn = Connection()
    step = conn.init(_init_bytes(major=8))
    assert step.negotiated is None and step.error is None
    _e, _u, body = k.split_reply(step.reply)
    assert body[:8] == (7).to_bytes(4, "little") + KERNEL_MINOR_VERSION.to_bytes(4, "little")
    assert conn.init(_init_bytes()).negotiated is not None


def test_init_failures_are_answered_and_explained() -> None:
    old = Connection().init(_init_bytes(minor=5))
    assert old.error is not None and "older" in old.error and old.negotiated is None
    assert k.split_reply(old.reply)[0] == -errno.EPROTO
    wrong = Connection().init(k.encode_request(r.GetattrRequest(*HEAD, None)))
    assert wrong.error is not None and "GETATTR" in wrong.error
    assert k.split_reply(wrong.reply)[:2] == (-errno.EIO, HEAD[0])
    with pytest.raises(r.ProtocolError):
        Connection().init(b"\0" * 12)


# -- replies --------------------------------------------------------------------------------------


def test_reply_encodes_by_shape() -> None:
    conn = _connection()
    conn.attr_timeout = 2.5
    req = r.GetattrRequest(*HEAD, None)
    out = conn.reply(req, Attr(ino=1, mode=0o40755))
    err, unique, body = k.split_reply(out)
    assert (err, unique) == (0, HEAD[0])
    a = k.decode_attr(body)
    assert a.mode == 0o40755 and a.timeout == 2.5


@pytest.mark.parametrize(("req", "value", "message"), [
    (r.GetattrRequest(*HEAD, None), Entry(2, Attr()), "getattr must return Attr"),
    (r.LookupRequest(*HEAD, b"x"), Attr(), "lookup must return an Entry"),
    (r.ReadRequest(*HEAD, 1, 0, 4, 0, 0, 0), b"12345", "read returned 5 bytes for a request of 4"),
    (r.WriteRequest(*HEAD, 1, 0, b"abc", 0, 0, 0), 4, "count from 0 to 3"),
    (r.OpenRequest(*HEAD, 0, 0), Handle(3, FOpen.PASSTHROUGH, 7), "not negotiated"),
    (r.OpenRequest(*HEAD, 0, 0), Handle(3, 0, 7), "without FOpen.PASSTHROUGH"),
    (r.OpendirRequest(*HEAD, 0, 0), Handle(3, FOpen.PASSTHROUGH, 7), "files only"),
    (r.BmapRequest(*HEAD, 0, 512), -1, "u64 range"),
    (r.ListxattrRequest(*HEAD, 100), [b"ok", b"bad\0name"], "invalid name"),
])
def test_invalid_results_raise_before_any_bytes(req: r.Request, value: Any, message: str) -> None:
    with pytest.raises(HandlerResultError, match=message):
        _connection().reply(req, value)


def test_passthrough_rules_use_the_negotiation() -> None:
    conn = _connection(flags=InitFlag.INIT_EXT | InitFlag.PASSTHROUGH)
    conn.config = InitConfig(passthrough=True)
    neg = negotiate(r.InitRequest(2, 0, 0, 0, 0, 7, 45, 0, InitFlag.INIT_EXT | InitFlag.PASSTHROUGH),
                    InitConfig(passthrough=True))
    conn.adopt(neg)
    req = r.OpenRequest(*HEAD, 0, 0)
    assert k.decode_open(k.split_reply(conn.reply(req, Handle(3, FOpen.PASSTHROUGH, 7)))[2]).backing_id == 7
    with pytest.raises(HandlerResultError, match="KEEP_CACHE"):
        conn.reply(req, Handle(3, FOpen.PASSTHROUGH | FOpen.KEEP_CACHE, 7))


def test_dir_writer_checks_entries() -> None:
    conn = _connection()
    req = r.ReaddirRequest(*HEAD, 1, 0, 4096)
    out = conn.dir_writer(req)
    assert out.add(DirEntry(b"a", 1, attr=Attr(ino=5, mode=0o100644)))
    with pytest.raises(HandlerResultError, match="DirEntry"):
        out.add((b"b", 2))
    with pytest.raises(HandlerResultError, match="offsets start at 1"):
        out.add(DirEntry(b"c", 0, attr=Attr()))
    # the plain form (name, offset, ino, mode), checked as DirEntry is
    assert out.add((b"d", 2, 7, 0o040755))
    for bad, why in (((b"x/y", 3, 1, 0), "invalid directory entry name"), (("str", 3, 1, 0), "invalid"),
                     ((b"e", 0, 1, 0), "offsets start at 1"), ((b"e", 3, -1, 0), "bad ino")):
        with pytest.raises(HandlerResultError, match=why):
            out.add(bad)
    got = [(d.name, d.attr.ino, d.attr.mode) for d in k.decode_dirents(k.split_reply(out.reply(req.unique))[2])
           if d.attr is not None]
    assert got == [(b"a", 5, 0o100000), (b"d", 7, 0o040000)]
    plus = r.ReaddirplusRequest(*HEAD, 1, 0, 4096)
    with pytest.raises(HandlerResultError, match="DirEntry items, not a 4-tuple"):
        conn.dir_writer(plus).add((b"d", 2, 7, 0o040755))


def test_dir_slice_answers_readdir_from_a_position() -> None:
    """A DirSlice is the entries items[start:], item i at offset i + 1, taken while they fit;
    ino 0 goes out as 0xFFFFFFFF; bad items and READDIRPLUS are clear errors."""
    conn = _connection()
    items = [(b".", 0o040755, 1), (b"..", 0o040755, 0, None)] + [
        (b"f%03d" % i, 0o100644, 100 + i) for i in range(300)]

    def entries(start: int, size: int) -> list[tuple[bytes, int, int, int]]:
        req = r.ReaddirRequest(*HEAD, 1, start, size)
        out = conn.dir_writer(req)
        out.add_slice(afuse.DirSlice(items, start))
        return [(d.name, d.offset, d.attr.ino, d.attr.mode)
                for d in k.decode_dirents(k.split_reply(out.reply(req.unique))[2]) if d.attr is not None]

    first = entries(0, 4096)
    assert first[:3] == [(b".", 1, 1, 0o040000), (b"..", 2, 0xFFFFFFFF, 0o040000), (b"f000", 3, 100, 0o100000)]
    assert len(first) == 4096 // 32 and [o for _, o, _, _ in first] == list(range(1, 129))
    rest: list[tuple[bytes, int, int, int]] = []
    while True:  # the kernel continues from the last offset it got
        more = entries((rest or first)[-1][1], 4096)
        if not more:
            break
        rest += more
    assert [n for n, _, _, _ in first + rest] == [it[0] for it in items]
    assert entries(len(items), 4096) == [] and entries(len(items) + 5, 4096) == []  # the end
    assert entries(0, 31) == []  # not even one fits
    req = r.ReaddirRequest(*HEAD, 1, 0, 4096)
    bad_cases: list[tuple[list[Any], str]] = [
        ([(b"a/b", 0, 1)], "invalid directory entry name"),
        ([(b"ok", 0, 1), ("str", 0, 1)], "invalid directory entry name 'str'"),
        ([(b"ok", 0, 1), (b"x", None, 1)], "item 1 is not"),
        ([(b"ok", "mode", 1)], "item 0 is not"), ([(b"ok", 0, -1)], "item 0 is not"),
        ([b"xyz"], "item 0 is not"),
        # checked for the whole run at once: a bad name anywhere in it is found and named
        ([(b"f%03d" % i, 0, 1) for i in range(50)] + [(b"n\0ul", 0, 1)], r"invalid directory entry name b'n\\x00ul'"),
        ([(b"f%03d" % i, 0, 1) for i in range(50)] + [(b"", 0, 1)], "invalid directory entry name b''"),
        ([(b"f%03d" % i, 0, 1) for i in range(50)] + [(bytearray(b"x"), 0, 1)], "invalid directory entry name")]
    for bad_items, why in bad_cases:
        w = conn.dir_writer(req)
        with pytest.raises(HandlerResultError, match=why):
            w.add_slice(afuse.DirSlice(bad_items, 0))
        assert len(w.reply(req.unique)) == 16  # nothing of the run was added
    with pytest.raises(HandlerResultError, match="starting at -1"):
        conn.dir_writer(req).add_slice(afuse.DirSlice(items, -1))
    with pytest.raises(HandlerResultError, match="not READDIRPLUS"):
        conn.dir_writer(r.ReaddirplusRequest(*HEAD, 1, 0, 4096)).add_slice(afuse.DirSlice(items, 0))


# -- notifications --------------------------------------------------------------------------------


_NONE = InitFlag(0)


def _neg(minor: int, flags: InitFlag = _NONE) -> Negotiated:
    return Negotiated(kernel_major=7, kernel_minor=minor, minor=minor, offered=flags, flags=flags,
                      max_write=1 << 20, max_pages=256, max_readahead=1 << 20, max_background=64,
                      congestion_threshold=48, time_gran=1, max_stack_depth=1, request_timeout=0,
                      refused=InitFlag(0))


def test_notifications_check_the_negotiation() -> None:
    conn = Connection()
    with pytest.raises(NotNegotiated, match="no session"):
        conn.resend()
    conn.adopt(_neg(39))
    for call, minor in ((conn.resend, 40), (conn.inc_epoch, 44), (lambda: conn.prune([2]), 45)):
        with pytest.raises(NotNegotiated, match=rf"7\.{minor}"):
            call()
    with pytest.raises(NotNegotiated, match="HAS_EXPIRE_ONLY"):
        conn.inval_entry(1, b"x", expire_only=True)
    conn.adopt(_neg(45, InitFlag.HAS_EXPIRE_ONLY))
    assert conn.resend() == wire_notify.resend()
    assert conn.prune([2, 3]) == wire_notify.prune([2, 3])
    code, fields = k.decode_notification(conn.inval_entry(1, b"x", expire_only=True))
    assert code is NotifyCode.INVAL_ENTRY and fields["name"] == b"x"


def test_extra_opcodes_are_per_connection() -> None:
    from afuse.wire import iomap

    a, b = Connection(), Connection()
    iomap.enable(a)
    assert iomap.enabled(a) and not iomap.enabled(b)
    msg = iomap.encode_begin_request(2, 5, iomap.IomapOp.WRITE, 5, 0, 4096)
    assert isinstance(a.decode(msg), iomap.IomapBeginRequest)
    with pytest.raises(r.UnknownOpcode):
        b.decode(msg)
    assert BY_OPCODE.get(Opcode.IOMAP_BEGIN) is None  # the shared table is untouched
    assert Shape.CUSTOM in ENCODERS
