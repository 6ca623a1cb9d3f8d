"""c) Training cost: bnstats.torch.BatchNorm2d (EMA, debiased EMA) vs torch's nn.BatchNorm2d.

The same ResNet-18-shaped model three times over, identical weights: with torch's
``nn.BatchNorm2d``, and converted by ``bt.convert`` to bnstats' ``BatchNorm2d`` with
``EMA(0.1)`` (torch's update) and with ``EMA(0.1, debias=True)``. One training step is
forward, cross-entropy, backward and ``torch.optim.SGD(lr=1e-3, momentum=0.9)``'s step,
on a fixed batch of 32 images; each contender trains its own copy all along.

A fourth row, ``EMA(0.1, skip)``, uses ``nonfinite="skip"``. Every bnstats row keeps its
statistics from NaN and Inf on the device (``torch.where`` on a copy the kernel updates),
with no host read: on a GPU nothing in the step waits for the device. The protection's own
cost is a few element-wise kernels on 2 x C values per layer.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from benchmarks.config import Config
from benchmarks.models import ResNet18Shaped, randomize_batchnorm
from benchmarks.report import Goal, Result, Table
from benchmarks.timing import Contender, alternate, calls_for, time_block

REFERENCE = "nn.BatchNorm2d"


def build(config: Config) -> dict[str, nn.Module]:
    """The four models, same weights, in training mode."""
    import bnstats
    import bnstats.torch as bt

    torch.manual_seed(0)
    base = randomize_batchnorm(ResNet18Shaped(config.resnet_widths), seed=3).train()
    return {
        REFERENCE: base,
        "bt EMA(0.1)": bt.convert(copy.deepcopy(base), bnstats.EMA(0.1)),
        "bt EMA(0.1, debias)": bt.convert(copy.deepcopy(base), bnstats.EMA(0.1, debias=True)),
        "bt EMA(0.1, skip)": bt.convert(copy.deepcopy(base), bnstats.EMA(0.1, nonfinite="skip")),
    }


def _steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> Any:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def run(_state: object) -> None:
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            optimizer.step()

    return run


def run(config: Config) -> Result:
    models = build(config)
    gen = torch.Generator().manual_seed(4)
    size = config.image_size
    x = torch.randn(32, 3, size, size, generator=gen)
    y = torch.randint(0, 10, (32,), generator=gen)
    pilot = time_block(Contender("pilot", _steps(copy.deepcopy(models[REFERENCE]), x, y, 1)), 1)
    steps = calls_for(pilot, 2.0 * config.budget, at_least=1)
    contenders = [Contender(name, _steps(m, x, y, steps)) for name, m in models.items()]
    timings = alternate(contenders, repeats=config.repeats, warmup=1, basis=config.basis)
    summary = timings.summary(REFERENCE)
    other = timings.other_basis()
    table = Table(
        "Training step (forward + backward + SGD step), median per step",
        ["BN layers", "median ms", f"x {REFERENCE}", "ratio range", f"({other})"],
    )
    for name, numbers in summary.items():
        numbers["median_s"] /= steps
        numbers[f"{other}_median_s"] /= steps
        table.add(
            name,
            1e3 * numbers["median_s"],
            numbers["ratio"],
            f"{numbers['ratio_min']:.3f}-{numbers['ratio_max']:.3f}",
            numbers[f"{other}_ratio"],
        )
    return Result(
        key="c",
        title="Training cost: bnstats BatchNorm2d vs nn.BatchNorm2d",
        settings={
            "model": f"ResNet18Shaped{tuple(config.resnet_widths)}",
            "batch": f"32 x 3x{size}x{size}",
            "steps_per_block": steps,
            "times": f"{config.basis}, {config.threads} thread(s)",
            "repeats": config.repeats,
        },
        data={"timings": summary},
        tables=[table],
        goals=[
            Goal(f"bt EMA(0.1) step / {REFERENCE} step", summary["bt EMA(0.1)"]["ratio"], 1.10),
            Goal(
                f"bt EMA(0.1, debias) step / {REFERENCE} step",
                summary["bt EMA(0.1, debias)"]["ratio"],
                1.10,
            ),
        ],
        notes=[
            "every bnstats row protects its statistics from NaN/Inf on the device; no step "
            "reads a device value on the host",
        ],
    )
