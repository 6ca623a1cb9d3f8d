"""convert: all or nothing, what it says it converted and left, keep_momentum; and no state
left behind by a failed pass in bnstats' own layers."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import nn

import bnstats
import bnstats.torch as bt
from tests.torch import reference as ref
from tests.torch import timm_patterns as timm
from tests.torch import zoo


def test_an_uninitialized_lazy_layer_anywhere_leaves_every_layer_as_it_was():
    model = nn.Sequential(nn.BatchNorm1d(3), nn.LazyBatchNorm1d())
    first = model[0]
    with pytest.raises(ValueError, match="'1' is an uninitialized LazyBatchNorm1d"):
        bt.convert(model, bnstats.EMA(0.1))
    assert model[0] is first and type(model[0]) is nn.BatchNorm1d


class _InterruptOnThirdSwap(dict):
    """A module's children that raise KeyboardInterrupt at the third assignment anywhere."""

    swaps: list[str] = []

    def __setitem__(self, key: str, value: nn.Module) -> None:
        type(self).swaps.append(key)
        if len(type(self).swaps) == 3:
            raise KeyboardInterrupt
        super().__setitem__(key, value)


def test_an_interrupt_while_applying_undoes_every_swap(monkeypatch):
    model = zoo.build("resnet")
    layers = dict(model.named_modules())
    plan = bt.plan_conversion(model, bnstats.EMA(0.1))
    assert len(plan._steps) == 6
    _InterruptOnThirdSwap.swaps = []
    for parent, _, _ in plan._steps:
        parent._modules = _InterruptOnThirdSwap(parent._modules)
    module = sys.modules["bnstats.torch.convert"]  # the package exports the function
    monkeypatch.setattr(module, "plan_conversion", lambda *args, **kwargs: plan)
    with pytest.raises(KeyboardInterrupt):
        bt.convert(model, bnstats.EMA(0.1))
    assert all(model.get_submodule(name) is module for name, module in layers.items() if name)
    assert not any(isinstance(m, bt.BatchNorm2d) for m in model.modules())


def test_the_plan_names_what_is_replaced_retuned_and_left():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        timm.BatchNormAct2d(8),
        bt.GhostBatchNorm2d(8, ghost_size=2),
        nn.SyncBatchNorm(8),
    )
    plan = bt.plan_conversion(model, bnstats.EMA(0.1))
    assert plan.replaced == ["1"] and plan.retuned == ["3"]
    assert set(plan.left) == {"2", "4"}
    assert type(model[1]) is nn.BatchNorm2d  # planning changes nothing
    with pytest.warns(UserWarning, match="left BN layer\\(s\\) as they are: '2': BatchNormAct2d"):
        bt.convert(model, bnstats.EMA(0.1, debias=True))
    assert type(model[1]) is bt.BatchNorm2d and model[3].estimator.debias


class _Aliased(nn.Module):
    """A BN held by one parent under two names, the forward calling the alias."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(3, momentum=None)
        self.norm = self.bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


def test_a_layer_under_two_names_of_one_parent_becomes_one_new_layer_under_both():
    torch_model = _Aliased()
    model = bt.convert(copy.deepcopy(torch_model), bnstats.CumulativeAverage())
    assert type(model.bn) is bt.BatchNorm1d and model.norm is model.bn
    for _ in range(3):
        x = torch.randn(8, 3)
        torch_model(x), model(x)
    assert ref.same_state(model, ref.snapshot(torch_model))


def test_keep_momentum_keeps_each_layers_own():
    model = nn.Sequential(nn.BatchNorm1d(3, momentum=0.0003), nn.BatchNorm1d(3, momentum=None))
    bt.convert(model, bnstats.EMA(0.1, debias=True), keep_momentum=True)
    assert model[0].momentum == 0.0003 and model[0].estimator.debias
    assert isinstance(model[1].estimator, bnstats.CumulativeAverage)
    other = nn.Sequential(nn.BatchNorm1d(3, momentum=0.0003))
    bt.convert(other, bnstats.EMA(0.1))
    assert other[0].momentum == 0.1


@pytest.mark.parametrize(
    "estimator", [bnstats.EMA(0.1, nonfinite="skip"), bnstats.CumulativeAverage()]
)
def test_keep_momentum_keeps_statistics_that_never_move(estimator):
    torch_model = nn.Sequential(nn.BatchNorm1d(3, momentum=0.2), nn.BatchNorm1d(3, momentum=0.0))
    assert bt.plan_conversion(torch_model, estimator, keep_momentum=True).replaced == ["0", "1"]
    model = bt.convert(copy.deepcopy(torch_model), estimator, keep_momentum=True)
    assert model[1].momentum == 0.0 and model[1].estimator.nonfinite == estimator.nonfinite
    for _ in range(3):
        x = torch.randn(8, 3)
        torch_model(x), model(x)
    assert ref.same_state(model[1], ref.snapshot(torch_model[1]))


class _InverseSqrt(bnstats.stats.RunningAverage):
    def weight(self, t):
        return 1 / t**0.5


def test_keep_momentum_keeps_a_bnstats_layers_own_schedule():
    model = nn.Sequential(bt.BatchNorm1d(3, estimator=_InverseSqrt()), bt.BatchNorm1d(3))
    bt.convert(model, bnstats.EMA(0.2), keep_momentum=True)
    assert type(model[0].estimator) is _InverseSqrt and model[1].momentum == 0.1


def test_a_failed_float64_pass_leaves_no_skip_count_in_bnstats_layers():
    model = bt.convert(zoo.build("mlp"), bnstats.EMA(0.1, nonfinite="skip"))
    data = zoo.batches("mlp")
    data[1] = data[1].clone()
    data[1][0, 0] = float("nan")
    saved = ref.snapshot(model)
    with pytest.raises(bnstats.NonFiniteStatisticsError, match="batch 1"):
        bt.recalibrate(model, data, float64_moments=True)
    assert ref.same_state(model, saved)
    assert all(
        int(m.num_batches_skipped) == 0 for m in model.modules() if isinstance(m, bt.BatchNorm1d)
    )


def test_a_failed_pass_leaves_batch_renorms_last_correction_as_it_was():
    layer = bt.BatchRenorm1d(4)
    model = nn.Sequential(nn.Linear(3, 4), layer)
    model.train()
    model(torch.randn(8, 3))
    before = (layer.last_r.clone(), layer.last_d.clone())
    bad = torch.randn(8, 3)
    bad[0, 0] = float("nan")
    with pytest.raises(bnstats.NonFiniteStatisticsError):
        bt.recalibrate(model, [torch.randn(8, 3), bad])
    assert torch.equal(layer.last_r, before[0]) and torch.equal(layer.last_d, before[1])


def test_a_converted_model_recalibrates_like_the_original():
    original, data = zoo.build("resnet"), zoo.batches("resnet")
    converted = bt.convert(copy.deepcopy(original), bnstats.EMA(0.1, debias=True))
    bt.recalibrate(original, data)
    bt.recalibrate(converted, data)
    assert ref.same_state(converted, ref.snapshot(original))
