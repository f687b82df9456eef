"""afuse.resend: replay helpers and the replay journal (on MemFS, no kernel), plus a takeover."""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
import trio

import afuse
from afuse import resend
from afuse.examples import memfs
from afuse.wire import requests as r

RESEND = 1 << 63
T = TypeVar("T")
UID, GID = os.getuid(), os.getgid()


def hdr(unique: int, nodeid: int = 1) -> tuple[int, int, int, int, int]:
    return (unique, nodeid, UID, GID, 1234)


def mkdir_req(unique: int, name: bytes = b"d") -> r.MkdirRequest:
    return r.MkdirRequest(*hdr(unique), name=name, mode=0o755, umask=0o022)


class MemFS(memfs.MemFS):
    """memfs without the node layer's own answers to replays: what the helpers must do alone."""

    async def _once(self, req: r.Request, attempt: Callable[[], Awaitable[T]], recover: object) -> T:
        return await attempt()


def lookups(fs: MemFS, nodeid: int) -> int:
    return fs.node(nodeid).lookups


def child(fs: MemFS, name: bytes) -> int:
    assert fs.root.children is not None
    return fs.root.children[name].nodeid


@pytest.mark.trio
async def test_mkdir_replay_returns_existing_dir() -> None:
    fs = MemFS()
    first = await resend.replay_mkdir(fs, mkdir_req(10), fs.mkdir)
    assert lookups(fs, first.nodeid) == 1
    again = await resend.replay_mkdir(fs, mkdir_req(10 | RESEND), fs.mkdir)
    assert again.nodeid == first.nodeid and stat.S_ISDIR(again.attr.mode)
    assert lookups(fs, first.nodeid) == 2  # the replayed reply counts one, as every Entry does
    # a first attempt is never second-guessed
    with pytest.raises(afuse.FUSEError) as ei:
        await resend.replay_mkdir(fs, mkdir_req(11), fs.mkdir)
    assert ei.value.errno == errno.EEXIST


@pytest.mark.trio
async def test_mkdir_replay_over_other_type_fails() -> None:
    fs = MemFS()
    await fs.mknod(r.MknodRequest(*hdr(1), name=b"d", mode=stat.S_IFREG | 0o644, rdev=0, umask=0))
    ino = child(fs, b"d")
    before = lookups(fs, ino)
    with pytest.raises(afuse.FUSEError) as ei:
        await resend.replay_mkdir(fs, mkdir_req(2 | RESEND), fs.mkdir)
    assert ei.value.errno == errno.EEXIST
    assert lookups(fs, ino) == before  # the probing lookup was given back


@pytest.mark.trio
async def test_mkdir_replay_other_owner_fails() -> None:
    fs = MemFS()
    await fs.mkdir(mkdir_req(1))
    other = r.MkdirRequest(2 | RESEND, 1, UID + 1000, GID, 1, name=b"d", mode=0o755, umask=0)
    with pytest.raises(afuse.FUSEError):
        await resend.replay_mkdir(fs, other, fs.mkdir)
    entry = await resend.replay_mkdir(fs, other, fs.mkdir, same_owner=False)
    assert stat.S_ISDIR(entry.attr.mode)


@pytest.mark.trio
async def test_mknod_and_symlink_replay() -> None:
    fs = MemFS()
    req = r.MknodRequest(*hdr(1), name=b"fifo", mode=stat.S_IFIFO | 0o600, rdev=0, umask=0)
    e1 = await resend.replay_mknod(fs, req, fs.mknod)
    e2 = await resend.replay_mknod(fs, r.MknodRequest(*hdr(1 | RESEND), name=b"fifo", mode=stat.S_IFIFO | 0o600,
                                                      rdev=0, umask=0), fs.mknod)
    assert e1.nodeid == e2.nodeid
    with pytest.raises(afuse.FUSEError):  # a char device was asked for: not what is there
        await resend.replay_mknod(fs, r.MknodRequest(*hdr(2 | RESEND), name=b"fifo", mode=stat.S_IFCHR | 0o600,
                                                     rdev=0, umask=0), fs.mknod)
    s1 = await resend.replay_symlink(fs, r.SymlinkRequest(*hdr(3), name=b"l", target=b"/x"), fs.symlink)
    s2 = await resend.replay_symlink(fs, r.SymlinkRequest(*hdr(3 | RESEND), name=b"l", target=b"/x"), fs.symlink)
    assert s1.nodeid == s2.nodeid
    with pytest.raises(afuse.FUSEError):  # another target
        await resend.replay_symlink(fs, r.SymlinkRequest(*hdr(4 | RESEND), name=b"l", target=b"/y"), fs.symlink)


