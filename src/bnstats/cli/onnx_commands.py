"""``--onnx`` for ``bnstats fold`` and ``bnstats audit`` (the ``onnx`` extra).

    bnstats fold  --model ... --data ... --out folded.pt --onnx folded.onnx
    bnstats audit --model ... --data ... --onnx exported.onnx

``fold --onnx`` also writes the folded model as ONNX (:func:`bnstats.onnx.export_folded`:
no BN node may be left unchecked, onnxruntime must compute torch's eval output on the first
batch of ``--data``); ``audit --onnx`` also checks an exported graph's BatchNormalization
nodes against the model (:func:`bnstats.onnx.check_batchnorm_nodes`) and exits with status 1
when one is in training mode, has another eps or other statistics.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

HELP = {
    "fold": "also write the folded model as ONNX, checked with onnxruntime (needs --data)",
    "audit": "also check this ONNX file's BatchNormalization nodes against the model",
}


def add_onnx_option(parser: argparse.ArgumentParser, name: str) -> None:
    """``--onnx FILE.onnx`` on the commands that take it (fold, audit)."""
    if name in HELP:
        parser.add_argument("--onnx", metavar="FILE.onnx", help=HELP[name])


def onnx_for_fold(
    args: argparse.Namespace, model: Any, example: Any, into: Path | None = None
) -> tuple[dict, list[str]]:
    """With ``--onnx``: export the folded model there (or into ``into``, a staging file that
    becomes ``--onnx`` later); the JSON entry and the text lines."""
    if not getattr(args, "onnx", None):
        return {}, []
    if example is None:
        raise ValueError("--onnx needs --data: the export is checked on its first batch")
    from bnstats.onnx import export_folded

    result = export_folded(model, example, into or Path(args.onnx))  # written atomically
    result = replace(result, path=Path(args.onnx))
    entry = {
        "path": str(result.path),
        "batchnorm_nodes": result.batchnorm_nodes.to_dict(),
        "max_abs_error": result.max_abs_error,
        "output_scale": result.output_scale,
    }
    return {"onnx": entry}, [str(result)]


def onnx_for_audit(args: argparse.Namespace, model: Any) -> tuple[dict, list[str], int]:
    """With ``--onnx``: check that graph's BN nodes; the JSON entry, text lines, exit status."""
    if not getattr(args, "onnx", None):
        return {}, [], 0
    from bnstats.onnx import check_batchnorm_nodes

    check = check_batchnorm_nodes(args.onnx, model)
    return {"onnx": check.to_dict()}, [f"{args.onnx}: {check}"], 0 if check.ok else 1
