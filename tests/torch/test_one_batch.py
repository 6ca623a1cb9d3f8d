"""mode="eval" on data small enough to run as one batch (bnstats.torch._one_batch): the
level-by-level statistics (mode="eval_exact") in one forward, checked by one whole pass."""

from __future__ import annotations

import collections
import copy
import warnings

import pytest
import torch
from torch import nn

import bnstats.torch as bt
from bnstats import _one_batch
from bnstats.torch import _subset_choice
from bnstats.torch._one_batch import join_batches
from tests.torch import eval_models
from tests.torch.test_eval_mode_iterated import worst_difference


@pytest.mark.parametrize(
    ("name", "count", "size"),
    [("chain", 16, 64), ("convchain", 16, 16), ("residual", 8, 16), ("dense", 8, 16)],
)
def test_small_data_reach_the_level_by_level_statistics_in_three_passes(name, count, size):
    """The batch-statistics pass, the one-batch forward, one fixed pass that moves no layer
    by more than 1e-4: three passes whatever the depth (30 levels for the chains, whose
    whole passes alone take 25-31), within 1e-4 of level by level."""
    model, data = eval_models.build(name), eval_models.batches(name, count, size)
    exact = eval_models.level_by_level(name, count, size)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = bt.recalibrate_report(model, data, mode="eval")

    assert result.converged and result.passes == 3 < exact.passes
    assert result.subset_passes == 0 and max(result.moved.values()) <= 1e-4
    assert worst_difference(model, exact.model) < 1e-4


def test_the_one_batch_normalizes_with_the_unbiased_variance():
    """Each call normalizes with its input's population: its unbiased variance, as eval mode
    does. With the biased one (training's rule) the 30-deep chain on 256 samples lands
    about 1 / 512 off, and the check pass would not converge."""
    model, data = eval_models.build("chain"), eval_models.batches("chain", 4, 64)
    exact = eval_models.level_by_level("chain", 4, 64)
    result = bt.recalibrate_report(model, data, mode="eval")
    assert result.passes == 3 and worst_difference(model, exact.model) < 1e-4


def test_large_data_whose_size_is_known_run_as_one_batch_after_the_subsets_pass(monkeypatch):
    """Data of enough subsets with a length: the subset's batch-statistics pass (64 samples
    here) estimates the largest BN input over all the data, which fits; the one-batch
    forward and one whole pass follow: two whole passes and one subset pass."""
    monkeypatch.setattr(_subset_choice, "SUBSET_SAMPLES", 64)
    monkeypatch.setattr(_subset_choice, "SUBSET_SHARE", 16)
    model, data = eval_models.build("chain"), eval_models.batches("chain", 64, 16)
    exact = eval_models.level_by_level("chain", 64, 16)
    result = bt.recalibrate_report(model, data, mode="eval")

    assert result.converged and result.passes == 2
    assert result.subset_passes == 1 and result.subset_batches == 4
    assert worst_difference(model, exact.model) < 1e-4


def largest_input_bytes(model: nn.Module, data: list[torch.Tensor]) -> int:
    """The largest BN input of ``model`` over all of ``data`` in bytes (float32), from one
    eval forward of all of it."""
    seen: list[int] = []
    hooks = [
        layer.register_forward_pre_hook(lambda m, a: seen.append(a[0].numel()))
        for layer in model.modules()
        if isinstance(layer, nn.modules.batchnorm._BatchNorm)
    ]
    with torch.no_grad():
        model.eval()(torch.cat(data))
    for hook in hooks:
        hook.remove()
    return max(seen) * 4


@pytest.mark.parametrize("spare", [0, -1])
@pytest.mark.parametrize("given", [True, False], ids=["one_batch_bytes", "default"])
def test_data_whose_largest_bn_input_is_over_the_budget_take_the_whole_passes(
    monkeypatch, spare, given
):
    """The budget bounds the largest BN input over the data (values per channel times
    channels times 4 bytes): at the budget the data run as one batch, a byte over they do
    not (whole passes, with the late subset, as before); ``one_batch_bytes=`` sets it, else
    the default."""
    model, data = eval_models.build("convchain"), eval_models.batches("convchain", 16, 16)
    limit = largest_input_bytes(model, data) + spare
    if given:
        result = bt.recalibrate_report(model, data, mode="eval", one_batch_bytes=limit)
    else:
        monkeypatch.setattr(_one_batch, "ONE_BATCH_BYTES", limit)
        result = bt.recalibrate_report(model, data, mode="eval")
    assert result.converged
    assert (result.passes == 3) == (spare == 0)