@pytest.mark.trio
async def test_create_replay_opens_existing_file() -> None:
    fs = MemFS()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    req = r.CreateRequest(*hdr(5), name=b"f", flags=flags, mode=0o644, umask=0o022)
    e1, h1 = await resend.replay_create(fs, req, fs.create)
    node = fs.node(e1.nodeid)
    assert isinstance(node, memfs.File) and node.opens == 1
    await fs.write(r.WriteRequest(*hdr(6, e1.nodeid), fh=h1.fh, offset=0, data=b"kept", write_flags=0,
                                  lock_owner=0, flags=os.O_WRONLY))
    replay = r.CreateRequest(*hdr(5 | RESEND), name=b"f", flags=flags | os.O_TRUNC, mode=0o644, umask=0o022)
    e2, h2 = await resend.replay_create(fs, replay, fs.create)
    assert e2.nodeid == e1.nodeid and h2.fh != h1.fh
    assert node.opens == 2 and fs._handles[h2.fh][0] is node
    assert node.size == 4  # O_TRUNC is not repeated


@pytest.mark.trio
async def test_unlink_rmdir_replay() -> None:
    fs = MemFS()
    await fs.mkdir(mkdir_req(1))
    await fs.create(r.CreateRequest(*hdr(2), name=b"f", flags=os.O_WRONLY, mode=0o644, umask=0))
    await resend.replay_unlink(r.UnlinkRequest(*hdr(3), name=b"f"), fs.unlink)
    await resend.replay_unlink(r.UnlinkRequest(*hdr(3 | RESEND), name=b"f"), fs.unlink)
    with pytest.raises(afuse.FUSEError):
        await resend.replay_unlink(r.UnlinkRequest(*hdr(4), name=b"f"), fs.unlink)
    await resend.replay_rmdir(r.RmdirRequest(*hdr(5), name=b"d"), fs.rmdir)
    await resend.replay_rmdir(r.RmdirRequest(*hdr(5 | RESEND), name=b"d"), fs.rmdir)
    # other errors stand
    await fs.mkdir(mkdir_req(6))
    await fs.mkdir(r.MkdirRequest(*hdr(7, child(fs, b"d")), name=b"sub", mode=0o755, umask=0))
    with pytest.raises(afuse.FUSEError) as ei:
        await resend.replay_rmdir(r.RmdirRequest(*hdr(8 | RESEND), name=b"d"), fs.rmdir)
    assert ei.value.errno == errno.ENOTEMPTY


@pytest.mark.trio
async def test_rename_replay() -> None:
    fs = MemFS()
    await fs.mkdir(mkdir_req(1, b"a"))
    req = r.RenameRequest(*hdr(2), name=b"a", newdir=1, newname=b"b", flags=0)
    await resend.replay_rename(fs, req, fs.rename)
    await resend.replay_rename(fs, r.RenameRequest(*hdr(2 | RESEND), name=b"a", newdir=1, newname=b"b", flags=0),
                               fs.rename)
    # NOREPLACE: the same
    await resend.replay_rename(fs, r.RenameRequest(*hdr(3 | RESEND), name=b"a", newdir=1, newname=b"b", flags=1),
                               fs.rename)
    # neither name there: ENOENT stands
    with pytest.raises(afuse.FUSEError) as ei:
        await resend.replay_rename(fs, r.RenameRequest(*hdr(4 | RESEND), name=b"x", newdir=1, newname=b"y", flags=0),
                                   fs.rename)
    assert ei.value.errno == errno.ENOENT
    # EXCHANGE cannot be recognised
    with pytest.raises(afuse.FUSEError):
        await resend.replay_rename(fs, r.RenameRequest(*hdr(5 | RESEND), name=b"a", newdir=1, newname=b"b", flags=2),
                                   fs.rename)
    assert fs.root.children is not None and b"b" in fs.root.children and b"a" not in fs.root.children


