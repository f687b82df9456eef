"""The node layer (afuse.nodes) on real mounts: static and read-write trees, dynamic lookups,
the bridge's bookkeeping (lookup counts, forget, handles, directory offsets, passthrough,
credentials) and notifications from nodes."""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pytest
import trio

import afuse
from afuse import testing
from afuse.dispatch import HandlerResultError
from afuse.nodes import (
    Dir,
    DirItem,
    FDHandle,
    FileHandle,
    MemDir,
    MemFile,
    Node,
    NodeFS,
    StaticFile,
    Symlink,
    current_caller,
)
from afuse.operations import overridden
from afuse.testing import MountedFS
from afuse.wire import notify as wire_notify

Mount = Callable[..., MountedFS]


def wait_for(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def errno_of(fn: Callable[[], object]) -> int:
    try:
        fn()
    except OSError as e:
        return e.errno or 0
    return 0


def prune(m: MountedFS, nodeids: list[int]) -> None:
    """Ask the kernel to forget these nodeids (FUSE_NOTIFY_PRUNE), from the test's thread."""
    for i in range(0, len(nodeids), 256):
        m.session.write_notification(wire_notify.prune(nodeids[i:i + 256]))


# -- a static tree from plain values ---------------------------------------------------------------


def test_static_tree_from_dict(fuse_mount: Mount) -> None:
    fs = NodeFS(Dir({"hello.txt": b"Hello\n", "sub": {"a": "text", "link": Symlink("../hello.txt"),
                                                       "deeper": {}}}))
    m = fuse_mount(fs)
    assert sorted(os.listdir(m.path)) == ["hello.txt", "sub"]
    assert sorted(os.listdir(m.join("sub"))) == ["a", "deeper", "link"]
    with open(m.join("hello.txt"), "rb") as f:
        assert f.read() == b"Hello\n"
    with open(m.join("sub", "link"), "rb") as f:  # through the symlink
        assert f.read() == b"Hello\n"
    assert os.readlink(m.join("sub", "link")) == "../hello.txt"
    st = os.stat(m.join("hello.txt"))
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o444 and st.st_size == 6
    assert os.stat(m.join("sub")).st_nlink == 3  # ".", "..", and "deeper"'s ".."
    assert stat.S_ISLNK(os.lstat(m.join("sub", "link")).st_mode)
    # inode numbers are the nodeids, distinct and stable
    inos = {os.stat(m.join(p)).st_ino for p in ("", "hello.txt", "sub", "sub/a", "sub/deeper")}
    assert len(inos) == 5 and os.stat(m.path).st_ino == 1
    # what a read-only local filesystem answers
    assert errno_of(lambda: open(m.join("hello.txt"), "wb")) == errno.EACCES
    assert errno_of(lambda: os.unlink(m.join("hello.txt"))) == errno.EPERM
    assert errno_of(lambda: os.mkdir(m.join("new"))) == errno.EPERM
    assert errno_of(lambda: os.rename(m.join("hello.txt"), m.join("x"))) == errno.EPERM
    assert errno_of(lambda: os.chmod(m.join("hello.txt"), 0o600)) == errno.EPERM
    assert errno_of(lambda: os.readlink(m.join("hello.txt"))) == errno.EINVAL
    assert errno_of(lambda: os.listdir(m.join("hello.txt"))) == errno.ENOTDIR
    assert errno_of(lambda: os.stat(m.join("nope"))) == errno.ENOENT
    assert errno_of(lambda: os.stat(m.join("hello.txt", "x"))) == errno.ENOTDIR
    # no node implements xattrs: ENOSYS told the kernel once, callers get EOPNOTSUPP
    assert not overridden(fs, "getxattr") and not overridden(fs, "create")
    assert errno_of(lambda: os.getxattr(m.join("hello.txt"), "user.x")) == errno.EOPNOTSUPP
    assert errno_of(lambda: open(m.join("sub", "made"), "w")) == errno.EPERM


def test_hello_example_is_a_handful_of_lines() -> None:
    from afuse.examples import hello

    with open(hello.__file__) as f:
        assert len(f.readlines()) <= 40


# -- a read-write tree compared with a native directory --------------------------------------------


def _workload(root: str) -> list[tuple[str, object]]:
    """Everyday operations; each result (or errno) is recorded for comparison."""
    out: list[tuple[str, object]] = []

    def do(what: str, fn: Callable[[], object]) -> None:
        try:
            out.append((what, fn()))
        except OSError as e:
            out.append((what, errno.errorcode[e.errno or 0]))

    def write(p: str, data: bytes, mode: str = "wb") -> int:
        with open(os.path.join(root, p), mode) as f:
            return f.write(data)

    def read(p: str) -> bytes:
        with open(os.path.join(root, p), "rb") as f:
            return f.read()

    def j(*p: str) -> str:
        return os.path.join(root, *p)

    do("mkdir d", lambda: os.mkdir(j("d")))
    do("mkdir d again", lambda: os.mkdir(j("d")))
    do("create f", lambda: write("d/f", b"hello world"))
    do("append f", lambda: write("d/f", b"!\n", "ab"))
    do("read f", lambda: read("d/f"))
    do("pwrite gap", lambda: write_at(j("d/g"), 10, b"xyz"))
    do("read g", lambda: read("d/g"))
    do("truncate f", lambda: os.truncate(j("d/f"), 5))
    do("read f2", lambda: read("d/f"))
    do("overwrite g", lambda: write("d/g", b"short"))
    do("read g2", lambda: read("d/g"))
    do("link", lambda: os.link(j("d/f"), j("d/f2")))
    do("nlink", lambda: os.stat(j("d/f")).st_nlink)
    do("same ino", lambda: os.stat(j("d/f")).st_ino == os.stat(j("d/f2")).st_ino)
    do("symlink", lambda: os.symlink("f", j("d/s")))
    do("readlink", lambda: os.readlink(j("d/s")))
    do("read via link", lambda: read("d/s"))
    do("rename f", lambda: os.rename(j("d/f"), j("d/renamed")))
    do("stat old", lambda: os.stat(j("d/f")))
    do("rename over", lambda: os.rename(j("d/g"), j("d/renamed")))
    do("read over", lambda: read("d/renamed"))
    do("nlink f2", lambda: os.stat(j("d/f2")).st_nlink)
    do("mkdir e", lambda: os.mkdir(j("d/e")))
    do("nlink d", lambda: os.stat(j("d")).st_nlink)
    do("rename file over dir", lambda: os.rename(j("d/f2"), j("d/e")))
    do("rename dir over file", lambda: os.rename(j("d/e"), j("d/f2")))
    do("rmdir nonempty", lambda: os.rmdir(j("d")))
    do("unlink dir", lambda: os.unlink(j("d/e")))
    do("rmdir file", lambda: os.rmdir(j("d/f2")))
    do("mv dir", lambda: os.rename(j("d/e"), j("e2")))
    do("chmod", lambda: os.chmod(j("d/f2"), 0o600))
    do("mode", lambda: stat.S_IMODE(os.stat(j("d/f2")).st_mode))
    do("unlink f2", lambda: os.unlink(j("d/f2")))
    do("unlink missing", lambda: os.unlink(j("d/f2")))
    do("rmdir e2", lambda: os.rmdir(j("e2")))
    do("mkfifo", lambda: os.mkfifo(j("d/fifo")))
    do("fifo type", lambda: stat.S_ISFIFO(os.lstat(j("d/fifo")).st_mode))
    do("noreplace", lambda: renameat2(j("d/s"), j("d/renamed"), 1))
    do("exchange", lambda: renameat2(j("d/s"), j("d/renamed"), 2))
    do("exchanged", lambda: (os.path.islink(j("d/renamed")), read("d/s")))
    do("exchange missing", lambda: renameat2(j("d/s"), j("d/none"), 2))
    do("noreplace free", lambda: renameat2(j("d/s"), j("d/s2"), 1))
    do("excl", lambda: os.close(os.open(j("d/renamed"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)))
    do("listing", lambda: sorted(os.listdir(j("d"))))
    do("tree", lambda: snapshot(root))
    return out


def renameat2(old: str, new: str, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(-100, old.encode(), -100, new.encode(), flags) != 0:  # AT_FDCWD
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def write_at(path: str, offset: int, data: bytes) -> int:
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        return os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def snapshot(root: str) -> list[tuple[str, int, int, bytes]]:
    """(path, type, size, content or link target) for everything under ``root``."""
    out = []
    for dirpath, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                data = os.readlink(p).encode()
            elif stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    data = f.read()
            else:
                data = b""
            size = st.st_size if not stat.S_ISDIR(st.st_mode) else 0
            out.append((os.path.relpath(p, root), stat.S_IFMT(st.st_mode), size, data))
    return sorted(out)


def test_read_write_tree_matches_native(fuse_mount: Mount, tmp_path: Any) -> None:
    native = str(tmp_path / "native")
    os.mkdir(native)
    fs = NodeFS(MemDir())
    m = fuse_mount(fs)
    got, want = _workload(m.path), _workload(native)
    assert got == want
    assert len(fs.nodes) == len(snapshot(m.path)) + 1 + 0  # the tree, the root; removed nodes dropped


# -- dynamic lookup ----------------------------------------------------------------------------------


class Numbered(Node):
    """A file whose identity is a number: every name "N" or "N.alias" is that file."""

    def __init__(self, n: int) -> None:
        super().__init__(stat.S_IFREG | 0o444, key=("num", n))
        self.n = n

    async def getattr(self) -> afuse.Attr:
        return afuse.Attr(mode=stat.S_IFREG | 0o444, size=len(str(self.n)), ino=1000 + self.n)

    async def read(self, offset: int, size: int) -> bytes:
        return str(self.n).encode()[offset:offset + size]


class Counted(Numbered):
    """Knows when the bridge has dropped it."""

    dropped: ClassVar[list[int]] = []

    def forgotten(self) -> None:
        Counted.dropped.append(self.n)


class Numbers(Node):
    """A directory answering lookups of any number below ``count``, and listing them."""

    def __init__(self, count: int) -> None:
        super().__init__(stat.S_IFDIR | 0o755)
        self.count = count
        self.looked_up = 0
        self.counted = False

    async def lookup(self, name: bytes) -> Node | None:
        self.looked_up += 1
        stem = name.split(b".")[0]
        if not stem.isdigit() or int(stem) >= self.count:
            return None
        return (Counted if self.counted else Numbered)(int(stem))

    async def readdir(self) -> Iterator[DirItem]:
        return (DirItem(str(i).encode(), stat.S_IFREG, 1000 + i) for i in range(self.count))


def test_dynamic_lookup_dedups_by_key(fuse_mount: Mount) -> None:
    fs = NodeFS(Numbers(100))
    m = fuse_mount(fs)
    a, b = os.stat(m.join("7")), os.stat(m.join("7.alias"))
    assert a.st_ino == b.st_ino == 1007
    with open(m.join("7.alias"), "rb") as f:
        assert f.read() == b"7"
    nodes = [n for n in fs.nodes.values() if isinstance(n, Numbered)]
    assert len(nodes) == 1 and nodes[0].lookups == 2  # one nodeid, both lookups counted on it
    assert os.stat(m.join("8")).st_ino == 1008
    assert errno_of(lambda: os.stat(m.join("100"))) == errno.ENOENT
    assert sorted(os.listdir(m.path), key=int) == [str(i) for i in range(100)]


class Arriving(Numbers):
    """A listing that arrives in batches (an async iterator of lists, and of single items), with
    pauses: as a network filesystem's listing does. ``fail_after``: raise EIO after that many."""

    def __init__(self, count: int, fail_after: int | None = None, bad_item: bool = False) -> None:
        super().__init__(count)
        self.fail_after = fail_after
        self.bad_item = bad_item
        self.listings = 0
        self.closed = 0
        self.yielded = 0
        #: What the node layer sent into the generator (how many more items would fit).
        self.sent: list[object] = []

    async def lookup(self, name: bytes) -> Node | None:
        return await super().lookup(name.split(b"-")[0])

    async def readdir(self) -> Any:  # an async iterator: the bridge answers as it arrives
        self.listings += 1
        return self._arriving()

    async def _arriving(self) -> Any:
        try:
            for start in range(0, self.count, 100):
                if self.fail_after is not None and start >= self.fail_after:
                    raise afuse.FUSEError(errno.EIO, "the server went away")
                await trio.sleep(0.001)
                batch = [DirItem(b"%d-%s" % (i, b"x" * 60), stat.S_IFREG, 1000 + i)
                         for i in range(start, min(start + 100, self.count))]
                if start == 0:
                    self.yielded += 1
                    self.sent.append((yield batch[0]))  # a single item, then lists
                    batch = batch[1:]
                if self.bad_item and start >= 300:
                    yield [("not", "a", "DirItem")]
                self.yielded += len(batch)
                self.sent.append((yield batch))
        finally:
            self.closed += 1


def test_listing_as_it_arrives(fuse_mount: Mount) -> None:
    """A readdir that is an async iterator is answered as it yields: many READDIRs, every entry
    once, in order, with its inode number; plus entries and stat agree; each open lists again."""
    root = Arriving(3000)
    m = fuse_mount(NodeFS(root))
    names = [b"%d-%s" % (i, b"x" * 60) for i in range(3000)]
    with os.scandir(m.path) as it:
        assert os.fsencode(next(it).name) == names[0]
        assert root.yielded < 1000  # the first READDIR was answered from the first batches
    assert [os.fsencode(n) for n in os.listdir(m.path)] == names
    with os.scandir(m.path) as it:  # interleaved lookups: later chunks come as READDIRPLUS
        seen = [(os.fsencode(e.name), e.inode(), e.stat(follow_symlinks=False).st_ino) for e in it]
    assert [n for n, _, _ in seen] == names
    assert all(ino == st_ino == 1000 + i for i, (_, ino, st_ino) in enumerate(seen))
    assert root.listings == 3
    # Each step after the first is sent how many more items the READDIR's buffer could take.
    assert root.sent and all(type(n) is int and n > 0 for n in root.sent if n is not None), root.sent
    assert max(n for n in root.sent if isinstance(n, int)) > 100  # more than one batch fits
    wait_for(lambda: root.closed == 3, what="every listing's iterator closed")


def test_listing_that_fails_while_arriving(fuse_mount: Mount) -> None:
    """An error raised by an arriving listing reaches the reader (the entries before it were
    returned); an item of the wrong type is a clear error; the session keeps serving."""
    m = fuse_mount(NodeFS(Arriving(2000, fail_after=1200)), raise_handler_errors=False)
    fd = os.open(m.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        got: list[bytes] = []
        with pytest.raises(OSError) as e:
            with os.scandir(fd) as it:
                got += [os.fsencode(x.name) for x in it]
        assert e.value.errno == errno.EIO
    finally:
        os.close(fd)
    assert os.stat(m.join("5")).st_ino == 1005  # still serving
    bad = fuse_mount(NodeFS(Arriving(1000, bad_item=True)), raise_handler_errors=False)
    with pytest.raises(OSError) as e:
        os.listdir(bad.path)
    assert e.value.errno == errno.EIO
    errors = [str(x) for x in bad.session.errors if isinstance(x, HandlerResultError)]
    assert any("Arriving.readdir must yield DirItem, not tuple" in x for x in errors), errors
    assert os.stat(bad.join("7")).st_ino == 1007


class CountingFS(NodeFS):
    """NodeFS counting the LOOKUP, READDIR and READDIRPLUS requests it serves."""

    def __init__(self, root: Node) -> None:
        super().__init__(root)
        self.entry_timeout = self.attr_timeout = 30.0
        self.calls: dict[str, int] = {"lookup": 0, "readdir": 0, "readdirplus": 0}

    async def lookup(self, req: afuse.LookupRequest) -> afuse.Entry:
        self.calls["lookup"] += 1
        return await super().lookup(req)

    async def readdir(self, req: afuse.ReaddirRequest) -> afuse.DirEntries:
        self.calls["readdir"] += 1
        return await super().readdir(req)

    async def readdirplus(self, req: afuse.ReaddirplusRequest) -> afuse.DirEntries:
        self.calls["readdirplus"] += 1
        return await super().readdirplus(req)


@pytest.mark.parametrize("arriving", [False, True])
def test_a_plain_listing_makes_few_nodes(fuse_mount: Mount, arriving: bool) -> None:
    """The kernel asks for READDIRPLUS at offset 0 of every listing; its answer holds a few
    entries, so a plain listing goes on with READDIR (no node per entry), while a listing whose
    entries are stat'ed as it goes (ls -l, scandir + stat) goes on with READDIRPLUS."""
    fs = CountingFS(Arriving(3000) if arriving else Numbers(3000))
    m = fuse_mount(fs)
    assert m.session.has(afuse.InitFlag.READDIRPLUS_AUTO)
    assert len(os.listdir(m.path)) == 3000
    assert fs.calls["readdirplus"] == 1 and fs.calls["readdir"] >= 1 and fs.calls["lookup"] == 0
    assert len(fs.nodes) <= 1 + 1  # the root and the first READDIRPLUS's one entry
    fs.calls.update(dict.fromkeys(fs.calls, 0))
    with os.scandir(m.path) as it:
        inos = [e.stat(follow_symlinks=False).st_ino for e in it]
    assert sorted(inos) == list(range(1000, 4000))
    assert fs.calls["readdirplus"] > 1 and fs.calls["lookup"] < 50, fs.calls  # no LOOKUP per entry


# -- lookup counts and forgetting --------------------------------------------------------------------


def test_lookup_counts_balance_after_forget_with_readdirplus(fuse_mount: Mount) -> None:
    fs = NodeFS(Numbers(300))
    m = fuse_mount(fs, config=afuse.InitConfig(readdirplus_auto=False))  # every chunk READDIRPLUS
    assert m.session.has(afuse.InitFlag.DO_READDIRPLUS)
    for i in range(0, 300, 3):
        os.stat(m.join(f"{i}.x"))
    looked_up = fs.root.looked_up if isinstance(fs.root, Numbers) else 0
    listing = os.listdir(m.path)  # READDIRPLUS: the entries the kernel takes count as lookups
    assert len(listing) == 300
    held = {nid: n.lookups for nid, n in fs.nodes.items() if nid != 1}
    assert len(held) == 300 and all(c >= 1 for c in held.values())
    assert isinstance(fs.root, Numbers) and fs.root.looked_up > looked_up  # plus entries were looked up
    prune(m, sorted(held))
    wait_for(lambda: len(fs.nodes) == 1, what="every node forgotten")
    assert fs.excess_forgets == 0  # the kernel forgot exactly what the bridge counted
    assert all(n.lookups == 0 for n in fs._by_key.values()) and not fs._by_key


def test_forgotten_hook_and_open_unlinked_file(fuse_mount: Mount) -> None:
    numbers = Numbers(10)
    numbers.counted = True
    fs = NodeFS(MemDir({"f": b"data", "numbers": numbers}), types=[Counted])
    m = fuse_mount(fs)
    Counted.dropped.clear()
    os.stat(m.join("numbers", "3"))
    os.stat(m.join("numbers", "4"))
    assert os.stat(m.join("numbers", "3.alias")).st_ino == 1003
    assert Counted.dropped == [3]  # the duplicate lookup made was dropped at once
    assert isinstance(fs.node_by_key(("num", 3)), Counted)
    fd = os.open(m.join("f"), os.O_RDWR)
    try:
        os.unlink(m.join("f"))
        assert os.fstat(fd).st_nlink == 0 and "f" not in os.listdir(m.path)
        os.pwrite(fd, b"DATA", 0)
        assert os.pread(fd, 10, 0) == b"DATA"  # the open file lives on
        f_id = os.fstat(fd).st_ino
        assert f_id in fs.nodes
    finally:
        os.close(fd)
    prune(m, [n.nodeid for n in fs.nodes.values() if isinstance(n, Counted)] + [f_id])
    wait_for(lambda: sorted(Counted.dropped) == [3, 3, 4] and f_id not in fs.nodes, what="nodes dropped")
    assert fs.node_by_key(("num", 3)) is None
    assert fs.excess_forgets == 0


def test_forget_after_drop_caches_keeps_persistent_nodes(fuse_mount: Mount) -> None:
    fs = NodeFS(MemDir({"a": b"1", "sub": {"b": b"2"}}))
    m = fuse_mount(fs)
    with open(m.join("new"), "wb") as f:  # CREATE counts one
        f.write(b"x")
    os.mkdir(m.join("dir"))  # MKDIR counts one
    os.symlink("a", m.join("ln"))  # SYMLINK
    os.link(m.join("a"), m.join("a2"))  # LINK
    os.stat(m.join("sub", "b"))
    os.listdir(m.join("sub"))
    os.unlink(m.join("new"))  # unlinked but the kernel may still hold it
    counted = {n: n.lookups for n in fs.nodes.values() if n is not fs.root}
    assert all(c >= 1 for c in counted.values()), counted
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2\n")
    wait_for(lambda: all(n.lookups == 0 for n in fs.nodes.values()), what="FORGETs")
    assert fs.excess_forgets == 0
    names = {"a", "sub", "b", "dir", "ln"}  # "a2" is "a"
    assert len(fs.nodes) == len(names) + 1  # the persistent tree stays, "new" is gone
    assert open(m.join("sub", "b"), "rb").read() == b"2"


# -- directory offsets -------------------------------------------------------------------------------


def test_directory_offsets_stable_while_entries_change(fuse_mount: Mount) -> None:
    root = MemDir({f"entry-{i:05d}-{'x' * 40}": b"" for i in range(1500)})
    m = fuse_mount(NodeFS(root))
    before = set(os.listdir(m.path))
    seen: list[str] = []
    removed: set[str] = set()
    with os.scandir(m.path) as it:
        for i, e in enumerate(it):
            seen.append(e.name)
            if i == 100:
                for k in range(0, 600):  # remove entries not yet read, add new ones
                    removed.add(f"entry-{1499 - k:05d}-{'x' * 40}")
                    os.unlink(m.join(f"entry-{1499 - k:05d}-{'x' * 40}"))
                    open(m.join(f"new-{k}"), "w").close()
                    removed.add(f"entry-{k:05d}-{'x' * 40}")
                    os.unlink(m.join(f"entry-{k:05d}-{'x' * 40}"))  # and some already read
    assert len(seen) == len(set(seen))  # nothing twice
    assert before - removed <= set(seen)  # nothing that stayed is skipped (POSIX)
    assert set(seen) <= before | {f"new-{k}" for k in range(600)}
    after = set(os.listdir(m.path))  # a new listing sees the changes
    assert len(after) == 1500 - 1200 + 600 and "new-0" in after


_SYS_GETDENTS64 = {"x86_64": 217, "aarch64": 61, "riscv64": 61}[os.uname().machine]
_libc = ctypes.CDLL(None, use_errno=True)


def getdents(fd: int, size: int) -> list[tuple[str, int]]:
    """One getdents64(2) call on directory ``fd``: (name, d_off) of the entries it returned."""
    buf = ctypes.create_string_buffer(size)
    n = _libc.syscall(_SYS_GETDENTS64, fd, buf, size)
    if n < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    out, pos, raw = [], 0, buf.raw
    while pos < n:
        d_off = int.from_bytes(raw[pos + 8:pos + 16], "little", signed=True)
        reclen = int.from_bytes(raw[pos + 16:pos + 18], "little")
        name = raw[pos + 19:pos + reclen].split(b"\0", 1)[0].decode()
        out.append((name, d_off))
        pos += reclen
    return out


@pytest.mark.parametrize("cache_dir", [False, True], ids=["no-cache-dir", "cache-dir"])
def test_directory_offsets_shared_by_opens(fuse_mount: Mount, cache_dir: bool) -> None:
    """Two opens of one memfs directory list it page by page, interleaved, while names are created
    and unlinked between the pages: each sees every entry that existed throughout exactly once,
    and no entry twice. With CACHE_DIR the opens start from the kernel's cached listing (made by
    a third open) and go on from their positions in the listing a later third open cached
    after a change: offsets must mean the same entry in every open of the directory."""
    from afuse.examples.memfs import MemFS

    fs = MemFS()
    if cache_dir:
        fs.root.fopen = afuse.FOpen.CACHE_DIR | afuse.FOpen.KEEP_CACHE  # type: ignore[attr-defined]
    m = fuse_mount(fs)
    stay = [f"stay-{i:04d}-{'s' * 30}" for i in range(400)]
    doomed = [f"doomed-{i:04d}-{'d' * 30}" for i in range(400)]
    for name in [x for pair in zip(stay, doomed, strict=True) for x in pair]:
        open(m.join(name), "w").close()
    assert len(os.listdir(m.path)) == 800  # with CACHE_DIR: the kernel has the whole listing now
    fds = [os.open(m.path, os.O_RDONLY | os.O_DIRECTORY) for _ in range(2)]
    seen: list[list[str]] = [[], []]
    done = [False, False]
    k = 0
    try:
        while not all(done):
            for j in (0, 1):  # the second open may read what the first put in the kernel's cache
                if not done[j]:
                    page = getdents(fds[j], 1024)  # a few entries a call: many READDIRs
                    done[j] = not page
                    seen[j] += [name for name, _ in page if name not in (".", "..")]
            if k < len(doomed):  # change the directory between the pages: early entries go
                os.unlink(m.join(doomed[k]))
                open(m.join(f"new-{k}"), "w").close()
                k += 1
                os.listdir(m.path)  # a third open: with CACHE_DIR it drops the cached listing, makes a new one
    finally:
        for fd in fds:
            os.close(fd)
    assert k > 20  # the listings took many pages
    for names in seen:
        assert len(names) == len(set(names)), "an entry listed twice"
        assert set(stay) <= set(names), f"skipped: {sorted(set(stay) - set(names))[:5]}"
    assert set(os.listdir(m.path)) == set(stay) | {f"new-{i}" for i in range(k)} | set(doomed[k:])


# -- passthrough ---------------------------------------------------------------------------------


class BackedFile(Node):
    """A file whose content lives in a file of the host; opens hand out its descriptor."""

    def __init__(self, path: str) -> None:
        super().__init__(stat.S_IFREG | 0o644)
        self.path = path

    async def getattr(self) -> afuse.Attr:
        return afuse.Attr.from_stat(os.stat(self.path), ino=0)

    async def open(self, flags: int) -> FileHandle:
        return FDHandle(os.open(self.path, flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC)))


def _passthrough_roundtrip(m: MountedFS, backing: str) -> None:
    with open(m.join("f"), "r+b") as f1, open(m.join("f"), "rb") as f2:
        assert f1.read() == b"backing data"
        f1.seek(0)
        f1.write(b"BACKING")
        f1.flush()
        os.fsync(f1.fileno())
        assert f2.read() == b"BACKING data"
    with open(backing, "rb") as f:
        assert f.read() == b"BACKING data"


def test_passthrough_on(fuse_mount: Mount, tmp_path: Any) -> None:
    backing = str(tmp_path / "backing")
    with open(backing, "wb") as f:
        f.write(b"backing data")
    fs = NodeFS(Dir({"f": BackedFile(backing)}), types=[FDHandle])
    m = fuse_mount(fs, config=afuse.InitConfig(passthrough=True), options="direct_io" if False else None)
    assert m.session.has(afuse.InitFlag.PASSTHROUGH)
    _passthrough_roundtrip(m, backing)
    assert m.session.backing is not None
    assert m.session.backing.opened == 1  # two opens, one BackingFile for the inode
    wait_for(lambda: m.session.backing is not None and not m.session.backing.files, what="backing id closed")
    assert not fs._handles


def test_passthrough_off_served_from_the_descriptor(fuse_mount: Mount, tmp_path: Any) -> None:
    backing = str(tmp_path / "backing")
    with open(backing, "wb") as f:
        f.write(b"backing data")
    fs = NodeFS(Dir({"f": BackedFile(backing)}), types=[FDHandle])
    m = fuse_mount(fs)
    assert not m.session.has(afuse.InitFlag.PASSTHROUGH) and m.session.backing is None
    _passthrough_roundtrip(m, backing)
    wait_for(lambda: not fs._handles, what="handles released")


# -- notifications from nodes --------------------------------------------------------------------


class CachingFS(NodeFS):
    entry_timeout = 60.0
    attr_timeout = 60.0


class CachedFile(MemFile):
    """Opens keep the kernel's page cache (FOPEN_KEEP_CACHE)."""

    fopen = afuse.FOpen.KEEP_CACHE


@pytest.mark.trio
async def test_notifications_from_nodes() -> None:
    f = CachedFile(b"old")
    gone = MemFile(b"bye")
    root = MemDir({"f": f, "gone": gone})
    unknown = MemFile(b"never looked up")
    root.add_child(b"unknown", unknown)
    fs = CachingFS(root)

    async with afuse.mount(fs, testing._make_mountpoint(None)[0]) as session:
        p = trio.Path(session.mountpoint)
        assert (await (p / "f").stat()).st_size == 3
        assert (await (p / "gone").stat()).st_size == 3
        # content changed behind the kernel's back: stale until the node says so
        f.data[:] = b"new content"
        f.attr.size = len(f.data)
        assert (await (p / "f").stat()).st_size == 3
        await f.notify_content()
        assert (await (p / "f").stat()).st_size == 11
        assert await (p / "f").read_bytes() == b"new content"
        # a child vanished / appeared
        root.remove_child(b"gone")
        assert (await (p / "gone").stat()).st_size == 3  # cached entry
        await root.notify_delete(b"gone", gone)
        assert not await (p / "gone").exists()
        root.add_child(b"born", MemFile(b"hi"))
        await root.notify_entry(b"born")
        assert await (p / "born").read_bytes() == b"hi"
        # store data into the kernel's cache
        await f.notify_store(0, b"NEW")  # the node's data stays "new content"
        assert await (p / "f").read_bytes() == b"NEW content"
        # a node the kernel does not know: nothing is sent
        assert not unknown.known and not MemFile().known
        await unknown.notify_content()
        await unknown.notify_attr()
        await MemFile().notify_store(0, b"x")
        assert not session.errors
    os.rmdir(session.mountpoint)


# -- caller credentials and supplementary groups ------------------------------------------------


class GroupFile(StaticFile):
    """Readable by owner root and group ``gid`` only; checks the caller itself."""

    def __init__(self, gid: int, seen: list[tuple[int, int, tuple[int, ...]]]) -> None:
        super().__init__(b"secret\n", 0o440)
        self.attr.gid = gid
        self.seen = seen

    async def open(self, flags: int) -> FileHandle | None:
        c = current_caller()
        self.seen.append((c.uid, c.gid, c.groups))
        if not c.may(self.attr.mode, self.attr.uid, self.attr.gid, os.R_OK):
            raise afuse.FUSEError(errno.EACCES)
        return None


def test_supplementary_groups_reach_the_node(fuse_mount: Mount) -> None:
    seen: list[tuple[int, int, tuple[int, ...]]] = []
    group = 4242
    m = fuse_mount(NodeFS(Dir({"secret": GroupFile(group, seen)})), options="allow_other")

    def cat(*groups: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", *groups, "cat", m.join("secret")],
                              capture_output=True, timeout=20, check=False)

    ok = cat(f"--groups=100,{group}")
    assert ok.returncode == 0 and ok.stdout == b"secret\n", ok.stderr
    denied = cat("--clear-groups")
    assert denied.returncode != 0 and b"Permission denied" in denied.stderr
    assert seen[0] == (65534, 65534, (100, group)) and seen[1] == (65534, 65534, ())


class RecordingDir(MemDir):
    """Records the groups each create's caller came with, and checks group write permission."""

    def __init__(self, gid: int) -> None:
        super().__init__(mode=0o070)
        self.attr.gid = gid
        self.callers: list[tuple[int, tuple[int, ...] | None]] = []

    async def create(self, name: bytes, flags: int, mode: int) -> Node:
        c = current_caller()
        self.callers.append((c.uid, c._groups))
        if not c.may(self.attr.mode, self.attr.uid, self.attr.gid, os.W_OK | os.X_OK):
            raise afuse.FUSEError(errno.EACCES)
        return await super().create(name, flags, mode)


def test_supplementary_group_from_the_kernel_on_create(fuse_mount: Mount) -> None:
    group = 4243
    d = RecordingDir(group)
    m = fuse_mount(NodeFS(Dir({"shared": d})), options="allow_other",
                   config=afuse.InitConfig(create_supp_group=True))
    if not m.session.has(afuse.InitFlag.CREATE_SUPP_GROUP):
        pytest.fail("the kernel did not offer FUSE_CREATE_SUPP_GROUP")
    path = m.join("shared", "made")
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", f"--groups={group}", "touch", path],
                       capture_output=True, timeout=20, check=False)
    assert r.returncode == 0, r.stderr
    # FUSE_EXT_GROUPS carried the one group that matters (the parent's), no /proc read needed
    assert d.callers == [(65534, (group,))]
    assert os.stat(path).st_uid == 65534
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "touch",
                        m.join("shared", "other")], capture_output=True, timeout=20, check=False)
    assert r.returncode != 0 and b"Permission denied" in r.stderr
    assert d.callers[1] == (65534, None)  # no extension sent: groups come from /proc on use


