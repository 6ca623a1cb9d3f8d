"""The registry of the demo's test-time methods: what the demo builds, reports and prints."""

from __future__ import annotations

import pytest

from bnstats.demo import DemoConfig, build_network
from bnstats.methods import ESTIMATE_METHODS, METHODS, running_estimators
from bnstats.stats import EMA, CumulativeAverage


def test_every_method_has_its_words_and_a_colour():
    for name, method in METHODS.items():
        assert method.name == name and method.label and method.description
        assert method.color.startswith("#") and len(method.color) == 7
        assert (method.estimator is not None) == (method.source == "running")
        assert method.batch_size is None or method.source == "batch"
    assert ESTIMATE_METHODS == (
        "ema",
        "ema_debiased",
        "cumulative",
        "population_eval",
        "population",
    )


def test_running_estimators_are_built_from_the_momentum():
    built = running_estimators(0.25)
    assert list(built) == ["ema", "ema_debiased", "cumulative"]
    assert isinstance(built["ema"], EMA) and built["ema"].momentum == 0.25
    assert not built["ema"].debias and built["ema_debiased"].debias
    assert built["ema_debiased"].momentum == 0.25
    assert isinstance(built["cumulative"], CumulativeAverage)
    assert running_estimators(0.25)["ema"] is not built["ema"], "fresh ones each call"


@pytest.mark.parametrize("norm", ["bn", "renorm", "ghost"])
def test_the_demo_network_carries_every_running_method(norm):
    net = build_network(DemoConfig(norm=norm, momentum=0.2), features=5, classes=3, rows=100)
    for layer in net.batchnorm_layers:
        assert list(layer.estimators) == ["ema", "ema_debiased", "cumulative"]
        assert layer.estimators["ema"].momentum == 0.2
