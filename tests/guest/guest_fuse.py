"""afuse against an older kernel's FUSE: negotiating down, and the newer features refused clearly.

Runs inside a guest booted by ``tools/guest.py`` (Debian's 6.1: FUSE 7.38, 6.12: 7.41), next to
the core mount tests; ``tests/test_guest.py`` starts it. These are the counterparts of the core
tests that need a newer protocol than the guest's (the host test lists them): here the same
features are checked to be refused, or to fall back, as that kernel requires.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct

import pytest
import trio
from test_kernel_ops import (  # loop_device is a fixture
    FIBMAP,
    BlockFS,
    NarrowCopyFS,
    StatxFS,
    _check_libc,
    _copy_on,
    libc,
    loop_device,  # noqa: F401
)
from test_recent_features import AT_STATX_FORCE_SYNC, STATX_BASIC_STATS, STATX_BTIME, statx

import afuse
from afuse import notify, testing
from afuse.errors import NotNegotiated
from afuse.examples.hello import HelloFS
from afuse.wire import notify as wire_notify
from afuse.wire.constants import ROOT_ID
from afuse.wire.init import INFORMATIONAL

#: Kernel series -> the FUSE minor its INIT carries (measured: Debian bookworm 6.1, bookworm-backports 6.12).
KERNEL_MINORS = {"6.1": 38, "6.12": 41}


def series() -> str:
    release = os.uname().release
    for s in sorted(KERNEL_MINORS, key=len, reverse=True):
        if release.startswith(s + "."):
            return s
    pytest.fail(f"kernel {release} is not one of the guest kernels {sorted(KERNEL_MINORS)}")


@pytest.fixture
def minor() -> int:
    return KERNEL_MINORS[series()]


EVERYTHING = afuse.InitConfig(
    writeback_cache=False, export_support=True, handle_killpriv_v2=True, posix_acl=True, security_ctx=True,
    create_supp_group=True, direct_io_allow_mmap=True, request_timeout=30, explicit_inval_data=True)


def test_negotiates_down_to_this_kernel(minor: int) -> None:
    with testing.mounted(HelloFS(), config=EVERYTHING, options="default_permissions") as m:
        neg = m.session.negotiated
        assert neg is not None
        assert (neg.kernel_major, neg.kernel_minor, neg.minor) == (7, minor, minor)
        assert neg.flags & ~neg.offered == 0, "asked for something the kernel did not offer"
        wanted = m.session.dispatcher.wanted_flags(EVERYTHING)
        assert neg.refused == wanted & ~neg.offered & ~INFORMATIONAL
        assert neg.has(afuse.InitFlag.MAX_PAGES) and neg.max_write == 1 << 20
        if minor < 43:
            assert neg.refused & afuse.InitFlag.REQUEST_TIMEOUT and neg.request_timeout == 0
        with open(m.join("hello"), "rb") as f:  # and it serves
            assert f.read() == b"Hello, world!\n"


def test_notifications_newer_than_this_kernel(minor: int) -> None:
    """afuse refuses them before writing; the kernel itself answers EINVAL to unknown codes."""
    raw: dict[str, int] = {}

    async def probe(session: afuse.Session) -> None:
        with pytest.raises(NotNegotiated, match=rf"inc_epoch needs protocol 7\.44; negotiated 7\.{minor}"):
            await notify.inc_epoch(session)
        with pytest.raises(NotNegotiated, match=rf"prune needs protocol 7\.45; negotiated 7\.{minor}"):
            await notify.prune(session, [2])
        if minor >= 40:
            await notify.resend(session)  # nothing in flight: a no-op the kernel accepts
        else:
            with pytest.raises(NotNegotiated, match=r"resend needs protocol 7\.40"):
                await notify.resend(session)
        for what, msg in (("inc_epoch", wire_notify.inc_epoch()), ("prune", wire_notify.prune([2]))):
            try:
                await session.notify(msg)
                raw[what] = 0
            except OSError as e:
                raw[what] = e.errno or 0

    with testing.mounted(HelloFS()) as m:
        trio.run(probe, m.session)
    assert raw == {"inc_epoch": errno.EINVAL, "prune": errno.EINVAL}


def test_copy_file_range_uses_the_32_bit_opcode_only() -> None:
    """COPY_FILE_RANGE_64 is 7.45: older kernels send COPY_FILE_RANGE straight away."""
    ops = NarrowCopyFS()
    with testing.mounted(ops) as m:
        n, _data = _copy_on(m, 5000, 7, 0)
    assert n == 5000 and ops.copies == [(False, 5000)]  # never the 64-bit form first


def test_statx_only_where_offered(minor: int) -> None:
    """STATX (7.39): without it, statx(2) is answered from GETATTR and has no birth time."""
    ops = StatxFS()
    with testing.mounted(ops) as m:
        got, _sec, _nsec = statx(m.join("born"), STATX_BASIC_STATS | STATX_BTIME, AT_STATX_FORCE_SYNC)
    assert got & STATX_BASIC_STATS == STATX_BASIC_STATS
    if minor >= 39:
        assert ops.masks == [STATX_BASIC_STATS | STATX_BTIME] and got & STATX_BTIME
    else:
        assert ops.masks == [] and not got & STATX_BTIME


def test_root_is_served(minor: int) -> None:
    """The basic walk on this kernel: lookup, getattr, open, read, release."""
    with testing.mounted(HelloFS()) as m:
        assert sorted(os.listdir(m.path)) == ["hello"]
        assert os.stat(m.path).st_ino == ROOT_ID


def test_fuseblk_bmap_destroy_and_no_syncfs(fuse_available: None, loop_device: str) -> None:  # noqa: F811
    """fuseblk on this kernel: BMAP and DESTROY as on 6.18, but syncfs(2) sends no SYNCFS."""
    ops = BlockFS()
    with testing.mounted(ops, options=f"blockdev={loop_device},blksize=4096") as m:
        fd = os.open(m.join("data"), os.O_RDONLY)
        try:
            mapped = fcntl.ioctl(fd, FIBMAP, struct.pack("i", 3))
            assert struct.unpack("i", mapped)[0] == 106
            assert ops.bmaps == [(ops.file.ino, 3, 4096)]
            libc.syncfs.argtypes = [ctypes.c_int]
            _check_libc(libc.syncfs(fd), "syncfs")
            assert ops.syncfs_calls == 0
        finally:
            os.close(fd)
        assert not ops.destroyed
    assert ops.destroyed
