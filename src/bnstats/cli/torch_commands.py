"""``bnstats audit | recalibrate | fold``: the PyTorch tools on a user's own model.

    bnstats audit       --model pkg.module:factory [--weights ckpt.pt] --data FILE.npz
    bnstats recalibrate --model ... --data pkg.module:batches --out recalibrated.pt
    bnstats fold        --model ... [--data ...] --out folded.pt

The model comes from ``--model`` (a factory or a module instance, see
:mod:`bnstats.cli.loading`), its weights from ``--weights``; nothing is written unless the
command succeeds, and then atomically.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Any

from bnstats._files import atomic_write_bytes
from bnstats.cli.loading import load_batches, load_model, require_torch
from bnstats.cli.onnx_commands import add_onnx_option, onnx_for_audit, onnx_for_fold

NAMES = ("audit", "recalibrate", "fold")
HELP = {
    "audit": "compare a model's running statistics with the truth measured on data",
    "recalibrate": "replace running statistics by exact population statistics over data",
    "fold": "fold BatchNorm into neighbouring conv/linear layers for inference",
}


def add_parser(subparsers: Any) -> None:
    for name in NAMES:
        p = subparsers.add_parser(name, help=HELP[name], description=HELP[name])
        p.add_argument("--model", required=True, help="pkg.module:factory or file.py:factory")
        p.add_argument("--weights", help="a state dict saved with torch.save")
        p.add_argument(
            "--data",
            required=name != "fold",
            help="FILE.npz (array X, inputs or X_train) or pkg.module:batches",
        )
        p.add_argument("--data-key", help="the npz array holding the inputs")
        p.add_argument("--batch-size", type=int, default=64, help="rows per batch for npz data")
        p.add_argument("--json", action="store_true", help="print one JSON object")
        if name != "fold":
            p.add_argument("--max-samples", type=int, help="stop after this many samples")
        _add_out(p, name)
        add_onnx_option(p, name)
        p.set_defaults(run=RUNNERS[name])


def _add_out(parser: argparse.ArgumentParser, name: str) -> None:
    if name == "audit":
        parser.add_argument("--out", metavar="DIR", help="also write the audit as DIR/audit.html")
    else:
        parser.add_argument("--out", required=True, metavar="FILE.pt", help="where to write")


def _inputs(args: argparse.Namespace) -> tuple[Any, list[Any] | None]:
    model = load_model(args.model, args.weights)
    batches = load_batches(args.data, args.batch_size, args.data_key) if args.data else None
    return model, batches


def run_audit(args: argparse.Namespace) -> int:
    import bnstats.torch as bt

    model, batches = _inputs(args)
    report = bt.audit(model, _limited(batches, args.max_samples))
    onnx_entry, onnx_lines, status = onnx_for_audit(args, model)
    if args.out:
        _write_audit_page(report, Path(args.out))
    text = "\n".join([str(report), *onnx_lines])
    print(json.dumps({**report.to_dict(), **onnx_entry}) if args.json else text)
    return status


def _limited(batches: list[Any], max_samples: int | None) -> list[Any]:
    """The first ``max_samples`` samples of tensor batches (all of them without a limit)."""
    if max_samples is None:
        return batches
    if max_samples < 1:
        raise ValueError(f"--max-samples must be at least 1, got {max_samples}")
    kept, seen = [], 0
    for batch in batches:
        if seen >= max_samples:
            break
        if hasattr(batch, "shape"):
            batch = batch[: max_samples - seen]
        kept.append(batch)
        seen += len(batch) if hasattr(batch, "__len__") else 1
    return kept


def _write_audit_page(report: Any, directory: Path) -> None:
    from bnstats.report.audit_page import write_audit_report

    write_audit_report(report, directory)


def run_recalibrate(args: argparse.Namespace) -> int:
    import bnstats.torch as bt

    torch = require_torch()
    out = _writable(args.out)
    model, batches = _inputs(args)
    before = _running_buffers(model)
    bt.recalibrate(model, batches, max_samples=args.max_samples)
    changes = _changes(before, _running_buffers(model))
    atomic_write_bytes(out, _saved(torch, model.state_dict()))
    summary = {"model": args.model, "out": str(out), "layers": changes}
    print(json.dumps(summary) if args.json else _changes_table(changes, out))
    return 0


def _running_buffers(model: Any) -> dict[str, tuple[Any, Any]]:
    torch = require_torch()
    return {
        name: (
            module.running_mean.detach().double().clone(),
            module.running_var.detach().double().clone(),
        )
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.modules.batchnorm._NormBase)
        and getattr(module, "running_mean", None) is not None
    }


def _changes(before: dict[str, tuple[Any, Any]], after: dict[str, tuple[Any, Any]]) -> list[dict]:
    """Per layer: the largest |old mean - new mean| / new std, and the range of old/new var."""
    rows = []
    for name, (old_mean, old_var) in before.items():
        new_mean, new_var = after[name]
        shift = ((old_mean - new_mean).abs() / new_var.clamp_min(1e-12).sqrt()).max()
        ratio = old_var / new_var.clamp_min(1e-12)
        rows.append(
            {
                "name": name,
                "max_mean_shift_std": float(shift),
                "min_var_ratio": float(ratio.min()),
                "max_var_ratio": float(ratio.max()),
            }
        )
    return rows


def _changes_table(changes: list[dict], out: Path) -> str:
    lines = [f"{'layer':<32} {'max |old-new| mean / std':>26} {'old/new var':>20}"]
    for row in changes:
        var_range = f"{row['min_var_ratio']:.3g}..{row['max_var_ratio']:.3g}"
        lines.append(f"{row['name']:<32} {row['max_mean_shift_std']:>26.4g} {var_range:>20}")
    lines.append(f"recalibrated {len(changes)} BN layers; wrote {out}")
    return "\n".join(lines)


def run_fold(args: argparse.Namespace) -> int:
    import bnstats.torch as bt

    torch = require_torch()
    out = _writable(args.out)
    model, batches = _inputs(args)
    model.eval()
    example = _first_input(batches)
    fused = bt.fold(model, example_inputs=example)
    difference = _max_relative_difference(model, fused, batches) if batches else None
    onnx_entry, onnx_lines = onnx_for_fold(args, model, example)
    atomic_write_bytes(out, _saved(torch, fused))
    summary = {
        "model": args.model,
        "out": str(out),
        "report": fused.fold_report.to_dict(),
        "max_relative_difference": difference,
        **onnx_entry,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(str(fused.fold_report))
        if difference is not None:
            print(f"max relative output difference on the data: {difference:.3g}")
        print(f"wrote {out} (load with torch.load(path, weights_only=False))")
        for line in onnx_lines:
            print(line)
    return 0


def _first_input(batches: list[Any] | None) -> Any:
    if not batches:
        return None
    first = batches[0]
    return first[0] if isinstance(first, (tuple, list)) else first


def _max_relative_difference(model: Any, fused: Any, batches: list[Any]) -> float:
    """max |fused(x) - model(x)| / max |model(x)| over the batches, in eval mode."""
    torch = require_torch()
    worst = 0.0
    with torch.inference_mode():
        for batch in batches:
            x = _first_input([batch])
            reference, folded = model(x), fused(x)
            scale = float(reference.abs().max()) or 1.0
            worst = max(worst, float((folded - reference).abs().max()) / scale)
    return worst


def _writable(path: str) -> Path:
    """``path`` if its directory exists (checked before any work is done)."""
    out = Path(path)
    if not out.parent.is_dir():
        raise ValueError(f"--out {out}: directory {out.parent} does not exist")
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; give a file name")
    return out


def _saved(torch: Any, obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _one_line_errors(run: Any) -> Any:
    """Failures inside the user's model (a shape mismatch, a forward that raises) become one
    ``ValueError`` line, which the command reports with exit status 2."""

    def wrapped(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except (RuntimeError, TypeError, KeyError, IndexError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ValueError(f"{args.command}: {type(err).__name__}: {first}") from err

    return wrapped


RUNNERS = {
    "audit": _one_line_errors(run_audit),
    "recalibrate": _one_line_errors(run_recalibrate),
    "fold": _one_line_errors(run_fold),
}
