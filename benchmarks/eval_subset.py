"""``mode="eval"`` on large data: the subset iteration against whole passes alone.

On data of 32 subsets (1,024 samples each) or more, ``mode="eval"`` solves the fixed point of
eval-mode inference on the first batches and corrects it by whole passes
(:mod:`bnstats.torch._subset_iteration`). For each model: ``mode="eval_exact"`` (level by
level, the reference), ``mode="eval"`` with whole passes alone (the subset iteration switched
off) and ``mode="eval"`` as it runs: passes over all the data, passes over the subset, CPU
seconds, and the worst difference from ``eval_exact`` over every channel of every layer
(``|d var| / var``, ``|d mean| / sqrt(var)``).

- default: the four eval-mode test models (``tests/torch/eval_models.py``: a 30-deep conv
  chain, a residual CNN, a densenet-like CNN, a 30-deep MLP chain with scrambled BN) on
  2,048 batches of 16 (32,768 samples: the subset is the first 64 batches);
- ``--late``: the same models on 64 batches of 16 (1,024 samples, under 32 subsets): four
  whole passes, then, where they did not converge, rounds with the first 4 batches as a late
  subset (:func:`bnstats.torch._subset_choice.late_subset_batches`); with ``--trained``,
  mobilenet_v2 on its 4,096 samples at the library's settings (a late subset of 8 batches;
  ``--trained --late --count 1024 --no-whole``: 32,768 samples, the library's 1,024-sample
  subset solved first);
- ``--zoo SPEC,...``: timm or torchvision models (``benchmarks.onnx_zoo.build`` specs such as
  ``torchvision:resnet18``) at random weights on 128 batches of 4 images 3x64x64 (512
  samples: a late subset of 16 batches);
- ``--trained``: torchvision's mobilenet_v2 trained 3 epochs on the digits
  (:func:`benchmarks.eval_zoo.trained_model`), on 128 batches of 32 digits shifted at random
  (4,096 samples), with subsets of 256 samples and a share of 16 (``--subset-samples``,
  ``--share``) so that data this small take the subset path.

Run: ``PYTHONPATH=src:. python -m benchmarks.eval_subset [--trained] [--late] [--no-whole]
[--count N --size K | --zoo SPEC,...]`` (about 25 minutes on 2 CPU cores; ``--late`` about 2;
``--trained`` needs torchvision, about 15; ``--zoo`` timm or torchvision, about 6 minutes a
model at 512 images).
"""

from __future__ import annotations

import argparse
import copy
import math
import time
import warnings
from collections.abc import Callable

import torch
from tests.torch import eval_models
from tests.torch.test_eval_mode_iterated import worst_difference
from torch import nn

import bnstats.torch as bt
from bnstats.torch import _subset_choice


def timed(call: Callable[[], bt.Recalibration]) -> tuple[bt.Recalibration, float]:
    start = time.process_time()
    result = call()
    return result, time.process_time() - start


def compare(name: str, model: nn.Module, data: list[torch.Tensor], alone: bool = True) -> str:
    """One line: eval_exact, whole passes alone (unless not ``alone``), the subset iteration
    on ``data``; the speed-up against whole passes alone, or else against eval_exact."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exact, exact_s = timed(
            lambda: bt.recalibrate_report(copy.deepcopy(model), data, mode="eval_exact")
        )
        if alone:
            whole, whole_s = timed(lambda: whole_passes_alone(model, data))
        subset, subset_s = timed(
            lambda: bt.recalibrate_report(copy.deepcopy(model), data, mode="eval")
        )
    line = f"{name:10s} eval_exact {exact.passes:3d} passes {exact_s:6.1f} s | "
    if alone:
        difference = worst_difference(whole.model, exact.model)
        line += f"whole passes {whole.passes:3d} {whole_s:6.1f} s, {difference:.2g} | "
    reference, against = (whole_s, "whole passes") if alone else (exact_s, "eval_exact")
    return line + (
        f"subset {subset.passes:2d} + {subset.subset_passes:3d} over "
        f"{subset.subset_batches} batches {subset_s:6.1f} s, "
        f"{worst_difference(subset.model, exact.model):.2g} | "
        f"{reference / subset_s:.2f}x faster than {against}"
    )


def whole_passes_alone(model: nn.Module, data: list[torch.Tensor]) -> bt.Recalibration:
    """``mode="eval"`` on a copy of ``model`` with no subset, early or late."""
    shares = _subset_choice.SUBSET_SHARE, _subset_choice.LATE_MOST
    _subset_choice.SUBSET_SHARE = _subset_choice.LATE_MOST = math.inf
    try:
        return bt.recalibrate_report(copy.deepcopy(model), data, mode="eval")
    finally:
        _subset_choice.SUBSET_SHARE, _subset_choice.LATE_MOST = shares


def shifted_digits(count: int, size: int) -> list[torch.Tensor]:
    """``count`` batches of ``size`` training digits (3x32x32, as the model was trained on),
    each shifted by up to 2 pixels at random: more samples than the 1,437 digits."""
    from benchmarks.eval_zoo import digit_images

    images = digit_images()
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(count):
        rows = torch.randint(len(images), (size,), generator=gen)
        dx, dy = torch.randint(-2, 3, (2,), generator=gen).tolist()
        batches.append(torch.roll(images[rows], shifts=(dy, dx), dims=(2, 3)))
    return batches


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trained", action="store_true")
    parser.add_argument("--count", type=int, default=None, help="batches")
    parser.add_argument("--size", type=int, default=None, help="samples per batch")
    parser.add_argument("--subset-samples", type=int, default=None)
    parser.add_argument("--share", type=int, default=None)
    parser.add_argument(
        "--late",
        action="store_true",
        help="data under 32 subsets at the library's settings (64 batches of 16; "
        "--trained: 128 of 32), where a late subset follows the four whole passes",
    )
    parser.add_argument(
        "--no-whole", action="store_true", help="skip whole passes alone (slow on large data)"
    )
    parser.add_argument(
        "--zoo",
        default=None,
        help="comma-separated timm/torchvision specs at random weights instead (--count "
        "batches of --size 3x64x64 images; default 128 of 4)",
    )
    args = parser.parse_args(argv)
    if args.subset_samples is not None:
        _subset_choice.SUBSET_SAMPLES = args.subset_samples
    if args.share is not None:
        _subset_choice.SUBSET_SHARE = args.share
    if args.zoo:
        from benchmarks.models import image_batches
        from benchmarks.onnx_zoo import build

        data = image_batches(args.count or 128, args.size or 4, 64)
        for spec in args.zoo.split(","):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = build(spec)
            print(compare(spec, model, data, not args.no_whole), flush=True)
        return 0
    if args.trained:
        from benchmarks.eval_zoo import trained_model

        if not args.late:
            _subset_choice.SUBSET_SAMPLES = args.subset_samples or 256
            _subset_choice.SUBSET_SHARE = args.share or 16
        data = shifted_digits(args.count or 128, args.size or 32)
        model = trained_model("mobilenet_v2")
        print(compare("mobilenet_v2", model, data, not args.no_whole), flush=True)
        return 0
    for name in ("convchain", "residual", "dense", "chain"):
        model = eval_models.build(name)
        data = eval_models.batches(name, args.count or (64 if args.late else 2048), args.size or 16)
        print(compare(name, model, data, not args.no_whole), flush=True)
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    raise SystemExit(main())