@pytest.mark.trio
async def test_link_and_setxattr_replay() -> None:
    fs = MemFS()
    e, _h = await fs.create(r.CreateRequest(*hdr(1), name=b"f", flags=os.O_WRONLY, mode=0o644, umask=0))
    l1 = await resend.replay_link(fs, r.LinkRequest(*hdr(2), oldnodeid=e.nodeid, newname=b"g"), fs.link)
    l2 = await resend.replay_link(fs, r.LinkRequest(*hdr(2 | RESEND), oldnodeid=e.nodeid, newname=b"g"), fs.link)
    assert l1.nodeid == l2.nodeid == e.nodeid and fs.node(e.nodeid).nlink == 2  # type: ignore[attr-defined]
    other, _ = await fs.create(r.CreateRequest(*hdr(3), name=b"o", flags=os.O_WRONLY, mode=0o644, umask=0))
    with pytest.raises(afuse.FUSEError):  # "g" is another inode
        await resend.replay_link(fs, r.LinkRequest(*hdr(4 | RESEND), oldnodeid=other.nodeid, newname=b"g"), fs.link)

    def sx(unique: int, value: bytes) -> r.SetxattrRequest:
        return r.SetxattrRequest(*hdr(unique, e.nodeid), name=b"user.k", value=value, flags=resend.XATTR_CREATE,
                                 setxattr_flags=0)

    await resend.replay_setxattr(fs, sx(5, b"v"), fs.setxattr)
    await resend.replay_setxattr(fs, sx(5 | RESEND, b"v"), fs.setxattr)
    with pytest.raises(afuse.FUSEError):
        await resend.replay_setxattr(fs, sx(6 | RESEND, b"other"), fs.setxattr)


def test_has_resend_asked_for_by_default() -> None:
    from afuse.wire.constants import InitFlag
    from afuse.wire.init import InitConfig

    assert InitConfig().wanted_flags() & InitFlag.HAS_RESEND


@pytest.mark.trio
async def test_replay_safe_generic() -> None:
    calls = []

    async def attempt() -> int:
        calls.append(1)
        raise afuse.FUSEError(errno.EEXIST)

    async def done(code: int) -> int | resend.NotDone:
        return 42 if code == errno.EEXIST else resend.NOT_DONE

    req = r.LookupRequest(*hdr(9 | RESEND), name=b"x")
    assert await resend.replay_safe(req, attempt, already_done=done) == 42
    with pytest.raises(afuse.FUSEError):
        await resend.replay_safe(req, attempt, already_done=done, errnos=frozenset({errno.ENOENT}))

    async def not_done(code: int) -> int | resend.NotDone:
        return resend.NOT_DONE

    with pytest.raises(afuse.FUSEError):
        await resend.replay_safe(req, attempt, already_done=not_done)
    assert resend.error_code(OSError(errno.EPERM, "x")) == errno.EPERM
    assert resend.error_code(ValueError()) is None


# -- the journal -----------------------------------------------------------------------------------