@pytest.mark.parametrize("bad", [-1, 2.5, "256MiB", True])
def test_one_batch_bytes_is_a_number_of_bytes(bad):
    model, data = eval_models.build("chain"), eval_models.batches("chain", 2, 4)
    with pytest.raises(ValueError, match="one_batch_bytes must be a number of bytes"):
        bt.recalibrate(model, data, mode="eval", one_batch_bytes=bad)


def test_a_budget_of_zero_never_runs_one_batch():
    model, data = eval_models.build("chain"), eval_models.batches("chain", 4, 16)
    assert bt.recalibrate_report(model, data, mode="eval").passes == 3
    assert bt.recalibrate_report(model, data, mode="eval", one_batch_bytes=0).passes > 3


class _TimeFirst(nn.Module):
    """Batches (time, samples, features): the samples are along the second dimension, so
    joining along the first makes longer sequences, not more samples."""

    def __init__(self) -> None:
        super().__init__()
        self.bn1, self.linear, self.bn2 = nn.BatchNorm1d(6), nn.Linear(6, 6), nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        summary = x.cumsum(0)[-1]  # each sample's sum over its sequence
        return self.bn2(self.linear(torch.relu(self.bn1(summary))))


def test_a_joined_batch_that_is_not_the_same_data_is_caught_by_the_check_pass():
    """Joining along the first dimension is wrong for this model; the one-batch forward's
    statistics are then not the fixed point, the check pass moves them, and whole passes go
    on to level by level's statistics."""
    torch.manual_seed(0)
    model = _TimeFirst()
    data = [torch.randn(5, 16, 6) + i for i in range(4)]
    exact = bt.recalibrate_report(copy.deepcopy(model), data, mode="eval_exact")
    result = bt.recalibrate_report(model, data, mode="eval")
    assert result.converged and result.passes > 3
    assert worst_difference(model, exact.model) < 1e-4


def test_max_samples_cuts_the_joined_batch_as_the_passes_cut_the_data():
    model, data = eval_models.build("residual"), eval_models.batches("residual", 8, 16)
    exact = bt.recalibrate_report(copy.deepcopy(model), data, mode="eval_exact", max_samples=70)
    result = bt.recalibrate_report(model, data, mode="eval", max_samples=70)
    assert result.passes == 3 and result.samples == 70
    assert worst_difference(model, exact.model) < 1e-4


Pair = collections.namedtuple("Pair", "image label")


BUDGET = 256 * 2**20


def test_batches_join_inside_tuples_lists_dicts_and_namedtuples():
    a, b = torch.arange(6.0).reshape(2, 3), torch.arange(6.0, 9.0).reshape(1, 3)
    assert torch.equal(join_batches([a, b], None, BUDGET), torch.cat([a, b]))
    joined = join_batches([(a, [a], {"x": a, "k": 3}), (b, [b], {"x": b, "k": 3})], None, BUDGET)
    assert torch.equal(joined[0], torch.cat([a, b])) and torch.equal(joined[1][0], joined[0])
    assert torch.equal(joined[2]["x"], joined[0]) and joined[2]["k"] == 3
    named = join_batches([Pair(a, a[:, 0]), Pair(b, b[:, 0])], None, BUDGET)
    assert isinstance(named, Pair) and named.label.tolist() == [0.0, 3.0, 6.0]
    assert join_batches([a, b, a], 4, BUDGET).shape == (4, 3)  # the third batch cut to one row


@pytest.mark.parametrize(
    "batches",
    [
        [torch.zeros(2, 3), torch.zeros(2, 4)],  # other trailing shapes (padded per batch)
        [torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64)],
        [(torch.zeros(2, 3), 1), (torch.zeros(2, 3), 2)],  # a part that differs
        [(torch.zeros(2, 3), ["a", "b"]), (torch.zeros(2, 3), ["c", "d"])],
        [{"x": torch.zeros(2, 3)}, {"y": torch.zeros(2, 3)}],
        [(torch.zeros(2, 3), object()), (torch.zeros(2, 3), object())],
        [],
    ],
)
def test_batches_that_do_not_join_are_left_to_the_whole_passes(batches):
    assert join_batches(batches, None, BUDGET) is None


def test_joined_inputs_over_the_budget_are_not_joined():
    limit = 4 * 12 * 4  # 4 rows of 12 float32
    assert join_batches([torch.zeros(2, 12)] * 2, None, limit) is not None
    assert join_batches([torch.zeros(2, 12)] * 3, None, limit) is None


