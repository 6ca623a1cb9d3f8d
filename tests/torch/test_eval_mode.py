"""recalibrate(mode="eval_exact"): each BN layer's input as eval-mode inference produces it."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import bnstats
import bnstats.torch as bt
from tests.torch import reference as ref
from tests.torch.models import TinyResNet, image_batches, mlp, scramble_batchnorm


def eval_mode_truth(model, batches):
    """Independent float64 reference: a float64 copy in eval mode; BN layers set one at a time
    in the order a forward reaches them, each to the mean and unbiased variance of its input
    (captured by a forward hook over all batches) with every earlier layer already set."""
    model = copy.deepcopy(model).double().eval()
    order = []
    hooks = [
        m.register_forward_pre_hook(lambda m, a: order.append(m) if m not in order else None)
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    with torch.no_grad():
        model(batches[0].double())
    for hook in hooks:
        hook.remove()
    names = {m: n for n, m in model.named_modules()}
    truth = {}
    for layer in order:
        seen: list[torch.Tensor] = []
        hook = layer.register_forward_pre_hook(
            lambda m, a, seen=seen: seen.append(a[0].detach().clone())
        )
        with torch.no_grad():
            for x in batches:
                model(x.double())
        hook.remove()
        values = torch.cat([x.transpose(0, 1).reshape(x.shape[1], -1) for x in seen], dim=1)
        mean, var = values.mean(dim=1), values.var(dim=1, correction=1)
        layer.running_mean.copy_(mean)
        layer.running_var.copy_(var)
        truth[names[layer]] = (mean.numpy(), var.numpy())
    return truth


def deep_mlp():
    torch.manual_seed(0)
    return scramble_batchnorm(mlp((12, 24, 20, 16, 20, 12, 4)), seed=1)


def small_cnn():
    torch.manual_seed(0)
    return scramble_batchnorm(TinyResNet(width=6), seed=2)


def mlp_batches(sizes=(16, 9, 16, 7)):
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(n, 12, generator=gen) * 1.5 + 0.4 for n in sizes]


@pytest.mark.parametrize(
    "build, data",
    [(deep_mlp, mlp_batches), (small_cnn, lambda: image_batches(sizes=[6, 3, 8, 5], seed=4))],
    ids=["deep_mlp", "small_cnn"],
)
def test_eval_mode_matches_layer_by_layer_float64_truth(build, data):
    model, batches = build(), data()
    modes = ref.modes(model)
    truth = eval_mode_truth(model, batches)
    train = bt.recalibrate(copy.deepcopy(model), batches)

    assert bt.recalibrate(model, batches, mode="eval_exact") is model

    got, train_got = ref.buffers(model), ref.buffers(train)
    assert set(got) == set(truth)
    differs = 0
    for name, (mean, var) in truth.items():
        np.testing.assert_allclose(got[name]["mean"], mean, rtol=0, atol=2e-6 * np.sqrt(var).max())
        np.testing.assert_allclose(got[name]["var"], var, rtol=2e-5)
        assert got[name]["tracked"] == len(batches)
        differs += not np.allclose(train_got[name]["var"], var, rtol=1e-3)
    assert differs > 0  # the two modes measure different things on these batches
    assert ref.modes(model) == modes


def test_batches_of_one_give_the_statistics_of_the_same_samples_batched():
    model = deep_mlp()
    batched = mlp_batches((8, 8, 8))
    ones = [row[None] for x in batched for row in x]
    whole = bt.recalibrate(copy.deepcopy(model), batched, mode="eval_exact")

    bt.recalibrate(model, ones, mode="eval_exact")

    for name, buffers in ref.buffers(model).items():
        np.testing.assert_allclose(buffers["mean"], ref.buffers(whole)[name]["mean"], atol=1e-6)
        np.testing.assert_allclose(buffers["var"], ref.buffers(whole)[name]["var"], rtol=1e-6)


def test_batches_of_one_image_of_varying_size():
    model = small_cnn()
    gen = torch.Generator().manual_seed(5)
    images = [torch.randn(1, 3, 8 + 2 * k, 10, generator=gen) for k in range(5)]
    truth = eval_mode_truth(model, images)

    bt.recalibrate(model, images, mode="eval_exact")

    for name, (_, var) in truth.items():
        np.testing.assert_allclose(ref.buffers(model)[name]["var"], var, rtol=2e-5)


def test_train_mode_refuses_batches_of_one_and_points_to_eval_mode():
    with pytest.raises(ValueError, match="mode='eval'"):
        bt.recalibrate(deep_mlp(), [torch.randn(1, 12)] * 3)


def test_levels_side_by_side_settle_in_one_pass():
    """The residual CNN's shortcut BN sits beside its branch: fewer passes than BN layers."""
    from bnstats.torch._measure import measure
    from bnstats.torch.options import PassOptions

    model = small_cnn()
    measured = measure(model, image_batches(), PassOptions(mode="eval_exact"), tool="recalibrate")
    levels = measured.passes - 1  # one pass per level, then the check pass
    assert levels < len(measured.layers)
    chain = measure(deep_mlp(), mlp_batches(), PassOptions(mode="eval_exact"), tool="recalibrate")
    assert chain.passes == len(chain.layers) + 1


