"""memfs grants and refuses what tmpfs does for a caller whose access comes only through a
supplementary group: a non-root user (``setpriv --reuid --regid --groups``) runs the same
script on tmpfs and on memfs, with and without ``default_permissions``, and the answers must
be identical (access through a group, chgrp to a supplementary group, setgid kept or dropped)."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from afuse.examples.memfs import MemFS
from afuse.testing import mounted

USER, PRIMARY, SUPP, OTHER = 4242, 4242, 4343, 4444
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount, setpriv)")

SETUP = """
import os, sys
root = sys.argv[1]
os.chmod(root, 0o755)
for name, mode in (("grp", 0o770), ("grp-ro", 0o750), ("setgid", 0o2775), ("mine", 0o755)):
    os.mkdir(os.path.join(root, name))
    os.chmod(os.path.join(root, name), mode)
os.chown(os.path.join(root, "grp"), 0, SUPP_GID)
os.chown(os.path.join(root, "grp-ro"), 0, SUPP_GID)
os.chown(os.path.join(root, "setgid"), 0, SUPP_GID)
os.chown(os.path.join(root, "mine"), USER_UID, PRIMARY_GID)
for name, mode in (("grp/rw", 0o660), ("grp/r", 0o640), ("grp/x", 0o750), ("grp-ro/f", 0o640)):
    with open(os.path.join(root, name), "w") as f:
        f.write("data")
    os.chmod(os.path.join(root, name), mode)
    os.chown(os.path.join(root, name), 0, SUPP_GID)
""".replace("USER_UID", str(USER)).replace("PRIMARY_GID", str(PRIMARY)).replace("SUPP_GID", str(SUPP))

PROBE = """
import errno, json, os, stat, sys
root = sys.argv[1]
out = {}
def attempt(key, fn, *a):
    try:
        r = fn(*a)
        out[key] = "ok" if r is None or isinstance(r, (bytes, str)) else r
    except OSError as e:
        out[key] = errno.errorcode[e.errno]
p = lambda *n: os.path.join(root, *n)
attempt("list grp", lambda: sorted(os.listdir(p("grp"))))
attempt("read grp/rw", lambda: open(p("grp", "rw")).read())
attempt("write grp/rw", lambda: open(p("grp", "rw"), "a").write("more"))
attempt("write grp/r", lambda: open(p("grp", "r"), "a").write("more"))
attempt("read grp-ro/f", lambda: open(p("grp-ro", "f")).read())
attempt("create in grp", lambda: open(p("grp", "new"), "w").close())
attempt("create in grp-ro", lambda: open(p("grp-ro", "new"), "w").close())
attempt("unlink in grp-ro", os.unlink, p("grp-ro", "f"))
for name in ("rw", "r", "x"):
    for flag, what in ((os.R_OK, "R"), (os.W_OK, "W"), (os.X_OK, "X")):
        out[f"access grp/{name} {what}"] = os.access(p("grp", name), flag)
attempt("mkdir in setgid", os.mkdir, p("setgid", "sub"))
attempt("create in setgid", lambda: open(p("setgid", "f"), "w").close())
for name in ("sub", "f"):
    try:
        st = os.stat(p("setgid", name))
        out[f"setgid/{name}"] = [st.st_gid, oct(stat.S_IMODE(st.st_mode))]
    except OSError as e:
        out[f"setgid/{name}"] = errno.errorcode[e.errno]
attempt("create mine/f", lambda: open(p("mine", "f"), "w").close())
attempt("chgrp mine/f to supplementary", os.chown, p("mine", "f"), -1, SUPP_GID)
attempt("chmod g+s mine/f", os.chmod, p("mine", "f"), 0o2755)
try:
    st = os.stat(p("mine", "f"))
    out["mine/f"] = [st.st_gid, oct(stat.S_IMODE(st.st_mode))]
except OSError as e:
    out["mine/f"] = errno.errorcode[e.errno]
attempt("create mine/g", lambda: open(p("mine", "g"), "w").close())
attempt("chmod g+s mine/g (own group)", os.chmod, p("mine", "g"), 0o2755)
attempt("chgrp mine/g to a non-member group", os.chown, p("mine", "g"), -1, OTHER_GID)
attempt("chgrp mine/g to supplementary", os.chown, p("mine", "g"), -1, SUPP_GID)
st = os.stat(p("mine", "g"))
out["mine/g"] = [st.st_gid, oct(stat.S_IMODE(st.st_mode))]
attempt("create mine/h 2755", lambda: os.close(os.open(p("mine", "h"), os.O_CREAT | os.O_WRONLY, 0o2755)))
attempt("chgrp mine/h to supplementary", os.chown, p("mine", "h"), -1, SUPP_GID)
attempt("chmod g+s mine/h", os.chmod, p("mine", "h"), 0o2750)
st = os.stat(p("mine", "h"))
out["mine/h"] = [st.st_gid, oct(stat.S_IMODE(st.st_mode))]
print(json.dumps(out, sort_keys=True))
""".replace("SUPP_GID", str(SUPP)).replace("OTHER_GID", str(OTHER))


def _run(code: str, path: str, groups: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = ["/usr/bin/python3", "-c", textwrap.dedent(code), path]
    if groups is not None:
        cmd = ["setpriv", "--reuid", str(USER), "--regid", str(PRIMARY),
               *(["--groups", groups] if groups else ["--clear-groups"]), *cmd]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd="/", env={"PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr
    return p


def _probe(path: str, groups: str) -> dict[str, Any]:
    _run(SETUP, path)
    out: dict[str, Any] = json.loads(_run(PROBE, path, groups).stdout)
    return out


@contextmanager
def _tmpfs() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="afuse-tmpfs-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=755", "tmpfs", d], check=True, timeout=30)
    try:
        yield d
    finally:
        subprocess.run(["umount", d], check=True, timeout=30)
        os.rmdir(d)


@needs_root
@pytest.mark.parametrize("groups", [str(SUPP), f"{SUPP},{OTHER + 1}", ""], ids=["supp", "two-supp", "none"])
@pytest.mark.parametrize("options", ["allow_other", "allow_other,default_permissions"])
def test_supplementary_groups_as_tmpfs(groups: str, options: str) -> None:
    with _tmpfs() as d:
        expected = _probe(d, groups)
    with mounted(MemFS(), options=options) as m:
        got = _probe(m.path, groups)
    assert got == expected
    if groups:  # the access came through the supplementary group: it must have been granted
        assert expected["read grp/rw"] == "ok" and expected["chgrp mine/f to supplementary"] == "ok"
        assert expected["chgrp mine/g to a non-member group"] == "EPERM"
    else:
        assert expected["read grp/rw"] == "EACCES"
