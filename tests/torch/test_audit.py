"""audit: per-layer distances from the truth, flags, report formats; the model untouched."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributions import Normal, kl_divergence

import bnstats.torch as bt
from bnstats.torch.audit import (
    CALLED_MORE_THAN_ONCE,
    MODEL_IN_TRAINING_MODE,
    NEAR_ZERO_POPULATION_VAR,
    NEVER_UPDATED,
    NONFINITE_POPULATION,
    NONFINITE_RUNNING,
    NONPOSITIVE_RUNNING_VAR,
    START_STILL_WEIGHS,
)
from tests.torch import reference as ref
from tests.torch import zoo
from tests.torch.extra_models import SharedBatchNorm, lazy_net
from tests.torch.models import image_batches, mlp, scramble_batchnorm


@pytest.mark.parametrize("name", ["resnet", "preact", "conv1d"])
def test_audit_changes_nothing(name):
    model = zoo.build(name)
    model.train()
    next(iter(model.children())).eval()
    saved, flags = ref.snapshot(model), ref.modes(model)
    momenta = [m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    bt.audit(model, zoo.batches(name))
    assert ref.same_state(model, saved)
    assert ref.modes(model) == flags
    assert momenta == [m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_metrics_match_their_definitions_against_torch_distributions():
    model, data = zoo.build("depthwise"), zoo.batches("depthwise")
    scramble_batchnorm(model, tracked=1000)  # long trained: the EMA's start weighs nothing
    seen = ref.bn_inputs(model, data)
    report = bt.audit(model.eval(), data)
    layers = dict(ref.bn_layers(model))
    assert [layer.name for layer in report.layers] == list(layers)
    for record in report.layers:
        bn = layers[record.name]
        mu, var = ref.population(seen[record.name])
        run_mean = bn.running_mean.double()
        run_var = bn.running_var.double()
        data_scale = torch.from_numpy(np.sqrt(var + bn.eps))
        kl = kl_divergence(
            Normal(torch.from_numpy(mu), data_scale), Normal(run_mean, (run_var + bn.eps).sqrt())
        ).numpy()
        shift = np.abs(run_mean.numpy() - mu) / data_scale.numpy()
        ratio = (run_var.numpy() + bn.eps) / (var + bn.eps)
        assert record.kl.mean == pytest.approx(kl.mean(), rel=1e-5)
        assert record.kl.worst == pytest.approx(kl.max(), rel=1e-5)
        assert record.kl.channel == int(np.argmax(kl))
        assert record.mean_shift.mean == pytest.approx(shift.mean(), rel=1e-5)
        assert record.mean_shift.worst == pytest.approx(shift.max(), rel=1e-5)
        worst_ratio = int(np.argmax(np.abs(np.log(ratio))))
        assert record.var_ratio.channel == worst_ratio
        assert record.var_ratio.worst == pytest.approx(ratio[worst_ratio], rel=1e-5)
        assert record.var_ratio.mean == pytest.approx(ratio.mean(), rel=1e-5)
        assert record.samples == len(np.concatenate(seen[record.name]))
        assert record.flags == []
    assert (
        report.flags == [] and report.batches == len(data) and report.samples == sum(map(len, data))
    )


def test_after_recalibrate_the_audit_finds_nothing_to_correct():
    model, data = zoo.build("resnet"), zoo.batches("resnet")
    before = bt.audit(model, data)
    bt.recalibrate(model, data)
    after = bt.audit(model, data)
    assert min(layer.kl.mean for layer in before.layers) > 1e-3
    assert max(layer.kl.worst for layer in after.layers) < 1e-9
    assert max(layer.mean_shift.worst for layer in after.layers) < 1e-5
    assert all(abs(layer.var_ratio.worst - 1) < 1e-5 for layer in after.layers)


def _by_name(report):
    return {layer.name: layer for layer in report.layers}


def test_flags_for_broken_buffers_and_worst_layers_first():
    torch.manual_seed(0)
    model = mlp((16, 12, 10, 8, 5)).eval()
    data = image_batches(sizes=[8, 8], shape=(16,))
    bt.recalibrate(model, data)
    with torch.no_grad():
        model[1].running_var[3] = float("nan")
        model[4].running_var[0] = -1.0
        model[7].reset_running_stats()
    report = bt.audit(model, data)
    layers = _by_name(report)
    assert NONFINITE_RUNNING in layers["1"].flags
    assert NONPOSITIVE_RUNNING_VAR in layers["4"].flags
    assert NEVER_UPDATED in layers["7"].flags
    assert [layer.name for layer in report.worst_first()][0] == "1"  # NaN counts as worst
    assert layers["1"].kl.channel == 3
    text = str(report)
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("layer"))
    rows = [line.split()[0] for line in lines[header + 1 :]]
    assert rows == [layer.name for layer in report.worst_first()]
    assert "nonfinite_running_stats" in text and "KL(N(population) || N(running))" in text
    decoded = json.loads(json.dumps(report.to_dict(per_channel=True), allow_nan=False))
    record = next(r for r in decoded["layers"] if r["name"] == "1")
    assert record["running_var"][3] is None and record["kl"]["worst"] is None


def test_never_updated_when_no_batch_was_tracked():
    model = mlp()
    report = bt.audit(model, [torch.randn(6, 16)])
    assert all(NEVER_UPDATED in layer.flags for layer in report.layers)


def test_an_old_checkpoint_without_a_count_is_not_never_updated():
    """Checkpoints from before torch 0.4.1 load with num_batches_tracked 0 and real
    statistics: the statistics decide, as in adapt."""
    model = mlp()
    bt.recalibrate(model, [torch.randn(6, 16), torch.randn(6, 16)])
    for layer in model.modules():
        if isinstance(layer, nn.BatchNorm1d):
            layer.num_batches_tracked.zero_()
    report = bt.audit(model, [torch.randn(6, 16)])
    assert not any(NEVER_UPDATED in layer.flags for layer in report.layers)


def test_near_zero_variance_channels_shared_modules_and_training_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4))
    with torch.no_grad():
        model[0].weight[2].zero_()  # channel 2 is the constant bias
    report = bt.audit(model.train(), [torch.randn(8, 5), torch.randn(8, 5)])
    layer = report.layers[0]
    assert layer.near_zero_var_channels == [2]
    assert NEAR_ZERO_POPULATION_VAR in layer.flags
    assert report.flags == [MODEL_IN_TRAINING_MODE]
    assert "model flags: model_in_training_mode" in str(report)

    shared = bt.audit(SharedBatchNorm().eval(), [torch.randn(8, 6)])
    assert shared.layers[0].calls_per_forward == 2
    assert CALLED_MORE_THAN_ONCE in shared.layers[0].flags
    assert shared.layers[0].samples == 16
    assert shared.flags == []


def test_non_finite_data_is_reported_not_raised():
    model, data = zoo.build("mlp"), zoo.batches("mlp")
    data[1][0, 0] = float("nan")
    report = bt.audit(model, data)
    assert NONFINITE_POPULATION in _by_name(report)["1"].flags
    json.dumps(report.to_dict(), allow_nan=False)


def test_uninitialized_lazy_layers_are_refused():
    model = lazy_net()
    with pytest.raises(ValueError, match="'1' is an uninitialized LazyBatchNorm2d"):
        bt.audit(model, [torch.randn(2, 3, 4, 4)])
    assert type(model[1]) is nn.LazyBatchNorm2d
    other = nn.Sequential(nn.LazyLinear(4), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match="module '0' is an uninitialized LazyLinear: it has no"):
        bt.audit(other, [torch.randn(2, 3)])


def test_an_ema_whose_start_still_weighs_is_flagged_and_a_recalibrated_layer_is_not():
    """After 5 updates at momentum 0.1 the initial 0 and 1 weigh 0.9**5 = 59 %: flagged. A
    layer recalibrated on other data has num_batches_tracked = 4 too, but its statistics are
    no blend of 0, 1 and the data: not flagged."""
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(16, 3, generator=gen) * 3 + 5 for _ in range(5)]
    young = nn.Sequential(nn.BatchNorm1d(3)).train()
    with torch.no_grad():
        for x in data:
            young(x)
    assert START_STILL_WEIGHS in bt.audit(young.eval(), data).layers[0].flags
    other = [torch.randn(16, 3, generator=gen) * 4 + 12 for _ in range(4)]  # not toward 0, 1
    recalibrated = bt.recalibrate(nn.Sequential(nn.BatchNorm1d(3)), other)
    assert START_STILL_WEIGHS not in bt.audit(recalibrated, data).layers[0].flags
    assert START_STILL_WEIGHS not in bt.audit(recalibrated, other).layers[0].flags
