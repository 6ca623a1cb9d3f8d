"""The precision of the population statistics: standard errors, tolerance, the report."""

from __future__ import annotations

import copy
import math
import warnings
from statistics import NormalDist

import numpy as np
import pytest
import torch
from torch import nn

import bnstats.torch as bt
from tests.torch import reference as ref
from tests.torch.models import TinyResNet, mlp, scramble_batchnorm


def formula_errors(per_batch):
    """The docstring's formulas from float64 per-batch values (rows: values, cols: channels):
    se_mean**2 = sum n_k (mean_k - mu)**2 / (N (B - 1)); se_var from each batch's mean of
    (z - mu)**2, scaled by N / (N - 1)."""
    n = np.array([len(z) for z in per_batch], dtype=float)
    total, batches = n.sum(), len(per_batch)
    mu = np.concatenate(per_batch).mean(axis=0)
    means = np.stack([z.mean(axis=0) for z in per_batch])
    w = np.stack([((z - mu) ** 2).mean(axis=0) for z in per_batch])
    w_bar = (n[:, None] * w).sum(axis=0) / total
    se_mean = np.sqrt((n[:, None] * (means - mu) ** 2).sum(axis=0) / (total * (batches - 1)))
    se_var = np.sqrt((n[:, None] * (w - w_bar) ** 2).sum(axis=0) / (total * (batches - 1)))
    return se_mean, se_var * total / (total - 1)


def test_audit_standard_errors_follow_the_formula_on_uneven_batches():
    torch.manual_seed(0)
    model = scramble_batchnorm(mlp((10, 16, 12, 3)), seed=1).eval()
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randn(n, 10, generator=gen) * 2 + 5 for n in (12, 7, 16, 9, 12, 5)]
    seen = ref.bn_inputs(model, batches)

    report = bt.audit(model, batches)

    for layer in report.layers:
        se_mean, se_var = formula_errors(seen[layer.name])
        np.testing.assert_allclose(layer.mean_standard_error, se_mean, rtol=1e-6)
        np.testing.assert_allclose(layer.var_standard_error, se_var, rtol=1e-5)
        worst = max(
            np.max(se_mean / np.sqrt(layer.population_var)), np.max(se_var / layer.population_var)
        )
        assert layer.relative_error == pytest.approx(worst, rel=1e-5)
    assert "rel. s.e." in str(report)
    assert "relative_standard_error" in report.to_dict()["layers"][0]


def test_standard_errors_match_the_spread_over_repeated_draws():
    """Over 300 independent data sets the estimates scatter as the standard errors say."""
    layer = nn.BatchNorm1d(3)
    gen = torch.Generator().manual_seed(4)
    scale = torch.tensor([1.0, 3.0, 0.2])
    means, variances, se_means, se_vars = [], [], [], []
    for _ in range(300):
        data = [torch.randn(16, 3, generator=gen) * scale + 7 for _ in range(12)]
        audited = bt.audit(layer, data).layers[0]
        means.append(audited.population_mean)
        variances.append(audited.population_var)
        se_means.append(audited.mean_standard_error)
        se_vars.append(audited.var_standard_error)
    ratio_mean = np.std(means, axis=0) / np.mean(se_means, axis=0)
    ratio_var = np.std(variances, axis=0) / np.mean(se_vars, axis=0)
    assert np.all(np.abs(ratio_mean - 1) < 0.15), ratio_mean
    assert np.all(np.abs(ratio_var - 1) < 0.2), ratio_var


def endless_images(seed=0, size=8):
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randn(size, 3, 12, 12, generator=gen) * 1.5 + 0.3


def test_tolerance_stops_early_and_meets_it():
    torch.manual_seed(0)
    model = scramble_batchnorm(TinyResNet(width=4), seed=3)

    result = bt.recalibrate_report(model, endless_images(), tolerance=5e-2)

    assert result.met and result.model is model and result.miss_probability <= 0.05
    assert result.batches % 8 == 0 and result.batches >= 16
    assert result.samples == 8 * result.batches
    again = bt.recalibrate_report(copy.deepcopy(model), endless_images(), tolerance=2e-2)
    assert again.samples > result.samples  # a tighter tolerance needs more data


