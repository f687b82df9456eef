"""A daemon dies with a request in flight; another takes over the kept descriptors and answers it."""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

import pytest
import trio

import afuse
from afuse import notify
from afuse.examples.hello import FILE_ID, HelloFS


def close_all(fds: list[int]) -> None:
    """Close kept descriptors: the last close aborts the connection, so no caller stays stuck."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class SlowFirst(HelloFS):
    """Looking up "slow" blocks forever (this daemon 'crashes' while it waits)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = trio.Event()

    async def lookup(self, req: afuse.LookupRequest) -> afuse.Entry:
        if req.name == b"slow":
            self.entered.set()
            await trio.sleep_forever()
        return await super().lookup(req)


class Replacement(HelloFS):
    def __init__(self) -> None:
        super().__init__()
        self.resent: list[afuse.LookupRequest] = []

    async def lookup(self, req: afuse.LookupRequest) -> afuse.Entry:
        if req.name == b"slow":
            self.resent.append(req)
            return afuse.Entry(FILE_ID, self._file)
        return await super().lookup(req)


@pytest.mark.trio
async def test_takeover_resends_request_in_flight(tmp_path: Path) -> None:
    mp = str(tmp_path / "mnt")
    os.mkdir(mp)
    first = SlowFirst()
    result: dict[str, object] = {}

    def client() -> None:
        try:
            result["st"] = os.stat(os.path.join(mp, "slow"))
        except OSError as e:
            result["err"] = e

    kept: list[int] = []
    try:
        async with trio.open_nursery() as outer:
            session = await outer.start(lambda task_status: afuse.serve(
                first, mp, readers=2, unmount=False, private_clones=False, task_status=task_status))
            kept = [os.dup(fd) for fd in session.reader_fds]
            neg = session.negotiated
            thread = threading.Thread(target=client, daemon=True)
            thread.start()
            with trio.fail_after(10):
                await first.entered.wait()
            outer.cancel_scope.cancel()  # the first daemon dies without answering
        assert session.closed and "st" not in result and "err" not in result
        assert neg is not None

        second = Replacement()
        takeover = afuse.session.Takeover(kept[0], neg, kept[1:])
        async with trio.open_nursery() as outer:
            session2 = await outer.start(lambda task_status: afuse.serve(
                second, mp, takeover=takeover, task_status=task_status))
            kept = []  # the second session owns them now
            with trio.fail_after(10):
                while thread.is_alive():
                    await trio.sleep(0.01)
            assert "st" in result, result
            assert second.resent and second.resent[0].is_resend
            assert second.resent[0].request_id == second.resent[0].unique & ~(1 << 63)
            # and it keeps serving
            data = await trio.Path(mp, "hello").read_bytes()
            assert data.startswith(b"Hello")
            await notify.inc_epoch(session2)
            outer.cancel_scope.cancel()
    finally:
        close_all(kept)
    assert os.path.realpath(mp) not in [m[0] for m in afuse.device.find_mounts()]


@pytest.mark.trio
async def test_drain_finishes_in_flight_and_keeps_mount(tmp_path: Path) -> None:
    mp = str(tmp_path / "mnt")
    os.mkdir(mp)
    gate = trio.Event()

    class Gated(HelloFS):
        entered = trio.Event()

        async def lookup(self, req: afuse.LookupRequest) -> afuse.Entry:
            if req.name == b"slow":
                self.entered.set()
                await gate.wait()
                return afuse.Entry(FILE_ID, self._file)
            return await super().lookup(req)

    ops = Gated()
    result: dict[str, object] = {}

    def client() -> None:
        result["st"] = os.stat(os.path.join(mp, "slow"))

    kept: list[int] = []
    try:
        async with trio.open_nursery() as outer:
            session = await outer.start(lambda task_status: afuse.serve(
                ops, mp, unmount=False, private_clones=False, task_status=task_status))
            kept = [os.dup(fd) for fd in session.reader_fds]
            thread = threading.Thread(target=client, daemon=True)
            thread.start()
            with trio.fail_after(10):
                await ops.entered.wait()
            async with trio.open_nursery() as n:
                n.start_soon(session.drain)
                await trio.sleep(0.1)
                assert not session.closed  # waits for the request in flight
                gate.set()
            assert session.closed
        await trio.to_thread.run_sync(thread.join, 10)
        assert "st" in result
        assert session.negotiated is not None
        # the mount is still there; a successor serves it with nothing to replay
        second = Replacement()
        takeover = afuse.session.Takeover(kept[0], session.negotiated, kept[1:], resend=False)
        async with trio.open_nursery() as outer:
            await outer.start(lambda task_status: afuse.serve(second, mp, takeover=takeover, task_status=task_status))
            kept = []
            assert await trio.to_thread.run_sync(os.listdir, mp) == ["hello"]
            outer.cancel_scope.cancel()
        assert not second.resent
    finally:
        close_all(kept)
