"""revert_sync_batchnorm: the inverse of torch's own convert_sync_batchnorm."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bnstats.torch as bt
from tests.doc_examples import run_section_examples


class Mixed(nn.Module):
    """BN layers of every rank, in the order the forward uses them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(3, 4, 3)
        self.bn1d = nn.BatchNorm1d(4, eps=1e-3, momentum=0.3)
        self.conv2d = nn.Conv2d(4, 5, 1)
        self.bn2d = nn.BatchNorm2d(5, affine=False)
        self.conv3d = nn.Conv3d(5, 6, 1)
        self.bn3d = nn.BatchNorm3d(6, momentum=None)
        self.fc = nn.Linear(6, 7)
        self.bn_fc = nn.BatchNorm1d(7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, 3, L)
        x = self.bn1d(self.conv1d(x))  # (N, 4, L-2)
        x = self.bn2d(self.conv2d(x.unsqueeze(-1)))  # (N, 5, L-2, 1)
        x = self.bn3d(self.conv3d(x.unsqueeze(-1)))  # (N, 6, L-2, 1, 1)
        return self.bn_fc(self.fc(x.mean(dim=(2, 3, 4))))  # (N, 7)


def _trained(model: nn.Module, x: torch.Tensor) -> nn.Module:
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x + torch.randn_like(x))
    return model


def _kinds(model: nn.Module) -> dict[str, type]:
    return {n: type(m) for n, m in model.named_modules() if "bn" in n}


@pytest.mark.parametrize("example", [False, True])
def test_revert_undoes_convert_sync_batchnorm(example):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 10)
    original = _trained(Mixed(), x)
    original.bn2d.eval()  # a mixed training state must survive
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(original))
    assert all(kind is nn.SyncBatchNorm for kind in _kinds(synced).values())
    reverted = bt.revert_sync_batchnorm(synced, x if example else None)
    assert _kinds(reverted) == _kinds(original)
    for name, module in original.named_modules():
        twin = reverted.get_submodule(name)
        assert twin.training == module.training, name
        if "bn" in name:
            for key in ("eps", "momentum", "affine", "track_running_stats", "num_features"):
                assert getattr(twin, key) == getattr(module, key), (name, key)
            assert not hasattr(twin, "process_group")
    for (key, value), (twin_key, twin_value) in zip(
        original.state_dict().items(), reverted.state_dict().items(), strict=True
    ):
        assert key == twin_key
        torch.testing.assert_close(twin_value, value, rtol=0, atol=0)
    # Same outputs in eval and in training (buffers updated alike), on the CPU.
    original.eval(), reverted.eval()
    torch.testing.assert_close(reverted(x), original(x), rtol=0, atol=0)
    original.train(), reverted.train()
    torch.testing.assert_close(reverted(x), original(x), rtol=0, atol=0)
    torch.testing.assert_close(reverted.bn3d.running_var, original.bn3d.running_var)


def test_parameters_buffers_and_hooks_are_the_same_objects():
    torch.manual_seed(1)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    )
    sync = model[1]
    weight, running_mean = sync.weight, sync.running_mean
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []
    handle = sync.register_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    sync.extra_note = "kept"
    bt.revert_sync_batchnorm(model)
    bn = model[1]
    assert type(bn) is nn.BatchNorm2d
    assert bn.weight is weight and bn.running_mean is running_mean
    model(torch.randn(2, 3, 5, 5)).square().mean().backward()
    before = weight.detach().clone()
    optimizer.step()  # the optimizer built before still updates the layer's weight
    assert not torch.equal(bn.weight.detach(), before)
    assert calls == ["BatchNorm2d"] and bn.extra_note == "kept"
    handle.remove()
    model(torch.randn(2, 3, 5, 5))
    assert calls == ["BatchNorm2d"]


class Squeezed(nn.Module):
    """A Conv2d neighbour, but the BN layer receives (N, C, L): only a forward can tell."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1)
        self.bn = nn.SyncBatchNorm(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x).flatten(2))


def test_example_inputs_decide_where_neighbours_mislead():
    x = torch.randn(4, 2, 3, 3)
    guessed = bt.revert_sync_batchnorm(Squeezed())
    assert type(guessed.bn) is nn.BatchNorm2d  # from the Conv2d before it, as documented
    measured = bt.revert_sync_batchnorm(Squeezed(), x)
    assert type(measured.bn) is nn.BatchNorm1d
    assert measured.training and measured.bn.training
    torch.testing.assert_close(measured.bn.running_mean, torch.zeros(3))  # forward left no trace
    measured(x)  # runs in training mode on the CPU


def test_a_layer_shared_under_two_names_becomes_one_layer():
    bn = nn.SyncBatchNorm(4)
    model = nn.Sequential(nn.Linear(3, 4), bn, nn.Linear(4, 4), bn)
    bt.revert_sync_batchnorm(model)
    assert type(model[1]) is nn.BatchNorm1d and model[1] is model[3]


def test_a_sync_layer_as_the_model_and_wrappers():
    layer = nn.SyncBatchNorm(3)
    assert type(bt.revert_sync_batchnorm(layer, torch.randn(2, 3, 4, 4))) is nn.BatchNorm2d
    with pytest.raises(ValueError, match="SyncBatchNorm <model> \\(3 features\\): no convolution"):
        bt.revert_sync_batchnorm(nn.SyncBatchNorm(3))
    averaged = torch.optim.swa_utils.AveragedModel(
        nn.Sequential(nn.Conv3d(1, 2, 1), nn.SyncBatchNorm(2))
    )
    assert bt.revert_sync_batchnorm(averaged) is averaged
    assert type(averaged.module[1]) is nn.BatchNorm3d


def test_an_undecidable_layer_is_named_and_nothing_changes():
    model = nn.Sequential(
        nn.Conv2d(1, 2, 1), nn.SyncBatchNorm(2), nn.Sequential(nn.SyncBatchNorm(2))
    )
    model[0] = nn.Identity()
    with pytest.raises(ValueError, match="SyncBatchNorm '1' \\(2 features\\)"):
        bt.revert_sync_batchnorm(model)
    assert type(model[1]) is nn.SyncBatchNorm and type(model[2][0]) is nn.SyncBatchNorm
    with pytest.raises(ValueError, match="SyncBatchNorm '0' received a 6-D input"):
        bt.revert_sync_batchnorm(nn.Sequential(nn.SyncBatchNorm(2)), torch.randn(2, 2, 1, 1, 1, 1))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        bt.revert_sync_batchnorm("model")


def test_subclasses_with_their_own_forward_are_left_with_a_warning():
    class SyncBatchNormAct(nn.SyncBatchNorm):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(super().forward(x))

    model = nn.Sequential(nn.Conv2d(1, 2, 1), SyncBatchNormAct(2), nn.SyncBatchNorm(2))
    with pytest.warns(UserWarning, match="'1' \\(SyncBatchNormAct\\): subclasses of SyncBatchNorm"):
        bt.revert_sync_batchnorm(model)
    assert type(model[1]) is SyncBatchNormAct and type(model[2]) is nn.BatchNorm2d


def test_the_reverted_model_folds_and_recalibrates():
    torch.manual_seed(2)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    )
    x = torch.randn(6, 3, 6, 6)
    bt.revert_sync_batchnorm(model)
    bt.recalibrate(model, [x], group=False)
    folded = bt.fold(model.eval())
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())


def test_the_example_in_docs_integrations_md_runs(capsys):
    run_section_examples("integrations.md", "Reverting SyncBatchNorm")
    assert "['BatchNorm2d', 'BatchNorm1d']" in capsys.readouterr().out
