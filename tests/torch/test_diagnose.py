"""bt.diagnose: each cause built on purpose on a small model trained on scikit-learn's digits,
named first, its layer first, the settings checked against computations made here with
torch alone (torch.optim.swa_utils.update_bn), and the model left exactly as found."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from torch import nn  # noqa: E402
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn  # noqa: E402

import bnstats.torch as bt  # noqa: E402
from bnstats.data import load_digits  # noqa: E402
from bnstats.torch.diagnose import MIN_GAIN  # noqa: E402

BATCH = 64


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 32),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.Linear(32, 32),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


@pytest.fixture(scope="module")
def data():
    """Train batches of 64 (21 of them, equal sizes) and the test split in batches of 64."""
    torch.set_num_threads(1)
    digits = load_digits(seed=0)
    x, y = torch.tensor(digits.X_train, dtype=torch.float32), torch.tensor(digits.y_train)
    keep = len(x) // BATCH * BATCH
    train = list(zip(x[:keep].split(BATCH), y[:keep].split(BATCH), strict=True))
    x_test = torch.tensor(digits.X_test, dtype=torch.float32)
    test = list(zip(x_test.split(BATCH), torch.tensor(digits.y_test).split(BATCH), strict=True))
    return train, test


def fit(model: nn.Module, batches, epochs: int = 4, ema_from: int | None = None):
    """Adam, lr 0.03; with ``ema_from``, also an EMA of the weights (decay 0.99) from that
    step on, whose BN buffers are the trained model's (torch's AveragedModel keeps them in
    sync): the weights moved, the statistics did not."""
    optimizer = torch.optim.Adam(model.parameters(), 0.03)
    average, step = None, 0
    model.train()
    for _ in range(epochs):
        for x, y in batches:
            if step == ema_from:
                average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.99))
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if average is not None:
                average.update_parameters(model)
    model.eval()
    return model if average is None else (model, average.eval())


@pytest.fixture(scope="module")
def trained(data):
    """The trained model and its EMA-weights twin (stale buffers)."""
    return fit(net(), data[0], ema_from=20)


def healthy(trained, data):
    """The trained model with exact population statistics (recalibrated)."""
    return bt.recalibrate(copy.deepcopy(trained[0]), data[0])


def state(model: nn.Module):
    return (
        {key: value.clone() for key, value in model.state_dict().items()},
        [m.training for m in model.modules()],
        [getattr(m, "momentum", None) for m in model.modules()],
    )


def assert_same_state(model: nn.Module, before) -> None:
    buffers, modes, momenta = before
    after = model.state_dict()
    assert after.keys() == buffers.keys()
    for key, value in buffers.items():
        assert torch.equal(after[key], value), key
    assert [m.training for m in model.modules()] == modes
    assert [getattr(m, "momentum", None) for m in model.modules()] == momenta


def accuracy(model: nn.Module, batches, train_mode: bool = False) -> float:
    model.train(train_mode)
    right = total = 0
    with torch.no_grad():
        for x, y in batches:
            right += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return right / total


def by_update_bn(model: nn.Module, batches) -> nn.Module:
    """A deepcopy recalibrated by torch alone: reset, momentum None, update_bn."""
    copied = copy.deepcopy(model)
    for module in copied.modules():
        if isinstance(module, nn.BatchNorm1d):
            module.reset_running_stats()
            module.momentum = None
    update_bn([x for x, _ in batches], copied)
    return copied.eval()


def test_healthy_model_raises_no_finding_and_settings_match_torch(trained, data):
    train, test = data
    model = healthy(trained, data)
    before = state(model)
    report = bt.diagnose(model, train, test, progress=False)
    assert_same_state(model, before)
    assert [f for f in report.findings if f.gain >= MIN_GAIN] == []
    one = 1 / report.samples + 1e-12
    settings = report.settings
    assert settings["as_is"].accuracy == pytest.approx(accuracy(copy.deepcopy(model), test))
    assert settings["recalibrated"].accuracy == pytest.approx(
        accuracy(by_update_bn(model, train), test), abs=one
    )
    assert settings["test_statistics"].accuracy == pytest.approx(
        accuracy(by_update_bn(model, test), test), abs=one
    )
    assert settings["batch_statistics"].accuracy == pytest.approx(
        accuracy(copy.deepcopy(model), test, train_mode=True)
    )
    assert settings["recalibrated"].output_change < 1e-6
    assert report.samples == sum(len(y) for _, y in test)
    assert report.to_dict()["findings"] == []


def test_statistics_reset(trained, data):
    model = copy.deepcopy(trained[0])
    for module in model.modules():
        if isinstance(module, nn.BatchNorm1d):
            module.reset_running_stats()
    report = bt.diagnose(model, *data, progress=False)
    first = report.findings[0]
    assert first.kind == "stale_statistics" and first.remedy == "bt.recalibrate(model, batches)"
    assert first.gain > 0.05
    settings = report.settings
    assert first.gain == pytest.approx(
        settings["recalibrated"].accuracy - settings["as_is"].accuracy
    )
    hand = by_update_bn(model, data[0])
    with torch.no_grad():
        outputs = [(model(x), hand(x)) for x, _ in data[1]]
    change = (
        sum(float(((b - a) ** 2).sum()) for a, b in outputs)
        / sum(float((a**2).sum()) for a, _ in outputs)
    ) ** 0.5
    # update_bn's variance is the mean of the batches' variances, without the spread of the
    # batch means that the population variance holds: a few parts in a thousand here
    assert settings["recalibrated"].output_change == pytest.approx(change, rel=5e-3)


def test_one_corrupted_layer_comes_first(trained, data):
    model = healthy(trained, data)
    with torch.no_grad():
        model[4].running_mean.add_(torch.randn(32, generator=torch.Generator().manual_seed(0)))
        model[4].running_var.mul_(3)
    report = bt.diagnose(model, *data, progress=False)
    first = report.findings[0]
    assert first.kind == "stale_statistics" and first.layers[0] == "4"
    assert report.layers[0].name == "4"
    assert report.layers[0].accuracy_gain > 0.02 and report.layers[1].accuracy_gain == 0
    assert "'4'" in first.evidence


def test_ema_weights_with_stale_buffers(trained, data):
    averaged = trained[1]
    report = bt.diagnose(averaged, *data, progress=False)
    assert report.findings[0].kind == "stale_statistics"
    assert report.findings[0].remedy.startswith("bt.recalibrate(model, batches")
    assert report.settings["recalibrated"].accuracy == pytest.approx(
        accuracy(by_update_bn(averaged.module, data[0]), data[1]), abs=1 / report.samples
    )


def test_contrast_shift_of_the_test_set(trained, data):
    model = healthy(trained, data)
    shifted = [((x - 0.5) * 0.4 + 0.5, y) for x, y in data[1]]
    report = bt.diagnose(model, data[0], shifted, progress=False)
    first = report.findings[0]
    assert first.kind == "distribution_shift" and "bt.adapt(model, test_batches" in first.remedy
    assert first.gain > 0.2
    adapted = copy.deepcopy(model)
    exec(first.remedy, {"bt": bt, "model": adapted, "test_batches": shifted, "batches": data[0]})
    base = max(report.settings[k].accuracy for k in ("as_is", "recalibrated", "recalibrated_eval"))
    assert accuracy(adapted, shifted) == pytest.approx(base + first.gain, abs=1e-9)


def test_model_left_in_train_mode(trained, data):
    model = healthy(trained, data).train()
    small = [(x, y) for batch in data[1] for x, y in zip(*(t.split(4) for t in batch), strict=True)]
    before = state(model)
    report = bt.diagnose(model, data[0], small, progress=False)
    assert_same_state(model, before)
    first = report.findings[0]
    assert first.kind == "left_in_train_mode" and first.remedy == "model.eval()"
    assert first.layers == ["1", "4"] and first.gain > 0.05
    assert report.settings["batch_statistics"].accuracy == pytest.approx(
        accuracy(copy.deepcopy(model), small, train_mode=True)
    )


def offset_batches(data, seed: int):
    """Batches of 16 that each share a random offset: non-i.i.d. batches (one site each)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.cat([x for x, _ in data])
    y = torch.cat([y for _, y in data])
    return [
        (xs + torch.randn(1, generator=generator) * 0.5, ys)
        for xs, ys in zip(x.split(16), y.split(16), strict=True)
    ]


