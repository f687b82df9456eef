"""Every readdir style of readdir_styles.py (the ones mypy accepts) serves real listings.

300 files need several replies both for READDIR (40 bytes an entry) and READDIRPLUS (about 150),
so each style is also stopped mid-listing and resumed from a cookie.
"""

from __future__ import annotations

import os

import pytest
import trio
from readdir_styles import STYLES, ListingFS

import afuse
import afuse.notify
from afuse import testing
from afuse.testing import MountFactory

COUNT = 300
NAMES = sorted(f"file-{i:04d}" for i in range(COUNT))

READDIR_ONLY = afuse.InitConfig(readdirplus=False)
READDIRPLUS_ONLY = afuse.InitConfig(readdirplus_auto=False)


@pytest.mark.parametrize("style", STYLES, ids=lambda style: style.__name__)
def test_readdir(fuse_mount: MountFactory, style: type[ListingFS]) -> None:
    fs = style(COUNT)
    m = fuse_mount(fs, config=READDIR_ONLY)
    assert not m.session.has(afuse.InitFlag.DO_READDIRPLUS)
    assert sorted(os.listdir(m.path)) == NAMES
    assert sorted(e.name for e in os.scandir(m.path) if e.is_file(follow_symlinks=False)) == NAMES
    assert fs.lookup_requests == 0  # the type came with the entry
    assert os.stat(m.join(NAMES[-1])).st_ino == fs.nodeids[NAMES[-1].encode()]
    assert fs.lookup_requests == 1


@pytest.mark.parametrize("style", STYLES, ids=lambda style: style.__name__)
def test_readdirplus_fills_the_dentry_cache(fuse_mount: MountFactory, style: type[ListingFS]) -> None:
    fs = style(COUNT)
    m = fuse_mount(fs, config=READDIRPLUS_ONLY)
    assert m.session.has(afuse.InitFlag.DO_READDIRPLUS)
    assert sorted(os.listdir(m.path)) == NAMES
    for name in NAMES:
        assert os.stat(m.join(name)).st_ino == fs.nodeids[name.encode()]
    assert fs.lookup_requests == 0  # every name and its attributes came with the listing


@pytest.mark.trio
@pytest.mark.parametrize("style", STYLES, ids=lambda style: style.__name__)
async def test_readdirplus_counts_exactly_the_entries_taken(style: type[ListingFS]) -> None:
    """Each entry the kernel took counts one lookup; prune makes it forget them all: 0 again."""
    fs = style(COUNT)
    async with testing.trio_mount(fs, config=READDIRPLUS_ONLY) as session:
        assert session.negotiated is not None and session.negotiated.minor >= 45  # prune
        assert sorted(await trio.to_thread.run_sync(os.listdir, session.mountpoint)) == NAMES
        assert sorted(fs.lookups) == sorted(fs.files)
        assert all(n >= 1 for n in fs.lookups.values())
        await afuse.notify.prune(session, list(fs.files))
        with trio.fail_after(10):  # over-counted: some stay above 0
            while any(n > 0 for n in fs.lookups.values()):
                await trio.sleep(0.01)
        assert all(n == 0 for n in fs.lookups.values())  # under-counted: some went below 0
