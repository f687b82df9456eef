"""``python -m afuse.demo``: mount memfs and passthroughfs and use them with everyday tools.

Each filesystem is served by a child process (``python -m afuse.examples.NAME``), exactly as a
user would run it; this process only runs the tools against the mounts, prints what they do,
compares the results with a native directory, and unmounts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

from . import device


def _sh(cmd: str, cwd: str) -> str:
    """Run a shell command, echo it and its output, and return the output."""
    print(f"  $ {cmd}")
    res = subprocess.run(cmd, shell=True, cwd=cwd, capture_output=True, text=True, timeout=300)
    out = (res.stdout + res.stderr).rstrip()
    if out:
        for line in out.splitlines()[:12]:
            print(f"    {line}")
        if len(out.splitlines()) > 12:
            print(f"    ... ({len(out.splitlines())} lines)")
    if res.returncode:
        raise SystemExit(f"demo failed: {cmd!r} exited {res.returncode}")
    return res.stdout


def _wait_mounted(mountpoint: str, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    real = device.resolve_mountpoint(mountpoint)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(mp == real for mp, _t, _s in device.find_mounts()):
            return
        if proc.poll() is not None:
            raise SystemExit(f"the filesystem exited with {proc.returncode}")
        time.sleep(0.05)
    raise SystemExit(f"{mountpoint} was not mounted within {timeout} s")


def _stop(proc: subprocess.Popen[bytes], mountpoint: str) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if any(mp == device.resolve_mountpoint(mountpoint) for mp, _t, _s in device.find_mounts()):
        device.unmount(mountpoint, lazy=True)


def _workout(name: str, mnt: str, native: str, sample: str) -> None:
    """The same tool session on the mount and on a native directory; the results must agree."""
    print(f"\n== {name}: everyday tools on {mnt}")
    results = []
    for where in (mnt, native):
        _sh(f"cp -a {sample} {where}/tree", where)
        _sh("tar -cf archive.tar tree && mkdir extracted && tar -xf archive.tar -C extracted", where)
        _sh("git init -q repo && cp -a tree/. repo/ && cd repo && git add -A && "
            "git -c user.name=demo -c user.email=demo@example.com commit -qm 'first commit' && "
            "git log --oneline | cat", where)
        _sh("diff -r tree extracted/tree && echo identical", where)
        # Directory sizes are filesystem-specific (ext4 says 4096); compare everything else.
        listing = _sh("find tree extracted \\( -type d -printf '%y %m %P\\n' -o -printf '%y %m %s %P\\n' \\)"
                      " | sort", where)
        _sh("ln -s tree link && ln tree/hello.txt hard.txt && stat -c '%h %F %n' tree/hello.txt link", where)
        _sh("rm -rf tree extracted repo archive.tar link hard.txt && ls -A", where)
        results.append(listing)
    if results[0] != results[1]:
        raise SystemExit(f"{name}: listing differs from the native directory")
    print(f"  {name} agrees with the native directory")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    if shutil.which("git") is None:
        print("git is not installed; install it to run the demo", file=sys.stderr)
        return 1
    base = tempfile.mkdtemp(prefix="afuse-demo-")
    sample = os.path.join(base, "sample")
    os.makedirs(os.path.join(sample, "src", "pkg"))
    with open(os.path.join(sample, "hello.txt"), "w") as f:
        f.write("Hello from afuse!\n")
    for i in range(50):
        with open(os.path.join(sample, "src", "pkg", f"mod{i}.py"), "w") as f:
            f.write(f"VALUE = {i}\n" * (i + 1))
    with open(os.path.join(sample, "blob.bin"), "wb") as f:
        f.write(os.urandom(3 << 20))
    os.symlink("hello.txt", os.path.join(sample, "greeting"))
    procs: list[tuple[subprocess.Popen[bytes], str]] = []
    try:
        for name, extra in (("memfs", []), ("passthroughfs", [os.path.join(base, "source")])):
            mnt = os.path.join(base, name)
            native = os.path.join(base, f"native-{name}")
            for d in (*extra, mnt, native):
                os.makedirs(d, exist_ok=True)
            cmd = [sys.executable, "-m", f"afuse.examples.{name}", *extra, mnt]
            print(f"\n== mounting: {' '.join(cmd)}")
            proc = subprocess.Popen(cmd)
            procs.append((proc, mnt))
            _wait_mounted(mnt, proc)
            _sh(f"grep ' {mnt} ' /proc/self/mounts", base)
            _workout(name, mnt, native, sample)
        print("\n== hello: one read-only file")
        hello = os.path.join(base, "hello")
        os.makedirs(hello)
        proc = subprocess.Popen([sys.executable, "-m", "afuse.examples.hello", hello])
        procs.append((proc, hello))
        _wait_mounted(hello, proc)
        _sh(f"ls -l {hello} && cat {hello}/hello", base)
    finally:
        for proc, mnt in procs:
            _stop(proc, mnt)
        shutil.rmtree(base, ignore_errors=True)
    print("\nall demos passed; everything unmounted")
    return 0


if __name__ == "__main__":
    sys.exit(main())
