"""recalibrate on real timm and torchvision models, against a float64 reference written here
(no bnstats code): run where both import, skipped otherwise (CI has neither).

The reference runs a copy of the model with every BN layer's own training flag on and every
other module in eval mode (children of BN layers included), records each BN layer's input
with plain forward pre-hooks, and takes the mean and unbiased variance of all of it in
float64. Errors are relative to what the layer divides by: ``|mean error| / sqrt(var +
eps)`` and ``|var error| / (var + eps)`` (dead ReLU channels have ``var = 0``).
``python -m tests.torch.test_zoo_recalibrate`` prints a table: per model, the worst error of
recalibrate and of update_bn against the reference, and recalibrate's time over update_bn's.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.swa_utils import update_bn

import bnstats.torch as bt

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "efficientnet_b0 (convert_sync_batchnorm)": lambda: timm.layers.convert_sync_batchnorm(
        timm.create_model("efficientnet_b0")
    ),
    "repvgg_a0 (drop_block_rate 0.2)": lambda: timm.create_model("repvgg_a0", drop_block_rate=0.2),
    "mobilenetv3_large_100": lambda: timm.create_model("mobilenetv3_large_100"),
    "resnet18 (torchvision)": lambda: torchvision.models.resnet18(),
}
TOLERANCE = 1e-5


def _batches(n: int = 6, size: int = 8, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, 64, 64, generator=gen) * 1.5 + 0.3 for _ in range(n)]


def prepared(name: str) -> nn.Module:
    """Random weights; stale statistics from a few training forwards on other data."""
    torch.manual_seed(0)
    model = BUILDERS[name]()
    model.train()
    with torch.no_grad():
        for x in _batches(3, 4, seed=9):
            model(x * 3 - 1)
    return model.eval()


def float64_reference(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, tuple]:
    """Per BN layer, the mean and unbiased variance (float64) of everything it received."""
    twin = copy.deepcopy(model).eval()
    layers = {
        name: m
        for name, m in twin.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    }
    seen: dict[str, list[np.ndarray]] = {name: [] for name in layers}
    for name, layer in layers.items():
        layer.training = True  # the flag alone: a drop layer inside stays in eval

        def hook(module, args, name=name):
            x = args[0].detach().double()
            seen[name].append(x.transpose(0, 1).reshape(x.shape[1], -1).numpy().T)

        layer.register_forward_pre_hook(hook)
    with torch.no_grad():
        for x in batches:
            twin(x)
    out = {}
    for name, parts in seen.items():
        values = np.concatenate(parts)
        out[name] = (values.mean(axis=0), values.var(axis=0, ddof=1))
    return out


def worst_error(model: nn.Module, reference: dict[str, tuple]) -> float:
    """The largest |mean error| / sqrt(var + eps) and |var error| / (var + eps) over every
    layer and channel."""
    modules = dict(model.named_modules())
    worst = 0.0
    for name, (mean, var) in reference.items():
        layer = modules[name]
        scale = var + layer.eps
        got_mean = layer.running_mean.double().numpy()
        got_var = layer.running_var.double().numpy()
        worst = max(worst, float(np.max(np.abs(got_mean - mean) / np.sqrt(scale))))
        worst = max(worst, float(np.max(np.abs(got_var - var) / scale)))
    return worst


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_recalibrate_is_exact_and_deterministic(name):
    model, batches = prepared(name), _batches()
    reference = float64_reference(model, batches)
    first, second = copy.deepcopy(model), copy.deepcopy(model)
    bt.recalibrate(first, batches)
    bt.recalibrate(second, batches)
    assert worst_error(first, reference) < TOLERANCE
    for (key, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), key


def _seconds(call: Callable[[], object], repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        call()
        best = min(best, time.process_time() - start)
    return best


def table() -> list[tuple[str, int, float, float, float]]:
    """Per model: BN layers, recalibrate's and update_bn's worst error, time ratio."""
    torch.set_num_threads(1)
    rows = []
    batches = _batches()
    for name in BUILDERS:
        model = prepared(name)
        reference = float64_reference(model, batches)
        ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
        bt.recalibrate(ours, batches)
        update_bn(batches, theirs)
        ratio = _seconds(lambda m=ours: bt.recalibrate(m, batches)) / _seconds(
            lambda m=theirs: update_bn(batches, m)
        )
        layers = len(reference)
        rows.append(
            (name, layers, worst_error(ours, reference), worst_error(theirs, reference), ratio)
        )
    return rows


if __name__ == "__main__":
    print("| model | BN layers | recalibrate error | update_bn error | time / update_bn |")
    print("|---|---|---|---|---|")
    for name, layers, ours, theirs, ratio in table():
        print(f"| {name} | {layers} | {ours:.1e} | {theirs:.1e} | {ratio:.2f} |")
