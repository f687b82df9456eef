"""Mounting and unmounting: mount(2) or fusermount3, mountpoint checks, ``Mount``, the auto_unmount watchdog."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import stat
import subprocess
import tempfile
from typing import Final

import attrs

from afuse.errors import MountError

from ._sys import StrPath, sys_mount, sys_umount2
from .ioctls import abort_connection, open_device
from .mountinfo import escape_mountinfo, find_connection, is_fuse_type, read_mountinfo
from .options import MountOptions

MNT_DETACH: Final = 2
UMOUNT_NOFOLLOW: Final = 8

#: Seconds ``Mount.close`` waits for an auto_unmount fusermount3 to finish.
AUTO_UNMOUNT_WAIT: Final = 5.0


# --------------------------------------------------------------------------- mountpoint


def resolve_mountpoint(path: str) -> str:
    """Make ``path`` absolute and symlink-free without stat()ing a mount point.

    Stat on the root of a FUSE mount blocks until its daemon answers, so the last component is
    only followed (readlink) after making sure it is not a mount point.
    """
    path = os.path.abspath(path)
    mountpoints = {entry.mountpoint for entry in read_mountinfo()}
    for _ in range(40):
        parent, name = os.path.split(path)
        path = os.path.join(os.path.realpath(parent), name)
        if path in mountpoints:
            return path
        try:
            target = os.readlink(path)
        except OSError:
            return path
        path = os.path.normpath(os.path.join(os.path.dirname(path), target))
    raise MountError(errno.ELOOP, f"too many symbolic links in mountpoint {path!r}")


def _check_mountpoint(path: str) -> os.stat_result:
    for entry in read_mountinfo():
        if entry.mountpoint == path:
            hint = (
                f" (a FUSE mount, perhaps of a dead daemon: umount {path} / fusermount3 -u {path})"
                if is_fuse_type(entry.fstype)
                else ""
            )
            raise MountError(
                errno.EBUSY, f"{path!r} is already a mount point{hint}: unmount it first or choose another one"
            )
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MountError(errno.ENOENT, f"mountpoint {path!r} does not exist") from None
    except OSError as exc:
        raise MountError(exc.errno or errno.EIO, f"cannot stat mountpoint {path!r}: {exc.strerror}") from None
    if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise MountError(errno.ENOTDIR, f"mountpoint {path!r} is not a directory or a regular file")
    return st


def check_mountpoint(mountpoint: StrPath) -> os.stat_result:
    """Stat ``mountpoint``; MountError unless it is an existing directory or file not mounted on.

    A mount point is recognised from /proc/self/mountinfo before anything touches it, so an
    unresponsive FUSE mount there fails with EBUSY instead of hanging.
    """
    return _check_mountpoint(resolve_mountpoint(os.fspath(mountpoint)))


# --------------------------------------------------------------------------- Mount


@attrs.define(eq=False)
class Mount:
    """A mounted FUSE filesystem and its session fd."""

    fd: int
    mountpoint: str
    options: MountOptions
    via_fusermount: bool
    _connection: int | None = None
    _sock: socket.socket | None = None
    _process: subprocess.Popen[bytes] | None = None
    _closed: bool = attrs.field(default=False, init=False)

    def connection_id(self) -> int:
        """The connection's number (its directory name under /sys/fs/fuse/connections)."""
        if self._connection is None:
            self._connection = find_connection(self.fd, self.mountpoint) if not self._closed else None
        if self._connection is None:
            raise MountError(errno.ENOENT, f"cannot find the FUSE connection of {self.mountpoint!r}")
        return self._connection

    def is_mounted(self) -> bool:
        """Whether this connection is still mounted on ``mountpoint``."""
        try:
            conn: int | None = self.connection_id()
        except MountError:
            conn = None
        return any(
            entry.mountpoint == self.mountpoint and is_fuse_type(entry.fstype) and (conn is None or entry.dev == conn)
            for entry in read_mountinfo()
        )

    def unmount(self, lazy: bool = False) -> None:
        """Unmount (a no-op if already unmounted); EBUSY raises MountError suggesting ``lazy``.

        A non-lazy unmount of a fuseblk mount sends DESTROY and waits for its reply.
        """
        if not self.is_mounted():
            return
        try:
            _unmount(self.mountpoint, lazy, self.via_fusermount)
        except MountError:
            if self.is_mounted():
                raise

    def abort(self) -> None:
        """Abort the connection through fusectl: callers get ENOTCONN, the daemon ENODEV.

        (ECONNABORTED instead of ENODEV if FUSE_ABORT_ERROR was negotiated.)
        """
        abort_connection(self.connection_id())

    def close(self) -> None:
        """Close the session fd and, for auto_unmount, the fusermount3 socket (idempotent).

        Closing the last fd of a still-mounted connection aborts it (ENOTCONN until unmounted).
        """
        if self._closed:
            return
        self._closed = True
        try:
            os.close(self.fd)
        except OSError:
            pass
        if self._sock is not None:
            keep = _WATCHDOG_SOCKETS.pop(self._sock.fileno(), None)
            if keep is not None:
                keep.close()
            self._sock.close()
        if self._process is not None:
            try:
                self._process.wait(timeout=AUTO_UNMOUNT_WAIT)
            except subprocess.TimeoutExpired:
                pass


