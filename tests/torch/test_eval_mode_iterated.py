"""mode="eval" in four whole-model passes against the exact level-by-level statistics
(mode="eval_exact"), and what the whole-model passes reach that level by level cannot."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import bnstats.torch as bt
from tests.torch import eval_models
from tests.torch import reference as ref


def worst_difference(model: nn.Module, exact: nn.Module) -> float:
    """Worst channel over all layers: |d var| / var and |d mean| / sqrt(var)."""
    got, want = ref.buffers(model), ref.buffers(exact)
    worst = 0.0
    for name, buffers in want.items():
        var = buffers["var"].astype(np.float64)
        d_var = np.abs(got[name]["var"] - var) / var
        d_mean = np.abs(got[name]["mean"] - buffers["mean"]) / np.sqrt(var)
        worst = max(worst, float(d_var.max()), float(d_mean.max()))
    return worst


@pytest.mark.parametrize("name", ["residual", "dense"])
def test_four_passes_reach_the_exact_statistics(name, without_one_batch):
    model, data = eval_models.build(name), eval_models.batches(name)
    exact = bt.recalibrate_report(copy.deepcopy(model), data, mode="eval_exact")
    train = bt.recalibrate(copy.deepcopy(model), data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = bt.recalibrate_report(model, data, mode="eval")

    assert exact.passes > 4 and result.passes == 4 and result.converged
    assert set(result.moved) == set(ref.buffers(model)) and max(result.moved.values()) <= 1e-4
    assert worst_difference(model, exact.model) < 1e-4
    assert worst_difference(train, exact.model) > 1e-3  # the modes differ on these batches
    assert "converged" in str(result)


@pytest.mark.parametrize("name", ["chain", "convchain"])
def test_a_deep_chain_iterates_until_the_passes_stop_moving(name, monkeypatch, without_one_batch):
    """30-deep chains at random weights: the eval-mode statistics are chaotic functions of
    the earlier layers' (the MLP chain's train mode is 0.75 away); four passes do not
    converge (benchmarks/eval_iterations.py: nor do the other iterations tried), so, with
    no late subset (test_subset_iteration.py), the fixed passes go on, each making one more
    depth level exact, until the last moves no layer by more than 1e-4: fewer passes than
    level by level, within 1e-4 of its result."""
    monkeypatch.setattr("bnstats.torch._subset_choice.LATE_MOST", math.inf)
    size = 64 if name == "chain" else 16
    model, data = eval_models.build(name), eval_models.batches(name, count=16, size=size)
    exact = bt.recalibrate_report(copy.deepcopy(model), data, mode="eval_exact")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = bt.recalibrate_report(model, data, mode="eval")
    assert exact.passes == 30 + 1 and 4 < result.passes < 30 and result.converged  # + check
    assert max(result.moved.values()) <= 1e-4
    assert worst_difference(model, exact.model) < 1e-4


@pytest.mark.parametrize("name", ["convchain", "residual", "dense"])
def test_passes_run_to_a_standstill_give_the_level_by_level_statistics_bit_for_bit(
    name, monkeypatch
):
    """Each fixed pass makes one more depth level of the BN layers exact: asked to go on
    until a pass moves nothing at all, the passes end with mode="eval_exact"'s statistics,
    bit for bit, after at most one pass more than it takes."""
    monkeypatch.setattr("bnstats.torch._eval_statistics.EVAL_TARGET", 0.0)
    model, data = eval_models.build(name), eval_models.batches(name, count=8, size=16)
    exact = bt.recalibrate_report(copy.deepcopy(model), data, mode="eval_exact")

    result = bt.recalibrate_report(model, data, mode="eval")

    assert result.converged and max(result.moved.values()) == 0.0
    assert result.passes <= exact.passes + 1
    assert worst_difference(model, exact.model) == 0.0


def test_passes_whose_deep_layers_overflow_on_the_way_still_converge():
    """20 Linear+BN+ReLU layers with weights 3x torch's default and batches of 2: the
    batch-statistics start is far off, and the passes that normalize with it overflow to
    Inf beyond the levels already exact. Those batches are left out of those passes only;
    the passes go on, and the converged one (finite, held to nonfinite="raise") is within
    1e-4 of level by level."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(20):
        linear = nn.Linear(8, 8)
        with torch.no_grad():
            linear.weight.mul_(3.0)
        layers += [linear, nn.BatchNorm1d(8), nn.ReLU()]
    model = nn.Sequential(*layers)
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(2, 8, generator=gen) for _ in range(4)]
    exact = bt.recalibrate_report(copy.deepcopy(model), data, mode="eval_exact")

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = bt.recalibrate_report(model, data, mode="eval")

    assert result.converged and result.passes <= exact.passes + 1
    assert worst_difference(model, exact.model) < 1e-4


