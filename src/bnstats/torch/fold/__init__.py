"""Fold BatchNorm layers into neighbouring convolution and linear layers, for inference.

In eval mode a BN layer is a per-channel affine map, which a neighbouring layer can absorb:
:func:`fold_weights` computes the merged weights (its docstring holds the formulas), as
torch's ``fuse_conv_bn_weights`` does. :func:`fold` finds every BN next to a Conv1d/2d/3d,
ConvTranspose1d/2d/3d or Linear with nothing in between and merges the two with
:func:`fold_weights`:

- ``layer -> BN``: the layer's output channels are scaled (always exact);
- ``BN -> layer``: its input channels are scaled and the shift moves into the bias. Exact only
  if every output sums the same, real inputs: never for a transposed conv, and for a conv only
  if it adds no zero padding (zero padding happens AFTER the BN, and BN(0) = shift != 0);
  ``padding_mode`` reflect/replicate/circular pads with copies of BN's output, which commutes;
- ``layer(x) + BN(x)`` (RepVGG's identity branch): the BN joins the kernel's centre tap, for a
  layer with as many input as output channels, stride 1 and centred padding.

The BN layers: torch's, bnstats' own, timm's ``BatchNormAct2d``/``SyncBatchNormAct`` (their
drop and activation stay, as a module in the BN's place) and frozen BNs (torchvision, timm);
see :mod:`bnstats.torch.fold._kinds`. A pair folds only if the tensor between them goes
nowhere else, both modules are called once, have no hooks (forward or backward) or
parametrizations, the layer computes as torch's own (neither ``forward`` nor
``_conv_forward`` overridden), and the BN is in eval mode with running statistics. Hooks
fold's module would not run (on the model, a wrapper, or a submodule traced through) are
refused with :class:`FoldTraceError`. BN's dim 1 must be the layer's channel axis:
BatchNorm2d/3d force 4-D/5-D input, which proves it next to Conv2d/3d; BatchNorm1d accepts
(N, C) and (N, C, L), so next to a Linear (which acts on the LAST dim) or a Conv1d (which also
takes unbatched (C, L)) it folds only when ``example_inputs`` show the tensor between them to
be (N, F) resp. (N, C, L).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence

import torch
from torch import fx, nn

from bnstats.torch.fold._folder import GraphFolder
from bnstats.torch.fold._kinds import is_leaf, is_norm
from bnstats.torch.fold._report import FoldEntry, FoldReport
from bnstats.torch.fold._trace import FoldTraceError, record_shapes, refuse_outer_hooks, trace
from bnstats.torch.fold._weights import FoldOverflowError, fold_weights
from bnstats.torch.kinds import wrapper_chain

Tensor = torch.Tensor


def fold(
    model: nn.Module, example_inputs: Tensor | Sequence[object] | None = None
) -> fx.GraphModule:
    """A new module computing ``model``'s eval-mode output with its BN layers folded away.

    ``model`` may be wrapped (``DataParallel``, ``DistributedDataParallel``, ``torch.compile``,
    ``AveragedModel``, timm's ``ModelEma*``): the model inside is folded, and names are those
    of that inner model. It is deep-copied and left untouched (parameters, buffers, modes).
    The copy is traced with ``torch.fx.symbolic_trace`` semantics; every BN that can be folded
    exactly is merged into its neighbouring layer by :func:`fold_weights` in float64 and
    removed, and the layer's weights are cast back to their dtype once (after all the BNs it
    absorbs). A BN stays when its output depends on the batch (training mode,
    ``track_running_stats=False``), when the merge would be inexact or unprovable, or when the
    folded weights would overflow the layer's dtype (float16: above 65504).

    ``example_inputs`` (a tensor or a tuple of positional arguments) are run once through the
    copy in eval mode to record shapes; they are needed to fold BatchNorm1d, whose channel axis
    depends on the input's rank. Pass inputs of the rank the model will see.

    Returns an ``fx.GraphModule`` with the original's qualified names and training flags and
    the attribute ``fold_report`` (:class:`FoldReport`: per BN, where it went or why it stayed;
    also in ``meta["fold_report"]``, which survives ``copy.deepcopy``).
    Warns when BN layers stayed only because they were in training mode or because
    ``example_inputs`` were missing. Raises :class:`FoldTraceError` if the model cannot be
    traced, if the model, a wrapper or a submodule that tracing goes through (not kept as one
    call) has hooks the folded module would not run, or if the model is itself a BN layer;
    ``RuntimeError`` naming the tensor if the model cannot be deep-copied (the old
    ``weight_norm`` after a forward with gradients); ``TypeError``/``ValueError`` for a
    non-module or failing ``example_inputs``. The model is left as it was found.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold expects a torch.nn.Module, got {type(model).__name__}")
    chain = wrapper_chain(model)
    model = chain[-1]
    name = type(model).__name__
    if is_norm(model):
        raise FoldTraceError(
            f"fold: the model is itself one BatchNorm layer ({name}): there is no "
            "neighbouring conv/linear layer to fold it into. Fold the model that contains it."
        )
    refuse_outer_hooks(chain)
    work = _copy(model, name)
    gm = trace(work, name, is_leaf)
    if example_inputs is not None:
        record_shapes(gm, example_inputs, name)
    entries = GraphFolder(gm, has_shapes=example_inputs is not None).run(work)
    report = FoldReport(name, entries)
    gm.fold_report = report
    gm.meta["fold_report"] = report  # GraphModule.meta survives copy.deepcopy
    _warn_if_avoidable(report)
    return gm


def _copy(model: nn.Module, name: str) -> nn.Module:
    """``copy.deepcopy(model)``; a clear ``RuntimeError`` for the known cause of its failing:
    a tensor attribute computed with autograd, as the old ``torch.nn.utils.weight_norm``
    leaves ``weight``."""
    try:
        return copy.deepcopy(model)
    except RuntimeError as exc:
        computed = [
            f"{module_name}.{key}" if module_name else key
            for module_name, module in model.named_modules()
            for key, value in vars(module).items()
            if isinstance(value, Tensor) and value.grad_fn is not None
        ]
        if not computed:
            raise
        raise RuntimeError(
            f"fold: cannot copy {name}: {', '.join(computed)} is a tensor computed with "
            "autograd, which torch cannot deep-copy (torch.nn.utils.weight_norm leaves "
            "`weight` so after a forward pass with gradients). Run one forward pass under "
            "torch.no_grad() before fold, or use torch.nn.utils.parametrizations.weight_norm."
        ) from exc


def _warn_if_avoidable(report: FoldReport) -> None:
    """Warn when the caller could have folded more: eval mode, example_inputs."""
    hints = {
        "training": "are in training mode; call model.eval() before fold",
        "needs_example_inputs": "need example_inputs to check their channel axis",
    }
    for code, hint in hints.items():
        names = [e.name for e in report.kept if e.code == code]
        if names:
            warnings.warn(
                f"fold({report.model}): {len(names)} BatchNorm layer(s) kept because they "
                f"{hint}: {', '.join(names)}",
                UserWarning,
                stacklevel=3,
            )


__all__ = [
    "FoldEntry",
    "FoldOverflowError",
    "FoldReport",
    "FoldTraceError",
    "fold",
    "fold_weights",
]
