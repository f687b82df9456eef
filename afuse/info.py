"""``python -m afuse info``: what this kernel's FUSE offers and what afuse makes of it.

Mounts a scratch filesystem on a temporary directory, reads the kernel's INIT, and prints:

* kernel facts: the FUSE protocol version, module parameters and sysctls that change behaviour
  (max_pages_limit, request timeouts, enable_uring), whether passthrough can be used here
  (BACKING_OPEN needs CAP_SYS_ADMIN in the initial user namespace: probed for real), fusectl;
* every INIT flag with its bit, whether the kernel offers it, whether afuse negotiates it by
  default, what it means, and why it was left out (not asked for by default, needs a handler,
  not offered by this kernel, needs privileges).

The scratch filesystem is unmounted before the command returns. Mounting needs root or
fusermount3.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections.abc import Sequence

import attrs
import trio

from . import __version__, device
from .errors import FUSEError
from .operations import Operations
from .session import mount
from .wire import requests as r
from .wire.constants import KERNEL_MINOR_VERSION, KERNEL_VERSION, InitFlag
from .wire.init import _BOOL_FLAGS, INFORMATIONAL, InitConfig, Negotiated
from .wire.types import Attr

__all__ = ["FLAG_INFO", "Report", "main", "probe", "render"]

_F = InitFlag

#: Each flag: (kernel minor that added it, what it means).
FLAG_INFO: dict[InitFlag, tuple[str, str]] = {
    _F.ASYNC_READ: ("7.x", "readahead READs are issued asynchronously and in parallel"),
    _F.POSIX_LOCKS: ("7.7", "the filesystem implements POSIX record locks (GETLK/SETLK/SETLKW)"),
    _F.FILE_OPS: ("-", "never implemented by Linux"),
    _F.ATOMIC_O_TRUNC: ("7.x", "O_TRUNC is passed in OPEN instead of a separate SETATTR"),
    _F.EXPORT_SUPPORT: ("7.9", "the filesystem answers LOOKUP of '.' and '..' (NFS export, open_by_handle_at)"),
    _F.BIG_WRITES: ("7.x", "WRITEs larger than 4 KiB"),
    _F.DONT_MASK: ("7.12", "the kernel does not apply the umask to create modes"),
    _F.SPLICE_WRITE: ("7.14", "the device supports splice() writes (informational)"),
    _F.SPLICE_MOVE: ("7.14", "the device supports splice() page moves (informational)"),
    _F.SPLICE_READ: ("7.14", "the device supports splice() reads (informational)"),
    _F.FLOCK_LOCKS: ("7.17", "the filesystem implements flock(2) (SETLK with LK_FLOCK)"),
    _F.HAS_IOCTL_DIR: ("7.18", "ioctl on directories"),
    _F.AUTO_INVAL_DATA: ("7.20", "the page cache is dropped when a changed mtime/size is seen"),
    _F.DO_READDIRPLUS: ("7.21", "READDIRPLUS: directory listings carry attributes"),
    _F.READDIRPLUS_AUTO: ("7.21", "the kernel chooses READDIR or READDIRPLUS adaptively"),
    _F.ASYNC_DIO: ("7.22", "direct I/O is submitted asynchronously"),
    _F.WRITEBACK_CACHE: ("7.23", "buffered writes are cached; the kernel owns mtime/ctime/size"),
    _F.NO_OPEN_SUPPORT: ("7.23", "ENOSYS to OPEN makes opens zero-message (informational)"),
    _F.PARALLEL_DIROPS: ("7.25", "LOOKUP/READDIR in one directory are not serialized"),
    _F.HANDLE_KILLPRIV: ("7.26", "the filesystem clears suid/sgid/caps on write/chown/truncate"),
    _F.POSIX_ACL: ("7.26", "the kernel enforces POSIX ACLs (implies default_permissions)"),
    _F.ABORT_ERROR: ("7.27", "reads of an aborted connection fail with ECONNABORTED"),
    _F.MAX_PAGES: ("7.28", "max_pages in the INIT reply is honoured (large READ/WRITE)"),
    _F.CACHE_SYMLINKS: ("7.28", "READLINK results are cached"),
    _F.NO_OPENDIR_SUPPORT: ("7.29", "ENOSYS to OPENDIR makes opendir zero-message (informational)"),
    _F.EXPLICIT_INVAL_DATA: ("7.30", "the page cache is dropped only on explicit notification"),
    _F.MAP_ALIGNMENT: ("7.31", "map_alignment in the INIT reply (virtiofs DAX only)"),
    _F.SUBMOUNTS: ("7.32", "submounts (FUSE_ATTR_SUBMOUNT; virtiofs only)"),
    _F.HANDLE_KILLPRIV_V2: ("7.33", "suid/sgid clearing is the filesystem's, flagged per request (VFS rules)"),
    _F.SETXATTR_EXT: ("7.33", "the 16-byte setxattr_in (SETXATTR_ACL_KILL_SGID)"),
    _F.INIT_EXT: ("7.36", "flags2: INIT flags above bit 31"),
    _F.INIT_RESERVED: ("7.36", "reserved"),
    _F.SECURITY_CTX: ("7.36", "creating requests carry the new inode's security context"),
    _F.HAS_INODE_DAX: ("7.36", "per-inode DAX (virtiofs DAX only)"),
    _F.CREATE_SUPP_GROUP: ("7.38", "creating requests carry the parent's gid if the caller is a member"),
    _F.HAS_EXPIRE_ONLY: ("7.38", "NOTIFY_INVAL_ENTRY can only expire an entry (informational)"),
    _F.DIRECT_IO_ALLOW_MMAP: ("7.39", "shared mmap of FOPEN_DIRECT_IO files"),
    _F.PASSTHROUGH: ("7.40", "read/write/mmap of an open file go straight to a backing file"),
    _F.NO_EXPORT_SUPPORT: ("7.40", "file handles cannot be encoded (name_to_handle_at: EOPNOTSUPP)"),
    _F.HAS_RESEND: ("7.40", "NOTIFY_RESEND re-queues unanswered requests (informational)"),
    _F.ALLOW_IDMAP: ("7.41", "idmapped mounts of this filesystem are allowed"),
    _F.OVER_IO_URING: ("7.42", "requests over io_uring instead of read/write on /dev/fuse"),
    _F.REQUEST_TIMEOUT: ("7.43", "a request unanswered for request_timeout seconds aborts the connection"),
}

#: InitConfig attribute that asks for each flag (those not listed are always or never asked).
_CONFIG_ATTR: dict[InitFlag, str] = {flag: attr for attr, flag in _BOOL_FLAGS}
_CONFIG_ATTR[_F.REQUEST_TIMEOUT] = "request_timeout"

_HANDLERS: dict[InitFlag, str] = {
    _F.POSIX_LOCKS: "getlk and setlk",
    _F.FLOCK_LOCKS: "flock",
    _F.DO_READDIRPLUS: "readdirplus",
    _F.READDIRPLUS_AUTO: "readdirplus",
}

_NOT_OFFERED_WHY: dict[InitFlag, str] = {
    _F.FILE_OPS: "never implemented",
    _F.INIT_RESERVED: "reserved bit",
    _F.MAP_ALIGNMENT: "virtiofs DAX only",
    _F.SUBMOUNTS: "virtiofs only",
    _F.HAS_INODE_DAX: "virtiofs DAX only",
    _F.OVER_IO_URING: "the fuse module parameter enable_uring is off",
}

_PRIVILEGES: dict[InitFlag, str] = {
    _F.PASSTHROUGH: "BACKING_OPEN needs CAP_SYS_ADMIN in the initial user namespace",
    _F.ALLOW_IDMAP: "needs default_permissions; idmapped mounts need CAP_SYS_ADMIN",
    _F.OVER_IO_URING: "needs enable_uring=Y (root, module parameter)",
}


class _Scratch(Operations):
    """An empty root directory."""

    async def getattr(self, req: r.GetattrRequest) -> Attr:
        if req.nodeid != 1:
            raise FUSEError(2)
        return Attr(ino=1, mode=0o40755, nlink=2, uid=os.getuid(), gid=os.getgid())


@attrs.define(slots=True)
class Report:
    """Everything ``afuse info`` found out."""

    negotiated: Negotiated
    #: What afuse asks for by default (for a filesystem with every handler).
    default_wanted: InitFlag
    kernel_release: str
    sysctls: dict[str, str]
    module_params: dict[str, str]
    passthrough: str
    fusectl: str
    connection: int | None


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as e:
        return f"unreadable ({e.strerror})"


def _init_userns_admin() -> bool:
    """Root with CAP_SYS_ADMIN in the initial user namespace?"""
    try:
        mine = os.readlink("/proc/self/ns/user")
        init_ns = os.readlink("/proc/1/ns/user")
    except OSError:
        return False
    cap_eff = 0
    for line in _read("/proc/self/status").splitlines():
        if line.startswith("CapEff:"):
            cap_eff = int(line.split()[1], 16)
    return mine == init_ns and bool(cap_eff & (1 << 21))


async def _probe_passthrough(where: str) -> str:
    """Negotiate PASSTHROUGH on a second scratch mount and try BACKING_OPEN for real."""
    try:
        async with mount(_Scratch(), where, config=InitConfig(passthrough=True)) as s:
            if not s.has(InitFlag.PASSTHROUGH):
                return "not available: the kernel did not agree to PASSTHROUGH"
            with tempfile.NamedTemporaryFile() as f:
                try:
                    backing_id = await trio.to_thread.run_sync(device.backing_open, s.fd, f.fileno())
                except OSError as e:
                    return (f"negotiable, but BACKING_OPEN fails here ({os.strerror(e.errno or 0)}): "
                            "it needs CAP_SYS_ADMIN in the initial user namespace")
                device.backing_close(s.fd, backing_id)
            return "available: BACKING_OPEN works here (CAP_SYS_ADMIN in the initial user namespace)"
    except OSError as e:
        return f"could not be probed: {e}"


async def probe() -> Report:
    """Mount scratch filesystems, collect the facts, unmount."""
    where = tempfile.mkdtemp(prefix="afuse-info-")
    try:
        async with mount(_Scratch(), where) as s:
            neg = s.negotiated
            assert neg is not None
            try:
                conn: int | None = s.mount.connection_id()
            except (OSError, ValueError):
                conn = None
        passthrough = "not offered by this kernel"
        if neg.offered & InitFlag.PASSTHROUGH:
            passthrough = await _probe_passthrough(where)
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(where)
    sysctls = {name: _read(f"/proc/sys/fs/fuse/{name}")
               for name in ("max_pages_limit", "default_request_timeout", "max_request_timeout")}
    params = {name: _read(f"/sys/module/fuse/parameters/{name}")
              for name in ("enable_uring", "allow_sys_admin_access", "max_user_bgreq",
                           "max_user_congthresh")}
    ctl = [mp for mp, fstype, _src in device.find_mounts("fusectl") if fstype == "fusectl"]
    fusectl = f"mounted at {ctl[0]}" if ctl else "not mounted (mount -t fusectl none /sys/fs/fuse/connections)"
    return Report(neg, InitConfig().wanted_flags(), os.uname().release, sysctls, params,
                  passthrough, fusectl, conn)


def _why_not(flag: InitFlag, rep: Report) -> str:
    n = rep.negotiated
    if not n.offered & flag:
        why = _NOT_OFFERED_WHY.get(flag)
        return "not offered by this kernel" + (f" ({why})" if why else "")
    if flag & INFORMATIONAL:
        return "informational: the kernel tells, nothing to ask"
    if rep.default_wanted & flag:
        handler = _HANDLERS.get(flag)
        return f"asked for by default; needs the {handler} handler(s)" if handler else "asked for by default"
    attr = _CONFIG_ATTR.get(flag)
    if flag == _F.REQUEST_TIMEOUT:
        how = "InitConfig(request_timeout=SECONDS)"
    elif attr:
        how = f"InitConfig({attr}=True)"
    else:
        how = f"InitConfig(extra_flags=afuse.InitFlag.{flag.name})"
    priv = _PRIVILEGES.get(flag)
    return f"not asked for by default: {how}" + (f"; {priv}" if priv else "")


def render(rep: Report) -> str:
    """The report as text."""
    n = rep.negotiated
    out = [f"afuse {__version__}: FUSE on Linux {rep.kernel_release}", "", "Kernel"]

    def fact(label: str, value: str) -> None:
        out.append(f"  {label:<32} {value}")

    fact("protocol", f"7.{n.kernel_minor} (afuse speaks {KERNEL_VERSION}.{KERNEL_MINOR_VERSION}; "
                     f"negotiated 7.{n.minor})")
    fact("INIT flags offered", f"flags=0x{int(n.offered) & 0xFFFFFFFF:08x} flags2=0x{int(n.offered) >> 32:x}")
    fact("max_write negotiated", f"{n.max_write} bytes ({n.max_pages} pages)")
    fact("max_readahead", str(n.max_readahead))
    for k, v in rep.sysctls.items():
        fact(f"fs.fuse.{k}", v)
    for k, v in rep.module_params.items():
        note = ""
        if k == "enable_uring":
            note = "  (FUSE over io_uring " + ("on)" if v == "Y" else "off)")
        fact(f"fuse.{k}", v + note)
    fact("passthrough", rep.passthrough)
    fact("fusectl", rep.fusectl + (f"; scratch connection {rep.connection}" if rep.connection is not None else ""))
    out += ["", "INIT flags: bit, name, since, offered, afuse default, meaning / why not"]
    for flag in sorted(InitFlag, key=lambda f: int(f)):
        bit = int(flag).bit_length() - 1
        since, meaning = FLAG_INFO.get(flag, ("?", ""))
        offered = "offered" if n.offered & flag else "-"
        if flag & INFORMATIONAL:
            state = "info" if n.offered & flag else "-"
        elif n.flags & flag:
            state = "negotiated"
        elif n.offered & flag and rep.default_wanted & flag and not flag & INFORMATIONAL:
            state = "default*"
        else:
            state = "-"
        out.append(f"  {bit:>2} {flag.name:<22} {since:<5} {offered:<8} {state:<10} {meaning}")
        if not n.flags & flag or flag & INFORMATIONAL:
            out.append(f"  {'':<42}-> {_why_not(flag, rep)}")
    out += ["", "'negotiated': in the INIT reply afuse sends with InitConfig() defaults.",
            "'info': the kernel informs; nothing is asked for.",
            "'default*': asked for by default, left out here because the scratch filesystem "
            "lacks the handler."]
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m afuse info``."""
    parser = argparse.ArgumentParser(prog="python -m afuse info", description=__doc__.split("\n")[0])
    parser.parse_args(argv)
    reason = None
    if not os.path.exists("/dev/fuse"):
        reason = "/dev/fuse does not exist (load the fuse module)"
    if reason is None:
        try:
            rep = trio.run(probe)
        except OSError as e:
            reason = f"cannot mount a scratch filesystem: {e}"
    if reason is not None:
        print(f"afuse info: {reason}", file=sys.stderr)
        return 1
    sys.stdout.write(render(rep))
    return 0