class _FedByItself(nn.Module):
    """One BN layer called twice, the second call's input computed from the first call's
    output: its statistics depend on themselves, no depth level settles them."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.bn = nn.Linear(4, 4), nn.Linear(4, 4), nn.BatchNorm1d(4)
        with torch.no_grad():
            self.b.weight.mul_(5.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.b(torch.relu(self.bn(self.a(x)))))


def test_passes_that_never_settle_warn_and_fall_back_to_level_by_level():
    """More passes than the BN layers could need (4 + one per layer + 1) without converging:
    a warning, then level by level, which names the layer it cannot order; nothing written."""
    torch.manual_seed(0)
    model = _FedByItself()
    data = [torch.randn(16, 4) for _ in range(6)]
    saved = ref.snapshot(model.bn)
    with (
        pytest.warns(UserWarning, match="did not converge in 6 passes"),
        pytest.raises(ValueError, match="'bn' is called 2 times per forward"),
    ):
        bt.recalibrate(model, data, mode="eval")
    assert ref.same_state(model.bn, saved)


class _Branching(nn.Module):
    """Data-dependent control flow after a BN layer (issue 23.13)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 4)
        self.bn1, self.bn2, self.bn3 = nn.BatchNorm1d(4), nn.BatchNorm1d(4), nn.BatchNorm1d(4)
        with torch.no_grad():
            self.bn1.bias.fill_(1.0)  # at eval mode the output's mean is about 1: bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn1(self.linear(x))
        return self.bn2(y) if y.mean() > 0 else self.bn3(-y)


def eval_inputs(model: nn.Module, layer: nn.Module, data: list[torch.Tensor]) -> torch.Tensor:
    """What ``layer`` receives in eval-mode inference of ``model`` over ``data``."""
    seen: list[torch.Tensor] = []
    hook = layer.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    model.eval()
    with torch.no_grad():
        for x in data:
            model(x)
    hook.remove()
    return torch.cat(seen)


def test_data_dependent_control_flow_reaches_what_inference_reaches():
    torch.manual_seed(0)
    model = _Branching()
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(16, 5, generator=gen) for _ in range(6)]
    saved_bn3 = ref.snapshot(model.bn3)
    with pytest.raises(ValueError, match="no forward reached BN layer\\(s\\) 'bn3'"):
        bt.recalibrate(copy.deepcopy(model), data, mode="eval")

    bt.recalibrate(model, data, mode="eval", unreached="keep")

    seen = eval_inputs(model, model.bn2, data)  # with the new statistics of bn1
    np.testing.assert_allclose(model.bn2.running_mean, seen.mean(0), atol=1e-6)
    np.testing.assert_allclose(model.bn2.running_var, seen.var(0), rtol=1e-5)
    first = eval_inputs(model, model.bn1, data)
    np.testing.assert_allclose(model.bn1.running_var, first.var(0), rtol=1e-5)
    assert ref.same_state(model.bn3, saved_bn3)


class _MadeLate(nn.Module):
    """A BN layer created by the first forward (issue 23.4)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "late"):
            self.late = nn.BatchNorm1d(4)
        return self.late(torch.relu(self.bn(self.linear(x))) * 2.0 + 1.0)


def test_a_layer_made_by_the_first_forward_is_measured_in_eval_mode():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2)
    data = [torch.randn(16, 5, generator=gen) for _ in range(5)]
    model = _MadeLate()

    bt.recalibrate(model, data, mode="eval")

    assert torch.isfinite(model.late.running_mean).all()
    seen = eval_inputs(model, model.late, data)
    np.testing.assert_allclose(model.late.running_mean, seen.mean(0), atol=1e-6)
    np.testing.assert_allclose(model.late.running_var, seen.var(0), rtol=1e-5)


def test_a_layer_made_by_the_first_forward_is_refused_level_by_level():
    gen = torch.Generator().manual_seed(2)
    data = [torch.randn(16, 5, generator=gen) for _ in range(5)]
    model = _MadeLate()
    saved = ref.snapshot(model)
    with pytest.raises(ValueError, match="'late' were created during a forward"):
        bt.recalibrate(model, data, mode="eval_exact")
    state = model.state_dict()
    assert all(torch.equal(ref.bits(state[key]), ref.bits(value)) for key, value in saved.items())
    assert torch.isfinite(model.late.running_mean).all() and not model.late.running_mean.any()


def test_tolerance_stops_the_first_pass_and_the_others_use_the_same_batches(without_one_batch):
    model, data = eval_models.build("dense"), eval_models.batches("dense", count=64, size=8)
    seen: list[int] = []

    def forward(m, x):
        seen.append(id(x))
        return m(x)

    result = bt.recalibrate_report(model, data, mode="eval", tolerance=0.5, forward=forward)
    assert result.batches < 64
    assert len(seen) == 5 * result.batches  # four passes, the third one runs each batch twice
    assert set(seen) == {id(x) for x in data[: result.batches]}


def test_a_tolerance_stop_reports_the_errors_it_judged():
    """The stop is judged on the first pass (batch statistics); the report gives that pass's
    relative errors, so ``met`` agrees with the stop and no "not met" warning follows."""
    model, data = eval_models.build("dense"), eval_models.batches("dense", count=64, size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = bt.recalibrate_report(model, data, mode="eval", tolerance=0.5)
    assert result.converged and result.met and result.batches < 64
    first = bt.recalibrate_report(  # train mode: the same statistics as the first pass
        eval_models.build("dense"), data[: result.batches]
    )
    assert result.relative_errors.keys() == first.relative_errors.keys()
    for name, error in result.relative_errors.items():
        assert error == pytest.approx(first.relative_errors[name], rel=1e-4)
    judged = bt.recalibrate_report(  # the same data, judged by the same tolerance
        eval_models.build("dense"), data[: result.batches], tolerance=0.5
    )
    assert result.miss_probability == pytest.approx(judged.miss_probability, rel=1e-4)
    assert result.miss_probability <= 0.05
