"""Suite-wide guards: no afuse mount may outlive the test session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from afuse import device


def _afuse_mounts() -> list[str]:
    return [mp for mp, fstype, src in device.find_mounts() if "afuse" in mp or src.startswith("afuse")]


@pytest.fixture(scope="session", autouse=True)
def no_mount_left_behind() -> Iterator[None]:
    before = set(_afuse_mounts())
    yield
    left = set(_afuse_mounts()) - before
    for mp in left:
        device.unmount(mp, lazy=True)
    assert not left, f"mounts left behind: {sorted(left)}"
