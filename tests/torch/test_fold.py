"""fold / fold_weights: exactness against torch's own fusion and against running the layers,
every model of the zoo, the cases that must not fold, and float16 overflow."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.fx.experimental.optimization import fuse as fx_fuse
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from bnstats.torch.fold import (
    FoldOverflowError,
    FoldTraceError,
    fold,
    fold_weights,
)
from tests.torch import fold_models as fm
from tests.torch.models import (
    Conv1dNet,
    Conv3dNet,
    DepthwiseSeparable,
    PreActNet,
    TinyResNet,
    mlp,
    scramble_batchnorm,
)

BN = nn.modules.batchnorm._BatchNorm

# builder, input shape
ZOO = {
    "TinyResNet": (TinyResNet, (4, 3, 12, 12)),
    "DepthwiseSeparable": (DepthwiseSeparable, (4, 3, 12, 12)),
    "PreActNet": (PreActNet, (4, 3, 12, 12)),
    "mlp": (mlp, (8, 16)),
    "Conv1dNet": (Conv1dNet, (4, 2, 10)),
    "Conv3dNet": (Conv3dNet, (2, 2, 6, 6, 6)),
}

# Read off the architectures: BN name -> (layer it folds into, BN's position), with
# example_inputs. Everything else is kept, with the code given in KEPT.
FOLDED = {
    "TinyResNet": {
        "stem.1": ("stem.0", "after"),
        "stages.0.0.bn1": ("stages.0.0.conv1", "after"),
        "stages.0.0.bn2": ("stages.0.0.conv2", "after"),  # its output feeds the residual add
        "stages.1.0.bn1": ("stages.1.0.conv1", "after"),
        "stages.1.0.bn2": ("stages.1.0.conv2", "after"),
        "stages.1.0.shortcut.1": ("stages.1.0.shortcut.0", "after"),
    },
    "DepthwiseSeparable": {
        "stem_bn": ("stem", "after"),
        "dw_bn": ("depthwise", "after"),
        "pw_bn": ("pointwise", "after"),
        "grouped_bn": ("grouped", "after"),
    },
    "PreActNet": {
        "blocks.0.bn2": ("blocks.0.conv1", "after"),
        "blocks.1.bn2": ("blocks.1.conv1", "after"),
        "bn_before_1x1": ("conv1x1", "before"),
        "bn_final": ("head", "before"),
    },
    "mlp": {"1": ("0", "after"), "4": ("3", "after")},
    "Conv1dNet": {"bn1d": ("conv1d", "after"), "bn_up": ("up", "after")},
    "Conv3dNet": {"bn": ("conv", "after")},
}
KEPT = {
    # the stem's output also feeds the identity shortcut; then BN -> ReLU
    "PreActNet": {"blocks.0.bn1": "shared_tensor", "blocks.1.bn1": "no_layer"},
}
# Without example_inputs every BatchNorm1d stays: its channel axis depends on the input rank.
NEED_SHAPES = {
    "PreActNet": {"bn_final"},
    "mlp": {"1", "4"},
    "Conv1dNet": {"bn1d", "bn_up"},
}


def prepared(builder, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = scramble_batchnorm(builder(), seed=seed)
    return model.to(dtype).eval()


def example(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * 1.5 + 0.3).to(dtype)


def rel_diff(reference: torch.Tensor, other: torch.Tensor) -> float:
    """max |reference - other| / max |reference|."""
    ref = reference.double()
    return float((ref - other.double()).abs().max() / ref.abs().max())


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def bn_count(model: nn.Module) -> int:
    return sum(isinstance(m, BN) for m in model.modules())


def fold_quietly(model: nn.Module, example_inputs=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fold(model, example_inputs=example_inputs)


def random_bn(channels: int, affine: bool, gen: torch.Generator) -> nn.BatchNorm1d:
    bn = nn.BatchNorm1d(channels, affine=affine).double().eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(channels, generator=gen, dtype=torch.float64))
        bn.running_var.copy_(0.2 + torch.rand(channels, generator=gen, dtype=torch.float64) * 3)
        if affine:
            bn.weight.copy_(torch.randn(channels, generator=gen, dtype=torch.float64))
            bn.bias.copy_(torch.randn(channels, generator=gen, dtype=torch.float64))
    return bn


def bn_args(bn: nn.Module) -> tuple:
    return bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias


# -- fold_weights against torch.nn.utils.fusion -------------------------------------------


@pytest.mark.parametrize(
    "conv_cls",
    [nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d],
)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_fold_weights_matches_torch_fuse_conv_bn_weights(conv_cls, bias, affine):
    torch.manual_seed(0)
    conv = conv_cls(3, 5, 3, bias=bias).double()
    bn = random_bn(5, affine, torch.Generator().manual_seed(1))
    transposed = conv_cls.__name__.startswith("ConvTranspose")
    ref_w, ref_b = fuse_conv_bn_weights(conv.weight, conv.bias, *bn_args(bn), transpose=transposed)
    w, b = fold_weights(conv.weight, conv.bias, *bn_args(bn), transposed=transposed)
    torch.testing.assert_close(w, ref_w.detach(), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(b, ref_b.detach(), rtol=1e-13, atol=1e-15)
    # float32 layer: computed in float64, rounded once, so within one ulp of the reference
    bias32 = None if conv.bias is None else conv.bias.float()
    w32, b32 = fold_weights(conv.weight.float(), bias32, *bn_args(bn), transposed=transposed)
    assert w32.dtype == b32.dtype == torch.float32
    torch.testing.assert_close(w32, ref_w.detach().float(), rtol=1.2e-7, atol=1e-30)
    torch.testing.assert_close(b32, ref_b.detach().float(), rtol=1.2e-7, atol=1e-30)


@pytest.mark.parametrize("bias", [True, False])
def test_fold_weights_matches_torch_fuse_linear_bn_weights(bias):
    torch.manual_seed(0)
    linear = nn.Linear(7, 4, bias=bias).double()
    bn = random_bn(4, True, torch.Generator().manual_seed(2))
    ref_w, ref_b = fuse_linear_bn_weights(linear.weight, linear.bias, *bn_args(bn))
    w, b = fold_weights(linear.weight, linear.bias, *bn_args(bn))
    torch.testing.assert_close(w, ref_w.detach(), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(b, ref_b.detach(), rtol=1e-13, atol=1e-15)


# -- fold_weights after / before against running the two layers ----------------------

CONVS = {
    (1, False): nn.Conv1d,
    (2, False): nn.Conv2d,
    (3, False): nn.Conv3d,
    (1, True): nn.ConvTranspose1d,
    (2, True): nn.ConvTranspose2d,
    (3, True): nn.ConvTranspose3d,
}


@settings(max_examples=30, deadline=None)
@given(
    dims=st.integers(1, 3),
    transposed=st.booleans(),
    groups=st.sampled_from([1, 2, 4]),
    per_group=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    stride=st.integers(1, 2),
    bias=st.booleans(),
    affine=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fold_weights_equals_layer_then_bn(
    dims, transposed, groups, per_group, stride, bias, affine, seed
):
    """Grouped, depthwise (1 per group) and transposed convs: conv'(x) == BN(conv(x))."""
    gen = torch.Generator().manual_seed(seed)
    c_in, c_out = per_group[0] * groups, per_group[1] * groups
    conv = CONVS[dims, transposed](c_in, c_out, 3, stride=stride, groups=groups, bias=bias)
    conv = conv.double()
    bn = random_bn(c_out, affine, gen)
    x = torch.randn(2, c_in, *([5] * dims), generator=gen, dtype=torch.float64)
    expected = outputs(bn, outputs(conv, x).flatten(2)).view_as(outputs(conv, x))
    w, b = fold_weights(conv.weight, conv.bias, *bn_args(bn), transposed=transposed, groups=groups)
    conv.weight.data, conv.bias = w, nn.Parameter(b)
    torch.testing.assert_close(outputs(conv, x), expected, rtol=1e-12, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(
    dims=st.integers(0, 3),  # 0: Linear
    groups=st.sampled_from([1, 2, 4]),
    per_group=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    stride=st.integers(1, 2),
    dilation=st.integers(1, 2),
    bias=st.booleans(),
    affine=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fold_weights_before_equals_bn_then_layer(
    dims, groups, per_group, stride, dilation, bias, affine, seed
):
    """BN before an unpadded conv (any stride, dilation, groups) or a linear layer."""
    gen = torch.Generator().manual_seed(seed)
    if dims == 0:
        groups = 1
    c_in, c_out = per_group[0] * groups, per_group[1] * groups
    if dims == 0:
        layer = nn.Linear(c_in, c_out, bias=bias)
    else:
        conv_cls = CONVS[dims, False]
        layer = conv_cls(c_in, c_out, 3, stride=stride, dilation=dilation, groups=groups, bias=bias)
    layer = layer.double()
    bn = random_bn(c_in, affine, gen)
    x = torch.randn(2, c_in, *([7] * dims), generator=gen, dtype=torch.float64)
    normalized = outputs(bn, x.flatten(2) if dims else x).view_as(x)
    expected = outputs(layer, normalized)
    w, b = fold_weights(layer.weight, layer.bias, *bn_args(bn), position="before", groups=groups)
    layer.weight.data, layer.bias = w, nn.Parameter(b)
    torch.testing.assert_close(outputs(layer, x), expected, rtol=1e-12, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(
    dims=st.integers(0, 3),  # 0: Linear
    groups=st.sampled_from([1, 2, 4]),
    per_group=st.integers(1, 3),
    kernel=st.sampled_from([1, 3, 5]),
    dilation=st.integers(1, 2),
    padding_mode=st.sampled_from(["zeros", "reflect", "circular"]),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fold_weights_beside_equals_layer_plus_bn(
    dims, groups, per_group, kernel, dilation, padding_mode, bias, seed
):
    """``layer(x) + BN(x)``: a centred conv (any kernel, dilation, groups) or a linear layer."""
    gen = torch.Generator().manual_seed(seed)
    channels = per_group * groups
    if dims == 0:
        groups = 1
        layer = nn.Linear(channels, channels, bias=bias)
    else:
        padding = dilation * (kernel - 1) // 2
        layer = CONVS[dims, False](
            channels, channels, kernel, 1, padding, dilation, groups, bias, padding_mode
        )
    layer = layer.double()
    bn = random_bn(channels, True, gen)
    x = torch.randn(2, channels, *([9] * dims), generator=gen, dtype=torch.float64)
    expected = outputs(layer, x) + outputs(bn, x.flatten(2) if dims else x).view_as(x)
    w, b = fold_weights(layer.weight, layer.bias, *bn_args(bn), position="beside", groups=groups)
    layer.weight.data, layer.bias = w, nn.Parameter(b)
    torch.testing.assert_close(outputs(layer, x), expected, rtol=1e-12, atol=1e-12)


def test_fold_weights_rejects_mismatched_channels():
    weight = torch.zeros(8, 3, 3, 3)
    stats = (torch.zeros(6), torch.ones(6), 1e-5)
    with pytest.raises(ValueError, match=r"6 channels.*8 output.*\(8, 3, 3, 3\)"):
        fold_weights(weight, None, *stats)
    with pytest.raises(ValueError, match=r"6 channels.*3 input.*\(8, 3, 3, 3\)"):
        fold_weights(weight, None, *stats, position="before")
    with pytest.raises(ValueError, match=r"bias has shape \(5,\)"):
        fold_weights(torch.zeros(6, 3), torch.zeros(5), *stats)
    with pytest.raises(ValueError, match=r"gamma has shape \(4,\)"):
        fold_weights(torch.zeros(6, 3), None, *stats, torch.ones(4), None)
    with pytest.raises(
        ValueError, match="position must be 'after', 'before' or 'beside', got 'behind'"
    ):
        fold_weights(torch.zeros(6, 6), None, *stats, position="behind")
    with pytest.raises(ValueError, match=r"as many input as output channels.*\(6, 3\)"):
        fold_weights(torch.zeros(6, 3), None, *stats, position="beside")
    with pytest.raises(ValueError, match="transposed conv"):
        fold_weights(torch.zeros(6, 2, 3), None, *stats, position="before", transposed=True)


def test_fold_weights_names_statistics_that_are_no_affine_map():
    weight = torch.ones(4, 3, 1, 1)
    var = torch.tensor([1.0, -1.0, 0.5, -2.0])
    with pytest.raises(
        ValueError, match=r"running_var \+ eps is not positive in channel\(s\) 1, 3"
    ):
        fold_weights(weight, None, torch.zeros(4), var, 0.0)
    with pytest.raises(ValueError, match=r"running_var \+ eps is not positive.*0, 1, 2, 3"):
        fold_weights(weight, None, torch.zeros(4), torch.full((4,), -1.0), 1.0)
    mean = torch.tensor([0.0, float("nan"), 0.0, 0.0])
    with pytest.raises(ValueError, match=r"running_mean is NaN/Inf in channel\(s\) 1$"):
        fold_weights(weight, None, mean, torch.ones(4), 1e-5)


def test_a_bn_with_non_positive_variance_stays_naming_the_channels():
    model = fm.Chain(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        model.second.running_var[2] = -1.0
    entry = fold(model).fold_report["second"]
    assert entry.code == "bad_statistics"
    assert entry.reason.startswith("running_var + eps is not positive in channel(s) 2 "), entry


# -- every model of the zoo ---------------------------------------------------------------


@pytest.mark.parametrize("name", list(ZOO))
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_zoo_folds_exactly(name, dtype, tol):
    builder, shape = ZOO[name]
    model = prepared(builder, dtype)
    x = example(shape, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing avoidable is kept with example_inputs
        fused = fold(model, example_inputs=x)
    report = fused.fold_report
    assert {e.name: (e.folded_into, e.position) for e in report.folded} == FOLDED[name]
    assert {e.name: e.code for e in report.kept} == KEPT.get(name, {})
    assert bn_count(fused) == len(report.kept)
    assert rel_diff(outputs(model, x), outputs(fused, x)) <= tol


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_without_example_inputs_keeps_batchnorm1d(name):
    builder, shape = ZOO[name]
    model = prepared(builder)
    need = NEED_SHAPES.get(name, set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = fold(model)
    report = fused.fold_report
    assert {e.name for e in report.kept if e.code == "needs_example_inputs"} == need
    assert {e.name for e in report.folded} == set(FOLDED[name]) - need
    assert any("example_inputs" in str(w.message) for w in caught) == bool(need)
    x = example(shape)
    assert rel_diff(outputs(model, x), outputs(fused, x)) <= 1e-5


@pytest.mark.parametrize("name", ["TinyResNet", "PreActNet", "mlp"])
def test_original_model_untouched(name):
    builder, shape = ZOO[name]
    model = prepared(builder)
    model.train()
    for i, module in enumerate(model.modules()):  # mixed modes, to see each one survive
        if isinstance(module, BN) and i % 2:
            module.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [(n, m.training) for n, m in model.named_modules()]
    fold_quietly(model, example_inputs=example(shape))
    after = model.state_dict()
    assert list(after) == list(state)
    for key, value in state.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key
    assert [(n, m.training) for n, m in model.named_modules()] == modes


def test_folded_model_keeps_names_modes_and_creates_bias():
    model = prepared(TinyResNet)
    model.stages.train()  # containers in training mode; their BN layers stay eval below
    for module in model.stages.modules():
        if isinstance(module, BN):
            module.eval()
    fused = fold(model)
    original = dict(model.named_modules())
    for name, module in fused.named_modules():
        if name:
            assert module.training == original[name].training, name
    conv = fused.get_submodule("stem.0")
    assert model.stem[0].bias is None
    assert isinstance(conv.bias, nn.Parameter) and conv.bias.requires_grad
    assert set(fused.state_dict()) <= set(model.state_dict()) | {
        f"{e.folded_into}.bias" for e in fused.fold_report.folded
    }


# -- against torch.fx.experimental.optimization.fuse --------------------------------------


def test_same_outputs_as_fx_fuse_where_both_fold():
    for builder, shape in (ZOO["TinyResNet"], ZOO["DepthwiseSeparable"]):
        model = prepared(builder, torch.float64)
        x = example(shape, torch.float64)
        ours, theirs = fold(model), fx_fuse(model)
        assert bn_count(ours) == bn_count(theirs) == 0
        assert rel_diff(outputs(theirs, x), outputs(ours, x)) <= 1e-12


def test_folds_more_than_fx_fuse():
    left = {}
    for name, (builder, shape) in ZOO.items():
        model = prepared(builder)
        ours = fold(model, example_inputs=example(shape))
        left[name] = (bn_count(ours), bn_count(fx_fuse(model)))
    assert all(ours <= theirs for ours, theirs in left.values()), left
    assert sum(o for o, _ in left.values()) < sum(t for _, t in left.values()), left


# -- what must not fold ---------------------------------------------------------------------


def check_kept(model, x, bn_name, code, *, example_inputs=None):
    """``bn_name`` stays with ``code``; the output is unchanged; returns the folded model."""
    model = scramble_batchnorm(model).double().eval()
    x = x.double()
    fused = fold_quietly(model, example_inputs=None if example_inputs is None else x)
    entry = fused.fold_report[bn_name]
    assert (entry.folded_into, entry.code) == (None, code), entry
    assert isinstance(fused.get_submodule(bn_name), BN)
    assert rel_diff(outputs(model, x), outputs(fused, x)) <= 1e-12
    return model, fused


def test_conv_output_used_twice_is_left_alone():
    model, fused = check_kept(fm.ConvUsedTwice(), example((2, 3, 6, 6)), "bn", "shared_tensor")
    assert "add" in fused.fold_report["bn"].reason
    assert torch.equal(fused.conv.weight, model.conv.weight)
    assert torch.equal(fused.conv.bias, model.conv.bias)


def test_conv_feeding_two_bns_is_left_alone():
    _, fused = check_kept(fm.ConvTwoBNs(), example((2, 3, 6, 6)), "bn_a", "shared_tensor")
    assert fused.fold_report["bn_b"].code == "shared_tensor"


def test_relu_between_stays():
    _, fused = check_kept(fm.ReluBetween(), example((2, 3, 6, 6)), "bn", "no_layer")
    assert "relu" in fused.fold_report["bn"].reason


def test_shared_conv_stays():
    _, fused = check_kept(fm.SharedConv(), example((2, 3, 6, 6)), "bn", "layer_unsupported")
    assert "called 2 times" in fused.fold_report["bn"].reason


def test_conv_with_own_forward_or_hooks_stays():
    check_kept(
        fm.Chain(fm.StandardizedConv(3, 4, 3), nn.BatchNorm2d(4)),
        example((2, 3, 6, 6)),
        "second",
        "layer_unsupported",
    )
    hooked = fm.Chain(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    hooked.first.register_forward_hook(lambda module, args, out: out * 2)
    check_kept(hooked, example((2, 3, 6, 6)), "second", "layer_unsupported")


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(4, 6, 3, padding=1),
        nn.Conv2d(4, 6, 3, padding="same"),
        nn.Conv2d(4, 6, (1, 3), padding=(0, 1), groups=2),
    ],
)
def test_bn_before_zero_padded_conv_stays(conv):
    check_kept(fm.bn_before(conv, 4), example((2, 4, 7, 7)), "first", "padding")


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(4, 6, 3, padding=2, padding_mode="replicate", groups=2),
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular", groups=4, bias=False),
        nn.Conv2d(4, 6, 3, padding=0, stride=2, dilation=2),
        nn.Conv2d(4, 6, 1, padding="same"),
        nn.Conv2d(4, 6, 3, padding="valid"),
    ],
)
def test_bn_before_conv_folds_where_exact(conv):
    model = scramble_batchnorm(fm.bn_before(conv, 4)).double().eval()
    x = example((2, 4, 7, 7), torch.float64)
    fused = fold(model)
    assert (fused.fold_report["first"].folded_into, bn_count(fused)) == ("second", 0)
    assert rel_diff(outputs(model, x), outputs(fused, x)) <= 1e-12


def test_bn_before_transposed_conv_stays():
    model = fm.bn_before(nn.ConvTranspose2d(4, 6, 3, stride=2), 4)
    _, fused = check_kept(model, example((2, 4, 5, 5)), "first", "layer_unsupported")
    assert "transposed" in fused.fold_report["first"].reason


def test_bn_on_both_sides_and_in_a_row_fold_into_one_conv():
    model = scramble_batchnorm(fm.BothSides()).double().eval()
    x = example((2, 4, 6, 6), torch.float64)
    fused = fold(model)
    assert {e.name: e.folded_into for e in fused.fold_report.entries} == {
        "bn_in": "conv",
        "bn_out": "conv",
        "bn_again": "conv",
    }
    assert rel_diff(outputs(model, x), outputs(fused, x)) <= 1e-12


def test_training_mode_bn_stays_and_warns():
    model = prepared(DepthwiseSeparable, torch.float64)
    model.dw_bn.train()
    with pytest.warns(UserWarning, match=r"training mode.*dw_bn"):
        fused = fold(model)
    entry = fused.fold_report["dw_bn"]
    assert (entry.folded_into, entry.code) == (None, "training")
    assert fused.dw_bn.training and not fused.training
    assert len(fused.fold_report.folded) == 3
    x = example((4, 3, 12, 12), torch.float64)  # dw_bn uses the batch's statistics in both
    assert rel_diff(outputs(model, x), outputs(fused, x)) <= 1e-12


def test_bn_without_running_stats_stays_affine_false_folds():
    conv = nn.Conv2d(3, 4, 3)
    _, fused = check_kept(
        fm.Chain(conv, nn.BatchNorm2d(4, track_running_stats=False)),
        example((2, 3, 6, 6)),
        "second",
        "no_running_stats",
    )
    model = scramble_batchnorm(fm.Chain(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False)))
    model = model.double().eval()
    x = example((2, 3, 6, 6), torch.float64)
    fused = fold(model)
    assert fused.fold_report["second"].folded_into == "first"
    assert rel_diff(outputs(model, x), outputs(fused, x)) <= 1e-12


def test_linear_over_the_length_axis_never_folds():
    """Linear acts on dim -1 of (N, 6, 10), BatchNorm1d(6) on dim 1: the shapes fit, the
    channels do not."""
    x = example((3, 6, 10))
    check_kept(fm.linear_over_length(), x, "second", "needs_example_inputs")
    _, fused = check_kept(fm.linear_over_length(), x, "second", "channel_axis", example_inputs=x)
    assert "(3, 6, 6)" in fused.fold_report["second"].reason
    check_kept(fm.bn_then_linear_over_length(), x, "first", "channel_axis", example_inputs=x)


def test_conv1d_folds_only_for_batched_input():
    """Unbatched (C, L) input: BatchNorm1d then normalizes L, not the conv's channels."""
    model = fm.Chain(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4))
    unbatched = example((2, 6))  # conv output (4, 4): BatchNorm1d(4) accepts it
    check_kept(model, unbatched, "second", "channel_axis", example_inputs=unbatched)
    model = scramble_batchnorm(model).double().eval()
    batched = example((5, 2, 6), torch.float64)
    fused = fold(model, example_inputs=batched)
    assert fused.fold_report["second"].folded_into == "first"
    assert rel_diff(outputs(model, batched), outputs(fused, batched)) <= 1e-12


def test_bn_never_called_is_reported():
    model = fm.Chain(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    model.spare = nn.BatchNorm2d(4)
    entry = fold(model).fold_report["spare"]
    assert (entry.folded_into, entry.code) == (None, "not_called")


# -- errors -------------------------------------------------------------------------------------


def test_untraceable_model_raises_naming_the_class():
    with pytest.raises(FoldTraceError, match="Untraceable"):
        fold(fm.Untraceable().eval())


@pytest.mark.parametrize("bn", [nn.BatchNorm2d(3), nn.BatchNorm1d(3)])
def test_a_bare_bn_as_the_model_is_refused_as_having_no_neighbour(bn):
    with pytest.raises(FoldTraceError, match="itself one BatchNorm layer.*no neighbouring") as info:
        fold(bn.eval())
    assert "control flow" not in str(info.value)
    fused = fold(nn.Sequential(bn))  # inside a model: traced, kept for want of a layer
    assert fused.fold_report["0"].code == "no_layer"


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated")
def test_a_model_that_cannot_be_copied_names_the_tensor():
    """The old weight_norm leaves ``weight`` as a tensor with a grad_fn after a forward with
    gradients, which copy.deepcopy refuses."""
    model = fm.Chain(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    nn.utils.weight_norm(model.first)
    model(torch.randn(1, 3, 5, 5))
    with pytest.raises(RuntimeError, match=r"cannot copy Chain: first\.weight .*weight_norm"):
        fold(model)
    with torch.no_grad():
        model(torch.randn(1, 3, 5, 5))
    assert fold(model).fold_report["second"].code == "layer_unsupported"  # its pre-hook


def test_bad_arguments_raise_clearly():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fold("not a model")
    model = prepared(Conv3dNet)
    with pytest.raises(ValueError, match=r"Conv3dNet.*\(2, 5, 6, 6, 6\)"):
        fold(model, example_inputs=torch.zeros(2, 5, 6, 6, 6))
    with pytest.raises(TypeError, match="example_inputs"):
        fold(model, example_inputs={"x": torch.zeros(1)})
    broken = fm.Chain(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(6)).eval()
    with pytest.raises(ValueError, match=r"second into first.*\(8, 3, 1, 1\)"):
        fold(broken)


# -- float16 / bfloat16 -----------------------------------------------------------------------


def folded_reference(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """W * gamma / sqrt(var + eps), (b - mu) * gamma / sqrt(var + eps) + beta, in float64."""
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    weight = conv.weight.double() * scale.view(-1, 1, 1, 1)
    bias = (conv.bias.double() - bn.running_mean.double()) * scale + bn.bias.double()
    return weight.detach(), bias.detach()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_folds_in_float64_and_rounds_once(dtype):
    model = scramble_batchnorm(fm.Chain(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))).eval()
    model = model.to(dtype)
    fused = fold(model)
    weight, bias = folded_reference(model.first, model.second)
    assert fused.first.weight.dtype == dtype
    assert torch.equal(fused.first.weight, weight.to(dtype))
    assert torch.equal(fused.first.bias, bias.to(dtype))


def test_float16_overflow_keeps_the_bn():
    model = fm.Chain(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        model.first.weight.fill_(100.0)
        model.second.running_var.zero_()  # scale = gamma / sqrt(1e-5) = 4 * 316
        model.second.weight.fill_(4.0)
    model = model.half()
    x = torch.full((1, 2, 5, 5), 1e-3, dtype=torch.float16)  # the original stays finite
    fused = fold(model)
    entry = fused.fold_report["second"]
    assert (entry.folded_into, entry.code) == (None, "overflow")
    assert "float16" in entry.reason and "65504" in entry.reason
    assert torch.equal(fused.first.weight, model.first.weight)
    expected = outputs(model, x)
    assert bool(torch.isfinite(expected).all())
    assert torch.equal(outputs(fused, x), expected)


def test_running_var_beyond_float16_range_never_becomes_inf():
    """A float32 BN (running_var up to 1e8, above float16's 65504) after a float16 conv."""
    torch.manual_seed(0)
    model = fm.Chain(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        model.second.running_var.copy_(torch.tensor([1e6, 1e8, 7e4, 2.0]))
        model.second.running_mean.copy_(torch.tensor([300.0, -2e3, 10.0, 0.5]))
    model.first.half()
    fused = fold(model)
    assert fused.fold_report["second"].folded_into == "first"
    weight, bias = folded_reference(model.first, model.second)
    assert torch.equal(fused.first.weight, weight.half())
    assert torch.equal(fused.first.bias, bias.half())
    assert bool(torch.isfinite(fused.first.weight).all() and torch.isfinite(fused.first.bias).all())


def test_fold_weights_overflow_raises():
    weight = torch.full((2, 3), 300.0, dtype=torch.float16)
    stats = (torch.zeros(2), torch.zeros(2), 1e-5, torch.full((2,), 1.0), None)
    with pytest.raises(FoldOverflowError, match=r"float16.*65504"):
        fold_weights(weight, None, *stats)
    w32, _ = fold_weights(weight.float(), None, *stats)  # the same numbers fit in float32
    assert bool(torch.isfinite(w32).all())


# -- the report -----------------------------------------------------------------------------


def test_report_is_readable_and_plain_data():
    model = prepared(PreActNet)
    fused = fold(model, example_inputs=example(ZOO["PreActNet"][1]))
    report = fused.fold_report
    text = str(report)
    lines = text.splitlines()
    assert lines[0] == "fold(PreActNet): 4 of 6 BatchNorm layers folded, 2 kept"
    assert len(lines) == 1 + len(report)
    for entry, line in zip(report.entries, lines[1:], strict=True):
        assert entry.name in line
        assert (f"into {entry.folded_into}" in line) if entry.folded else (entry.code in line)
    data = report.to_dict()
    assert data["model"] == "PreActNet"
    assert [e["name"] for e in data["entries"]] == [e.name for e in report.entries]
    assert report["bn_final"].position == "before"
    assert copy.deepcopy(fused).meta["fold_report"].to_dict() == data
    with pytest.raises(KeyError, match="nonexistent"):
        report["nonexistent"]


def test_a_folded_model_survives_torch_save_and_load(tmp_path):
    import io

    from tests.torch.models import TinyResNet, scramble_batchnorm

    model = scramble_batchnorm(TinyResNet()).eval()
    fused = fold(model)
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(2, 3, 12, 12)
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-6)


# -- a BN beside a layer: RepVGG's identity branch ----------------------------------------


def test_repvgg_identity_bn_folds_beside_the_kxk_conv():
    model = scramble_batchnorm(nn.Sequential(fm.RepVggBlock(), fm.RepVggBlock()))
    x = example((2, 4, 7, 7))
    fused = fold(model.eval())
    report = fused.fold_report
    assert [e.position for e in report.entries] == ["beside", "after", "after"] * 2
    assert report["0.identity"].folded_into in ("0.conv_kxk", "0.conv_1x1")
    assert str(report["0.identity"]).endswith("(layer(x) + BN(x))")
    assert bn_count(fused) == 0
    assert rel_diff(outputs(model, x), outputs(fused, x)) <= 1e-5
    model64 = model.double()
    assert rel_diff(outputs(model64, x.double()), outputs(fold(model64), x.double())) <= 1e-12


class _Beside(nn.Module):
    """``combine(conv(x), BN(x))``."""

    def __init__(self, conv: nn.Conv2d, combine) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.conv = conv
        self.combine = combine

    def forward(self, x):
        return self.combine(self.conv(x), self.bn(x))


@pytest.mark.parametrize(
    ("conv", "combine", "code"),
    [
        (nn.Conv2d(4, 4, 2, padding="same"), torch.add, "no_layer"),  # no centre tap
        (nn.Conv2d(4, 4, 3, padding=1), lambda y, z: 2 * y + z, "no_layer"),  # y counts twice
        (nn.Conv2d(4, 4, 3, padding=1), lambda y, z: y + z + y.mean(), "no_layer"),  # reused
        (nn.Conv2d(4, 4, 3, padding=1), lambda y, z: z + y, "beside"),
    ],
    ids=["even-kernel", "scaled", "used-twice", "folds"],
)
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_identity_bn_folds_beside_only_where_exact(conv, combine, code):
    model = scramble_batchnorm(_Beside(conv, combine)).eval()
    x = example((2, 4, 6, 6))
    fused = fold(model)
    entry = fused.fold_report["bn"]
    assert (entry.position if entry.folded else entry.code) == code
    assert rel_diff(outputs(model, x), outputs(fused, x)) <= 1e-5


class _LayerPlusBN(nn.Module):
    """``layer(x) + bn(x)``: a BN beside a layer, for the reasons it may stay."""

    def __init__(self, layer: nn.Module, bn: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.bn = bn

    def forward(self, x):
        return self.layer(x) + self.bn(x)


def _hooked(layer: nn.Module) -> nn.Module:
    layer.register_forward_hook(lambda module, args, out: out * 2)
    return layer


def _parametrized(layer: nn.Module) -> nn.Module:
    class Doubled(nn.Module):
        def forward(self, weight):
            return 2 * weight

    nn.utils.parametrize.register_parametrization(layer, "weight", Doubled())
    return layer


def _overflowing_float16() -> nn.Module:
    """``W'[c, c, centre] = W + scale`` = 65000 + 4 / sqrt(1e-5) is beyond float16's 65504."""
    model = _LayerPlusBN(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        model.layer.weight.fill_(65000.0)
        model.bn.running_var.zero_()
        model.bn.weight.fill_(4.0)
    return model.half()


# each way a BN beside a layer can stay: the layer, words of the reason
BESIDE_KEPT = {
    "even-kernel": (
        lambda: nn.Conv2d(4, 4, 2, padding="same"),
        "beside it layer (Conv2d), which has an even kernel or a stride",
    ),
    "hooks": (
        lambda: _hooked(nn.Conv2d(4, 4, 3, padding=1)),
        "beside it layer (Conv2d), which has forward hooks",
    ),
    "own-conv-forward": (
        lambda: fm.StandardizedConv(4, 4, 3, padding=1),
        "beside it layer (StandardizedConv), which overrides Conv2d.forward",
    ),
    "parametrized": (
        lambda: _parametrized(nn.Conv2d(4, 4, 3, padding=1)),
        "which has a parametrized weight",
    ),
    "channel-axis": (
        lambda: nn.Linear(4, 4),
        "beside it layer (Linear), but BatchNorm1d normalizes dim 1",
    ),
}


@pytest.mark.parametrize("case", list(BESIDE_KEPT))
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_every_reason_a_bn_beside_a_layer_stays_reaches_the_report(case):
    build, words = BESIDE_KEPT[case]
    layer = build()
    flat = isinstance(layer, nn.Linear)
    bn = nn.BatchNorm1d(4) if flat else nn.BatchNorm2d(4)
    model = scramble_batchnorm(_LayerPlusBN(layer, bn)).double().eval()
    x = example((3, 4) if flat else (2, 4, 6, 6), torch.float64)
    fused = fold_quietly(model)
    entry = fused.fold_report["bn"]
    assert not entry.folded
    assert entry.reason.startswith("input comes from the model's input 'x'"), entry.reason
    assert words in entry.reason, entry.reason
    assert rel_diff(outputs(model, x), outputs(fused, x)) <= 1e-12


def test_a_bn_beside_a_layer_that_would_overflow_says_so():
    model = _overflowing_float16()
    fused = fold(model)
    entry = fused.fold_report["bn"]
    assert not entry.folded and "beside it layer (Conv2d), could fold into layer" in entry.reason
    assert "float16" in entry.reason and "65504" in entry.reason
    x = torch.full((1, 4, 5, 5), 1e-3, dtype=torch.float16)
    assert torch.equal(outputs(fused, x), outputs(model, x))


def test_docs_fold_then_compile_example_runs(monkeypatch, capsys):
    """The example of docs/fold.md's "Fold before torch.compile" (torch.compile itself replaced
    by the identity: Inductor needs a compiler toolchain and minutes on this CPU)."""
    text = (Path(__file__).parents[2] / "docs" / "fold.md").read_text()
    section = text[text.index("## Fold before torch.compile") :]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.setattr(torch, "compile", lambda module, **options: module)
    exec(compile(code, "docs/fold.md", "exec"), {})
    assert "2 of 2 BatchNorm layers folded" in capsys.readouterr().out
