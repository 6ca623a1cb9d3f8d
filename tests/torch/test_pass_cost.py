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


def per_layer(run, model: nn.Module, depth: int) -> tuple[float, float]:
    """Per BN layer, the operations one more batch costs and those a call costs whatever the
    batches (the line through two calls, 8 and 40 batches)."""
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 8, 8, 8, generator=gen) for _ in range(40)]
    few, many = operations(run, model, batches[:8]), operations(run, model, batches)
    per_batch = (many - few) / (32 * depth)
    return per_batch, few / depth - 8 * per_batch


def per_layer_and_batch(run, model: nn.Module, depth: int) -> float:
    return per_layer(run, model, depth)[0]


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


def test_the_end_of_a_pass_costs_a_few_operations_per_layer_merged_for_all_at_once():
    """The merge, the precision and the new buffers run once for all layers side by side
    (bnstats/torch/_many_layers.py): what a call costs per layer beyond its batches is a
    few operations, fewer per layer the deeper the model (part of it is paid once per call;
    layer by layer it was about 40 per layer). update_bn's is 3 (one read of the buffers)."""
    fixed = {}
    for depth in (10, 40):
        model = conv_bn_chain(depth)
        fixed[depth] = per_layer(lambda m, b: bt.recalibrate(m, b), model, depth)[1]
    _, theirs = per_layer(lambda m, b: swa_utils.update_bn(b, m), conv_bn_chain(10), 10)
    assert fixed[40] < fixed[10], fixed
    assert fixed[40] <= 20, fixed
    assert theirs <= fixed[40], (fixed, theirs)  # the count does see the work


def test_an_eval_mode_pass_adds_a_few_operations_per_layer_and_batch_to_the_eval_forward():
    """The passes of mode="eval" (each BN layer normalizing with given statistics, its input
    measured by a pre-hook: torch.batch_norm_update_stats into the layer's block of rows)
    cost 4 aten operations per layer and batch beyond the eval forward's 3 (issue 22.8
    counted 68 in bnstats 0.2's eval-mode passes), and the end of the pass merges the layers
    side by side: under 30 operations per layer and call (gathered layer by layer: 55)."""
    from bnstats.torch._level import Level
    from bnstats.torch._pass import measure_pass
    from bnstats.torch.options import PassOptions

    depth = 10
    model = conv_bn_chain(depth)
    statistics = {
        name: (layer.running_mean.double(), layer.running_var.double())
        for name, layer in bt.find_batchnorm_layers(model).items()
    }
    level = Level(training=False, rule="fixed", statistics=statistics)

    def eval_pass(m: nn.Module, batches: list[torch.Tensor]) -> None:
        measure_pass(m, batches, PassOptions(), tool="eval", level=level, precise=False)

    def eval_forward(m: nn.Module, batches: list[torch.Tensor]) -> None:
        m.eval()
        with torch.no_grad():
            for x in batches:
                m(x)

    ours, fixed = per_layer(eval_pass, model, depth)
    alone = per_layer_and_batch(eval_forward, model, depth)
    assert alone == 3 and ours <= alone + 4, (ours, alone)
    assert fixed < 30, fixed
