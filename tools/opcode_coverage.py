#!/usr/bin/env python3
"""Which FUSE requests does the kernel send while a command runs, and which succeed?

Usage::

    python tools/opcode_coverage.py [--all-processes] [--json FILE] -- COMMAND [ARG...]

The kernel's own tracepoints are the witness, not afuse's logging: a private tracefs instance
(``instances/afuse-coverage-<pid>``) records ``fuse:fuse_request_send`` (connection, unique,
opcode) and ``fuse:fuse_request_end`` (connection, unique, error) while COMMAND runs; a thread
streams ``trace_pipe`` into memory meanwhile, so a long run does not overflow the ring buffer.
Sends and ends are paired by (connection, unique), and a table shows per opcode how often it was
sent and how often it was answered with error 0.

By default only COMMAND and its descendants are traced (``set_event_pid`` with ``event-fork``),
so other FUSE users on the machine do not count. Requests the kernel queues from a kernel thread
(writeback) then show up only as unpaired ends; ``--all-processes`` traces everything.

Three requests never pass the send tracepoint (the kernel queues them outside fuse_send_one):

* FORGET and BATCH_FORGET. The kernel gives them a unique from the connection's counter when the
  daemon reads them; the uniques of traced requests step by 2, so a unique that has neither a
  send nor an end event is counted as a forget ("inferred").
* INTERRUPT. It reuses the interrupted request's unique. A request answered -EINTR is counted as
  evidence that an INTERRUPT was sent for it ("inferred"): afuse answers EINTR when an INTERRUPT
  cancels the handler.

Exit status: COMMAND's if it failed (128+N if killed by signal N), else 1 if a required opcode
never got a successful answer, else 0. Without a usable tracefs the reason is printed and COMMAND
runs untraced (exit status COMMAND's).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

try:
    from afuse.wire.constants import Opcode
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from afuse.wire.constants import Opcode
from afuse.wire.opcodes import NO_REPLY as TABLE_NO_REPLY
from afuse.wire.opcodes import OPCODES

TRACEFS_PATHS = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))
INSTANCE_PREFIX = "afuse-coverage-"
EVENTS = ("fuse_request_send", "fuse_request_end")
DEFAULT_BUFFER_KB = 16384
#: Exit status when the command succeeded but a required opcode was never answered successfully.
EXIT_MISSING = 1

UNIQUE_RESEND = 1 << 63
INT_REQ_BIT = 1
#: A jump of more than this many uniques is taken as lost events, not as forgets.
MAX_GAP = 100_000

SEND_RE = re.compile(rb"connection (\d+) req (\d+) opcode (\d+)")
END_RE = re.compile(rb"connection (\d+) req (\d+) len (\d+) error (-?\d+)")
LOST_RE = re.compile(rb"\[LOST (\d+) EVENTS\]")

#: Required opcodes: every one a filesystem handles (from the opcode table), and INTERRUPT;
#: a group (FORGET|BATCH_FORGET) is covered when any of its members is.
REQUIRED: tuple[tuple[Opcode, ...], ...] = (
    *(
        tuple(Opcode(s.opcode) for s in OPCODES if s.handler == "forget") if s.handler == "forget"
        else (Opcode(s.opcode),)
        for s in OPCODES if s.handler is not None and s.opcode != Opcode.BATCH_FORGET
    ),
    (Opcode.INTERRUPT,),
)
#: Requests that get no reply: being sent is success (NOTIFY_REPLY answers the daemon's notify).
NO_REPLY = frozenset(Opcode(o) for o in TABLE_NO_REPLY if o != Opcode.NOTIFY_REPLY)


class TracingUnavailable(Exception):
    """tracefs or the fuse events cannot be used here (the message says why)."""


# --------------------------------------------------------------------------- analysis


@dataclass
class _Epoch:
    """One life of a connection number (numbers are reused by later mounts)."""

    hi: int | None = None
    holes: set[int] = field(default_factory=set)
    lost: int = 0

    def see(self, unique: int) -> None:
        if self.hi is None:
            self.hi = unique
        elif unique > self.hi:
            if unique - self.hi <= 2 * MAX_GAP:
                self.holes.update(range(self.hi + 2, unique, 2))
            else:
                self.lost += 1
            self.hi = unique
        else:
            self.holes.discard(unique)


@dataclass
class Coverage:
    """Pairs send and end events and counts them per opcode."""

    sent: Counter[int] = field(default_factory=Counter)
    ok: Counter[int] = field(default_factory=Counter)
    errors: dict[int, Counter[int]] = field(default_factory=dict)
    unpaired_ends: int = 0
    interrupted: int = 0
    inferred_forgets: int = 0
    lost_jumps: int = 0
    lost_in_pipe: int = 0
    lines: int = 0
    epochs: int = 0
    _pending: dict[int, dict[int, int]] = field(default_factory=dict)
    _epoch: dict[int, _Epoch] = field(default_factory=dict)

    def feed(self, line: bytes) -> None:
        """Account one line of trace output (other lines are ignored)."""
        m = SEND_RE.search(line)
        if m is not None:
            self.lines += 1
            self._send(int(m[1]), int(m[2]), int(m[3]))
            return
        m = END_RE.search(line)
        if m is not None:
            self.lines += 1
            self._end(int(m[1]), int(m[2]), int(m[4]))
            return
        m = LOST_RE.search(line)
        if m is not None:
            self.lost_in_pipe += int(m[1])

    def _epoch_of(self, conn: int, new: bool = False) -> _Epoch:
        ep = self._epoch.get(conn)
        if ep is None or new:
            if ep is not None:
                self._close(ep)
            ep = self._epoch[conn] = _Epoch()
            self.epochs += 1
        return ep

    def _send(self, conn: int, unique: int, opcode: int) -> None:
        self.sent[opcode] += 1
        if opcode == Opcode.INIT:  # a new mount reusing the connection number starts over
            self._pending.pop(conn, None)
            ep = self._epoch_of(conn, new=True)
        else:
            ep = self._epoch_of(conn)
        self._pending.setdefault(conn, {})[unique] = opcode
        if opcode != Opcode.NOTIFY_REPLY:  # its unique is the daemon's notify_unique
            ep.see(unique & ~(UNIQUE_RESEND | INT_REQ_BIT))

    def _end(self, conn: int, unique: int, error: int) -> None:
        self._epoch_of(conn).see(unique & ~(UNIQUE_RESEND | INT_REQ_BIT))
        pending = self._pending.get(conn, {})
        opcode = pending.pop(unique, None)
        if opcode is None:
            opcode = pending.pop(unique & ~UNIQUE_RESEND, None)
        if opcode is None:
            self.unpaired_ends += 1
            return
        if error == 0:
            self.ok[opcode] += 1
        else:
            self.errors.setdefault(opcode, Counter())[-error] += 1
            if error == -errno.EINTR:
                self.interrupted += 1

    def _close(self, ep: _Epoch) -> None:
        self.inferred_forgets += len(ep.holes)
        self.lost_jumps += ep.lost
        ep.holes.clear()
        ep.lost = 0

    def finish(self) -> None:
        """Close every connection's bookkeeping (call once, after the last line)."""
        for ep in self._epoch.values():
            self._close(ep)

    # -- results ---------------------------------------------------------------------------

    def successes(self, op: Opcode) -> int:
        """Successful answers to ``op`` (for requests without a reply: times sent, traced or inferred)."""
        if op in (Opcode.FORGET, Opcode.BATCH_FORGET):
            return self.sent[op] + (self.inferred_forgets if op == Opcode.FORGET else 0)
        if op == Opcode.INTERRUPT:
            return self.sent[op] + self.interrupted
        return self.ok[op]

    def missing(self) -> list[tuple[Opcode, ...]]:
        """Required groups none of whose members got a successful answer."""
        return [group for group in REQUIRED if not any(self.successes(op) for op in group)]


