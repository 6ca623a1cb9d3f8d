"""benchmarks/gpu_check.py on the CPU: every check's own logic (the NaN batch skipped and
counted once per layer, recalibrate setting the same statistics again) with a guard that only
runs the work; the sync-free part itself is tests/torch/test_gpu_sync.py, on a GPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check


def just_run(work):
    work()
    return None


@pytest.mark.parametrize("estimator", list(gpu_check.ESTIMATORS))
def test_training_step_check_on_the_cpu(estimator):
    assert gpu_check.check_training_step(estimator, "cpu", guard=just_run) is None


def test_the_skip_check_sees_a_batch_that_was_not_skipped():
    model = gpu_check.bt.convert(gpu_check._model("cpu"), gpu_check.bnstats.EMA(0.1))
    assert "0 batch(es) skipped" in gpu_check._skipped_once(model)


def test_recalibrate_check_on_the_cpu():
    assert gpu_check.check_recalibrate("cpu", guard=just_run) is None


def test_a_failing_guard_is_reported():
    assert gpu_check.check_recalibrate("cpu", guard=lambda work: "synced") == "synced"


def test_where_in_bnstats_names_the_innermost_bnstats_line():
    try:
        gpu_check.bt.recalibrate(torch.nn.Linear(2, 2), [torch.ones(2, 2)])
    except ValueError as error:
        where = gpu_check.where_in_bnstats(error)
    assert where.split(":")[0].endswith(".py") and where != "?"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_the_script_without_cuda_is_one_line_and_status_2():
    script = Path(gpu_check.__file__)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and "CUDA is not available" in done.stderr
