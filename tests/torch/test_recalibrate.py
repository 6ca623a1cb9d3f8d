"""recalibrate: exact population statistics, checked against float64 truth, update_bn, fvcore."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from fvcore.nn.precise_bn import update_bn_stats
from torch import nn
from torch.optim.swa_utils import update_bn

import bnstats
import bnstats.torch as bt
from tests.torch import reference as ref
from tests.torch import zoo
from tests.torch.extra_models import (
    AuxiliaryHead,
    KeywordNet,
    SharedBatchNorm,
    first_layer_bn,
    lazy_net,
)
from tests.torch.models import TinyResNet, image_batches, mlp, scramble_batchnorm

# float32 buffers round to ~6e-8; the kernels' float32 moments add a little more.
RTOL = 2e-6


def relative_errors(model, seen):
    """Per layer, max |mean - mu| / sigma and max |var - var_true| / var_true vs float64 truth."""
    got = ref.buffers(model)
    errors = {}
    for name, per_batch in seen.items():
        mu, var = ref.population(per_batch)
        errors[name] = (
            np.max(np.abs(got[name]["mean"] - mu) / np.sqrt(var)),
            np.max(np.abs(got[name]["var"] - var) / var),
        )
    return errors


@pytest.mark.parametrize("name", zoo.NAMES)
def test_population_statistics_match_float64_truth_on_uneven_batches(name):
    model, data = zoo.build(name), zoo.batches(name)
    seen = ref.bn_inputs(model, data)
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}

    assert bt.recalibrate(model, data) is model

    for layer, (mean_error, var_error) in relative_errors(model, seen).items():
        assert mean_error < RTOL, layer
        assert var_error < RTOL, layer
    assert all(b["tracked"] == len(data) for b in ref.buffers(model).values())
    assert {k: v.dtype for k, v in model.state_dict().items()} == dtypes


def _per_method_expectations(per_batch):
    """What each method stores, by its own definition, from float64 per-batch inputs."""
    means = [z.mean(axis=0) for z in per_batch]
    pooled = np.concatenate(per_batch)
    return {
        "bnstats": (pooled.mean(axis=0), pooled.var(axis=0, ddof=1)),
        # momentum=None: every batch weighted equally, per-batch unbiased variances averaged
        "update_bn": (
            np.mean(means, axis=0),
            np.mean([z.var(axis=0, ddof=1) for z in per_batch], 0),
        ),
        # sample-weighted mean and E[z^2] - E[z]^2 over all values: the biased variance
        "fvcore": (pooled.mean(axis=0), pooled.var(axis=0, ddof=0)),
    }


def test_each_method_gets_its_own_answer_and_the_differences_are_real():
    model = scramble_batchnorm(TinyResNet(), seed=3)
    data = image_batches(sizes=[2, 9, 3, 14], shape=(3, 4, 4), seed=4)
    seen = ref.bn_inputs(model, data)
    runs = {name: copy.deepcopy(model) for name in ("bnstats", "update_bn", "fvcore")}
    bt.recalibrate(runs["bnstats"], data)
    update_bn(data, runs["update_bn"])
    runs["fvcore"].train()
    update_bn_stats(runs["fvcore"], data, num_iters=len(data))
    results = {name: ref.buffers(m) for name, m in runs.items()}

    for layer, per_batch in seen.items():
        expected = _per_method_expectations(per_batch)
        scale = np.sqrt(expected["bnstats"][1])
        for method, (mean, var) in expected.items():
            got = results[method][layer]
            assert np.max(np.abs(got["mean"] - mean) / scale) < 1e-5, (method, layer)
            assert np.max(np.abs(got["var"] - var) / var) < 1e-5, (method, layer)
        # the three definitions differ by far more than the tolerance on these uneven batches
        ours, swa, fv = expected["bnstats"], expected["update_bn"], expected["fvcore"]
        assert np.max(np.abs(ours[0] - swa[0]) / scale) > 50e-5, layer
        assert np.max(np.abs(ours[1] - swa[1]) / ours[1]) > 50e-5, layer
        assert np.max(np.abs(ours[1] - fv[1]) / ours[1]) > 50e-5, layer


def test_float64_moments_beat_the_fast_path_when_the_mean_dwarfs_the_spread():
    gen = torch.Generator().manual_seed(0)
    data = [
        (1e4 + 1e-2 * torch.randn(n, 3, generator=gen, dtype=torch.float64)).float()
        for n in (64, 50, 64, 30)
    ]
    truth = np.concatenate([x.double().numpy() for x in data]).var(axis=0, ddof=1)
    fast, exact = first_layer_bn(), first_layer_bn()
    bt.recalibrate(fast, data)
    bt.recalibrate(exact, data, float64_moments=True)
    fast_error = np.max(np.abs(fast[0].running_var.double().numpy() - truth) / truth)
    exact_error = np.max(np.abs(exact[0].running_var.double().numpy() - truth) / truth)
    assert exact_error < 1e-6  # float32 rounding of the stored value
    assert fast_error > 10 * exact_error


def test_all_or_nothing_when_the_forward_raises_on_the_third_batch():
    model = zoo.build("resnet")
    model.train()
    model.stem.eval()
    model.stages[1][0].bn1.momentum = None
    saved, flags = ref.snapshot(model), ref.modes(model)
    calls = []

    def forward(m, batch):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("data loader broke")
        return m(batch)

    with pytest.raises(RuntimeError, match="data loader broke"):
        bt.recalibrate(model, zoo.batches("resnet"), forward=forward)
    assert ref.same_state(model, saved)
    assert ref.modes(model) == flags
    assert model.stages[1][0].bn1.momentum is None and model.stem[1].momentum == 0.1
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_modes_momentum_and_user_hooks_are_left_as_found():
    model = zoo.build("resnet")
    model.train()
    model.stages.eval()
    model.stem[1].momentum = 0.3
    bn = model.stages[0][0].bn1
    bn.momentum = None
    fired = []
    bn.register_forward_pre_hook(lambda m, args: fired.append("pre"))
    bn.register_forward_hook(lambda m, args, out: fired.append("post"))
    flags = ref.modes(model)
    pre_hooks = dict(bn._forward_pre_hooks)

    bt.recalibrate(model, zoo.batches("resnet"))

    assert ref.modes(model) == flags
    assert model.stem[1].momentum == 0.3 and bn.momentum is None
    assert dict(bn._forward_pre_hooks) == pre_hooks and len(bn._forward_hooks) == 1
    assert fired.count("pre") == fired.count("post") == len(zoo.batches("resnet"))


def test_dropout_is_off_during_the_pass_whatever_mode_the_model_is_in():
    torch.manual_seed(0)
    model = scramble_batchnorm(mlp(dropout=0.5))
    data = image_batches(sizes=[9, 6, 11], shape=(16,))
    seen = ref.bn_inputs(model, data)  # eval mode: dropout off
    in_train, in_eval = copy.deepcopy(model).train(), copy.deepcopy(model).eval()
    bt.recalibrate(in_train, data)
    bt.recalibrate(in_eval, data)
    assert ref.same_state(in_train, ref.snapshot(in_eval))
    assert in_train.training and not in_eval.training
    for layer, (mean_error, var_error) in relative_errors(in_train, seen).items():
        assert mean_error < RTOL and var_error < RTOL, layer


def test_autograd_is_off_during_the_pass():
    model = zoo.build("mlp")
    grad_enabled = []
    model[0].register_forward_hook(lambda m, a, out: grad_enabled.append(out.requires_grad))
    bt.recalibrate(model, zoo.batches("mlp"))
    assert grad_enabled == [False] * len(zoo.batches("mlp"))
    assert all(p.grad is None for p in model.parameters())


def test_lazy_batchnorm_is_initialized_and_recalibrated():
    torch.manual_seed(0)
    model, data = lazy_net(), image_batches(sizes=[5, 8, 3], shape=(3, 6, 6))
    bt.recalibrate(model, data)
    assert type(model[1]) is nn.BatchNorm2d
    seen = ref.bn_inputs(model, data)
    for layer, (mean_error, var_error) in relative_errors(model, seen).items():
        assert mean_error < RTOL and var_error < RTOL, layer


def test_lazy_batchnorm_initialized_by_a_failed_pass_keeps_its_fresh_buffers():
    model, data = lazy_net(), image_batches(sizes=[5, 8, 3], shape=(3, 6, 6))
    seen = []

    def forward(m, batch):
        seen.append(1)
        if len(seen) == 2:
            raise RuntimeError("stop")
        return m(batch)

    with pytest.raises(RuntimeError):
        bt.recalibrate(model, data, forward=forward)
    bn = model[1]
    assert torch.equal(bn.running_mean, torch.zeros(4))
    assert torch.equal(bn.running_var, torch.ones(4))
    assert int(bn.num_batches_tracked) == 0


def test_sync_batchnorm_single_process_equals_plain_batchnorm():
    plain = zoo.build("resnet")
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain))
    assert any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())
    bt.recalibrate(plain, zoo.batches("resnet"))
    bt.recalibrate(synced, zoo.batches("resnet"))
    assert ref.same_state(synced, ref.snapshot(plain))


def test_bnstats_modules_are_recalibrated_like_torch_ones():
    plain = zoo.build("depthwise")
    ours = bt.convert(copy.deepcopy(plain), bnstats.EMA(0.1, debias=True))
    bt.recalibrate(plain, zoo.batches("depthwise"))
    bt.recalibrate(ours, zoo.batches("depthwise"))
    assert ref.same_state(ours, ref.snapshot(plain))


def test_dict_batches_default_to_keyword_arguments_and_forward_says_otherwise():
    torch.manual_seed(0)
    model = scramble_batchnorm(KeywordNet())
    images = image_batches(sizes=[4, 6], shape=(3, 5, 5))
    expected = copy.deepcopy(model)
    bt.recalibrate(expected, images)

    as_kwargs = copy.deepcopy(model)
    bt.recalibrate(as_kwargs, [{"image": x} for x in images])
    labelled = copy.deepcopy(model)
    batches = [{"pixels": x, "label": torch.zeros(len(x))} for x in images]
    bt.recalibrate(labelled, batches, forward=lambda m, b: m(b["pixels"]))
    as_tuples = copy.deepcopy(model)
    bt.recalibrate(as_tuples, [(x, torch.zeros(len(x))) for x in images])

    for result in (as_kwargs, labelled, as_tuples):
        assert ref.same_state(result, ref.snapshot(expected))


def test_max_samples_cuts_the_crossing_batch_and_draws_no_more():
    model, data = zoo.build("mlp"), zoo.batches("mlp", sizes=[7, 3, 12, 5])
    drawn = []

    def loader():
        for x in data:
            drawn.append(len(x))
            yield (x, torch.arange(len(x)))

    expected = copy.deepcopy(model)
    bt.recalibrate(expected, [data[0], data[1], data[2][:5]])
    bt.recalibrate(model, loader(), max_samples=15)
    assert drawn == [7, 3, 12]
    assert ref.same_state(model, ref.snapshot(expected))


def test_track_running_stats_false_layers_are_skipped():
    model = nn.Sequential(
        nn.Linear(4, 3), nn.BatchNorm1d(3), nn.BatchNorm1d(3, track_running_stats=False)
    )
    data = image_batches(sizes=[5, 6], shape=(4,))
    bt.recalibrate(model, data)
    assert int(model[1].num_batches_tracked) == 2 and model[2].running_mean is None
    with pytest.raises(ValueError, match="no batch-norm layer"):
        bt.recalibrate(nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False)), data)


@pytest.mark.parametrize(
    ("model", "batches", "error", "match"),
    [
        (zoo.build("mlp"), [], ValueError, "no batch"),
        (nn.Linear(3, 2), [torch.randn(4, 3)], ValueError, "no batch-norm layer"),
        (AuxiliaryHead(), [torch.randn(4, 5)], ValueError, "'aux.1'"),
        (zoo.build("mlp"), torch.randn(8, 16), TypeError, "single tensor"),
        (zoo.build("mlp"), 3, TypeError, "iterable"),
        (
            first_layer_bn(3),
            [torch.randn(5, 4)],
            ValueError,
            r"'0'.*\(N, 3, \.\.\.\), got \(5, 4\)",
        ),
        (zoo.build("mlp"), [torch.randn(8, 16), torch.randn(1, 16)], ValueError, r"'1'.*\(1, 32\)"),
        (zoo.build("mlp"), [object()], TypeError, "forward="),
    ],
    ids=["empty", "no-bn", "unreached", "tensor", "not-iterable", "shape", "one-sample", "type"],
)
def test_bad_input_raises_one_clear_error_and_changes_nothing(model, batches, error, match):
    saved = ref.snapshot(model)
    with pytest.raises(error, match=match):
        bt.recalibrate(model, batches)
    assert ref.same_state(model, saved)


def test_non_finite_statistics_name_the_first_layer_and_write_nothing():
    model, data = zoo.build("mlp"), zoo.batches("mlp")
    data[2][0, 3] = float("nan")
    saved = ref.snapshot(model)
    with pytest.raises(bnstats.NonFiniteStatisticsError, match="BN layer '1'"):
        bt.recalibrate(model, data)
    assert ref.same_state(model, saved)


def test_a_variance_overflowing_a_float16_buffer_writes_nothing():
    model = first_layer_bn(2).half()
    data = [(torch.randn(8, 2) * 1e3).half() for _ in range(2)]  # var ~1e6 > 65504
    saved = ref.snapshot(model)
    with pytest.raises(ValueError, match="'0': running_var overflows"):
        bt.recalibrate(model, data)
    assert ref.same_state(model, saved)


def test_a_module_called_twice_per_forward_pools_both_inputs():
    torch.manual_seed(0)
    model = SharedBatchNorm()
    data = image_batches(sizes=[5, 8, 6], shape=(6,))
    seen = ref.bn_inputs(model, data)
    assert len(seen["bn"]) == 2 * len(data)
    bt.recalibrate(model, data)
    ((mean_error, var_error),) = relative_errors(model, seen).values()
    assert mean_error < RTOL and var_error < RTOL
    assert int(model.bn.num_batches_tracked) == 2 * len(data)
