"""The ``bnstats`` command (also ``python -m bnstats``).

One module per subcommand: ``demo``, ``audit``, ``recalibrate``, ``fold`` (``--onnx`` of
the last two in ``onnx_commands``). Options several commands share are in ``arguments``
(``--model``, ``--weights``, ``--data``, ... and ``--help``'s formatter, which shows each
default), loading the user's model and data in ``loading``, output files (checked before
any work, written together) in ``outputs``.

To add a command, say ``diagnose``:

1. write ``bnstats/cli/diagnose.py`` with::

       NAME = "diagnose"
       HELP = "one line for bnstats --help"

       def add_arguments(parser: argparse.ArgumentParser) -> None:
           add_model_arguments(parser)  # from bnstats.cli.arguments, if it takes a model
           parser.add_argument("--strict", action="store_true", help="...")

       @user_code_errors  # from bnstats.cli.loading: the user's code failing is one line
       def run(args: argparse.Namespace) -> int:
           ...  # import torch and bnstats.torch here, not at the top: demo runs without
           return 0  # the exit status

2. add ``"diagnose"`` to :data:`COMMANDS` below (the order of ``bnstats --help``);
3. test it in ``tests/cli/test_diagnose.py`` (``tests/cli/conftest.py``'s ``cli`` fixture
   runs ``bnstats`` as a separate process).

Bad input of any kind ends with exit status 2 and one line on stderr, never a traceback
(set ``BNSTATS_DEBUG=1`` to see one). Python warnings raised on the way are not printed as
they come (two lines each, with the source line): a failing command mentions the first in
its one error line, a succeeding one prints each distinct warning as one line at the end.
A reader that closes the output early (``bnstats audit --json | head``) ends the command
quietly.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from collections.abc import Sequence

from bnstats import __version__
from bnstats.cli.arguments import DefaultsHelpFormatter

EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 128 + 13  # what a shell reports for a process ended by SIGPIPE
COMMANDS = ("demo", "diagnose", "audit", "recalibrate", "fold")
"""The command modules ``bnstats.cli.<name>``, in the order ``bnstats --help`` lists them;
each has ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``."""
_MODULES = tuple(importlib.import_module(f"{__name__}.{name}") for name in COMMANDS)


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
    for command in _MODULES:
        sub = subparsers.add_parser(
            command.NAME,
            help=command.HELP,
            description=command.HELP,
            formatter_class=DefaultsHelpFormatter,
        )
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    with warnings.catch_warnings(record=True) as caught:
        try:
            status = _run(parser, argv)
        except KeyboardInterrupt:
            print("bnstats: interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:
            _discard_stdout()
            return EXIT_BROKEN_PIPE
        except (UsageError, ValueError, OSError, ImportError, MemoryError) as err:
            if os.environ.get("BNSTATS_DEBUG"):
                raise
            print(f"bnstats: error: {one_line(err)}{_first_warning(caught)}", file=sys.stderr)
            return EXIT_USAGE
    for message in dict.fromkeys(one_line(w.message) for w in caught):
        print(f"bnstats: warning: {message}", file=sys.stderr)
    return status


def _run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.error(f"give a command: {', '.join(COMMANDS)}")
    status = int(args.run(args) or 0)
    sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at exit
    return status


def _first_warning(caught: list[warnings.WarningMessage]) -> str:
    if not caught:
        return ""
    more = f" and {len(caught) - 1} more" if len(caught) > 1 else ""
    return f" (after a warning{more}: {one_line(caught[0].message)})"


def _discard_stdout() -> None:
    """Point stdout at the null device, so that flushing it at exit raises nothing."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


_TENSORS = "give --data batches of torch tensors or (x, y) tuples of them"
CLI_WORDS = (
    (
        "drop batches of one sample, choose max_samples so that the last batch keeps 2 or "
        "more, or pass mode='eval', which needs no batch statistics",
        "choose another --batch-size (or --max-samples) so that no batch has one sample, or "
        "recalibrate with --mode eval, which needs no batch statistics",
    ),
    ("pass forward=lambda model, batch: model(...) to say how to call it", _TENSORS),
    ("pass forward=lambda model, batch: model(...) to say how", _TENSORS),
    ("pass mode='eval'", "use --mode eval"),
    ("mode='eval_exact'", "--mode eval_exact"),
    ("mode='eval'", "--mode eval"),
    ("max_samples=", "--max-samples "),
)
"""Advice in the Python API's terms, and what it is on the command line."""


def in_cli_words(text: str) -> str:
    """``text`` with the Python API's advice (``mode='eval'``) named by the options."""
    for api, cli in CLI_WORDS:
        text = text.replace(api, cli)
    return text


def one_line(err: BaseException) -> str:
    """The error's message on a single line, advice in the command line's words."""
    text = (str(err) or type(err).__name__).removeprefix("bnstats: ")
    if isinstance(err, MemoryError):
        text = f"out of memory ({text})"
    if isinstance(err, OSError) and err.filename and str(err.filename) not in text:
        text = f"{err.filename}: {text}"
    return in_cli_words(" ".join(text.split()))
