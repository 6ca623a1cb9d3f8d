"""Does ``mode="eval"`` reach the exact eval-mode statistics in four passes on real architectures?

For each architecture of :mod:`benchmarks.zoo_pass_cost` (timm and torchvision, random weights,
nothing downloaded), 4 batches of 4x3x64x64 images (inception_v3 96x96):

- ``recalibrate_report(mode="eval")``: its passes (data this small run as one batch, then
  one check pass), whether they converged (the last one moved no layer by more than 1e-4
  of its output scale) and how far that last pass moved the worst layer;
- ``recalibrate_report(mode="eval_exact")``: the passes level by level takes (one per depth
  level of the BN layers);
- ``worst``: the largest difference between the two results over all channels of all
  layers, ``|d var| / var`` and ``|d mean| / sqrt(var)`` (C.8's goal: 1e-4);
- the CPU time of each call.

Architectures without a BN layer, and those that fail to build or run, are listed with the
reason. ``--trained``: instead, torchvision's resnet18, mobilenet_v2 and densenet121 (or the
torchvision models ``--only`` names) trained for 3 epochs on the digits (upscaled to 3x32x32,
batches of 32, Adam 1e-3), then both modes on the first 20 training batches of 32
(``mode="eval"`` also with whole passes alone, where it would otherwise go on with a late
subset of 2 batches), and train mode's distance from eval_exact.
Run (needs timm and torchvision; about 10 minutes on 2 CPU cores, ``--trained`` about 6)::

    PYTHONPATH=src:. python -m benchmarks.eval_zoo [--only a,b] [--json PATH] [--trained]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings
from dataclasses import asdict, dataclass

import torch
from torch import nn

from benchmarks.eval_iterations import buffers, worst
from benchmarks.models import image_batches
from benchmarks.onnx_zoo import build
from benchmarks.zoo_pass_cost import MODELS, _reason, input_size

BATCHES, BATCH_SIZE = 4, 4


@dataclass
class Result:
    """One architecture's measurement; ``skipped`` holds the reason it has none."""

    model: str
    bn_layers: int = 0
    eval_passes: int = 0
    converged: bool = False
    moved: float = float("nan")
    exact_passes: int = 0
    worst: float = float("nan")
    eval_s: float = float("nan")
    exact_s: float = float("nan")
    skipped: str = ""


def worst_difference(a: nn.Module, b: nn.Module) -> float:
    """The largest ``|d var| / var`` or ``|d mean| / sqrt(var)`` over every BN channel, ``b``
    the reference (:func:`benchmarks.eval_iterations.worst`)."""
    return worst(buffers(a), buffers(b))


def measure(spec: str) -> Result:
    """Both modes on ``spec``; a model that fails is returned with ``skipped``."""
    import bnstats.torch as bt

    result = Result(spec)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = build(spec)
        result.bn_layers = len(bt.find_batchnorm_layers(model))
    except ValueError:  # find_batchnorm_layers, where there is none
        result.skipped = "no BN layer with running statistics"
        return result
    except Exception as error:  # noqa: BLE001 - reported, not raised
        result.skipped = f"does not build: {_reason(error)}"
        return result
    batches = image_batches(BATCHES, BATCH_SIZE, input_size(spec))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the fallback's warning: read from the report
            start = time.process_time()
            iterated = bt.recalibrate_report(copy.deepcopy(model), batches, mode="eval")
            result.eval_s = time.process_time() - start
            start = time.process_time()
            exact = bt.recalibrate_report(copy.deepcopy(model), batches, mode="eval_exact")
            result.exact_s = time.process_time() - start
    except Exception as error:  # noqa: BLE001 - reported, not raised
        result.skipped = f"does not run: {_reason(error)}"
        return result
    result.eval_passes, result.converged = iterated.passes, bool(iterated.converged)
    result.moved = max(iterated.moved.values(), default=float("nan"))
    result.exact_passes = exact.passes
    result.worst = worst_difference(iterated.model, exact.model)
    return result


TRAINED = ("resnet18", "mobilenet_v2", "densenet121")


