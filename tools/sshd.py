#!/usr/bin/env python3
"""Run a throw-away OpenSSH server on 127.0.0.1 for tests and benchmarks.

    python tools/sshd.py                     # start one, print how to reach it, serve until Ctrl-C
    python tools/sshd.py --port 2222 --netns bench

From Python (tests load this file with importlib; it has no dependencies beyond the stdlib)::

    with running_sshd() as sshd:
        subprocess.run(["ssh", *sshd.ssh_options(), sshd.target(), "true"], check=True)
        sshd.kill()        # SIGKILL the listener and every session process: clients see EOF
        sshd.restart()     # a fresh listener on the same port, same keys

Everything lives in a temporary directory: an ed25519 host key and user key made with
``ssh-keygen``, ``authorized_keys``, ``known_hosts`` (``[127.0.0.1]:PORT`` pinned to the host key)
and ``sshd_config``. The server is Debian's ``/usr/sbin/sshd -D -e -f CONFIG`` (package
``openssh-server``; its system service is neither needed nor touched): own port, no PAM, no DNS, key
login only, root login by key allowed (tests run as root), ``StrictModes no`` (the temp dir's modes).

SFTP is served by ``internal-sftp`` by default: the same code as the ``sftp-server`` binary (same
protocol version 3 and the same ``@openssh.com`` extensions) run inside the session process, so no
extra exec per session and no dependency on where a distribution installs ``sftp-server``. Pass
``sftp_server="/usr/lib/openssh/sftp-server"`` to use the binary instead.

With ``netns=NAME`` the server runs in that (existing) network namespace through ``ip netns exec``;
then its 127.0.0.1 is the namespace's loopback, and clients must run there too.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SSHD = "/usr/sbin/sshd"
HOST = "127.0.0.1"


class SshdError(RuntimeError):
    """The server could not be set up or did not come up."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _children(pid: int) -> list[int]:
    """All descendants of ``pid`` (sshd's per-connection processes call setsid: no shared group)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out.extend(kids)
        todo.extend(kids)
    return out


@dataclass
class Sshd:
    """One throw-away sshd: where it listens and the files a client needs to log in."""

    dir: Path
    port: int
    user: str
    identity: Path
    known_hosts: Path
    config: Path
    log: Path
    netns: str | None = None
    host: str = HOST
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def target(self, path: str = "") -> str:
        """``USER@HOST`` (or ``USER@HOST:PATH`` when a path is given), as ssh/sshfs/sftpfs take it."""
        return f"{self.user}@{self.host}" + (f":{path}" if path else "")

    def ssh_options(self) -> list[str]:
        """``ssh``/``sftp``/``sshfs`` arguments that reach this server with its keys and nothing else."""
        return [
            "-p", str(self.port),
            "-o", f"IdentityFile={self.identity}",
            "-o", "IdentitiesOnly=yes",
            "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes",
            "-F", "/dev/null",
        ]  # fmt: skip

    @property
    def pid(self) -> int | None:
        """The listener's pid while it runs."""
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def start(self, timeout: float = 10.0) -> None:
        """Start the listener on ``self.port`` and wait until it accepts connections."""
        if self.pid is not None:
            raise SshdError("sshd already running")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # Debian's privilege separation directory
        self.log.write_bytes(b"")
        cmd = [SSHD, "-D", "-e", "-f", str(self.config)]
        if self.netns is not None:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_text(errors="replace")
            if "Server listening on" in text:
                return
            if self.proc.poll() is not None:
                raise SshdError(f"sshd exited with {self.proc.returncode}: {text.strip()}")
            time.sleep(0.02)
        self.kill()
        raise SshdError(f"sshd did not start within {timeout} s: {self.log.read_text(errors='replace').strip()}")

    def _signal(self, sig: signal.Signals) -> None:
        if self.proc is None:
            return
        victims = [self.proc.pid, *_children(self.proc.pid)] if self.proc.poll() is None else []
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        """SIGTERM the listener and its session processes and wait: connections close cleanly."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the listener and every session process: connections drop as on a crash."""
        self._signal(signal.SIGKILL)

    def restart(self, timeout: float = 10.0) -> None:
        """Stop (if running) and start again on the same port with the same keys."""
        self.stop()
        deadline = time.monotonic() + timeout
        while True:  # the port may linger briefly
            try:
                self.start(timeout=max(0.5, deadline - time.monotonic()))
                return
            except SshdError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def _keygen(path: Path, comment: str) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
    )  # fmt: skip


