"""Request round-trip latency: afuse against an older checkout and the bare Python floor.

One command, one table::

    python benchmarks/floor.py [--base DIR] [--rounds 15] [--seconds 0.2] [--unpinned]

It mounts, at once, a one-file filesystem served

* ``this``  — by afuse from this checkout (low-level ``Operations``, ``afuse.testing``'s serve);
* ``base``  — by afuse from checkout ``DIR`` (e.g. ``git worktree add --detach ../base main``), the
  same filesystem code (this file) importing that checkout's ``afuse``;
* ``nodes`` — by afuse from this checkout through the node layer (``afuse.examples.hello``);
* ``raw``   — by ``_latencyfs.py raw``, a bare blocking ``os.readv``/``os.write`` loop using afuse's wire codecs only
  (no session, no trio, no dispatcher): the least a Python daemon can do per request;
* ``pyfuse3`` — with ``--pyfuse3 PYTHON``, by ``_latencyfs.py pyfuse3`` (the same filesystem on
  pyfuse3, libfuse's C decoding under pyfuse3's trio loop), run by that interpreter;
* ``libfuse`` — with ``--libfuse``, by libfuse's C ``hello_ll`` example (Debian's libfuse3-dev,
  compiled with attr_timeout 0, run single-threaded) for the getattr row, and by the same compiled
  with entry_timeout 0 (``libfuse-e0``) for the lookup+getattr row,

each daemon pinned to one CPU together with this (client) process unless ``--unpinned``. It then
times ``os.stat`` in short slices, rotating through the mounts each round, and prints the median
per mount (so load from other processes hits every row alike) and the ratios, and the CPU time
the daemon spent per call (``/proc/PID/task/*/schedstat``: its own work, in user space and the
kernel, which the machine's load disturbs far less than the wall-clock figure).

Rows, and the requests one ``os.stat`` costs (the kernel's fuse tracepoints confirm them:
``--trace`` counts ``fuse_request_send`` events per call):

* ``getattr``: ``stat hello`` — the name is cached (entry_timeout 3600), attr_timeout 0: one GETATTR.
* ``lookup+getattr``: ``stat fresh`` — entry_timeout 0 and attr_timeout 0: the kernel revalidates
  the name (one LOOKUP) and then asks for the attributes (one GETATTR).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import re
import select
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench import pinned  # noqa: E402  (this folder's bench.py)

REPO = os.path.dirname(HERE)
ROOT_ID = 1
HELLO_ID = 2
FRESH_ID = 3
DATA = b"Hello, world!\n"


def _hello_ops() -> object:
    """The low-level filesystem, built from whichever afuse is on the path (this or ``--base``)."""
    from afuse import Attr, Entry, FUSEError, Operations

    now = time.time_ns()
    root = Attr(ino=ROOT_ID, mode=stat.S_IFDIR | 0o755, nlink=2, atime_ns=now, mtime_ns=now, ctime_ns=now)
    hello = Attr(ino=HELLO_ID, mode=stat.S_IFREG | 0o444, nlink=1, size=len(DATA),
                 atime_ns=now, mtime_ns=now, ctime_ns=now)
    fresh = Attr(ino=FRESH_ID, mode=stat.S_IFREG | 0o444, nlink=1, size=len(DATA),
                 atime_ns=now, mtime_ns=now, ctime_ns=now)
    by_id = {ROOT_ID: root, HELLO_ID: hello, FRESH_ID: fresh}
    entries = {b"hello": Entry(HELLO_ID, hello, entry_timeout=3600.0),
               b"fresh": Entry(FRESH_ID, fresh, entry_timeout=0.0)}

    class Floor(Operations):
        attr_timeout = 0.0
        entry_timeout = 3600.0

        async def getattr(self, req):  # type: ignore[no-untyped-def]
            try:
                return by_id[req.nodeid]
            except KeyError:
                raise FUSEError(errno.ENOENT) from None

        async def lookup(self, req):  # type: ignore[no-untyped-def]
            e = entries.get(req.name) if req.nodeid == ROOT_ID else None
            if e is None:
                raise FUSEError(errno.ENOENT)
            return e

    return Floor()


def Hello() -> object:
    """``python -m afuse.testing floor:Hello MOUNTPOINT -o ''`` (with benchmarks/ on PYTHONPATH)."""
    return _hello_ops()


def NodeHello() -> object:
    """The hello example on nodes, with attr_timeout 0 (``stat hello`` is one GETATTR)."""
    from afuse.examples.hello import HelloFS

    class Zero(HelloFS):
        attr_timeout = 0.0
        entry_timeout = 3600.0

    return Zero()


def _mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


class Daemon:
    """One filesystem process on a fresh mountpoint."""

    def __init__(self, label: str, tree: str, args: list[str], cpu: int | None, extra_env: dict[str, str],
                 python: str = sys.executable, binary: str | None = None) -> None:
        self.label = label
        self.path = tempfile.mkdtemp(prefix="afuse-floor-")
        env = {**os.environ, **extra_env}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (tree, HERE, env.get("PYTHONPATH")) if p)

        def pin() -> None:
            if cpu is not None:
                os.sched_setaffinity(0, {cpu})

        self.err = tempfile.TemporaryFile()
        if binary is not None:  # libfuse's hello_ll: foreground, single-threaded; it prints nothing
            cmd = [binary, "-f", "-s", self.path]
        else:
            options = [] if args[0].endswith(".py") else ["-o", ""]  # a script, or afuse.testing's command line
            cmd = [python, *args, self.path, *options]
        self.proc = subprocess.Popen(cmd,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.err, env=env,
                                     cwd=tree, start_new_session=True, preexec_fn=pin)
        assert self.proc.stdout is not None
        if binary is None:
            ready, _, _ = select.select([self.proc.stdout], [], [], 30)
            line = self.proc.stdout.readline() if ready else b""
        else:
            line = b"ready"
        deadline = time.monotonic() + 10
        while line.strip() == b"ready" and not _mounted(self.path) and time.monotonic() < deadline:
            time.sleep(0.01)
        if not _mounted(self.path):
            self.stop()
            self.err.seek(0)
            raise RuntimeError(f"{label}: did not mount: {self.err.read().decode(errors='replace')[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if _mounted(self.path):
            subprocess.run(["umount", "-l", self.path], check=False, stderr=subprocess.DEVNULL)
        with contextlib.suppress(OSError):
            os.rmdir(self.path)


def cpu_ns(pid: int) -> int:
    """Nanoseconds process ``pid`` (all its threads) has run on a CPU (``/proc/PID/task/*/schedstat``)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            total += int(f.read().split()[0])
    return total


def stat_us(path: str, seconds: float, pid: int) -> tuple[float, float, int]:
    """Time ``os.stat(path)`` for about ``seconds``: (µs per call, the daemon's CPU ns in all, calls)."""
    st = os.stat
    st(path)
    count = 0
    clock = time.perf_counter
    c0 = cpu_ns(pid)
    t0 = clock()
    while (elapsed := clock() - t0) < seconds:
        for _ in range(100):
            st(path)
        count += 100
    return elapsed / count * 1e6, cpu_ns(pid) - c0, count


TRACING = "/sys/kernel/tracing"


def requests_per_stat(path: str, calls: int = 200) -> dict[str, float]:
    """Count the fuse_request_send tracepoint's opcodes over ``calls`` stats of ``path``."""
    ev = f"{TRACING}/events/fuse/fuse_request_send"
    if not os.path.isdir(f"{TRACING}/events"):
        subprocess.run(["mount", "-t", "tracefs", "nodev", TRACING], capture_output=True, check=False)
    if not os.path.isdir(ev):
        return {}
    dev = os.stat(os.path.dirname(path)).st_dev
    conn = (os.major(dev) << 20) | os.minor(dev)  # the kernel's dev_t, as the tracepoint prints it
    with open(f"{TRACING}/trace", "w"):
        pass  # opening for writing clears the buffer
    with open(f"{ev}/filter", "w") as f:
        f.write(f"connection == {conn}")  # this mount's requests only
    with open(f"{ev}/enable", "w") as f:
        f.write("1")
    try:
        for _ in range(calls):
            os.stat(path)
    finally:
        with open(f"{ev}/enable", "w") as f:
            f.write("0")
        with open(f"{ev}/filter", "w") as f:
            f.write("0")
    counts: dict[str, int] = {}
    with open(f"{TRACING}/trace") as f:
        for line in f:
            if "fuse_request_send" not in line:
                continue
            m = re.search(r"opcode \d+ \((\w+)\)", line)
            if m:
                op = m.group(1).removeprefix("FUSE_")
                counts[op] = counts.get(op, 0) + 1
    return {op: n / calls for op, n in sorted(counts.items())}


ROWS = (("getattr", "hello"), ("lookup+getattr", "fresh"))
#: Servers with no ``fresh`` name: the getattr row only.
ONLY_GETATTR = ("nodes", "libfuse")
#: A server for the lookup+getattr row only, where its ``hello`` behaves as ``fresh``.
ONLY_FRESH = {"libfuse-e0": "hello"}


LIBFUSE_HELLO = "/usr/share/doc/libfuse3-dev/examples/hello_ll.c"


def build_libfuse_hello(cache: str, entry_timeout: int) -> str:
    """libfuse's ``hello_ll`` example from Debian's libfuse3-dev, compiled with attr_timeout 0 and
    ``entry_timeout``: its path. With 3600, one ``stat hello`` is one GETATTR; with 0, one LOOKUP and
    one GETATTR (the rows' two cases). Installs libfuse3-dev, gcc and pkg-config with apt-get when
    missing; nothing of it is in the repository."""
    exe = os.path.join(cache, f"hello_ll_attr0_entry{entry_timeout}")
    if os.path.exists(exe):
        return exe
    if not os.path.exists(LIBFUSE_HELLO) or not shutil.which("gcc") or not shutil.which("pkg-config"):
        subprocess.run(["apt-get", "install", "-y", "-q", "libfuse3-dev", "gcc", "pkg-config"], check=True,
                       stdout=subprocess.DEVNULL)
    with open(LIBFUSE_HELLO) as f:
        src = f.read()
    edits = (("fuse_reply_attr(req, &stbuf, 1.0)", "fuse_reply_attr(req, &stbuf, 0.0)"),
             ("e.attr_timeout = 1.0;", "e.attr_timeout = 0.0;"),
             ("e.entry_timeout = 1.0;", f"e.entry_timeout = {entry_timeout}.0;"))
    for old, new in edits:
        if old not in src:
            raise RuntimeError(f"{LIBFUSE_HELLO} has changed: no {old!r}")
        src = src.replace(old, new)
    os.makedirs(cache, exist_ok=True)
    c = exe + ".c"
    with open(c, "w") as f:
        f.write(src)
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "fuse3"], capture_output=True, text=True,
                           check=True).stdout.split()
    subprocess.run(["gcc", "-O2", c, *flags, "-o", exe], check=True)
    return exe


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", metavar="DIR", help="also serve from this afuse checkout (the 'before')")
    p.add_argument("--rounds", type=int, default=15, help="rounds; each times every mount once (median reported)")
    p.add_argument("--seconds", type=float, default=0.2, help="length of one timed slice")
    p.add_argument("--unpinned", action="store_true", help="do not pin the daemons and the client to one CPU")
    p.add_argument("--no-nodes", action="store_true", help="skip the node-layer hello")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:VAR=VALUE",
                   help="also serve this checkout with environment variable VAR=VALUE, as row NAME")
    p.add_argument("--pyfuse3", metavar="PYTHON",
                   help="also serve the same filesystem on pyfuse3, run by this interpreter (one that has pyfuse3, "
                        "e.g. the venv benchmarks/vs_pyfuse3.py sets up in ~/.cache/afuse-bench/pyfuse3-venv)")
    p.add_argument("--libfuse", action="store_true",
                   help="also serve hello on libfuse's C hello_ll example (attr_timeout 0, single-threaded), "
                        "getattr row only; built in --cache")
    p.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "afuse-bench"),
                   help="where --libfuse's build goes (default ~/.cache/afuse-bench)")
    p.add_argument("--trace", action="store_true", help="count the FUSE requests one stat costs (tracepoints)")
    args = p.parse_args(argv)
    binaries = {"libfuse": build_libfuse_hello(args.cache, 3600),
                "libfuse-e0": build_libfuse_hello(args.cache, 0)} if args.libfuse else {}
    cpus = os.sched_getaffinity(0)
    cpu = None if args.unpinned else (0 if 0 in cpus else min(cpus))

    hello = ["-m", "afuse.testing", "floor:Hello"]
    specs: list[tuple[str, str, list[str], dict[str, str]]] = [("this", REPO, hello, {})]
    pythons = {"pyfuse3": args.pyfuse3} if args.pyfuse3 else {}
    for variant in args.variant:
        name, _, assignment = variant.partition(":")
        var, _, value = assignment.partition("=")
        specs.append((name, REPO, hello, {var: value}))
    if args.base:
        specs.append(("base", os.path.abspath(args.base), hello, {}))
    if not args.no_nodes:
        specs.append(("nodes", REPO, ["-m", "afuse.testing", "floor:NodeHello"], {}))
    specs.append(("raw", REPO, [os.path.join(HERE, "_latencyfs.py"), "raw"], {}))  # the bare loop
    if args.pyfuse3:
        specs.append(("pyfuse3", REPO, [os.path.join(HERE, "_latencyfs.py"), "pyfuse3"], {}))
    if args.libfuse:
        specs += [("libfuse", REPO, [], {}), ("libfuse-e0", REPO, [], {})]
    daemons: dict[str, Daemon] = {}
    samples: dict[tuple[str, str], list[float]] = {}
    traced: dict[tuple[str, str], dict[str, float]] = {}
    cpus_used: dict[tuple[str, str], list[float]] = {}  # daemon CPU µs per call, per slice
    try:
        for label, tree, cmd, env in specs:
            daemons[label] = Daemon(label, tree, cmd, cpu, env, pythons.get(label, sys.executable),
                                    binaries.get(label))
        with pinned(cpu):
            for rnd in range(args.rounds):
                order = list(daemons.items())
                k = rnd % len(order)
                for label, d in order[k:] + order[:k]:  # rotate, so no mount always goes first
                    for row, name in ROWS:
                        if (label in ONLY_GETATTR and row != "getattr") or (label in ONLY_FRESH and row == "getattr"):
                            continue
                        target = ONLY_FRESH.get(label, name)
                        us, ns, calls = stat_us(os.path.join(d.path, target), args.seconds, d.proc.pid)
                        samples.setdefault((label, row), []).append(us)
                        cpus_used.setdefault((label, row), []).append(ns / calls / 1e3)
            if args.trace:
                for label, d in daemons.items():
                    for row, name in ROWS:
                        if (label not in ONLY_GETATTR or row == "getattr") and (label not in ONLY_FRESH
                                                                                 or row != "getattr"):
                            traced[(label, row)] = requests_per_stat(os.path.join(d.path, ONLY_FRESH.get(label, name)))
    finally:
        for d in daemons.values():
            d.stop()

    med = {k: statistics.median(v) for k, v in samples.items()}
    dcpu = {k: statistics.median(v) for k, v in cpus_used.items()}
    print(f"os.stat round trips, µs, median of {args.rounds} x {args.seconds:g} s slices, "
          f"{f'pinned to cpu{cpu}' if cpu is not None else 'unpinned'}, load {os.getloadavg()[0]:.2f}")
    head = (f"{'row':16} {'server':10} {'µs':>8} {'min':>8} {'÷ raw':>7}" + (f" {'÷ base':>7}" if args.base else "")
            + f" {'daemon CPU µs':>13} {'min':>6} {'÷ raw':>7}" + (f" {'÷ base':>7}" if args.base else ""))
    print(head + ("  requests per stat" if args.trace else ""))
    for row, _name in ROWS:
        for label in daemons:
            if (label, row) not in med:
                continue
            us = med[(label, row)]
            line = f"{row:16} {label:10} {us:8.2f} {min(samples[(label, row)]):8.2f} {us / med[('raw', row)]:7.2f}"
            if args.base:
                line += f" {us / med[('base', row)]:7.2f}"
            c = dcpu[(label, row)]
            line += f" {c:13.2f} {min(cpus_used[(label, row)]):6.2f} {c / dcpu[('raw', row)]:7.2f}"
            if args.base:
                line += f" {c / dcpu[('base', row)]:7.2f}"
            if args.trace:
                line += "  " + " ".join(f"{op}={n:g}" for op, n in traced.get((label, row), {}).items())
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
