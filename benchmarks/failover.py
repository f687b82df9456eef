#!/usr/bin/env python3
"""Failover benchmark: applications keep working while their filesystem daemon dies and is upgraded.

    python benchmarks/failover.py [--fs failoverfs,memfs] [--data-gib 1] [--kills 10] [--upgrades 10]
                                  [--cold-kills N] [--duration 40] [--quick] [--json FILE]

For each filesystem (failoverfs: passthroughfs with failover on, mirroring a temporary directory;
memfs with its content store in the state directory), a keeper holds the /dev/fuse descriptors and
the daemon runs the documented way (``--keeper SOCKET --state-dir DIR``: a warm standby waits at the
keeper by default). ``--data-gib`` GiB are written through the mount first (64 MiB files, verified
at the end). Then, for ``--duration`` seconds per phase, these client processes run:

* ``--apps`` verifying applications: O_EXCL creates, reads compared with a model, stat, readdir,
  renames, unlinks, overwrites, pwrite/pread on a file held open across failovers;
* a prober stat-ing a fresh name every 5 ms (its longest stall around each failover is reported);
* a lock holder with a POSIX (fcntl) lock and a flock on two files, and a second process probing
  both with non-blocking requests every 20 ms: a granted probe is a *lock violation*;
* a writer with a 64 MiB write(2) in flight most of the time (written, read back, compared).

Phases: ``kill`` (SIGKILL of the serving daemon ``--kills`` times; the warm standby takes over; the
harness waits for a new standby before the next kill), ``upgrade`` (a new daemon with ``--upgrade``,
``--upgrades`` times), and ``cold`` (the baseline: daemons with ``--no-standby``, a new daemon
started right after each kill, ``--cold-kills`` times). Reported per phase: failovers completed,
kill (or drain) -> first request served by the successor (median, worst; from the daemons' event
logs), the prober's longest stall, resent requests, application errors, wrong bytes, lock
violations, the load average during the phase. Exit status 0 only if every failover completed with
no application error and no wrong byte (lock violations are reported, and fail with ``--strict-locks``).

``--role NAME ...`` runs one of the client processes (used by the script).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

REPO = os.path.dirname(os.path.abspath(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from afuse.testing import wait_for_line  # noqa: E402  (after the path, so a plain checkout works)

MIB = 1 << 20


# -- the application ------------------------------------------------------------------------------


def app(root: str, duration: float, seed: int, out: str) -> int:
    """The verifying workload; writes a JSON summary to ``out``."""
    rng = random.Random(seed)
    d = os.path.join(root, f"app{seed}")
    os.makedirs(d, exist_ok=True)
    model: dict[str, bytes] = {}
    held_path = os.path.join(d, "held")
    held_data = bytearray(rng.randbytes(65536))
    with open(held_path, "wb") as f:
        f.write(held_data)
    held = os.open(held_path, os.O_RDWR)
    errors: list[str] = []
    mismatches: list[str] = []
    counts: dict[str, int] = {}
    worst = 0.0
    n = 0
    end = time.monotonic() + duration
    ops = ["create", "create", "read", "read", "stat", "readdir", "rename", "unlink", "overwrite", "held", "held"]
    while time.monotonic() < end:
        op = rng.choice(ops)
        if not model and op not in ("create", "held", "readdir"):
            op = "create"
        if len(model) > 150 and op == "create":
            op = "unlink"
        t0 = time.monotonic()
        try:
            if op == "create":
                n += 1
                name = f"f{n}"
                data = rng.randbytes(rng.choice((0, 100, 4096, 20000, 70000)))
                fd = os.open(os.path.join(d, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                finally:
                    os.close(fd)
                model[name] = data
            elif op == "read":
                name = rng.choice(sorted(model))
                with open(os.path.join(d, name), "rb") as f:
                    got = f.read()
                if got != model[name]:
                    mismatches.append(f"read {name}: {len(got)} bytes, expected {len(model[name])}")
            elif op == "stat":
                name = rng.choice(sorted(model))
                st = os.stat(os.path.join(d, name))
                if st.st_size != len(model[name]):
                    mismatches.append(f"stat {name}: size {st.st_size}, expected {len(model[name])}")
            elif op == "readdir":
                names = set(os.listdir(d))
                if names != set(model) | {"held"}:
                    mismatches.append(f"readdir: {len(names ^ (set(model) | {'held'}))} names differ")
            elif op == "rename":
                name = rng.choice(sorted(model))
                n += 1
                new = f"r{n}"
                os.rename(os.path.join(d, name), os.path.join(d, new))
                model[new] = model.pop(name)
            elif op == "unlink":
                name = rng.choice(sorted(model))
                os.unlink(os.path.join(d, name))
                del model[name]
            elif op == "overwrite":
                name = rng.choice(sorted(model))
                data = bytearray(model[name])
                off = rng.randrange(0, len(data) + 1)
                chunk = rng.randbytes(rng.choice((1, 512, 5000)))
                fd = os.open(os.path.join(d, name), os.O_WRONLY)
                try:
                    os.pwrite(fd, chunk, off)
                finally:
                    os.close(fd)
                data[off:off + len(chunk)] = chunk
                model[name] = bytes(data)
            elif op == "held":
                off = rng.randrange(0, len(held_data) - 4096)
                chunk = rng.randbytes(rng.randrange(1, 4096))
                if os.pwrite(held, chunk, off) != len(chunk):
                    mismatches.append("held: short write")
                held_data[off:off + len(chunk)] = chunk
                off2 = rng.randrange(0, len(held_data) - 8192)
                got = os.pread(held, 8192, off2)
                if got != held_data[off2:off2 + 8192]:
                    mismatches.append(f"held: pread at {off2} differs")
        except OSError as e:
            errors.append(f"{op}: {e!r}")
        worst = max(worst, time.monotonic() - t0)
        counts[op] = counts.get(op, 0) + 1
    # Final check of everything.
    try:
        for name, data in model.items():
            with open(os.path.join(d, name), "rb") as f:
                if f.read() != data:
                    mismatches.append(f"final {name} differs")
        if os.pread(held, len(held_data), 0) != held_data:
            mismatches.append("final held differs")
        os.close(held)
        with open(held_path, "rb") as f:
            if f.read() != held_data:
                mismatches.append("final held (reopened) differs")
        if set(os.listdir(d)) != set(model) | {"held"}:
            mismatches.append("final listing differs")
    except OSError as e:
        errors.append(f"final: {e!r}")
    with open(out, "w") as f:
        json.dump({"ops": sum(counts.values()), "counts": counts, "errors": errors,
                   "mismatches": mismatches, "worst_op_s": worst, "files": len(model)}, f)
    return 0


def _pattern(seed: int, size: int) -> bytes:
    """Deterministic bytes, fast: a random 1 MiB block, each copy ending with its number."""
    block = random.Random(seed).randbytes(MIB)[:-8]
    return b"".join(block + i.to_bytes(8, "little") for i in range(-(-size // MIB)))[:size]


def prober(root: str, duration: float, out: str) -> int:
    """stat a fresh name every 5 ms; record each stat's start and latency (the slow ones in full)."""
    end = time.monotonic() + duration
    slow: list[tuple[float, float]] = []
    errors: list[str] = []
    n = 0
    while time.monotonic() < end:
        n += 1
        t0, w0 = time.monotonic(), time.time()
        try:
            os.stat(os.path.join(root, f"probe-{os.getpid()}-{n}"))
            errors.append(f"probe-{n} exists")
        except FileNotFoundError:
            pass
        except OSError as e:
            errors.append(f"stat: {e!r}")
        lat = time.monotonic() - t0
        if lat > 0.01:
            slow.append((w0, lat))
        time.sleep(max(0.0, 0.005 - lat))
    with open(out, "w") as f:
        json.dump({"stats": n, "slow": slow, "errors": errors}, f)
    return 0


