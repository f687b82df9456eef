#!/usr/bin/env python3
"""Failover benchmark: an application keeps working while its filesystem daemon dies and is upgraded.

    python benchmarks/failover.py [--duration 30] [--kills 10] [--upgrades 10] [--no-standby] [--json FILE]

A keeper (``python -m afuse.keeper``) holds the /dev/fuse descriptors; failoverfs
(``python -m afuse.examples.failoverfs``) mirrors a temporary directory. An application process
runs a mixed verifying workload (create, write, read back and compare, stat, readdir, rename,
unlink, and pwrite/pread on files held open across failovers) for ``--duration`` seconds while:

1. the daemon is killed with SIGKILL ``--kills`` times at random moments; some handlers sleep
   now and then (``AFUSE_FAILOVERFS_SLOW``), so several kills hit requests in flight. A new
   daemon is started right after each kill (its Python start-up dominates the figure);
2. the same with a hot standby: the next daemon is started in advance and waits at the keeper
   (``take`` waits for the owner's control connection to close), so a kill is all it takes;
3. the daemon is upgraded in place ``--upgrades`` times (a new daemon asks the keeper to drain
   the old one).

Reported: application errors and data mismatches (both must be 0), the time from each kill to
the first request the new daemon served (from the daemons' event logs), and for upgrades the
time from the old daemon's drain to the new one's first request. Exit status 0 only if the
application saw no error and no mismatch and every failover completed.

``--app MOUNTDIR SECONDS SEED OUT`` is the application itself (run by the script).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


# -- the harness --------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    return env


def _wait_line(proc: subprocess.Popen[bytes], want: bytes, timeout: float) -> bool:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        r, _, _ = select.select([proc.stdout], [], [], 0.05)
        if r:
            line = proc.stdout.readline()
            if line.strip() == want:
                return True
            if not line:
                return False
    return False


class Harness:
    """A keeper, the daemons and the application, all child processes, all stopped on exit."""

    def __init__(self, base: str, slow: str, verbose: bool = False) -> None:
        self.base = base
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
        self.verbose = verbose
        self.keeper: subprocess.Popen[bytes] | None = None
        self.daemon: subprocess.Popen[bytes] | None = None

    def _spawn(self, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        p = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=self.log,
                             env=env or self.env, cwd=self.base)
        self.procs.append(p)
        return p

    def start_keeper(self) -> None:
        self.keeper = self._spawn(["-m", "afuse.keeper", "--socket", self.sock, "--state-dir",
                                   os.path.join(self.base, "keeper")])
        if not _wait_line(self.keeper, b"ready", 20):
            raise RuntimeError("the keeper did not start")

    def spawn_daemon(self, *extra: str) -> subprocess.Popen[bytes]:
        return self._spawn(["-m", "afuse.examples.failoverfs", self.src, self.mnt, "--keeper", self.sock,
                            "--state-dir", self.state, "--events", self.events, "--timeout", "1", *extra])

    def ready(self, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
        if not _wait_line(proc, b"ready", timeout):
            raise RuntimeError(f"daemon {proc.pid} did not start (see {self.log.name})")

    def start_app(self, duration: float, seed: int) -> tuple[subprocess.Popen[bytes], str]:
        out = os.path.join(self.base, f"app{seed}.json")
        return self._spawn([os.path.abspath(__file__), "--app", self.mnt, str(duration), str(seed), out]), out

    def read_events(self) -> list[dict[str, Any]]:
        with open(self.events) as f:
            return [json.loads(line) for line in f if line.strip()]

    def close(self) -> None:
        for p in self.procs:
            if p is not self.keeper and p.poll() is None:
                p.kill()
        for p in self.procs:
            if p is not self.keeper:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(10)
        if self.keeper is not None and self.keeper.poll() is None:
            with contextlib.suppress(Exception):
                subprocess.run([sys.executable, "-m", "afuse.failover", "unmount", "--socket", self.sock,
                                self.mnt], env=self.env, timeout=10, capture_output=True)
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
def harness(slow: str, verbose: bool = False, keep: bool = False) -> Iterator[Harness]:
    base = tempfile.mkdtemp(prefix="afuse-failover-")
    h = Harness(base, slow, verbose)
    try:
        yield h
    finally:
        h.close()
        if not keep:
            shutil.rmtree(base, ignore_errors=True)


def run(kind: str, count: int, duration: float, seed: int, slow: str, standby: bool = False,
        apps: int = 2, verbose: bool = False) -> dict[str, Any]:
    """One run: ``count`` kills (``kind`` "kill") or upgrades ("upgrade") during ``duration`` s."""
    rng = random.Random(seed)
    with harness(slow, verbose) as h:
        h.start_keeper()
        h.daemon = h.spawn_daemon()
        h.ready(h.daemon)
        standby_proc: subprocess.Popen[bytes] | None = None
        if standby and kind == "kill":
            standby_proc = h.spawn_daemon("--take-wait", "3600")
        app_procs = [h.start_app(duration, seed * 100 + i) for i in range(apps)]
        margin = min(1.0, duration / 10)
        moments = sorted(rng.uniform(margin, duration - margin) for _ in range(count))
        t0 = time.monotonic()
        failovers: list[dict[str, Any]] = []
        for at in moments:
            delay = t0 + at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            old = h.daemon
            assert old is not None
            if kind == "kill":
                t = time.time()
                old.kill()
                if standby_proc is not None:
                    new = standby_proc
                else:
                    new = h.spawn_daemon()
                old.wait(10)
                h.ready(new)
                if standby_proc is not None:
                    standby_proc = h.spawn_daemon("--take-wait", "3600")
            else:
                t = time.time()
                new = h.spawn_daemon("--upgrade")
                h.ready(new)
                old.wait(30)
                if old.returncode != 0:
                    raise RuntimeError(f"the old daemon exited {old.returncode} on upgrade")
            failovers.append({"t": t, "old": old.pid, "new": new.pid})
            h.daemon = new
        results = []
        for p, out in app_procs:
            try:
                p.wait(duration + 120)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
                raise RuntimeError("the application hung") from None
            with open(out) as f:
                results.append(json.load(f))
        events = h.read_events()
    # Figures from the daemons' event logs.
    first: dict[int, float] = {}
    drain: dict[int, float] = {}
    resent: dict[int, int] = {}
    for ev in events:
        if ev["event"] == "first_request":
            first.setdefault(ev["pid"], ev["t"])
        elif ev["event"] == "drain":
            drain.setdefault(ev["pid"], ev["t"])
        elif ev["event"] == "resent":
            resent[ev["pid"]] = resent.get(ev["pid"], 0) + 1
    latencies = []
    for fo in failovers:
        start = fo["t"] if kind == "kill" else drain.get(fo["old"], fo["t"])
        fo["first_request_s"] = first[fo["new"]] - start if fo["new"] in first else None
        fo["resent"] = resent.get(fo["new"], 0)
        if fo["first_request_s"] is not None:
            latencies.append(fo["first_request_s"])
    return {
        "kind": kind, "count": count, "duration": duration, "standby": standby,
        "failovers": failovers,
        "completed": len(failovers),
        "with_requests_in_flight": sum(1 for fo in failovers if fo["resent"]),
        "median_s": statistics.median(latencies) if latencies else None,
        "worst_s": max(latencies) if latencies else None,
        "ops": sum(r["ops"] for r in results),
        "errors": [e for r in results for e in r["errors"]],
        "mismatches": [m for r in results for m in r["mismatches"]],
        "worst_op_s": max(r["worst_op_s"] for r in results),
    }


def report(res: dict[str, Any]) -> str:
    what = "SIGKILL" if res["kind"] == "kill" else "graceful upgrade"
    med = f"{res['median_s'] * 1000:.1f} ms" if res["median_s"] is not None else "n/a"
    worst = f"{res['worst_s'] * 1000:.1f} ms" if res["worst_s"] is not None else "n/a"
    since = "kill" if res["kind"] == "kill" else "drain"
    lines = [
        f"{what}: {res['completed']}/{res['count']} failovers in {res['duration']:.0f} s"
        + (" (hot standby)" if res["standby"] else ""),
        f"  {since} -> first request served: median {med}, worst {worst}",
        f"  failovers with requests in flight (resent): {res['with_requests_in_flight']}",
        f"  application: {res['ops']} operations, slowest {res['worst_op_s'] * 1000:.0f} ms, "
        f"{len(res['errors'])} application errors, {len(res['mismatches'])} data mismatches",
    ]
    for e in (res["errors"] + res["mismatches"])[:10]:
        lines.append(f"    {e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--app":
        return app(argv[1], float(argv[2]), int(argv[3]), argv[4])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--upgrades", type=int, default=10)
    p.add_argument("--slow", default="0.05,0.2", help="AFUSE_FAILOVERFS_SLOW for the daemons")
    p.add_argument("--no-standby", action="store_true",
                   help="skip the second SIGKILL run, where a hot standby daemon waits at the keeper")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (mount(2), open_by_handle_at)", file=sys.stderr)
        return 2
    results = []
    ok = True
    phases = [("kill", args.kills, False), ("kill", 0 if args.no_standby else args.kills, True),
              ("upgrade", args.upgrades, False)]
    for kind, count, standby in phases:
        if not count:
            continue
        try:
            res = run(kind, count, args.duration, args.seed, args.slow, standby=standby)
        except RuntimeError as e:
            print(f"{kind}: FAILED: {e}")
            ok = False
            continue
        results.append(res)
        print(report(res), flush=True)
        ok = ok and not res["errors"] and not res["mismatches"] and res["completed"] == count
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    errors = sum(len(r["errors"]) for r in results)
    mismatches = sum(len(r["mismatches"]) for r in results)
    print(f"{errors} application errors, {mismatches} data mismatches" + ("" if ok else " -- FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
