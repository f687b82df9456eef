"""Blocking locks: SETLKW and blocking flock on the passthrough filesystems wait in the host kernel.

Both the node loopback (``afuse.examples.passthroughfs``) and the low-level passthrough
(``afuse.examples.lowlevel_passthroughfs``) keep POSIX locks as OFD locks on the source files
and flock locks on their open files; a waiter waits in a worker thread that an INTERRUPT stops.
memfs (its own lock table, waiters granted in arrival order) must behave the same. Lock holders
and waiters are separate processes, as the kernel's lock owners are.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from afuse.examples import lowlevel_passthroughfs
from afuse.examples.memfs import MemFS
from afuse.examples.passthroughfs import PassthroughFS
from afuse.pytest_plugin import fuse_unavailable_reason
from afuse.testing import MountedFS, mounted

pytestmark = pytest.mark.skipif(fuse_unavailable_reason() is not None or os.geteuid() != 0,
                                reason="needs root and /dev/fuse")

#: A child taking a lock and then obeying lines on stdin:
#: "unlock" (release), "lock" (take it again, blocking), "exit". It says what it did on stdout.
CHILD = textwrap.dedent("""
    import fcntl, os, sys
    path, kind, start, length = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    fd = os.open(path, os.O_RDWR)
    def lock(blocking=True):
        if kind == "posix":
            fcntl.lockf(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB), length, start)
        else:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    def unlock():
        if kind == "posix":
            fcntl.lockf(fd, fcntl.LOCK_UN, length, start)
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
    try:
        lock()
        print("locked", flush=True)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    except OSError as e:
        print("error", e.errno, flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "unlock":
            unlock()
            print("unlocked", flush=True)
        elif cmd[0] == "lock":
            try:
                lock()
                print("locked", flush=True)
            except OSError as e:
                print("error", e.errno, flush=True)
        elif cmd[0] == "trylock":
            try:
                lock(False)
                print("locked", flush=True)
            except OSError as e:
                print("error", e.errno, flush=True)
        else:
            break
""")


class Child:
    """A lock-taking child process (see CHILD)."""

    def __init__(self, script: str, path: str, kind: str, start: int = 0, length: int = 10) -> None:
        self.proc = subprocess.Popen([sys.executable, script, path, kind, str(start), str(length)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def said(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def tell(self, cmd: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.said()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


Spawn = Callable[..., Child]


@pytest.fixture(params=["nodes", "lowlevel", "memfs"])
def fs(request: pytest.FixtureRequest) -> Iterator[tuple[MountedFS, str]]:
    """A mounted passthrough (node loopback, or the low-level one) of a fresh directory, or a
    memfs (its own lock table, the same behaviour): (mount, base)."""
    base = tempfile.mkdtemp(prefix="afuse-locks-", dir="/tmp")
    src = os.path.join(base, "src")
    os.mkdir(src)
    ops: Any
    if request.param == "nodes":
        ops = PassthroughFS(src)
    elif request.param == "lowlevel":
        ops = lowlevel_passthroughfs.PassthroughFS(src)
    else:
        ops = MemFS()
    try:
        with mounted(ops) as m:
            with open(m.join("f"), "wb") as f:
                f.write(b"x" * 100)
            yield m, base
    finally:
        if request.param == "nodes":
            ops.close()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def spawn(fs: tuple[MountedFS, str]) -> Iterator[Spawn]:
    script = os.path.join(fs[1], "child.py")
    with open(script, "w") as f:
        f.write(CHILD)
    children: list[Child] = []

    def start(path: str, kind: str, start: int = 0, length: int = 10) -> Child:
        c = Child(script, path, kind, start, length)
        children.append(c)
        return c

    yield start
    for c in children:
        c.kill()


def blocked(m: MountedFS) -> int:
    """How many requests the daemon is waiting on (handlers that blocked)."""
    return len(m.session.pool.blocked)


def wait_until(cond: Callable[[], bool], what: str, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.01)


def probe(path: str, kind: str, start: int = 0, length: int = 10) -> int:
    """Try a non-blocking exclusive lock from this process: 0 if granted (then released), else errno."""
    fd = os.open(path, os.O_RDWR)
    try:
        if kind == "posix":
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, length, start)
        else:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return 0
    except OSError as e:
        return e.errno or -1
    finally:
        os.close(fd)  # drops a POSIX lock and the flock lock of this open file


@pytest.mark.parametrize("kind", ["posix", "flock"])
def test_waiter_gets_the_lock_when_released(fs: tuple[MountedFS, str], spawn: Spawn, kind: str) -> None:
    m, _ = fs
    holder = spawn(m.join("f"), kind)
    assert holder.said() == "locked"
    waiter = spawn(m.join("f"), kind)
    wait_until(lambda: blocked(m) == 1, "the waiter's SETLKW reaches the daemon and waits")
    assert probe(m.join("f"), kind) in (errno.EAGAIN, errno.EACCES)
    assert holder.tell("unlock") == "unlocked"
    assert waiter.said() == "locked"  # handed over by the host kernel
    assert blocked(m) == 0
    assert probe(m.join("f"), kind) in (errno.EAGAIN, errno.EACCES)
    assert holder.tell("trylock") == f"error {errno.EAGAIN}"
    assert waiter.tell("unlock") == "unlocked"
    assert holder.tell("trylock") == "locked"


@pytest.mark.parametrize("kind", ["posix", "flock"])
def test_interrupted_waiter_is_not_granted_the_lock(fs: tuple[MountedFS, str], spawn: Spawn, kind: str) -> None:
    m, _ = fs
    holder = spawn(m.join("f"), kind)
    assert holder.said() == "locked"
    waiter = spawn(m.join("f"), kind)
    wait_until(lambda: blocked(m) == 1, "the waiter waits in the daemon")
    waiter.proc.send_signal(signal.SIGINT)  # the kernel sends INTERRUPT; the waiter's call fails
    assert waiter.said() == "interrupted"
    wait_until(lambda: blocked(m) == 0, "the daemon stops waiting")
    assert holder.tell("unlock") == "unlocked"
    # The interrupted waiter, still alive, did not get the lock: someone else gets it at once.
    assert probe(m.join("f"), kind) == 0
    assert waiter.tell("trylock") == "locked"  # and it can still lock normally


def test_sigkilled_waiter_leaves_no_lock(fs: tuple[MountedFS, str], spawn: Spawn) -> None:
    m, _ = fs
    holder = spawn(m.join("f"), "posix")
    assert holder.said() == "locked"
    waiter = spawn(m.join("f"), "posix")
    wait_until(lambda: blocked(m) == 1, "the waiter waits in the daemon")
    waiter.kill()
    wait_until(lambda: blocked(m) == 0, "the daemon stops waiting")
    assert holder.tell("unlock") == "unlocked"
    assert probe(m.join("f"), "posix") == 0


def test_posix_owners_do_not_merge(fs: tuple[MountedFS, str], spawn: Spawn) -> None:
    m, _ = fs
    a = spawn(m.join("f"), "posix", 0, 10)
    assert a.said() == "locked"
    b = spawn(m.join("f"), "posix", 10, 10)  # adjacent: would merge if one owner
    assert b.said() == "locked"
    assert a.tell("unlock") == "unlocked"
    assert probe(m.join("f"), "posix", 0, 10) == 0
    assert probe(m.join("f"), "posix", 10, 10) == errno.EAGAIN


CYCLE = textwrap.dedent("""
    import fcntl, os, sys
    fd = os.open(sys.argv[1], os.O_RDWR)
    fcntl.lockf(fd, fcntl.LOCK_EX, 10, int(sys.argv[2]))
    print("locked", flush=True)
    sys.stdin.readline()
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX, 10, int(sys.argv[3]))
        print("locked", flush=True)
    except OSError as e:
        print("error", e.errno, flush=True)
    sys.stdin.readline()
