"""MemFS with persist=DIR: a snapshot and journal restore contents, nodeids, lookup counts and open handles.

The real-mount test "crashes" the first daemon (its MemFS object is dropped without unmounting,
with the /dev/fuse descriptors kept, as tests/test_takeover.py does), restores a new MemFS from
the journal and serves the kept descriptors with it: the kernel's nodeids and open files stay
valid.
"""

from __future__ import annotations

import errno
import functools
import gc
import os
import stat
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import trio

import afuse
from afuse.examples.memfs import File, MemFS, MNode
from afuse.pytest_plugin import fuse_unavailable_reason
from afuse.wire import requests as r

RESEND = 1 << 63
UID, GID = os.getuid(), os.getgid()


def hdr(unique: int, nodeid: int = 1) -> tuple[int, int, int, int, int]:
    return (unique, nodeid, UID, GID, 42)


def content(fs: MemFS, nodeid: int) -> bytes:
    n = fs.node(nodeid)
    assert isinstance(n, File)
    return n.data.read(0, n.size)


def open_files(fs: MemFS) -> dict[str, int]:
    """fh -> nodeid of the open files and directories (the bridge's tables)."""
    return {fh: nodeid for fh, (nodeid, _flags) in fs.dump_state()["bridge"]["handles"].items()} | \
        {fh: nodeid for fh, nodeid in fs.dump_state()["bridge"]["dirs"].items()}


async def readdirplus_all(fs: MemFS, req: r.ReaddirplusRequest) -> list[afuse.DirEntry]:
    entries = await fs.readdirplus(req)
    assert hasattr(entries, "__aiter__")
    return [de async for de in entries if isinstance(de, afuse.DirEntry)]


# -- without the kernel -----------------------------------------------------------------------------


async def _getattr_all(fs: MemFS) -> None:
    for n in fs.nodes.values():
        assert isinstance(n, MNode)
        await n.getattr()


def test_restore_reproduces_state(tmp_path: Path) -> None:
    d = tmp_path / "state"

    async def work(fs: MemFS) -> dict[str, int]:
        e, h = await fs.create(r.CreateRequest(*hdr(2), name=b"f", flags=os.O_RDWR, mode=0o640, umask=0o022))
        await fs.write(r.WriteRequest(*hdr(3, e.nodeid), fh=h.fh, offset=0, data=b"hello world", write_flags=0,
                                      lock_owner=0, flags=os.O_RDWR))
        await fs.write(r.WriteRequest(*hdr(4, e.nodeid), fh=h.fh, offset=200_000, data=b"far", write_flags=0,
                                      lock_owner=0, flags=os.O_RDWR))
        sub = await fs.mkdir(r.MkdirRequest(*hdr(5), name=b"sub", mode=0o755, umask=0))
        await fs.symlink(r.SymlinkRequest(*hdr(6, sub.nodeid), name=b"ln", target=b"../f"))
        await fs.link(r.LinkRequest(*hdr(7, sub.nodeid), oldnodeid=e.nodeid, newname=b"hard"))
        await fs.setxattr(r.SetxattrRequest(*hdr(8, e.nodeid), name=b"user.k", value=b"v", flags=0,
                                            setxattr_flags=0))
        g, gh = await fs.create(r.CreateRequest(*hdr(9), name=b"gone", flags=os.O_RDWR, mode=0o600, umask=0))
        await fs.release(r.ReleaseRequest(*hdr(10, g.nodeid), fh=gh.fh, flags=0, release_flags=0, lock_owner=0))
        await fs.unlink(r.UnlinkRequest(*hdr(11), name=b"gone"))
        await fs.forget(r.ForgetRequest(*hdr(0, g.nodeid), [r.ForgetItem(g.nodeid, 1)]))
        await fs.rename(r.RenameRequest(*hdr(12), name=b"sub", newdir=1, newname=b"dir", flags=0))
        await fs.lookup(r.LookupRequest(*hdr(13), name=b"f"))
        await fs.lookup(r.LookupRequest(*hdr(14), name=b"nothing"))  # negative: not journaled
        od = await fs.opendir(r.OpendirRequest(*hdr(15, sub.nodeid), flags=0, open_flags=0))
        await readdirplus_all(fs, r.ReaddirplusRequest(*hdr(16, sub.nodeid), fh=od.fh, offset=0, size=4096))
        return {"file": e.nodeid, "fh": h.fh, "sub": sub.nodeid, "dirfh": od.fh}

    fs = MemFS(persist=d)
    ids = trio.run(work, fs)
    fs.close_journal()
    assert (d / "state.json").exists() and list(d.glob("journal-*.jsonl"))

    fs2 = MemFS.load(d)
    assert fs2.inode_count == fs.inode_count
    assert fs2.content is not None and fs2.content.opened == 0  # restoring opens no content
    trio.run(_getattr_all, fs2)  # the first getattr reads the time of the last write (not journaled)
    trio.run(_getattr_all, fs)
    for nodeid, n in fs.nodes.items():
        n2 = fs2.node(nodeid)
        assert type(n2) is type(n)
        for attr in ("perm", "nlink", "uid", "gid", "size", "lookups", "opens", "mtime", "ctime", "btime",
                     "xattrs", "key"):
            assert getattr(n2, attr) == getattr(n, attr), (nodeid, attr)
    assert content(fs2, ids["file"]) == content(fs, ids["file"])
    assert content(fs2, ids["file"]).startswith(b"hello world")
    assert sorted(open_files(fs2)) == sorted(open_files(fs)) == sorted(map(str, [ids["fh"], ids["dirfh"]]))
    assert fs2.dump_state()["bridge"] == fs.dump_state()["bridge"] and fs2._serial == fs._serial
    assert fs2.root.children is not None and set(fs2.root.children) == {b"f", b"dir"}
    assert fs2.node(ids["sub"]).lookups == fs.node(ids["sub"]).lookups
    # readdirplus counted the entries the caller took (ln and hard)
    sub = fs2.node(ids["sub"])
    assert sub.children and all(n.lookups >= 2 for n in sub.children.values())

    # it keeps journaling: a third generation sees what the second did
    async def more(fs: MemFS) -> None:
        await fs.write(r.WriteRequest(*hdr(20, ids["file"]), fh=ids["fh"], offset=0, data=b"HELLO", write_flags=0,
                                      lock_owner=0, flags=os.O_RDWR))

    trio.run(more, fs2)
    fs2.close_journal()
    fs3 = MemFS.load(d)
    assert content(fs3, ids["file"]).startswith(b"HELLO world")
    fs3.close_journal()


