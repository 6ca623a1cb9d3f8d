"""``mode="eval"`` on data over the one-batch budget: the subset sized to what the budget
takes against the 1,024-sample subset.

Where the data are too large to run as one batch but the subset of 1,024 samples joins
within the budget, ``mode="eval"`` grows the subset to the first batches that fill the
budget, at most an eighth of the data: each round's solve is one forward over more samples,
and the rounds shrink the distance to the fixed point faster. Where the 1,024 samples do not
join, it shrinks the subset to its first batches that do, down to 256 samples: each solve is
one forward instead of passes (:func:`bnstats.torch._subset_choice.sized_subset`). For
each case, in the same process: ``mode="eval"`` with the sizing switched off (the
1,024-sample subset) and as it runs; whole passes + passes over the subset, the subset's
batches, CPU seconds, how far the last whole pass moved the statistics, and the worst
difference between the two results over every channel (``|d var| / var``, ``|d mean| /
sqrt(var)``); for the test models also each one's worst difference from the exact statistics
(the data run as one batch, with a budget of 1 GiB).

- default: the conv chain, the residual CNN and the densenet-like CNN
  (``tests/torch/eval_models.py``) on 2,048 batches of 16 (32,768 samples; 64 to 320 MiB of
  largest BN input) with a budget of ``--budget`` MiB (default 16: the 1,024-sample subset,
  2 to 10 MiB, joins; the data do not; ``--budget 1``: it does not, and the conv chain's and
  the residual CNN's shrink to 448 samples);
- ``--trained``: torchvision's mobilenet_v2 trained 3 epochs on the digits
  (:func:`benchmarks.eval_zoo.trained_model`) on 1,024 batches of 32 digits shifted at random
  (:func:`benchmarks.eval_subset.shifted_digits`; 32,768 samples, 3 GiB of largest BN
  input) at the default budget (256 MiB: the subset grows to about 2,700 samples); needs
  torchvision.

``--unsized``: the batches wrapped without a length, so that the batch-statistics pass comes
first and the subset is sized after it.

Run: ``PYTHONPATH=src:. python -m benchmarks.eval_grown_subset [--budget MIB] [--trained]
[--unsized]`` (one torch thread; about 3 minutes on 2 CPU cores, ``--trained`` about 7).
"""

from __future__ import annotations

import argparse
import copy
import math
import warnings
from collections.abc import Iterable

import torch
from tests.torch import eval_models
from tests.torch.test_eval_mode_iterated import worst_difference
from torch import nn

import bnstats.torch as bt
from benchmarks.eval_subset import shifted_digits, timed
from bnstats.torch import _subset_choice


def not_sized(
    model: nn.Module, data: Iterable[torch.Tensor], budget: int | None
) -> bt.Recalibration:
    """``mode="eval"`` on a copy of ``model`` with the subset left at 1,024 samples (neither
    grown nor shrunk)."""
    settings = _subset_choice.GROWN_LEAST, _subset_choice.SHRUNK_LEAST
    _subset_choice.GROWN_LEAST = _subset_choice.SHRUNK_LEAST = math.inf
    try:
        return bt.recalibrate_report(
            copy.deepcopy(model), data, mode="eval", one_batch_bytes=budget
        )
    finally:
        _subset_choice.GROWN_LEAST, _subset_choice.SHRUNK_LEAST = settings


def _run(result: bt.Recalibration, seconds: float) -> str:
    moved = max(result.moved.values(), default=math.nan)
    return (
        f"{result.passes} + {result.subset_passes:2d} over {result.subset_batches:3d} batches, "
        f"{seconds:6.1f} s, moved {moved:.2g}"
    )


def compare(
    name: str, model: nn.Module, data: Iterable[torch.Tensor], budget: int | None, exact: bool
) -> str:
    """One line: the subset not grown, then grown, the speed-up and the difference."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before, before_s = timed(lambda: not_sized(model, data, budget))
        now, now_s = timed(
            lambda: bt.recalibrate_report(
                copy.deepcopy(model), data, mode="eval", one_batch_bytes=budget
            )
        )
        apart = worst_difference(now.model, before.model)
        line = (
            f"{name:13s} 1,024 samples: {_run(before, before_s)} | sized: {_run(now, now_s)} "
            f"| {before_s / now_s:.2f}x faster | apart {apart:.2g}"
        )
        if exact:
            one = bt.recalibrate_report(
                copy.deepcopy(model), data, mode="eval", one_batch_bytes=2**30
            )
            line += (
                f" | from exact {worst_difference(before.model, one.model):.2g}, "
                f"{worst_difference(now.model, one.model):.2g} (one batch: {one.passes} + "
                f"{one.subset_passes})"
            )
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=16.0, help="MiB, for the test models")
    parser.add_argument("--trained", action="store_true", help="trained mobilenet_v2 instead")
    parser.add_argument(
        "--unsized", action="store_true", help="batches without a length: batch pass first"
    )
    args = parser.parse_args(argv)
    given = eval_models.Unsized if args.unsized else list
    if args.trained:
        from benchmarks.eval_zoo import trained_model

        model, data = trained_model("mobilenet_v2"), given(shifted_digits(1024, 32))
        print(compare("mobilenet_v2", model, data, None, exact=False), flush=True)
        return 0
    budget = int(args.budget * 2**20)
    for name in ("convchain", "residual", "dense"):
        model, data = eval_models.build(name), given(eval_models.batches(name, 2048, 16))
        print(compare(name, model, data, budget, exact=True), flush=True)
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    raise SystemExit(main())
