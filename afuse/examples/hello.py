"""One read-only file: ``python -m afuse.examples.hello MOUNTPOINT``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from afuse.nodes import Dir, NodeFS, StaticFile
from afuse.wire.types import Attr

from ._cli import make_parser, run_example

NAME = b"hello"
DATA = b"Hello, world!\n"
FILE_ID = 2  # nodeids follow the tree's order: the root is 1, its first child 2


class HelloFS(NodeFS):
    """A root directory holding one file, ``hello``."""

    def __init__(self) -> None:
        self.hello = StaticFile(DATA)
        super().__init__(Dir({NAME: self.hello}))

    @property
    def _file(self) -> Attr:
        """The file's attributes."""
        return self.hello.attr


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    args = make_parser("Mount a filesystem holding one read-only file.",
                       prog="python -m afuse.examples.hello").parse_args(argv)
    return run_example(HelloFS(), args)


if __name__ == "__main__":
    sys.exit(main())