def test_resent_request_gets_first_result(tmp_path: Path) -> None:
    d = tmp_path / "state"

    async def first(fs: MemFS) -> afuse.Entry:
        return await fs.mkdir(r.MkdirRequest(*hdr(77), name=b"d", mode=0o755, umask=0))

    fs = MemFS(persist=d)
    e = trio.run(first, fs)
    fs.close_journal()
    # the daemon died before answering; the successor gets the request again, marked resent
    fs2 = MemFS.load(d)

    async def replay(fs: MemFS) -> afuse.Entry:
        return await fs.mkdir(r.MkdirRequest(*hdr(77 | RESEND), name=b"d", mode=0o755, umask=0))

    e2 = trio.run(replay, fs2)
    assert e2.nodeid == e.nodeid
    assert fs2.node(e.nodeid).lookups == 1  # counted once, as the kernel will

    async def other(fs: MemFS) -> None:  # another caller's: not what its first attempt would have made
        await fs.mkdir(r.MkdirRequest(78 | RESEND, 1, UID + 1, GID, 42, name=b"d", mode=0o755, umask=0))

    with pytest.raises(afuse.FUSEError) as ei:  # not journaled: it runs (and fails) anew
        trio.run(other, fs2)
    assert ei.value.errno == errno.EEXIST
    fs2.close_journal()


def test_incomplete_last_record_is_ignored(tmp_path: Path) -> None:
    d = tmp_path / "state"

    async def work(fs: MemFS) -> None:
        await fs.mkdir(r.MkdirRequest(*hdr(1), name=b"a", mode=0o755, umask=0))
        await fs.mkdir(r.MkdirRequest(*hdr(2), name=b"b", mode=0o755, umask=0))

    fs = MemFS(persist=d)
    trio.run(work, fs)
    fs.close_journal()
    [journal] = d.glob("journal-*.jsonl")
    os.truncate(journal, os.path.getsize(journal) - 3)
    fs2 = MemFS.load(d)
    assert fs2.root.children is not None and set(fs2.root.children) == {b"a"}
    fs2.close_journal()
    with pytest.raises(FileNotFoundError):
        MemFS.load(tmp_path / "empty")


