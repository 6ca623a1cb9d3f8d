"""``export_folded``: fold BN away, export with ``torch.onnx.export``, check, write."""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnstats._files import atomic_write_bytes
from bnstats.onnx._agreement import (
    DEFAULT_FACTOR,
    DEFAULT_RTOL,
    Agreement,
    OnnxExportError,
    check_tolerances,
    positional,
    reference_outputs,
    run_onnxruntime,
)
from bnstats.onnx._graph import require
from bnstats.onnx._modes import in_eval_mode
from bnstats.onnx.nodes import BatchNormNodes, check_batchnorm_nodes

if TYPE_CHECKING:
    from torch import nn

# The options of torch.onnx.export that export_folded passes on, and the exporters taking them.
_BOTH = ("dynamo", "opset_version", "input_names", "output_names", "dynamic_axes")
_DYNAMO_ONLY = ("dynamic_shapes", "optimize", "custom_translation_table")
_TORCHSCRIPT_ONLY = ("keep_initializers_as_inputs",)
_QUIET_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "torch._dynamo", "onnxscript")


@dataclass
class OnnxExport:
    """What :func:`export_folded` wrote and checked.

    ``path``: the ONNX file; ``fold_report``: what fold did with each BN layer;
    ``batchnorm_nodes``: the ``BatchNormalization`` nodes left in the graph (none when every
    layer folded); ``agreement``: how close onnxruntime's outputs on ``example_inputs`` are to
    a float64 run of the model, next to torch's own eval (:class:`Agreement`, each output on
    its own); ``export_warnings``: what torch's exporter warned (kept here, not printed).
    ``max_abs_error`` is ``max |onnxruntime - torch eval|`` and ``output_scale`` the largest
    value of the float64 run, both of the output judged most severely (``agreement.index``);
    ``rtol`` is the floor of the tolerance.
    """

    path: Path
    fold_report: Any
    batchnorm_nodes: BatchNormNodes
    agreement: Agreement
    export_warnings: list[str] = field(default_factory=list)

    @property
    def max_abs_error(self) -> float:
        return self.agreement.torch_difference

    @property
    def output_scale(self) -> float:
        return self.agreement.scale

    @property
    def rtol(self) -> float:
        return self.agreement.rtol

    def __str__(self) -> str:
        left = len(self.batchnorm_nodes.nodes)
        lines = [
            f"wrote {self.path}: {len(self.fold_report.folded)} of {len(self.fold_report)} BN "
            f"layer(s) folded, {left} BatchNormalization node(s) left",
            str(self.agreement),
        ]
        if left or self.batchnorm_nodes.weight_standardization:
            lines.append(str(self.batchnorm_nodes))
        return "\n".join(lines)


def export_folded(
    model: nn.Module,
    example_inputs: Any,
    path: str | Path,
    *,
    rtol: float = DEFAULT_RTOL,
    factor: float = DEFAULT_FACTOR,
    **export_kwargs: Any,
) -> OnnxExport:
    """Fold ``model``'s BN layers, export the result to ONNX at ``path`` and check it.

    1. ``bt.fold(model, example_inputs)`` (the model itself is left untouched);
    2. ``torch.onnx.export(folded, args, ...)``, its warnings and log lines kept in
       ``export_warnings`` instead of printed. Options passed on: ``dynamo``,
       ``opset_version``, ``input_names``, ``output_names``, ``dynamic_axes`` (both exporters);
       ``dynamic_shapes``, ``optimize``, ``custom_translation_table`` (the default exporter,
       ``dynamo=True``); ``keep_initializers_as_inputs`` (the TorchScript one,
       ``dynamo=False``, where ``dynamic_axes`` needs ``input_names``; ``output_names``
       default to ``output``, ``output_1``, ...). Any other option is refused with the list.
       Unless ``dynamic_shapes`` or ``dynamic_axes`` say otherwise, the first dimension of
       every tensor input is exported as a dynamic ``batch`` dimension (default exporter);
    3. :func:`check_batchnorm_nodes` on the graph against the folded model: BN layers that did
       not fold (see ``fold_report``) appear as nodes and must be in inference mode with the
       layer's eps (weight-standardisation nodes are left alone);
    4. onnxruntime (CPU) runs the graph on ``example_inputs``; each output tensor must be about
       as close to a float64 run of the ORIGINAL model as torch's own eval output (in the
       model's dtype) is: ``max |ort - float64| <= max(factor * max |torch - float64|, rtol *
       max |float64|)``, every maximum over that one output (see :class:`Agreement`; a model
       that cannot run in float64 is judged against its own output with ``rtol`` alone, and
       the result says so).

    The model is folded and exported in eval mode (its own training flags are put back).
    ``example_inputs``: a tensor or a tuple of positional tensors. The file is written only if
    every check passes, atomically; otherwise :class:`OnnxExportError` (a ``ValueError``) says
    which check failed and nothing is written. Models over 2 GB (ONNX external data) are not
    supported. Returns :class:`OnnxExport`.
    """
    import torch

    import bnstats.torch as bt

    check_tolerances(rtol, factor)
    options = _checked_options(export_kwargs)
    target = Path(path)
    if not target.parent.is_dir():
        raise FileNotFoundError(f"cannot write {target}: directory {target.parent} does not exist")
    args = positional(example_inputs)
    require("onnxruntime")
    onnx = require("onnx")
    with quiet_exporter() as caught:
        with in_eval_mode(model):  # fold copies the model in eval mode
            reference = reference_outputs(model, args)
            folded = bt.fold(model, args)
        data = _exported_bytes(torch, folded, args, options, len(reference.outputs))
        nodes = check_batchnorm_nodes(onnx.load_from_string(data), folded)
        if not nodes.ok:
            raise OnnxExportError("the exported graph's BN nodes:\n" + "\n".join(nodes.problems()))
        agreement = reference.agreement(run_onnxruntime(data, args), rtol, factor)
    if not agreement.ok:
        raise OnnxExportError(
            f"the graph does not compute the model's eval output, nothing was written: {agreement}"
        )
    written = atomic_write_bytes(target, data)
    return OnnxExport(written, folded.fold_report, nodes, agreement, _messages(caught))


