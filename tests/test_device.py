"""Tests of ``afuse.device`` against the real kernel: /dev/fuse, mount(2), fusermount3, fusectl.

Mounting tests need root (they skip otherwise). Each one answers the FUSE requests itself with
the hand-rolled daemon in ``rawfuse``; every filesystem access runs in a thread with a timeout,
and every mount is unmounted in a ``finally`` (lazily as a fallback).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import rawfuse

from afuse import device
from afuse.device import Mount, MountOptions
from afuse.errors import MountError

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
NOBODY = 65534

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting with mount(2) needs root")
needs_fusermount = pytest.mark.skipif(shutil.which("fusermount3") is None, reason="fusermount3 not installed")
needs_losetup = pytest.mark.skipif(shutil.which("losetup") is None, reason="losetup not installed")


def kernel_at_least(major: int, minor: int) -> bool:
    release = os.uname().release.split("-")[0].split(".")
    return (int(release[0]), int(release[1])) >= (major, minor)


def mounted_paths() -> set[str]:
    return {mountpoint for mountpoint, _type, _source in device.find_mounts()}


def cleanup(m: Mount) -> None:
    """Close the session fd (aborting a connection nobody serves) and unmount, lazily if need be."""
    m.close()
    try:
        m.unmount()
    except MountError:
        m.unmount(lazy=True)


@contextlib.contextmanager
def mounted(mountpoint: Path | str, options: MountOptions | None = None, **kw: int) -> Iterator[Mount]:
    m = device.mount(mountpoint, options, **kw)
    try:
        yield m
    finally:
        cleanup(m)


def stat_via(m: Mount, path: str | None = None, root_mode: int = stat.S_IFDIR | 0o755) -> os.stat_result:
    """Stat the mount in a thread while a rawfuse server answers; return the result."""
    with rawfuse.Server(m.fd, rawfuse.default_handler(root_mode)):
        result: os.stat_result = rawfuse.Call(os.stat, path or m.mountpoint).wait()
    return result


@pytest.fixture
def mnt(tmp_path: Path) -> Path:
    """An empty directory whose name needs escaping in /proc/self/mountinfo."""
    path = tmp_path / "mnt dir"
    path.mkdir()
    return path


# --------------------------------------------------------------------------- MountOptions


def test_parse_options() -> None:
    opts = MountOptions.parse("allow_other,max_read=65536,fsname=x,subtype=y,ro")
    assert opts == MountOptions(allow_other=True, max_read=65536, fsname="x", subtype="y", ro=True)


def test_parse_defaults_negations_and_values() -> None:
    assert MountOptions.parse("rw,suid,dev,exec,atime,default_permissions") == MountOptions(default_permissions=True)
    assert MountOptions.parse("ro,rw,nosuid,suid") == MountOptions()
    opts = MountOptions.parse(
        " nosuid, nodev,noexec,noatime,nodiratime,sync,dirsync,lazytime,auto_unmount,,"
        "rootmode=100000,user_id=1000,group_id=100,blksize=4096,blockdev=/dev/loop7"
    )
    assert opts == MountOptions(
        nosuid=True,
        nodev=True,
        noexec=True,
        noatime=True,
        nodiratime=True,
        sync=True,
        dirsync=True,
        lazytime=True,
        auto_unmount=True,
        rootmode=0o100000,
        user_id=1000,
        group_id=100,
        blksize=4096,
        blockdev="/dev/loop7",
    )
    assert MountOptions.parse("") == MountOptions()


def test_parse_escaped_comma() -> None:
    assert MountOptions.parse(r"fsname=a\,b\\c,ro").fsname == "a,b\\c"


@pytest.mark.parametrize(
    "text",
    [
        "max_read=abc",
        "max_read=100",
        "max_read=",
        "max_read",
        "blksize=1000",
        "blksize=256",
        "rootmode=9",
        "rootmode=40000000",
        "user_id=-1",
        "group_id=x",
        "ro=1",
        "allow_other=yes",
        "fsname",
    ],
)
def test_parse_bad_value(text: str) -> None:
    with pytest.raises(MountError) as info:
        MountOptions.parse(text)
    assert info.value.errno == errno.EINVAL
    assert text.partition("=")[0] in str(info.value)


def test_parse_unknown_option() -> None:
    with pytest.raises(MountError) as info:
        MountOptions.parse("allow_other,bogus_opt,ro")
    message = str(info.value)
    assert info.value.errno == errno.EINVAL
    assert "bogus_opt" in message
    for valid in ("allow_other", "default_permissions", "max_read=", "fsname=", "subtype=", "ro", "rw"):
        assert valid in message


def test_validation_on_construction_and_assignment() -> None:
    with pytest.raises(MountError):
        MountOptions(max_read=4095)
    opts = MountOptions()
    with pytest.raises(MountError):
        opts.blksize = 3000
    with pytest.raises(MountError):
        MountOptions(fsname="")


def test_kernel_data() -> None:
    opts = MountOptions(default_permissions=True, allow_other=True, max_read=65536, user_id=0, group_id=0)
    assert opts.kernel_data(5, 0o40000) == (
        "fd=5,rootmode=40000,user_id=0,group_id=0,default_permissions,allow_other,max_read=65536"
    )
    blk = MountOptions(blockdev="/dev/loop0", blksize=4096, user_id=1, group_id=2)
    assert blk.kernel_data(7, 0o40000) == "fd=7,rootmode=40000,user_id=1,group_id=2,blksize=4096"


def test_kernel_data_defaults() -> None:
    ids = f"user_id={os.getuid()},group_id={os.getgid()}"
    assert MountOptions().kernel_data(3, 0o100000) == f"fd=3,rootmode=100000,{ids}"
    # The rootmode option wins over the argument (the mountpoint's type).
    assert MountOptions(rootmode=0o40755).kernel_data(3, 0o100000).startswith("fd=3,rootmode=40755,")


def test_kernel_data_blksize_needs_blockdev() -> None:
    with pytest.raises(MountError) as info:
        MountOptions(blksize=4096).kernel_data(3, 0o40000)
    assert "blockdev" in str(info.value)


def test_ms_flags() -> None:
    assert MountOptions().ms_flags() == 0
    assert MountOptions(ro=True, nosuid=True, nodev=True, noexec=True).ms_flags() == 1 | 2 | 4 | 8
    all_flags = MountOptions(sync=True, dirsync=True, noatime=True, nodiratime=True, lazytime=True)
    assert all_flags.ms_flags() == 16 | 128 | 1024 | 2048 | (1 << 25)
    assert MountOptions.parse("ro,allow_other,max_read=8192").ms_flags() == 1


def test_fusermount_options() -> None:
    opts = MountOptions.parse(r"fsname=a\,b,subtype=t,allow_other,default_permissions,max_read=8192,ro,noexec")
    assert opts.fusermount_options() == (
        r"fsname=a\,b,subtype=t,allow_other,default_permissions,max_read=8192,ro,noexec"
    )
    assert MountOptions(auto_unmount=True).fusermount_options() == "fsname=afuse,auto_unmount"


# --------------------------------------------------------------------------- device basics


def test_open_device_missing(tmp_path: Path) -> None:
    with pytest.raises(MountError) as info:
        device.open_device(tmp_path / "no-fuse")
    assert info.value.errno == errno.ENOENT
    assert "modprobe fuse" in str(info.value)


@needs_root
def test_open_device_not_permitted() -> None:
    if stat.S_IMODE(os.stat("/dev/fuse").st_mode) & 0o006 == 0o006:
        pytest.skip("/dev/fuse is world read-writable here")
    code = textwrap.dedent(
        """
        import os
        from afuse import device
        os.setgroups([]); os.setgid(65534); os.setuid(65534)
        try:
            device.open_device()
        except device.MountError as e:
            print(e.errno, e)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=child_env(), cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert out.stdout.startswith(f"{errno.EACCES} "), out
    assert "permission" in out.stdout and "fusermount3" in out.stdout


