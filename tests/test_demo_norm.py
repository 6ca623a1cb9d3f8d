"""The demo with Batch Renorm and Ghost Batch Norm, in process, on a small synthetic set."""

from __future__ import annotations

import pytest

from bnstats.data import Dataset
from bnstats.demo import DemoConfig, run_demo
from bnstats.methods import METHODS
from bnstats.renorm import RenormSchedule


@pytest.fixture
def small(rng) -> Dataset:
    X = rng.normal(size=(130, 6))
    y = (X[:, 0] > 0).astype(int) + (X[:, 1] > 0)
    return Dataset("small", X[:100], y[:100], X[100:], y[100:])


def test_renorm_schedule_is_fitted_to_the_run(small):
    config = DemoConfig(epochs=3, batch_size=16, hidden=(8,), norm="renorm")
    assert config.steps(100) == 3 * 7  # 6 batches of 16 and one of 4, per epoch
    result = run_demo(config, dataset=small)
    schedule = result.net.batchnorm_layers[0].schedule
    assert schedule == RenormSchedule().scaled_to(21)
    assert schedule.rmax_full_at == round(21 / 2) and result.history.steps == 21
    summary = result.to_dict()
    assert summary["norm"] == "renorm" and summary["renorm_schedule"] == schedule.to_dict()
    assert set(summary["test_accuracy"]) == set(METHODS)


def test_ghost_and_bad_settings(small):
    result = run_demo(
        DemoConfig(epochs=1, batch_size=20, hidden=(8,), norm="ghost", ghost_size=5), dataset=small
    )
    assert result.to_dict()["ghost_size"] == 5
    assert result.net.batchnorm_layers[0].estimators["ema"].num_batches_tracked == 20
    with pytest.raises(ValueError, match="--norm must be one of bn, renorm, ghost"):
        run_demo(DemoConfig(norm="batch"), dataset=small)
    with pytest.raises(ValueError, match="--ghost-size must lie between 2 and --batch-size 64"):
        run_demo(DemoConfig(norm="ghost", ghost_size=100), dataset=small)
    with pytest.raises(ValueError, match="and --batch-size 4, got 16 \\(the default\\)"):
        run_demo(DemoConfig(norm="ghost", batch_size=4), dataset=small)