# --------------------------------------------------------------------------- mount


def mount(mountpoint: StrPath, options: MountOptions | None = None, *, device_fd: int | None = None) -> Mount:
    """Mount a FUSE filesystem on ``mountpoint``; the returned Mount owns the session fd.

    ``device_fd`` mounts an already-open /dev/fuse fd (e.g. after ``sync_init``) instead of
    opening one; it needs mount(2), and the caller keeps ownership if mounting fails.
    """
    opts = options if options is not None else MountOptions()
    path = resolve_mountpoint(os.fspath(mountpoint))
    st = _check_mountpoint(path)
    if stat.S_ISREG(st.st_mode) and opts.rootmode is None:
        raise MountError(
            errno.ENOTDIR,
            f"mountpoint {path!r} is not a directory; to mount a filesystem whose root is a file "
            f"on it, say so with rootmode=100000",
        )
    rootmode = opts.rootmode if opts.rootmode is not None else stat.S_IFMT(st.st_mode)
    if stat.S_ISDIR(rootmode) != stat.S_ISDIR(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a directory"
        raise MountError(
            errno.ENOTDIR,
            f"rootmode={rootmode:o} does not match mountpoint {path!r}, which is {kind} "
            f"(a directory needs rootmode=40000, a file 100000)",
        )
    if opts.blksize is not None and opts.blockdev is None:
        raise MountError(errno.EINVAL, "blksize is only valid for a fuseblk mount (set blockdev)")
    use_fusermount = opts.use_fusermount if opts.use_fusermount is not None else os.geteuid() != 0
    if use_fusermount:
        if device_fd is not None:
            raise MountError(errno.EINVAL, "device_fd needs mount(2); fusermount3 opens its own fd")
        return _mount_fusermount(path, opts, st)
    return _mount_direct(path, opts, rootmode, device_fd)


def _mount_direct(path: str, opts: MountOptions, rootmode: int, device_fd: int | None) -> Mount:
    if opts.auto_unmount:
        raise MountError(errno.EINVAL, "auto_unmount works only through fusermount3: set use_fusermount=True")
    if opts.blockdev is not None:
        try:
            is_block = stat.S_ISBLK(os.stat(opts.blockdev).st_mode)
        except OSError as exc:
            raise MountError(exc.errno or errno.EIO, f"blockdev {opts.blockdev!r}: {exc.strerror}") from None
        if not is_block:
            raise MountError(errno.ENOTBLK, f"blockdev {opts.blockdev!r} is not a block device")
    fd = open_device() if device_fd is None else device_fd
    try:
        data = opts.kernel_data(fd, rootmode)
        base = "fuse" if opts.blockdev is None else "fuseblk"
        fstype = base if opts.subtype is None else f"{base}.{opts.subtype}"
        source = opts.fsname if opts.blockdev is None else opts.blockdev
        flags = opts.ms_flags()
        err = sys_mount(source, path, fstype, flags, data)
        if err == errno.ENODEV and opts.subtype is not None:
            # A kernel without subtype support: libfuse's fallback puts it into the source.
            fallback = source if opts.blockdev is not None else f"{opts.subtype}#{opts.fsname}"
            err = sys_mount(fallback, path, base, flags, data)
        if err:
            raise _mount_error(err, path, fstype, source, data, flags)
    except BaseException:
        if device_fd is None:
            os.close(fd)
        raise
    return Mount(
        fd=fd,
        mountpoint=path,
        options=opts,
        via_fusermount=False,
        connection=find_connection(fd, path),
    )


def _mount_error(err: int, path: str, fstype: str, source: str, data: str, flags: int) -> MountError:
    what = f"mount(2) of {fstype} on {path!r}"
    hints = {
        errno.EINVAL: f"{what} rejected the options: data={data!r}, flags={flags:#x}",
        errno.EPERM: f"{what} needs CAP_SYS_ADMIN: run as root or mount through fusermount3 (use_fusermount=True)",
        errno.EACCES: f"{what}: permission denied (source {source!r})",
        errno.ENOTDIR: f"{what}: the root's type (rootmode in {data!r}) does not match the mountpoint",
        errno.EBUSY: f"{what}: the mountpoint or device is busy (already mounted?)",
        errno.ENODEV: f"{what}: the kernel does not know {fstype}; load the module (modprobe fuse)",
        errno.ENOTBLK: f"{what}: {source!r} is not a block device",
        errno.ENOENT: f"{what}: {path!r} or {source!r} does not exist",
    }
    return MountError(err, hints.get(err, f"{what} failed: {os.strerror(err)} (data={data!r})"))


def _fusermount() -> str:
    prog = shutil.which("fusermount3")
    if prog is None:
        raise MountError(errno.ENOENT, "fusermount3 not found: install fuse3 (apt install fuse3) or mount as root")
    return prog


def _fusermount_errno(text: str) -> int:
    lowered = text.lower()
    for needle, code in (
        ("busy", errno.EBUSY),
        ("not found in", errno.EINVAL),
        ("not mounted", errno.EINVAL),
        ("permission denied", errno.EPERM),
        ("not owned by", errno.EPERM),
        ("no write access", errno.EACCES),
        ("only allowed if", errno.EPERM),
        ("no such file", errno.ENOENT),
        ("unknown option", errno.EINVAL),
        ("too many", errno.EMFILE),
    ):
        if needle in lowered:
            return code
    return errno.EIO


def _mount_fusermount(path: str, opts: MountOptions, st: os.stat_result) -> Mount:
    if opts.blockdev is not None:
        raise MountError(errno.EINVAL, "blockdev needs mount(2) as root; fusermount3 refuses it for users")
    if opts.rootmode is not None and stat.S_IFMT(opts.rootmode) != stat.S_IFMT(st.st_mode):
        raise MountError(errno.EINVAL, "fusermount3 takes rootmode from the mountpoint; leave rootmode unset")
    if opts.user_id not in (None, os.getuid()) or opts.group_id not in (None, os.getgid()):
        raise MountError(errno.EINVAL, "fusermount3 mounts with the caller's uid/gid; leave user_id/group_id unset")
    prog = _fusermount()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with tempfile.TemporaryFile() as errlog:
        try:
            env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
            try:
                process = subprocess.Popen(
                    [prog, "-o", opts.fusermount_options(), "--", path],
                    env=env,
                    pass_fds=(theirs.fileno(),),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=errlog,
                )
            except OSError as exc:
                raise MountError(exc.errno or errno.EIO, f"cannot run {prog}: {exc.strerror}") from None
            finally:
                theirs.close()
            try:
                _msg, fds, _flags, _addr = socket.recv_fds(ours, 1, 1, socket.MSG_CMSG_CLOEXEC)
            except OSError:
                fds = []
            if not fds:
                code = process.wait()
                errlog.seek(0)
                text = errlog.read().decode(errors="replace").strip()
                hint = " (this fusermount3 does not know it: drop it)" if "unknown option" in text else ""
                raise MountError(
                    _fusermount_errno(text),
                    f"fusermount3 could not mount {path!r} (exit {code}): {text or 'no message'}{hint}",
                )
        except BaseException:
            ours.close()
            raise
    fd = fds[0]
    for extra in fds[1:]:
        os.close(extra)
    if not opts.auto_unmount:
        process.wait()
        ours.close()
        return Mount(fd=fd, mountpoint=path, options=opts, via_fusermount=True, connection=find_connection(fd, path))
    # fusermount3 stays, holding its end of the socket; EOF on it makes it unmount a dead mount.
    connection = find_connection(fd, path)
    if os.geteuid() != 0 and not opts.allow_other and _fusermount_version(prog) < (3, 15) and connection:
        # fusermount3 before 3.15 checks the dead mount by opening it as root, which a mount
        # without allow_other refuses (libfuse issue #586), so it never unmounts: watch ourselves.
        _start_watchdog(ours, path, connection)
    return Mount(
        fd=fd,
        mountpoint=path,
        options=opts,
        via_fusermount=True,
        connection=connection,
        sock=ours,
        process=process,
    )


# sh -c SCRIPT sh PATH DEV ESCAPED: wait for EOF on stdin (the daemon is gone), then unmount
# lazily if that connection is still mounted there.
_WATCHDOG = (
    'while read -r _; do :; done; '
    'if D="$2" P="$3" awk \'$3 == ENVIRON["D"] && $5 == ENVIRON["P"] {f = 1} END {exit !f}\' '
    '/proc/self/mountinfo; '
    'then exec fusermount3 -u -z -- "$1"; fi'
)


def _fusermount_version(prog: str) -> tuple[int, ...]:
    out = subprocess.run([prog, "-V"], capture_output=True, text=True, check=False).stdout
    try:
        return tuple(int(x) for x in out.rsplit(" ", 1)[-1].strip().split("."))
    except ValueError:
        return (0,)


def _start_watchdog(sock: socket.socket, path: str, connection: int) -> None:
    """A process, in its own session, that lazily unmounts ``path`` once ``sock``'s peer end
    (kept by this process) is closed and the same connection is still mounted there."""
    keep, watch = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    subprocess.Popen(
        ["/bin/sh", "-c", _WATCHDOG, "sh", path, f"0:{connection}", escape_mountinfo(path)],
        stdin=watch.fileno(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, close_fds=True,
    )
    watch.close()
    # Tie the watchdog's lifetime to ``sock`` (closed by Mount.close or by our death).
    _WATCHDOG_SOCKETS[sock.fileno()] = keep


_WATCHDOG_SOCKETS: dict[int, socket.socket] = {}


# --------------------------------------------------------------------------- unmount / abort


def _unmount(mountpoint: str, lazy: bool, via_fusermount: bool) -> None:
    if via_fusermount:
        prog = _fusermount()
        args = [prog, "-u", "-z", "--", mountpoint] if lazy else [prog, "-u", "--", mountpoint]
        result = subprocess.run(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False
        )
        if result.returncode != 0:
            text = result.stderr.decode(errors="replace").strip()
            code = _fusermount_errno(text)
            hint = "; try a lazy unmount (lazy=True / fusermount3 -uz)" if code == errno.EBUSY else ""
            raise MountError(code, f"fusermount3 could not unmount {mountpoint!r}: {text}{hint}")
        return
    err = sys_umount2(mountpoint, UMOUNT_NOFOLLOW | (MNT_DETACH if lazy else 0))
    if err == errno.EBUSY:
        raise MountError(
            err,
            f"{mountpoint!r} is busy (open files or a working directory inside); close them "
            f"or unmount lazily (lazy=True)",
        )
    if err == errno.EINVAL:
        raise MountError(err, f"{mountpoint!r} is not a mount point")
    if err == errno.EPERM:
        raise MountError(err, f"unmounting {mountpoint!r} needs root; as a user use fusermount3 -u")
    if err:
        raise MountError(err, f"cannot unmount {mountpoint!r}: {os.strerror(err)}")


def unmount(mountpoint: StrPath, lazy: bool = False) -> None:
    """Unmount by path: umount2(2) as root, ``fusermount3 -u [-z]`` otherwise."""
    _unmount(os.path.abspath(os.fspath(mountpoint)), lazy, os.geteuid() != 0)
