"""``mode="eval"`` on large data across two torch.distributed ranks: the subset solved before
any whole pass (every rank's batches have a length) against the batch-statistics pass first
(the same batches without a length).

Two processes (gloo on 127.0.0.1, one torch thread each) hold the two halves of the
eval-mode test models' data (``tests/torch/eval_models.py``; default 2,048 batches of 16,
32,768 samples: 1,024 batches on each rank, each rank's first 32 batches its half of the
1,024-sample subset). Each rank runs ``bt.recalibrate_report(mode="eval")`` on its list of
batches and on the same batches wrapped without a length; rank 0 prints passes over all the
data, passes over the subset, CPU seconds (rank 0's own) and how far the two results are
apart (worst channel of every layer, ``|d var| / var``, ``|d mean| / sqrt(var)``); with
``--exact``, also each one's distance from ``mode="eval_exact"`` run in one process on the
concatenated batches (the reference: slow on the conv chain).

Run: ``PYTHONPATH=src:. python -m benchmarks.eval_subset_ranks [--models convchain residual]
[--count N --size K] [--exact] [--budget MIB]`` (about 6 minutes on 2 CPU cores without
``--exact``; ``--budget``: ``one_batch_bytes`` in MiB, the library's default without).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import socket
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tests.torch import eval_models
from tests.torch.test_eval_mode_iterated import worst_difference
from torch import nn

import bnstats.torch as bt
from benchmarks.eval_subset import timed

RANKS = 2


def halves(name: str, count: int, size: int) -> list[list[torch.Tensor]]:
    """The model's ``count`` batches cut into one contiguous half per rank."""
    data = eval_models.batches(name, count, size)
    half = len(data) // RANKS
    return [data[rank * half : (rank + 1) * half] for rank in range(RANKS)]


def timed_eval(
    model: nn.Module, batches: object, budget: int | None
) -> tuple[bt.Recalibration, float]:
    """``mode="eval"`` on a copy of ``model`` (``one_batch_bytes=budget``), and its CPU
    seconds."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return timed(
            lambda: bt.recalibrate_report(
                copy.deepcopy(model), batches, mode="eval", one_batch_bytes=budget
            )
        )


@contextlib.contextmanager
def joined_group(rank: int, port: int) -> Iterator[None]:
    """This process as ``rank`` of the :data:`RANKS` ranks' gloo group on 127.0.0.1:``port``,
    one torch thread; the group destroyed after."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=RANKS)
    try:
        yield
    finally:
        dist.destroy_process_group()


def run_on_ranks(worker: Callable[..., None], args: argparse.Namespace) -> dict:
    """``worker(rank, port, args, results)`` in :data:`RANKS` spawned processes on a free
    port of 127.0.0.1; what they put in ``results``, a shared dict."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with mp.Manager() as manager:
        shared = manager.dict()
        mp.spawn(worker, args=(port, args, shared), nprocs=RANKS, join=True)
        return dict(shared)


def worker(rank: int, port: int, args: argparse.Namespace, results: dict) -> None:
    with joined_group(rank, port):
        for name in args.models:
            model, data = eval_models.build(name), halves(name, args.count, args.size)[rank]
            budget = None if args.budget is None else int(args.budget * 2**20)
            first, first_s = timed_eval(model, data, budget)
            batch, batch_s = timed_eval(model, eval_models.Unsized(data), budget)
            if rank == 0:
                results[name] = {
                    "first": (first.passes, first.subset_passes, first_s),
                    "batch": (batch.passes, batch.subset_passes, batch_s),
                    "apart": worst_difference(first.model, batch.model),
                    "states": (first.model.state_dict(), batch.model.state_dict()),
                }


def line(name: str, result: dict, exact: nn.Module | None) -> str:
    (p1, s1, t1), (p2, s2, t2) = result["first"], result["batch"]
    text = (
        f"{name:10s} subset first {p1:2d} + {s1:3d} over the subset {t1:6.1f} s | "
        f"batch pass first {p2:2d} + {s2:3d} {t2:6.1f} s | {t2 / t1:.2f}x | "
        f"apart {result['apart']:.2g}"
    )
    if exact is not None:
        far = []
        for state in result["states"]:
            model = eval_models.build(name)
            model.load_state_dict(state)
            far.append(f"{worst_difference(model, exact):.2g}")
        text += f" | from eval_exact {far[0]}, {far[1]}"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["convchain", "residual"])
    parser.add_argument("--count", type=int, default=2048, help="batches over both ranks")
    parser.add_argument("--size", type=int, default=16, help="samples per batch")
    parser.add_argument("--exact", action="store_true", help="also run eval_exact (slow)")
    parser.add_argument("--budget", type=float, default=None, help="one_batch_bytes in MiB")
    args = parser.parse_args(argv)
    results = run_on_ranks(worker, args)
    for name in args.models:
        exact = None
        if args.exact:
            exact = eval_models.build(name)
            data = [batch for half in halves(name, args.count, args.size) for batch in half]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                bt.recalibrate(exact, data, mode="eval_exact")
        print(line(name, results[name], exact), flush=True)
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    raise SystemExit(main())
