"""sftpfs against a real OpenSSH server (tools/sshd.py), mounted by its command line, driven by real
tools and system calls: everyday tools match a native directory, open flags, renames, statfs, links,
a killed server (EIO, then --reconnect), an interrupted reader, --poll."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import getpass
import grp
import importlib.util
import os
import pwd
import re
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_sshd() -> ModuleType:
    spec = importlib.util.spec_from_file_location("afuse_tools_sshd", ROOT / "tools" / "sshd.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look the module up
    spec.loader.exec_module(mod)
    return mod


sshd_tool = _load_sshd()


@pytest.fixture(scope="module")
def sshd() -> Iterator[Any]:
    """One throw-away sshd for the module (tests that kill it start their own)."""
    with sshd_tool.running_sshd() as s:
        yield s


def _mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


@contextlib.contextmanager
def sftpfs(server: Any, remote: Path, *args: str, timeout: float = 30.0) -> Iterator[str]:
    """Mount ``remote`` (a directory the server sees) with ``python -m afuse.examples.sftpfs``; unmount
    (SIGTERM, else a lazy unmount and SIGKILL) however the test ends."""
    mnt = tempfile.mkdtemp(prefix="afuse-sftpfs-")
    cmd = [sys.executable, "-m", "afuse.examples.sftpfs", server.target(str(remote)), mnt,
           "-p", str(server.port), "-i", str(server.identity), "-o", f"known_hosts={server.known_hosts}", *args]
    errlog = tempfile.TemporaryFile()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errlog, env=env)
    try:
        assert proc.stdout is not None
        line = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if select.select([proc.stdout], [], [], 0.1)[0]:
                line = proc.stdout.readline()
                break
        if line.strip() != b"ready":
            errlog.seek(0)
            raise AssertionError(f"sftpfs did not mount: {errlog.read().decode(errors='replace')}")
        yield mnt
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                subprocess.run(["umount", "-l", mnt], check=False, timeout=15)
                proc.kill()
                proc.wait(15)
        if _mounted(mnt):
            subprocess.run(["umount", "-l", mnt], check=False, timeout=15)
        with contextlib.suppress(OSError):
            os.rmdir(mnt)
        errlog.seek(0)
        log = errlog.read().decode(errors="replace")
        errlog.close()
        if "Traceback" in log or "handler error" in log.lower():
            raise AssertionError(f"sftpfs logged an error:\n{log}")


# -- everyday tools ---------------------------------------------------------------------------------

SCRIPT = r"""
set -e
cp -a "$SAMPLE" tree
tar -cf archive.tar tree
mkdir extracted && tar -xf archive.tar -C extracted
diff -r tree extracted/tree
git init -q repo
cp -a tree/. repo/
cd repo
git add -A
git -c user.name=t -c user.email=t@example.com commit -qm first
echo change >> README.md
git -c user.name=t -c user.email=t@example.com commit -qam second
git log --format=%s | cat
git status --porcelain | cat
git fsck --no-progress 2>&1 | cat
cd ..
mv tree/README.md tree/moved.md
mv extracted/tree extracted/renamed
ln -s moved.md tree/link
readlink tree/link
chmod 600 tree/moved.md
chmod 750 extracted/renamed
find tree extracted repo -not -path '*/.git/*' \( -type d -printf '%y %m %P\n' -o -printf '%y %m %s %P\n' \) | sort
find tree -type f -printf '%s\n' | awk '{s += $1} END {print s}'
rm -rf tree extracted repo archive.tar
ls -A
"""


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A snapshot of afuse's own source (without caches) and its README."""
    if shutil.which("git") is None:
        pytest.fail("git is required (apt-get install git)")
    root = tmp_path_factory.mktemp("sftp-sample")
    shutil.copytree(ROOT / "afuse", root / "afuse", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(ROOT / "README.md", root / "README.md")
    os.symlink("afuse/__init__.py", root / "init-link")
    os.chmod(root / "README.md", 0o640)
    return str(root)


def _run_script(where: str, sample: str) -> str:
    res = subprocess.run(["bash", "-c", SCRIPT], cwd=where, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "SAMPLE": sample, "GIT_CONFIG_NOSYSTEM": "1", "HOME": where})
    assert res.returncode == 0, res.stderr
    return res.stdout


#: SSH through OpenSSH's client in a child process (the default, as sshfs), or asyncssh in process.
TRANSPORTS = pytest.mark.parametrize("transport", ["ssh", "asyncssh"])


@TRANSPORTS
def test_everyday_tools_match_native(sshd: Any, sample: str, tmp_path: Path, transport: str) -> None:
    native = tmp_path / "native"
    native.mkdir()
    expected = _run_script(str(native), sample)
    remote = tmp_path / "remote"
    remote.mkdir()
    with sftpfs(sshd, remote, "--transport", transport) as mnt:
        assert _run_script(mnt, sample) == expected
        assert os.listdir(mnt) == [] == os.listdir(remote)


# -- single operations ---------------------------------------------------------------------------------

