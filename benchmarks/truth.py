"""Exact population statistics of every BN layer's input, computed the plain way.

Independent of bnstats: forward hooks capture each BN layer's input, widened to float64,
and the statistics are taken in two passes over the data (first the mean, then the sum of
squared deviations from it), so no update formula is involved::

    mean = sum(z) / count
    var  = sum((z - mean)**2) / (count - 1)        (unbiased, as torch stores it)

During both passes the BN layers are in training mode (they normalize with each batch's
own statistics, as recalibrate, update_bn and fvcore's precise BN do) and every other
module is in eval mode; autograd is off. Training-mode BN ignores the running buffers, so
the two passes see the same activations.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn

_BatchNorm = nn.modules.batchnorm._BatchNorm
Stats = dict[str, tuple[torch.Tensor, torch.Tensor]]


def _channel_view(t: torch.Tensor, dim: int) -> torch.Tensor:
    return t.view(1, -1, *([1] * (dim - 2)))


def _pass(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    on_input: Callable[[str, torch.Tensor], None],
) -> None:
    layers = {n: m for n, m in model.named_modules() if isinstance(m, _BatchNorm)}
    handles = [
        layer.register_forward_pre_hook(
            lambda _m, args, name=name: on_input(name, args[0].detach().double())
        )
        for name, layer in layers.items()
    ]
    model.eval()
    for layer in layers.values():
        layer.train()
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch)
    finally:
        for handle in handles:
            handle.remove()


def population_statistics(model: nn.Module, batches: Sequence[torch.Tensor]) -> Stats:
    """Per BN layer (by qualified name): float64 ``(mean, unbiased var)`` of its input over
    ``batches``, for ``model`` as it is (its own dtype). ``model`` is run on a deep copy."""
    work = copy.deepcopy(model)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def first(name: str, x: torch.Tensor) -> None:
        axes = (0, *range(2, x.dim()))
        sums[name] = sums.get(name, 0) + x.sum(dim=axes)
        counts[name] = counts.get(name, 0) + x.numel() // x.shape[1]

    _pass(work, batches, first)
    means = {name: total / counts[name] for name, total in sums.items()}
    squares: dict[str, torch.Tensor] = {}

    def second(name: str, x: torch.Tensor) -> None:
        axes = (0, *range(2, x.dim()))
        deviation = x - _channel_view(means[name], x.dim())
        squares[name] = squares.get(name, 0) + (deviation * deviation).sum(dim=axes)

    _pass(work, batches, second)
    return {name: (means[name], squares[name] / (counts[name] - 1)) for name in means}


def float64_model_statistics(model: nn.Module, batches: Sequence[torch.Tensor]) -> Stats:
    """:func:`population_statistics` of a float64 copy of ``model`` on float64 batches."""
    return population_statistics(copy.deepcopy(model).double(), [b.double() for b in batches])


def errors(model: nn.Module, truth: Stats) -> dict[str, float]:
    """How far ``model``'s running statistics are from ``truth``, worst over layers/channels:

    ``var_rel = max |running_var - var| / var`` and
    ``mean_std = max |running_mean - mean| / sqrt(var)`` (the mean's error in standard
    deviations)."""
    layers = dict(model.named_modules())
    var_rel, mean_std = 0.0, 0.0
    for name, (mean, var) in truth.items():
        layer = layers[name]
        running_mean = layer.running_mean.detach().double()
        running_var = layer.running_var.detach().double()
        var_rel = max(var_rel, float(((running_var - var).abs() / var).max()))
        mean_std = max(mean_std, float(((running_mean - mean).abs() / var.sqrt()).max()))
    return {"var_rel": var_rel, "mean_std": mean_std}
