"""Replayed requests and failover for node filesystems (afuse.nodes.NodeFS): a resent create,
mkdir, link, rename, unlink... whose first attempt took effect is answered as that attempt was,
and the bridge's tables survive the daemon through afuse.state (a daemon on nodes SIGKILLed
during a burst of creates, its application never seeing EEXIST or ENOENT)."""

from __future__ import annotations

import json
import os
import random
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar

import pytest
import trio

import afuse
from afuse import device
from afuse.nodes import MemDir, Node, NodeFS
from afuse.nodes.tables import decode_key, encode_key, fold, new_state
from afuse.testing import wait_for_line
from afuse.wire import requests as r

REPO = Path(__file__).resolve().parent.parent
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root (mount(2), open_by_handle_at)")


# -- the tables as data ---------------------------------------------------------------------------------


def test_keys_round_trip_through_json() -> None:
    for key in (None, 5, "a", b"\x00\xff", (1, 2, "h", b"x"), ((1, 2), frozenset({3}))):
        assert decode_key(json.loads(json.dumps(encode_key(key)))) == key
    with pytest.raises(ValueError, match="node key"):
        encode_key([1, 2])  # type: ignore[arg-type]


def test_fold_records() -> None:
    st = new_state(0)
    for rec in (["N", 5, 7], ["L", 5, 1], ["L", 5, 2], ["L", 5, -1], ["O", 3, 5, os.O_RDWR], ["D", 4, 1],
                ["R", 99, ["e", 0, 5]], ["C", 4], ["N", 6, None], ["L", 6, -4]):
        fold(st, rec)
    assert st["nodes"] == {"5": [7, 2], "6": [None, 0]}
    assert st["handles"] == {"3": [5, os.O_RDWR]} and st["dirs"] == {}
    assert st["next_nodeid"] == 7 and st["next_fh"] == 5 and st["outcomes"] == [[99, ["e", 0, 5]]]
    with pytest.raises(ValueError, match="journal record"):
        fold(st, ["Z"])
    fs = NodeFS(MemDir())
    with pytest.raises(ValueError, match="NodeFS journal record"):
        fs.fold_record(fs.dump_state(), ["Z", 1])


# -- replays on a real mount, in one process ----------------------------------------------------------


class Crashing(NodeFS):
    """Every creating and removing request takes effect and is answered by the bridge (its
    outcome recorded); while ``crash`` is set the daemon then 'dies' before the reply is written."""

    def __init__(self, root: Node) -> None:
        super().__init__(root)
        self.crash = True
        self.entered = trio.Event()
        self.replays: list[str] = []
        for name in ("mkdir", "create", "mknod", "symlink", "link", "unlink", "rmdir", "rename"):
            setattr(self, name, self._wrap(getattr(self, name), name))

    def _wrap(self, inner: Callable[[Any], Any], name: str) -> Callable[[Any], Any]:
        async def op(req: r.Request) -> Any:
            if req.is_resend:
                self.replays.append(name)
            res = await inner(req)
            if self.crash:
                self.entered.set()
                await trio.sleep_forever()
            return res
        return op


def _crash_and_take_over(fs: Crashing, mp: str, action: Callable[[], object], lose: bool) -> object:
    """Serve ``fs``; run ``action`` (syscalls) in a thread; when the daemon 'dies' mid-request,
    serve the live connection again (Takeover) and let the kernel resend. ``lose``: the
    replacement lacks the recorded outcomes (as a daemon without a state store). The action's result."""
    result: dict[str, object] = {}

    def client() -> None:
        try:
            result["ok"] = action()
        except OSError as e:
            result["err"] = e

    async def main() -> None:
        thread = threading.Thread(target=client, daemon=True)
        with trio.fail_after(20):
            async with trio.open_nursery() as outer:
                session = await outer.start(lambda task_status: afuse.serve(
                    fs, mp, readers=2, unmount=False, private_clones=False, task_status=task_status))
                kept = [os.dup(fd) for fd in session.reader_fds]
                neg = session.negotiated
                assert neg is not None
                thread.start()
                await fs.entered.wait()
                outer.cancel_scope.cancel()  # the first daemon dies without answering
            assert not result
            fs.crash = False
            if lose:
                fs._outcomes.clear()
            takeover = afuse.session.Takeover(kept[0], neg, kept[1:])
            async with trio.open_nursery() as outer:
                session2 = await outer.start(lambda task_status: afuse.serve(
                    fs, mp, takeover=takeover, unmount=False, task_status=task_status))
                while thread.is_alive():
                    await trio.sleep(0.01)
                assert not session2.errors, session2.errors
                outer.cancel_scope.cancel()

    trio.run(main)
    if "err" in result:
        raise AssertionError(f"the application saw {result['err']!r}")
    return result["ok"]


