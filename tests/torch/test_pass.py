"""How the one-pass tools take each batch's moments: from the BN kernel's own buffer update
(momentum 1) where the layer allows it, else from torch.batch_norm_update_stats."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import bnstats
import bnstats.torch as bt
from bnstats.torch._pass import collect_moments
from bnstats.torch.modules import kernel_writes_moments
from bnstats.torch.options import PassOptions
from tests.torch import reference as ref
from tests.torch import zoo
from tests.torch.models import mlp, scramble_batchnorm


def _population_errors(model, seen):
    got = ref.buffers(model)
    worst = 0.0
    for name, per_batch in seen.items():
        mu, var = ref.population(per_batch)
        worst = max(worst, np.max(np.abs(got[name]["var"] - var) / var))
        worst = max(worst, np.max(np.abs(got[name]["mean"] - mu) / np.sqrt(var)))
    return worst


def test_which_layers_hand_their_moments_over_from_the_kernel():
    assert kernel_writes_moments(nn.BatchNorm2d(3))
    assert kernel_writes_moments(nn.SyncBatchNorm(3))  # no process group: torch's kernel
    assert kernel_writes_moments(bt.BatchNorm1d(3, estimator=bnstats.CumulativeAverage()))
    assert not kernel_writes_moments(nn.BatchNorm1d(3).half())
    assert not kernel_writes_moments(nn.LazyBatchNorm1d())

    class OwnForward(nn.BatchNorm1d):
        def forward(self, x):
            return super().forward(x) * 1.0

    assert not kernel_writes_moments(OwnForward(3))


@pytest.mark.parametrize("name", ["resnet", "mlp"])
def test_kernel_and_update_stats_paths_agree_to_float32_rounding(name):
    model, data = zoo.build(name), zoo.batches(name)
    kernel = collect_moments(model, data, PassOptions())
    exact = collect_moments(model, data, PassOptions(float64_moments=True))
    for layer, measured in kernel.layers.items():
        moments, other = measured.population, exact.layers[layer].population
        assert moments.count == other.count
        assert measured.batches == exact.layers[layer].batches
        scale = other.var.sqrt()
        assert torch.allclose(moments.mean / scale, other.mean / scale, rtol=0, atol=1e-6)
        assert torch.allclose(moments.var, other.var, rtol=1e-6, atol=0)


def test_more_batches_than_one_group_are_merged_exactly():
    model = scramble_batchnorm(mlp((4, 6, 3)))
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(int(n), 4, generator=gen) * 3 + 5 for n in torch.randint(2, 9, (150,))]
    seen = ref.bn_inputs(model, data)
    bt.recalibrate(model, data)
    assert _population_errors(model, seen) < 2e-6
    assert int(model[1].num_batches_tracked) == 150


def test_non_finite_buffers_before_the_pass_do_not_leak_into_the_result():
    clean, data = zoo.build("mlp"), zoo.batches("mlp")
    broken = copy.deepcopy(clean)
    with torch.no_grad():
        broken[1].running_mean[0] = float("nan")
        broken[1].running_var[1] = float("inf")
    bt.recalibrate(clean, data)
    bt.recalibrate(broken, data)
    assert ref.same_state(broken, ref.snapshot(clean))


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_a_non_finite_batch_in_a_bnstats_layer_raises_and_writes_nothing(policy):
    estimator = bnstats.EMA(0.1, nonfinite=policy)
    model, data = bt.convert(zoo.build("mlp"), estimator), zoo.batches("mlp")
    data[1][0, 0] = float("nan")
    saved = ref.snapshot(model)
    with pytest.raises(bnstats.NonFiniteStatisticsError, match="BN layer '1'"):
        bt.recalibrate(model, data)
    assert ref.same_state(model, saved)
    assert all("_pass_weight" not in m.__dict__ for m in model.modules())


def test_momenta_and_switches_are_put_back_also_on_error():
    model = bt.convert(zoo.build("resnet"), bnstats.EMA(0.05))
    plain = zoo.build("resnet")
    plain.stem[1].momentum = None
    data = zoo.batches("resnet")

    def fails(m, batch):
        m(batch)
        raise RuntimeError("stop")

    for target in (model, plain):
        saved = ref.snapshot(target)
        with pytest.raises(RuntimeError, match="stop"):
            bt.recalibrate(target, data, forward=fails)
        assert ref.same_state(target, saved)
    assert plain.stem[1].momentum is None and plain.stages[0][0].bn1.momentum == 0.1
    assert all(
        m.estimator.momentum == 0.05 for m in model.modules() if isinstance(m, bt.BatchNorm2d)
    )
    assert all("_pass_weight" not in m.__dict__ for m in model.modules())


def test_a_bnstats_layer_trains_as_before_after_a_pass():
    layer = bt.BatchNorm1d(3, estimator=bnstats.EMA(0.1, debias=True))
    twin = copy.deepcopy(layer)
    x = torch.randn(8, 3)
    bt.recalibrate(layer, [x])
    twin.load_state_dict(layer.state_dict())
    layer.train()
    twin.train()
    assert torch.equal(layer(x), twin(x))
    assert ref.same_state(layer, ref.snapshot(twin))


@pytest.mark.parametrize("estimator", [bnstats.EMA(0.1, debias=True), bnstats.CumulativeAverage()])
def test_after_a_pass_the_next_training_step_counts_from_the_written_buffers(estimator):
    """recalibrate writes num_batches_tracked; a layer whose weight depends on the step must
    go on from there, exactly as a twin loaded from the same state dict."""
    layer = bt.BatchNorm1d(3, estimator=copy.deepcopy(estimator))
    gen = torch.Generator().manual_seed(2)
    bt.recalibrate(layer, [torch.randn(8, 3, generator=gen) for _ in range(5)])
    twin = bt.BatchNorm1d(3, estimator=copy.deepcopy(estimator))
    twin.load_state_dict(layer.state_dict())
    x = torch.randn(8, 3, generator=gen) * 2 + 1
    layer.train()(x)
    twin.train()(x)
    assert ref.same_state(layer, ref.snapshot(twin))
    assert layer.estimator.num_batches_tracked == 6


# -- batches left out for NaN never spread into the statistics -------------------------------


def _nan_batches(layout: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The batches and the finite ones among them: ``leading``, 64 NaN batches (one whole
    group) then 10 finite ones; ``aligned``, 64 finite, 64 NaN, 3 finite; ``tolerance``, 16
    NaN then 100 finite."""
    gen = torch.Generator().manual_seed(3)

    def good(count: int) -> list[torch.Tensor]:
        return [torch.randn(8, 4, generator=gen) * 2 + 1 for _ in range(count)]

    bad = [torch.full((8, 4), float("nan"))]
    if layout == "leading":
        return bad * 64 + good(10), []
    if layout == "aligned":
        first, last = good(64), good(3)
        return first + bad * 64 + last, first + last
    return bad * 16 + good(100), []


