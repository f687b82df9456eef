"""Idmapped mounts of an afuse filesystem (FUSE_ALLOW_IDMAP, protocol 7.41, Linux 6.12).

An idmapped bind mount of a memfs mount is made with the new mount API (open_tree, mount_setattr
with MOUNT_ATTR_IDMAP, move_mount) and a user namespace whose uid/gid map is 0 -> 10000 (65536
ids): ids 0..65535 in the filesystem appear as 10000..75535 through the idmapped mount.

What the kernel does (observed on 6.18 and asserted below):

* Without FUSE_ALLOW_IDMAP in the INIT reply, MOUNT_ATTR_IDMAP fails with EINVAL.
* With it, inode-creating requests carry the caller's ids mapped back into the filesystem's view
  (a caller with fsuid 10005 creates as uid 5); every other request carries no ids
  (``req.has_ids`` is False, uid = gid = INVALID_UIDGID), even on the plain mount.
* A caller whose ids have no mapping (root here: 0 is outside 10000..75535) cannot create:
  EOVERFLOW before the filesystem is asked.
* chown through the idmapped mount reaches SETATTR with the new owner in the filesystem's view.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

import afuse
from afuse import testing
from afuse.examples.memfs import MemFS
from afuse.pytest_plugin import fuse_unavailable_reason
from afuse.testing import MountFactory
from afuse.wire.constants import INVALID_UIDGID

pytestmark = [
    pytest.mark.skipif(fuse_unavailable_reason() is not None, reason=str(fuse_unavailable_reason())),
    pytest.mark.skipif(os.geteuid() != 0, reason="idmapped mounts need CAP_SYS_ADMIN"),
    pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)"),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv(1)"),
    pytest.mark.timeout(60),
]

_libc = ctypes.CDLL(None, use_errno=True)
# x86_64 syscall numbers (the new mount API has the same numbers on every architecture).
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_MOUNT_SETATTR = 442
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = 0o2000000
MOVE_MOUNT_F_EMPTY_PATH = 4
MOUNT_ATTR_IDMAP = 0x00100000
BASE = 10000


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _check(ret: int, what: str) -> int:
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return ret


def open_tree_clone(path: str) -> int:
    """A detached copy of the mount at ``path`` (open_tree with OPEN_TREE_CLONE)."""
    return _check(_libc.syscall(_SYS_OPEN_TREE, AT_FDCWD, os.fsencode(path),
                                OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE), "open_tree")


def set_idmap(tree_fd: int, userns_fd: int) -> None:
    """mount_setattr(MOUNT_ATTR_IDMAP) with the idmapping of ``userns_fd``."""
    attr = _MountAttr(MOUNT_ATTR_IDMAP, 0, 0, userns_fd)
    _check(_libc.syscall(_SYS_MOUNT_SETATTR, tree_fd, b"", AT_EMPTY_PATH, ctypes.byref(attr),
                         ctypes.c_size_t(ctypes.sizeof(attr))), "mount_setattr")


def move_mount(tree_fd: int, target: str) -> None:
    """Attach a detached tree at ``target``."""
    _check(_libc.syscall(_SYS_MOVE_MOUNT, tree_fd, b"", AT_FDCWD, os.fsencode(target),
                         MOVE_MOUNT_F_EMPTY_PATH), "move_mount")


@pytest.fixture
def userns_fd() -> Iterator[int]:
    """A user namespace mapping ids 0..65535 to 10000..75535, as an open /proc/PID/ns/user."""
    proc = subprocess.Popen(["unshare", "--user", "sleep", "60"])
    try:
        mine = os.readlink("/proc/self/ns/user")
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{proc.pid}/ns/user") == mine:
            assert time.monotonic() < deadline, "unshare did not create a user namespace"
            time.sleep(0.01)
        # Written by us (root in the parent namespace): util-linux's --map-users needs newuidmap.
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{proc.pid}/{name}", "w") as f:
                f.write(f"0 {BASE} 65536\n")
        fd = os.open(f"/proc/{proc.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        try:
            yield fd
        finally:
            os.close(fd)
    finally:
        proc.kill()
        proc.wait(10)


@contextlib.contextmanager
def idmapped(source: str, target: str, userns: int) -> Iterator[str]:
    """An idmapped bind mount of ``source`` on ``target``, unmounted afterwards."""
    tree = open_tree_clone(source)
    try:
        set_idmap(tree, userns)
        move_mount(tree, target)
    finally:
        os.close(tree)
    try:
        yield target
    finally:
        afuse.device.unmount(target, lazy=True)


class Recording(MemFS):
    """memfs that records the caller ids of each request."""

    def __init__(self) -> None:
        super().__init__(uid=0, gid=0, mode=0o777)
        self.seen: list[tuple[str, int, int, bool]] = []

    async def getattr(self, req: afuse.GetattrRequest) -> afuse.Attr:
        self.seen.append(("getattr", req.uid, req.gid, req.has_ids))
        return await super().getattr(req)

    async def create(self, req: afuse.CreateRequest) -> tuple[afuse.Entry, afuse.Handle]:
        self.seen.append(("create", req.uid, req.gid, req.has_ids))
        return await super().create(req)

    async def mkdir(self, req: afuse.MkdirRequest) -> afuse.Entry:
        self.seen.append(("mkdir", req.uid, req.gid, req.has_ids))
        return await super().mkdir(req)

    async def setattr(self, req: afuse.SetattrRequest) -> afuse.Attr:
        self.seen.append(("setattr", req.uid, req.gid, req.has_ids))
        self.last_setattr = req
        return await super().setattr(req)


def _as_user(uid: int, gid: int, *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *cmd],
                          capture_output=True, text=True, timeout=20)


def test_allow_idmap_needs_default_permissions(fuse_available: None) -> None:
    with pytest.raises(afuse.MountError, match="default_permissions"):
        with testing.mounted(MemFS(), config=afuse.InitConfig(allow_idmap=True)):
            pass
    # posix_acl implies default_permissions in the kernel, so it is accepted instead.
    with testing.mounted(MemFS(), config=afuse.InitConfig(allow_idmap=True, posix_acl=True)) as m:
        assert m.session.has(afuse.InitFlag.ALLOW_IDMAP)


def test_idmap_refused_without_allow_idmap(fuse_mount: MountFactory, userns_fd: int) -> None:
    m = fuse_mount(MemFS(), options="default_permissions,allow_other")
    assert not m.session.has(afuse.InitFlag.ALLOW_IDMAP)
    tree = open_tree_clone(m.path)
    try:
        with pytest.raises(OSError) as e:
            set_idmap(tree, userns_fd)
        assert e.value.errno == errno.EINVAL
    finally:
        os.close(tree)


@pytest.fixture
def target() -> Iterator[str]:
    """An empty directory other users can reach (pytest's tmp_path is root-only)."""
    d = tempfile.mkdtemp(prefix="afuse-idmap-")
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(d)


def test_idmapped_mount(fuse_mount: MountFactory, userns_fd: int, target: str) -> None:
    fs = Recording()
    m = fuse_mount(fs, options="default_permissions,allow_other",
                   config=afuse.InitConfig(allow_idmap=True))
    assert m.session.has(afuse.InitFlag.ALLOW_IDMAP)
    with open(m.join("by-root"), "w") as f:
        f.write("x")
    assert os.stat(m.join("by-root")).st_uid == 0
    # Even on the plain mount only creating requests carry ids once ALLOW_IDMAP is negotiated.
    assert ("create", 0, 0, True) in fs.seen
    assert any(op == "getattr" and not has for op, _u, _g, has in fs.seen)
    with idmapped(m.path, target, userns_fd):
        # Existing files show their owner mapped: fs uid 0 is 10000 through the idmapped mount.
        st = os.stat(os.path.join(target, "by-root"))
        assert (st.st_uid, st.st_gid) == (BASE, BASE)
        assert os.stat(m.join("by-root")).st_uid == 0
        # Root's ids have no mapping into the filesystem's view: EOVERFLOW, the fs is not asked.
        fs.seen.clear()
        with pytest.raises(OSError) as e:
            open(os.path.join(target, "by-root-2"), "w").close()
        assert e.value.errno == errno.EOVERFLOW
        assert not [s for s in fs.seen if s[0] == "create"]
        # A mapped caller creates as its id in the filesystem's view.
        fs.seen.clear()
        r = _as_user(BASE + 5, BASE + 7, "touch", os.path.join(target, "by-5"))
        assert r.returncode == 0, r.stderr
        r = _as_user(BASE + 5, BASE + 7, "mkdir", os.path.join(target, "dir-5"))
        assert r.returncode == 0, r.stderr
        assert ("create", 5, 7, True) in fs.seen
        assert ("mkdir", 5, 7, True) in fs.seen
        st = os.stat(m.join("by-5"))
        assert (st.st_uid, st.st_gid) == (5, 7)
        st = os.stat(os.path.join(target, "by-5"))
        assert (st.st_uid, st.st_gid) == (BASE + 5, BASE + 7)
        # Requests that create nothing carry no ids: the kernel did the permission checks.
        others = [s for s in fs.seen if s[0] not in ("create", "mkdir")]
        assert others and all(u == g == INVALID_UIDGID and not has for _op, u, g, has in others)
        # chown through the idmapped mount: SETATTR's new owner is in the filesystem's view.
        os.chown(os.path.join(target, "by-root"), BASE + 3, BASE + 4)
        req = fs.last_setattr
        assert (req.new_uid, req.new_gid) == (3, 4)
        assert not req.has_ids
        assert os.stat(m.join("by-root")).st_uid == 3