def make_sshd(
    directory: Path,
    *,
    port: int | None = None,
    user: str | None = None,
    netns: str | None = None,
    sftp_server: str = "internal-sftp",
    extra_config: str = "",
) -> Sshd:
    """Write keys and config for a server into ``directory`` (not started)."""
    if not os.path.exists(SSHD):
        raise SshdError(f"{SSHD} not found: apt-get install openssh-server")
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port() if port is None else port
    user = user or pwd.getpwuid(os.getuid()).pw_name
    host_key, identity = directory / "host_ed25519", directory / "id_ed25519"
    for key in (host_key, identity):
        for f in (key, key.with_name(key.name + ".pub")):
            f.unlink(missing_ok=True)
    _keygen(host_key, "afuse-test-host")
    _keygen(identity, "afuse-test-user")
    (directory / "authorized_keys").write_text((directory / "id_ed25519.pub").read_text())
    host_pub = " ".join((directory / "host_ed25519.pub").read_text().split()[:2])
    known_hosts = directory / "known_hosts"
    known_hosts.write_text(f"[{HOST}]:{port} {host_pub}\n")
    config = directory / "sshd_config"
    config.write_text(
        f"""\
ListenAddress {HOST}:{port}
HostKey {host_key}
PidFile none
AuthorizedKeysFile {directory / "authorized_keys"}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
UseDNS no
PermitRootLogin prohibit-password
StrictModes no
AllowTcpForwarding no
X11Forwarding no
PrintMotd no
MaxStartups 100:30:200
MaxSessions 100
LogLevel INFO
Subsystem sftp {sftp_server}
{extra_config}
"""
    )
    return Sshd(
        dir=directory,
        port=port,
        user=user,
        identity=identity,
        known_hosts=known_hosts,
        config=config,
        log=directory / "sshd.log",
        netns=netns,
    )


@contextlib.contextmanager
def running_sshd(
    *,
    port: int | None = None,
    user: str | None = None,
    netns: str | None = None,
    sftp_server: str = "internal-sftp",
    extra_config: str = "",
    directory: Path | None = None,
) -> Iterator[Sshd]:
    """A started sshd for the ``with`` block; killed (with its sessions) and cleaned up afterwards."""
    tmp = None
    if directory is None:
        tmp = tempfile.mkdtemp(prefix="afuse-sshd-")
        directory = Path(tmp)
    try:
        sshd = make_sshd(
            directory, port=port, user=user, netns=netns, sftp_server=sftp_server, extra_config=extra_config
        )
        last: SshdError | None = None
        for _ in range(5):  # a free port can be taken between free_port() and sshd's bind
            try:
                sshd.start()
                break
            except SshdError as e:
                last = e
                if port is not None or "Address already in use" not in str(e):
                    raise
                sshd = make_sshd(directory, user=user, netns=netns, sftp_server=sftp_server, extra_config=extra_config)
        else:
            raise SshdError(f"no free port: {last}")
        try:
            yield sshd
        finally:
            sshd.kill()
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run a throw-away sshd on 127.0.0.1 until interrupted.")
    p.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    p.add_argument("--netns", default=None, help="run inside this existing network namespace")
    p.add_argument("--dir", type=Path, default=None, help="keep keys and config here (default: a temp dir)")
    p.add_argument("--sftp-server", default="internal-sftp", help="Subsystem sftp command (default internal-sftp)")
    args = p.parse_args(argv)
    with running_sshd(port=args.port, netns=args.netns, directory=args.dir, sftp_server=args.sftp_server) as sshd:
        opts = " ".join(sshd.ssh_options())
        print(f"host={sshd.host} port={sshd.port} user={sshd.user}")
        print(f"identity={sshd.identity}")
        print(f"known_hosts={sshd.known_hosts}")
        print(f"ssh:    ssh {opts} {sshd.target()}")
        print(
            f"sftpfs: python -m afuse.examples.sftpfs {sshd.target('/')} MOUNTPOINT -p {sshd.port} "
            f"-i {sshd.identity} -o known_hosts={sshd.known_hosts}"
        )
        sys.stdout.flush()
        try:
            while sshd.pid is not None:
                time.sleep(0.5)
            print(f"sshd exited: {sshd.log.read_text(errors='replace').strip()}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    sys.exit(main())
