"""``mode="eval"`` across two torch.distributed ranks on data over the one-batch budget whose
late subset joins within it: each round's solve one forward over both ranks' late subsets,
gathered, against the same rounds solved by passes over the subset (as before, when a late
subset was never joined across ranks).

Two processes (gloo on 127.0.0.1, one torch thread each) hold the two halves of an eval-mode
test model's data (``tests/torch/eval_models.py``; default the 30-deep conv chain on 64
batches of 16, 1,024 samples: under 32 subsets, so four whole passes come first, and their
late subset is each rank's first 2 batches). Each rank runs ``bt.recalibrate_report(
mode="eval", one_batch_bytes=BUDGET)`` twice in each way, alternating; rank 0 prints passes
over all the data + passes over the subset, CPU seconds (rank 0's own), how far the two
results are apart and each one's distance from the one batch of all the data in one process
(worst channel of every layer, ``|d var| / var``, ``|d mean| / sqrt(var)``).

Run: ``PYTHONPATH=src:. python -m benchmarks.eval_late_subset_ranks [--model convchain]
[--count N --size K --budget MIB]`` (under a minute on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

import torch
from tests.torch import eval_models
from tests.torch.test_eval_mode_iterated import worst_difference
from torch import nn

import bnstats.torch as bt
from benchmarks import eval_subset_ranks
from benchmarks.eval_subset_ranks import halves, joined_group, run_on_ranks
from bnstats.torch import _subset_iteration

WAYS = ("by passes", "joined")


@contextlib.contextmanager
def solved_by_passes() -> Iterator[None]:
    """The late subset never joined (its solves by passes), as before; put back after."""
    join_after = _subset_iteration.Subset.join_after
    _subset_iteration.Subset.join_after = lambda self, measured: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        _subset_iteration.Subset.join_after = join_after  # type: ignore[method-assign]


def timed_eval(model: nn.Module, batches: object, budget: int, way: str) -> tuple[nn.Module, str]:
    """``mode="eval"`` on a copy of ``model`` the ``way`` given: the copy and its line."""
    ways = {"by passes": solved_by_passes, "joined": contextlib.nullcontext}
    with ways[way]():
        result, seconds = eval_subset_ranks.timed_eval(model, batches, budget)
    text = f"{result.passes} + {result.subset_passes} over {result.subset_batches} batches"
    return result.model, f"{way}: {text}, {seconds:.1f} s"


def worker(rank: int, port: int, args: argparse.Namespace, results: dict) -> None:
    with joined_group(rank, port):
        model = eval_models.build(args.model)
        data = halves(args.model, args.count, args.size)[rank]
        budget = int(args.budget * 2**20)
        for repeat in range(2):
            for way in WAYS:
                measured, text = timed_eval(model, data, budget, way)
                if rank == 0:
                    results[f"{way} {repeat}"] = (text, measured.state_dict())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="convchain", choices=["chain", "convchain", "residual", "dense"]
    )
    parser.add_argument("--count", type=int, default=64, help="batches over both ranks")
    parser.add_argument("--size", type=int, default=16, help="samples per batch")
    parser.add_argument("--budget", type=float, default=1.0, help="one_batch_bytes in MiB")
    args = parser.parse_args(argv)
    results = run_on_ranks(worker, args)
    one = eval_models.build(args.model)
    data = [batch for half in halves(args.model, args.count, args.size) for batch in half]
    bt.recalibrate(one, data, mode="eval", one_batch_bytes=2**40)
    models = {}
    for key, (text, state) in results.items():
        models[key] = eval_models.build(args.model)
        models[key].load_state_dict(state)
        print(f"{text} | from the one batch {worst_difference(models[key], one):.2g}")
    apart = worst_difference(models["joined 0"], models["by passes 0"])
    print(f"{args.model}, {args.count} batches of {args.size}: the two ways apart {apart:.2g}")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    raise SystemExit(main())