@needs_root
def test_open_device_flags_and_sync_init() -> None:
    fd = device.open_device()
    try:
        assert not os.get_inheritable(fd)
        assert fcntl_flags(fd) & os.O_ACCMODE == os.O_RDWR
        device.set_nonblocking(fd)
        assert not os.get_blocking(fd)
        result = device.sync_init(fd)
        if kernel_at_least(6, 18):
            assert result is True
            assert device.sync_init(fd) is True  # repeated calls before mount are fine
    finally:
        os.close(fd)


def fcntl_flags(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_GETFL)


@needs_root
def test_clone_of_unmounted_fd_fails() -> None:
    fd = device.open_device()
    try:
        with pytest.raises(MountError) as info:
            device.clone_device(fd)
        assert info.value.errno == errno.EPERM
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- mountpoint checks


def test_mount_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(MountError) as info:
        device.mount(tmp_path / "missing")
    assert info.value.errno == errno.ENOENT


def test_check_mountpoint_not_dir_or_file(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(MountError) as info:
        device.check_mountpoint(fifo)
    assert info.value.errno == errno.ENOTDIR


def test_check_mountpoint_ok(tmp_path: Path) -> None:
    file = tmp_path / "file"
    file.write_bytes(b"")
    assert stat.S_ISREG(device.check_mountpoint(file).st_mode)
    assert stat.S_ISDIR(device.check_mountpoint(str(tmp_path)).st_mode)


def test_check_mountpoint_busy() -> None:
    with pytest.raises(MountError) as info:
        device.check_mountpoint("/proc")
    assert info.value.errno == errno.EBUSY


def test_mount_regular_file_with_dir_rootmode(tmp_path: Path) -> None:
    file = tmp_path / "file"
    file.write_bytes(b"")
    with pytest.raises(MountError) as info:
        device.mount(file, MountOptions(rootmode=0o40000))
    assert info.value.errno == errno.ENOTDIR
    assert "rootmode" in str(info.value)
    assert str(file) not in mounted_paths()


def test_mount_blksize_without_blockdev(mnt: Path) -> None:
    with pytest.raises(MountError) as info:
        device.mount(mnt, MountOptions(blksize=4096))
    assert info.value.errno == errno.EINVAL
    assert str(mnt) not in mounted_paths()


@needs_root
def test_root_auto_unmount_needs_fusermount(mnt: Path) -> None:
    with pytest.raises(MountError) as info:
        device.mount(mnt, MountOptions(auto_unmount=True))
    assert info.value.errno == errno.EINVAL
    assert "use_fusermount" in str(info.value)
    assert str(mnt) not in mounted_paths()


@needs_root
def test_blockdev_must_be_block_device(mnt: Path, tmp_path: Path) -> None:
    image = tmp_path / "image"
    image.write_bytes(b"")
    with pytest.raises(MountError) as info:
        device.mount(mnt, MountOptions(blockdev=str(image)))
    assert info.value.errno == errno.ENOTBLK


# --------------------------------------------------------------------------- root mounts


@needs_root
def test_root_mount_fsname_subtype_and_getattr(mnt: Path) -> None:
    opts = MountOptions(fsname="afuse-test-src", subtype="afusetest", default_permissions=True)
    with mounted(mnt, opts) as m:
        assert m.mountpoint == str(mnt) and not m.via_fusermount and m.options is opts
        assert (str(mnt), "fuse.afusetest", "afuse-test-src") in device.find_mounts()
        assert (str(mnt), "fuse.afusetest", "afuse-test-src") in device.find_mounts("fuse.afuse")
        assert not [t for t in device.find_mounts("fuseblk") if t[0] == str(mnt)]
        assert m.is_mounted()
        init = rawfuse.handshake(m.fd)
        assert init.unique != 0 and init.nodeid == 0
        st = stat_via(m)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o755
        assert st.st_ino == 1 and st.st_nlink == 2
        assert m.connection_id() == os.minor(st.st_dev) and os.major(st.st_dev) == 0
        assert os.path.isdir(f"/sys/fs/fuse/connections/{m.connection_id()}") or not os.listdir(
            "/sys/fs/fuse/connections"
        )
        m.unmount()
        assert not m.is_mounted()
        assert str(mnt) not in mounted_paths()
        m.unmount()  # idempotent
        m.unmount(lazy=True)


@needs_root
def test_mount_through_symlink(mnt: Path, tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(mnt.name)  # relative
    with mounted(link) as m:
        assert m.mountpoint == str(mnt)
        assert str(mnt) in mounted_paths() and str(link) not in mounted_paths()
        with pytest.raises(MountError) as info:
            device.check_mountpoint(link)
        assert info.value.errno == errno.EBUSY
        rawfuse.handshake(m.fd)


@needs_root
def test_mount_regular_file(tmp_path: Path) -> None:
    file = tmp_path / "file mount"
    file.write_bytes(b"underneath")
    with pytest.raises(MountError) as info:
        device.mount(file)  # a file root must be asked for
    assert info.value.errno == errno.ENOTDIR and "rootmode=100000" in str(info.value)
    with mounted(file, MountOptions(rootmode=stat.S_IFREG | 0o644)) as m:
        rawfuse.handshake(m.fd)
        st = stat_via(m, root_mode=stat.S_IFREG | 0o644)
        assert stat.S_ISREG(st.st_mode) and st.st_nlink == 1
        assert str(file) in mounted_paths()
    assert str(file) not in mounted_paths()
    assert file.read_bytes() == b"underneath"


@needs_root
def test_mount_busy_mountpoint(mnt: Path) -> None:
    with mounted(mnt) as m:
        with pytest.raises(MountError) as info:
            device.mount(mnt)
        assert info.value.errno == errno.EBUSY
        with pytest.raises(MountError):
            device.check_mountpoint(mnt)
        assert [t[0] for t in device.find_mounts()].count(str(mnt)) == 1
        assert m.is_mounted()


@needs_root
def test_mount_options_reach_the_kernel(mnt: Path) -> None:
    opts = MountOptions(allow_other=True, max_read=65536, ro=True, noexec=True, nosuid=True)
    with mounted(mnt, opts) as m:
        line = next(line for line in Path("/proc/self/mountinfo").read_text().splitlines() if " - fuse " in line
                    and line.split()[4] == str(mnt).replace(" ", "\\040"))  # fmt: skip
        per_mount, _, super_opts = line.partition(" - ")
        assert "ro" in per_mount.split()[5].split(",") and "noexec" in per_mount and "nosuid" in per_mount
        assert "allow_other" in super_opts and "max_read=65536" in super_opts
        rawfuse.handshake(m.fd)


@needs_root
def test_clone_device_answers_on_clone(mnt: Path) -> None:
    with mounted(mnt) as m:
        rawfuse.handshake(m.fd)
        clone = device.clone_device(m.fd)
        try:
            assert clone != m.fd and not os.get_inheritable(clone)
            call = rawfuse.Call(os.stat, str(mnt))
            req = rawfuse.read_request(clone)
            assert req.opcode == rawfuse.FUSE_GETATTR and req.nodeid == 1
            # The request sits on the clone's processing list: the original fd does not know it.
            with pytest.raises(OSError) as info:
                rawfuse.reply(m.fd, req.unique, rawfuse.attr_out())
            assert info.value.errno == errno.ENOENT
            rawfuse.reply(clone, req.unique, rawfuse.attr_out(mode=stat.S_IFDIR | 0o700))
            st = call.wait()
            assert stat.S_IMODE(st.st_mode) == 0o700
            assert device.mountinfo.fdinfo_connection(clone) == m.connection_id()
        finally:
            os.close(clone)


@needs_root
def test_unmount_from_outside_gives_enodev(mnt: Path) -> None:
    with mounted(mnt) as m:
        rawfuse.handshake(m.fd)
        device.unmount(mnt)
        assert not m.is_mounted()
        assert rawfuse.wait_readable(m.fd, 5)
        with pytest.raises(OSError) as info:
            os.read(m.fd, rawfuse.READ_SIZE)
        assert info.value.errno == errno.ENODEV
        m.unmount()  # already gone: nothing to do
        with pytest.raises(MountError) as info2:
            device.unmount(mnt)
        assert info2.value.errno == errno.EINVAL


@needs_root
def test_unmount_busy_suggests_lazy(mnt: Path) -> None:
    with mounted(mnt) as m:
        rawfuse.handshake(m.fd)
        server = rawfuse.Server(m.fd).__enter__()
        holder = rawfuse.Call(os.open, str(mnt), os.O_PATH).wait()  # pins the mount
        try:
            with pytest.raises(MountError) as info:
                m.unmount()
            assert info.value.errno == errno.EBUSY
            assert "lazy" in str(info.value)
            assert m.is_mounted()
            m.unmount(lazy=True)
            assert not m.is_mounted()
        finally:
            os.close(holder)
            server.stop()


@pytest.fixture
def fusectl_restored() -> Iterator[None]:
    """Unmount fusectl afterwards if the test mounted it."""
    was_mounted = bool(device.find_mounts("fusectl"))
    yield
    if not was_mounted and device.find_mounts("fusectl"):
        with contextlib.suppress(MountError):
            device.unmount(device.FUSECTL_PATH)


@needs_root
def test_abort_gives_enotconn(mnt: Path, fusectl_restored: None) -> None:
    with mounted(mnt) as m:
        rawfuse.handshake(m.fd)
        assert stat.S_ISDIR(stat_via(m).st_mode)
        m.abort()
        assert device.find_mounts("fusectl")
        assert not [t for t in device.find_mounts() if t[1] == "fusectl"]
        with pytest.raises(OSError) as info:  # the root's attributes are cached: look up a child
            rawfuse.Call(os.stat, str(mnt / "child")).wait()
        assert info.value.errno == errno.ENOTCONN
        assert rawfuse.wait_readable(m.fd, 5)
        with pytest.raises(OSError) as info:
            os.read(m.fd, rawfuse.READ_SIZE)
        assert info.value.errno == errno.ENODEV
        assert m.is_mounted()  # aborted, but still mounted until unmounted
        m.unmount()
        assert not m.is_mounted()


@needs_root
def test_abort_unknown_connection(fusectl_restored: None) -> None:
    with pytest.raises(MountError) as info:
        device.abort_connection(999_999_999)
    assert info.value.errno == errno.ENOENT


@needs_root
def test_close_without_unmount_disconnects(mnt: Path) -> None:
    with mounted(mnt) as m:
        rawfuse.handshake(m.fd)
        m.close()
        m.close()  # idempotent
        with pytest.raises(OSError) as info:
            rawfuse.Call(os.stat, str(mnt)).wait()
        assert info.value.errno == errno.ENOTCONN
        assert m.is_mounted()
        with pytest.raises(MountError) as info2:  # recognised without touching the dead mount
            device.mount(mnt)
        assert info2.value.errno == errno.EBUSY and "dead daemon" in str(info2.value)
        m.unmount()
        assert not m.is_mounted()


@needs_root
def test_sync_init_mount_with_device_fd(mnt: Path) -> None:
    if not kernel_at_least(6, 18):
        pytest.skip("FUSE_DEV_IOC_SYNC_INIT needs Linux 6.18")
    fd = device.open_device()
    try:
        assert device.sync_init(fd)
        # poll() on this fd would block until mount(2): read blindly in a thread.
        reader = rawfuse.Call(rawfuse.handshake, fd, None)
        m = device.mount(mnt, device_fd=fd)
    except BaseException:
        os.close(fd)
        raise
    try:
        assert m.fd == fd
        init = reader.wait()  # mount(2) returned, so INIT was answered already
        assert init.opcode == rawfuse.FUSE_INIT
        assert stat.S_ISDIR(stat_via(m).st_mode)
    finally:
        cleanup(m)


@needs_root
def test_mount_failure_leaves_device_fd_open(tmp_path: Path) -> None:
    file = tmp_path / "file"
    file.write_bytes(b"")
    fd = device.open_device()
    try:
        with pytest.raises(MountError):
            device.mount(file, MountOptions(rootmode=0o40000), device_fd=fd)
        os.fstat(fd)  # still ours
    finally:
        os.close(fd)


@needs_root
def test_backing_ioctls(mnt: Path, tmp_path: Path) -> None:
    backing = tmp_path / "backing"
    backing.write_bytes(b"data")
    with mounted(mnt) as m:
        rawfuse.handshake(m.fd, flags=rawfuse.FUSE_PASSTHROUGH, max_stack_depth=1)
        with open(backing, "rb") as f:
            first = device.backing_open(m.fd, f.fileno())
            second = device.backing_open(m.fd, f.fileno())
        assert first >= 1 and second not in (0, first)
        device.backing_close(m.fd, first)
        device.backing_close(m.fd, second)
        with pytest.raises(OSError) as info:
            device.backing_close(m.fd, first)
        assert info.value.errno == errno.ENOENT
        with pytest.raises(OSError) as info, open(tmp_path, "rb") as d:
            device.backing_open(m.fd, d.fileno())
        assert info.value.errno == errno.EISDIR


@needs_root
def test_backing_open_without_passthrough(mnt: Path, tmp_path: Path) -> None:
    backing = tmp_path / "backing"
    backing.write_bytes(b"data")
    with mounted(mnt) as m:
        rawfuse.handshake(m.fd)
        with pytest.raises(OSError) as info, open(backing, "rb") as f:
            device.backing_open(m.fd, f.fileno())
        assert info.value.errno == errno.EPERM


@needs_root
@needs_losetup
def test_fuseblk_mount(mnt: Path, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(4 << 20)
    loop = subprocess.run(
        ["losetup", "--find", "--show", str(image)], capture_output=True, text=True, check=True, timeout=30
    ).stdout.strip()
    try:
        opts = MountOptions(blockdev=loop, blksize=4096, subtype="afuseblk")
        with mounted(mnt, opts) as m:
            rawfuse.handshake(m.fd)
            assert (str(mnt), "fuseblk.afuseblk", loop) in device.find_mounts("fuseblk")
            escaped = str(mnt).replace(" ", "\\040")
            line = next(line for line in Path("/proc/self/mountinfo").read_text().splitlines()
                        if line.split()[4] == escaped)  # fmt: skip
            assert " - fuseblk.afuseblk " in line and "blksize=4096" in line
            assert m.is_mounted()
            rdev = os.stat(loop).st_rdev
            assert m.connection_id() == (os.major(rdev) << 20) | os.minor(rdev)
            assert stat.S_ISDIR(stat_via(m).st_mode)
            # umount2 of a fuseblk mount sends DESTROY and waits for its reply.
            with rawfuse.Server(m.fd) as server:
                m.unmount()
            assert rawfuse.FUSE_DESTROY in server.opcodes()
            assert not m.is_mounted()
    finally:
        subprocess.run(["losetup", "-d", loop], check=False, timeout=30)
    assert loop not in subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=False).stdout


# --------------------------------------------------------------------------- fusermount3

CHILD = textwrap.dedent(
    """
    import json, os, sys, time
    from afuse import device
    import rawfuse

    mountpoint, uid, options, use_fusermount, mode = sys.argv[1:6]
    if int(uid):
        os.setgroups([])
        os.setgid(int(uid))
        os.setuid(int(uid))
    opts = device.MountOptions.parse(options)
    if use_fusermount == "1":
        opts.use_fusermount = True
    m = device.mount(mountpoint, opts)
    out = {"via_fusermount": m.via_fusermount, "euid": os.geteuid(), "fd": m.fd}
    try:
        rawfuse.handshake(m.fd)
        out["mounts"] = [list(t) for t in device.find_mounts() if t[0] == mountpoint]
        with rawfuse.Server(m.fd):
            st = rawfuse.Call(os.stat, mountpoint).wait()
        out["stat"] = [st.st_mode, st.st_ino, st.st_uid]
        out["is_mounted"] = m.is_mounted()
        if mode == "hold":
            print(json.dumps(out), flush=True)
            time.sleep(120)
        m.unmount()
        out["after"] = m.is_mounted()
        out["mounts_after"] = [list(t) for t in device.find_mounts() if t[0] == mountpoint]
        m.unmount()
        try:
            device.unmount(mountpoint)
        except device.MountError as e:
            out["unmount_again"] = [e.errno, str(e)]
    finally:
        m.close()
    print(json.dumps(out), flush=True)
    """
)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def start_child(mountpoint: Path, uid: int, options: str, use_fusermount: bool, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(mountpoint), str(uid), options, "1" if use_fusermount else "0", mode],
        cwd=REPO,
        env=child_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def user_mountpoint() -> Iterator[Path]:
    """A mountpoint owned by nobody (0755, all parents traversable), with /dev/fuse usable by it."""
    base = Path(tempfile.mkdtemp(prefix="afuse-device-", dir="/tmp"))
    base.chmod(0o755)
    path = base / "mnt"
    path.mkdir(mode=0o755)
    os.chown(path, NOBODY, NOBODY)
    # fusermount3 opens /dev/fuse with the user's rights; Debian's udev makes it 0666, this host 0600.
    mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    if mode & 0o006 != 0o006:
        os.chmod("/dev/fuse", mode | 0o666)
    try:
        yield path
    finally:
        if mode & 0o006 != 0o006:
            os.chmod("/dev/fuse", mode)
        if str(path) in mounted_paths():
            with contextlib.suppress(MountError):
                device.unmount(path, lazy=True)
        if str(path) not in mounted_paths():
            shutil.rmtree(base, ignore_errors=True)


@needs_root
@needs_fusermount
def test_fusermount_unprivileged(user_mountpoint: Path) -> None:
    proc = start_child(user_mountpoint, NOBODY, "fsname=afuse-user,subtype=usertest,max_read=65536", False, "once")
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["euid"] == NOBODY and result["via_fusermount"]
    assert result["mounts"] == [[str(user_mountpoint), "fuse.usertest", "afuse-user"]]
    assert stat.S_ISDIR(result["stat"][0]) and result["stat"][1] == 1 and result["stat"][2] == NOBODY
    assert result["is_mounted"] is True
    assert result["after"] is False and result["mounts_after"] == []
    assert result["unmount_again"][0] == errno.EINVAL, result["unmount_again"]
    assert str(user_mountpoint) not in mounted_paths()


@needs_root
@needs_fusermount
def test_fusermount_unprivileged_errors(user_mountpoint: Path) -> None:
    os.chown(user_mountpoint, 0, 0)  # no write access for nobody: fusermount3 refuses
    proc = start_child(user_mountpoint, NOBODY, "subtype=usertest", False, "once")
    try:
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert "MountError" in err and "fusermount3" in err and "write access" in err
    assert str(user_mountpoint) not in mounted_paths()


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "child did not report"
    return proc.stdout.readline()


def run_and_kill(mountpoint: Path, uid: int) -> bool:
    """Mount with auto_unmount in a child, SIGKILL it; return whether the mount went away."""
    proc = start_child(mountpoint, uid, "auto_unmount,subtype=autotest", True, "hold")
    try:
        line = read_line(proc, 60)
        if not line:
            proc.wait(10)
            pytest.fail(f"child failed: {proc.stderr.read() if proc.stderr else ''}")
        result = json.loads(line)
        assert result["via_fusermount"] and result["is_mounted"]
        assert result["mounts"] == [[str(mountpoint), "fuse.autotest", "afuse"]]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if str(mountpoint) not in mounted_paths():
                return True
            time.sleep(0.1)
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


@needs_root
@needs_fusermount
def test_auto_unmount_after_sigkill_as_root(mnt: Path) -> None:
    try:
        assert run_and_kill(mnt, 0), "fusermount3 did not unmount after the daemon died"
    finally:
        if str(mnt) in mounted_paths():
            device.unmount(mnt, lazy=True)


@needs_root
@needs_fusermount
def test_auto_unmount_after_sigkill_unprivileged(user_mountpoint: Path) -> None:
    # fusermount3 before 3.15 cannot do this itself (libfuse issue #586: it opens the dead
    # mount as root, which a mount without allow_other refuses); afuse's watchdog does it then.
    gone = run_and_kill(user_mountpoint, NOBODY)
    assert gone, "the mount was not removed after the daemon died"


def test_device_layer_imports_no_trio() -> None:
    # Load afuse.device without running afuse/__init__ (which imports the trio-based session),
    # with trio made unimportable: every module of the device layer must still load.
    script = textwrap.dedent(
        f"""
        import sys, types
        pkg = types.ModuleType("afuse")
        pkg.__path__ = [{str(REPO / "afuse")!r}]
        sys.modules["afuse"] = pkg
        sys.modules["trio"] = None
        import afuse.device
        from afuse.device import ioctls, mounting, mountinfo, options
        assert sorted(afuse.device.__all__) == sorted(set(afuse.device.__all__))
        for name in afuse.device.__all__:
            getattr(afuse.device, name)
        print("ok", len(afuse.device.__all__))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok ")
