"""The demo's claims, measured on the real digits data with default settings."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bnstats.demo import DemoConfig, chance_level, run_demo
from bnstats.methods import ESTIMATE_METHODS, METHODS


@pytest.fixture(scope="module")
def default_run():
    return run_demo(DemoConfig())


def test_running_estimates_work_and_batch_of_one_is_chance(default_run):
    accuracy = default_run.test_accuracy
    assert set(accuracy) == set(METHODS)
    for method in ESTIMATE_METHODS:
        assert accuracy[method] >= 0.95, (method, accuracy)
    chance = chance_level(default_run.dataset)
    assert accuracy["batch@1"] <= chance + 0.02, accuracy
    assert accuracy["batch@8"] < accuracy["ema"]


def test_population_is_exact_over_the_training_set(default_run):
    net, data = default_run.net, default_run.dataset
    first_linear = net.layers[0].params["weight"]
    z1 = data.X_train @ first_linear.T
    population = net.batchnorm_layers[0].estimators["population"]
    np.testing.assert_allclose(population.mean, z1.mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(population.var, z1.var(0, ddof=1), rtol=1e-10)


def test_json_summary_has_the_promised_fields(default_run):
    summary = json.loads(json.dumps(default_run.to_dict()))
    assert summary["dataset"] == "digits" and summary["epochs"] == 20
    assert summary["batch_size"] == 64 and summary["momentum"] == 0.1
    assert set(summary["test_accuracy"]) == set(METHODS)
    layer = summary["layers"][0]
    assert layer["name"] == "bn1" and layer["features"] == 128
    for key in ("running_mean", "running_var", "population_mean", "population_var"):
        assert len(layer[key]) == 128


def test_saved_outputs(default_run, tmp_path):
    default_run.save(tmp_path)
    with np.load(tmp_path / "history.npz") as history:
        assert history["bn1/batch_mean"].shape == (default_run.history.steps, 128)
        assert "bn2/ema_debiased_var" in history.files
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == default_run.history.steps and summary["config"]["lr"] == 1e-3
    assert (tmp_path / "network.npz").is_file()


def test_accuracy_by_momentum_is_that_of_estimators_trained_alongside():
    """Replaying the recorded batches into an EMA gives what an EMA trained in the run holds:
    the same run with an extra EMA(0.03) side by side has the same accuracy, bit for bit."""
    from bnstats.demo import prepare_demo, train_demo
    from bnstats.stats import EMA

    config = DemoConfig(epochs=2, hidden=(16,))
    dataset, net = prepare_demo(config)
    for layer in net.batchnorm_layers:
        layer.estimators["extra"] = EMA(0.03, debias=True)
    result = train_demo(config, dataset, net)
    expected = net.evaluate(dataset.X_test, dataset.y_test, stats="extra")
    keys = [set(layer.estimators) for layer in net.batchnorm_layers]
    assert result.accuracy_by_momentum([0.03])["ema_debiased"] == [expected]
    assert [set(layer.estimators) for layer in net.batchnorm_layers] == keys, "left as found"


def test_accuracy_by_batch_size_reuses_the_sizes_already_measured(default_run):
    from bnstats.demo import accuracy_by_batch_size

    sizes = (1, 2, 8, len(default_run.dataset.X_test))
    fresh = accuracy_by_batch_size(default_run.net, default_run.dataset, sizes)
    assert default_run.accuracy_by_batch_size(sizes) == fresh
    assert fresh[1] == default_run.test_accuracy["batch@1"]
    assert fresh[8] == default_run.test_accuracy["batch@8"]
