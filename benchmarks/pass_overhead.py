"""The per-layer cost of a train-mode pass: bt.recalibrate against update_bn, layer by layer.

Two models, one torch thread, CPU time (``time.process_time``) per call, contenders
alternating over the repeats (:func:`benchmarks.timing.alternate`), ratios the medians of
the ratios paired within a repeat:

- ``chain``: 50 blocks of Conv2d(8, 8, 1) + BatchNorm2d(8), batches of 4x8x8x8 (16 of
  them): almost nothing but per-layer overhead; goal at most 1.10x ``update_bn``;
- ``resnet18``: the ResNet-18-shaped model of the recalibration benchmark (full widths), 8
  batches of 8x3x64x64; goal at most 1.03x ``update_bn``.

A third contender, ``forward passes alone`` (BN layers in training mode, autograd off,
nothing else), is the least a pass can cost. Printed per BN layer and call: what the pass
costs over ``update_bn`` (``extra_us_per_layer``; goal under 100 microseconds) and over the
forward passes alone. The aten operations per BN layer and batch are counted in
``tests/torch/test_pass_cost.py`` (not timed).

Run: ``PYTHONPATH=src python -m benchmarks.pass_overhead [--repeats 9]``.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
from torch import nn

from benchmarks.models import ResNet18Shaped, image_batches, randomize_batchnorm
from benchmarks.recalibration import forward_passes
from benchmarks.timing import Contender, alternate

OURS, REFERENCE, FORWARD = "bt.recalibrate", "update_bn", "forward passes alone"
GOALS = {"chain": 1.10, "resnet18": 1.03}


def conv_bn_chain(depth: int = 50, channels: int = 8) -> nn.Sequential:
    """``depth`` blocks of a 1x1 convolution and a BatchNorm2d."""
    blocks: list[nn.Module] = []
    for _ in range(depth):
        blocks += [nn.Conv2d(channels, channels, 1), nn.BatchNorm2d(channels)]
    return randomize_batchnorm(nn.Sequential(*blocks), seed=1)


def setups() -> dict[str, tuple[nn.Module, list[torch.Tensor]]]:
    gen = torch.Generator().manual_seed(0)
    chain_batches = [torch.randn(4, 8, 8, 8, generator=gen) for _ in range(16)]
    resnet = randomize_batchnorm(ResNet18Shaped(), seed=1)
    return {
        "chain": (conv_bn_chain(), chain_batches),
        "resnet18": (resnet, image_batches(8, 8, 64)),
    }


def measure(model: nn.Module, batches: list[torch.Tensor], repeats: int) -> dict[str, float]:
    import torch.optim.swa_utils as swa_utils

    import bnstats.torch as bt

    def fresh() -> nn.Module:
        return copy.deepcopy(model)

    runs = {
        OURS: lambda m: bt.recalibrate(m, batches),
        REFERENCE: lambda m: swa_utils.update_bn(batches, m),
        FORWARD: lambda m: forward_passes(m, batches),
    }
    contenders = [Contender(name, run, fresh) for name, run in runs.items()]
    timings = alternate(contenders, repeats=repeats, warmup=1, basis="cpu")
    layers = len(bt.find_batchnorm_layers(model))
    return {
        "ratio": timings.ratio(OURS, REFERENCE),
        "ratio_min": timings.ratio_range(OURS, REFERENCE)[0],
        "ratio_max": timings.ratio_range(OURS, REFERENCE)[1],
        "update_bn_vs_forward": timings.ratio(REFERENCE, FORWARD),
        "median_s": timings.median(OURS),
        "extra_us_per_layer": 1e6 * (timings.median(OURS) - timings.median(REFERENCE)) / layers,
        "over_forward_us_per_layer": 1e6
        * (timings.median(OURS) - timings.median(FORWARD))
        / layers,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--only", default="chain,resnet18")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for name, (model, batches) in setups().items():
        if name not in args.only.split(","):
            continue
        result = measure(model, batches, args.repeats)
        result["goal"] = GOALS[name]
        print(json.dumps({"model": name, **{k: round(v, 4) for k, v in result.items()}}))
        print(
            f"{name}: bt.recalibrate / update_bn = {result['ratio']:.3f} "
            f"(range {result['ratio_min']:.3f}-{result['ratio_max']:.3f}, goal <= {GOALS[name]}); "
            f"{result['extra_us_per_layer']:.0f} us per BN layer and call over update_bn, "
            f"{result['over_forward_us_per_layer']:.0f} over the forward passes alone"
        )


if __name__ == "__main__":
    main()