""")


def test_deadlock_is_refused(fs: tuple[MountedFS, str]) -> None:
    """Two owners each waiting for the other: the second to wait gets EDEADLK, as POSIX locks do."""
    m, _ = fs
    p = [subprocess.Popen([sys.executable, "-c", CYCLE, m.join("f"), str(mine), str(other)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) for mine, other in ((0, 10), (10, 0))]

    def tell(q: subprocess.Popen[str]) -> None:
        assert q.stdin is not None
        q.stdin.write("\n")
        q.stdin.flush()

    def said(q: subprocess.Popen[str]) -> str:
        assert q.stdout is not None
        return q.stdout.readline().strip()

    try:
        assert [said(q) for q in p] == ["locked", "locked"]
        tell(p[0])  # p0 waits for p1's range
        wait_until(lambda: blocked(m) == 1, "p0 waits")
        tell(p[1])  # p1 asks for p0's range: a cycle
        assert said(p[1]) == f"error {errno.EDEADLK}"
        tell(p[1])  # p1 exits: its lock goes, p0 gets it
        assert said(p[0]) == "locked"
    finally:
        for q in p:
            q.kill()
            q.wait()


def test_no_waiter_starves(fs: tuple[MountedFS, str], spawn: Spawn) -> None:
    """A waiter gets the lock while another process keeps taking and releasing it in a loop."""
    m, base = fs
    log = os.path.join(base, "log")
    hammer = textwrap.dedent(f"""
        import fcntl, os
        fd = os.open({m.join("f")!r}, os.O_RDWR)
        log = os.open({log!r}, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        fcntl.lockf(fd, fcntl.LOCK_EX, 10, 0)
        print("locked", flush=True)
        input()
        for i in range(2000):
            os.write(log, b"h")
            fcntl.lockf(fd, fcntl.LOCK_UN, 10, 0)
            fcntl.lockf(fd, fcntl.LOCK_EX, 10, 0)
        print("done", flush=True)
    """)
    h = subprocess.Popen([sys.executable, "-c", hammer], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert h.stdout is not None and h.stdin is not None
        assert h.stdout.readline().strip() == "locked"
        waiter = spawn(m.join("f"), "posix")
        wait_until(lambda: blocked(m) == 1, "the waiter waits")
        h.stdin.write("\n")
        h.stdin.flush()
        assert waiter.said() == "locked"
        with open(log, "ab") as f:
            f.write(b"W")
        waiter.tell("unlock")
        assert h.stdout.readline().strip() == "done"
        with open(log, "rb") as f:
            order = f.read()
        assert b"W" in order and order.index(b"W") < 2000, order.count(b"h")  # before the hammer finished
    finally:
        h.kill()
        h.wait()
