"""adapt: Schneider et al.'s mixture of source and target statistics, checked by its formula."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

import bnstats.torch as bt
from tests.torch import reference as ref
from tests.torch import zoo


def _shifted(name, sizes=(8, 8, 8, 5)):
    """Target-domain batches: the source inputs scaled by 2.5 and shifted by 1.5."""
    return [x * 2.5 + 1.5 for x in zoo.batches(name, sizes=list(sizes), seed=7)]


def _target_statistics(model, batches):
    """The exact population statistics on the target (measured independently, float64)."""
    seen = ref.bn_inputs(model, batches)
    return {name: ref.population(per_batch) for name, per_batch in seen.items()}


@pytest.mark.parametrize("name", ["resnet", "mlp", "conv1d"])
@pytest.mark.parametrize("prior", [16, 3.5])
def test_statistics_move_as_the_formula_says(name, prior):
    model, target = zoo.build(name), _shifted(name)
    source = ref.buffers(model)
    truth = _target_statistics(model, target)

    assert bt.adapt(model, target, prior=prior) is model

    n = 8  # the largest batch; the short last batch does not change n
    w_source, w_target = prior / (prior + n), n / (prior + n)
    adapted = ref.buffers(model)
    for layer, (mu, var) in truth.items():
        expected_mean = w_source * source[layer]["mean"] + w_target * mu
        expected_var = w_source * source[layer]["var"] + w_target * var
        scale = np.sqrt(var)
        assert np.max(np.abs(adapted[layer]["mean"] - expected_mean) / scale) < 2e-6, layer
        assert np.max(np.abs(adapted[layer]["var"] - expected_var) / expected_var) < 2e-6, layer
        assert adapted[layer]["tracked"] == source[layer]["tracked"]
        # the shift is real: the adapted statistics are far from both ends
        assert np.max(np.abs(adapted[layer]["mean"] - source[layer]["mean"]) / scale) > 1e-2


def test_prior_zero_is_recalibrate_on_the_target_data():
    model, target = zoo.build("depthwise"), _shifted("depthwise")
    adapted, recalibrated = copy.deepcopy(model), copy.deepcopy(model)
    bt.adapt(adapted, target, prior=0)
    bt.recalibrate(recalibrated, target)
    for layer, got in ref.buffers(adapted).items():
        expected = ref.buffers(recalibrated)[layer]
        np.testing.assert_array_equal(got["mean"], expected["mean"])
        np.testing.assert_array_equal(got["var"], expected["var"])


def test_a_large_prior_barely_changes_anything():
    model, target = zoo.build("preact"), _shifted("preact")
    source = ref.buffers(model)
    bt.adapt(model, target, prior=1e7)
    for layer, got in ref.buffers(model).items():
        np.testing.assert_allclose(got["mean"], source[layer]["mean"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got["var"], source[layer]["var"], rtol=1e-5)


def test_an_explicit_batch_size_sets_n():
    model, target = zoo.build("mlp"), _shifted("mlp")
    by_size, by_formula = copy.deepcopy(model), copy.deepcopy(model)
    bt.adapt(by_size, target, prior=16, batch_size=29)
    bt.adapt(by_formula, target, prior=16 * 8 / 29)  # the same mixing weight with n = 8
    for layer, got in ref.buffers(by_size).items():
        expected = ref.buffers(by_formula)[layer]
        np.testing.assert_allclose(got["mean"], expected["mean"], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(got["var"], expected["var"], rtol=1e-6)


def test_all_or_nothing_and_modes_as_found():
    model, target = zoo.build("resnet"), _shifted("resnet")
    model.train()
    saved, flags = ref.snapshot(model), ref.modes(model)

    def forward(m, batch):
        if batch.shape[0] == 5:
            raise RuntimeError("corrupt batch")
        return m(batch)

    with pytest.raises(RuntimeError, match="corrupt batch"):
        bt.adapt(model, target, forward=forward)
    assert ref.same_state(model, saved) and ref.modes(model) == flags
    bt.adapt(model, target)
    assert ref.modes(model) == flags


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"prior": -1}, ValueError),
        ({"prior": float("inf")}, ValueError),
        ({"prior": "16"}, TypeError),
        ({"batch_size": 0}, ValueError),
    ],
)
def test_bad_arguments_raise_before_anything_runs(kwargs, error):
    model = zoo.build("mlp")
    saved = ref.snapshot(model)
    with pytest.raises(error):
        bt.adapt(model, _shifted("mlp"), **kwargs)
    assert ref.same_state(model, saved)


def test_non_finite_source_statistics_are_refused_unless_fully_adapting():
    model, target = zoo.build("mlp"), _shifted("mlp")
    with torch.no_grad():
        model[1].running_mean[0] = float("nan")
    saved = ref.snapshot(model)
    with pytest.raises(ValueError, match="BN layer '1': the adapted running_mean"):
        bt.adapt(model, target, prior=16)
    assert ref.same_state(model, saved)
    bt.adapt(model, target, prior=0)
    assert torch.isfinite(model[1].running_mean).all()


def test_never_updated_is_decided_by_the_statistics_not_the_count():
    model, target = zoo.build("mlp"), _shifted("mlp")
    with torch.no_grad():
        model[1].num_batches_tracked.zero_()  # an old checkpoint without the key: real statistics
    expected = copy.deepcopy(model)
    with torch.no_grad():
        expected[1].num_batches_tracked.fill_(5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bt.adapt(model, target, prior=16)
    bt.adapt(expected, target, prior=16)
    for key in ("mean", "var"):
        np.testing.assert_array_equal(ref.buffers(model)["1"][key], ref.buffers(expected)["1"][key])

    fresh = zoo.build("mlp")
    fresh[1].reset_running_stats()
    with torch.no_grad():
        fresh[1].num_batches_tracked.fill_(5)  # counted, but the statistics never moved
    saved = ref.snapshot(fresh)
    with pytest.raises(ValueError, match=r"'1' were never updated \(running statistics still 0"):
        bt.adapt(fresh, target, prior=16, never_updated="raise")
    assert ref.same_state(fresh, saved)
    with pytest.warns(UserWarning, match=r"'1' were never updated \(running statistics still 0"):
        bt.adapt(fresh, target, prior=16)