def _opcode_name(num: int) -> str:
    try:
        return Opcode(num).name
    except ValueError:
        return f"opcode {num}"


def _errno_summary(counts: Counter[int] | None) -> str:
    if not counts:
        return ""
    parts = [f"{errno.errorcode.get(e, str(e))}x{n}" for e, n in counts.most_common(3)]
    if len(counts) > 3:
        parts.append("...")
    return " ".join(parts)


def format_report(cov: Coverage, lost_events: int) -> str:
    """The table and its notes."""
    lost_events = max(lost_events, cov.lost_in_pipe)
    required = {op for group in REQUIRED for op in group}
    seen = set(cov.sent) | set(cov.ok) | set(cov.errors)
    nums = sorted(required | seen)
    lines = [f"{'opcode':<20} {'#':>4} {'sent':>8} {'ok':>8}  {'req':<4} errors"]
    for num in nums:
        name = _opcode_name(num)
        sent = str(cov.sent[num])
        ok = str(cov.ok[num])
        if num in NO_REPLY:
            ok = "-"
            if num == Opcode.FORGET and cov.inferred_forgets:
                sent += f"+{cov.inferred_forgets}*"
            if num == Opcode.INTERRUPT and cov.interrupted:
                sent += f"+{cov.interrupted}*"
        req = ""
        if num in required:
            group = next(g for g in REQUIRED if num in g)
            req = "yes" if any(cov.successes(op) for op in group) else "NO"
        lines.append(f"{name:<20} {num:>4} {sent:>8} {ok:>8}  {req:<4} {_errno_summary(cov.errors.get(num))}")
    lines.append("")
    lines.append(
        f"{cov.lines} events, {cov.epochs} connection lifetimes, {cov.unpaired_ends} ends without a traced send"
        + (f", {lost_events} events LOST by the ring buffer" if lost_events else "")
        + (f", {cov.lost_jumps} unique jumps taken as lost events" if cov.lost_jumps else "")
    )
    if cov.inferred_forgets or cov.interrupted:
        lines.append(
            "* inferred: FORGET/BATCH_FORGET from uniques with neither send nor end event; "
            "INTERRUPT from requests answered EINTR (the send tracepoint never sees these)"
        )
    missing = cov.missing()
    if missing:
        names = ", ".join("/".join(op.name for op in group) for group in missing)
        lines.append(f"MISSING ({len(missing)} of {len(REQUIRED)} required): {names}")
    else:
        lines.append(f"all {len(REQUIRED)} required opcodes got a successful answer")
    return "\n".join(lines)