def test_tolerance_holds_for_every_channel_at_once_with_95_percent_confidence():
    """Data with known statistics, 280 channels: a tolerance met means every channel's mean
    and variance within it of the truth; at most about 5 % of runs may miss (the union
    bound over 560 estimates, judged every 8 batches, is conservative: 1 of these 100
    does, 1 of the first 200)."""
    channels, tolerance, missed = 280, 5e-2, 0
    for run in range(100):
        gen = torch.Generator().manual_seed(run)
        mean = torch.rand(channels, generator=gen) * 2 - 1
        std = 0.5 + 1.5 * torch.rand(channels, generator=gen)
        data = (torch.randn(256, channels, generator=gen) * std + mean for _ in range(1000))
        layer = nn.BatchNorm1d(channels)

        assert bt.recalibrate_report(layer, data, tolerance=tolerance).met

        var_error = ((layer.running_var - std**2).abs() / std**2).max()
        mean_error = ((layer.running_mean - mean).abs() / std).max()
        missed += bool(max(var_error, mean_error) > tolerance)
    assert missed <= 5


def test_miss_probability_is_the_union_bound_over_every_channel():
    """``miss_probability`` from audit's per-channel standard errors, by hand: the sum over
    the channels' means and variances of P(|Z| > tolerance / relative standard error)."""
    torch.manual_seed(0)
    model = scramble_batchnorm(mlp((10, 16, 12, 3)), seed=1).eval()
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randn(n, 10, generator=gen) * 2 + 5 for n in (12, 7, 16, 9, 12, 5) * 4]
    tolerance = 0.05

    report = bt.audit(model, batches)
    with pytest.warns(UserWarning, match="not met"):  # without a length: of the population
        result = bt.recalibrate_report(copy.deepcopy(model), iter(batches), tolerance=tolerance)

    expected = 0.0
    for layer in report.layers:
        var = np.asarray(layer.population_var)
        relative = np.concatenate(
            [np.asarray(layer.mean_standard_error) / np.sqrt(var), layer.var_standard_error / var]
        )
        expected += sum(math.erfc(tolerance / r / math.sqrt(2)) for r in relative)
    assert result.miss_probability == pytest.approx(expected, rel=1e-6)
    assert not result.met and result.miss_probability > 0.05


def test_with_a_length_the_miss_probability_shrinks_by_the_finite_population_correction():
    """A stop before the end of data with a length: each channel's relative standard error
    (audit's, over the batches drawn) times ``sqrt(1 - drawn / len(data))``; the same data
    without a length draw more batches."""
    gen = torch.Generator().manual_seed(3)
    data = [torch.randn(32, 24, generator=gen) * 2 + 1 for _ in range(120)]
    tolerance = 0.15

    result = bt.recalibrate_report(nn.BatchNorm1d(24), data, tolerance=tolerance)
    population = bt.recalibrate_report(nn.BatchNorm1d(24), iter(data), tolerance=tolerance)

    assert result.met and result.batches < population.batches < len(data)
    assert result.data_batches == len(data) and population.data_batches is None
    layer = bt.audit(nn.BatchNorm1d(24), data[: result.batches]).layers[0]
    var = np.asarray(layer.population_var)
    relative = np.concatenate(
        [np.asarray(layer.mean_standard_error) / np.sqrt(var), layer.var_standard_error / var]
    ) * math.sqrt(1 - result.batches / len(data))
    expected = sum(math.erfc(tolerance / r / math.sqrt(2)) for r in relative)
    assert result.miss_probability == pytest.approx(expected, rel=1e-6)
    assert "of the whole data's statistics" in str(result)


class Undercounted(list):
    """Batches whose length says fewer than iteration gives (an endless sampler's epoch)."""

    def __len__(self) -> int:
        return 16


def test_a_length_that_iteration_exceeds_is_not_trusted():
    gen = torch.Generator().manual_seed(3)
    data = [torch.randn(32, 24, generator=gen) * 2 + 1 for _ in range(120)]
    population = bt.recalibrate_report(nn.BatchNorm1d(24), iter(data), tolerance=0.15)

    result = bt.recalibrate_report(nn.BatchNorm1d(24), Undercounted(data), tolerance=0.15)

    assert result.data_batches is None and result.batches == population.batches > 16
    assert result.miss_probability == population.miss_probability


