"""Independent float64 references for the torch tests (no bnstats code involved).

``bn_inputs`` runs a copy of the model in the mode recalibration uses (BN layers in
training mode, every other module in eval mode) and records, with plain forward pre-hooks,
each BN layer's input for every batch, in float64 NumPy.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn


def bn_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    }


def to_channels_last_2d(x: np.ndarray) -> np.ndarray:
    """(N, C, ...) -> (N * ..., C): every value of a channel in one column."""
    return np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])


def bn_inputs(model: nn.Module, batches, call=None) -> dict[str, list[np.ndarray]]:
    """Per BN layer, per batch, the (values, C) array of its input in float64."""
    model = copy.deepcopy(model)
    model.eval()
    layers = bn_layers(model)
    for layer in layers.values():
        layer.train()
    seen: dict[str, list[np.ndarray]] = {name: [] for name in layers}

    def recorder(name):
        def hook(module, args):
            seen[name].append(to_channels_last_2d(args[0].detach().double().numpy()))

        return hook

    for name, layer in layers.items():
        layer.register_forward_pre_hook(recorder(name))
    with torch.no_grad():
        for batch in batches:
            if call is None:
                model(batch[0] if isinstance(batch, (tuple, list)) else batch)
            else:
                call(model, batch)
    return seen


def population(per_batch: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased variance over every value of every batch."""
    z = np.concatenate(per_batch)
    return z.mean(axis=0), z.var(axis=0, ddof=1)


def buffers(model: nn.Module) -> dict[str, dict[str, np.ndarray]]:
    """Each BN layer's running_mean, running_var (float64) and num_batches_tracked."""
    return {
        name: {
            "mean": m.running_mean.detach().double().numpy().copy(),
            "var": m.running_var.detach().double().numpy().copy(),
            "tracked": int(m.num_batches_tracked),
        }
        for name, m in bn_layers(model).items()
    }


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A deep copy of the state dict, to compare bit for bit."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def bits(x: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor (NaN equals NaN, -0.0 differs from 0.0)."""
    return x.detach().contiguous().reshape(-1).view(torch.uint8)


def same_state(model: nn.Module, saved: dict[str, torch.Tensor]) -> bool:
    """True when the model's state dict is bit-identical to ``saved``."""
    state = model.state_dict()
    return state.keys() == saved.keys() and all(
        state[k].dtype == saved[k].dtype
        and state[k].shape == saved[k].shape
        and torch.equal(bits(state[k]), bits(saved[k]))
        for k in saved
    )


def modes(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}
