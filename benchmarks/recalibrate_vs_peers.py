"""Time bnstats.torch.recalibrate side by side with update_bn and fvcore's precise BN.

Prints each method's best time over a few interleaved rounds as a ratio to
``torch.optim.swa_utils.update_bn`` run under ``torch.no_grad()``. Run from the repository
root: ``python benchmarks/recalibrate_vs_peers.py``.
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

sys.path[:0] = [
    str(Path(__file__).resolve().parents[1]),
    str(Path(__file__).resolve().parents[1] / "src"),
]

import torch  # noqa: E402
from tests.torch.models import TinyResNet, image_batches, scramble_batchnorm  # noqa: E402
from torch.optim.swa_utils import update_bn  # noqa: E402

import bnstats.torch as bt  # noqa: E402


def main(rounds: int = 5) -> None:
    model = scramble_batchnorm(TinyResNet(width=32))
    batches = image_batches(n_batches=8, batch_size=64, shape=(3, 32, 32))

    def update_bn_no_grad(m):
        with torch.no_grad():
            update_bn(batches, m)

    methods = {
        "update_bn (no_grad)": update_bn_no_grad,
        "update_bn": lambda m: update_bn(batches, m),
        "bt.recalibrate": lambda m: bt.recalibrate(m, batches),
        "bt.recalibrate(float64_moments)": lambda m: bt.recalibrate(
            m, batches, float64_moments=True
        ),
    }
    try:
        from fvcore.nn.precise_bn import update_bn_stats

        def fvcore(m):
            m.train()
            update_bn_stats(m, batches, num_iters=len(batches))

        methods["fvcore update_bn_stats"] = fvcore
    except ImportError:
        pass
    best = dict.fromkeys(methods, float("inf"))
    for _ in range(rounds):
        for name, run in methods.items():
            candidate = copy.deepcopy(model)
            start = time.perf_counter()
            run(candidate)
            best[name] = min(best[name], time.perf_counter() - start)
    reference = best["update_bn (no_grad)"]
    for name, seconds in best.items():
        print(f"{name:34s} {seconds / reference:5.2f} x update_bn (no_grad)")


if __name__ == "__main__":
    main()
