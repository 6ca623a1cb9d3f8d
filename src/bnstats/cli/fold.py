"""``bnstats fold``: fold a model's BatchNorm layers into its conv/linear layers and write the
folded module (``torch.save``), and with ``--onnx`` also its ONNX export.

    bnstats fold --model pkg.module:factory [--weights ckpt.pt] [--data FILE.npz]
                 --out folded.pt [--onnx folded.onnx]

Every output path is checked before any work; the ``.pt`` and the ``.onnx`` are written
together, each complete, or neither (an interruption during the final renames can leave the
``.onnx`` missing, never the old one beside the new ``.pt``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

from bnstats._files import atomic_write_bytes
from bnstats.cli.arguments import (
    add_model_arguments,
    add_out_file,
    first_input,
    input_files,
    load_inputs,
    torch_tools,
)
from bnstats.cli.loading import require_torch, user_code_errors
from bnstats.cli.onnx_commands import add_onnx_option, onnx_for_fold
from bnstats.cli.outputs import check_outputs, saved_bytes, written_together

NAME = "fold"
HELP = "fold BatchNorm into neighbouring conv/linear layers for inference"
NEEDS_DATA = "needs_example_inputs"  # the fold report's code for "only a shape can tell"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, data_required=False)
    add_out_file(parser)
    add_onnx_option(parser, NAME)


@user_code_errors
def run(args: argparse.Namespace) -> int:
    bt = torch_tools()
    torch = require_torch()
    outputs = {"--out": args.out, **({"--onnx": args.onnx} if args.onnx else {})}
    check_outputs(outputs, input_files(args))
    model, batches = load_inputs(args)
    check_outputs(outputs, input_files(args))  # the modules --model and --data imported
    model.eval()
    example = first_input(batches)
    if example is not None:
        with torch.inference_mode():
            model(example)  # data of the wrong shape fails here, in the user's own model
    with contextlib.redirect_stderr(io.StringIO()):  # torch.fx prints tracebacks itself
        fused = _fold(bt, model, example)
        difference = _max_relative_difference(torch, model, fused, batches) if batches else None
    report = _in_cli_words(fused.fold_report)
    out, onnx = Path(args.out), Path(args.onnx) if args.onnx else None
    with written_together([out, *([onnx] if onnx else [])]) as staging:
        onnx_entry, onnx_lines = onnx_for_fold(args, model, example, staging.get(onnx))
        atomic_write_bytes(staging[out], saved_bytes(torch, fused))
    summary = {
        "model": args.model,
        "out": str(out),
        "report": report.to_dict(),
        "max_relative_difference": difference,
        **onnx_entry,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(str(report))
        if difference is not None:
            print(f"max relative output difference on the data: {difference:.3g}")
        print(f"wrote {out} (load with torch.load(path, weights_only=False))")
        for line in onnx_lines:
            print(line)
    return 0


def _fold(bt: Any, model: Any, example: Any) -> Any:
    """``bt.fold``, its warning about ``example_inputs`` said in the command's words."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*need example_inputs", category=UserWarning)
        fused = bt.fold(model, example_inputs=example)
    need = [entry.name for entry in fused.fold_report.kept if entry.code == NEEDS_DATA]
    if need:
        warnings.warn(
            f"{len(need)} BatchNorm layer(s) kept because only --data shows whether their "
            f"dim 1 is the neighbouring layer's channels: {', '.join(need)}",
            UserWarning,
            stacklevel=2,
        )
    return fused


def _in_cli_words(report: Any) -> Any:
    """The fold report with its advice to pass ``example_inputs`` given as ``--data``."""
    entries = [
        replace(e, reason=e.reason.replace("pass example_inputs to fold", "give --data"))
        if e.reason
        else e
        for e in report.entries
    ]
    return replace(report, entries=entries)


def _max_relative_difference(torch: Any, model: Any, fused: Any, batches: list[Any]) -> float:
    """max |fused(x) - model(x)| / max |model(x)| over the batches, in eval mode."""
    worst = 0.0
    with torch.inference_mode():
        for batch in batches:
            x = first_input([batch])
            reference, folded = model(x), fused(x)
            scale = float(reference.abs().max()) or 1.0
            worst = max(worst, float((folded - reference).abs().max()) / scale)
    return worst