@pytest.mark.parametrize("mode", ["eval", "eval_exact"])
def test_eval_mode_is_all_or_nothing_and_needs_reiterable_batches(mode):
    model = deep_mlp()
    saved = ref.snapshot(model)
    modes = ref.modes(model)
    bad = mlp_batches() + [torch.randn(4, 7)]
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        bt.recalibrate(model, bad, mode=mode)
    with pytest.raises(TypeError, match="one-shot"):
        bt.recalibrate(model, iter(mlp_batches()), mode=mode)
    assert ref.same_state(model, saved)
    assert ref.modes(model) == modes


@pytest.mark.parametrize(
    "mode, message", [("eval", "batch 1 \\(counting from 0\\)"), ("eval_exact", "1 of 4 batches")]
)
def test_nan_in_some_batches_raises_or_is_skipped_in_eval_mode(mode, message):
    batches = mlp_batches()
    batches[1] = batches[1].clone()
    batches[1][0, 0] = float("nan")
    model = deep_mlp()
    saved = ref.snapshot(model)
    with pytest.raises(bnstats.NonFiniteStatisticsError, match=message):
        bt.recalibrate(model, batches, mode=mode)
    assert ref.same_state(model, saved)
    with pytest.warns(UserWarning, match="left out for NaN"):
        bt.recalibrate(model, batches, mode=mode, nonfinite="skip")
    clean = [x for i, x in enumerate(batches) if i != 1]
    expected = bt.recalibrate(deep_mlp(), clean, mode="eval_exact")
    for name, buffers in ref.buffers(model).items():
        np.testing.assert_allclose(buffers["var"], ref.buffers(expected)[name]["var"], rtol=1e-5)


def test_forward_option_and_dropout_before_bn():
    model = scramble_batchnorm(mlp((12, 20, 16, 4), dropout=0.5), seed=3)
    batches = [{"x": x} for x in mlp_batches()]
    truth = eval_mode_truth(model, [b["x"] for b in batches])

    bt.recalibrate(model, batches, mode="eval_exact", forward=lambda m, b: m(b["x"]))

    for name, (_, var) in truth.items():
        np.testing.assert_allclose(ref.buffers(model)[name]["var"], var, rtol=2e-5)


class _FedByItself(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.bn(self.linear(x)))


def test_a_layer_fed_by_its_own_output_fails_clearly_and_writes_nothing():
    model = _FedByItself()
    saved = ref.snapshot(model)
    with pytest.raises(ValueError, match="called 2 times per forward"):
        bt.recalibrate(model, [torch.randn(4, 5) for _ in range(3)], mode="eval_exact")
    assert ref.same_state(model, saved)


def test_a_layer_used_twice_on_independent_inputs_pools_both_as_in_train_mode():
    from tests.torch.extra_models import SharedBatchNorm

    torch.manual_seed(0)
    model = SharedBatchNorm()
    data = image_batches(sizes=[5, 8, 6], shape=(6,))
    train = bt.recalibrate(copy.deepcopy(model), data)
    bt.recalibrate(model, data, mode="eval_exact")
    np.testing.assert_allclose(model.bn.running_var, train.bn.running_var, rtol=1e-6)


def _nan_stopped(stop):
    """Linear, BN, ``stop`` (an operation that turns NaN into numbers), Linear, BN."""
    torch.manual_seed(0)
    return scramble_batchnorm(
        nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), stop, nn.Linear(5, 4), nn.BatchNorm1d(4)),
        seed=3,
    )


class _Sign(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sign(x)


class _NanToNum(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nan_to_num(x)


@pytest.mark.parametrize("stop", [_Sign, _NanToNum])
def test_a_dependence_no_nan_shows_fails_eval_exact_and_eval_mode_measures_it(stop):
    """``sign`` or ``nan_to_num`` between two BN layers hides the second's dependence from the
    NaN of eval_exact's first level; its check pass sees the statistics move and refuses,
    writing nothing, and mode="eval" gets the level-by-level float64 truth."""
    model = _nan_stopped(stop())
    data = [torch.randn(8, 6) * 2 + 1 for _ in range(4)]
    saved = ref.snapshot(model)
    with pytest.raises(ValueError, match="eval_exact.*BN layer '4' moves by .*sign, nan_to_num"):
        bt.recalibrate(model, data, mode="eval_exact")
    assert ref.same_state(model, saved)
    truth = eval_mode_truth(model, data)
    bt.recalibrate(model, data, mode="eval")
    for name, (mean, var) in truth.items():
        layer = model.get_submodule(name)
        np.testing.assert_allclose(layer.running_mean.numpy(), mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(layer.running_var.numpy(), var, rtol=1e-5)


@pytest.mark.parametrize("mode", ["eval", "eval_exact"])
def test_one_value_per_channel_over_all_the_data_names_the_layer(mode):
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    saved = ref.snapshot(model)
    with pytest.raises(ValueError, match="BN layer '1' received 1 value per channel over all"):
        bt.recalibrate(model, [torch.randn(1, 3)], mode=mode)
    assert ref.same_state(model, saved)
