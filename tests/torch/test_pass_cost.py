"""What a train-mode pass adds to each BN layer's call, counted in aten operations (not timed;
the times are in benchmarks/pass_overhead.py)."""

from __future__ import annotations

import copy

import torch
import torch.optim.swa_utils as swa_utils
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import bnstats.torch as bt


class CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def conv_bn_chain(depth: int = 10) -> nn.Sequential:
    blocks: list[nn.Module] = []
    for _ in range(depth):
        blocks += [nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)]
    return nn.Sequential(*blocks)


def operations(run, model: nn.Module, batches: list[torch.Tensor]) -> int:
    model = copy.deepcopy(model)
    with CountOps() as counter:
        run(model, batches)
    return counter.count


def per_layer_and_batch(run, model: nn.Module, depth: int) -> float:
    """The operations one more batch costs, per BN layer: the difference of two calls."""
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 8, 8, 8, generator=gen) for _ in range(40)]
    few, many = operations(run, model, batches[:8]), operations(run, model, batches)
    return (many - few) / (32 * depth)


def test_a_train_mode_pass_adds_no_operation_per_layer_and_batch_over_update_bn():
    depth = 10
    model = conv_bn_chain(depth)

    ours = per_layer_and_batch(lambda m, b: bt.recalibrate(m, b), model, depth)
    theirs = per_layer_and_batch(lambda m, b: swa_utils.update_bn(b, m), model, depth)
    alone = per_layer_and_batch(_forward_passes, model, depth)

    assert ours <= theirs, (ours, theirs)
    assert ours <= alone + 1, (ours, alone)  # two row views in place of num_batches_tracked += 1


def _forward_passes(model: nn.Module, batches: list[torch.Tensor]) -> None:
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
