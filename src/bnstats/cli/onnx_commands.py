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


def onnx_for_audit(
    args: argparse.Namespace, model: Any, example: Any = None
) -> tuple[dict, list[str], int]:
    """With ``--onnx``: check that graph against the model; the JSON entry, text lines, exit
    status. With an ``example`` input (the first batch of ``--data``) the graph runs in
    onnxruntime and its outputs are compared with the model's eval output
    (:func:`bnstats.onnx.check_export`: it also sees statistics folded into the weights);
    without one, only its BatchNormalization nodes are checked."""
    if not getattr(args, "onnx", None):
        return {}, [], 0
    from bnstats.onnx import check_batchnorm_nodes, check_export

    example = _example_for_graph(args.onnx, example)
    if example is None:
        nodes = check_batchnorm_nodes(args.onnx, model)
        return {"onnx": nodes.to_dict()}, [f"{args.onnx}: {nodes}"], 0 if nodes.ok else 1
    check = check_export(args.onnx, model, example)  # its lines name the file
    return {"onnx": check.to_dict()}, [str(check)], 0 if check.ok else 1


def _example_for_graph(path: str, example: Any) -> Any:
    """``example`` cut to the graph's fixed batch size when it has one (an export with a
    static first dimension runs on that many rows only); None when the example has fewer rows
    or there is none (then only the BN nodes are checked). A file that does not load is left
    to the check, which names it."""
    if example is None:
        return None
    try:
        import onnx

        graph = onnx.load(path, load_external_data=False).graph
    except Exception:
        return example
    constants = {tensor.name for tensor in graph.initializer}
    inputs = [value for value in graph.input if value.name not in constants]
    dims = inputs[0].type.tensor_type.shape.dim if len(inputs) == 1 else ()
    if not dims or not dims[0].HasField("dim_value") or dims[0].dim_value == len(example):
        return example
    rows = dims[0].dim_value
    return example[:rows] if rows <= len(example) else None
