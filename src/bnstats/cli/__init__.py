"""The ``bnstats`` command (also ``python -m bnstats``).

Each subcommand lives in its own module with ``add_parser(subparsers)`` and ``run(args)``.
Bad input of any kind ends with exit status 2 and one line on stderr, never a traceback
(set ``BNSTATS_DEBUG=1`` to see one).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from bnstats import __version__
from bnstats.cli import demo, torch_commands

EXIT_USAGE = 2
COMMANDS = [demo, torch_commands]


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line: ``bnstats: error: ...``, exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message} (see --help)")


class UsageError(Exception):
    """A command-line mistake, reported in one line."""


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="bnstats",
        description="Batch normalization's test-time statistics: see them, estimate them, "
        "recompute them exactly.",
    )
    parser.add_argument("--version", action="version", version=f"bnstats {__version__}")
    subparsers = parser.add_subparsers(
        dest="command", metavar="COMMAND", parser_class=OneLineParser
    )
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "run", None):
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("bnstats: interrupted", file=sys.stderr)
        return 130
    except (UsageError, ValueError, OSError, ImportError) as err:
        if os.environ.get("BNSTATS_DEBUG"):
            raise
        print(f"bnstats: error: {one_line(err)}", file=sys.stderr)
        return EXIT_USAGE


def one_line(err: BaseException) -> str:
    """The error's message on a single line."""
    text = str(err) or type(err).__name__
    if isinstance(err, OSError) and err.filename and str(err.filename) not in text:
        text = f"{err.filename}: {text}"
    return " ".join(text.split())
