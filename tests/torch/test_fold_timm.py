"""fold on the timm/torchvision layer patterns of ``timm_patterns.py``; first, that those
copies behave as torch's own layers where they must (real timm is checked in test_zoo.py)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.fx.experimental.optimization import fuse as fx_fuse

import bnstats.torch as bt
from bnstats import EMA
from bnstats.torch import FoldTraceError, fold
from bnstats.torch._layers import is_batchnorm
from tests.torch import timm_patterns as tp
from tests.torch.models import TinyResNet, scramble_batchnorm


def _warmed(model: nn.Module, steps: int = 3, seed: int = 0) -> nn.Module:
    """``model`` after a few training-mode forwards (non-trivial statistics), in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(4, 3, 12, 12, generator=gen) * 2 + 0.5)
    return model.eval()


def test_batchnorm_act_is_torch_bn_then_activation_in_both_modes():
    torch.manual_seed(0)
    ours = tp.BatchNormAct2d(6, act_layer=nn.SiLU)
    reference = nn.Sequential(nn.BatchNorm2d(6), nn.SiLU())
    scramble_batchnorm(ours)
    reference[0].load_state_dict(ours.state_dict())
    x = torch.randn(5, 6, 4, 4)
    torch.testing.assert_close(ours(x), reference(x))  # training: batch stats, buffers updated
    torch.testing.assert_close(ours.running_var, reference[0].running_var)
    ours.eval(), reference.eval()
    torch.testing.assert_close(ours(x), reference(x))
    assert set(ours.state_dict()) == set(reference[0].state_dict())


def test_drop_block_is_random_in_training_and_identity_in_eval():
    net = _warmed(tp.conv_bn_act_net(drop_layer=lambda: tp.DropBlock2d(0.3)))
    x = torch.randn(2, 3, 12, 12)
    torch.testing.assert_close(net(x), net(x))
    net.train()
    assert not torch.equal(net[:2](x), net[:2](x))


def test_sync_twin_and_frozen_copy_compute_the_same_eval_outputs():
    net = _warmed(tp.conv_bn_act_net())
    x = torch.randn(2, 3, 12, 12)
    sync = tp.convert_sync_batchnorm(copy.deepcopy(net))
    assert isinstance(sync[1], tp.SyncBatchNormAct) and type(sync[3]) is nn.SyncBatchNorm
    assert not sync[1].training  # the mode is taken over, as by timm's converter
    torch.testing.assert_close(sync(x), net(x))
    frozen = tp.freeze(copy.deepcopy(net))
    assert isinstance(frozen[3], tp.FrozenBatchNorm2d)
    torch.testing.assert_close(frozen(x), net(x))


@pytest.mark.parametrize("conv_cls", [tp.StdConv2d, tp.StdConv2dOwnForward])
def test_std_conv_standardizes_each_filter(conv_cls):
    torch.manual_seed(0)
    conv = conv_cls(3, 4, 3, bias=False)
    plain = nn.Conv2d(3, 4, 3, bias=False)
    w = conv.weight.detach()
    mean = w.mean(dim=(1, 2, 3), keepdim=True)
    std = torch.sqrt(w.var(dim=(1, 2, 3), keepdim=True, correction=0) + conv.eps)
    plain.weight.data.copy_((w - mean) / std)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(conv(x), plain(x))


def test_aux_head_and_detection_models_differ_by_mode():
    aux = tp.AuxHeadNet()
    assert isinstance(aux(torch.randn(2, 3, 8, 8)), tuple)
    assert isinstance(aux.eval()(torch.randn(2, 3, 8, 8)), torch.Tensor)
    det = tp.DetectionNet()
    images = [torch.randn(3, 10, 12), torch.randn(3, 8, 8)]
    assert set(det(images, [{"labels": torch.tensor([1])}] * 2)) == {"loss_score"}
    out = det.eval()(images)
    assert len(out) == 2 and out[0]["scores"].dim() == 1


# -- fold on these patterns ---------------------------------------------------------------

X = torch.randn(3, 3, 12, 12, generator=torch.Generator().manual_seed(5))


