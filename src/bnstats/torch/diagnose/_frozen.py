"""Frozen BN layers (``FrozenBatchNorm2d``) against the data, for :func:`diagnose`.

bnstats' passes never recalibrate layers with fixed statistics. To tell whether their
statistics matter, diagnose measures each frozen layer's input over ``batches`` in one
eval-mode pass (every frozen layer with its fixed statistics in place, so a chain of frozen
layers is measured as it runs today), per channel, with ``count`` values per channel::

    mean = mean(z),   var = m2 / (count - 1)     (merged in a bnstats.Population)

writes them into the frozen layers for one evaluation, and puts the fixed values back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from bnstats.stats import Population
from bnstats.torch._batches import iterate_batches, move_to_device
from bnstats.torch._layers import cast_buffer, model_device
from bnstats.torch._ranks import run_and_exchange
from bnstats.torch.diagnose._evaluate import Evaluator, Setting


def frozen_setting(
    model: nn.Module,
    fixed: Mapping[str, nn.Module],
    batches: Any,
    evaluator: Evaluator,
    options: Mapping[str, Any],
) -> tuple[list[str], Setting]:
    """The frozen layers some forward reached, and the model evaluated with them holding
    the population statistics of their inputs over ``batches``."""
    populations = _populations(model, fixed, batches, evaluator, options["max_samples"])
    saved = {name: (m.running_mean.clone(), m.running_var.clone()) for name, m in fixed.items()}
    try:
        with torch.no_grad():
            for name, population in populations.items():
                layer = fixed[name]
                layer.running_mean.copy_(cast_buffer(name, "running_mean", population.mean, layer))
                layer.running_var.copy_(cast_buffer(name, "running_var", population.var, layer))
        return list(populations), evaluator.run("frozen layers recalibrated")
    finally:
        with torch.no_grad():
            for name, (mean, var) in saved.items():
                fixed[name].running_mean.copy_(mean)
                fixed[name].running_var.copy_(var)


def _populations(
    model: nn.Module,
    fixed: Mapping[str, nn.Module],
    batches: Any,
    evaluator: Evaluator,
    max_samples: int | None,
) -> dict[str, Population]:
    """Each reached frozen layer's Population; in a group, over every rank's batches (the
    ranks exchange them, in rank order, with their outcomes: a rank failing fails all)."""

    def local() -> tuple[dict[str, Population], dict[str, list[float]]]:
        found = _local_populations(model, fixed, batches, evaluator, max_samples)
        flats = {
            name: population.to_flat(fixed[name].running_mean.numel()).tolist()
            for name, population in found.items()
        }
        return found, flats

    if evaluator.group is None:
        return local()[0]
    call = {"tool": "diagnose", "evaluation": "frozen layers"}
    _, summaries = run_and_exchange(evaluator.group, local, call)
    device = model_device(model)
    merged: dict[str, Population] = {}
    for flats in summaries:
        for name, flat in flats.items():
            part = Population.from_flat(torch.tensor(flat, dtype=torch.float64, device=device))
            merged[name] = part if name not in merged else merged[name].merge(part)
    return {name: merged[name] for name in fixed if name in merged}


def _local_populations(
    model: nn.Module,
    fixed: Mapping[str, nn.Module],
    batches: Any,
    evaluator: Evaluator,
    max_samples: int | None,
) -> dict[str, Population]:
    gathered: dict[str, list[tuple[int, torch.Tensor]]] = {name: [] for name in fixed}

    def hook_for(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            dims = [d for d in range(x.dim()) if d != 1]
            var, mean = torch.var_mean(x.double(), dim=dims, correction=0)
            count = x.numel() // x.shape[1]
            gathered[name].append((count, torch.stack((mean, var * count))))

        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in fixed.items()]
    device = model_device(model)
    try:
        model.eval()
        with torch.no_grad():
            for batch, _ in iterate_batches(batches, max_samples):
                evaluator.forward(model, move_to_device(batch, device))
    finally:
        for handle in handles:
            handle.remove()
    populations = {}
    for name, parts in gathered.items():
        if parts:
            stacked = torch.stack([part for _, part in parts])
            population = Population()
            population.update_batches([count for count, _ in parts], stacked[:, 0], stacked[:, 1])
            populations[name] = population
    return populations
