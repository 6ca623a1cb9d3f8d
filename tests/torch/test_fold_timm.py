"""fold on the timm/torchvision layer patterns of ``timm_patterns.py``; first, that those
copies behave as torch's own layers where they must (real timm is checked in test_zoo.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.torch import timm_patterns as tp
from tests.torch.models import scramble_batchnorm


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
    assert sync[1].training  # as timm's converter: the new layers start in training mode
    torch.testing.assert_close(sync.eval()(x), net(x))
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
