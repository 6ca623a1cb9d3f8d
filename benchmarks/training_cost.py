"""c) Training cost: bnstats.torch.BatchNorm2d (EMA, debiased EMA) vs torch's nn.BatchNorm2d.

The same ResNet-18-shaped model three times over, identical weights: with torch's
``nn.BatchNorm2d``, and converted by ``bt.convert`` to bnstats' ``BatchNorm2d`` with
``EMA(0.1)`` (torch's update) and with ``EMA(0.1, debias=True)``. One training step is
forward, cross-entropy, backward and ``torch.optim.SGD(lr=1e-3, momentum=0.9)``'s step,
on a fixed batch (32 images; 64 of 224x224 in the full GPU run); each contender trains its
own copy all along. On a GPU the step is also timed under ``torch.autocast`` to bfloat16
(forward and loss autocast, backward and step outside, as torch's AMP recipe), each
precision with its own alternating rounds and ratios.

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
from benchmarks.device import autocast_to, precision_label
from benchmarks.models import ResNet18Shaped, randomize_batchnorm
from benchmarks.report import Goal, Result, Table
from benchmarks.timing import Contender, alternate, calls_for, synchronizer, time_block

REFERENCE = "nn.BatchNorm2d"
NARROW_STEP = (
    "a narrower model than the full run's: the module's fixed cost per layer is a larger "
    "share of a smaller step"
)
"""Why a run on narrower models misses the step goals set for ResNet-18's widths."""


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


def _steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, precision: str) -> Any:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    device = str(x.device)

    def run(_state: object) -> None:
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            with autocast_to(device, precision):
                loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()

    return run


def goal_rows(config: Config) -> tuple[tuple[str, ...], float]:
    """The rows with a goal and its limit: on the CPU the plain and debiased EMA within 1.10x;
    on a GPU every protected row within 1.03x (issue 12's goal, fp32 and autocast)."""
    if config.on_gpu:
        return ("bt EMA(0.1)", "bt EMA(0.1, debias)", "bt EMA(0.1, skip)"), 1.03
    return ("bt EMA(0.1)", "bt EMA(0.1, debias)"), 1.10


def time_precision(
    models: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor, precision: str, config: Config
) -> tuple[dict[str, dict[str, Any]], int]:
    """Every model's step at ``precision``, alternating; per-step medians and ratios."""
    sync = synchronizer(config.device)
    pilot_model = copy.deepcopy(models[REFERENCE])
    pilot = time_block(Contender("pilot", _steps(pilot_model, x, y, 1, precision)), 1, sync)
    steps = calls_for(pilot, 2.0 * config.budget, at_least=1)
    contenders = [Contender(name, _steps(m, x, y, steps, precision)) for name, m in models.items()]
    timings = alternate(contenders, repeats=config.repeats, warmup=1, basis=config.basis, sync=sync)
    summary = timings.summary(REFERENCE)
    other = timings.other_basis()
    for numbers in summary.values():
        numbers["median_s"] /= steps
        numbers[f"{other}_median_s"] /= steps
    return summary, steps


def run(config: Config) -> Result:
    models = {name: m.to(config.device) for name, m in build(config).items()}
    gen = torch.Generator().manual_seed(4)
    size, batch = config.image_size, config.train_batch
    x = torch.randn(batch, 3, size, size, generator=gen).to(config.device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(config.device)
    other = "cpu" if config.basis == "wall" else "wall"
    table = Table(
        "Training step (forward + backward + SGD step), median per step",
        ["step", "BN layers", "median ms", f"x {REFERENCE}", "ratio range", f"({other})"],
    )
    data: dict[str, Any] = {}
    goals = []
    rows, limit = goal_rows(config)
    steps_per_block = {}
    for precision in config.train_precisions:
        summary, steps_per_block[precision] = time_precision(models, x, y, precision, config)
        key = "timings" if precision == "float32" else f"timings_{precision}_autocast"
        data[key] = summary
        label = precision_label(precision)
        for name, numbers in summary.items():
            table.add(
                label,
                name,
                1e3 * numbers["median_s"],
                numbers["ratio"],
                f"{numbers['ratio_min']:.3f}-{numbers['ratio_max']:.3f}",
                numbers[f"{other}_ratio"],
            )
        prefix = "" if precision == "float32" else f"{label}: "
        goals += [
            Goal(
                f"{prefix}{name} step / {REFERENCE} step",
                summary[name]["ratio"],
                limit,
                full_size_only=NARROW_STEP if config.narrower_models else "",
            )
            for name in rows
        ]
    return Result(
        key="c",
        title="Training cost: bnstats BatchNorm2d vs nn.BatchNorm2d",
        settings={
            "model": f"ResNet18Shaped{tuple(config.resnet_widths)}",
            "batch": f"{batch} x 3x{size}x{size}",
            "device": config.device,
            "steps_per_block": steps_per_block,
            "times": f"{config.basis}, {config.threads} thread(s)",
            "repeats": config.repeats,
        },
        data=data,
        tables=[table],
        goals=goals,
        notes=[
            "every bnstats row protects its statistics from NaN/Inf on the device; no step "
            "reads a device value on the host",
        ],
    )