async def _populate(fs: MemFS) -> dict[str, int]:
    e, h = await fs.create(r.CreateRequest(*hdr(2), name=b"f", flags=os.O_RDWR, mode=0o640, umask=0o022))
    await fs.write(r.WriteRequest(*hdr(3, e.nodeid), fh=h.fh, offset=70_000, data=b"data", write_flags=0,
                                  lock_owner=0, flags=os.O_RDWR))
    sub = await fs.mkdir(r.MkdirRequest(*hdr(5), name=b"sub", mode=0o755, umask=0))
    await fs.symlink(r.SymlinkRequest(*hdr(6, sub.nodeid), name=b"ln", target=b"../f"))
    await fs.mknod(r.MknodRequest(*hdr(7, sub.nodeid), name=b"fifo", mode=stat.S_IFIFO | 0o600, rdev=0, umask=0))
    await fs.setxattr(r.SetxattrRequest(*hdr(8, e.nodeid), name=b"user.k", value=b"\0\xff", flags=0,
                                        setxattr_flags=0))
    await fs.forget(r.ForgetRequest(*hdr(0, sub.nodeid), [r.ForgetItem(sub.nodeid, 1)]))
    return {"file": e.nodeid, "fh": h.fh, "sub": sub.nodeid}


def _same(a: MemFS, b: MemFS) -> None:
    assert sorted(a.nodes) == sorted(b.nodes)
    for nodeid, n in a.nodes.items():
        m = b.node(nodeid)
        assert type(m) is type(n)
        for attr in ("perm", "nlink", "uid", "gid", "rdev", "size", "lookups", "opens", "atime", "mtime", "ctime",
                     "btime", "xattrs", "xattr_used", "key"):
            assert getattr(m, attr) == getattr(n, attr), (nodeid, attr)
        if isinstance(n, File):
            assert content(a, nodeid) == content(b, nodeid)
        if n.children is not None:
            assert m.children is not None
            assert {k: c.nodeid for k, c in n.children.items()} == {k: c.nodeid for k, c in m.children.items()}
    assert open_files(a) == open_files(b)
    assert a.dump_state()["bridge"] == b.dump_state()["bridge"]
    assert (a._serial, a.pool.used) == (b._serial, b.pool.used)


def test_dump_and_restore_state() -> None:
    import json

    fs = MemFS()
    trio.run(_populate, fs)
    state = json.loads(json.dumps(fs.dump_state()))
    fs2 = MemFS()
    fs2.restore_state(state)
    _same(fs, fs2)


def test_state_store_protocol(tmp_path: Path) -> None:
    from afuse.state import FileStateStore, Persistent

    fs = MemFS()
    assert isinstance(fs, Persistent)
    store = FileStateStore(tmp_path / "st")
    store.attach(fs)  # snapshot of the empty filesystem, then journal records (JSON lines)
    ids = trio.run(_populate, fs)
    store.close()
    fs2 = MemFS()
    assert FileStateStore(tmp_path / "st").load_into(fs2)
    _same(fs, fs2)
    assert fs2._handles[ids["fh"]][0] is fs2.node(ids["file"])
    # compaction folds the journal into a snapshot
    store2 = FileStateStore(tmp_path / "st")
    store2.attach(fs2)
    store2.close()
    fs3 = MemFS()
    assert FileStateStore(tmp_path / "st").load_into(fs3)
    _same(fs, fs3)


def test_no_persist_no_wrappers() -> None:
    fs = MemFS()
    assert "write" not in vars(fs) and "lookup" not in vars(fs)
    assert fs.persist is None


# -- a real crash and takeover ----------------------------------------------------------------------

needs_fuse = pytest.mark.skipif(fuse_unavailable_reason() is not None, reason=str(fuse_unavailable_reason()))


async def _close(fd: int) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(5):
        await trio.to_thread.run_sync(os.close, fd, abandon_on_cancel=True)