def test_tolerance_holds_against_the_whole_data_with_95_percent_confidence():
    """Data with a length, 280 channels: a tolerance met means every channel within it of the
    whole data's statistics (what a pass over all of them writes); at most about 5 % of
    runs may miss (1 of these 100 does), and the stop comes after half the data (32 of 64
    batches in every run; the population's rule, judged on the same data without their
    length, took 48 or 56)."""
    channels, tolerance, missed, drawn = 280, 5e-2, 0, []
    for run in range(100):
        gen = torch.Generator().manual_seed(1000 + run)
        mean = torch.rand(channels, generator=gen) * 2 - 1
        std = 0.5 + 1.5 * torch.rand(channels, generator=gen)
        data = [torch.randn(256, channels, generator=gen) * std + mean for _ in range(64)]
        layer = nn.BatchNorm1d(channels)

        result = bt.recalibrate_report(layer, data, tolerance=tolerance)

        assert result.met
        drawn.append(result.batches)
        whole_var, whole_mean = torch.var_mean(torch.cat(data), dim=0)
        var_error = ((layer.running_var - whole_var).abs() / whole_var).max()
        mean_error = ((layer.running_mean - whole_mean).abs() / whole_var.sqrt()).max()
        missed += bool(max(var_error, mean_error) > tolerance)
    assert missed <= 5
    assert max(drawn) < 48


def test_the_stop_comes_at_the_first_check_that_meets_the_tolerance():
    """Heterogeneous channels (a few with heavy tails): the stop ends where the union bound
    first falls to 0.05, one check earlier it had not, and the worst channel alone times
    Bonferroni's ``z`` over all estimates would have needed more data."""
    gen = torch.Generator().manual_seed(7)
    data = []
    for _ in range(400):
        x = torch.randn(64, 64, generator=gen)
        x[:, :4] = x[:, :4] ** 3  # kurtosis 46: their variances need the most data
        data.append(x)
    tolerance = 0.2

    result = bt.recalibrate_report(nn.BatchNorm1d(64), iter(data), tolerance=tolerance)

    assert result.met and result.batches < len(data)
    with pytest.warns(UserWarning, match="not met"):
        before = bt.recalibrate_report(
            nn.BatchNorm1d(64), iter(data[: result.batches - 8]), tolerance=tolerance
        )
    assert before.miss_probability > 0.05
    bonferroni = NormalDist().inv_cdf(1 - 0.05 / (4 * 64))
    assert result.worst[1] * bonferroni > tolerance


def test_tolerance_not_met_warns_and_the_report_says_why():
    """Data without a length that run out first: the population was not pinned down."""
    model = scramble_batchnorm(mlp((6, 8, 2)), seed=1)
    data = [torch.randn(4, 6) for _ in range(3)]
    with pytest.warns(UserWarning, match="tolerance 0.001 not met"):
        result = bt.recalibrate_report(model, iter(data), tolerance=1e-3)
    assert not result.met and result.batches == 3 and result.data_batches is None
    assert "3 batches" in str(result)
    assert "outside 0.001 of the population's statistics with probability <= 1" in str(result)


