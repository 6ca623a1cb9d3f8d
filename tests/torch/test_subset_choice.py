"""Which batches form eval mode's subset and how large (bnstats.torch._subset_choice): the
first batches holding its samples, the late subset of smaller data, and the subset sized to
the one-batch budget (grown where it joins, shrunk to its first batches that join where it
does not), checked through ``recalibrate_report(mode="eval")`` against level by level.

The tests shrink the subset to 64 samples and the share to 16 (``sizable_subset``; the
floor of a shrunk subset to 16 samples), so that data of 1,024 samples take the path."""

from __future__ import annotations

import copy

import pytest
import torch

import bnstats.torch as bt
from bnstats.torch import _subset_choice
from bnstats.torch._subset_choice import late_subset_batches, subset_batches
from tests.torch import eval_models
from tests.torch.test_eval_mode_iterated import worst_difference


@pytest.fixture
def sizable_subset(monkeypatch):
    """Subsets of 64 samples on data of 1,024 or more, shrunk down to 16 samples (the budget
    is left to each test)."""
    monkeypatch.setattr(_subset_choice, "SUBSET_SAMPLES", 64)
    monkeypatch.setattr(_subset_choice, "SUBSET_SHARE", 16)
    monkeypatch.setattr(_subset_choice, "SHRUNK_LEAST", 16)


def test_the_subset_is_the_first_batches_holding_its_samples_over_all_ranks():
    assert subset_batches([32] * 31, ranks=1) is None  # 992 samples: fewer than 32 subsets
    assert subset_batches([32] * 1024, ranks=1) == 32  # 1,024 samples in 32 batches
    assert subset_batches([32] * 1024, ranks=2) == 16  # 16 batches on each rank
    assert subset_batches([100] * 400, ranks=1) == 11  # at least 1,024 samples
    assert subset_batches([None] * 2047, ranks=1) is None  # sizes unknown: 64 batches
    assert subset_batches([None] * 2048, ranks=2) == 32


def test_smaller_data_take_a_sixteenth_of_their_batches_or_64_samples_as_a_late_subset():
    assert late_subset_batches([16] * 64, ranks=1) == 4  # 1,024 samples: a sixteenth
    assert late_subset_batches([16] * 64, ranks=2) == 2  # 4 batches over both ranks
    assert late_subset_batches([16] * 70, ranks=1) == 5  # at least a sixteenth
    assert late_subset_batches([32] * 20, ranks=1) == 2  # 640 samples: 64 of them
    assert late_subset_batches([4] * 128, ranks=1) == 16  # 64 samples, an eighth of the data
    assert late_subset_batches([4] * 127, ranks=1) is None  # more than an eighth
    assert late_subset_batches([16] * 63 + [None], ranks=1) is None
    assert late_subset_batches([], ranks=1) is None


@pytest.mark.parametrize(
    ("budget", "batches"),
    [
        (2**20, 8),  # the budget takes 512 samples: an eighth of the data, 128
        (2**18, 7),  # 128 samples less one batch: 112
        (5 * 2**15, 4),  # 80 samples less one batch, under 1.5 times the 64: not grown
        (2**16, 4),  # the subset does not join, 16 samples do: under the floor, as it was
    ],
)
def test_a_subset_that_joins_grows_to_what_the_budget_takes(monkeypatch, budget, batches):
    """The conv chain's inputs take 2 KiB per sample: the 64-sample subset's 128 KiB
    grows to the first batches that fill the budget less one batch (drawing stops within a
    batch past the samples wanted), at most an eighth of the data's 1,024 samples, where
    that is at least 1.5 times the subset; the grown subset's batch-statistics pass is one
    more subset pass."""
    monkeypatch.setattr(_subset_choice, "SUBSET_SAMPLES", 64)
    monkeypatch.setattr(_subset_choice, "SUBSET_SHARE", 16)
    model, data = eval_models.build("convchain"), eval_models.batches("convchain", 64, 16)
    result = bt.recalibrate_report(model, data, mode="eval", one_batch_bytes=budget)

    assert result.converged and result.subset_batches == batches


def test_a_shuffling_loader_gives_the_grown_subset_the_same_batches_in_every_pass(
    monkeypatch,
):
    """The grown subset is drawn anew from the loader (other samples than the first 64 under
    shuffle=True) and then kept: the subset solves are one forward each, and the result is
    level by level's over the same samples."""
    monkeypatch.setattr(_subset_choice, "SUBSET_SAMPLES", 64)
    monkeypatch.setattr(_subset_choice, "SUBSET_SHARE", 16)
    model = eval_models.build("residual")
    samples = torch.cat(eval_models.batches("residual", count=64, size=16))
    loader = torch.utils.data.DataLoader(samples, batch_size=16, shuffle=True)
    exact = bt.recalibrate_report(copy.deepcopy(model), loader, mode="eval_exact")
    result = bt.recalibrate_report(model, loader, mode="eval", one_batch_bytes=2**20)

    assert result.converged and result.subset_batches == 8
    assert result.subset_passes == 3 + 2 * (result.passes - 1)
    assert worst_difference(model, exact.model) < 1e-4