@needs_fuse
@pytest.mark.trio
async def test_crash_restore_and_takeover(tmp_path: Path) -> None:
    mp = str(tmp_path / "mnt")
    os.mkdir(mp)
    state = tmp_path / "state"
    p = os.path.join

    def before() -> tuple[int, dict[str, int]]:
        with open(p(mp, "a.txt"), "wb") as f:
            f.write(b"alpha " * 1000)
        os.mkdir(p(mp, "dir"))
        with open(p(mp, "dir", "b.bin"), "wb") as f:
            f.write(os.urandom(300_000))
        os.symlink("a.txt", p(mp, "link"))
        os.rename(p(mp, "dir", "b.bin"), p(mp, "dir", "c.bin"))
        assert sorted(os.listdir(mp)) == ["a.txt", "dir", "link"]  # READDIRPLUS counts lookups
        assert os.listdir(p(mp, "dir")) == ["c.bin"]
        fd = os.open(p(mp, "a.txt"), os.O_RDWR)  # stays open across the crash
        os.pwrite(fd, b"ALPHA", 0)
        inos = {name: os.lstat(p(mp, name)).st_ino for name in ("a.txt", "dir", "dir/c.bin", "link")}
        return fd, inos

    first = MemFS(persist=state)
    with trio.fail_after(30):
        async with trio.open_nursery() as outer:
            session = await outer.start(functools.partial(
                afuse.serve, first, mp, readers=2, unmount=False, private_clones=False))
            kept = [os.dup(fd) for fd in session.reader_fds]
            neg = session.negotiated
            fd, inos = await trio.to_thread.run_sync(before)
            expected_c = content(first, inos["dir/c.bin"])
            outer.cancel_scope.cancel()  # the daemon "crashes": no unmount, no goodbye
        assert session.closed
        # Drop the first MemFS entirely: only the journal is left.
        ref = weakref.ref(first)
        del first, session, outer
        gc.collect()
        assert ref() is None

        second = MemFS.load(state)
        assert second.node(inos["a.txt"]).opens == 1  # type: ignore[attr-defined]  # the open fd's handle came back
        takeover = afuse.session.Takeover(kept[0], neg, kept[1:])
        try:
            async with trio.open_nursery() as outer:
                session2 = await outer.start(lambda task_status: afuse.serve(
                    second, mp, takeover=takeover, task_status=task_status))

                def after() -> None:
                    # the fd opened before the crash reads and writes through the new daemon
                    assert os.pread(fd, 11, 0) == b"ALPHA alpha"
                    os.pwrite(fd, b"omega", 6)
                    os.fsync(fd)
                    assert sorted(os.listdir(mp)) == ["a.txt", "dir", "link"]
                    assert os.listdir(p(mp, "dir")) == ["c.bin"]
                    assert os.readlink(p(mp, "link")) == "a.txt"
                    for name, ino in inos.items():
                        assert os.lstat(p(mp, name)).st_ino == ino, name
                    # uncached data comes from the restored filesystem
                    with open(p(mp, "dir", "c.bin"), "rb") as f:
                        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                        assert f.read() == expected_c
                    os.mkdir(p(mp, "new"))
                    assert stat.S_ISDIR(os.stat(p(mp, "new")).st_mode)

                await trio.to_thread.run_sync(after)
                a = second.node(inos["a.txt"])
                assert isinstance(a, File)
                assert a.data.read(0, 17) == b"ALPHA omega alpha"
                await _close(fd)
                assert a.opens == 0  # RELEASE of the pre-crash handle reached the new daemon
                assert not session2.errors
                outer.cancel_scope.cancel()
        finally:
            if os.path.realpath(mp) in [m[0] for m in afuse.device.find_mounts()]:
                afuse.device.unmount(mp, lazy=True)
    # the second daemon journaled too: a third restore sees its changes
    third = MemFS.load(state)
    assert third.root.children is not None and b"new" in third.root.children
    assert content(third, inos["a.txt"])[6:11] == b"omega"
    third.close_journal()


def test_cli_persist(tmp_path: Path) -> None:
    reason = fuse_unavailable_reason()
    if reason:
        pytest.skip(reason)
    mp = tmp_path / "mnt"
    mp.mkdir()
    state = tmp_path / "state"
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for round_ in range(2):
        proc = subprocess.Popen([sys.executable, "-m", "afuse.examples.memfs", str(mp), "--persist", str(state)],
                                env=env, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 20
            while os.path.realpath(mp) not in [m[0] for m in afuse.device.find_mounts()]:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
            if round_ == 0:
                (mp / "kept").write_bytes(b"survives a restart")
            else:
                assert (mp / "kept").read_bytes() == b"survives a restart"
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(20)
            if os.path.realpath(mp) in [m[0] for m in afuse.device.find_mounts()]:
                afuse.device.unmount(str(mp), lazy=True)
        assert proc.returncode == 0, (proc.returncode, proc.stderr.read() if proc.stderr else b"")