def _rel(reference: torch.Tensor, other: torch.Tensor) -> float:
    ref = reference.double()
    return float((ref - other.double()).abs().max() / ref.abs().max())


def _folded(model: nn.Module, example_inputs=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fold(model, example_inputs=example_inputs)


def _norms_left(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if is_batchnorm(m) or tp_frozen(m)]


def tp_frozen(module: nn.Module) -> bool:
    return type(module).__name__.startswith("FrozenBatchNorm")


def _check_exact(model: nn.Module, fused: nn.Module, x: torch.Tensor = X) -> None:
    with torch.no_grad():
        assert _rel(model(x), fused(x)) <= 1e-5


def test_batchnorm_act_folds_and_keeps_drop_and_act_in_its_place():
    model = _warmed(tp.conv_bn_act_net(drop_layer=lambda: tp.DropBlock2d(0.3)))
    fused = fold(model)
    report = fused.fold_report
    assert [(e.name, e.folded_into, e.position) for e in report.entries] == [
        ("1", "0", "after"),
        ("3", "2", "after"),
        ("5", "4", "after"),
    ]
    assert _norms_left(fused) == []
    assert isinstance(fused.get_submodule("1"), nn.Sequential)
    assert isinstance(fused.get_submodule("1.drop"), tp.DropBlock2d)
    assert isinstance(fused.get_submodule("1.act"), nn.ReLU)
    assert list(fused.get_submodule("5")._modules) == ["drop"]  # its act is an Identity
    _check_exact(model, fused)
    reference = fx_fuse(copy.deepcopy(model))  # torch folds only the plain BatchNorm2d
    assert [type(m) for m in reference.modules()].count(nn.BatchNorm2d) == 0
    functional = [n for n in reference.graph.nodes if "batch_norm" in str(n.target)]
    assert len(functional) == 2  # the BatchNormAct2d layers, traced through, stay unfolded
    with torch.no_grad():
        assert _rel(reference(X), fused(X)) <= 1e-5


def test_batchnorm_act_without_activation_also_folds_into_the_next_layer():
    model = nn.Sequential(tp.BatchNormAct2d(3, apply_act=False), nn.Conv2d(3, 4, 1))
    model = _warmed(model)
    fused = fold(model)
    assert fused.fold_report["0"].position == "before"
    _check_exact(model, fused)


def test_activation_inside_the_bn_blocks_folding_into_the_next_layer():
    model = _warmed(nn.Sequential(tp.BatchNormAct2d(3), nn.Conv2d(3, 4, 1)))
    entry = fold(model).fold_report["0"]
    assert entry.code == "norm_act" and "act" in entry.reason


def test_sync_batchnorm_act_folds_with_example_inputs():
    plain = _warmed(tp.conv_bn_act_net(act_layer=nn.SiLU))
    sync = tp.convert_sync_batchnorm(copy.deepcopy(plain)).eval()
    fused = _folded(sync)
    assert {e.code for e in fused.fold_report.kept} == {"needs_example_inputs"}
    fused = fold(sync, example_inputs=X)
    assert len(fused.fold_report.folded) == 3 and _norms_left(fused) == []
    assert isinstance(fused.get_submodule("1.act"), nn.SiLU)
    _check_exact(plain, fused)


def test_frozen_batchnorm_folds_is_reported_and_ignores_the_training_flag():
    model = tp.scramble_frozen(tp.freeze(_warmed(tp.conv_bn_act_net())), seed=3).train()
    assert isinstance(model[3], tp.FrozenBatchNorm2d)
    with pytest.warns(UserWarning, match="training mode"):  # the BatchNormAct2d layers
        fused = fold(model, example_inputs=X)
    assert fused.fold_report["3"].kind == "FrozenBatchNorm2d"
    assert fused.fold_report["3"].folded_into == "2"
    model.eval()
    fused = fold(model, example_inputs=X)
    assert _norms_left(fused) == []
    _check_exact(model, fused)
    with pytest.warns(UserWarning, match="need example_inputs"):
        assert fold(model).fold_report["3"].code == "needs_example_inputs"


def test_frozen_backbone_of_a_detection_model():
    model = tp.scramble_frozen(tp.DetectionNet()).eval()
    scramble_batchnorm(model)
    with pytest.raises(FoldTraceError, match="DetectionNet"):
        fold(model)  # a list of images of any sizes: not symbolically traceable
    batch = torch.randn(2, 3, 10, 10)
    backbone = fold(model.backbone, example_inputs=batch)
    assert [e.kind for e in backbone.fold_report.folded] == ["FrozenBatchNorm2d", "BatchNorm2d"]
    _check_exact(model.backbone, backbone, batch)


@pytest.mark.parametrize(
    ("layer_cls", "method"),
    [(tp.StdConv2d, "Conv2d._conv_forward"), (tp.StdConv2dOwnForward, "Conv2d.forward")],
)
def test_weight_standardized_conv_is_not_folded_into(layer_cls, method):
    model = _warmed(nn.Sequential(layer_cls(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU()))
    fused = fold(model)
    entry = fused.fold_report["1"]
    assert entry.code == "layer_unsupported" and method in entry.reason
    _check_exact(model, fused)


def test_bn_subclass_with_its_own_forward_stays():
    class Scaled(nn.BatchNorm2d):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(nn.Conv2d(3, 4, 3), Scaled(4)).eval()
    entry = fold(model).fold_report["1"]
    assert entry.code == "bn_unsupported" and "Scaled overrides forward" in entry.reason


@pytest.mark.parametrize(
    "build",
    [
        lambda: bt.convert(TinyResNet(), EMA(0.1, debias=True)),
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), bt.BatchRenorm2d(4), nn.ReLU()),
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), bt.GhostBatchNorm2d(4, ghost_size=2)),
    ],
    ids=["converted", "renorm", "ghost"],
)
def test_bnstats_modules_fold_as_torch_batchnorm(build):
    torch.manual_seed(0)
    model = _warmed(build())
    fused = fold(model)  # no example_inputs: bnstats' 2d layers accept only 4-D input
    assert fused.fold_report.kept == [] and _norms_left(fused) == []
    _check_exact(model, fused)


