"""b) Inference: bt.fold(model) vs model.eval() vs torch.fx fuse vs the same net without BN.

One ResNet-18-shaped model in eval mode (BN statistics randomized as after training):

- ``eval``: the model as it is, BN layers computing ``gamma * (z - mean) / sqrt(var + eps)
  + beta`` at every call;
- ``bt.fold``: ``bt.fold(model)``, an ``fx.GraphModule`` with BN folded into the convs;
- ``fx fuse``: ``torch.fx.experimental.optimization.fuse(model)``, torch's own folding;
- ``no BN``: the same architecture built without BN (convs with a bias), given the folded
  weights: the same function with no trace of BN, the limit.

Latency per call under ``torch.inference_mode()`` at batch 1 and 32, many calls per timed
block (about half a second), the four alternating over twice the configured repeats. The
folded models' and the no-BN model's outputs are checked against ``eval``'s.

With ``--device cuda`` the four run on the GPU at batch 1 and 64, in float32 and in float16
(each model folded in float32 first, then cast, as one deploys it).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from benchmarks.config import Config
from benchmarks.device import dtype_named
from benchmarks.models import ResNet18Shaped, count_batchnorm, randomize_batchnorm
from benchmarks.report import Goal, Result, Table
from benchmarks.timing import Contender, alternate, calls_for, synchronizer, time_block


def build(config: Config) -> dict[str, nn.Module]:
    """The four models, in eval mode, float32, on the CPU."""
    from torch.fx.experimental.optimization import fuse

    import bnstats.torch as bt

    torch.manual_seed(0)
    model = randomize_batchnorm(ResNet18Shaped(config.resnet_widths), seed=2).eval()
    folded = bt.fold(model).eval()
    no_bn = ResNet18Shaped(config.resnet_widths, batchnorm=False).eval()
    no_bn.load_state_dict(folded.state_dict())  # same names, BN gone: the same function
    return {"eval": model, "bt.fold": folded, "fx fuse": fuse(model).eval(), "no BN": no_bn}


def repeated_calls(
    model: Callable[[torch.Tensor], object],
    x: torch.Tensor,
    calls: int,
    grad_mode: Callable[[], AbstractContextManager] = torch.inference_mode,
) -> Callable[[object], None]:
    """A contender's ``run``: ``calls`` calls of ``model(x)`` under ``grad_mode()``."""

    def run(_state: object) -> None:
        with grad_mode():
            for _ in range(calls):
                model(x)

    return run


def placed(models: dict[str, nn.Module], device: str, dtype: str) -> dict[str, nn.Module]:
    """Copies of ``models`` on ``device`` in ``dtype``."""
    return {name: copy.deepcopy(m).to(device, dtype_named(dtype)) for name, m in models.items()}


def time_batch(models: dict[str, nn.Module], x: torch.Tensor, config: Config) -> dict[str, Any]:
    """Seconds per call of every model on ``x``, alternating; ratios to ``eval`` and ``no BN``."""
    sync = synchronizer(config.device)
    pilot = time_block(Contender("pilot", repeated_calls(models["eval"], x, 2)), 1, sync) / 2
    calls = calls_for(pilot, 0.5 * config.budget, at_least=2)
    contenders = [Contender(name, repeated_calls(m, x, calls)) for name, m in models.items()]
    repeats = 2 * config.repeats  # short blocks, many pairs: a burst of load hits few of them
    timings = alternate(contenders, repeats=repeats, warmup=1, basis=config.basis, sync=sync)
    other = timings.other_basis()
    out: dict[str, Any] = {"calls_per_block": calls, "basis": config.basis}
    for name in models:
        low, high = timings.ratio_range(name, "eval")
        out[name] = {
            "median_s": timings.median(name) / calls,
            "x_eval": timings.ratio(name, "eval"),
            "x_eval_range": [low, high],
            "x_no_bn": timings.ratio(name, "no BN"),
            f"x_eval_{other}": timings.ratio(name, "eval", other),
        }
    return out


def output_differences(models: dict[str, nn.Module], size: int) -> dict[str, float]:
    """Largest |output - eval's output| of each BN-derived model, relative to eval's scale."""
    device, dtype = (
        next(models["eval"].parameters()).device,
        next(models["eval"].parameters()).dtype,
    )
    x = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(3))
    x = x.to(device, dtype)
    with torch.inference_mode():
        reference = models["eval"](x)
        scale = float(reference.abs().max())
        return {
            name: float((models[name](x) - reference).abs().max()) / scale
            for name in ("bt.fold", "fx fuse", "no BN")
        }


def _key(batch: int, dtype: str) -> str:
    """Where ``data`` keeps a batch size's timings (float32 under the plain ``batch_N``)."""
    return f"batch_{batch}" if dtype == "float32" else f"batch_{batch}_{dtype}"


def _goals(data: dict[str, Any], config: Config) -> list[Goal]:
    goals = []
    for dtype in config.fold_dtypes:
        prefix = "" if dtype == "float32" else f"{dtype} "
        for batch in config.inference_batches:
            folded = data[_key(batch, dtype)]["bt.fold"]
            text = f"{prefix}batch {batch}: bt.fold latency"
            goals.append(Goal(f"{text} / eval", folded["x_eval"], 0.9))
            goals.append(Goal(f"{text} / no-BN model", folded["x_no_bn"], 1.02))
    return goals


def run(config: Config) -> Result:
    models = build(config)
    size = config.image_size
    data: dict[str, Any] = {
        "bn_layers_left": {name: count_batchnorm(m) for name, m in models.items()},
        "output_rel_diff": output_differences(placed(models, config.device, "float32"), size),
    }
    other = "wall" if config.basis == "cpu" else "cpu"
    table = Table(
        "Latency per call (median) and ratios; torch.inference_mode",
        ["dtype", "batch", "model", "BN left", "median ms", "x eval", "range", f"({other})"]
        + ["x no BN"],
    )
    for dtype in config.fold_dtypes:
        on_device = placed(models, config.device, dtype)
        for batch in config.inference_batches:
            gen = torch.Generator().manual_seed(batch)
            x = torch.randn(batch, 3, size, size, generator=gen).to(
                config.device, dtype_named(dtype)
            )
            measured = time_batch(on_device, x, config)
            data[_key(batch, dtype)] = measured
            for name in models:
                m = measured[name]
                low, high = m["x_eval_range"]
                table.add(
                    dtype,
                    batch,
                    name,
                    data["bn_layers_left"][name],
                    1e3 * m["median_s"],
                    m["x_eval"],
                    f"{low:.3f}-{high:.3f}",
                    m[f"x_eval_{other}"],
                    m["x_no_bn"],
                )
    goals = _goals(data, config)
    diffs = data["output_rel_diff"]
    return Result(
        key="b",
        title="Inference: bt.fold vs eval vs torch.fx fuse vs no BN",
        settings={
            "model": f"ResNet18Shaped{tuple(config.resnet_widths)}",
            "input": f"3x{size}x{size}",
            "device": config.device,
            "repeats": 2 * config.repeats,
            "times": f"{config.basis}, {config.threads} thread(s)",
        },
        data=data,
        tables=[table],
        goals=goals,
        notes=[
            f"max |output - eval output| / max |eval output|: bt.fold {diffs['bt.fold']:.1e}, "
            f"fx fuse {diffs['fx fuse']:.1e}, no BN {diffs['no BN']:.1e}",
        ],
    )
