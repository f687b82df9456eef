"""Suite-wide guard: no mount made by this test session may outlive it.

Only mounts of this process's own making are considered (mountpoints created by afuse.testing
and anything under this session's pytest basetemp), so concurrent test runs don't interfere.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from afuse import device, testing, uring


def _ours(basetemp: str) -> set[str]:
    return {
        mp for mp, _t, _s in device.find_mounts()
        if mp in testing.created_mountpoints or mp.startswith(basetemp + os.sep)
    }


@pytest.fixture(scope="session", autouse=True)
def no_mount_left_behind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    basetemp = os.path.realpath(tmp_path_factory.getbasetemp())
    yield
    left = _ours(basetemp)
    for mp in left:
        device.unmount(mp, lazy=True)
    assert not left, f"mounts left behind: {sorted(left)}"


@pytest.fixture(scope="session", autouse=True)
def enable_uring_for_suite() -> Iterator[None]:
    """With AFUSE_TEST_IO_URING=1 every mount is served over io_uring (afuse.testing): turn the
    fuse module's enable_uring on for the run and restore it afterwards."""
    if os.environ.get(testing.TRANSPORT_ENV) != "1":
        yield
        return
    with uring.uring_parameter(True):
        yield
