"""The ``cxrgen`` command line: one program, subcommands registered by entry point.

Each package registers its subcommands under the ``cxrgen.commands`` entry-point
group (pyproject.toml), so this module never imports export/ or service/ and the
dependencies keep pointing one way. A registration function adds a subparser and
sets ``func``; heavy imports happen inside ``func``, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points


class CommandError(Exception):
    """A user-facing error: printed as one line, exit status 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxrgen", description="Synthetic chest X-rays from radiology text.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for ep in sorted(entry_points(group="cxrgen.commands"), key=lambda e: e.name):
        ep.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (CommandError, ValueError, FileNotFoundError) as e:
        print(f"cxrgen {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cxrgen {args.command}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
