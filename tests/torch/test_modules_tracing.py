"""bnstats' BN modules under compilers and tracers, which refuse any host read of a device
value: the CPU-side proof that a training step never stalls a GPU. Also the non-finite
protection and the debiased EMA over many steps."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import bnstats
import bnstats.torch as bt
from tests.torch import reference as ref
from tests.torch import zoo

ESTIMATORS = {
    "ema": bnstats.EMA(0.1),
    "debiased": bnstats.EMA(0.1, debias=True),
    "cumulative": bnstats.CumulativeAverage(),
    "skip": bnstats.EMA(0.1, nonfinite="skip"),
}


def _converted(estimator: bnstats.EMA) -> nn.Module:
    return bt.convert(zoo.build("resnet"), copy.deepcopy(estimator)).train()


def _batches(n: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randn(4, 3, 10, 10, generator=gen) * 2 + 1 for _ in range(n)]


@pytest.mark.parametrize("kind", sorted(ESTIMATORS))
def test_symbolic_trace_gives_the_same_outputs_and_statistics(kind):
    eager = _converted(ESTIMATORS[kind])
    traced = torch.fx.symbolic_trace(copy.deepcopy(eager))
    for x in _batches():
        torch.testing.assert_close(traced(x), eager(x), rtol=1e-5, atol=1e-5)
    traced_state = {**dict(traced.named_parameters()), **dict(traced.named_buffers())}
    for key, value in ref.snapshot(eager).items():
        torch.testing.assert_close(traced_state[key], value, rtol=1e-6, atol=1e-6)
    eager.eval()  # a graph holds one mode: trace the eval model on its own
    traced_eval = torch.fx.symbolic_trace(copy.deepcopy(eager))
    torch.testing.assert_close(traced_eval(_batches(1)[0]), eager(_batches(1)[0]))


@pytest.mark.parametrize("kind", ["ema", "debiased", "cumulative"])
def test_compile_fullgraph_trains_to_the_same_statistics_as_eager(kind):
    eager = _converted(ESTIMATORS[kind])
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="eager")
    for x in _batches(4):
        compiled(x)
        eager(x)
    for key, value in ref.snapshot(eager).items():
        torch.testing.assert_close(compiled_model.state_dict()[key], value, rtol=1e-6, atol=1e-6)


def test_export_in_training_mode_keeps_the_buffer_updates():
    model = _converted(ESTIMATORS["debiased"])
    x = _batches(1)[0]
    exported = torch.export.export(copy.deepcopy(model), (x,)).run_decompositions({})
    mutated = set(exported.graph_signature.buffers_to_mutate.values())
    assert {"stem.1.running_var", "stem.1.num_batches_tracked"} <= mutated
    replayed = copy.deepcopy(model)
    outputs = exported.module()(x)
    torch.testing.assert_close(outputs, replayed(x), rtol=1e-5, atol=1e-5)


@pytest.fixture(params=["checked on the host", "checked on the device"])
def check_path(request, monkeypatch):
    """Both ways a module protects its statistics: on the CPU the host reads the verdict;
    on other devices (a GPU) it stays on the device. The device path runs here on the CPU."""
    if request.param == "checked on the device":
        monkeypatch.setattr(bt.modules.EstimatorBatchNorm, "_host_checked_devices", ())
    return request.param


@pytest.mark.parametrize("kind", sorted(ESTIMATORS))
def test_both_check_paths_give_torchs_buffers(check_path, kind):
    ours = _converted(ESTIMATORS[kind])
    plain = zoo.build("resnet").train()
    if kind == "cumulative":
        for m in plain.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
    if kind == "debiased":
        pytest.skip("torch has no debiased EMA; see the formula test")
    for x in _batches(3):
        ours(x)
        plain(x)
    for key, value in ref.snapshot(plain).items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-6, atol=1e-7)


def test_a_nan_batch_under_skip_leaves_the_statistics_and_is_counted(check_path):
    layer = bt.BatchNorm1d(3, estimator=bnstats.EMA(0.1, debias=True, nonfinite="skip"))
    layer(torch.randn(8, 3))
    before = ref.snapshot(layer)
    bad = torch.randn(8, 3)
    bad[0, 0] = float("nan")
    layer(bad)
    assert ref.same_state(layer, before)
    assert int(layer.num_batches_skipped) == 1 and layer.estimator.num_batches_skipped == 1
    layer(torch.randn(8, 3))  # the host step followed: t = 2 again, not 3
    twin = bt.BatchNorm1d(3, estimator=bnstats.EMA(0.1, debias=True))
    twin.load_state_dict(before)
    gen_x = torch.randn(8, 3)
    a, b = copy.deepcopy(layer), copy.deepcopy(twin)
    a(gen_x)
    b(gen_x)
    assert int(a.num_batches_tracked) == int(b.num_batches_tracked) + 1


def test_a_nan_batch_under_raise_names_the_layer_within_the_step(check_path):
    model = bt.convert(zoo.build("mlp"), bnstats.EMA(0.1)).train()
    x = torch.randn(8, 16)
    x[0, 0] = float("inf")
    saved = ref.snapshot(model)
    with pytest.raises(bnstats.NonFiniteStatisticsError, match=r"BatchNorm1d\(32\) '1'"):
        model(x)
    assert ref.same_state(model, saved)


def test_the_debiased_ema_matches_its_formula_over_many_steps():
    """``v_t / (1 - (1 - m)**t)`` with ``v_t`` the EMA from 0, in float64, after 300 steps."""
    momentum, steps = 0.05, 300
    layer = bt.BatchNorm1d(2, estimator=bnstats.EMA(momentum, debias=True)).double()
    gen = torch.Generator().manual_seed(3)
    started_at_zero = np.zeros(2)
    for t in range(1, steps + 1):
        x = torch.randn(6, 2, generator=gen, dtype=torch.float64) * 3 + t / 50
        layer(x)
        started_at_zero = (1 - momentum) * started_at_zero + momentum * x.mean(0).numpy()
    expected = started_at_zero / (1 - (1 - momentum) ** steps)
    np.testing.assert_allclose(layer.running_mean.numpy(), expected, rtol=1e-10)
    assert layer.estimator.num_batches_tracked == steps


def test_state_dict_loading_resets_the_host_step():
    trained = bt.BatchNorm1d(3, estimator=bnstats.EMA(0.1, debias=True))
    for _ in range(5):
        trained(torch.randn(8, 3))
    fresh = bt.BatchNorm1d(3, estimator=bnstats.EMA(0.1, debias=True))
    fresh.load_state_dict(trained.state_dict())
    x = torch.randn(8, 3)
    trained(x)
    fresh(x)
    assert ref.same_state(fresh, ref.snapshot(trained))


@pytest.mark.parametrize("cls", ["ghost", "renorm"])
def test_convert_keeps_ghost_and_renorm_behaviour_and_follows_the_estimator(cls):
    """Issue: a model of GhostBatchNorm2d or BatchRenorm2d converted with EMA(0.1,
    debias=True) keeps its ghost/renorm behaviour and follows the estimator."""
    make = {
        "ghost": lambda: bt.GhostBatchNorm2d(3, ghost_size=2),
        "renorm": lambda: bt.BatchRenorm2d(
            3,
            schedule=bnstats.renorm.RenormSchedule(
                rmax=1.5, dmax=0.5, warmup_steps=0, rmax_full_at=0, dmax_full_at=0
            ),
        ),
    }[cls]
    model = nn.Sequential(nn.Conv2d(3, 3, 1), make()).train()
    converted = bt.convert(copy.deepcopy(model), bnstats.EMA(0.1, debias=True))
    assert type(converted[1]) is type(model[1])
    x = torch.randn(6, 3, 4, 4) * 2 + 3
    converted(x)
    layer = converted[1]
    z = model[0](x).detach()
    if cls == "ghost":  # three virtual batches, debiased: w_1 = 1, then the weights of t = 2, 3
        parts = z.split(2)
        reference = bnstats.EMA(0.1, debias=True)
        for part in parts:
            var, mean = torch.var_mean(part.double(), dim=(0, 2, 3), correction=0)
            reference.update(mean, var, part.numel() // 3)
        torch.testing.assert_close(
            layer.running_mean.double(), reference.mean, rtol=1e-5, atol=1e-6
        )
        assert int(layer.num_batches_tracked) == 3
    else:  # first batch of a debiased EMA: the batch's own statistics, exactly
        torch.testing.assert_close(layer.running_mean, z.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
        assert layer.last_r is not None


class InverseSqrt(bnstats.stats.RunningAverage):
    """A schedule no code special-cases: ``w_t = 1 / sqrt(t)``, written for an int or a
    tensor step."""

    def weight(self, t):
        return 1 / t**0.5


class Half(bnstats.stats.RunningAverage):
    """A constant schedule of its own: ``w_t = 0.5``."""

    starts_at_zero_one = True
    weight_depends_on_step = False

    def weight(self, t):
        return 0.5


@pytest.mark.parametrize("schedule", [InverseSqrt, Half])
def test_a_custom_estimator_trains_alike_eager_compiled_and_traced(schedule):
    eager = bt.convert(zoo.build("resnet"), schedule()).train()
    compiled_model, traced_model = copy.deepcopy(eager), copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="eager")
    traced = torch.fx.symbolic_trace(traced_model)
    for x in _batches(4):
        for model in (eager, compiled, traced):
            model(x)
    expected = ref.snapshot(eager)
    for state in (compiled_model.state_dict(), traced.state_dict()):
        for key, value in expected.items():
            torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-6)


def test_a_custom_estimator_gives_its_own_weights_eagerly():
    layer = bt.BatchNorm1d(2, estimator=InverseSqrt())
    xs = [torch.randn(5, 2, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    mean = torch.zeros(2, dtype=torch.float64)
    for t, x in enumerate(xs, start=1):
        layer(x)
        w = 1 / t**0.5
        mean = (1 - w) * mean + w * x.double().mean(0)
    torch.testing.assert_close(layer.running_mean.double(), mean, rtol=1e-6, atol=1e-7)
    assert layer.estimator.num_batches_tracked == 3
    torch.testing.assert_close(layer.estimator.mean, layer.running_mean)