def test_a_subset_that_fits_is_solved_in_one_forward_a_round(monkeypatch):
    """Data over the budget whose late subset fits (the conv chain's 1,024 samples hold a
    2 MiB largest BN input; its 4-batch subset an eighth of an MiB): each round's solve is
    one forward over the joined subset with the correction applied call by call, so a
    round costs two subset passes (the correction's and the solve's), not one per depth
    level; the same whole passes as solving by passes, within 1e-4 of level by level."""
    model, data = eval_models.build("convchain"), eval_models.batches("convchain", 64, 16)
    exact = eval_models.level_by_level("convchain", 64, 16)
    monkeypatch.setattr(_one_batch, "ONE_BATCH_BYTES", 0)
    by_passes = bt.recalibrate_report(copy.deepcopy(model), data, mode="eval")
    monkeypatch.setattr(_one_batch, "ONE_BATCH_BYTES", 2**20)
    result = bt.recalibrate_report(model, data, mode="eval")

    assert result.converged and result.subset_batches == 4
    rounds = result.passes - 4
    assert rounds >= 1 and result.subset_passes == 2 * rounds < by_passes.subset_passes
    assert result.passes <= by_passes.passes
    assert worst_difference(model, exact.model) < 1e-4


def test_a_subset_drawn_first_that_fits_is_solved_in_one_forward(monkeypatch):
    """Large data with a length, too large for one batch (budget 1 MiB against the conv
    chain's 2 MiB over 1,024 samples) and a subset of 64 samples that fits: the subset's
    batch-statistics pass, which finds that the budget takes more, the grown subset's (an
    eighth of the data: 128 samples, 8 batches), its own fixed point in one forward, then
    rounds of two subset passes each; within 1e-4 of level by level."""
    monkeypatch.setattr(_subset_choice, "SUBSET_SAMPLES", 64)
    monkeypatch.setattr(_subset_choice, "SUBSET_SHARE", 16)
    monkeypatch.setattr(_one_batch, "ONE_BATCH_BYTES", 2**20)
    model, data = eval_models.build("convchain"), eval_models.batches("convchain", 64, 16)
    exact = eval_models.level_by_level("convchain", 64, 16)
    result = bt.recalibrate_report(model, data, mode="eval")

    assert result.converged and result.subset_batches == 8
    assert result.subset_passes == 3 + 2 * (result.passes - 1)
    assert worst_difference(model, exact.model) < 1e-4


class _FixedBatch(nn.Module):
    """A model written for batches of 16 rows: ``view(16, ...)`` fails on any other size."""

    def __init__(self) -> None:
        super().__init__()
        self.chain = eval_models.mlp_chain(depth=6, width=8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.chain(x.view(16, 12))


def test_a_one_batch_forward_that_fails_leaves_the_model_to_the_passes():
    """The joined batch of 64 rows fails in the model's own forward: the model is left as
    it was and the passes of data over the budget run (the error is not the user's: their
    batches run), within 1e-4 of level by level."""
    torch.manual_seed(0)
    model, data = _FixedBatch(), eval_models.batches("chain", 4, 16)
    exact = bt.recalibrate_report(copy.deepcopy(model), data, mode="eval_exact")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = bt.recalibrate_report(model, data, mode="eval")
    assert result.converged and result.passes >= 4
    assert worst_difference(model, exact.model) < 1e-4


class _Counted:
    """Batches that count how many were drawn."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        self.batches, self.drawn = batches, 0

    def __iter__(self):
        for batch in self.batches:
            self.drawn += 1
            yield batch


def test_joining_stops_drawing_once_the_inputs_are_over_the_budget():
    counted = _Counted([torch.zeros(2, 12)] * 10)
    assert join_batches(counted, None, 4 * 12 * 4) is None and counted.drawn == 3


class _Iterations:
    """Batches that count how often they are gone over."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        self.batches, self.iterations = batches, 0

    def __iter__(self):
        self.iterations += 1
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def test_the_first_pass_keeps_the_batches_the_one_batch_joins():
    """The data are gone over three times: the first batches drawn to size the data (all of
    these 128 samples, under the subset's 1,024), the first pass, which keeps what it draws,
    and the check pass; the one batch draws nothing more from the loader (4 before)."""
    model = eval_models.build("residual")
    data = _Iterations(eval_models.batches("residual", 8, 16))
    result = bt.recalibrate_report(model, data, mode="eval")
    assert result.passes == 3 and data.iterations == 3


def test_a_single_tensor_as_batches_is_refused_with_a_tolerance_too():
    """With ``tolerance`` nothing is drawn before pass 1, which keeps what it draws: a tensor
    passed as the batches is still refused by name, not iterated row by row."""
    model = eval_models.build("chain")
    with pytest.raises(TypeError, match="batches is a single tensor"):
        bt.recalibrate(model, torch.randn(64, 12), mode="eval", tolerance=0.5)
