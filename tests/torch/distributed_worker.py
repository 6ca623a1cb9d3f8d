"""One rank of the 2-process gloo group of tests/torch/test_distributed.py.

    python -m tests.torch.distributed_worker RANK WORLD_SIZE PORT OUT_DIR

Joins the group on 127.0.0.1:PORT (with timeouts), runs every scenario of
:mod:`tests.torch.distributed_scenarios` in order and saves ``OUT_DIR/<name>.rank<R>.pt``:
``{"result": dict | None, "error": str | None}``. Before each scenario the ranks check that
they are at the same one. Last comes ``dead_rank``: rank 1 exits at once with code 3, and
rank 0 records what its next recalibrate raised.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tests.torch import distributed_scenarios as scenarios

COLLECTIVE_TIMEOUT = timedelta(seconds=30)
DEAD_RANK_EXIT_CODE = 3


def _save(out: Path, name: str, rank: int, record: dict[str, Any]) -> None:
    path = out / f"{name}.rank{rank}.pt"
    torch.save(record, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


def _same_scenario(name: str) -> None:
    names: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(names, name)
    if len(set(names)) != 1:
        raise RuntimeError(f"ranks are at different scenarios: {names}")


def _run(name: str, rank: int, out: Path) -> None:
    _same_scenario(name)
    try:
        record = {"result": scenarios.SCENARIOS[name](rank), "error": None}
    except Exception:
        record = {"result": None, "error": traceback.format_exc()}
    _save(out, name, rank, record)


def _dead_rank(rank: int, out: Path) -> None:
    _same_scenario("dead_rank")
    if rank == 1:
        os._exit(DEAD_RANK_EXIT_CODE)
    time.sleep(0.5)  # let rank 1 be gone
    model = scenarios.zoo.build("resnet")
    batches = scenarios.rank_batches("resnet", 0)
    result = scenarios._expect_error(model, lambda: scenarios.bt.recalibrate(model, batches))
    _save(out, "dead_rank", rank, {"result": result, "error": None})


def main(argv: list[str]) -> None:
    rank, world_size, port, out = int(argv[0]), int(argv[1]), int(argv[2]), Path(argv[3])
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=COLLECTIVE_TIMEOUT,
    )
    for name in scenarios.SCENARIOS:
        _run(name, rank, out)
    _dead_rank(rank, out)
    sys.stdout.flush()
    os._exit(0)  # the group lost rank 1: skip a teardown that would wait for it


if __name__ == "__main__":
    main(sys.argv[1:])
