"""Locks survive failover (memfs, and passthroughfs, under the keeper): after a SIGKILL or a graceful upgrade, a held
POSIX lock and a held flock lock still keep others out, their holders' unlocks release them, and
a waiter blocked in SETLKW across the failover gets the lock when it is released."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from test_locks import CHILD, probe

from afuse import device
from afuse.pytest_plugin import fuse_unavailable_reason

pytestmark = pytest.mark.skipif(fuse_unavailable_reason() is not None or os.geteuid() != 0,
                                reason="needs root and /dev/fuse")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["sigkill", "upgrade"])
@pytest.mark.parametrize("fs", ["memfs", "passthroughfs"])
def test_locks_survive_failover(tmp_path: Path, fs: str, how: str) -> None:
    mnt, state, sock = tmp_path / "mnt", tmp_path / "state", str(tmp_path / "keeper.sock")
    src = tmp_path / "src"
    mnt.mkdir()
    src.mkdir()
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    py = sys.executable
    procs: list[subprocess.Popen[str]] = []

    def spawn(*args: str, **kw: Any) -> subprocess.Popen[str]:
        p = subprocess.Popen([py, *args], text=True, start_new_session=True, **kw)
        procs.append(p)
        return p

    def memfs(*extra: str) -> subprocess.Popen[str]:
        where = [str(mnt)] if fs == "memfs" else [str(src), str(mnt)]
        p = spawn("-m", f"afuse.examples.{fs}", *where, "--keeper", sock, "--state-dir", str(state), *extra,
                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        return p

    def child(path: Path, kind: str) -> subprocess.Popen[str]:
        return spawn(str(script), str(path), kind, "0", "10", stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def tell(p: subprocess.Popen[str], cmd: str) -> str:
        assert p.stdin is not None
        p.stdin.write(cmd + "\n")
        p.stdin.flush()
        return said(p)

    def said(p: subprocess.Popen[str]) -> str:
        assert p.stdout is not None
        return p.stdout.readline().strip()

    try:
        spawn("-m", "afuse.keeper", "--socket", sock, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not os.path.exists(sock) and time.monotonic() < deadline:
            time.sleep(0.05)
        first = memfs()
        f, g = mnt / "f", mnt / "g"
        f.write_bytes(b"x" * 100)
        g.write_bytes(b"")
        posix, flock = child(f, "posix"), child(g, "flock")
        assert said(posix) == "locked" and said(flock) == "locked"
        waiter = child(f, "posix")  # blocks in SETLKW
        time.sleep(0.5)
        assert probe(str(f), "posix") == errno.EAGAIN
        if how == "sigkill":
            first.kill()
            first.wait(10)
            memfs()
        else:
            memfs("--upgrade")
            first.wait(30)
        # after the failover: still held
        assert probe(str(f), "posix") == errno.EAGAIN
        assert probe(str(g), "flock") == errno.EWOULDBLOCK
        assert tell(posix, "trylock") == "locked"  # the holder still holds it (relocking its own lock)
        # the holder's unlock releases it, to the waiter blocked across the failover
        assert tell(posix, "unlock") == "unlocked"
        assert said(waiter) == "locked"
        assert probe(str(f), "posix") == errno.EAGAIN
        assert tell(waiter, "unlock") == "unlocked"
        assert probe(str(f), "posix") == 0
        assert tell(flock, "unlock") == "unlocked"
        assert probe(str(g), "flock") == 0
        for p in (posix, flock, waiter):
            tell(p, "exit")
        res = subprocess.run([py, "-m", "afuse.failover", "unmount", "--socket", sock, str(mnt)],
                             capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, res.stderr
    finally:
        for p in reversed(procs):  # daemons and keeper too: a client stuck on the mount is freed
            if p.poll() is None:
                p.kill()
        if str(mnt) in [m for m, _t, _s in device.find_mounts()]:
            device.unmount(str(mnt), lazy=True)
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)


