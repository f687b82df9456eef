"""pytest fixtures for afuse (registered through the ``pytest11`` entry point).

* ``fuse_mount(ops, **kw)`` — mount in a background thread for this test (see
  :func:`afuse.testing.mounted`); returns a :class:`~afuse.testing.MountedFS`.
* ``fuse_mount_asyncio(ops, **kw)`` — the same for asyncio handlers (see
  :func:`afuse.testing.asyncio_mounted`).
* ``fuse_mount_process("module:factory", args, options=...)`` — mount in a child process.
* ``fuse_available`` — skips the test with a reason when /dev/fuse cannot be used here.

Every mount is unmounted at teardown; handler exceptions are re-raised there. For trio tests use
``async with afuse.testing.trio_mount(ops) as session`` directly.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from .operations import Operations
from .testing import (
    MountedFS,
    MountedProcess,
    MountFactory,
    ProcessMountFactory,
    asyncio_mounted,
    mounted,
    mounted_process,
)


def fuse_unavailable_reason() -> str | None:
    """Why FUSE mounts cannot be tested here, or None if they can."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist (load the fuse module)"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not readable and writable by this user"
    if os.geteuid() != 0 and not any(
        os.access(os.path.join(p, "fusermount3"), os.X_OK) for p in os.environ.get("PATH", "").split(":")
    ):
        return "not root and no fusermount3 on PATH"
    return None


@pytest.fixture
def fuse_available() -> None:
    """Skip (with the reason) where FUSE cannot be mounted."""
    reason = fuse_unavailable_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def fuse_mount(fuse_available: None) -> Iterator[MountFactory]:
    """Factory: ``fuse_mount(ops, options=..., config=...)`` mounts for the rest of the test."""
    with contextlib.ExitStack() as stack:
        def make(ops: Operations, **kwargs: Any) -> MountedFS:
            return stack.enter_context(mounted(ops, **kwargs))

        yield make


@pytest.fixture
def fuse_mount_asyncio(fuse_available: None) -> Iterator[Callable[..., MountedFS]]:
    """Factory: ``fuse_mount_asyncio(ops, options=...)`` serves asyncio handlers for the rest of the test."""
    with contextlib.ExitStack() as stack:
        def make(ops: Operations, **kwargs: Any) -> MountedFS:
            return stack.enter_context(asyncio_mounted(ops, **kwargs))

        yield make


@pytest.fixture
def fuse_mount_process(fuse_available: None) -> Iterator[ProcessMountFactory]:
    """Factory: ``fuse_mount_process("pkg.mod:Factory", ["arg"], options="...")``."""
    with contextlib.ExitStack() as stack:
        def make(factory: str, args: Sequence[str] = (), **kwargs: Any) -> MountedProcess:
            return stack.enter_context(mounted_process(factory, args, **kwargs))

        yield make