@pytest.mark.parametrize(
    ("layout", "options"),
    [
        ("leading", {}),
        ("leading", {"float64_moments": True}),
        ("leading", {"mode": "eval"}),
        ("aligned", {}),
        ("aligned", {"mode": "eval"}),
        ("tolerance", {"tolerance": 0.2}),
    ],
)
def test_whole_groups_of_nan_batches_are_left_out_under_skip(layout, options):
    """A group of 64 batches with no finite one (the pass merges 64 at a time) weighs
    nothing: the statistics are those of the finite batches alone, as torch computes them."""
    model = scramble_batchnorm(
        mlp((4, 6, 5, 3)) if options.get("mode") != "eval" else mlp((4, 6, 3))
    )
    batches, finite = _nan_batches(layout)
    with pytest.warns(UserWarning, match="left out for NaN or Inf"):
        report = bt.recalibrate_report(model, batches, nonfinite="skip", **options)
    used = [x for x in batches[: report.batches] if bool(torch.isfinite(x).all())]
    assert used == finite or not finite
    assert _population_errors(model, ref.bn_inputs(model, used)) < 1e-6
    assert int(model[1].num_batches_tracked) == len(used)  # batches left out not counted
    if "tolerance" in options:
        assert report.met and report.batches < len(batches)


def test_audit_compares_with_the_finite_batches_after_a_whole_group_of_nan():
    model = scramble_batchnorm(mlp((4, 6, 5, 3)))
    batches, _ = _nan_batches("leading")
    report = bt.audit(model, batches)
    seen = ref.bn_inputs(model, batches[64:])
    for layer in report.layers:
        mu, var = ref.population(seen[layer.name])
        np.testing.assert_allclose(layer.population_mean, mu, rtol=0, atol=1e-6 * var.max() ** 0.5)
        assert layer.mean_shift.worst is not None and np.isfinite(layer.mean_shift.worst)
        assert "nonfinite_population_stats" in layer.flags


def test_a_layer_whose_every_batch_is_nan_is_named_under_skip():
    model = mlp((4, 6, 3))
    saved = ref.snapshot(model)
    with pytest.raises(bnstats.NonFiniteStatisticsError, match="BN layer '1': all 70 batches"):
        bt.recalibrate(model, [torch.full((8, 4), float("nan"))] * 70, nonfinite="skip")
    assert ref.same_state(model, saved)