def test_a_subset_that_does_not_join_shrinks_to_its_first_batches_that_do(sizable_subset):
    """The 64-sample subset's 128 KiB are over a 64 KiB budget: its first batch (16
    samples, 32 KiB) joins, so the solves are one forward over it (its own batch-statistics
    pass one more subset pass), where the floor allows that many samples; within 1e-4 of
    level by level."""
    model, data = eval_models.build("residual"), eval_models.batches("residual", 64, 16)
    exact = eval_models.level_by_level("residual", 64, 16)
    result = bt.recalibrate_report(model, data, mode="eval", one_batch_bytes=2**16)

    assert result.converged and result.subset_batches == 1
    assert result.subset_passes == 3 + 2 * (result.passes - 1)
    assert worst_difference(model, exact.model) < 1e-4


@pytest.mark.parametrize(("budget", "batches"), [(2**20, 8), (2**16, 1)])
def test_batches_without_a_length_have_their_subset_sized_too(sizable_subset, budget, batches):
    """The batch-statistics pass first (batches without a length): the 64-sample subset
    grows to an eighth of the data where the budget takes it (1 MiB), or shrinks to its
    first batch where it does not join (64 KiB, a floor of 16 samples); the sized subset's
    batch-statistics pass is one more subset pass, each solve one forward; within 1e-4 of
    level by level."""
    model, data = eval_models.build("convchain"), eval_models.batches("convchain", 64, 16)
    exact = eval_models.level_by_level("convchain", 64, 16)
    result = bt.recalibrate_report(
        model, eval_models.Unsized(data), mode="eval", one_batch_bytes=budget
    )

    assert result.converged and result.subset_batches == batches
    assert result.subset_passes == 3 + 2 * (result.passes - 2)
    assert worst_difference(model, exact.model) < 1e-4


class _FailsOver(torch.nn.Module):
    """A model whose forward fails on more than ``rows`` samples (written for small
    batches)."""

    def __init__(self, model: torch.nn.Module, rows: int) -> None:
        super().__init__()
        self.model, self.rows = model, rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.rows:
            raise RuntimeError(f"written for at most {self.rows} rows")
        return self.model(x)


def test_a_grown_subset_whose_forward_fails_goes_back_to_the_first_batches(monkeypatch):
    """The grown subset (8 batches) joins but the model fails on its 128 rows: the solves go
    over the 4 batches it grew from by passes, and eval mode reaches level by level's
    statistics; the model is left whole."""
    monkeypatch.setattr(_subset_choice, "SUBSET_SAMPLES", 64)
    monkeypatch.setattr(_subset_choice, "SUBSET_SHARE", 16)
    chain, data = eval_models.build("convchain"), eval_models.batches("convchain", 64, 16)
    exact = eval_models.level_by_level("convchain", 64, 16)
    model = _FailsOver(chain, rows=64)
    result = bt.recalibrate_report(model, data, mode="eval", one_batch_bytes=2**20)

    assert result.converged and result.subset_batches == 4
    assert worst_difference(chain, exact.model) < 1e-4


def test_a_tolerance_stop_sizes_the_subset_from_the_batches_it_drew(monkeypatch):
    """The first pass stops at the tolerance; the 64-sample subset grows within the
    batches it drew (an eighth of them, where the 1 MiB budget takes more), and the result
    is level by level's over those batches."""
    monkeypatch.setattr(_subset_choice, "SUBSET_SAMPLES", 64)
    monkeypatch.setattr(_subset_choice, "SUBSET_SHARE", 16)
    model, data = eval_models.build("residual"), eval_models.batches("residual", 256, 16)
    result = bt.recalibrate_report(model, data, mode="eval", tolerance=0.02, one_batch_bytes=2**20)

    assert result.met and result.converged and 64 <= result.batches < 256
    assert 4 < result.subset_batches <= -(-result.batches // 8)  # grown, at most an eighth
    drawn = data[: result.batches]
    exact = bt.recalibrate_report(
        copy.deepcopy(eval_models.build("residual")), drawn, mode="eval_exact"
    )
    assert worst_difference(model, exact.model) < 1e-4