def report_json(cov: Coverage, lost_events: int, returncode: int) -> dict[str, object]:
    """Machine-readable results."""
    return {
        "returncode": returncode,
        "lost_events": max(lost_events, cov.lost_in_pipe),
        "unpaired_ends": cov.unpaired_ends,
        "inferred_forgets": cov.inferred_forgets,
        "interrupted": cov.interrupted,
        "opcodes": {
            _opcode_name(num): {
                "sent": cov.sent[num],
                "ok": cov.ok[num],
                "errors": {errno.errorcode.get(e, str(e)): n for e, n in cov.errors.get(num, Counter()).items()},
            }
            for num in sorted(set(cov.sent) | set(cov.ok) | set(cov.errors))
        },
        "missing": ["/".join(op.name for op in group) for group in cov.missing()],
    }


# --------------------------------------------------------------------------- tracefs


def _write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def find_tracefs() -> Path:
    """The tracefs root with the fuse events, mounting tracefs when needed (and allowed)."""
    reasons = []
    for root in TRACEFS_PATHS:
        if (root / "events").is_dir():
            break
    else:
        root = TRACEFS_PATHS[0]
        if os.geteuid() != 0:
            raise TracingUnavailable("tracefs is not mounted and mounting it needs root")
        res = subprocess.run(["mount", "-t", "tracefs", "nodev", str(root)], capture_output=True, text=True,
                             check=False)
        if res.returncode != 0 or not (root / "events").is_dir():
            raise TracingUnavailable(f"cannot mount tracefs on {root}: {res.stderr.strip() or res.returncode}")
    for event in EVENTS:
        if not (root / "events" / "fuse" / event).is_dir():
            reasons.append(event)
    if reasons:
        raise TracingUnavailable(f"this kernel has no fuse tracepoints {', '.join(reasons)} (needs Linux 6.13+ "
                                 f"with the fuse module loaded)")
    if not os.access(root / "instances", os.W_OK):
        raise TracingUnavailable(f"no permission to create tracefs instances in {root / 'instances'} (run as root)")
    return root


def _remove_stale_instances(root: Path) -> None:
    """Remove instances left by earlier runs that were killed."""
    with contextlib.suppress(OSError):
        for inst in (root / "instances").iterdir():
            pid = inst.name.removeprefix(INSTANCE_PREFIX)
            if inst.name.startswith(INSTANCE_PREFIX) and pid.isdigit() and not _alive(int(pid)):
                with contextlib.suppress(OSError):
                    inst.rmdir()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class TraceInstance:
    """A private tracefs instance recording the two fuse events."""

    def __init__(self, root: Path, buffer_kb: int, trace_pid: int | None) -> None:
        self.path = root / "instances" / f"{INSTANCE_PREFIX}{os.getpid()}"
        _remove_stale_instances(root)
        try:
            self.path.mkdir()
        except FileExistsError:
            self.path.rmdir()
            self.path.mkdir()
        except OSError as e:
            raise TracingUnavailable(f"cannot create tracefs instance {self.path}: {e.strerror}") from None
        try:
            _write(self.path / "tracing_on", "0")
            _write(self.path / "buffer_size_kb", str(buffer_kb))
            if trace_pid is not None:
                _write(self.path / "options" / "event-fork", "1")
                _write(self.path / "set_event_pid", str(trace_pid))
            _write(self.path / "tracing_on", "1")
        except OSError as e:
            self.remove()
            raise TracingUnavailable(f"cannot configure {self.path}: {e}") from None

    def enable(self, on: bool) -> None:
        for event in EVENTS:
            _write(self.path / "events" / "fuse" / event / "enable", "1" if on else "0")

    def lost_events(self) -> int:
        """Events the ring buffer overwrote or dropped (per-cpu stats)."""
        lost = 0
        with contextlib.suppress(OSError):
            for cpu in (self.path / "per_cpu").iterdir():
                with contextlib.suppress(OSError):
                    for line in (cpu / "stats").read_text().splitlines():
                        key, _, value = line.partition(":")
                        if key.strip() in ("overrun", "dropped events"):
                            with contextlib.suppress(ValueError):
                                lost += int(value)
        return lost

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.enable(False)
        with contextlib.suppress(OSError):
            _write(self.path / "set_event_pid", "")
        # rmdir fails with EBUSY while trace_pipe is open; the reader closes it before this.
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as e:
                if e.errno != errno.EBUSY:
                    break
                time.sleep(0.1)
        print(f"opcode_coverage: could not remove {self.path}; rmdir it by hand", file=sys.stderr)