# -- bad node results ----------------------------------------------------------------------------


class Broken(Node):
    def __init__(self) -> None:
        super().__init__(stat.S_IFDIR | 0o755)

    async def lookup(self, name: bytes) -> Any:
        if name == b"str":
            return "not a node"
        if name == b"badattr":
            return BadAttr()
        return Numbered(int(name)) if name.isdigit() else None


class BadAttr(Node):
    async def getattr(self) -> Any:
        return {"size": 1}


def test_bad_node_results_are_clear_errors_and_serving_goes_on(fuse_mount: Mount) -> None:
    m = fuse_mount(NodeFS(Broken()), raise_handler_errors=False)
    assert errno_of(lambda: os.stat(m.join("str"))) == errno.EIO
    assert errno_of(lambda: os.stat(m.join("badattr"))) == errno.EIO
    assert os.stat(m.join("5")).st_ino == 1005  # still serving
    msgs = [str(e) for e in m.session.errors]
    assert all(isinstance(e, HandlerResultError) for e in m.session.errors)
    assert "Broken.lookup must return a Node, not str" in msgs
    assert "BadAttr.getattr must return an Attr, not dict" in msgs


def test_bad_values_refused_up_front() -> None:
    with pytest.raises(TypeError, match="root must be a directory Node"):
        NodeFS(StaticFile(b"x"))
    with pytest.raises(ValueError, match="invalid directory entry name"):
        Dir({"a/b": b""})
    with pytest.raises(TypeError, match="cannot make a node from int"):
        Dir({"a": 1})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="no file type"):
        Node(0o644)


