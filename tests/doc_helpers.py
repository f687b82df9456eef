"""Helpers of the tests that keep docs/ true: loading an example by path, waiting, mounts."""

from __future__ import annotations

import importlib.util
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from afuse import device

ROOT = Path(__file__).resolve().parents[1]


def load_example(path: Path) -> ModuleType:
    """The module at ``path``, loaded by path (so what the docs show is what runs)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def python_blocks(doc: Path) -> list[str]:
    """The fenced Python blocks of a Markdown page."""
    return re.findall(r"^```python\n(.*?)^```$", doc.read_text(), re.M | re.S)


def wait(predicate: Callable[[], object], timeout: float = 10.0) -> bool:
    """Poll ``predicate`` until true (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def mounted(path: str) -> bool:
    """True if ``path`` is a FUSE mountpoint."""
    return os.path.realpath(path) in [mp for mp, _type, _src in device.find_mounts()]


def read(path: str) -> bytes:
    """The whole file."""
    with open(path, "rb") as f:
        return f.read()