def test_model_trained_on_small_non_iid_batches(data):
    train = offset_batches(data[0], 3)
    model = fit(net(), train, epochs=2)
    report = bt.diagnose(model, train, offset_batches(data[1], 4), progress=False)
    first = report.findings[0]
    assert first.kind == "batch_dependence" and "Batch Renorm" in first.remedy
    assert first.gain > 0.1
    assert sorted(first.layers) == ["1", "4"]


def test_model_unchanged_when_the_forward_raises_midway(trained, data):
    model = copy.deepcopy(trained[0])
    model[1].momentum = 0.3
    model[4].train()
    calls = {"n": 0}

    def user_hook(module, args):
        calls["n"] += 1

    model[1].register_forward_pre_hook(user_hook)
    hooks = (dict(model[1]._forward_pre_hooks), dict(model[4]._forward_hooks))
    before = state(model)

    def failing(module, batch):
        calls["n"] += 1
        if calls["n"] > 150:
            raise RuntimeError("injected")
        return module(batch[0])

    with pytest.raises(RuntimeError, match="injected"):
        bt.diagnose(model, *data, forward=failing, progress=False)
    assert_same_state(model, before)
    assert (dict(model[1]._forward_pre_hooks), dict(model[4]._forward_hooks)) == hooks


def test_frozen_layer_far_from_the_data(trained, data):
    model = healthy(trained, data)
    bn = model[1]
    frozen = FrozenBatchNorm1d(bn)
    with torch.no_grad():
        frozen.running_mean.add_(0.5)
    model[1] = frozen
    report = bt.diagnose(model, *data, progress=False)
    assert report.findings[0].kind == "frozen_statistics"
    assert report.findings[0].layers == ["1"]
    assert torch.equal(frozen.running_mean, bn.running_mean + 0.5)