# -- only what some node implements reaches the kernel -----------------------------------------


class XattrFile(StaticFile):
    async def getxattr(self, name: bytes) -> bytes:
        if name == b"user.color":
            return b"blue"
        raise afuse.FUSEError(errno.ENODATA)

    async def listxattr(self) -> list[bytes]:
        return [b"user.color"]


def test_operations_follow_the_node_classes(fuse_mount: Mount) -> None:
    plain = NodeFS(Dir({"f": b"x"}))
    assert not overridden(plain, "getxattr") and not overridden(plain, "flush")
    assert not plain.__class__.__name__.startswith("_")
    fs = NodeFS(Dir({"f": XattrFile(b"x"), "g": b"y"}))
    assert overridden(fs, "getxattr") and overridden(fs, "listxattr") and not overridden(fs, "setxattr")
    m = fuse_mount(fs)
    assert os.getxattr(m.join("f"), "user.color") == b"blue"
    assert os.listxattr(m.join("f")) == ["user.color"]
    assert errno_of(lambda: os.getxattr(m.join("g"), "user.color")) == errno.EOPNOTSUPP
    assert errno_of(lambda: os.setxattr(m.join("f"), "user.x", b"1")) == errno.EOPNOTSUPP
    assert os.listxattr(m.join("g")) == []


