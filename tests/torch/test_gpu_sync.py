"""On a GPU: nothing in a training step of a ``bt.convert``-ed model (every estimator) and
nothing in ``bt.recalibrate`` makes the host wait for the device, checked under
``torch.cuda.set_sync_debug_mode("error")`` by the checks of benchmarks/gpu_check.py.
Skipped where CUDA is not available."""

from __future__ import annotations

import pytest
import torch

from benchmarks import gpu_check

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("estimator", list(gpu_check.ESTIMATORS))
def test_training_step_never_synchronizes(estimator):
    failure = gpu_check.check_training_step(estimator, "cuda")
    assert failure is None, failure


def test_recalibrate_never_synchronizes():
    failure = gpu_check.check_recalibrate("cuda")
    assert failure is None, failure


def test_the_sync_check_catches_a_host_read():
    x = torch.ones(3, device="cuda")
    assert "synchroniz" in gpu_check.sync_error(lambda: bool(x.sum() > 0))
    assert torch.cuda.get_sync_debug_mode() == 0
