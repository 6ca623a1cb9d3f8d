"""mode="eval" on large data: the fixed point solved on the first batches and corrected by
whole passes (bnstats.torch._subset_iteration), against level by level (mode="eval_exact").

The subset is 1,024 samples and runs on data of 32 subsets or more; the tests shrink the
subset to 64 samples and the share to 16 (``small_subset``), so that data of 1,024 samples
take that path (a subset that small converges more slowly than 1,024 samples do), and
switch off running the data as one batch (``without_one_batch``), which the test models'
small data would take instead."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import bnstats.torch as bt
from bnstats.torch import _subset_choice
from tests.torch import eval_models
from tests.torch.test_eval_mode_iterated import worst_difference


@pytest.fixture
def small_subset(monkeypatch, without_one_batch):
    """Subsets of 64 samples: data of 1,024 samples or more take the subset path (the test
    models' data would otherwise run as one batch)."""
    monkeypatch.setattr(_subset_choice, "SUBSET_SAMPLES", 64)
    monkeypatch.setattr(_subset_choice, "SUBSET_SHARE", 16)


@pytest.mark.parametrize("count", [64, 32])
def test_smaller_data_that_four_passes_leave_unconverged_go_on_with_a_late_subset(
    count, without_one_batch
):
    """1,024 or 512 samples, under the 32 subsets of 1,024 samples the subset iteration
    starts from: four whole passes leave the 30-deep conv chain far from converged (whole
    passes alone take 28 and 25 here), and the rounds go on with its first 4 batches as the subset
    (a sixteenth of 1,024 samples; 64 samples of 512): a few more whole passes, within 1e-4
    of level by level."""
    model, data = eval_models.build("convchain"), eval_models.batches("convchain", count, 16)
    exact = eval_models.level_by_level("convchain", count, 16)
    result = bt.recalibrate_report(model, data, mode="eval")

    assert result.converged and result.passes <= 8 < exact.passes
    assert result.subset_batches == 4 and result.subset_passes > 0
    assert worst_difference(model, exact.model) < 1e-4


def test_a_late_subset_that_is_no_guide_is_left_after_one_round(without_one_batch):
    """The chaotic MLP chain on 1,024 samples in batches of 64: its late subset (the first
    batch) is no guide, and the first round is judged against how far pass 4 moved the
    statistics (unlike the round after a subset's own fixed point, which had no correction):
    one round's subset passes (one measuring the correction, at most 32 solving), then whole
    passes take over, within 1e-4 of level by level."""
    model, data = eval_models.build("chain"), eval_models.batches("chain", count=16, size=64)
    exact = eval_models.level_by_level("chain", 16, 64)
    result = bt.recalibrate_report(model, data, mode="eval")

    assert result.converged and result.subset_batches == 1
    assert 0 < result.subset_passes <= 1 + len(exact.relative_errors) + 2
    assert worst_difference(model, exact.model) < 1e-4


@pytest.mark.parametrize(("name", "most"), [("convchain", 6), ("residual", 5), ("dense", 5)])
def test_large_data_reach_the_level_by_level_statistics_in_few_whole_passes(
    name, most, small_subset
):
    """1,024 samples in batches of 16: the batch-statistics start is far off, and whole
    passes alone take nearly one per depth level on the 30-deep conv chain (27 at 256
    samples, ``test_eval_mode_iterated.py``); the subset iteration takes a few whole passes,
    and its result is within 1e-4 of level by level."""
    model, data = eval_models.build(name), eval_models.batches(name, count=64, size=16)
    exact = eval_models.level_by_level(name, 64, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = bt.recalibrate_report(model, data, mode="eval")

    assert result.converged and result.passes <= most < exact.passes
    assert result.subset_batches == 4 and result.subset_passes > 0
    assert max(result.moved.values()) <= 1e-4
    assert worst_difference(model, exact.model) < 1e-4
    assert "and " + str(result.subset_passes) + " over the first 4 batches" in str(result)


def test_a_chaotic_chain_leaves_the_subset_for_whole_passes(small_subset):
    """The 30-deep MLP chain with scrambled BN: its statistics are chaotic functions of the
    earlier layers', a subset's response is no guide to the whole data's, and a round's whole
    pass moves them more than half as much as the round before: whole passes take over, and
    end within 1e-4 of level by level."""
    model, data = eval_models.build("chain"), eval_models.batches("chain", count=16, size=64)
    exact = eval_models.level_by_level("chain", 16, 64)
    result = bt.recalibrate_report(model, data, mode="eval")
    assert result.converged and result.subset_passes > 0 and result.passes > 4
    assert worst_difference(model, exact.model) < 1e-4


def test_the_round_after_the_subsets_own_fixed_point_is_not_judged(monkeypatch):
    """A subset of one batch of 16 on the conv chain: its own fixed point is far off, and the
    first corrected round's whole pass moves the statistics 0.52 times as much as the whole
    pass at that uncorrected point did. Judged against it, the iteration would hand over to
    whole passes (about one per depth level here); the rounds go on instead, and end within
    1e-4 of level by level in a few whole passes."""
    monkeypatch.setattr(_subset_choice, "SUBSET_SAMPLES", 16)
    monkeypatch.setattr(_subset_choice, "SUBSET_SHARE", 16)
    model, data = eval_models.build("convchain"), eval_models.batches("convchain", 64, 16)
    exact = eval_models.level_by_level("convchain", 64, 16)
    result = bt.recalibrate_report(model, data, mode="eval")

    assert result.converged and result.subset_batches == 1
    assert result.passes <= 8 < exact.passes
    assert worst_difference(model, exact.model) < 1e-4


def test_a_layer_the_subset_never_reaches_takes_the_whole_passes_statistics(small_subset):
    """Batches after the subset take a branch with its own BN layer: the subset iteration
    leaves it to the whole passes, and it ends as level by level has it."""

    class Branching(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk = eval_models.ResidualCNN(channels=4, blocks=2)
            self.rare = torch.nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.trunk(x)
            return self.rare(y) if x.shape[0] == 15 else y

    torch.manual_seed(0)
    model = Branching()
    data = eval_models.batches("residual", count=66, size=16)
    data[50] = data[50][:15]
    exact = bt.recalibrate_report(copy.deepcopy(model), data, mode="eval_exact")
    result = bt.recalibrate_report(model, data, mode="eval")
    assert result.converged and result.subset_passes > 0
    assert worst_difference(model, exact.model) < 1e-4


def test_a_tolerance_stop_leaves_the_subset_iteration_the_batches_it_drew(small_subset):
    """The first pass stops at the tolerance; the subset is the first of the batches it
    drew, and the whole passes go over those batches only: the result is level by level's
    on them."""
    model, data = eval_models.build("residual"), eval_models.batches("residual", 256, 16)
    result = bt.recalibrate_report(model, data, mode="eval", tolerance=0.02)

    assert result.met and result.converged and result.subset_passes > 0
    assert 64 <= result.batches < 256
    drawn = data[: result.batches]
    exact = bt.recalibrate_report(
        copy.deepcopy(eval_models.build("residual")), drawn, mode="eval_exact"
    )
    assert worst_difference(model, exact.model) < 1e-4


def test_a_shuffling_loader_gives_the_subset_the_same_batches_in_every_pass(small_subset):
    """A DataLoader with shuffle=True draws other first batches each time it is iterated:
    the subset is drawn once and kept, so the subset solves settle (a few passes a round,
    not the limit) and the result is level by level's over the same samples."""
    model = eval_models.build("residual")
    samples = torch.cat(eval_models.batches("residual", count=64, size=16))
    loader = torch.utils.data.DataLoader(samples, batch_size=16, shuffle=True)
    exact = bt.recalibrate_report(copy.deepcopy(model), loader, mode="eval_exact")
    result = bt.recalibrate_report(model, loader, mode="eval")

    assert result.converged and result.passes <= 5 and result.subset_batches == 4
    layers = len(exact.relative_errors) + 2  # a subset solve that never settles takes this
    assert result.subset_passes < result.passes * layers
    assert worst_difference(model, exact.model) < 1e-4


def test_batches_without_a_length_start_with_a_batch_statistics_pass(small_subset, monkeypatch):
    """Without a length the data's size is known only after a pass: the batch-statistics
    pass comes first (as with a tolerance or across ranks), then the subset iteration; a
    list of the same batches has its subset solved first, before any whole pass. Both end
    within 1e-4 of level by level."""
    from bnstats.torch import _measure

    taken: list[str] = []
    for path in ("iterate_from_subset", "iterate_with_subset"):
        original = getattr(_measure, path)
        monkeypatch.setattr(
            _measure, path, lambda *a, _f=original, _p=path, **k: taken.append(_p) or _f(*a, **k)
        )
    model, data = eval_models.build("residual"), eval_models.batches("residual", 64, 16)
    exact = eval_models.level_by_level("residual", 64, 16)
    unsized = bt.recalibrate_report(copy.deepcopy(model), eval_models.Unsized(data), mode="eval")
    listed = bt.recalibrate_report(model, data, mode="eval")

    assert taken == ["iterate_with_subset", "iterate_from_subset"]
    assert unsized.converged and listed.converged
    assert unsized.subset_passes > 0 and listed.subset_passes > 0
    assert worst_difference(unsized.model, exact.model) < 1e-4
    assert worst_difference(listed.model, exact.model) < 1e-4
