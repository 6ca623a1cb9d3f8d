"""The tools on real timm and torchvision models: run where both import, skipped otherwise
(CI has neither). ``timm_patterns.py`` carries the copies that CI tests; the first tests here
check those copies against the real classes.

Models have random weights; their BN statistics are made non-trivial by a few training-mode
forwards (frozen BNs get random statistics). Inputs are small (1x3x64x64). The models marked
slow run only with ``BNSTATS_SLOW=1``. ``python -m tests.torch.test_zoo`` prints the table of
docs/fold.md (every model, slow ones included).
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from bnstats import EMA
from bnstats.torch import convert, fold
from bnstats.torch._layers import has_fixed_statistics, is_batchnorm
from tests.torch import timm_patterns as tp
from tests.torch.models import TinyResNet, scramble_batchnorm

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")
FrozenBatchNorm2d = torchvision.ops.misc.FrozenBatchNorm2d

SLOW = pytest.mark.skipif(
    os.environ.get("BNSTATS_SLOW") != "1", reason="slow model: set BNSTATS_SLOW=1"
)
INPUT = (1, 3, 64, 64)


def _frozen_resnet50() -> nn.Module:
    return torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d)


def _converted_resnet18() -> nn.Module:
    return convert(torchvision.models.resnet18(), EMA(0.1))


def _std_conv_resnetv2() -> nn.Module:
    return timm.create_model("resnetv2_18", conv_layer=timm.layers.StdConv2d)


BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "efficientnet_b0": lambda: timm.create_model("efficientnet_b0"),
    "mobilenetv3_large_100": lambda: timm.create_model("mobilenetv3_large_100"),
    "cspresnet50": lambda: timm.create_model("cspresnet50"),
    "repvgg_a0": lambda: timm.create_model("repvgg_a0"),
    "resnet50 (FrozenBatchNorm2d)": _frozen_resnet50,
    "resnet18 (bt.convert)": _converted_resnet18,
    "resnetv2_18 (StdConv2d)": _std_conv_resnetv2,
}
SLOW_MODELS = {"cspresnet50", "repvgg_a0", "resnet50 (FrozenBatchNorm2d)"}
FOLD_ALL = [name for name in BUILDERS if "StdConv2d" not in name]


def prepared(name: str, seed: int = 0) -> nn.Module:
    """The model with random weights and non-trivial statistics, in eval mode."""
    torch.manual_seed(seed)
    model = BUILDERS[name]()
    gen = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, *INPUT[1:], generator=gen) * 2 + 0.5)
        for module in model.modules():
            if has_fixed_statistics(module):
                n = module.running_mean.numel()
                module.weight.copy_(0.5 + torch.rand(n, generator=gen))
                module.bias.copy_(torch.randn(n, generator=gen) * 0.3)
                module.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                module.running_var.copy_(0.5 + torch.rand(n, generator=gen))
    return model.eval()


def norm_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if is_batchnorm(m) or has_fixed_statistics(m)]


@dataclass
class FoldRow:
    """One line of the table in docs/fold.md."""

    name: str
    bn: int
    folded: int
    left: int
    max_rel_error: float
    seconds: float


def fold_row(name: str) -> tuple[FoldRow, nn.Module]:
    model = prepared(name)
    x = torch.randn(*INPUT, generator=torch.Generator().manual_seed(9))
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r"fold\(")  # nothing the caller can fix
        fused = fold(model, example_inputs=x)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        expected, got = model(x).double(), fused(x).double()
    error = float((expected - got).abs().max() / expected.abs().max())
    report = fused.fold_report
    left = len(norm_layers(fused))
    return FoldRow(name, len(report), len(report.folded), left, error, seconds), fused


def _params(names: list[str]) -> list:
    return [pytest.param(n, marks=SLOW) if n in SLOW_MODELS else n for n in names]


# -- the copies in timm_patterns.py behave as the real classes ------------------------------


def test_batchnorm_act_copy_matches_timm():
    torch.manual_seed(0)
    real = timm.layers.BatchNormAct2d(6, act_layer=nn.SiLU)
    ours = tp.BatchNormAct2d(6, act_layer=nn.SiLU)
    ours.load_state_dict(real.state_dict())
    x = torch.randn(4, 6, 5, 5)
    torch.testing.assert_close(ours(x), real(x))
    torch.testing.assert_close(ours.running_var, real.running_var)
    torch.testing.assert_close(ours.eval()(x), real.eval()(x))
    sync_real = timm.layers.convert_sync_batchnorm(nn.Sequential(copy.deepcopy(real)))
    sync_ours = tp.convert_sync_batchnorm(nn.Sequential(copy.deepcopy(ours)))
    assert type(sync_real[0]).__name__ == type(sync_ours[0]).__name__ == "SyncBatchNormAct"
    assert sync_real[0].training == sync_ours[0].training
    torch.testing.assert_close(sync_ours.eval()(x), sync_real.eval()(x))


def test_frozen_and_std_conv_copies_match_the_real_ones():
    real, ours = FrozenBatchNorm2d(5, eps=1e-3), tp.FrozenBatchNorm2d(5, eps=1e-3)
    tp.scramble_frozen(nn.Sequential(ours))
    real.load_state_dict(ours.state_dict())
    x = torch.randn(2, 5, 4, 4)
    torch.testing.assert_close(ours(x), real(x))
    conv_real = timm.layers.StdConv2d(3, 4, 3, padding=1)
    conv_ours = tp.StdConv2dOwnForward(3, 4, 3, padding=1, bias=False)
    conv_ours.load_state_dict(conv_real.state_dict())
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(conv_ours(x), conv_real(x), rtol=1e-5, atol=1e-5)


# -- fold -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", _params(FOLD_ALL))
def test_fold_removes_every_bn_and_keeps_the_eval_outputs(name):
    row, fused = fold_row(name)
    assert row.bn > 0 and row.folded == row.bn and row.left == 0, fused.fold_report.kept
    assert row.max_rel_error <= 1e-5


def test_fold_keeps_the_bn_after_a_weight_standardised_conv():
    row, fused = fold_row("resnetv2_18 (StdConv2d)")
    assert row.max_rel_error <= 1e-5
    std_convs = {n for n, m in fused.named_modules() if isinstance(m, timm.layers.StdConv2d)}
    assert std_convs
    assert not any(e.folded_into in std_convs for e in fused.fold_report.entries)
    codes = {e.code for e in fused.fold_report.kept}
    assert "layer_unsupported" in codes


def test_fold_looks_through_timms_ema_wrapper():
    model = scramble_batchnorm(TinyResNet()).eval()  # the wrapper is what is tested here
    expected = fold(model).fold_report.to_dict()
    for wrapped in (timm.utils.ModelEmaV3(model), timm.utils.ModelEmaV3(torch.compile(model))):
        assert fold(wrapped).fold_report.to_dict() == expected


def test_fold_matches_torch_fx_fuse_where_it_applies():
    """torchvision's resnet18 has only torch's own layers: both fold all 20 BN layers."""
    from torch.fx.experimental.optimization import fuse

    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    model.train()
    with torch.no_grad():
        model(torch.randn(4, *INPUT[1:]))
    model.eval()
    x = torch.randn(*INPUT)
    ours, theirs = fold(model), fuse(model)
    assert len(ours.fold_report.folded) == 20
    assert not any(isinstance(m, nn.BatchNorm2d) for m in theirs.modules())
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def _print_table() -> None:
    print("| model | BN layers | folded | left | max rel. error | fold time (s) |")
    print("|---|---|---|---|---|---|")
    for name in BUILDERS:
        row, _ = fold_row(name)
        print(
            f"| {row.name} | {row.bn} | {row.folded} | {row.left} | "
            f"{row.max_rel_error:.1e} | {row.seconds:.2f} |"
        )


if __name__ == "__main__":
    _print_table()