@pytest.mark.trio
async def test_journal_returns_recorded_outcome(tmp_path: Path) -> None:
    path = tmp_path / "replay.journal"
    j = resend.ReplayJournal(path)
    fs = MemFS()
    e1 = await j.run(mkdir_req(20), lambda: fs.mkdir(mkdir_req(20)))
    with pytest.raises(afuse.FUSEError):
        await j.run(mkdir_req(21), lambda: fs.mkdir(mkdir_req(21)))
    assert 20 in j and 21 in j and j.outcome(21) == (False, errno.EEXIST)

    ran = []

    async def must_not_run() -> afuse.Entry:
        ran.append(1)
        raise AssertionError

    # a replay gets the first attempt's very result, and nothing runs
    assert await j.run(mkdir_req(20 | RESEND), must_not_run) is e1
    with pytest.raises(afuse.FUSEError) as ei:
        await j.run(mkdir_req(21 | RESEND), must_not_run)
    assert ei.value.errno == errno.EEXIST and not ran
    j.close()

    # a successor reads the file; a record cut short at the end is ignored
    with open(path, "ab") as f:
        f.write(b"\x50\x00\x00\x00partial")
    j2 = resend.ReplayJournal(path)
    assert j2.outcome(20) == (True, e1)
    assert await j2.run(mkdir_req(20 | RESEND), must_not_run) == e1
    # an unrecorded replay runs (combine with a helper)
    e3 = await j2.run(mkdir_req(22 | RESEND), lambda: resend.replay_mkdir(fs, mkdir_req(22 | RESEND), fs.mkdir))
    assert e3.nodeid == e1.nodeid
    j2.compact()
    j2.close()
    j3 = resend.ReplayJournal(path, keep=2)
    assert len(j3) == 2 and 20 not in j3 and 22 in j3
    j3.clear()
    assert len(j3) == 0 and resend.ReplayJournal(path).outcome(22) is None
    j3.close()


@pytest.mark.trio
async def test_journal_in_memory_keep_limit() -> None:
    j = resend.ReplayJournal(keep=3)
    for i in range(1, 6):
        j.record(i, True, i * 10)
    assert len(j) == 3 and 2 not in j and j.outcome(5) == (True, 50)


# -- a real takeover -------------------------------------------------------------------------------


class CrashingMkdir(MemFS):
    """mkdir takes effect, then (while ``crash``) the daemon 'dies' before answering."""

    def __init__(self) -> None:
        super().__init__()
        self.crash = True
        self.entered = trio.Event()
        self.replays: list[r.MkdirRequest] = []

    async def mkdir(self, req: r.MkdirRequest) -> afuse.Entry:
        if req.is_resend:
            self.replays.append(req)
        return await resend.replay_mkdir(self, req, self._mkdir_then_crash)

    async def _mkdir_then_crash(self, req: r.MkdirRequest) -> afuse.Entry:
        entry = await super().mkdir(req)
        if self.crash:
            self.entered.set()
            await trio.sleep_forever()
        return entry


@pytest.mark.trio
async def test_takeover_answers_replayed_mkdir(tmp_path: Path) -> None:
    mp = str(tmp_path / "mnt")
    os.mkdir(mp)
    fs = CrashingMkdir()
    result: dict[str, object] = {}

    def client() -> None:
        try:
            os.mkdir(os.path.join(mp, "newdir"))
            result["ok"] = True
        except OSError as e:
            result["err"] = e

    thread = threading.Thread(target=client, daemon=True)
    with trio.fail_after(20):
        async with trio.open_nursery() as outer:
            session = await outer.start(lambda task_status: afuse.serve(
                fs, mp, readers=2, unmount=False, private_clones=False, task_status=task_status))
            kept = [os.dup(fd) for fd in session.reader_fds]
            neg = session.negotiated
            thread.start()
            await fs.entered.wait()
            outer.cancel_scope.cancel()  # the first daemon dies without answering
        assert session.closed and not result
        assert fs.root.children is not None and b"newdir" in fs.root.children  # its effect is visible

        # The replacement serves the same state (a real one would restore it: see memfs --persist).
        fs.crash = False
        takeover = afuse.session.Takeover(kept[0], neg, kept[1:])
        try:
            async with trio.open_nursery() as outer:
                session2 = await outer.start(lambda task_status: afuse.serve(
                    fs, mp, takeover=takeover, task_status=task_status))
                while thread.is_alive():
                    await trio.sleep(0.01)
                assert result == {"ok": True}, result
                assert fs.replays and fs.replays[0].is_resend
                st = await trio.to_thread.run_sync(os.stat, os.path.join(mp, "newdir"))
                assert stat.S_ISDIR(st.st_mode)
                assert not session2.errors
                outer.cancel_scope.cancel()
        finally:
            if os.path.realpath(mp) in [m[0] for m in afuse.device.find_mounts()]:
                afuse.device.unmount(mp, lazy=True)
    assert os.path.realpath(mp) not in [m[0] for m in afuse.device.find_mounts()]