def digit_images() -> torch.Tensor:
    """The digits' training images, upscaled to 3x32x32."""
    from bnstats.data import load_digits

    digits = load_digits()
    images = torch.tensor(digits.X_train, dtype=torch.float32).view(-1, 1, 8, 8)
    return nn.functional.interpolate(images, size=32, mode="bilinear").repeat(1, 3, 1, 1)


def trained_model(name: str, epochs: int = 3) -> nn.Module:
    """torchvision's ``name`` trained for ``epochs`` on :func:`digit_images` (batches of 32,
    Adam 1e-3)."""
    import torchvision

    from bnstats.data import load_digits

    images, labels = digit_images(), torch.tensor(load_digits().y_train)
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, num_classes=10).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    order = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for rows in torch.randperm(len(images), generator=order).split(32):
            if len(rows) > 1:
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(images[rows]), labels[rows]).backward()
                optimizer.step()
    return model


def trained(name: str, epochs: int = 3) -> str:
    """One line: ``name`` trained on the digits, then its passes (and CPU seconds) in both
    modes and in ``mode="eval"`` with whole passes alone (no late subset)."""
    import bnstats.torch as bt
    from benchmarks.eval_subset import timed, whole_passes_alone

    model, images = trained_model(name, epochs), digit_images()
    batches = list(images[:640].split(32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        iterated, iterated_s = timed(
            lambda: bt.recalibrate_report(copy.deepcopy(model), batches, mode="eval")
        )
        whole, whole_s = timed(lambda: whole_passes_alone(model, batches))
        exact = bt.recalibrate_report(copy.deepcopy(model), batches, mode="eval_exact")
    train_mode = bt.recalibrate(copy.deepcopy(model), batches)
    return (
        f"{name:14s} eval passes {iterated.passes:3d} + {iterated.subset_passes:3d} over "
        f"{iterated.subset_batches} batches {iterated_s:5.1f} s (last moved "
        f"{max(iterated.moved.values()):.2g}), whole passes alone {whole.passes:3d} "
        f"{whole_s:5.1f} s, eval_exact passes {exact.passes:3d}, eval vs eval_exact "
        f"{worst_difference(iterated.model, exact.model):.2g}, train mode vs eval_exact "
        f"{worst_difference(train_mode, exact.model):.2g}"
    )


def _median(values: list[int]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated model specs (torchvision names with --trained)",
    )
    parser.add_argument("--json", default=None, help="write the results as JSON to PATH")
    parser.add_argument("--trained", action="store_true", help="trained models instead")
    args = parser.parse_args(argv)
    if args.trained:
        for name in args.only.split(",") if args.only else TRAINED:
            print(trained(name), flush=True)
        return 0
    specs = args.only.split(",") if args.only else list(MODELS)
    results = []
    print(
        f"{'model':34s} {'BN':>4s} {'eval passes':>11s} {'converged':>9s} {'moved':>9s} "
        f"{'exact passes':>12s} {'worst':>9s} {'eval s':>7s} {'exact s':>7s}"
    )
    for spec in specs:
        r = measure(spec)
        results.append(r)
        if r.skipped:
            print(f"{spec:34s} skipped: {r.skipped}", flush=True)
            continue
        print(
            f"{spec:34s} {r.bn_layers:4d} {r.eval_passes:11d} {str(r.converged):>9s} "
            f"{r.moved:9.2g} {r.exact_passes:12d} {r.worst:9.2g} {r.eval_s:7.1f} "
            f"{r.exact_s:7.1f}",
            flush=True,
        )
    measured = [r for r in results if not r.skipped]
    converged = [r for r in measured if r.converged]
    in_four = [r for r in converged if r.eval_passes <= 4]
    fewer = [r for r in measured if r.eval_passes < r.exact_passes]
    print(
        f"\n{len(converged)} of {len(measured)} converged ({len(in_four)} in at most 4 passes); "
        f"{len(fewer)} in fewer passes than level by level; worst difference from eval_exact "
        f"where converged: {max((r.worst for r in converged), default=0.0):.2g}; median passes "
        f"eval {_median([r.eval_passes for r in measured])}, "
        f"eval_exact {_median([r.exact_passes for r in measured])}"
    )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump([asdict(r) for r in results], handle, indent=1)
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    raise SystemExit(main())