@TRANSPORTS
def test_open_flags_rename_links_statfs(sshd: Any, tmp_path: Path, transport: str) -> None:
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "a").write_text("first file\n")
    (remote / "b").write_text("second\n")
    (remote / "full").mkdir()
    (remote / "full" / "x").write_text("x")
    with sftpfs(sshd, remote) as mnt:
        m = Path(mnt)
        # O_EXCL on an existing name; O_CREAT|O_EXCL on a new one
        with pytest.raises(FileExistsError):
            os.open(m / "a", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        fd = os.open(m / "new", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)
        os.write(fd, b"made")
        os.fsync(fd)  # fsync@openssh.com
        os.close(fd)
        assert (remote / "new").read_bytes() == b"made"
        assert (remote / "new").stat().st_mode & 0o777 == 0o640
        # a new name gets the mode the caller's umask leaves, not what sshd's own umask (022) leaves
        old_umask = os.umask(0)
        try:
            os.mkdir(m / "open", 0o777)
            os.close(os.open(m / "shared", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        finally:
            os.umask(old_umask)
        assert (m / "open").stat().st_mode & 0o777 == 0o777 == (remote / "open").stat().st_mode & 0o777
        assert (m / "shared").stat().st_mode & 0o777 == 0o666 == (remote / "shared").stat().st_mode & 0o777
        # O_TRUNC
        fd = os.open(m / "b", os.O_WRONLY | os.O_TRUNC)
        os.close(fd)
        assert (remote / "b").stat().st_size == 0 == (m / "b").stat().st_size
        # rename over an existing file (posix-rename@openssh.com), and a directory rename
        os.rename(m / "a", m / "b")
        assert (remote / "b").read_text() == "first file\n" == (m / "b").read_text()
        assert not (remote / "a").exists() and not (m / "a").exists()
        os.mkdir(m / "d")
        (m / "d" / "inner").write_text("inside")
        os.rename(m / "d", m / "e")
        assert (m / "e" / "inner").read_text() == "inside" == (remote / "e" / "inner").read_text()
        with pytest.raises(OSError) as exc:
            os.rmdir(m / "full")
        assert exc.value.errno == errno.ENOTEMPTY
        with pytest.raises(FileExistsError):
            os.mkdir(m / "full")
        # symlink, hard link (hardlink@openssh.com), chmod, chown, truncate, utimens
        os.symlink("b", m / "sym")
        assert os.readlink(m / "sym") == "b" == os.readlink(remote / "sym")
        os.link(m / "b", m / "hard")
        assert (remote / "hard").stat().st_ino == (remote / "b").stat().st_ino
        assert (m / "hard").read_text() == "first file\n"
        os.chmod(m / "b", 0o604)
        assert (remote / "b").stat().st_mode & 0o777 == 0o604 == (m / "b").stat().st_mode & 0o777
        os.chown(m / "b", 1234, 5678)
        st = (remote / "b").stat()
        assert (st.st_uid, st.st_gid) == (1234, 5678) == ((m / "b").stat().st_uid, (m / "b").stat().st_gid)
        os.truncate(m / "b", 5)
        assert (remote / "b").read_text() == "first" == (m / "b").read_text()
        os.utime(m / "b", (1_000_000_000, 1_200_000_000))
        assert (remote / "b").stat().st_mtime == 1_200_000_000 == (m / "b").stat().st_mtime
        # statfs: statvfs@openssh.com
        here, there = os.statvfs(mnt), os.statvfs(remote)
        assert (here.f_blocks, here.f_bsize, here.f_files) == (there.f_blocks, there.f_bsize, there.f_files)
        # unlink and errors a local filesystem gives
        os.unlink(m / "hard")
        assert not (remote / "hard").exists()
        with pytest.raises(FileNotFoundError):
            os.stat(m / "missing")
        with pytest.raises(IsADirectoryError):
            os.unlink(m / "full")
        # a larger file written and read back (pipelined writes, read-ahead)
        data = os.urandom(3 << 20)
        (m / "big").write_bytes(data)
        assert (remote / "big").read_bytes() == data
        assert (m / "big").read_bytes() == data
        with open(m / "big", "rb") as f:  # random access
            f.seek(1 << 20)
            assert f.read(1000) == data[1 << 20:(1 << 20) + 1000]
            f.seek(17)
            assert f.read(5) == data[17:22]


@pytest.mark.parametrize("poll", [[], ["--poll-us", "50"]], ids=["sleep", "poll"])
def test_lookups_in_an_unlisted_directory(sshd: Any, tmp_path: Path, poll: list[str]) -> None:
    """After a few lookups miss, sftpfs lists the directory and answers the rest from the listing
    (also with busy polling, which answers request after request without sleeping in between)."""
    remote = tmp_path / "remote"
    (remote / "d").mkdir(parents=True)
    for i in range(20):
        (remote / "d" / f"f{i}").write_bytes(b"x" * i)
    with sftpfs(sshd, remote, *poll) as mnt:
        d = Path(mnt, "d")
        assert [(d / f"f{i}").stat().st_size for i in range(20)] == list(range(20))
        with pytest.raises(FileNotFoundError):
            (d / "nothing").stat()
        (d / "new").write_text("made here")  # a change through the mount is seen at once
        assert (d / "new").read_text() == "made here"
        assert sorted(os.listdir(d)) == sorted([f"f{i}" for i in range(20)] + ["new"])


@TRANSPORTS
def test_follow_symlinks(sshd: Any, tmp_path: Path, transport: str) -> None:
    """``-o follow_symlinks`` (sshfs's): a symlink on the server shows as what it points to, in
    listings (READDIR's types, over several READDIR batches), lookups and stat; a dangling one
    stays a symlink. Without it, symlinks are symlinks."""
    remote = tmp_path / "remote"
    (remote / "big").mkdir(parents=True)
    (remote / "dir").mkdir()
    (remote / "dir" / "inside").write_text("inside\n")
    (remote / "file").write_text("12345")
    for i in range(250):  # symlinks spread over three READDIR batches, among plain files
        (remote / "big" / f"f{i:03}").write_text("x" * i)
        if i % 7 == 0:
            os.symlink(f"f{i:03}", remote / "big" / f"l{i:03}")
    os.symlink("dir", remote / "to-dir")
    os.symlink("file", remote / "to-file")
    os.symlink("nowhere", remote / "dangling")
    with sftpfs(sshd, remote, "--transport", transport, "-o", "follow_symlinks") as mnt:
        with os.scandir(mnt) as it:  # types from the listing, without a stat
            kinds = {e.name: ("dir" if e.is_dir(follow_symlinks=False) else "link" if e.is_symlink() else "file")
                     for e in it}
        assert kinds == {"big": "dir", "dir": "dir", "file": "file", "to-dir": "dir", "to-file": "file",
                         "dangling": "link"}
        assert Path(mnt, "to-dir", "inside").read_text() == "inside\n"
        assert os.lstat(Path(mnt, "to-file")).st_size == 5 and not os.path.islink(Path(mnt, "to-file"))
        assert os.readlink(Path(mnt, "dangling")) == "nowhere"
        with os.scandir(Path(mnt, "big")) as it:
            sizes = {e.name: e.stat(follow_symlinks=False).st_size for e in it}
        assert sizes == {**{f"f{i:03}": i for i in range(250)}, **{f"l{i:03}": i for i in range(0, 250, 7)}}
    with sftpfs(sshd, remote, "--transport", transport) as mnt:
        assert os.path.islink(Path(mnt, "to-dir")) and os.readlink(Path(mnt, "to-dir")) == "dir"
        with os.scandir(Path(mnt, "big")) as it:
            assert sum(e.is_symlink() for e in it) == len(range(0, 250, 7))


def test_transform_symlinks(sshd: Any, tmp_path: Path) -> None:
    """``-o transform_symlinks`` (sshfs's): an absolute symlink target inside the mounted directory
    reads as relative to the link, so it points inside the mount; others read as they are."""
    remote = tmp_path / "remote"
    (remote / "a" / "b").mkdir(parents=True)
    (remote / "c").mkdir()
    (remote / "c" / "file").write_text("inside\n")
    os.symlink(remote / "c" / "file", remote / "a" / "b" / "abs")
    os.symlink(remote, remote / "a" / "top")
    os.symlink("/etc/hostname", remote / "outside")
    os.symlink("c/file", remote / "rel")
    with sftpfs(sshd, remote, "-o", "transform_symlinks") as mnt:
        assert os.readlink(Path(mnt, "a", "b", "abs")) == "../../c/file"
        assert Path(mnt, "a", "b", "abs").read_text() == "inside\n"  # through the mount
        assert os.readlink(Path(mnt, "a", "top")) == ".."
        assert os.readlink(Path(mnt, "outside")) == "/etc/hostname"
        assert os.readlink(Path(mnt, "rel")) == "c/file"
    with sftpfs(sshd, remote) as mnt:
        assert os.readlink(Path(mnt, "a", "b", "abs")) == str(remote / "c" / "file")


def test_large_listing_matches_server(sshd: Any, tmp_path: Path) -> None:
    """A directory of 1,500 entries (READDIRs in several waves) lists with every name, type, mode,
    size and mtime the server has, from os.scandir and from lstat of each name."""
    remote = tmp_path / "remote"
    (remote / "big").mkdir(parents=True)
    for i in range(1500):
        (remote / "big" / f"f{i:04d}").write_bytes(b"z" * (i % 7))
    os.chmod(remote / "big" / "f0003", 0o600)
    os.utime(remote / "big" / "f0004", (1_000_000, 2_000_000))
    (remote / "big" / "sub").mkdir()
    os.symlink("f0001", remote / "big" / "link")
    names = sorted(os.listdir(remote / "big"))

    def server(n: str) -> tuple[int, int, int]:
        st = os.lstat(remote / "big" / n)
        return st.st_mode, st.st_size, int(st.st_mtime)

    with sftpfs(sshd, remote) as mnt:
        big = Path(mnt, "big")
        assert sorted(os.listdir(big)) == names
        with os.scandir(big) as it:
            seen = {e.name: (e.is_dir(follow_symlinks=False), e.is_symlink(), e.inode()) for e in it}
        assert sorted(seen) == names
        assert seen["sub"][0] and seen["link"][1] and not seen["f0001"][0]
        for n in names:
            st = os.lstat(big / n)
            assert (st.st_mode, st.st_size, int(st.st_mtime)) == server(n), n
            assert st.st_ino == seen[n][2], n  # d_ino from the listing is the inode number stat reports
        assert os.stat(big).st_blksize == 4096 and os.stat(big / "f0001").st_blksize == 128 * 1024


def test_listing_follows_changes_through_the_mount(sshd: Any, tmp_path: Path) -> None:
    """A cached listing is updated in place by changes made through the mount (every name made,
    removed or renamed shows at once, with its current size), and is kept: a name made on the
    server by someone else stays unseen until the listing's timeout, as with sshfs."""
    remote = tmp_path / "remote"
    (remote / "d").mkdir(parents=True)
    (remote / "other").mkdir()
    for name in ("a", "b", "gone"):
        (remote / "d" / name).write_text(name)
    (remote / "d" / "sub").mkdir()
    with sftpfs(sshd, remote, "-o", "cache_timeout=3") as mnt:
        d = Path(mnt, "d")
        listed = time.monotonic()
        assert sorted(os.listdir(d)) == ["a", "b", "gone", "sub"]

        def same() -> None:
            names = sorted(os.listdir(remote / "d"))
            assert sorted(os.listdir(d)) == [n for n in names if n != "elsewhere"]
            for n in names:
                if n != "elsewhere":
                    assert os.lstat(d / n).st_size == os.lstat(remote / "d" / n).st_size, n

        (remote / "d" / "elsewhere").write_text("made on the server")  # after the listing
        for i in range(10):  # a directory being filled: each name misses a lookup, then is made
            (d / f"new{i}").write_bytes(b"y" * (i + 1))
        same()
        (d / "a").write_text("longer than before")  # written after the listing
        same()
        os.mkdir(d / "made")
        os.symlink("a", d / "sym")
        os.link(d / "b", d / "hard")
        os.unlink(d / "gone")
        os.rmdir(d / "sub")
        os.rename(d / "b", d / "b2")
        os.rename(d / "a", d / "new0")  # over an existing name
        os.rename(d / "new1", Path(mnt, "other", "moved"))
        os.rename(Path(mnt, "other", "moved"), d / "back")
        same()
        assert (d / "new0").read_text() == "longer than before"
        with pytest.raises(FileNotFoundError):
            os.stat(d / "elsewhere")  # the listing was kept (and updated in place), not read again
        if time.monotonic() - listed < 2.5:  # well within cache_timeout=3: never flaky, just checked less
            assert "elsewhere" not in os.listdir(d)
        time.sleep(max(0.0, listed + 3.2 - time.monotonic()))
        assert (d / "elsewhere").read_text() == "made on the server"  # after the timeout it shows
        assert sorted(os.listdir(d)) == sorted(os.listdir(remote / "d"))


def test_parallel_readers_over_connections(sshd: Any, tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    remote.mkdir()
    blobs = {f"f{i}": os.urandom((1 << 20) + i * 4099) for i in range(8)}
    for name, data in blobs.items():
        (remote / name).write_bytes(data)
    with sftpfs(sshd, remote, "--connections", "3") as mnt:
        got: dict[str, bytes] = {}

        def read(name: str) -> None:
            got[name] = (Path(mnt) / name).read_bytes()

        threads = [threading.Thread(target=read, args=(n,)) for n in blobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert got == blobs


@TRANSPORTS
def test_idmap_user(tmp_path: Path, transport: str) -> None:
    """-o idmap=user (as sshfs's): the owner of the login directory is the remote user, shown as
    this process's uid and gid; other ids pass unchanged; chown to ours sets the remote user's."""
    login = tmp_path / "login"  # internal-sftp -d: the SFTP session starts here
    login.mkdir()
    (login / "mine").write_bytes(b"m")
    (login / "other").write_bytes(b"o")
    os.chown(login, 4321, 4322)
    os.chown(login / "mine", 4321, 4322)
    os.chown(login / "other", 555, 556)
    (login / "theirs").write_bytes(b"r")
    os.chown(login / "theirs", 555, 556)
    me = (os.getuid(), os.getgid())
    with sshd_tool.running_sshd(sftp_server=f"internal-sftp -d {login}") as server:
        with sftpfs(server, login, "-o", "idmap=user", "--transport", transport) as mnt:
            st = os.stat(mnt)
            assert (st.st_uid, st.st_gid) == me
            st = os.stat(Path(mnt) / "mine")
            assert (st.st_uid, st.st_gid) == me
            st = os.stat(Path(mnt) / "other")
            assert (st.st_uid, st.st_gid) == (555, 556)
            os.chown(Path(mnt) / "theirs", *me)  # ours: the remote user's on the server
            st = os.stat(login / "theirs")
            assert (st.st_uid, st.st_gid) == (4321, 4322)
            assert (os.stat(Path(mnt) / "theirs").st_uid, os.stat(Path(mnt) / "theirs").st_gid) == me
            os.chown(Path(mnt) / "mine", 777, -1)  # other ids as given; gid unchanged
            st = os.stat(login / "mine")
            assert (st.st_uid, st.st_gid) == (777, 4322)
        with sftpfs(server, login, "--transport", transport) as mnt:  # idmap=none: as they are
            st = os.stat(Path(mnt) / "theirs")
            assert (st.st_uid, st.st_gid) == (4321, 4322)


def test_idmap_file(tmp_path: Path) -> None:
    """-o idmap=file,uidfile=F,gidfile=F (sshfs's): remote ids shown as the local user and group
    the files name; unmapped ids pass unchanged, or with nomap=error are refused (EPERM); chown
    maps back. Bad files are command-line errors."""
    login = tmp_path / "login"
    login.mkdir()
    for name, owner in (("mapped", (4321, 4322)), ("unmapped", (555, 556)), ("theirs", (555, 556))):
        (login / name).write_bytes(b"x")
        os.chown(login / name, *owner)
    nobody, nogroup = pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid
    uidfile, gidfile = tmp_path / "uids", tmp_path / "gids"
    uidfile.write_text("# local name:remote uid\nnobody:4321\n")
    gidfile.write_text("nogroup:4322\n")
    maps = f"idmap=file,uidfile={uidfile},gidfile={gidfile}"
    with sshd_tool.running_sshd(sftp_server=f"internal-sftp -d {login}") as server:
        with sftpfs(server, login, "-o", maps) as mnt:
            st = os.stat(Path(mnt) / "mapped")
            assert (st.st_uid, st.st_gid) == (nobody, nogroup)
            st = os.stat(Path(mnt) / "unmapped")
            assert (st.st_uid, st.st_gid) == (555, 556)
            os.chown(Path(mnt) / "theirs", nobody, nogroup)  # mapped back on the server
            assert (os.stat(login / "theirs").st_uid, os.stat(login / "theirs").st_gid) == (4321, 4322)
        os.chown(login / "theirs", 555, 556)
        with sftpfs(server, login, "-o", maps + ",nomap=error") as mnt:
            assert os.stat(Path(mnt) / "mapped").st_uid == nobody
            with pytest.raises(PermissionError):
                os.stat(Path(mnt) / "unmapped")
            with pytest.raises(PermissionError):
                os.chown(Path(mnt) / "mapped", 777, -1)  # no mapping for it: refused
            assert os.stat(login / "mapped").st_uid == 4321
        for opts, why in (("idmap=file", "needs uidfile"), (f"uidfile={uidfile}", "go with idmap=file"),
                          (f"idmap=file,uidfile={tmp_path / 'missing'}", "No such file"),
                          (f"idmap=file,uidfile={gidfile}", "no local user named 'nogroup'"),
                          (maps + ",nomap=maybe", "nomap must be")):
            res = subprocess.run([sys.executable, "-m", "afuse.examples.sftpfs", server.target(str(login)),
                                  str(tmp_path), "-o", opts], capture_output=True, text=True, timeout=60)
            assert res.returncode == 2 and why in res.stderr, (opts, res.stderr)


def test_directport(tmp_path: Path) -> None:
    """-o directport=PORT (sshfs's): SFTP straight over TCP, no SSH, here to OpenSSH's sftp-server
    behind a listener that gives each connection its own server (as socat or inetd would); when
    the server goes away, requests fail EIO and the mount stays."""
    remote = tmp_path / "remote"
    remote.mkdir()
    data = os.urandom(700_000)
    (remote / "f").write_bytes(data)
    binary = shutil.which("sftp-server") or "/usr/lib/openssh/sftp-server"
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    servers: list[subprocess.Popen[bytes]] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                servers.append(subprocess.Popen([binary, "-d", str(remote)], stdin=conn.fileno(), stdout=conn.fileno()))

    threading.Thread(target=accept, daemon=True).start()
    target = types.SimpleNamespace(target=lambda path: f"127.0.0.1:{path}", port=port,
                                   identity=tmp_path / "unused", known_hosts=tmp_path / "unused")
    try:
        with sftpfs(target, remote, "-o", f"directport={port}") as mnt:
            assert (Path(mnt) / "f").read_bytes() == data
            (Path(mnt) / "g").write_bytes(data[:1000])
            os.rename(Path(mnt) / "g", Path(mnt) / "h")
            assert sorted(os.listdir(mnt)) == ["f", "h"] and (remote / "h").read_bytes() == data[:1000]
            assert len(servers) == 1  # one connection
            listener.close()
            for proc in servers:
                proc.kill()
                proc.wait()
            with pytest.raises(OSError) as e:
                (Path(mnt) / "new").write_bytes(b"x")
            assert e.value.errno == errno.EIO
            assert _mounted(mnt)  # the mount stays (its root's stat may fail EIO: it changed)
    finally:
        listener.close()
        for proc in servers:
            proc.kill()
            proc.wait()


def test_passive_over_stdin_and_stdout(tmp_path: Path) -> None:
    """-o passive (sshfs's; ``slave`` its older name): SFTP over sftpfs's stdin and stdout, here
    joined to OpenSSH's sftp-server by two pipes (as dpipe would); ``ready`` goes to stderr. When
    the server goes away requests fail EIO and the mount stays. Without a pipe or socket on stdin
    and stdout, and with --reconnect, it is a clear error."""
    remote = tmp_path / "remote"
    remote.mkdir()
    data = os.urandom(600_000)
    (remote / "f").write_bytes(data)
    binary = shutil.which("sftp-server") or "/usr/lib/openssh/sftp-server"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-m", "afuse.examples.sftpfs"]
    for bad, stdin in ((["-o", "passive"], subprocess.DEVNULL), (["-o", "slave", "--reconnect"], None)):
        out = subprocess.run([*cmd, f"server:{remote}", str(tmp_path), *bad], stdin=stdin, capture_output=True,
                             text=True, env=env, timeout=60)
        assert out.returncode == 2 and "passive" in out.stderr, out.stderr
    to_fs_r, to_fs_w = os.pipe()
    to_server_r, to_server_w = os.pipe()
    server = subprocess.Popen([binary, "-d", str(remote)], stdin=to_server_r, stdout=to_fs_w)
    mnt = tempfile.mkdtemp(prefix="afuse-sftpfs-")
    errlog = tmp_path / "stderr"
    with open(errlog, "wb") as err:
        proc = subprocess.Popen([*cmd, f":{remote}", mnt, "-o", "passive"], stdin=to_fs_r, stdout=to_server_w,
                                stderr=err, env=env)
    for fd in (to_fs_r, to_fs_w, to_server_r, to_server_w):
        os.close(fd)
    try:
        deadline = time.monotonic() + 30
        while b"ready" not in errlog.read_bytes().splitlines() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _mounted(mnt), errlog.read_text()
        m = Path(mnt)
        assert (m / "f").read_bytes() == data
        (m / "d").mkdir()
        (m / "d" / "g").write_bytes(data[:5000])
        assert sorted(os.listdir(m)) == ["d", "f"] and (remote / "d" / "g").read_bytes() == data[:5000]
        server.kill()
        server.wait()
        with pytest.raises(OSError) as e:
            (m / "new").write_bytes(b"x")
        assert e.value.errno == errno.EIO
        assert _mounted(mnt)  # the mount stays
    finally:
        server.kill()
        server.wait()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(15)
        if _mounted(mnt):
            subprocess.run(["umount", "-l", mnt], check=False, timeout=15)
        os.rmdir(mnt)
    assert "Traceback" not in errlog.read_text()


def _ssh_children_argv(port: int) -> list[list[str]]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in argv if a]
        if args and os.path.basename(args[0]) == "ssh" and str(port) in args:
            out.append(args)
    return out


def test_ssh_options_reach_the_ssh_client(sshd: Any, tmp_path: Path) -> None:
    """ssh's own options (-o Compression=yes, -o ServerAliveInterval=N, ...) go to the ssh client
    first, so they win over sftpfs's defaults, as with sshfs; mount options still go to the mount."""
    from afuse.examples.sftpfs import _options, make_parser, ssh_argv

    o, mount = _options(make_parser().parse_args(
        ["h:/d", "/m", "-o", "ProxyJump=far,Compression=yes,ro", "-o", "ServerAliveInterval=7"]))
    assert o.ssh_options == ["ProxyJump=far", "Compression=yes", "ServerAliveInterval=7"]
    alive = [a for a in ssh_argv(o) if a.startswith("-oServerAliveInterval=")]
    assert alive[0] == "-oServerAliveInterval=7" and len(alive) == 2  # the user's first: ssh takes it
    assert mount.ro  # a mount option, still
    remote = tmp_path / "remote"
    remote.mkdir()
    data = os.urandom(300_000)
    (remote / "f").write_bytes(data)
    with sftpfs(sshd, remote, "-o", "Compression=yes,ServerAliveInterval=7") as mnt:
        assert (Path(mnt) / "f").read_bytes() == data
        children = _ssh_children_argv(sshd.port)
        assert any("-oCompression=yes" in a and "-oServerAliveInterval=7" in a for a in children), children
    # -o sftp_server: a subsystem name (-s), or a command for the remote shell (a path), as sshfs
    o, _ = _options(make_parser().parse_args(["h:/d", "/m", "-o", "sftp_server=other"]))
    assert ssh_argv(o)[-4:] == ["-s", "--", "h", "other"]
    server = shutil.which("sftp-server") or "/usr/lib/openssh/sftp-server"
    with sftpfs(sshd, remote, "-o", f"sftp_server={server} -l INFO") as mnt:
        assert (Path(mnt) / "f").read_bytes() == data
        assert any(a[-1] == f"{server} -l INFO" and "-s" not in a for a in _ssh_children_argv(sshd.port))


def test_sshfs_option_names_and_shown_owner_and_mode(sshd: Any, tmp_path: Path) -> None:
    """sshfs's option names (max_conns, dir_cache, dcache_*) and libfuse's uid=, gid=, umask=:
    every file shown with that owner and mode, while chmod and chown still reach the server."""
    from afuse.examples.sftpfs import _options, make_parser

    o, _ = _options(make_parser().parse_args(
        ["h:/d", "/m", "-o", "max_conns=3,dcache_timeout=5,dcache_link_timeout=2,dir_cache=no"]))
    assert (o.connections, o.stat_timeout, o.dir_timeout, o.link_timeout) == (3, 5.0, 0.0, 2.0)
    o, _ = _options(make_parser().parse_args(["h:/d", "/m", "-o", "uid=4321,gid=4322,umask=027"]))
    assert (o.uid, o.gid, o.umask) == (4321, 4322, 0o027)
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "f").write_bytes(b"data")
    (remote / "d").mkdir()
    os.chmod(remote / "f", 0o600)
    os.symlink("f", remote / "l")
    with sftpfs(sshd, remote, "-o", "uid=4321,gid=4322,umask=027,max_conns=2,dir_cache=no") as mnt:
        for name, kind in (("f", stat.S_IFREG), ("d", stat.S_IFDIR), ("l", stat.S_IFLNK)):
            st = os.lstat(Path(mnt) / name)
            assert (st.st_uid, st.st_gid, st.st_mode) == (4321, 4322, kind | 0o750), name
        assert (Path(mnt) / "f").read_bytes() == b"data"
        os.chmod(Path(mnt) / "f", 0o644)  # reaches the server; shown as umask says
        assert stat.S_IMODE(os.stat(remote / "f").st_mode) == 0o644
        assert stat.S_IMODE(os.stat(Path(mnt) / "f").st_mode) == 0o750
        os.chown(Path(mnt) / "f", 555, 556)
        assert (os.stat(remote / "f").st_uid, os.stat(remote / "f").st_gid) == (555, 556)
        assert os.stat(Path(mnt) / "f").st_uid == 4321
        assert len(_ssh_children_argv(sshd.port)) == 2  # max_conns=2: two connections
        assert sorted(os.listdir(mnt)) == ["d", "f", "l"]
        (remote / "new").write_bytes(b"n")  # dir_cache=no: the next listing asks the server
        assert sorted(os.listdir(mnt)) == ["d", "f", "l", "new"]


def test_a_small_file_is_one_read(tmp_path: Path) -> None:
    """Opening and reading a file smaller than a chunk sends one SFTP READ: a short answer that
    reaches the size known is the end of the file (asking for the rest would cost a round trip),
    while a longer file is still read whole. Counted in sftp-server's own log."""
    log = tmp_path / "sftp-server.log"
    remote = tmp_path / "remote"
    remote.mkdir()
    small, big = os.urandom(4096), os.urandom(700_000)
    (remote / "small").write_bytes(small)
    (remote / "big").write_bytes(big)
    server_cmd = f"/usr/lib/openssh/sftp-server -e -l DEBUG3 2>>{log}"
    with sshd_tool.running_sshd(sftp_server=server_cmd) as server:
        with sftpfs(server, remote) as mnt:
            def reads() -> int:
                return len(re.findall(r"request \d+: read\b", log.read_text(errors="replace")))

            os.stat(Path(mnt) / "small")
            before = reads()
            assert (Path(mnt) / "small").read_bytes() == small
            time.sleep(0.3)
            assert reads() - before == 1, log.read_text(errors="replace")[-2000:]
            assert (Path(mnt) / "big").read_bytes() == big


def test_readers_at_once_share_the_read_ahead() -> None:
    """One sequential reader may read ``readahead`` ahead; readers at once share twice that
    (never below two chunks each), and a closed or jumping reader gives its share back."""
    from afuse.examples.sftpfs import CHUNK, Pool, SftpOptions

    async def main() -> None:
        pool = Pool(SftpOptions(host="h", readahead=8 << 20))
        assert pool.readahead() == 8 << 20
        files = [object() for _ in range(8)]
        pool.streaming.update(files[:2])  # type: ignore[arg-type]
        assert pool.readahead() == 8 << 20
        pool.streaming.update(files)  # type: ignore[arg-type]
        assert pool.readahead() == 2 << 20
        pool.streaming.update(object() for _ in range(100))  # type: ignore[misc]
        assert pool.readahead() == 2 * CHUNK
        pool.streaming.clear()
        assert pool.readahead() == 8 << 20

    asyncio.run(main())


# -- failures ---------------------------------------------------------------------------------------

# Holds a file of the mount open across the crash (a process of its own: the test never blocks on the mount).
HOLDER = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
print(os.pread(fd, 4, 0).decode(), flush=True)
sys.stdin.readline()
try:
    print(os.pread(fd, 4, int(sys.argv[2])).decode(), flush=True)
except OSError as e:
    print("error", e.errno, flush=True)
"""


def _line(proc: subprocess.Popen[str], timeout: float = 30.0) -> str:
    assert proc.stdout is not None
    if not select.select([proc.stdout], [], [], timeout)[0]:
        raise AssertionError("no answer within the timeout")
    return proc.stdout.readline().strip()


@TRANSPORTS
def test_killed_sshd_gives_eio_then_reconnect(tmp_path: Path, transport: str) -> None:
    remote = tmp_path / "remote"
    remote.mkdir()
    size = 1 << 30
    with open(remote / "big", "wb") as f:
        f.write(b"head")
        f.seek(size - 8192)
        f.write(b"tail")
        f.truncate(size)
    (remote / "small").write_text("abc")
    with sshd_tool.running_sshd() as server, sftpfs(server, remote, "--reconnect", "--timeout", "3",
                                                              "--transport", transport) as mnt:
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, f"{mnt}/big", str(size - 8192)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert _line(holder) == "head"
            reader = subprocess.Popen(["dd", f"if={mnt}/big", "of=/dev/null", "bs=1M"],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            time.sleep(0.5)
            assert reader.poll() is None, "the reader finished before the server was killed"
            server.kill()
            _out, err = reader.communicate(timeout=30)
            assert reader.returncode != 0
            assert "Input/output error" in err
            # while the server is down: EIO (reconnecting is refused)
            res = subprocess.run(["cat", f"{mnt}/small"], capture_output=True, text=True, timeout=30)
            assert res.returncode != 0 and "Input/output error" in res.stderr
            assert _mounted(mnt)
            server.restart()
            deadline = time.monotonic() + 20
            while True:
                res = subprocess.run(["cat", f"{mnt}/small"], capture_output=True, text=True, timeout=30)
                if res.returncode == 0 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert res.stdout == "abc", res.stderr
            # the file opened before the crash is reopened on the new connection
            out, _ = holder.communicate("\n", timeout=30)
            assert out.strip() == "tail"
        finally:
            if holder.poll() is None:
                holder.kill()
                holder.wait(30)


@TRANSPORTS
def test_unresponsive_server_gives_eio(tmp_path: Path, transport: str) -> None:
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "data").write_text("payload")
    with sshd_tool.running_sshd() as server, sftpfs(server, remote, "--timeout", "2", "-o", "cache=no",
                                                              "--transport", transport) as mnt:
        assert Path(mnt, "data").read_text() == "payload"
        frozen = sshd_tool._children(server.pid)  # the session processes: the connection stays open
        assert frozen
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        try:
            res = subprocess.run(["cat", f"{mnt}/data"], capture_output=True, text=True, timeout=30)
            assert res.returncode != 0 and "Input/output error" in res.stderr
            assert _mounted(mnt)
            # the timed-out connection was dropped; without --reconnect every request now fails at once
            res = subprocess.run(["stat", f"{mnt}/data"], capture_output=True, text=True, timeout=30)
            assert res.returncode != 0 and "Input/output error" in res.stderr
        finally:
            for pid in frozen:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)


def _server_reads(server: Any) -> int:
    """Bytes the server's session processes have read (files and sockets)."""
    total = 0
    for pid in sshd_tool._children(server.pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/io").read_text().splitlines():
                if line.startswith("rchar:"):
                    total += int(line.split()[1])
    return total


def test_interrupted_cat_stops_reads(sshd: Any, tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    remote.mkdir()
    size = 4 << 30
    with open(remote / "huge", "wb") as f:
        f.truncate(size)
    with sftpfs(sshd, remote) as mnt:
        before = _server_reads(sshd)
        cat = subprocess.Popen(["cat", f"{mnt}/huge"], stdout=subprocess.DEVNULL)
        time.sleep(1.0)
        assert cat.poll() is None
        cat.kill()
        cat.wait(30)
        deadline = time.monotonic() + 20
        last = _server_reads(sshd)
        while time.monotonic() < deadline:  # reads in flight finish; then nothing more is read
            time.sleep(0.5)
            now = _server_reads(sshd)
            if now - last < CHUNK_MIN:
                break
            last = now
        settled = _server_reads(sshd)
        time.sleep(1.0)
        after = _server_reads(sshd)
        print(f"server read {(settled - before) >> 20} MiB of {size >> 20} MiB, then {after - settled} bytes in 1 s")
        assert settled - before > 0, "nothing was read"
        assert after - settled < CHUNK_MIN, f"the server still reads: {after - settled} bytes in 1 s"
        assert after - before < size // 2


CHUNK_MIN = 64 * 1024  # less than one read request: only keepalives and the like


def test_poll_sees_remote_change(sshd: Any, tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "f").write_text("one")
    (remote / "gone").write_text("soon deleted")
    with sftpfs(sshd, remote, "--poll", "0.3", "-o", "cache_timeout=600") as mnt:
        m = Path(mnt)
        assert (m / "f").read_text() == "one"
        assert (m / "gone").exists()
        assert not (m / "later").exists()
        sorted(os.listdir(m))
        (remote / "f").write_text("two two")
        os.utime(remote / "f", (2_000_000_000, 2_000_000_000))
        (remote / "gone").unlink()
        (remote / "later").write_text("new")
        os.utime(remote, (2_000_000_000, 2_000_000_000))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if ((m / "f").read_text() == "two two" and not (m / "gone").exists() and (m / "later").exists()
                    and sorted(os.listdir(m)) == ["f", "later"]):
                break
            time.sleep(0.2)
        assert (m / "f").read_text() == "two two"
        assert not (m / "gone").exists()
        assert (m / "later").read_text() == "new"
        assert sorted(os.listdir(m)) == ["f", "later"]


# -- the command line ---------------------------------------------------------------------------------

def test_command_line_errors(sshd: Any, tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "afuse.examples.sftpfs", *args], capture_output=True,
                              text=True, timeout=60)

    res = run("no-colon-here", str(tmp_path))
    assert res.returncode == 2 and "[USER@]HOST:[DIR]" in res.stderr
    res = run(f":{tmp_path}", str(tmp_path))
    assert res.returncode == 2 and "names no HOST" in res.stderr
    res = run(sshd.target(str(tmp_path)), str(tmp_path), "-o", "cache_timeout=-1")
    assert res.returncode == 2 and "cache_timeout" in res.stderr
    port = sshd_tool.free_port()
    res = run(f"root@127.0.0.1:{tmp_path}", str(tmp_path), "-p", str(port), "--timeout", "5",
              "-i", str(sshd.identity), "-o", f"known_hosts={sshd.known_hosts}")
    assert res.returncode == 1 and "cannot connect" in res.stderr
    res = run(sshd.target(str(tmp_path / "missing")), str(tmp_path), "-p", str(sshd.port), "-i", str(sshd.identity),
              "-o", f"known_hosts={sshd.known_hosts}")
    assert res.returncode == 1 and "missing" in res.stderr
    # the ssh transport: a command that is not there, a bad port, a host key that does not match
    res = run(sshd.target(str(tmp_path)), str(tmp_path), "-o", "ssh_command=/nonexistent/ssh -v")
    assert res.returncode == 2 and "/nonexistent/ssh" in res.stderr and "not found" in res.stderr
    res = run(sshd.target(str(tmp_path)), str(tmp_path), "-p", "70000")
    assert res.returncode == 2 and "70000" in res.stderr
    res = run(sshd.target(str(tmp_path)), str(tmp_path), "--poll-us", "-1")
    assert res.returncode == 2 and "--poll-us" in res.stderr
    res = run(sshd.target(str(tmp_path)), str(tmp_path), "-o", "idmap=group")
    assert res.returncode == 2 and "idmap must be user, file or none" in res.stderr
    res = run(sshd.target(str(tmp_path)), str(tmp_path), "--transport", "asyncssh", "-o", "sftp_server=/x/y")
    assert res.returncode == 2 and "sftp_server needs --transport ssh" in res.stderr
    res = run(sshd.target(str(tmp_path)), str(tmp_path), "--transport", "asyncssh", "-o", "ProxyJump=far")
    assert res.returncode == 2 and "ProxyJump=far is an option of the ssh client" in res.stderr
    res = run(sshd.target(str(tmp_path)), str(tmp_path), "-o", "Compression")
    assert res.returncode == 2 and "ssh option Compression needs a value" in res.stderr
    for opt, why in (("password_stdin", "never asks for a password"), ("umask=999", "umask must be octal"),
                     ("umask=1777", "umask 1777 is not 0-777"), ("uid=me", "uid must be a number"),
                     ("gid=-1", "gid -1 is not a valid id"), ("max_conns=0", "max_conns must be >= 1"),
                     ("dir_cache=maybe", "dir_cache must be yes or no"), ("dcache_timeout=-2", "cache_timeout")):
        res = run(sshd.target(str(tmp_path)), str(tmp_path), "-o", opt)
        assert res.returncode == 2 and why in res.stderr, (opt, res.stderr)
    wrong = tmp_path / "wrong_known_hosts"
    wrong.write_text(f"[127.0.0.1]:{sshd.port} ssh-ed25519 "
                     "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n")
    res = run(sshd.target(str(tmp_path)), str(tmp_path), "-p", str(sshd.port), "-i", str(sshd.identity),
              "-o", f"known_hosts={wrong}", "--timeout", "10")
    assert res.returncode == 1 and "cannot connect" in res.stderr
    assert "HOST IDENTIFICATION HAS CHANGED" in res.stderr  # ssh's own message, passed on


# -- decoding SSH_FXP_NAME ----------------------------------------------------------------------------

def _string(b: bytes) -> bytes:
    return len(b).to_bytes(4, "big") + b


def test_parse_names_all_attribute_forms() -> None:
    """parse_names reads OpenSSH's usual attributes (flags 0xF), any subset of them, and extended
    pairs; it leaves out ``.`` and ``..``; it refuses a truncated reply."""
    import struct

    from afuse.examples.sftpfs import FileAttrs, parse_names

    entries = [
        _string(b"full") + _string(b"-rw-r--r-- 1 u g 5 full") + struct.pack(">IQIIIII", 0xF, 5, 1, 2, 0o100644, 7, 8),
        _string(b"none") + _string(b"") + struct.pack(">I", 0),
        _string(b"mode+times") + _string(b"x") + struct.pack(">IIII", 0x4 | 0x8, 0o40755, 9, 10),
        _string(b"ext") + _string(b"y") + struct.pack(">IQ", 0x1 | 0x80000000, 3) + struct.pack(">I", 2)
        + _string(b"a@x") + _string(b"1") + _string(b"b@x") + _string(b""),
        _string("é".encode()) + _string(b"z") + struct.pack(">III", 0x2, 1000, 1001),
        _string(b".") + _string(b"d") + struct.pack(">II", 0x4, 0o40755),
        _string(b"..") + _string(b"d") + struct.pack(">II", 0x4, 0o40755),
        _string(b"...") + _string(b"d") + struct.pack(">II", 0x4, 0o40700),
    ]
    payload = len(entries).to_bytes(4, "big") + b"".join(entries)
    attrs: dict[bytes, FileAttrs] = {}
    expected = {
        b"full": FileAttrs(5, 1, 2, 0o100644, 7, 8),
        b"none": FileAttrs(),
        b"mode+times": FileAttrs(permissions=0o40755, atime=9, mtime=10),
        b"ext": FileAttrs(size=3),
        "é".encode(): FileAttrs(uid=1000, gid=1001),
        b"...": FileAttrs(permissions=0o40700),
    }
    assert parse_names(payload, attrs) == list(expected)
    assert attrs == expected
    assert parse_names((0).to_bytes(4, "big"), attrs) == []
    for cut in (3, 10, len(payload) - 1):
        with pytest.raises(ValueError):
            parse_names(payload[:cut], {})


# -- a server that reads less than asked ------------------------------------------------------------

@TRANSPORTS
def test_short_reads_are_not_the_end_of_the_file(tmp_path: Path, transport: str) -> None:
    """A server may answer a READ with less than asked (older OpenSSH: 64 KiB at most); sftpfs
    asks for the rest instead of taking it as the end of the file (it once cut files short)."""
    remote = tmp_path / "remote"
    remote.mkdir()
    data = os.urandom(3 << 20)
    (remote / "big").write_bytes(data)
    keys = tmp_path / "keys"
    keys.mkdir()
    server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "short_read_sftp_server.py"), str(keys)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = server.stdout.readline().strip()
        assert port.isdigit(), "the short-read server did not start"
        target = types.SimpleNamespace(target=lambda path: f"{getpass.getuser()}@127.0.0.1:{path}", port=port,
                                       identity=keys / "id_ed25519", known_hosts=keys / "known_hosts")
        with sftpfs(target, remote, "--transport", transport) as mnt:
            with open(Path(mnt, "big"), "rb") as f:
                assert f.read() == data  # sequential: read-ahead chunks
                f.seek(1_000_003)
                assert f.read(300_000) == data[1_000_003:1_300_003]  # a jump: direct reads
                assert os.pread(f.fileno(), 200_000, len(data) - 50_000) == data[-50_000:]
    finally:
        server.kill()
        server.wait(15)