def locker(root: str, duration: float, out: str) -> int:
    """Hold a POSIX lock on lock-posix and a flock on lock-flock for the whole run; then check that
    the unlock works and report."""
    errors: list[str] = []
    fp = os.open(os.path.join(root, "lock-posix"), os.O_RDWR | os.O_CREAT, 0o644)
    ff = os.open(os.path.join(root, "lock-flock"), os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.lockf(fp, fcntl.LOCK_EX | fcntl.LOCK_NB)
    fcntl.flock(ff, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("locked", flush=True)
    time.sleep(duration)
    try:
        fcntl.lockf(fp, fcntl.LOCK_UN)
        fcntl.flock(ff, fcntl.LOCK_UN)
    except OSError as e:
        errors.append(f"unlock: {e!r}")
    os.close(fp)
    os.close(ff)
    with open(out, "w") as f:
        json.dump({"errors": errors}, f)
    return 0


def lockprobe(root: str, duration: float, out: str) -> int:
    """Try both locks without blocking every 20 ms: each grant is a violation (released at once)."""
    end = time.monotonic() + duration
    violations: list[str] = []
    errors: list[str] = []
    probes = 0
    fp = os.open(os.path.join(root, "lock-posix"), os.O_RDWR)
    ff = os.open(os.path.join(root, "lock-flock"), os.O_RDWR)
    while time.monotonic() < end:
        probes += 1
        for kind, fd, lock in (("posix", fp, fcntl.lockf), ("flock", ff, fcntl.flock)):
            try:
                lock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    errors.append(f"{kind} probe: {e!r}")
                continue
            violations.append(f"{kind} lock granted twice at {time.time():.3f}")
            with contextlib.suppress(OSError):
                lock(fd, fcntl.LOCK_UN)
        time.sleep(0.02)
    os.close(fp)
    os.close(ff)
    with open(out, "w") as f:
        json.dump({"probes": probes, "violations": violations, "errors": errors}, f)
    return 0


def bigwriter(root: str, duration: float, out: str) -> int:
    """Write 64 MiB with one write(2), read it back and compare, again and again."""
    end = time.monotonic() + duration
    errors: list[str] = []
    mismatches: list[str] = []
    rounds = 0
    data = _pattern(64, 64 * MIB)
    want = hashlib.sha256(data).digest()
    path = os.path.join(root, "big-in-flight")
    while time.monotonic() < end:
        rounds += 1
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                view, off = memoryview(data), 0
                while off < len(data):
                    off += os.pwrite(fd, view[off:], off)
                got = bytearray()
                while len(got) < len(data):
                    chunk = os.pread(fd, len(data) - len(got), len(got))
                    if not chunk:
                        break
                    got += chunk
            finally:
                os.close(fd)
            if hashlib.sha256(got).digest() != want:
                mismatches.append(f"64 MiB round {rounds}: {len(got)} bytes read back differ")
        except OSError as e:
            errors.append(f"64 MiB round {rounds}: {e!r}")
    with open(out, "w") as f:
        json.dump({"rounds": rounds, "errors": errors, "mismatches": mismatches}, f)
    return 0


ROLES = {"app": None, "prober": prober, "locker": locker, "lockprobe": lockprobe, "bigwriter": bigwriter}


# -- the harness --------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    return env


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Harness:
    """A keeper, the daemons and the client processes, all stopped on exit."""

    def __init__(self, base: str, fs: str, slow: str, standby: bool = True) -> None:
        self.base, self.fs, self.standby = base, fs, standby
        self.src = os.path.join(base, "src")
        self.mnt = os.path.join(base, "mnt")
        self.state = os.path.join(base, "state")
        self.sock = os.path.join(base, "keeper.sock")
        self.events = os.path.join(base, "events.jsonl")
        for p in (self.src, self.mnt, self.state):
            os.makedirs(p, exist_ok=True)
        self.env = _env()
        self.env["AFUSE_FAILOVERFS_SLOW"] = slow
        self.procs: list[subprocess.Popen[bytes]] = []
        self.log = open(os.path.join(base, "daemons.log"), "ab")
        self.keeper: subprocess.Popen[bytes] | None = None

    def _spawn(self, args: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        p = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=self.log,
                             env=self.env, cwd=self.base, **kw)
        self.procs.append(p)
        return p

    def start_keeper(self) -> None:
        self.keeper = self._spawn(["-m", "afuse.keeper", "--socket", self.sock])
        if not wait_for_line(self.keeper, b"ready", 20):
            raise RuntimeError("the keeper did not start")

    def spawn_daemon(self, *extra: str) -> subprocess.Popen[bytes]:
        common = ["--keeper", self.sock, "--state-dir", self.state, "--events", self.events,
                  *([] if self.standby else ["--no-standby"]), *extra]
        if self.fs == "memfs":
            return self._spawn(["-m", "afuse.examples.memfs", self.mnt, *common])
        return self._spawn(["-m", "afuse.examples.failoverfs", self.src, self.mnt, "--timeout", "1", *common])

    def ready(self, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
        if not wait_for_line(proc, b"ready", timeout):
            raise RuntimeError(f"daemon {proc.pid} did not start (see {self.log.name})")

    def role(self, name: str, duration: float, seed: int) -> tuple[subprocess.Popen[bytes], str]:
        out = os.path.join(self.base, f"{name}{seed}.json")
        args = ["--app", self.mnt, str(duration), str(seed), out] if name == "app" else \
            ["--role", name, self.mnt, str(duration), out]
        return self._spawn([os.path.abspath(__file__), *args]), out

    def mount_info(self) -> dict[str, Any]:
        """This mount's entry in the keeper's ``list`` (a plain blocking client: never stats the mount)."""
        mp = os.path.join(os.path.realpath(os.path.dirname(self.mnt)), os.path.basename(self.mnt))
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(self.sock)
            s.sendall(b'{"op":"list"}\n')
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    raise RuntimeError("the keeper closed the connection")
                buf += chunk
        mounts: list[dict[str, Any]] = json.loads(buf)["mounts"]
        return next((m for m in mounts if m["mountpoint"] == mp), {})

    def wait_info(self, cond: Any, timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            info = self.mount_info()
            if cond(info):
                return info
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}: {info}")
            time.sleep(0.05)

    def read_events(self) -> list[dict[str, Any]]:
        with open(self.events) as f:
            return [json.loads(line) for line in f if line.strip()]

    def close(self) -> None:
        pids = set()
        with contextlib.suppress(OSError, ValueError):
            pids = {ev["pid"] for ev in self.read_events()}
        for p in self.procs:
            if p is not self.keeper and p.poll() is None:
                p.kill()
        if self.keeper is not None and self.keeper.poll() is None:
            with contextlib.suppress(Exception):
                subprocess.run([sys.executable, "-m", "afuse.failover", "unmount", "--socket", self.sock,
                                self.mnt], env=self.env, timeout=20, capture_output=True)
        for pid in pids:  # daemons and standbys the daemons started
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for p in self.procs:
            if p is not self.keeper:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(20)
        if self.keeper is not None and self.keeper.poll() is None:
            self.keeper.send_signal(signal.SIGTERM)
            try:
                self.keeper.wait(10)
            except subprocess.TimeoutExpired:
                self.keeper.kill()
                self.keeper.wait(10)
        mp = os.path.realpath(self.mnt)
        with open("/proc/self/mountinfo") as f:
            if any(line.split()[4] == mp for line in f):
                subprocess.run(["umount", "-l", mp], check=False, timeout=10)
        for p in self.procs:
            for s in (p.stdout, p.stderr):
                if s is not None:
                    s.close()
        self.log.close()


@contextlib.contextmanager
def harness(fs: str, slow: str, standby: bool, keep: bool = False) -> Iterator[Harness]:
    base = tempfile.mkdtemp(prefix=f"afuse-failover-{fs}-")
    h = Harness(base, fs, slow, standby)
    try:
        yield h
    finally:
        h.close()
        if not keep:
            shutil.rmtree(base, ignore_errors=True)


class LoadSampler:
    """/proc/loadavg (1-minute figure) once a second, in a thread."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with open("/proc/loadavg") as f:
                self.samples.append(float(f.read().split()[0]))
            self._stop.wait(1.0)

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def populate(mnt: str, data_mib: int, into: str | None = None) -> list[tuple[str, bytes]]:
    """Write ``data_mib`` MiB (64 MiB files) through the mount, or into ``into`` (a passthrough's
    source) then seen through the mount; (path in the mount, sha256) of each."""
    os.makedirs(os.path.join(into or mnt, "bulk"), exist_ok=True)
    files = []
    left, i = data_mib * MIB, 0
    block = _pattern(7, 64 * MIB)
    while left > 0:
        size = min(left, 64 * MIB)
        path = os.path.join(mnt, "bulk", f"b{i}")
        data = block[:size - 8] + i.to_bytes(8, "little")
        fd = os.open(os.path.join(into or mnt, "bulk", f"b{i}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view, off = memoryview(data), 0
            while off < size:
                off += os.pwrite(fd, view[off:], off)
        finally:
            os.close(fd)
        files.append((path, hashlib.sha256(data).digest()))
        left -= size
        i += 1
    return files


def run(kind: str, count: int, duration: float, seed: int, slow: str, standby: bool = True,
        apps: int = 2, fs: str = "failoverfs", data_mib: int = 0, extras: bool = True,
        keep: bool = False) -> dict[str, Any]:
    """One phase: ``count`` SIGKILLs (``kind`` "kill") or upgrades ("upgrade") during ``duration`` s.
    ``standby`` False: daemons run with --no-standby and a new one is started after each kill (the
    cold baseline). ``extras``: the prober, the lock pair and the 64 MiB writer run too."""
    rng = random.Random(seed)
    with harness(fs, slow, standby, keep) as h:
        h.start_keeper()
        first = h.spawn_daemon()
        h.ready(first)
        t_pop = time.monotonic()
        # failoverfs mirrors its source: the data goes there (its daemon's writes sleep now and then)
        bulk = populate(h.mnt, data_mib, h.src if fs == "failoverfs" else None)
        populate_s = time.monotonic() - t_pop
        if standby and kind == "kill":
            h.wait_info(lambda i: i.get("standby_pids"), 60, "the first standby")
        clients = [h.role("app", duration, seed * 100 + i) for i in range(apps)]
        if extras:
            locker = h.role("locker", duration + 5, seed)
            if not wait_for_line(locker[0], b"locked", 30):
                raise RuntimeError("the lock holder did not get its locks")
            clients += [h.role("prober", duration, seed), h.role("lockprobe", duration, seed),
                        h.role("bigwriter", duration, seed)]
            clients.append(locker)
        margin = min(2.0, duration / 10)
        spacing = (duration - 2 * margin) / max(count, 1)
        t0 = time.monotonic()
        failovers: list[dict[str, Any]] = []
        with LoadSampler() as load:
            for k in range(count):
                at = margin + spacing * k + rng.uniform(0, spacing / 2)
                delay = t0 + at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                info = h.mount_info()
                old = int(info["owner_pid"])
                if kind == "kill":
                    t = time.time()
                    os.kill(old, signal.SIGKILL)
                    if not standby:
                        new_proc = h.spawn_daemon()
                        h.ready(new_proc)
                        new = new_proc.pid
                    else:
                        new = int(h.wait_info(lambda i, old=old: i.get("owner_pid") not in (0, old), 60,
                                              "a new owner")["owner_pid"])
                        if k < count - 1:
                            h.wait_info(lambda i: i.get("standby_pids"), 60, "a new standby")
                else:
                    t = time.time()
                    new_proc = h.spawn_daemon("--upgrade")
                    h.ready(new_proc)
                    new = new_proc.pid
                    deadline = time.monotonic() + 30
                    while _alive(old) and time.monotonic() < deadline:
                        for p in h.procs:
                            if p.pid == old:
                                p.poll()
                        time.sleep(0.02)
                failovers.append({"t": t, "old": old, "new": new})
            results = []
            for p, out in clients:
                try:
                    p.wait(duration + 180)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(10)
                    raise RuntimeError("a client process hung") from None
                with open(out) as f:
                    results.append((os.path.basename(out), json.load(f)))
        bulk_bad = []
        for path, digest in bulk[:2] + bulk[-1:]:
            with open(path, "rb") as f:
                if hashlib.sha256(f.read()).digest() != digest:
                    bulk_bad.append(f"bulk {os.path.basename(path)} differs")
        events = h.read_events()
    first_req: dict[int, float] = {}
    drain: dict[int, float] = {}
    resent: dict[int, int] = {}
    for ev in events:
        if ev["event"] == "first_request":
            first_req.setdefault(ev["pid"], ev["t"])
        elif ev["event"] == "drain":
            drain.setdefault(ev["pid"], ev["t"])
        elif ev["event"] == "resent":
            resent[ev["pid"]] = resent.get(ev["pid"], 0) + 1
    by_role = {name: res for name, res in results}
    slow_stats = [tuple(x) for name, res in results if name.startswith("prober") for x in res["slow"]]
    latencies, stalls = [], []
    for fo in failovers:
        start = fo["t"] if kind == "kill" else drain.get(fo["old"], fo["t"])
        fo["first_request_s"] = first_req[fo["new"]] - start if fo["new"] in first_req else None
        fo["resent"] = resent.get(fo["new"], 0)
        if fo["first_request_s"] is not None:
            latencies.append(fo["first_request_s"])
        upto = min([f["t"] for f in failovers if f["t"] > fo["t"]] + [fo["t"] + 5])
        near = [lat for t, lat in slow_stats if fo["t"] - 0.05 <= t < upto]
        fo["stall_s"] = max(near, default=0.0)
        stalls.append(fo["stall_s"])
    errors = [e for _n, r in results for e in r.get("errors", [])]
    mismatches = [m for _n, r in results for m in r.get("mismatches", [])] + bulk_bad
    violations = [v for _n, r in results for v in r.get("violations", [])]
    return {
        "fs": fs, "kind": kind, "count": count, "duration": duration, "standby": standby, "data_mib": data_mib,
        "populate_s": populate_s,
        "failovers": failovers,
        "completed": len(failovers),
        "with_requests_in_flight": sum(1 for fo in failovers if fo["resent"]),
        "median_s": statistics.median(latencies) if latencies else None,
        "worst_s": max(latencies) if latencies else None,
        "stall_median_s": statistics.median(stalls) if stalls else None,
        "stall_worst_s": max(stalls) if stalls else None,
        "ops": sum(r["ops"] for n, r in results if n.startswith("app")),
        "errors": errors, "mismatches": mismatches, "lock_violations": violations,
        "lock_probes": sum(r.get("probes", 0) for _n, r in results),
        "big_rounds": by_role.get(f"bigwriter{seed}.json", {}).get("rounds", 0),
        "worst_op_s": max(r["worst_op_s"] for n, r in results if n.startswith("app")),
        "load": [min(load.samples, default=0), statistics.mean(load.samples) if load.samples else 0,
                 max(load.samples, default=0)],
    }


def _ms(x: float | None) -> str:
    return f"{x * 1000:.0f} ms" if x is not None else "n/a"


def report(res: dict[str, Any]) -> str:
    what = {"kill": "SIGKILL, warm standby" if res["standby"] else "SIGKILL, cold restart (baseline)",
            "upgrade": "graceful upgrade"}[res["kind"]]
    since = "kill" if res["kind"] == "kill" else "drain"
    lines = [
        f"{res['fs']} with {res['data_mib']} MiB, {what}: {res['completed']}/{res['count']} failovers in "
        f"{res['duration']:.0f} s (load avg {res['load'][0]:.1f}..{res['load'][2]:.1f}, mean {res['load'][1]:.1f})",
        f"  {since} -> first request served: median {_ms(res['median_s'])}, worst {_ms(res['worst_s'])}; "
        f"prober's longest stall: median {_ms(res['stall_median_s'])}, worst {_ms(res['stall_worst_s'])}",
        f"  failovers with requests in flight (resent): {res['with_requests_in_flight']}; "
        f"64 MiB rounds: {res['big_rounds']}; lock probes: {res['lock_probes']}",
        f"  application: {res['ops']} operations, slowest {res['worst_op_s'] * 1000:.0f} ms, "
        f"{len(res['errors'])} errors, {len(res['mismatches'])} wrong bytes, "
        f"{len(res['lock_violations'])} lock violations",
    ]
    for e in (res["errors"] + res["mismatches"] + res["lock_violations"])[:8]:
        lines.append(f"    {e}")
    return "\n".join(lines)


def table(results: list[dict[str, Any]]) -> str:
    rows = ["| fs | data | phase | done | median | worst | stall med/worst | errors | wrong | lock viol. | load |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        phase = {"kill": "kill" if r["standby"] else "kill (cold)", "upgrade": "upgrade"}[r["kind"]]
        rows.append(f"| {r['fs']} | {r['data_mib']} MiB | {phase} | {r['completed']}/{r['count']} | "
                    f"{_ms(r['median_s'])} | {_ms(r['worst_s'])} | {_ms(r['stall_median_s'])} / "
                    f"{_ms(r['stall_worst_s'])} | {len(r['errors'])} | {len(r['mismatches'])} | "
                    f"{len(r['lock_violations'])} | {r['load'][1]:.1f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--app":
        return app(argv[1], float(argv[2]), int(argv[3]), argv[4])
    if argv and argv[0] == "--role":
        fn = ROLES[argv[1]]
        assert fn is not None
        return fn(argv[2], float(argv[3]), argv[4])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fs", default="failoverfs,memfs", help="comma-separated: failoverfs, memfs")
    p.add_argument("--data-gib", type=float, default=None, help="data written through the mount first")
    p.add_argument("--duration", type=float, default=None, help="seconds per phase")
    p.add_argument("--kills", type=int, default=None, help="SIGKILLs per filesystem (default 10)")
    p.add_argument("--upgrades", type=int, default=None, help="upgrades per filesystem (default 10)")
    p.add_argument("--cold-kills", type=int, default=None, help="baseline kills without standby (default: --kills)")
    p.add_argument("--apps", type=int, default=2)
    p.add_argument("--slow", default="0.05,0.2", help="AFUSE_FAILOVERFS_SLOW for failoverfs")
    p.add_argument("--quick", action="store_true", help="smoke test: 20 MiB, 3 of each, 12 s phases")
    p.add_argument("--strict-locks", action="store_true", help="fail on lock violations too")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--keep", action="store_true", help="keep the temporary directories (logs, state)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    for name, full, quick in (("data_gib", 1.0, 0.02), ("duration", 40.0, 12.0), ("kills", 10, 3), ("upgrades", 10, 3)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    cold = args.kills if args.cold_kills is None else args.cold_kills
    if os.geteuid() != 0:
        print("needs root (mount(2), open_by_handle_at)", file=sys.stderr)
        return 2
    results = []
    ok = True
    with open("/proc/loadavg") as f:
        print(f"load before: {f.read().strip()}; {os.cpu_count()} CPUs", flush=True)
    for fs in args.fs.split(","):
        for kind, count, standby in (("kill", args.kills, True), ("upgrade", args.upgrades, True),
                                     ("kill", cold, False)):
            if not count:
                continue
            try:
                res = run(kind, count, args.duration, args.seed, args.slow, standby=standby, apps=args.apps,
                          fs=fs, data_mib=int(args.data_gib * 1024), keep=args.keep)
            except RuntimeError as e:
                print(f"{fs} {kind}: FAILED: {e}", flush=True)
                ok = False
                continue
            results.append(res)
            print(report(res), flush=True)
            ok = ok and not res["errors"] and not res["mismatches"] and res["completed"] == count
            ok = ok and not (args.strict_locks and res["lock_violations"])
    print()
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    errors = sum(len(r["errors"]) for r in results)
    mismatches = sum(len(r["mismatches"]) for r in results)
    violations = sum(len(r["lock_violations"]) for r in results)
    print(f"{errors} application errors, {mismatches} wrong bytes, {violations} lock violations"
          + ("" if ok else " -- FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
