"""The training loop and the history it records."""

from __future__ import annotations

import numpy as np
import pytest

import bnstats
from bnstats.engine import SGD, History, Network
from bnstats.engine.training import batch_slices


def _data(rng, n=50, d=6, k=3):
    return rng.normal(size=(n, d)), rng.integers(0, k, size=n)


def test_history_records_every_step_and_estimator(rng, tmp_path):
    X, y = _data(rng)
    net = Network.mlp(
        [6, 8, 3], seed=0, estimators={"ema": bnstats.EMA(0.1), "pop": bnstats.Population()}
    )
    history = net.fit(X, y, epochs=3, batch_size=16, optimizer=SGD(0.1))
    assert history.steps == 12 and history.batch_size[:4] == [16, 16, 16, 2]
    arrays = history.arrays()
    assert arrays["bn1/batch_mean"].shape == (12, 8)
    assert set(history.layers["bn1"]) == {
        "batch_mean",
        "batch_var",
        "ema_mean",
        "ema_var",
        "pop_mean",
        "pop_var",
    }
    # the recorded EMA is the running average of the recorded batch means
    ema = np.zeros(8)
    for mean in arrays["bn1/batch_mean"]:
        ema = 0.9 * ema + 0.1 * mean
    np.testing.assert_allclose(arrays["bn1/ema_mean"][-1], ema, rtol=1e-12)
    np.testing.assert_allclose(arrays["bn1/ema_mean"][-1], net.layers[1].estimators["ema"].mean)
    history.save(tmp_path, summary={"note": "x"})
    loaded = History.load(tmp_path / "history.npz")
    np.testing.assert_array_equal(loaded.arrays()["bn1/batch_var"], arrays["bn1/batch_var"])
    assert (tmp_path / "summary.json").read_text().count('"note"') == 1


def test_shuffling_is_seeded(rng):
    X, y = _data(rng)
    losses = [
        Network.mlp([6, 8, 3], seed=0).fit(X, y, epochs=2, batch_size=8, seed=s).loss
        for s in (1, 1, 2)
    ]
    assert losses[0] == losses[1] and losses[0] != losses[2]


def test_a_last_batch_of_one_row_is_refused_before_training(rng):
    X, y = _data(rng, n=33)
    net = Network.mlp([6, 8, 3], seed=0)
    weights = net.layers[0].params["weight"].copy()
    with pytest.raises(ValueError, match="last batch of 1 row"):
        net.fit(X, y, epochs=1, batch_size=16)
    np.testing.assert_array_equal(net.layers[0].params["weight"], weights)
    history = net.fit(X, y, epochs=1, batch_size=16, drop_last=True)
    assert history.batch_size == [16, 16]


def test_bad_labels_are_refused(rng):
    X, _ = _data(rng)
    net = Network.mlp([6, 8, 3], seed=0)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        net.fit(X, np.full(50, 3), epochs=1, batch_size=10)
    with pytest.raises(ValueError, match="integers"):
        net.fit(X, np.zeros(50), epochs=1, batch_size=10)


def test_progress_callback_counts_steps(rng):
    X, y = _data(rng)
    seen = []
    Network.mlp([6, 8, 3], seed=0).fit(
        X, y, epochs=2, batch_size=25, progress=lambda s, t, loss: seen.append((s, t))
    )
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_batch_slices():
    assert batch_slices(5, 2, False) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert batch_slices(5, 2, True) == [slice(0, 2), slice(2, 4)]
    assert batch_slices(3, 8, False) == [slice(0, 3)]
