"""The passes (recalibrate, audit, adapt) on the patterns of real model zoos that torch's own
layers do not show: BN subclasses with their own forward, drop layers inside BN layers,
SyncBatchNorm twins, frozen BN, aux heads, wrappers, NaN batches, fresh layers."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

import bnstats
import bnstats.torch as bt
from tests.torch import reference as ref
from tests.torch import timm_patterns as timm
from tests.torch import zoo


def _images(n_batches: int = 4, size: int = 6, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, 10, 10, generator=gen) * 2 + 1 for _ in range(n_batches)]


def _stale(model: nn.Module) -> nn.Module:
    """Statistics deliberately wrong, as after training on other data."""
    torch.manual_seed(1)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 10, 10) * 5)
    return model.eval()


def _worst_relative(model: nn.Module, seen: dict[str, list[np.ndarray]]) -> float:
    got, worst = ref.buffers(model), 0.0
    for name, per_batch in seen.items():
        mu, var = ref.population(per_batch)
        worst = max(worst, float(np.max(np.abs(got[name]["var"] - var) / var)))
        worst = max(worst, float(np.max(np.abs(got[name]["mean"] - mu) / np.sqrt(var))))
    return worst


def test_a_syncbatchnorm_subclass_keeps_its_activation_in_the_pass():
    """timm's convert_sync_batchnorm gives SyncBatchNormAct: its act and drop are part of the
    layer, so the next layers must be measured on activated values, as with the original."""
    torch.manual_seed(0)
    plain = _stale(timm.conv_bn_act_net())
    synced = timm.convert_sync_batchnorm(copy.deepcopy(plain))
    assert any(isinstance(m, timm.SyncBatchNormAct) for m in synced.modules())
    data = _images()
    torch.testing.assert_close(synced(data[0]), plain(data[0]))
    seen = ref.bn_inputs(plain, data)  # no drop layer: every module's own forward, eval
    bt.recalibrate(plain, data)
    bt.recalibrate(synced, data)
    assert _worst_relative(plain, seen) < 1e-5
    assert ref.same_state(synced, ref.snapshot(plain))


def test_a_drop_layer_inside_a_bn_layer_stays_in_eval_mode():
    """BatchNormAct2d(drop_layer=DropBlock2d): the BN layer's own flag goes to training,
    its drop child stays in eval, so the result is deterministic and equals the model
    without the drop layer."""
    torch.manual_seed(0)
    with_drop = _stale(timm.conv_bn_act_net(drop_layer=lambda: timm.DropBlock2d(0.3)))
    without = timm.conv_bn_act_net()
    without.load_state_dict(with_drop.state_dict())
    data = _images()
    first, second = copy.deepcopy(with_drop), copy.deepcopy(with_drop)
    bt.recalibrate(first, data)
    bt.recalibrate(second, data)
    bt.recalibrate(without, data)
    assert ref.same_state(first, ref.snapshot(second))
    assert ref.same_state(first, ref.snapshot(without))
    assert all(not m.training for m in first.modules())


def test_frozen_batchnorm_is_found_reported_and_left_alone():
    model = timm.scramble_frozen(timm.DetectionNet())
    frozen_before = model.backbone[1].running_var.clone()
    images = [list(torch.randn(2, 3, 8, 8).unbind()) for _ in range(3)]
    with pytest.warns(UserWarning, match="fixed statistics left as they are: 'backbone.1'"):
        bt.recalibrate(model, images, forward=lambda m, batch: m(batch))
    assert torch.equal(model.backbone[1].running_var, frozen_before)
    report = bt.audit(model, images, forward=lambda m, batch: m(batch))
    assert report.fixed == ["backbone.1"] and [layer.name for layer in report.layers] == [
        "backbone.4"
    ]
    assert "fixed statistics (not audited): backbone.1" in str(report)


def test_a_detection_batch_of_images_needs_forward_and_works_with_it():
    model = timm.DetectionNet(norm_layer=nn.BatchNorm2d)
    images = [list(torch.randn(3, 3, 8, 8).unbind()) for _ in range(2)]
    with pytest.raises((TypeError, RuntimeError, ValueError)):
        bt.recalibrate(copy.deepcopy(model), images)  # model(batch[0]): one image, no list
    bt.recalibrate(model, images, forward=lambda m, batch: m(batch))
    assert int(model.backbone[4].num_batches_tracked) == 2


def test_a_dict_batch_the_model_does_not_take_says_to_pass_forward():
    with pytest.raises(TypeError, match="pass forward="):
        bt.recalibrate(zoo.build("mlp"), [{"pixels": torch.randn(4, 16)}])


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_nonfinite_batches_raise_naming_the_batch_or_are_skipped(policy):
    model, data = zoo.build("mlp"), zoo.batches("mlp")
    clean = [batch for index, batch in enumerate(data) if index != 2]
    data[2] = data[2].clone()
    data[2][0, 3] = float("nan")
    saved = ref.snapshot(model)
    if policy == "raise":
        with pytest.raises(bnstats.NonFiniteStatisticsError, match=r"BN layer '1': batch 2 "):
            bt.recalibrate(model, data, nonfinite="raise")
        assert ref.same_state(model, saved)
        return
    expected = copy.deepcopy(model)
    bt.recalibrate(expected, clean)
    with pytest.warns(UserWarning, match="left out for NaN or Inf"):
        bt.recalibrate(model, data, nonfinite="skip")
    for name, values in ref.buffers(expected).items():
        got = ref.buffers(model)[name]
        np.testing.assert_allclose(got["mean"], values["mean"], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(got["var"], values["var"], rtol=1e-6)


@pytest.mark.parametrize("bad", [2.5, 0, -3, True, "10"])
def test_max_samples_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="max_samples must be a positive integer"):
        bt.recalibrate(zoo.build("mlp"), zoo.batches("mlp"), max_samples=bad)


def test_unreached_layers_are_kept_when_asked():
    model = timm.AuxHeadNet()
    aux_before = ref.snapshot(model.aux)
    data = _images()
    with pytest.raises(ValueError, match="reached BN layer\\(s\\) 'aux.1'.*unreached='keep'"):
        bt.recalibrate(model, data)
    with pytest.warns(UserWarning, match="kept as they were: 'aux.1'"):
        bt.recalibrate(model, data, unreached="keep")
    assert ref.same_state(model.aux, aux_before)
    assert int(model.stem[1].num_batches_tracked) == len(data)
    assert bt.audit(model, data, unreached="keep").unreached == ["aux.1"]


def test_num_batches_tracked_none_does_not_break_all_or_nothing():
    model = zoo.build("mlp")
    model[1].num_batches_tracked = None  # torch's forward allows it
    bt.recalibrate(model, zoo.batches("mlp"))
    assert model[1].num_batches_tracked is None
    assert int(model[4].num_batches_tracked) == len(zoo.batches("mlp"))


class ModelEmaV3(nn.Module):
    """timm's EMA wrapper, as far as bnstats sees it: the averaged copy in ``.module``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.module = copy.deepcopy(model)