def _mounted_path(mp: str) -> bool:
    return os.path.realpath(mp) in [m for m, _t, _s in device.find_mounts()]


@pytest.mark.parametrize("lose", [False, True], ids=["recorded", "lost"])
@pytest.mark.parametrize("op", ["mkdir", "create", "symlink", "link", "mknod", "rename", "unlink", "rmdir"])
def test_replay_answered_as_first_attempt(tmp_path: Path, op: str, lose: bool) -> None:
    """The first attempt takes effect and its reply is lost; the replay gets the same answer:
    from the recorded outcome (exact lookup count), or found by name (one lookup more, safe)."""
    mp = str(tmp_path / "mnt")
    os.mkdir(mp)
    fs = Crashing(MemDir({"f": b"data", "d": {"x": b"1"}}))
    assert fs.root.children is not None
    kids = fs.root.children
    j = os.path.join
    seen: dict[str, int] = {}

    def action() -> object:
        if op in ("link", "rename", "unlink"):
            os.stat(j(mp, "f"))
        if op == "rmdir":
            os.stat(j(mp, "d"))
            fs.crash = False
            os.unlink(j(mp, "d", "x"))
            fs.crash = True
        if op == "mkdir":
            os.mkdir(j(mp, "new"))
        elif op == "create":
            fd = os.open(j(mp, "new"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)
            os.write(fd, b"after the crash")
            os.close(fd)
        elif op == "symlink":
            os.symlink("f", j(mp, "new"))
        elif op == "link":
            os.link(j(mp, "f"), j(mp, "new"))
        elif op == "mknod":
            os.mkfifo(j(mp, "new"))
        elif op == "rename":
            os.rename(j(mp, "f"), j(mp, "new"))
        elif op == "unlink":
            os.unlink(j(mp, "f"))
        elif op == "rmdir":
            os.rmdir(j(mp, "d"))
        if b"new" in kids:
            seen["lookups"] = kids[b"new"].lookups
        return sorted(os.listdir(mp)), os.lstat(j(mp, "new")).st_mode if b"new" in kids else 0

    try:
        got = _crash_and_take_over(fs, mp, action, lose)
        assert isinstance(got, tuple)
        listing, mode = got
        assert fs.replays, "the kernel resent nothing"
        assert listing == {"rename": ["d", "new"], "unlink": ["d"], "rmdir": ["f"]}.get(op, ["d", "f", "new"])
        if op in ("mkdir", "create", "symlink", "link", "mknod"):
            fmt = {"mkdir": stat.S_IFDIR, "symlink": stat.S_IFLNK, "mknod": stat.S_IFIFO}.get(op, stat.S_IFREG)
            assert stat.S_IFMT(mode) == fmt
            # The kernel holds one lookup from the entry (two for the link: "f" was looked up).
            held = 2 if op == "link" else 1
            assert seen["lookups"] == held + (1 if lose else 0)
        if op == "create":
            assert bytes(kids[b"new"].data) == b"after the crash"  # type: ignore[attr-defined]
    finally:
        if _mounted_path(mp):
            device.unmount(mp, lazy=True)


# -- replays that must not be mistaken for a completed first attempt -------------------------------


def _hdr(unique: int, nodeid: int = 1, uid: int = 0) -> tuple[int, int, int, int, int]:
    return (unique | afuse.wire.constants.UNIQUE_RESEND, nodeid, uid, 0, 1)


def test_replay_refuses_what_another_made() -> None:
    """A resent request whose name exists but is not what its first attempt would have made
    (another type, owner or link target; or an outcome recorded as an error) fails as it did."""
    fs = NodeFS(MemDir({"file": b"x", "dir": {}}))

    async def main() -> None:
        for req in (r.MkdirRequest(*_hdr(10), mode=0o755, umask=0, name=b"file"),
                    r.SymlinkRequest(*_hdr(11), name=b"file", target=b"elsewhere"),
                    r.MknodRequest(*_hdr(12), mode=stat.S_IFIFO | 0o644, rdev=0, umask=0, name=b"dir"),
                    r.CreateRequest(*_hdr(13, uid=1234), flags=os.O_CREAT | os.O_EXCL, mode=0o644, umask=0,
                                    open_flags=0, name=b"file")):
            with pytest.raises(afuse.FUSEError) as info:
                await getattr(fs, req.opcode.name.lower())(req)
            assert info.value.errno == 17, req
        # A first attempt that failed EEXIST is answered EEXIST again, even though a replay
        # of a successful one would now be recognised.
        first = r.MkdirRequest(20, 1, 0, 0, 1, mode=0o755, umask=0, name=b"dir")
        with pytest.raises(afuse.FUSEError):
            await fs.mkdir(first)
        with pytest.raises(afuse.FUSEError) as info:
            await fs.mkdir(r.MkdirRequest(*_hdr(20), mode=0o755, umask=0, name=b"dir"))
        assert info.value.errno == 17
        # Not a resend: never second-guessed.
        with pytest.raises(afuse.FUSEError):
            await fs.mkdir(r.MkdirRequest(21, 1, 0, 0, 1, mode=0o755, umask=0, name=b"dir"))

    trio.run(main)
    assert fs.root.children is not None and fs.root.children[b"dir"].lookups == 0


# -- a daemon on nodes, SIGKILLed during a burst of creates ------------------------------------------

APP = r"""
import json, os, random, sys, time
root, duration, seed, out = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rng = random.Random(seed)
d = os.path.join(root, f"app{seed}")
os.mkdir(d)
held = os.open(os.path.join(d, "held"), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
held_data = bytearray(rng.randbytes(16384))
os.pwrite(held, held_data, 0)
model = {}  # name -> bytes (file), None (directory), str (symlink target)
errors, mismatches, counts = [], [], {}
n = 0
end = time.monotonic() + duration
ops = ["create"] * 6 + ["mkdir", "symlink", "link", "rename", "unlink", "rmdir", "held", "list"]
while time.monotonic() < end:
    op = rng.choice(ops)
    files = sorted(k for k, v in model.items() if isinstance(v, bytes))
    dirs = sorted(k for k, v in model.items() if v is None)
    if op in ("link", "unlink") and not files or op == "rmdir" and not dirs or op == "rename" and not model:
        op = "create"
    n += 1
    p = lambda name: os.path.join(d, name)
    try:
        if op == "create":
            data = rng.randbytes(rng.choice((0, 10, 3000)))
            fd = os.open(p(f"f{n}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            model[f"f{n}"] = data
        elif op == "mkdir":
            os.mkdir(p(f"d{n}"))
            model[f"d{n}"] = None
        elif op == "symlink":
            os.symlink(f"target{n}", p(f"s{n}"))
            model[f"s{n}"] = f"target{n}"
        elif op == "link":
            src = rng.choice(files)
            os.link(p(src), p(f"l{n}"))
            model[f"l{n}"] = model[src]
        elif op == "rename":
            src = rng.choice(sorted(model))
            os.rename(p(src), p(f"r{n}"))
            model[f"r{n}"] = model.pop(src)
        elif op == "unlink":
            src = rng.choice(files)
            os.unlink(p(src))
            del model[src]
        elif op == "rmdir":
            src = rng.choice(dirs)
            os.rmdir(p(src))
            del model[src]
        elif op == "held":
            off = rng.randrange(0, len(held_data) - 100)
            chunk = rng.randbytes(100)
            os.pwrite(held, chunk, off)
            held_data[off:off + 100] = chunk
            if os.pread(held, len(held_data), 0) != held_data:
                mismatches.append("held file differs")
        elif op == "list":
            if set(os.listdir(d)) != set(model) | {"held"}:
                mismatches.append(f"listing differs: {sorted(set(os.listdir(d)) ^ (set(model) | {'held'}))}")
    except OSError as e:
        errors.append(f"{op} #{n}: {e!r}")
    counts[op] = counts.get(op, 0) + 1
try:
    for name, v in model.items():
        if v is None:
            if not os.path.isdir(p(name)):
                mismatches.append(f"final: {name} is not a directory")
        elif isinstance(v, str):
            if os.readlink(p(name)) != v:
                mismatches.append(f"final: {name} points elsewhere")
        else:
            with open(p(name), "rb") as f:
                if f.read() != v:
                    mismatches.append(f"final: {name} differs")
    if set(os.listdir(d)) != set(model) | {"held"}:
        mismatches.append("final listing differs")
    if os.pread(held, len(held_data), 0) != held_data:
        mismatches.append("final held differs")
    os.close(held)
except OSError as e:
    errors.append(f"final: {e!r}")
with open(out, "w") as f:
    json.dump({"counts": counts, "errors": errors, "mismatches": mismatches}, f)
"""


@needs_root
@pytest.mark.timeout(150)
def test_daemon_on_nodes_survives_sigkill_during_creates(tmp_path: Path) -> None:
    """Two applications create, link, rename and remove names (and write a file held open) as
    fast as they can while the daemon — a NodeFS whose nodes are keyed by file handle, its tables
    journaled through afuse.state — is SIGKILLed four times, each time replaced by a new one
    that takes the live mount over from the keeper. Requests in flight are resent; the
    applications see no error at all (no EEXIST, no ENOENT) and every name and byte is right."""
    src, mnt, state = tmp_path / "src", tmp_path / "mnt", tmp_path / "state"
    src.mkdir()
    mnt.mkdir()
    sock, events = str(tmp_path / "keeper.sock"), str(tmp_path / "events.jsonl")
    log = open(tmp_path / "daemons.log", "ab")
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(*args: str, **kw: Any) -> subprocess.Popen[bytes]:
        p = subprocess.Popen([sys.executable, *args], start_new_session=True, cwd=REPO, stderr=log, **kw)
        procs.append(p)
        return p

    def daemon() -> subprocess.Popen[bytes]:
        p = spawn(str(REPO / "tests" / "nodes_failover_daemon.py"), str(src), str(mnt), sock, str(state), events,
                  "0.3", stdout=subprocess.PIPE)
        assert wait_for_line(p, b"ready", 30), (tmp_path / "daemons.log").read_text()
        return p

    try:
        spawn("-m", "afuse.keeper", "--socket", sock)
        deadline = time.monotonic() + 20
        while not os.path.exists(sock) and time.monotonic() < deadline:
            time.sleep(0.05)
        current = daemon()
        duration = 7.0
        outs = [str(tmp_path / f"app{i}.json") for i in (1, 2)]
        apps = [spawn("-c", APP, str(mnt), str(duration), str(i), out) for i, out in zip((1, 2), outs, strict=True)]
        t0 = time.monotonic()
        rng = random.Random(4)
        for at in [1.0 + 1.3 * i + rng.uniform(0, 0.5) for i in range(4)]:  # after the last: 1 s or more
            time.sleep(max(0.0, t0 + at - time.monotonic()))
            current.kill()
            current.wait(10)
            current = daemon()
        for app in apps:
            assert app.wait(duration + 60) == 0, (tmp_path / "daemons.log").read_text()
        results = [json.loads(Path(out).read_text()) for out in outs]
        for res in results:
            assert not res["errors"], res["errors"]
            assert not res["mismatches"], res["mismatches"]
            assert res["counts"].get("create", 0) > 20, res["counts"]
        with open(events) as f:
            resent = [json.loads(line) for line in f if line.strip()]
        assert resent, "no request was in flight at any kill"
        done = subprocess.run([sys.executable, "-m", "afuse.failover", "unmount", "--socket", sock, str(mnt)],
                              capture_output=True, text=True, timeout=30, cwd=REPO)
        assert done.returncode == 0, done.stderr
        # What the applications made is on the source, one name per file.
        assert sorted(os.listdir(src)) == ["app1", "app2"]
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.kill()
            p.wait(10)
            if p.stdout is not None:
                p.stdout.close()
        log.close()
        if _mounted_path(str(mnt)):
            device.unmount(str(mnt), lazy=True)



def test_tables_restored_from_the_state_store(tmp_path: Path) -> None:
    """Snapshot + journal through FileStateStore, restored into a new bridge over a tree built
    alike: the same nodeids (keyless nodes of the initial tree by number, keyed nodes by key),
    lookup counts, open files (reopened at first use), open directories and outcomes."""
    from afuse.nodes import Dir, FileHandle, StaticFile
    from afuse.state import FileStateStore

    class Handle(FileHandle):
        def __init__(self, data: bytes) -> None:
            self.data = data

        async def read(self, offset: int, size: int) -> bytes:
            return self.data[offset:offset + size]

    class Keyed(StaticFile):
        opened: ClassVar[list[int]] = []

        def __init__(self, data: bytes, key: object) -> None:
            super().__init__(data)
            self.key = key

        async def open(self, flags: int) -> FileHandle:
            self.opened.append(flags)
            return Handle(self.data)

    def tree() -> Dir:
        return Dir({"a": b"A", "sub": {"b": b"B"}, "k": Keyed(b"K", ("k", 1))})

    fs1 = NodeFS(tree(), types=[Handle])
    store = FileStateStore(tmp_path / "state", compact_every=4)
    ids: dict[str, int] = {}

    def lookup(unique: int, parent: int, name: bytes) -> r.LookupRequest:
        return r.LookupRequest(unique, parent, 0, 0, 1, name)

    async def work() -> None:
        ids["sub"] = (await fs1.lookup(lookup(1, 1, b"sub"))).nodeid
        store.attach(fs1)  # a snapshot now, the journal from here on (compacting every 4 records)
        ids["b"] = (await fs1.lookup(lookup(2, ids["sub"], b"b"))).nodeid
        ids["k"] = (await fs1.lookup(lookup(3, 1, b"k"))).nodeid
        await fs1.lookup(lookup(4, 1, b"k"))
        opened = await fs1.open(r.OpenRequest(5, ids["k"], 0, 0, 1, flags=os.O_RDONLY | os.O_TRUNC, open_flags=0))
        ids["fh"] = opened.fh
        ids["dir"] = (await fs1.opendir(r.OpendirRequest(6, ids["sub"], 0, 0, 1, flags=0, open_flags=0))).fh
        await fs1.forget(r.ForgetRequest(0, 0, 0, 0, 0, [r.ForgetItem(ids["b"], 1)]))
        with pytest.raises(afuse.FUSEError):  # EEXIST, recorded
            await fs1.mkdir(r.MkdirRequest(8, 1, 0, 0, 1, mode=0o755, umask=0, name=b"sub"))

    trio.run(work)
    store.close()
    fs2 = NodeFS(tree(), types=[Handle])
    assert FileStateStore(tmp_path / "state").load_into(fs2)
    assert json.dumps(fs2.dump_state()) == json.dumps(fs1.dump_state())
    assert fs2.node(ids["k"]).lookups == 2 and fs2.node(ids["sub"]).lookups == 1
    assert fs2.node(ids["b"]) is fs2.root.children[b"sub"].children[b"b"]  # type: ignore[index]
    assert fs2.node(ids["b"]).lookups == 0

    async def after() -> None:
        read = r.ReadRequest(9, ids["k"], 0, 0, 1, fh=ids["fh"], offset=0, size=10,
                             read_flags=0, lock_owner=0, flags=0)
        assert await fs2.read(read) == b"K"  # reopened now, without O_TRUNC
        assert Keyed.opened[-1] == os.O_RDONLY
        listing = await fs2.readdir(r.ReaddirRequest(10, ids["sub"], 0, 0, 1, fh=ids["dir"], offset=0, size=4096))
        assert isinstance(listing, Iterable)
        assert [e.name if isinstance(e, afuse.DirEntry) else e[0] for e in listing] == [b".", b"..", b"b"]
        with pytest.raises(afuse.FUSEError) as info:  # the replay of the failed mkdir fails alike
            await fs2.mkdir(r.MkdirRequest(8 | afuse.wire.constants.UNIQUE_RESEND, 1, 0, 0, 1, mode=0o755,
                                           umask=0, name=b"sub"))
        assert info.value.errno == 17
        # A new node gets a number the kernel never saw.
        assert (await fs2.lookup(lookup(11, 1, b"a"))).nodeid not in (ids["sub"], ids["b"], ids["k"])

    trio.run(after)


def test_outcomes_belong_to_one_connection() -> None:
    """Request ids restart with each connection: an outcome kept for replays answers only a
    replay of the same request (opcode, nodeids, names, flags), never another one that happens
    to have its id on a later connection."""
    from afuse import testing

    fs = NodeFS(MemDir())
    with testing.mounted(fs) as m:
        os.mkdir(m.join("d"))
        assert fs.root.children is not None
        [rid] = fs._outcomes
        out = fs._kept_outcome(rid)
        assert out is not None and out[0] == "e" and out[2] == fs.root.children[b"d"].nodeid

    async def main() -> None:
        fs._outcomes[77] = list(out)  # as if request 77 had been that mkdir, on a later connection
        rmdir = r.RmdirRequest(77 | afuse.wire.constants.UNIQUE_RESEND, 1, 0, 0, 1, name=b"d")
        await fs.rmdir(rmdir)  # runs: the outcome of a mkdir is no answer to an rmdir
        assert fs.root.children == {}
        assert (fs._kept_outcome(77) or [])[0:1] == ["ok"]
        mkdir = r.MkdirRequest(rid | afuse.wire.constants.UNIQUE_RESEND, 1, 0, 0, 1, mode=0o755, umask=0, name=b"e")
        entry = await fs.mkdir(mkdir)  # another name: made, not answered with "d"'s entry
        assert fs.root.children is not None and entry.nodeid == fs.root.children[b"e"].nodeid

    trio.run(main)