class FrozenBatchNorm1d(nn.Module):
    """Like torchvision's FrozenBatchNorm2d, for (N, C) inputs: fixed statistics in buffers."""

    def __init__(self, bn: nn.BatchNorm1d) -> None:
        super().__init__()
        for key in ("weight", "bias"):
            self.register_buffer(key, getattr(bn, key).detach().clone())
        for key in ("running_mean", "running_var"):
            self.register_buffer(key, getattr(bn, key).clone())
        self.eps = bn.eps

    def forward(self, x):
        scale = self.weight / (self.running_var + self.eps).sqrt()
        return x * scale + (self.bias - self.running_mean * scale)


def test_without_labels_and_grouped_layers():
    """Outputs only (no labels): output changes; more layers than max_layers: groups."""
    from tests.torch.models import mlp, scramble_batchnorm

    model = scramble_batchnorm(mlp((16, 12, 10, 8, 6, 3)), seed=1, tracked=1000).eval()
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(32, 16, generator=generator) for _ in range(3)]
    before = state(model)
    report = bt.diagnose(model, batches, max_layers=2, progress=False)
    assert_same_state(model, before)
    assert not report.labelled and report.settings["as_is"].accuracy is None
    assert "2 groups" in report.attribution and report.layers[0].group is not None
    assert report.findings[0].kind == "stale_statistics"
    assert report.findings[0].gain == report.settings["recalibrated"].output_change
    assert "output change" in str(report)


def test_without_labels_test_data_like_the_training_data_is_no_shift():
    """Stale statistics, test data from the training distribution, no labels: the test data's
    own statistics change the outputs about as much as recalibrating does, so no
    distribution_shift (it was judged against as_is, which changes nothing)."""
    from tests.torch.models import mlp, scramble_batchnorm

    model = scramble_batchnorm(mlp((16, 12, 10, 3)), seed=1, tracked=1000).eval()
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(32, 16, generator=generator) for _ in range(4)]
    test_batches = [torch.randn(32, 16, generator=generator) for _ in range(4)]
    report = bt.diagnose(model, batches, test_batches, progress=False)
    settings = report.settings
    assert settings["test_statistics"].output_change > 0.05  # far from as_is
    assert [finding.kind for finding in report.findings] == ["stale_statistics"]


def test_one_shot_iterators_are_refused(trained, data):
    with pytest.raises(TypeError, match="iterable it can go over again"):
        bt.diagnose(trained[0], iter(data[0]), progress=False)
    with pytest.raises(ValueError, match="max_layers"):
        bt.diagnose(trained[0], data[0], max_layers=0)