def test_mount_in_a_child_process(fuse_mount_process: Callable[..., testing.MountedProcess]) -> None:
    m = fuse_mount_process("afuse.examples.hello:HelloFS")
    with open(m.join("hello"), "rb") as f:
        assert f.read() == b"Hello, world!\n"



def test_docs_dynamic_lookup_example(fuse_mount: Mount) -> None:
    import re

    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "nodes.md")) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    ns: dict[str, Any] = {}
    exec(next(b for b in blocks if "class Numbers" in b), ns)
    fs = ns["fs"]
    m = fuse_mount(fs)
    assert sorted(os.listdir(m.path)) == [str(i) for i in range(10)]
    with open(m.join("7"), "rb") as f:
        assert f.read() == b"7"
    assert os.stat(m.join("7")).st_ino == os.stat(m.join("07")).st_ino  # one key, one inode


# -- file handle operations ------------------------------------------------------------------------


class Journal(FDHandle):
    """A loopback handle that records flushes, fsyncs and flocks and allocates on its descriptor."""

    def __init__(self, fd: int, log: list[tuple[str, int]]) -> None:
        super().__init__(fd)
        self.log = log

    async def flush(self) -> None:
        self.log.append(("flush", 0))

    async def fsync(self, datasync: bool) -> None:
        self.log.append(("fsync", int(datasync)))
        assert self.backing_fd is not None
        os.fsync(self.backing_fd)

    async def fallocate(self, offset: int, length: int, mode: int) -> None:
        if mode:
            raise afuse.FUSEError(errno.EOPNOTSUPP)
        assert self.backing_fd is not None
        os.posix_fallocate(self.backing_fd, offset, length)

    async def flock(self, req: afuse.SetlkRequest) -> None:
        self.log.append(("flock", req.lock.type))