def _checked_options(export_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The options for torch.onnx.export; a ValueError naming those it does not take."""
    dynamo = export_kwargs.get("dynamo", True)
    if not isinstance(dynamo, bool):
        raise ValueError(f"dynamo must be True or False, got {dynamo!r}")
    taken = _BOTH + (_DYNAMO_ONLY if dynamo else _TORCHSCRIPT_ONLY)
    refused = sorted(set(export_kwargs) - set(taken))
    if refused:
        exporter = "default (dynamo=True)" if dynamo else "TorchScript (dynamo=False)"
        raise ValueError(
            f"export_folded does not pass {', '.join(refused)} to the {exporter} exporter; "
            f"it passes {', '.join(taken)} (the file, its data and the eval mode are its own)"
        )
    if not dynamo and export_kwargs.get("dynamic_axes") and not export_kwargs.get("input_names"):
        raise ValueError(
            "dynamic_axes with dynamo=False needs input_names: the names its keys refer to"
        )
    return dict(export_kwargs)


@contextmanager
def quiet_exporter() -> Iterator[list[warnings.WarningMessage]]:
    """Keep the exporter's warnings (returned) and its log lines (dropped) off the console."""
    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.CRITICAL)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _messages(caught: list[warnings.WarningMessage]) -> list[str]:
    """Each distinct warning once: ``Category: first line``."""
    lines = [f"{w.category.__name__}: {str(w.message).splitlines()[0]}" for w in caught]
    return list(dict.fromkeys(lines))


def _exported_bytes(torch: Any, model: Any, args: tuple, options: dict, outputs: int) -> bytes:
    """The serialized graph, in memory: the file is written only once it has been checked."""
    try:
        with torch.no_grad():
            if options.get("dynamo", True) is False:  # the TorchScript exporter
                if options.get("dynamic_axes") and not options.get("output_names"):
                    names = ["output"] + [f"output_{i}" for i in range(1, outputs)]
                    options = {**options, "output_names": names}
                buffer = io.BytesIO()
                torch.onnx.export(model, args, buffer, **options)
                return buffer.getvalue()
            defaults: dict[str, Any] = {"verbose": False}  # no progress lines on stdout
            if "dynamic_shapes" not in options and "dynamic_axes" not in options:
                defaults["dynamic_shapes"] = tuple(_batch_axis(arg) for arg in args)
            program = torch.onnx.export(model, args, **{**defaults, **options})
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise OnnxExportError(
            f"torch.onnx.export failed ({type(error).__name__}: {first}); nothing was written"
        ) from error
    return program.model_proto.SerializeToString()


def _batch_axis(arg: Any) -> dict[int, str] | None:
    """Dimension 0 of a tensor input is the batch, of any size in the exported graph."""
    return {0: "batch"} if getattr(arg, "dim", lambda: 0)() > 0 else None


__all__ = ["OnnxExport", "export_folded", "quiet_exporter"]
