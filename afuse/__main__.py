"""``python -m afuse COMMAND``: ``info`` reports the kernel's FUSE features (see :mod:`afuse.info`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to a subcommand."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print("usage: python -m afuse info [-h]\n\n"
              "  info   mount a scratch filesystem and report what this kernel's FUSE offers")
        return 0 if args else 2
    if args[0] == "info":
        from .info import main as info_main

        return info_main(args[1:])
    print(f"python -m afuse: unknown command {args[0]!r} (try: info)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