class JournalFile(BackedFile):
    def __init__(self, path: str, log: list[tuple[str, int]]) -> None:
        super().__init__(path)
        self.log = log

    async def open(self, flags: int) -> FileHandle:
        return Journal(os.open(self.path, flags & os.O_ACCMODE), self.log)


class SeekingFile(MemFile):
    async def lseek(self, offset: int, whence: int) -> int:
        return 3 if whence == os.SEEK_HOLE else offset


def test_file_handle_operations(fuse_mount: Mount, tmp_path: Any) -> None:
    import fcntl

    backing = str(tmp_path / "backing")
    with open(backing, "wb") as f:
        f.write(b"0123456789")
    log: list[tuple[str, int]] = []
    fs = NodeFS(Dir({"j": JournalFile(backing, log), "m": MemFile(b"x" * 100), "s": SeekingFile(b"abcdef")}),
                types=[Journal])
    m = fuse_mount(fs)
    assert m.session.has(afuse.InitFlag.FLOCK_LOCKS) and not m.session.has(afuse.InitFlag.POSIX_LOCKS)
    fd = os.open(m.join("j"), os.O_RDWR)
    try:
        os.fsync(fd)
        os.fdatasync(fd)
        os.posix_fallocate(fd, 0, 8192)
        assert os.fstat(fd).st_size == 8192 and os.stat(backing).st_size == 8192
        fcntl.flock(fd, fcntl.LOCK_EX)
        fcntl.flock(fd, fcntl.LOCK_UN)
        assert os.pread(fd, 4, 2) == b"2345"  # served with pread on the handle's descriptor
    finally:
        os.close(fd)
    wait_for(lambda: not fs._handles, what="release")
    assert [e for e in log if e[0] != "flush"] == [("fsync", 0), ("fsync", 1), ("flock", fcntl.F_WRLCK),
                                                    ("flock", fcntl.F_UNLCK)]
    assert ("flush", 0) in log
    # SEEK_DATA / SEEK_HOLE: the node's own lseek, else the whole file is data
    fd = os.open(m.join("m"), os.O_RDONLY)
    try:
        assert os.lseek(fd, 5, os.SEEK_DATA) == 5 and os.lseek(fd, 5, os.SEEK_HOLE) == 100
        assert errno_of(lambda: os.lseek(fd, 100, os.SEEK_DATA)) == errno.ENXIO
    finally:
        os.close(fd)
    fd = os.open(m.join("s"), os.O_RDONLY)
    try:
        assert os.lseek(fd, 1, os.SEEK_HOLE) == 3
    finally:
        os.close(fd)
    # MemFile has no fallocate: EOPNOTSUPP, as a filesystem without it answers
    fd = os.open(m.join("m"), os.O_RDWR)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
        assert libc.fallocate(fd, 0, 0, 10) == -1 and ctypes.get_errno() == errno.EOPNOTSUPP
    finally:
        os.close(fd)