def test_data_with_a_length_used_to_their_end_are_exact_and_meet_any_tolerance():
    model = scramble_batchnorm(mlp((6, 8, 2)), seed=1)
    data = [torch.randn(4, 6) for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = bt.recalibrate_report(copy.deepcopy(model), data, tolerance=1e-3)
    assert result.met and result.miss_probability == 0.0
    assert (result.batches, result.data_batches) == (3, 3)
    assert "every batch used: the data's own statistics" in str(result)
    exact = bt.recalibrate(copy.deepcopy(model), data)
    assert ref.same_state(result.model, ref.snapshot(exact))


def test_max_samples_cuts_the_data_so_the_tolerance_is_judged_on_what_was_drawn():
    """Cut by ``max_samples`` the whole data are not used: the correction counts the batches
    drawn against all of them (conservative), and a tolerance not met still warns."""
    model = scramble_batchnorm(mlp((6, 8, 2)), seed=1)
    data = [torch.randn(4, 6) for _ in range(3)]
    with pytest.warns(UserWarning, match="tolerance 0.001 not met"):
        result = bt.recalibrate_report(model, data, tolerance=1e-3, max_samples=8)
    assert not result.met and (result.batches, result.data_batches) == (2, 3)
    assert "of the whole data's statistics" in str(result)


def test_tolerance_is_refused_when_not_positive():
    with pytest.raises(ValueError, match="tolerance must be a positive number"):
        bt.recalibrate(mlp(), [torch.randn(4, 16)], tolerance=0)


def test_recalibrate_report_in_eval_mode_counts_passes():
    torch.manual_seed(0)
    model = scramble_batchnorm(mlp((6, 8, 8, 8, 2)), seed=1)
    data = [torch.randn(4, 6) for _ in range(5)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = bt.recalibrate_report(model, data, mode="eval_exact")
    assert (result.passes, result.samples, result.batches, result.mode) == (
        3 + 1,
        20,
        5,
        "eval_exact",
    )  # levels, check
    assert bt.recalibrate_report(model, data).passes == 1


def test_progress_bar_changes_nothing_and_stays_off_when_stderr_is_not_a_terminal(capfd):
    torch.manual_seed(0)
    data = [torch.randn(8, 6) for _ in range(20)]
    model = scramble_batchnorm(mlp((6, 8, 8, 2)), seed=1)
    quiet = bt.recalibrate(copy.deepcopy(model), data)
    assert capfd.readouterr().err == ""
    shown = bt.recalibrate(model, data, progress=True)
    assert ref.same_state(shown, ref.snapshot(quiet))
    bt.audit(quiet, data, progress=True, mode="eval")
    bt.adapt(quiet, data, progress=False)


def _channels_last_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1, groups=64),
        nn.BatchNorm2d(64),
    )
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                module.bias.add_(3.0)  # means several standard deviations from 0
    return model.to(memory_format=torch.channels_last)


def worst_against(model: nn.Module, truth: nn.Module) -> float:
    got, want = ref.buffers(model), ref.buffers(truth)
    worst = 0.0
    for name, buffers in want.items():
        var = buffers["var"].astype(np.float64)
        worst = max(
            worst,
            float(np.max(np.abs(got[name]["var"] - var) / var)),
            float(np.max(np.abs(got[name]["mean"] - buffers["mean"]) / np.sqrt(var))),
        )
    return worst


def test_channels_last_models_are_as_precise_as_contiguous_ones():
    """Against float64 moments of the same float32 activations: torch's channels-last CPU
    kernel sums in float32 value by value (5e-5 off here); the pass is within 1e-6 (2e-7 to
    8e-7 here, by the number of threads)."""
    model = _channels_last_model()
    gen = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(16, 3, 32, 32, generator=gen) * 2 + 1).contiguous(
            memory_format=torch.channels_last
        )
        for _ in range(6)
    ]
    truth = bt.recalibrate(copy.deepcopy(model), data, float64_moments=True)
    kernel = copy.deepcopy(model)
    torch.optim.swa_utils.update_bn(data, kernel)  # torch's kernel, float32 throughout

    bt.recalibrate(model, data)

    assert worst_against(model, truth) < 1e-6
    assert worst_against(kernel, truth) > 1e-5  # the case is one where the kernel is off


