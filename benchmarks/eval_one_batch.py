"""``mode="eval"`` on data that fit in one batch: the one-batch forward against the schedule
of data that do not.

Where the largest BN input over the data is at most 256 MiB (and one process runs them),
``mode="eval"`` runs all the data as one batch, each BN layer normalizing each call with its
own input's population, then one fixed pass over the batches to check
(:mod:`bnstats.torch._one_batch`). For each case: ``mode="eval_exact"`` (level by level, the
reference), ``mode="eval"`` with the one batch switched off (``ONE_BATCH_BYTES = 0``: four
whole passes then a late subset, or the subset iteration, as data over the budget take) and
``mode="eval"`` as it runs. Each: whole passes + subset passes, CPU seconds, and the worst
difference from ``eval_exact`` over every channel of every layer (``|d var| / var``,
``|d mean| / sqrt(var)``); for the run as it runs also the largest BN input over the data
(what the budget bounds) and how far the process's peak resident memory rose above what it
held before the call (Linux's ``VmHWM``, reset first).

``--cases`` (comma-separated; default ``small,large``):

- ``small``: the four eval-mode test models (``tests/torch/eval_models.py``) on 64 batches
  of 16 (1,024 samples);
- ``large``: the 30-deep conv chain, the residual CNN and the 30-deep MLP chain on 2,048
  batches of 16 (32,768 samples; the densenet-like CNN's largest BN input there, 320 MiB,
  is over the budget);
- ``trained``: torchvision's resnet18, mobilenet_v2 and densenet121 trained 3 epochs on the
  digits (:func:`benchmarks.eval_zoo.trained_model`), on the first 20 batches of 32 digits
  (640 samples), as ``benchmarks.eval_zoo --trained``; needs torchvision;
- ``zoo``: resnet18, mobilenet_v2 and regnet_y_400mf (torchvision) at random weights, 128
  batches of 4 images 3x64x64 (512 samples), as ``benchmarks.eval_subset --zoo``.

``--budget MIB`` sets the budget of the run as it runs: under the data's largest BN input
the data take the whole passes and the subset iteration, with each subset solve one forward
over the joined subset where that fits (``--cases small --budget 1``: the conv chain's
late subset; ``--cases large --budget 4``: its 1,024-sample subset).

Run: ``PYTHONPATH=src:. python -m benchmarks.eval_one_batch [--cases small,large,trained,zoo]
[--budget MIB]`` (one torch thread; small about 1 minute, large about 10, trained about 8,
zoo about 20).
"""

from __future__ import annotations

import argparse
import copy
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from tests.torch import eval_models
from tests.torch.test_eval_mode_iterated import worst_difference
from torch import nn

import bnstats.torch as bt
from benchmarks.eval_subset import timed
from bnstats import _one_batch


def timed_peak(call: Callable[[], bt.Recalibration]) -> tuple[bt.Recalibration, float, float]:
    """``call()``, its CPU seconds, and how far the peak resident memory rose above the
    memory held before it, in MiB (NaN where ``/proc`` cannot say)."""
    status = Path("/proc/self/status")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # the peak back to the current size
        before = _status_kib(status, "VmRSS")
    except OSError:
        return (*timed(call), float("nan"))
    result, seconds = timed(call)
    return result, seconds, (_status_kib(status, "VmHWM") - before) / 1024


def _status_kib(status: Path, key: str) -> int:
    for line in status.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise OSError(f"no {key} in {status}")


def largest_input_mib(model: nn.Module, data: list[torch.Tensor]) -> float:
    """The largest BN input over all of ``data`` (at its float32 size), from one batch."""
    sizes: dict[str, int] = {}
    hooks = [
        layer.register_forward_pre_hook(lambda m, a, n=name: sizes.__setitem__(n, a[0].numel()))
        for name, layer in model.named_modules()
        if isinstance(layer, nn.modules.batchnorm._BatchNorm)
    ]
    try:
        with torch.no_grad():
            copy.deepcopy(model).eval()(data[0])
    finally:
        for hook in hooks:
            hook.remove()
    samples = sum(len(batch) for batch in data)
    return max(sizes.values()) * 4 * samples / len(data[0]) / 2**20


def without_one_batch(model: nn.Module, data: list[torch.Tensor]) -> bt.Recalibration:
    """``mode="eval"`` on a copy of ``model`` as on data over the one-batch budget."""
    budget, _one_batch.ONE_BATCH_BYTES = _one_batch.ONE_BATCH_BYTES, 0
    try:
        return bt.recalibrate_report(copy.deepcopy(model), data, mode="eval")
    finally:
        _one_batch.ONE_BATCH_BYTES = budget


def compare(name: str, model: nn.Module, data: list[torch.Tensor]) -> str:
    """One line: eval_exact, eval without the one batch, eval as it runs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exact, exact_s = timed(
            lambda: bt.recalibrate_report(copy.deepcopy(model), data, mode="eval_exact")
        )
        before, before_s = timed(lambda: without_one_batch(model, data))
        now, now_s, now_mib = timed_peak(
            lambda: bt.recalibrate_report(copy.deepcopy(model), data, mode="eval")
        )
    return (
        f"{name:14s} eval_exact {exact.passes:3d} passes {exact_s:6.1f} s | "
        f"without one batch {_passes(before)} {before_s:6.1f} s, "
        f"{worst_difference(before.model, exact.model):.2g} | "
        f"one batch {_passes(now)} {now_s:6.1f} s, {worst_difference(now.model, exact.model):.2g}"
        f" | largest BN input {largest_input_mib(model, data):5.1f} MiB, peak +{now_mib:6.1f} MiB"
        f" | {before_s / now_s:.2f}x faster"
    )


def _passes(result: bt.Recalibration) -> str:
    return f"{result.passes:2d} + {result.subset_passes:3d}"


def cases(names: list[str]) -> Iterator[tuple[str, nn.Module, list[torch.Tensor]]]:
    """``(label, model, batches)`` for each case named (module docstring)."""
    for case in names:
        if case in ("small", "large"):
            count = 64 if case == "small" else 2048
            models = ("convchain", "residual", "dense", "chain")
            for name in models if case == "small" else ("convchain", "residual", "chain"):
                yield (
                    f"{name} {count * 16}",
                    eval_models.build(name),
                    eval_models.batches(name, count, 16),
                )
        elif case == "trained":
            from benchmarks.eval_zoo import TRAINED, digit_images, trained_model

            batches = list(digit_images()[:640].split(32))
            for name in TRAINED:
                yield f"{name} trained", trained_model(name), batches
        elif case == "zoo":
            from benchmarks.models import image_batches
            from benchmarks.onnx_zoo import build

            data = image_batches(128, 4, 64)
            for name in ("resnet18", "mobilenet_v2", "regnet_y_400mf"):
                yield name, build(f"torchvision:{name}"), data
        else:
            raise SystemExit(f"unknown case {case!r}: small, large, trained or zoo")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="small,large", help="small, large, trained, zoo")
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="the one-batch budget in MiB for the run as it runs (default 256): under the "
        "data's largest BN input, only the subset is joined",
    )
    args = parser.parse_args(argv)
    if args.budget is not None:
        _one_batch.ONE_BATCH_BYTES = int(args.budget * 2**20)
    for label, model, data in cases(args.cases.split(",")):
        print(compare(label, model, data), flush=True)
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    raise SystemExit(main())
