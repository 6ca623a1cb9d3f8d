"""bnstats' BatchNorm1d/2d/3d against torch's, the estimators' update rules, and convert()."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.swa_utils import update_bn

import bnstats
import bnstats.torch as bt
from tests.torch import reference as ref
from tests.torch import zoo
from tests.torch.models import image_batches

SHAPES = {
    "1d-flat": (nn.BatchNorm1d, bt.BatchNorm1d, (6, 5)),
    "1d-seq": (nn.BatchNorm1d, bt.BatchNorm1d, (4, 5, 7)),
    "2d": (nn.BatchNorm2d, bt.BatchNorm2d, (3, 5, 4, 4)),
    "3d": (nn.BatchNorm3d, bt.BatchNorm3d, (2, 5, 3, 3, 3)),
}


def _step(module, x, upstream):
    """One forward and backward with a random upstream gradient; (output, dx, dweight, dbias)."""
    x = x.clone().requires_grad_(True)
    out = module(x)
    out.backward(upstream)
    grads = (x.grad, module.weight.grad.clone(), module.bias.grad.clone())
    module.zero_grad()
    return (out.detach(), *grads)


def _pair(reference_cls, ours_cls, **ours_kwargs):
    torch.manual_seed(0)
    theirs = reference_cls(5, momentum=ours_kwargs.pop("momentum", 0.1))
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.normal_()
    ours = ours_cls(5, **ours_kwargs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


@pytest.mark.parametrize("kind", sorted(SHAPES))
@pytest.mark.parametrize(
    ("torch_momentum", "estimator"),
    [(0.1, bnstats.EMA(0.1)), (None, bnstats.CumulativeAverage())],
    ids=["ema", "cumulative"],
)
def test_matches_torch_in_train_and_eval_over_several_steps(kind, torch_momentum, estimator):
    reference_cls, ours_cls, shape = SHAPES[kind]
    theirs, ours = _pair(
        reference_cls, ours_cls, momentum=torch_momentum, estimator=copy.deepcopy(estimator)
    )
    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        x = torch.randn(shape, generator=gen) * 2 + step
        upstream = torch.randn(shape, generator=gen)
        for mode in ("train", "eval"):
            theirs.train(mode == "train")
            ours.train(mode == "train")
            for a, b in zip(_step(theirs, x, upstream), _step(ours, x, upstream), strict=True):
                torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
        for key, value in theirs.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-6, atol=0)


@pytest.mark.parametrize("estimator", [bnstats.EMA(0.2, debias=True), bnstats.CumulativeAverage()])
def test_buffers_follow_the_estimator_fed_with_float64_batch_moments(estimator):
    module = bt.BatchNorm2d(3, estimator=copy.deepcopy(estimator))
    reference = copy.deepcopy(estimator)
    for x in image_batches(sizes=[4, 7, 2, 5], shape=(3, 3, 3), seed=5):
        module(x)
        z = ref.to_channels_last_2d(x.double().numpy())
        reference.update(z.mean(axis=0), z.var(axis=0), len(z))
    np.testing.assert_allclose(module.running_mean.double().numpy(), reference.mean, rtol=1e-6)
    np.testing.assert_allclose(module.running_var.double().numpy(), reference.var, rtol=1e-6)
    assert int(module.num_batches_tracked) == reference.num_batches_tracked == 4


def test_debiased_ema_takes_the_first_batch_whole():
    module = bt.BatchNorm1d(4, estimator=bnstats.EMA(0.01, debias=True))
    x = torch.randn(16, 4) * 3 + 5
    module(x)
    torch.testing.assert_close(module.running_mean, x.mean(0))
    torch.testing.assert_close(module.running_var, x.var(0, unbiased=True))


@pytest.mark.parametrize("kind", sorted(SHAPES))
def test_state_dicts_load_both_ways_strictly(kind):
    reference_cls, ours_cls, shape = SHAPES[kind]
    theirs = reference_cls(5)
    theirs(torch.randn(shape))
    ours = ours_cls(5, estimator=bnstats.EMA(0.1, debias=True))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    back = reference_cls(5)
    back.load_state_dict(ours.state_dict(), strict=True)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = torch.randn(shape)
    for module in (theirs, ours, back):
        module.eval()
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
    torch.testing.assert_close(back(x), theirs(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("module", "shape", "expected"),
    [
        (bt.BatchNorm1d(5), (2, 5, 3, 3), r"\(N, 5\) or \(N, 5, L\), got \(2, 5, 3, 3\)"),
        (bt.BatchNorm2d(5), (2, 4, 3, 3), r"\(N, 5, H, W\), got \(2, 4, 3, 3\)"),
        (bt.BatchNorm3d(5), (2, 5, 3, 3), r"\(N, 5, D, H, W\), got \(2, 5, 3, 3\)"),
    ],
)
def test_shape_errors_name_the_expected_shape(module, shape, expected):
    with pytest.raises(ValueError, match=expected):
        module(torch.randn(shape))


def test_shape_errors_name_the_layer_after_convert():
    model = bt.convert(zoo.build("resnet"), bnstats.EMA(0.1))
    with pytest.raises(ValueError, match=r"BatchNorm2d\(8\) 'stages.0.0.bn1'"):
        model.stages[0][0].bn1(torch.randn(2, 8, 3))


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_a_non_finite_batch_leaves_the_running_statistics_unchanged(policy):
    module = bt.BatchNorm1d(3, estimator=bnstats.EMA(0.1, nonfinite=policy))
    module(torch.randn(8, 3))
    before = ref.snapshot(module)
    bad = torch.randn(8, 3)
    bad[2, 1] = float("inf")
    if policy == "raise":
        with pytest.raises(bnstats.NonFiniteStatisticsError, match=r"BatchNorm1d\(3\)"):
            module(bad)
    else:
        module(bad)
        assert module.estimator.num_batches_skipped == 1
    assert ref.same_state(module, before)


def test_momentum_reads_and_sets_the_estimator_as_torch_tools_expect():
    module = bt.BatchNorm2d(3, estimator=bnstats.EMA(0.05, debias=True, nonfinite="skip"))
    assert module.momentum == 0.05
    module.momentum = None
    assert isinstance(module.estimator, bnstats.CumulativeAverage) and module.momentum is None
    module.momentum = 0.2
    est = module.estimator
    assert (est.momentum, est.debias, est.nonfinite) == (0.2, True, "skip")
    assert isinstance(bt.BatchNorm2d(3, momentum=None).estimator, bnstats.CumulativeAverage)
    with pytest.raises(ValueError, match="not both"):
        bt.BatchNorm2d(3, momentum=0.1, estimator=bnstats.EMA(0.1))
    with pytest.raises(TypeError, match="recalibrate"):
        bt.BatchNorm2d(3, estimator=bnstats.Population())


def test_update_bn_runs_on_converted_models_and_keeps_the_estimator():
    plain = zoo.build("resnet")
    ours = bt.convert(copy.deepcopy(plain), bnstats.EMA(0.1, debias=True))
    data = zoo.batches("resnet")
    update_bn(data, plain)
    update_bn(data, ours)
    assert ref.same_state(ours, ref.snapshot(plain))
    assert all(m.estimator.debias for m in ours.modules() if isinstance(m, bt.BatchNorm2d))


class _InverseSqrt(bnstats.stats.RunningAverage):
    def weight(self, t):
        return 1 / t**0.5


class _SlowerEMA(bnstats.EMA):
    def weight(self, t):
        return self.momentum / 2


def _estimators():
    return [
        _InverseSqrt(nonfinite="skip"),
        _SlowerEMA(0.2),
        bnstats.EMA(0.1, debias=True, nonfinite="skip"),
        bnstats.CumulativeAverage(nonfinite="skip"),
        bnstats.stats.FixedStatistics(),
    ]


def _same_estimator(module, estimator):
    fresh = bt.BatchNorm1d(module.num_features, estimator=estimator)
    return type(module.estimator) is type(estimator) and module.extra_repr() == fresh.extra_repr()


@pytest.mark.parametrize("estimator", _estimators(), ids=lambda e: type(e).__name__)
def test_saving_momentum_and_setting_it_back_keeps_every_estimator(estimator):
    model = nn.Sequential(nn.Linear(3, 4), bt.BatchNorm1d(4, estimator=copy.deepcopy(estimator)))
    data = [torch.randn(8, 3) for _ in range(3)]
    update_bn(data, model)  # saves momentum, sets None, sets the saved value back
    assert _same_estimator(model[1], estimator)
    for temporary in (1.0, None, 0.0):  # fvcore's precise BN sets 1.0, Lightning's SWA None
        saved = model[1].momentum
        model[1].momentum = temporary
        model[1].momentum = copy.deepcopy(saved)
        assert _same_estimator(model[1], estimator)


def test_a_schedule_of_your_own_reads_as_the_weight_of_the_next_batch():
    module = bt.BatchNorm1d(4, estimator=_InverseSqrt())
    for _ in range(3):
        module(torch.randn(8, 4))
    assert module.momentum == 0.5  # w_4 = 1 / sqrt(4)
    twin = bt.BatchNorm1d(4, momentum=module.momentum)
    assert type(twin.estimator) is _InverseSqrt and twin.estimator is not module.estimator


def _converted(name, estimator):
    original = zoo.build(name)
    return original, bt.convert(copy.deepcopy(original), estimator)


@pytest.mark.parametrize("name", zoo.NAMES)
def test_convert_keeps_eval_outputs_exactly_and_train_steps(name):
    original, converted = _converted(name, bnstats.EMA(0.1))
    torch_bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    ours = (bt.BatchNorm1d, bt.BatchNorm2d, bt.BatchNorm3d)
    assert not any(type(m) in torch_bn for m in converted.modules())
    count = sum(type(m) in torch_bn for m in original.modules())
    assert sum(isinstance(m, ours) for m in converted.modules()) == count > 0
    data = zoo.batches(name, sizes=[6, 5, 6])
    original.eval()
    converted.eval()
    assert torch.equal(converted(data[0]), original(data[0]))
    original.train()
    converted.train()
    gen = torch.Generator().manual_seed(2)
    for x in data:
        outputs = [model(x) for model in (original, converted)]
        upstream = torch.randn(outputs[0].shape, generator=gen)
        for model, out in zip((original, converted), outputs, strict=True):
            model.zero_grad()
            out.backward(upstream)
        torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-6, atol=1e-6)
        for (key, p), (_, q) in zip(
            original.named_parameters(), converted.named_parameters(), strict=True
        ):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=key)
    for key, value in original.state_dict().items():
        torch.testing.assert_close(converted.state_dict()[key], value, rtol=1e-6, atol=1e-7)


def test_convert_takes_over_parameters_modes_hooks_and_sharing():
    model = zoo.build("resnet")
    model.train()
    model.stem.eval()
    bn = model.stem[1]
    weight, running_var = bn.weight, bn.running_var
    calls = []
    bn.register_forward_hook(lambda m, a, out: calls.append(1))
    model.twin = bn  # the same layer registered under a second name
    estimator = bnstats.EMA(0.1, debias=True)

    bt.convert(model, estimator)

    new = model.stem[1]
    assert isinstance(new, bt.BatchNorm2d) and model.twin is new
    assert new.weight is weight and new.running_var is running_var
    assert not new.training and model.stages[0][0].bn1.training
    layers = [m for m in model.modules() if isinstance(m, bt.BatchNorm2d)]
    estimators = {id(m.estimator) for m in layers}
    assert len(estimators) == len(layers) and id(estimator) not in estimators
    model(torch.randn(2, 3, 6, 6))
    assert calls == [1]


def test_convert_leaves_sync_batchnorm_and_refuses_uninitialized_lazy_layers():
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(zoo.build("resnet"))
    bt.convert(synced, bnstats.EMA(0.1))
    assert all(type(m) is not bt.BatchNorm2d for m in synced.modules())
    with pytest.raises(ValueError, match="'1' is an uninitialized LazyBatchNorm2d"):
        bt.convert(nn.Sequential(nn.Conv2d(3, 4, 1), nn.LazyBatchNorm2d()), bnstats.EMA(0.1))
    with pytest.raises(TypeError, match="running average"):
        bt.convert(zoo.build("mlp"), bnstats.Population())
    single = bt.convert(nn.BatchNorm1d(3), bnstats.CumulativeAverage())
    assert isinstance(single, bt.BatchNorm1d) and single.momentum is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_statistics_stay_float32_when_the_model_is_cast_to_half(dtype):
    """pytorch#126525: nn.BatchNorm2d.half() turns a running_var above 65504 into inf."""
    reference = nn.BatchNorm2d(3)
    reference.running_var.fill_(1e5)
    if dtype == torch.float16:
        assert torch.isinf(copy.deepcopy(reference).half().running_var).all()
    model = bt.convert(nn.Sequential(reference), bnstats.EMA(0.1))
    model.to(dtype)
    bn = model[0]
    assert bn.running_var.dtype == torch.float32 and bn.weight.dtype == dtype
    torch.testing.assert_close(bn.running_var, torch.full((3,), 1e5))
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(6, 3, 4, 4, generator=gen) * 300).to(dtype).requires_grad_()
    twin = bt.BatchNorm2d(3)  # the same layer in float32, for comparison
    twin.running_var.fill_(1e5)
    out = model(x)
    out.backward(torch.randn(out.shape, generator=gen).to(dtype))
    expected = twin(x.detach().float())
    assert out.dtype == dtype and x.grad.dtype == dtype and bn.weight.grad.dtype == dtype
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(bn.running_var, twin.running_var, rtol=1e-3, atol=1e-3)
    model.eval()
    assert torch.isfinite(model(x)).all()
    state = model.state_dict()
    plain = nn.BatchNorm2d(3)
    plain.load_state_dict({k.removeprefix("0."): v for k, v in state.items()})
    assert torch.isfinite(plain.running_var).all()


def test_a_batch_skipped_for_nan_leaves_earlier_forwards_differentiable():
    """The CPU path put the buffers back in place after a NaN batch, bumping their version:
    the backward of an earlier forward (gradient accumulation, shared layers) then failed
    with "modified by an inplace operation"."""
    torch.manual_seed(0)
    layer = bt.BatchNorm1d(3, estimator=bnstats.EMA(0.1, nonfinite="skip"))
    reference = nn.BatchNorm1d(3)
    x = torch.randn(6, 3, requires_grad=True)
    bad = torch.randn(6, 3)
    bad[0, 0] = float("inf")
    out, expected = layer(x), reference(x)
    layer(bad)
    upstream = torch.randn(6, 3)
    (grad,) = torch.autograd.grad(out, x, upstream)
    (expected_grad,) = torch.autograd.grad(expected, x, upstream)
    torch.testing.assert_close(grad, expected_grad)
    assert int(layer.num_batches_skipped) == 1
