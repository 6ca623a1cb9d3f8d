"""``bnstats audit``: a model's running statistics against the truth measured on data.

    bnstats audit --model pkg.module:factory [--weights ckpt.pt] --data FILE.npz [--out DIR]

Prints the audit's table (``--json``: its ``to_dict()``); ``--out DIR`` also writes
``DIR/audit.html``; ``--onnx FILE`` also checks an exported graph
(:mod:`bnstats.cli.onnx_commands`). Exit status 1 when that check fails, or with
``--strict`` when any layer (or the model) is flagged: for CI pipelines.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bnstats.cli.arguments import (
    add_max_samples,
    add_model_arguments,
    first_input,
    input_files,
    load_inputs,
    torch_tools,
)
from bnstats.cli.loading import user_code_errors
from bnstats.cli.onnx_commands import add_onnx_option, onnx_for_audit
from bnstats.cli.outputs import check_page_folder

NAME = "audit"
HELP = "compare a model's running statistics with the truth measured on data"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_max_samples(parser)
    parser.add_argument("--out", metavar="DIR", help="also write the audit as DIR/audit.html")
    add_onnx_option(parser, NAME)
    parser.add_argument(
        "--strict",
        action="store_true",
        help="exit with status 1 when any layer is flagged (for CI pipelines)",
    )


@user_code_errors
def run(args: argparse.Namespace) -> int:
    bt = torch_tools()
    page = _audit_page_path(args) if args.out is not None else None
    model, batches = load_inputs(args)
    if page:
        _audit_page_path(args)  # again: the modules --model and --data imported
    model.eval()  # as deployed: a freshly built model is in training mode, not the user's doing
    report = bt.audit(
        model, batches, max_samples=args.max_samples, progress=False if args.json else None
    )
    onnx_entry, onnx_lines, status = onnx_for_audit(args, model, first_input(batches))
    if page:
        _write_audit_page(report, page)
    flagged = flagged_layers(report)
    strict_lines = []
    if args.strict and flagged:
        status = 1
        strict_lines = [f"--strict: {len(flagged)} flagged: {', '.join(flagged)}"]
    if args.json:
        print(
            json.dumps({**report.to_dict(), **({"page": str(page)} if page else {}), **onnx_entry})
        )
    else:
        lines = [str(report), *([f"wrote {page}"] if page else []), *onnx_lines, *strict_lines]
        print("\n".join(lines))
    return status


def flagged_layers(report: Any) -> list[str]:
    """The names of the flagged layers, and ``the model`` if the report has model flags."""
    names = [layer.name or "<model>" for layer in report.layers if layer.flags]
    return [*names, *(["the model"] if report.flags else [])]


def _audit_page_path(args: argparse.Namespace) -> Path:
    """``--out``'s ``audit.html``, checked before any work."""
    from bnstats.report.audit_page import AUDIT_PAGE

    return check_page_folder("--out", args.out, AUDIT_PAGE, input_files(args))


def _write_audit_page(report: Any, page: Path) -> None:
    from bnstats.report.audit_page import write_audit_report

    write_audit_report(report, page.parent)