def test_bnstats_batchnorm1d_still_needs_example_inputs():
    model = nn.Sequential(nn.Linear(4, 3), bt.BatchNorm1d(3)).eval()
    with pytest.warns(UserWarning, match="need example_inputs"):
        assert fold(model).fold_report["1"].code == "needs_example_inputs"
    assert fold(model, example_inputs=torch.randn(2, 4)).fold_report["1"].folded


class ModelEmaV3(nn.Module):
    """timm's EMA wrapper, as far as unwrap is concerned: the averaged copy is ``.module``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.module = copy.deepcopy(model)


@pytest.mark.parametrize(
    "wrap",
    [
        nn.DataParallel,
        torch.optim.swa_utils.AveragedModel,
        ModelEmaV3,
        torch.compile,
        lambda m: ModelEmaV3(torch.compile(m)),
    ],
    ids=["DataParallel", "AveragedModel", "ModelEmaV3", "compile", "nested"],
)
def test_wrapped_models_fold_with_the_inner_models_names(wrap):
    model = scramble_batchnorm(TinyResNet()).eval()
    wrapped = wrap(model).eval()
    fused = fold(wrapped)
    assert fused.fold_report.model == "TinyResNet"
    expected = fold(model).fold_report
    assert fused.fold_report.to_dict() == expected.to_dict()
    _check_exact(model, fused)


def test_distributed_data_parallel_folds_with_the_inner_names(tmp_path):
    dist = torch.distributed
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        model = scramble_batchnorm(TinyResNet()).eval()
        fused = fold(nn.parallel.DistributedDataParallel(model))
        assert fused.fold_report.to_dict() == fold(model).fold_report.to_dict()
    finally:
        dist.destroy_process_group()


def test_aux_head_bn_is_reported_as_not_called_in_eval_mode():
    model = scramble_batchnorm(tp.AuxHeadNet()).eval()
    fused = fold(model)
    assert fused.fold_report["aux.1"].code == "not_called"
    assert len(fused.fold_report.folded) == 2
    _check_exact(model, fused)