@pytest.mark.parametrize("shape", [(37, 5, 1, 1), (1, 3, 7, 5), (8, 6, 16, 16), (2, 4, 3, 5, 7)])
def test_channels_last_moments_of_any_shape(shape):
    from bnstats.torch._batch_moments import batch_moments, channels_last_on_cpu

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(*shape, generator=gen) * 3 + 5
    layout = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    x = x.contiguous(memory_format=layout)
    assert channels_last_on_cpu(x) == (x.numel() // shape[1] > shape[0] and shape[1] > 1)
    mean, var = batch_moments(x)
    axes = (0, *range(2, x.dim()))
    want_var, want_mean = torch.var_mean(x.double(), dim=axes, correction=0)
    np.testing.assert_allclose(mean, want_mean, rtol=0, atol=1e-6)
    np.testing.assert_allclose(var, want_var, rtol=1e-6)


@pytest.mark.parametrize(
    "shape", [(300001, 3), (1000, 7, 9, 9), (3, 5, 300, 300), (1, 2, 600, 600), (2, 4)]
)
def test_float64_moments_in_pieces_equal_one_float64_sum(shape):
    """``float64=True`` widens at most 2**18 values at a time (the one batch holds all the
    data): pieces along the first dimension, uneven last piece included, merge to what one
    float64 ``var_mean`` over the whole input gives."""
    from bnstats.torch._batch_moments import batch_moments

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(*shape, generator=gen) * 3 + 500
    mean, var = batch_moments(x, float64=True)
    axes = (0, *range(2, x.dim()))
    want_var, want_mean = torch.var_mean(x.double(), dim=axes, correction=0)
    assert mean.dtype == var.dtype == torch.float64
    np.testing.assert_allclose(mean, want_mean, rtol=1e-13)
    np.testing.assert_allclose(var, want_var, rtol=1e-11)


class RareBranch(nn.Module):
    """A BN layer ``rare`` that only batches flagged ``use_rare`` reach."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.bn, self.rare = nn.Linear(4, 4), nn.BatchNorm1d(4), nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor, use_rare: bool) -> torch.Tensor:
        y = self.bn(self.lin(x))
        return self.rare(y * 2 + 1) if use_rare else y


def _rare_batches(first_rare: int = 30) -> list[tuple[torch.Tensor, bool]]:
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 4, generator=gen), i >= first_rare) for i in range(200)]


def _call_rare(model, batch):
    return model(*batch)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_tolerance_keeps_drawing_until_a_rarely_used_layer_is_measured(mode):
    """A layer first reached at batch 30 holds the stop back (under unreached="raise"),
    instead of failing "no forward reached 'rare' in 16 batches"."""
    torch.manual_seed(0)
    model, data = scramble_batchnorm(RareBranch(), seed=2), _rare_batches()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "tolerance not met" after the stop
        result = bt.recalibrate_report(model, data, forward=_call_rare, mode=mode, tolerance=0.2)
    assert result.met and 30 < result.batches < len(data)  # eval mode: the stop's pass
    assert set(result.relative_errors) == {"bn", "rare"}
    assert int(model.rare.num_batches_tracked) > 0
    if mode == "train":  # the same as recalibrating on the batches drawn
        torch.manual_seed(0)
        fresh = scramble_batchnorm(RareBranch(), seed=2)
        bt.recalibrate(fresh, data[: result.batches], forward=_call_rare)
        assert ref.same_state(model, ref.snapshot(fresh))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_tolerance_with_unreached_keep_keeps_a_layer_not_reached_yet_and_says_so(mode):
    torch.manual_seed(0)
    model, data = scramble_batchnorm(RareBranch(), seed=2), _rare_batches()
    rare_before = ref.snapshot(model.rare)
    with pytest.warns(UserWarning, match="no forward reached, kept as they were: 'rare'"):
        result = bt.recalibrate_report(
            model, data, forward=_call_rare, mode=mode, tolerance=0.6, unreached="keep"
        )
    assert result.met and result.batches < 30 and set(result.relative_errors) == {"bn"}
    assert ref.same_state(model.rare, rare_before)


def test_tolerance_gives_up_on_a_layer_never_reached_on_an_endless_loader():
    """Waiting for the rare layer ends as many batches after the tolerance was met as that
    took: an endless loader with a training-only branch fails naming it, not hangs."""
    torch.manual_seed(0)
    model = scramble_batchnorm(RareBranch(), seed=2)
    before = ref.snapshot(model)
    drawn = []

    def endless():
        gen = torch.Generator().manual_seed(0)
        while len(drawn) < 10_000:
            drawn.append(1)
            yield torch.randn(8, 4, generator=gen), False

    with pytest.raises(ValueError, match="no forward reached BN layer.*'rare'"):
        bt.recalibrate_report(model, endless(), forward=_call_rare, tolerance=0.2)
    assert len(drawn) <= 200  # twice the batches the tolerance took (48 here), not 10,000
    assert ref.same_state(model, before)


def test_eval_exact_levels_share_the_miss_probability_so_the_tolerance_holds_for_all():
    """Each level of eval_exact stops on its own layers; with each allowing 0.05 the union
    over six levels reached 0.30 and warned "not met". Level k allows 0.05 * 6 / (pi k)**2."""
    torch.manual_seed(0)
    layers = []
    for _ in range(6):
        layers += [nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU()]
    model = nn.Sequential(*layers)

    class Endless:
        def __iter__(self):
            gen = torch.Generator().manual_seed(0)
            while True:
                yield torch.randn(32, 4, generator=gen)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = bt.recalibrate_report(model, Endless(), tolerance=0.1, mode="eval_exact")
    assert result.met and result.miss_probability <= 0.05 and result.passes == 6 + 1