def test_concurrent_changes_keep_counts_balanced(fuse_mount: Mount) -> None:
    import random
    import threading

    fs = NodeFS(MemDir({"d": {}}))
    m = fuse_mount(fs)
    unexpected: list[tuple[int, OSError]] = []

    def worker(seed: int) -> None:
        rnd = random.Random(seed)
        for _ in range(1000):
            a, b = (m.join("d", f"f{rnd.randrange(30)}") for _ in range(2))
            op = rnd.randrange(7)
            try:
                if op == 0:
                    with open(a, "wb") as f:
                        f.write(b"x" * rnd.randrange(100))
                elif op == 1:
                    os.unlink(a)
                elif op == 2:
                    os.rename(a, b)
                elif op == 3:
                    os.listdir(m.join("d"))
                elif op == 4:
                    os.stat(a)
                elif op == 5:
                    os.link(a, b)
                else:
                    with open(a, "rb") as f:
                        f.read()
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.EEXIST):
                    unexpected.append((op, e))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not unexpected
    d = fs.root.children[b"d"] if fs.root.children else None
    assert d is not None and d.children is not None
    assert set(os.listdir(m.join("d"))) == {n.decode() for n in d.children}
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2\n")
    wait_for(lambda: all(n.lookups == 0 for n in fs.nodes.values()), what="FORGETs")
    assert fs.excess_forgets == 0
    # exactly the tree is left: the root, "d" and its files (hard links share a node)
    assert set(fs.nodes.values()) == {fs.root, d, *d.children.values()}


