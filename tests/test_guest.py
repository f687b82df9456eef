"""Tests that run inside guest kernels under qemu (``tools/guest.py``), reported here.

This host's kernel has no CUSE and speaks FUSE 7.45. Each test boots a Debian kernel — 6.12
(FUSE 7.41) and 6.1 (7.38) — with this machine's root shared read-only, and runs there, in one
pytest run: the CUSE tests (``tests/guest/guest_cuse.py``), the core FUSE mount tests (every
opcode, notifications, interrupts, INIT against the real kernel) and ``tests/guest/guest_fuse.py`` (the
newer features refused or falling back as that kernel requires). Core tests about a feature
the guest kernel lacks are left out there (listed in :data:`NEWER`); they run on the host.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_guest_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("afuse_tools_guest", ROOT / "tools" / "guest.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


guest = _load_guest_tool()

#: The core mount tests (test_init.py is sans-IO against a simulated kernel: INIT against these real
#: kernels is guest_fuse.py's and test_session.py's).
CORE = [
    "tests/test_kernel_ops.py", "tests/test_notify.py", "tests/test_session.py", "tests/test_recent_features.py",
    "tests/guest/guest_fuse.py",
]
CUSE = ["tests/guest/guest_cuse.py"]

#: Core tests whose subject is newer than a guest kernel: test id -> (feature, kernels without it).
#: Measured: these fail on those kernels for exactly that reason; guest_fuse.py checks the
#: refusal or fallback there instead.
NEWER: dict[str, tuple[str, set[str]]] = {
    "tests/test_kernel_ops.py::test_copy_file_range_64": ("COPY_FILE_RANGE_64 (7.45)", {"6.1", "6.12"}),
    "tests/test_kernel_ops.py::test_copy_file_range_falls_back_to_32_bit_opcode":
        ("COPY_FILE_RANGE_64 (7.45)", {"6.1", "6.12"}),
    "tests/test_notify.py::test_inc_epoch_revalidates_dentries": ("NOTIFY_INC_EPOCH (7.44)", {"6.1", "6.12"}),
    "tests/test_notify.py::test_prune_makes_kernel_forget": ("NOTIFY_PRUNE (7.45)", {"6.1", "6.12"}),
    "tests/test_session.py::test_negotiated_flags_visible": ("protocol 7.45 itself", {"6.1", "6.12"}),
    "tests/test_recent_features.py::test_request_timeout_aborts_connection":
        ("REQUEST_TIMEOUT (7.43)", {"6.1", "6.12"}),
    "tests/test_notify.py::test_resend_redelivers_blocked_request": ("HAS_RESEND (7.40)", {"6.1"}),
    "tests/test_kernel_ops.py::test_statx_btime_comes_from_the_filesystem": ("STATX (7.39)", {"6.1"}),
    "tests/test_recent_features.py::test_statx_mask_and_btime": ("STATX (7.39)", {"6.1"}),
    "tests/test_recent_features.py::test_supp_groups_and_security_context":
        ("CREATE_SUPP_GROUP (Linux 6.2)", {"6.1"}),
    "tests/test_kernel_ops.py::test_fuseblk_bmap_syncfs_destroy": ("SYNCFS to fuseblk (after 6.12)", {"6.1", "6.12"}),
}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The C client of the example CUSE device, built here (the guest sees the host's /tmp)."""
    guest.ensure_host_packages()
    out = tmp_path_factory.mktemp("cuse-client") / "cuse_client"
    subprocess.run(["gcc", "-Wall", "-Wextra", "-Werror", "-O2", "-o", str(out),
                    str(ROOT / "tests" / "guest" / "cuse_client.c")], check=True)
    return str(out)


def _summary(stdout: str) -> dict[str, int]:
    """The counts in pytest's last line ("3 passed, 1 failed in 2.0s")."""
    lines = [ln for ln in stdout.splitlines() if re.search(r"\b(passed|failed|error|errors)\b", ln)]
    assert lines, f"no pytest summary in the guest's output:\n{stdout[-3000:]}"
    return {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", lines[-1])}


def _collected(args: list[str]) -> int:
    """How many tests pytest collects for ``args`` (here on the host, with the same deselection)."""
    res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    m = re.search(r"(\d+)(?:/\d+)? tests? collected", res.stdout)
    assert res.returncode == 0 and m, res.stdout + res.stderr
    return int(m.group(1))


@pytest.mark.timeout(1500)
@pytest.mark.parametrize("kernel", ["6.12", "6.1"])
def test_in_guest(kernel: str, client: str) -> None:
    deselect = [arg for test, (_f, kernels) in NEWER.items() if kernel in kernels for arg in ("--deselect", test)]
    args = [*CUSE, *CORE, *deselect]
    expected = _collected(args)
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", "-p", "no:hypothesispytest",
           "-o", "timeout=240", *args]
    res = guest.run(cmd, kernel, cwd=ROOT, env={"AFUSE_CUSE_CLIENT": client}, timeout=1400)
    report = f"kernel {res.kernel}, {res.seconds:.0f} s:\n{res.stdout[-6000:]}\n{res.stderr[-3000:]}"
    print(report)
    assert res.kernel.startswith(kernel + "."), report
    assert res.returncode == 0, report
    # Everything collected passed: nothing skipped, nothing left out beyond NEWER.
    assert _summary(res.stdout) == {"passed": expected, "deselected": len(deselect) // 2}, report


def test_newer_list_names_real_tests() -> None:
    """Every left-out test exists (a renamed test must not silently stop running anywhere)."""
    for test in NEWER:
        path, _, name = test.partition("::")
        assert re.search(rf"^(async )?def {re.escape(name)}\(", (ROOT / path).read_text(), re.M), test
    assert os.path.exists(ROOT / "tools" / "guest.py")