class PipeReader(threading.Thread):
    """Streams ``trace_pipe`` into a :class:`Coverage` until stopped and drained."""

    def __init__(self, pipe: Path, cov: Coverage) -> None:
        super().__init__(name="trace_pipe reader", daemon=True)
        self.cov = cov
        self.error: BaseException | None = None
        self._stop_event = threading.Event()
        self._fd = os.open(pipe, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)

    def stop(self) -> None:
        """Read what is left, then end (call after disabling the events)."""
        self._stop_event.set()

    def run(self) -> None:
        rest = b""
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        try:
            while True:
                stopping = self._stop_event.is_set()
                try:
                    chunk = os.read(self._fd, 1 << 20)
                except BlockingIOError:
                    chunk = b""
                if chunk:
                    lines = (rest + chunk).split(b"\n")
                    rest = lines.pop()
                    for line in lines:
                        self.cov.feed(line)
                    continue
                if stopping:  # the buffer was empty after the events were disabled
                    break
                poller.poll(100)
            if rest:
                self.cov.feed(rest)
        except BaseException as e:
            self.error = e
        finally:
            os.close(self._fd)


# --------------------------------------------------------------------------- running


def _run(cmd: Sequence[str]) -> int:
    """Run ``cmd``, forwarding SIGTERM/SIGHUP and surviving the Ctrl-C it also gets."""
    try:
        proc = subprocess.Popen(list(cmd))
    except OSError as e:
        print(f"opcode_coverage: cannot run {cmd[0]!r}: {e.strerror}", file=sys.stderr)
        return 127

    def forward(signum: int, _frame: FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        while True:
            try:
                rc = proc.wait()
                break
            except KeyboardInterrupt:  # the child got SIGINT too; let it finish its cleanup
                continue
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return 128 - rc if rc < 0 else rc


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run COMMAND and report which FUSE opcodes the kernel sent and which were answered with "
                    "success, from the kernel's fuse tracepoints.",
        usage="%(prog)s [options] -- COMMAND [ARG...]",
    )
    parser.add_argument("--all-processes", action="store_true",
                        help="trace FUSE requests of every process, not only COMMAND and its descendants")
    parser.add_argument("--buffer-kb", type=int, default=DEFAULT_BUFFER_KB,
                        help=f"ring buffer per CPU in KiB (default {DEFAULT_BUFFER_KB})")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run, after --")
    args = parser.parse_args(argv)
    cmd = list(args.command)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        parser.error("no command given (put it after --)")

    try:
        root = find_tracefs()
        inst = TraceInstance(root, args.buffer_kb, None if args.all_processes else os.getpid())
    except TracingUnavailable as e:
        print(f"opcode_coverage: cannot trace ({e}); running the command without coverage", file=sys.stderr)
        return _run(cmd)

    cov = Coverage()
    reader: PipeReader | None = None
    try:
        reader = PipeReader(inst.path / "trace_pipe", cov)
        reader.start()
        inst.enable(True)
        rc = _run(cmd)
        inst.enable(False)
        lost = inst.lost_events()
    finally:
        if reader is not None:
            reader.stop()
            reader.join()
        inst.remove()
    if reader.error is not None:
        raise reader.error
    cov.finish()

    print(format_report(cov, lost))
    if args.json:
        Path(args.json).write_text(json.dumps(report_json(cov, lost, rc), indent=2) + "\n")
    if rc != 0:
        print(f"opcode_coverage: the command failed with exit status {rc}", file=sys.stderr)
        return rc
    return EXIT_MISSING if cov.missing() else 0


if __name__ == "__main__":
    sys.exit(main())
