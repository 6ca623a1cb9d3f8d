"""``bnstats recalibrate``: replace a model's running statistics by the exact population
statistics over data, and write its state dict.

    bnstats recalibrate --model pkg.module:factory [--weights ckpt.pt] --data pkg.module:batches
                        --out recalibrated.pt [--mode eval] [--tolerance 1e-2]
                        [--one-batch-mib 256]

Prints, per layer, how far the old statistics were from the new ones (the audit's mean shift
and variance ratio on the same samples) and what the pass took (samples, passes, precision).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from bnstats._files import atomic_write_bytes
from bnstats.cli.arguments import (
    add_max_samples,
    add_model_arguments,
    add_out_file,
    add_pass_mode,
    input_files,
    load_inputs,
    one_batch_bytes,
    torch_tools,
)
from bnstats.cli.loading import require_torch, user_code_errors
from bnstats.cli.outputs import check_outputs, saved_bytes

NAME = "recalibrate"
HELP = "replace running statistics by exact population statistics over data"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_max_samples(parser)
    add_pass_mode(parser)
    add_out_file(parser)


@user_code_errors
def run(args: argparse.Namespace) -> int:
    bt = torch_tools()
    torch = require_torch()
    outputs = {"--out": args.out}
    check_outputs(outputs, input_files(args))
    model, batches = load_inputs(args)
    check_outputs(outputs, input_files(args))  # the modules --model and --data imported
    out = Path(args.out)
    options = {
        "max_samples": args.max_samples,
        "mode": args.mode,
        "tolerance": args.tolerance,
        "one_batch_bytes": one_batch_bytes(args),
    }
    lazy = [name for name, module in model.named_modules() if _uninitialized(torch, module)]
    changes = [] if lazy else _changes(bt, model, batches, options)
    result = bt.recalibrate_report(model, batches, **options, progress=False if args.json else None)
    atomic_write_bytes(out, saved_bytes(torch, model.state_dict()))
    summary = {
        "model": args.model,
        "out": str(out),
        "layers": changes,
        "uninitialized": lazy,
        "pass": _pass_summary(result),
    }
    print(json.dumps(summary) if args.json else _changes_table(changes, lazy, result, out))
    return 0


def _changes(bt: Any, model: Any, batches: Any, options: dict[str, Any]) -> list[dict]:
    """Per BN layer, how far the running statistics are from what recalibrating writes: the
    audit's mean shift and variance ratio on the same samples."""
    report = bt.audit(model, batches, **options)
    return [
        {key: row[key] for key in ("name", "mean_shift", "var_ratio")}
        for row in report.to_dict()["layers"]
    ]


def _uninitialized(torch: Any, module: Any) -> bool:
    lazy = isinstance(module, torch.nn.modules.lazy.LazyModuleMixin)
    return lazy and module.has_uninitialized_params()


def _pass_summary(result: Any) -> dict[str, Any]:
    """What the pass took: mode, samples, batches (and the data's length, None without one),
    passes (and eval mode's passes over a subset of the first batches, 0 where none),
    tolerance, whether it was met and the probability, at most, that some channel lies
    outside it (capped at 1), the worst layer's relative standard error (None when not
    finite)."""
    name, worst = result.worst
    return {
        "mode": result.mode,
        "samples": result.samples,
        "batches": result.batches,
        "data_batches": result.data_batches,
        "passes": result.passes,
        "subset_passes": result.subset_passes,
        "subset_batches": result.subset_batches,
        "tolerance": result.tolerance,
        "tolerance_met": result.met if result.tolerance is not None else None,
        "miss_probability": _probability(result.miss_probability),
        "worst_relative_error": worst if math.isfinite(worst) else None,
        "worst_layer": name,
    }


def _probability(bound: float | None) -> float | None:
    """A union bound as a probability: at most 1; None without one."""
    return None if bound is None else min(bound, 1.0)


def _changes_table(changes: list[dict], lazy: list[str], result: Any, out: Path) -> str:
    """Per layer, the audit's worst channel: |old - new mean| / std and old / new var."""
    if lazy:
        return (
            f"recalibrated; uninitialized lazy layers ({', '.join(lazy)}) had no statistics "
            f"to compare with; {result}; wrote {out}"
        )
    lines = [f"{'layer':<32} {'worst |old-new| mean / std':>28} {'worst old/new var':>20}"]
    for row in changes:
        shift = _worst(row["mean_shift"])
        ratio = _worst(row["var_ratio"])
        lines.append(f"{row['name']:<32} {shift:>28} {ratio:>20}")
    lines.append(str(result))
    lines.append(f"recalibrated {len(changes)} BN layers; wrote {out}")
    return "\n".join(lines)


def _worst(summary: dict) -> str:
    return "n/a" if summary["worst"] is None else f"{summary['worst']:.4g}"
