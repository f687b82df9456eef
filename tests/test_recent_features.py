"""Protocol 7.3x-7.45 features a filesystem can observe: STATX, request extensions,
HANDLE_KILLPRIV_V2 flags and request timeouts, through a real mount.

Observed on 6.18 and asserted below:

* STATX (7.39): the kernel sends it only when the caller asks for more than the basic stats
  (e.g. STATX_BTIME) and has nothing cached; it then always asks for STATX_BASIC_STATS |
  STATX_BTIME (0xfff), whatever subset the caller named. Basic-only statx(2) is a GETATTR.
* FUSE_CREATE_SUPP_GROUP (7.38): a creating request by a caller whose fsgid differs from the
  parent directory's gid but who is a member of that group carries ``supp_groups`` = [that gid];
  otherwise None.
* FUSE_SECURITY_CTX (7.36): with no LSM providing contexts the kernel sends an empty security
  context header on every creating request: ``security_context == []`` (None when not negotiated).
* FUSE_HANDLE_KILLPRIV_V2 (7.33): a write by a caller without CAP_FSETID carries
  WRITE_KILL_SUIDGID; chown of a non-directory carries FATTR_KILL_SUIDGID (``kill_suidgid``);
  an O_TRUNC open without CAP_FSETID carries FUSE_OPEN_KILL_SUIDGID. The filesystem is then the
  one to clear the bits.
* FUSE_REQUEST_TIMEOUT (7.43): the kernel raises any timeout below 15 s to 15 s (its check
  interval) and, with fs.fuse.max_request_timeout = 0, takes the daemon's value otherwise; a
  request unanswered that long aborts the connection (ECONNABORTED with ABORT_ERROR).
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
import struct
import subprocess
import time

import pytest
import trio

import afuse
from afuse import testing
from afuse.examples.memfs import MemFS, MNode
from afuse.pytest_plugin import fuse_unavailable_reason
from afuse.testing import MountFactory
from afuse.wire.constants import WRITE_KILL_SUIDGID

pytestmark = [
    pytest.mark.skipif(fuse_unavailable_reason() is not None, reason=str(fuse_unavailable_reason())),
    pytest.mark.timeout(60),
]
needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                reason="needs root and setpriv(1) to act as other users")

_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
AT_STATX_FORCE_SYNC = 0x2000
STATX_BASIC_STATS = 0x7FF
STATX_MODE = 0x2
STATX_BTIME = 0x800
USER, GROUP, OTHER_USER = 1000, 2000, 1001


def statx(path: str, mask: int, flags: int = 0) -> tuple[int, int, int]:
    """statx(2): (stx_mask, stx_btime.tv_sec, stx_btime.tv_nsec)."""
    buf = ctypes.create_string_buffer(256)
    if _libc.statx(AT_FDCWD, os.fsencode(path), flags, mask, buf) < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), path)
    (got,) = struct.unpack_from("<I", buf, 0)
    sec, nsec = struct.unpack_from("<qI", buf, 0x50)
    return got, sec, nsec


def as_user(uid: int, gid: int, groups: list[int], *cmd: str) -> None:
    g = [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
    r = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", *g, *cmd],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr


class Recording(MemFS):
    """memfs recording the requests these tests look at."""

    def __init__(self) -> None:
        super().__init__(mode=0o777)
        self.statx_masks: list[int] = []
        self.created: dict[bytes, afuse.CreateRequest | afuse.MkdirRequest] = {}
        self.writes: list[afuse.WriteRequest] = []
        self.setattrs: list[afuse.SetattrRequest] = []
        self.opens: list[afuse.OpenRequest] = []

    async def statx(self, req: afuse.StatxRequest) -> afuse.Statx:
        self.statx_masks.append(req.mask)
        return await super().statx(req)

    async def create(self, req: afuse.CreateRequest) -> tuple[afuse.Entry, afuse.Handle]:
        self.created[req.name] = req
        return await super().create(req)

    async def mkdir(self, req: afuse.MkdirRequest) -> afuse.Entry:
        self.created[req.name] = req
        return await super().mkdir(req)

    async def write(self, req: afuse.WriteRequest) -> int:
        self.writes.append(req)
        return await super().write(req)

    async def setattr(self, req: afuse.SetattrRequest) -> afuse.Attr:
        self.setattrs.append(req)
        return await super().setattr(req)

    async def open(self, req: afuse.OpenRequest) -> afuse.Handle:
        self.opens.append(req)
        return await super().open(req)


def test_statx_mask_and_btime(fuse_mount: MountFactory) -> None:
    fs = Recording()
    m = fuse_mount(fs)
    p = m.join("f")
    open(p, "w").close()
    node = fs.node(os.stat(p).st_ino)
    assert isinstance(node, MNode)
    fs.statx_masks.clear()
    # Basic stats only: answered by GETATTR (or the cache), no STATX.
    got, _, _ = statx(p, STATX_BASIC_STATS, AT_STATX_FORCE_SYNC)
    assert got & STATX_BASIC_STATS == STATX_BASIC_STATS and not got & STATX_BTIME
    assert fs.statx_masks == []
    # Asking for the birth time sends STATX, with the kernel's fixed mask.
    got, sec, nsec = statx(p, STATX_BTIME | STATX_MODE, AT_STATX_FORCE_SYNC)
    assert fs.statx_masks == [STATX_BASIC_STATS | STATX_BTIME]
    assert got & STATX_BTIME
    assert sec * 1_000_000_000 + nsec == node.btime


@needs_root
def test_supp_groups_and_security_context(fuse_mount: MountFactory) -> None:
    fs = Recording()
    m = fuse_mount(fs, options="allow_other",
                   config=afuse.InitConfig(security_ctx=True, create_supp_group=True))
    assert m.session.has(afuse.InitFlag.CREATE_SUPP_GROUP) and m.session.has(afuse.InitFlag.SECURITY_CTX)
    d = m.join("g")
    os.mkdir(d)
    os.chown(d, 0, GROUP)
    os.chmod(d, 0o777)  # no setgid bit: new files would get the caller's fsgid
    as_user(USER, USER, [GROUP], "touch", os.path.join(d, "member"))
    as_user(USER, USER, [GROUP], "mkdir", os.path.join(d, "member-dir"))
    as_user(USER, GROUP, [], "touch", os.path.join(d, "same-gid"))
    as_user(USER, USER, [], "touch", os.path.join(d, "outsider"))
    c = fs.created
    assert c[b"member"].supp_groups == [GROUP]
    assert c[b"member-dir"].supp_groups == [GROUP]
    assert c[b"same-gid"].supp_groups is None
    assert c[b"outsider"].supp_groups is None
    # No LSM here supplies a context: the header comes with nr_secctx = 0.
    assert all(req.security_context == [] for req in c.values())


def test_extensions_absent_unless_negotiated(fuse_mount: MountFactory) -> None:
    fs = Recording()
    m = fuse_mount(fs)
    assert not m.session.has(afuse.InitFlag.SECURITY_CTX)
    open(m.join("f"), "w").close()
    req = fs.created[b"f"]
    assert req.security_context is None and req.supp_groups is None


@needs_root
@pytest.mark.parametrize("v2", [True, False])
def test_handle_killpriv_v2(fuse_mount: MountFactory, v2: bool) -> None:
    fs = Recording()
    m = fuse_mount(fs, options="allow_other", config=afuse.InitConfig(handle_killpriv_v2=v2))
    assert m.session.has(afuse.InitFlag.HANDLE_KILLPRIV_V2) == v2
    p = m.join("suid")
    with open(p, "w") as f:
        f.write("abc")
    os.chown(p, USER, USER)
    os.chmod(p, 0o6777)
    fs.writes.clear()
    fs.setattrs.clear()
    # A write by someone else, without CAP_FSETID.
    as_user(OTHER_USER, OTHER_USER, [], "sh", "-c", f"echo hi >> {p}")
    assert fs.writes and all(bool(w.write_flags & WRITE_KILL_SUIDGID) == v2 for w in fs.writes)
    if not v2:
        # The kernel clears the bits itself, with a SETATTR of the mode.
        assert any(s.mode is not None for s in fs.setattrs)
        assert not stat.S_IMODE(os.stat(p).st_mode) & (stat.S_ISUID | stat.S_ISGID)
    # chown of a non-directory.
    os.chmod(p, 0o6777)
    fs.setattrs.clear()
    os.chown(p, OTHER_USER, OTHER_USER)
    chown = [s for s in fs.setattrs if s.new_uid is not None]
    assert chown and chown[0].kill_suidgid == v2
    # O_TRUNC open by a caller without CAP_FSETID.
    os.chown(p, USER, USER)
    os.chmod(p, 0o6777)
    fs.opens.clear()
    as_user(OTHER_USER, OTHER_USER, [], "sh", "-c", f"echo hi > {p}")
    trunc = [o for o in fs.opens if o.flags & os.O_TRUNC]
    assert trunc and trunc[0].kill_suidgid == v2


class BlockingFS(MemFS):
    """Looking up "block" never answers."""

    async def lookup(self, req: afuse.LookupRequest) -> afuse.Entry:
        if req.name == b"block":
            await trio.sleep_forever()
        return await super().lookup(req)


@pytest.mark.timeout(45)
def test_request_timeout_aborts_connection(fuse_available: None) -> None:
    """An unanswered request aborts the connection after the timeout (15 s, the kernel minimum)."""
    cfg = afuse.InitConfig(request_timeout=1)
    with testing.mounted(BlockingFS(), config=cfg, raise_handler_errors=False) as m:
        neg = m.session.negotiated
        assert neg is not None and neg.has(afuse.InitFlag.REQUEST_TIMEOUT) and neg.request_timeout == 1
        t0 = time.monotonic()
        with pytest.raises(OSError) as e:
            os.stat(m.join("block"))
        waited = time.monotonic() - t0
        assert e.value.errno == errno.ECONNABORTED  # ABORT_ERROR is negotiated by default
        assert 14 <= waited <= 35, waited
        deadline = time.monotonic() + 10
        while not m.session.closed:
            assert time.monotonic() < deadline, "the session did not notice the abort"
            time.sleep(0.05)