class NegativeCachingFS(NodeFS):
    negative_timeout = 60.0


@pytest.mark.trio
async def test_negative_entries_cached_until_notified() -> None:
    numbers = Numbers(5)
    root = MemDir({"numbers": numbers})
    fs = NegativeCachingFS(root)
    async with testing.trio_mount(fs) as session:
        p = trio.Path(session.mountpoint)
        for _ in range(3):
            assert not await (p / "numbers" / "x").exists()
        assert numbers.looked_up == 1  # the kernel kept the name's absence
        assert not await (p / "later").exists()
        root.add_child(b"later", MemFile(b"now"))
        assert not await (p / "later").exists()  # still cached as absent
        await root.notify_entry(b"later")
        assert await (p / "later").read_bytes() == b"now"


# -- the loopback node -------------------------------------------------------------------------------


def test_loopback_matches_native(fuse_mount: Mount, tmp_path: Any) -> None:
    from afuse.nodes import LoopbackFS

    native, src = str(tmp_path / "native"), str(tmp_path / "src")
    os.mkdir(native)
    os.mkdir(src)
    fs = LoopbackFS(src)
    m = fuse_mount(fs)
    got, want = _workload(m.path), _workload(native)
    assert got == want
    assert snapshot(src) == snapshot(native)
    os.setxattr(m.join("d", "s2"), "user.k", b"v")
    assert os.getxattr(os.path.join(src, "d", "s2"), "user.k") == b"v"
    assert "user.k" in os.listxattr(m.join("d", "s2"))
    assert os.statvfs(m.path).f_bsize == os.statvfs(src).f_bsize