WRAPPERS = {
    "DataParallel": lambda m: (nn.DataParallel(m), m),
    "AveragedModel": lambda m: (lambda a: (a, a.module))(AveragedModel(m)),
    "compiled": lambda m: (torch.compile(m, backend="eager"), m),
    "ModelEmaV3": lambda m: (lambda e: (e, e.module))(ModelEmaV3(m)),
}


@pytest.mark.parametrize("kind", sorted(WRAPPERS))
def test_wrappers_are_looked_through_with_the_inner_names(kind):
    model, data = zoo.build("mlp"), zoo.batches("mlp")
    expected = bt.recalibrate(copy.deepcopy(model), data)
    wrapper, inner = WRAPPERS[kind](model)
    bt.recalibrate(wrapper, data)
    assert ref.same_state(inner, ref.snapshot(expected))
    report = bt.audit(wrapper, data)
    assert [layer.name for layer in report.layers] == ["1", "4"]


def test_adapt_warns_about_layers_never_updated_and_adapts_them_fully():
    model = zoo.build("mlp")
    model[1].reset_running_stats()
    target = [batch * 2 + 1 for batch in zoo.batches("mlp")]
    full = bt.recalibrate(copy.deepcopy(model), target)
    with pytest.warns(UserWarning, match="'1' were never updated"):
        bt.adapt(model, target, prior=16)
    torch.testing.assert_close(model[1].running_mean, full[1].running_mean)
    with pytest.raises(ValueError, match="never updated"):
        fresh = zoo.build("mlp")
        fresh[1].reset_running_stats()
        bt.adapt(fresh, target, never_updated="raise")


def test_different_calls_on_one_process_need_no_agreement():
    """Without a group each call stands alone (the exchange is for torch.distributed)."""
    model = zoo.build("mlp")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bt.recalibrate(model, zoo.batches("mlp"))
        bt.audit(model, zoo.batches("mlp"))
