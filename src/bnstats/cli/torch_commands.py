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
import contextlib
import io
import json
from pathlib import Path
from typing import Any

from bnstats._files import atomic_write_bytes
from bnstats.cli.loading import load_batches, load_model, require_torch
from bnstats.cli.onnx_commands import add_onnx_option, onnx_for_audit, onnx_for_fold
from bnstats.cli.values import positive_int

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
        p.add_argument(
            "--batch-size", type=positive_int, default=64, help="rows per batch for npz data"
        )
        p.add_argument("--json", action="store_true", help="print one JSON object")
        if name != "fold":
            p.add_argument("--max-samples", type=positive_int, help="stop after this many samples")
        _add_out(p, name)
        add_onnx_option(p, name)
        p.set_defaults(run=RUNNERS[name])


def _add_out(parser: argparse.ArgumentParser, name: str) -> None:
    if name == "audit":
        parser.add_argument("--out", metavar="DIR", help="also write the audit as DIR/audit.html")
    else:
        parser.add_argument("--out", required=True, metavar="FILE.pt", help="where to write")


def _torch_tools() -> Any:
    """``bnstats.torch``, or the install hint in one line when torch is missing."""
    require_torch()
    import bnstats.torch as bt

    return bt


def _inputs(args: argparse.Namespace) -> tuple[Any, list[Any] | None]:
    model = load_model(args.model, args.weights)
    batches = load_batches(args.data, args.batch_size, args.data_key) if args.data else None
    return model, batches


def run_audit(args: argparse.Namespace) -> int:
    bt = _torch_tools()
    page = _audit_page_path(args.out) if args.out else None
    model, batches = _inputs(args)
    model.eval()  # as deployed: a freshly built model is in training mode, not the user's doing
    report = bt.audit(
        model, batches, max_samples=args.max_samples, progress=False if args.json else None
    )
    onnx_entry, onnx_lines, status = onnx_for_audit(args, model)
    if page:
        _write_audit_page(report, page)
    if args.json:
        print(
            json.dumps({**report.to_dict(), **({"page": str(page)} if page else {}), **onnx_entry})
        )
    else:
        print("\n".join([str(report), *([f"wrote {page}"] if page else []), *onnx_lines]))
    return status


def _progress(args: argparse.Namespace) -> bool | None:
    """The pass's progress bar: never under ``--json``, else when stderr is a terminal."""
    return False if args.json else None


def _audit_page_path(directory: str) -> Path:
    """``directory/audit.html``, checked before any work: ``directory`` must be a folder or
    not exist yet."""
    from bnstats.report.audit_page import AUDIT_PAGE

    folder = Path(directory)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--out {folder} is a file; give the folder to write {AUDIT_PAGE} in")
    return folder / AUDIT_PAGE


def _write_audit_page(report: Any, page: Path) -> None:
    from bnstats.report.audit_page import write_audit_report

    write_audit_report(report, page.parent)


def run_recalibrate(args: argparse.Namespace) -> int:
    bt = _torch_tools()
    torch = require_torch()
    out = _writable(args.out)
    model, batches = _inputs(args)
    lazy = [name for name, module in model.named_modules() if _uninitialized(module)]
    changes = [] if lazy else _changes(bt, model, batches, args.max_samples)
    bt.recalibrate(
        model, batches, max_samples=args.max_samples, progress=False if args.json else None
    )
    atomic_write_bytes(out, _saved(torch, model.state_dict()))
    summary = {"model": args.model, "out": str(out), "layers": changes, "uninitialized": lazy}
    print(json.dumps(summary) if args.json else _changes_table(changes, lazy, out))
    return 0


def _changes(bt: Any, model: Any, batches: list[Any], max_samples: int | None) -> list[dict]:
    """Per BN layer, how far the running statistics are from what recalibrating writes: the
    audit's mean shift and variance ratio on the same samples."""
    report = bt.audit(model, batches, max_samples=max_samples)
    return [
        {key: row[key] for key in ("name", "mean_shift", "var_ratio")}
        for row in report.to_dict()["layers"]
    ]


def _uninitialized(module: Any) -> bool:
    torch = require_torch()
    lazy = isinstance(module, torch.nn.modules.lazy.LazyModuleMixin)
    return lazy and module.has_uninitialized_params()


def _changes_table(changes: list[dict], lazy: list[str], out: Path) -> str:
    """Per layer, the audit's worst channel: |old - new mean| / std and old / new var."""
    if lazy:
        return (
            f"recalibrated; uninitialized lazy layers ({', '.join(lazy)}) had no statistics "
            f"to compare with; wrote {out}"
        )
    lines = [f"{'layer':<32} {'worst |old-new| mean / std':>28} {'worst old/new var':>20}"]
    for row in changes:
        shift = _worst(row["mean_shift"])
        ratio = _worst(row["var_ratio"])
        lines.append(f"{row['name']:<32} {shift:>28} {ratio:>20}")
    lines.append(f"recalibrated {len(changes)} BN layers; wrote {out}")
    return "\n".join(lines)


def _worst(summary: dict) -> str:
    return "n/a" if summary["worst"] is None else f"{summary['worst']:.4g}"


def run_fold(args: argparse.Namespace) -> int:
    bt = _torch_tools()
    torch = require_torch()
    out = _writable(args.out)
    model, batches = _inputs(args)
    model.eval()
    example = _first_input(batches)
    if example is not None:
        with torch.inference_mode():
            model(example)  # data of the wrong shape fails here, in the user's own model
    with contextlib.redirect_stderr(io.StringIO()):  # torch.fx prints tracebacks itself
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
    """Failures inside the user's model or data (a shape mismatch, a forward or a batch source
    raising anything) become one ``ValueError`` line, reported with exit status 2."""

    def wrapped(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except (ValueError, OSError, ImportError, MemoryError):
            raise  # already one line
        except Exception as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ValueError(f"{args.command}: {type(err).__name__}: {first}") from err

    return wrapped


RUNNERS = {
    "audit": _one_line_errors(run_audit),
    "recalibrate": _one_line_errors(run_recalibrate),
    "fold": _one_line_errors(run_fold),
}