def test_loopback_one_node_per_inode_and_descriptors_closed(fuse_mount: Mount, tmp_path: Any) -> None:
    from afuse.nodes import LoopbackFS, LoopbackNode

    src = str(tmp_path / "src")
    os.makedirs(os.path.join(src, "sub"))
    with open(os.path.join(src, "a"), "wb") as f:
        f.write(b"shared")
    os.link(os.path.join(src, "a"), os.path.join(src, "sub", "b"))  # one inode, two names
    fs = LoopbackFS(src)
    m = fuse_mount(fs, config=afuse.InitConfig(passthrough=True))
    fds_mounted = set(os.listdir("/proc/self/fd"))
    assert m.session.backing is not None
    probed = m.session.backing.opened  # LoopbackFS tries BACKING_OPEN once at INIT
    a, b = os.stat(m.join("a")), os.stat(m.join("sub", "b"))
    assert a.st_ino == b.st_ino == os.stat(os.path.join(src, "a")).st_ino and a.st_nlink == 2
    live = [n for n in fs.nodes.values() if isinstance(n, LoopbackNode) and n is not fs.root]
    assert len(live) == 2 and {n.lookups for n in live} == {1, 2}  # "sub", and "a" looked up twice
    with open(m.join("sub", "b"), "r+b") as f:  # passthrough: the kernel writes the host file
        f.write(b"SHARED")
    with open(os.path.join(src, "a"), "rb") as f:
        assert f.read() == b"SHARED"
    assert m.session.backing.opened == probed + 1
    os.listdir(m.join("sub"))
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2\n")
    # (the serving thread drops a node from the table, then closes its descriptor: wait for both)
    wait_for(lambda: len(fs.nodes) == 1 and all(n.fd == -1 for n in live), what="every node forgotten")
    assert fs.excess_forgets == 0
    assert set(os.listdir("/proc/self/fd")) <= fds_mounted  # node, handle and backing fds all closed


SHARED = afuse.Attr(mode=0o444, size=1)  # no inode number, no file type: the bridge fills both in


class SharedAttrFile(Node):
    async def getattr(self) -> afuse.Attr:
        return SHARED


def test_a_shared_attr_is_never_changed(fuse_mount: Mount) -> None:
    m = fuse_mount(NodeFS(Dir({"a": SharedAttrFile(), "b": SharedAttrFile()})))
    a, b = os.stat(m.join("a")), os.stat(m.join("b"))
    assert a.st_ino != b.st_ino and stat.S_ISREG(a.st_mode) and stat.S_ISREG(b.st_mode)
    assert SHARED.ino == 0 and SHARED.mode == 0o444


# -- READ answered with a list of buffers ------------------------------------------------------------


class Pieces(StaticFile):
    """A file whose reads answer with several buffers (written with one writev, not joined);
    ``bad`` answers with a list holding something else."""

    def __init__(self, data: bytes, bad: object = None) -> None:
        super().__init__(data)
        self.data, self.bad = data, bad

    async def read(self, offset: int, size: int) -> Any:
        if self.bad is not None:
            return [b"ok", self.bad]
        piece = self.data[offset:offset + size]
        mid = len(piece) // 3
        return [piece[:mid], memoryview(piece)[mid:2 * mid], bytearray(piece[2 * mid:])]


def test_read_answered_with_a_list_of_buffers(fuse_mount: Mount) -> None:
    data = os.urandom(3 << 20)
    root = MemDir()
    root.add_child(b"pieces", Pieces(data))
    root.add_child(b"bad", Pieces(b"x" * 100, bad=12))
    root.add_child(b"strided", Pieces(b"x" * 100, bad=memoryview(b"abcdef")[::2]))
    root.add_child(b"big", Pieces(b"x" * 100, bad=b"y" * (4 << 20)))
    m = fuse_mount(NodeFS(root), raise_handler_errors=False)
    with open(m.join("pieces"), "rb", buffering=0) as f:
        assert f.read() == data
        assert os.pread(f.fileno(), 10, 5) == data[5:15]

    def read_all(name: str) -> bytes:
        with open(m.join(name), "rb") as f:
            return f.read()

    for name, why in (("bad", "a list holding int"), ("strided", "non-contiguous memoryview"),
                      ("big", "bytes for a request of")):
        assert errno_of(lambda: read_all(name)) == errno.EIO  # noqa: B023 (called at once)
        assert any(why in str(e) for e in m.session.errors if isinstance(e, HandlerResultError)), why
    assert read_all("pieces")[:4] == data[:4]  # still serving
