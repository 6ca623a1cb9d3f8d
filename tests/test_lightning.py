"""BatchNormRecalibration in real Lightning fits on the CPU."""

from __future__ import annotations

import copy
import importlib
import sys
import warnings

import pytest

from tests.doc_examples import run_section_examples
from tests.optional import optional_import

torch = pytest.importorskip("torch")
pl = optional_import("lightning.pytorch")

from lightning.pytorch.callbacks import EMAWeightAveraging  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import bnstats.torch as bt  # noqa: E402
from bnstats.data import load_digits  # noqa: E402
from bnstats.lightning import BatchNormRecalibration  # noqa: E402

BN_BUFFERS = ("running_mean", "running_var")


class Classifier(pl.LightningModule):
    """A BN MLP on the digits; records each validation's accuracy and the buffers it used."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(),
            nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Dropout(0.1),
            nn.Linear(64, 10),
        )  # fmt: skip
        self.validated_with: list[dict[str, torch.Tensor]] = []
        self.val_accuracy: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        if self.trainer.sanity_checking:
            return
        if batch_idx == 0:
            self.validated_with.append(copy.deepcopy(self.state_dict()))
        x, y = batch
        self.val_accuracy.append(float((self(x).argmax(1) == y).float().mean()))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class AccuracyBefore(pl.Callback):
    """Eval accuracy and state at validation start, before the recalibration (listed after
    any averaging callback, so it sees the weights being validated)."""

    def __init__(self, val_loader) -> None:
        self.val_loader = val_loader
        self.accuracy: list[float] = []
        self.states: list[dict[str, torch.Tensor]] = []

    def on_validation_epoch_start(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        self.states.append(copy.deepcopy(pl_module.state_dict()))
        (x, y), *_ = self.val_loader
        with torch.no_grad():
            self.accuracy.append(float((pl_module(x).argmax(1) == y).float().mean()))


def _loaders(shuffle: bool):
    data = load_digits(seed=0)
    train = TensorDataset(
        torch.tensor(data.X_train, dtype=torch.float32), torch.tensor(data.y_train)
    )
    val = TensorDataset(torch.tensor(data.X_test, dtype=torch.float32), torch.tensor(data.y_test))
    return DataLoader(train, batch_size=64, shuffle=shuffle), DataLoader(val, batch_size=450)


def _fit(model, callbacks, train, val, **kwargs) -> pl.Trainer:
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=kwargs.pop("logger", False),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **kwargs,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(model, train, val)
    return trainer


def _first_samples(loader, count: int) -> list:
    """The first ``count`` samples of ``loader``'s batches, the last batch cut."""
    batches, taken = [], 0
    for x, y in loader:
        keep = min(len(x), count - taken)
        batches.append((x[:keep], y[:keep]))
        taken += keep
        if taken == count:
            return batches
    return batches


def _assert_same_buffers(state: dict, expected: nn.Module) -> None:
    for name, module in expected.named_modules():
        if isinstance(module, nn.BatchNorm1d):
            for key in BN_BUFFERS:
                got = state[f"{name}.{key}"]
                torch.testing.assert_close(got, getattr(module, key), rtol=0, atol=0)


def test_validation_uses_the_buffers_bt_recalibrate_gives_on_the_same_batches():
    torch.manual_seed(0)
    train, val = _loaders(shuffle=False)
    model = Classifier()
    before = AccuracyBefore(val)
    callback = BatchNormRecalibration(max_samples=200)  # crosses a batch: 64 + 64 + 64 + 8
    _fit(model, [before, callback], train, val)
    assert [entry["when"] for entry in callback.history] == ["validation", "validation", "fit_end"]
    for state, used in zip(before.states, model.validated_with, strict=True):
        reference = Classifier()
        reference.load_state_dict(state)
        reference.train()
        bt.recalibrate(reference, train, max_samples=200)
        _assert_same_buffers(used, reference)
        assert all(reference.training for reference in reference.modules())
    final = copy.deepcopy(model)
    bt.recalibrate(final, train, max_samples=200)  # at_fit_end: the final weights
    _assert_same_buffers(model.state_dict(), final)
    moved = callback.history[0]
    assert [row["name"] for row in moved["layers"]] == ["net.1", "net.4"]
    # The numbers are bt.audit's for the old statistics on the same samples.
    reference = Classifier()
    reference.load_state_dict(before.states[0])
    report = bt.audit(reference, _first_samples(train, 200))
    for row, layer in zip(moved["layers"], report.layers, strict=True):
        assert row["mean_shift"] == pytest.approx(layer.mean_shift.worst, rel=1e-4)
        assert row["var_ratio"] == pytest.approx(layer.var_ratio.worst, rel=1e-4)
    assert moved["max_mean_shift"] == max(row["mean_shift"] for row in moved["layers"])


@pytest.mark.parametrize("use_buffers", [True, False])
def test_averaged_weights_validate_far_better_after_recalibration(use_buffers, capsys):
    """EMAWeightAveraging validates the averaged weights with averaged running statistics
    (``use_buffers=True``, Lightning's default) or with those of the step it was created at
    (``False``); recalibrated, the same weights do much better."""
    torch.manual_seed(0)
    train, val = _loaders(shuffle=True)
    model = Classifier()
    before = AccuracyBefore(val)
    averaging = EMAWeightAveraging(decay=0.99, use_buffers=use_buffers)
    callbacks = [averaging, before, BatchNormRecalibration(max_samples=1024)]
    _fit(model, callbacks, train, val, num_sanity_val_steps=0)
    stale, recalibrated = before.accuracy, model.val_accuracy
    with capsys.disabled():
        print(
            f"\nEMA weights (use_buffers={use_buffers}), val accuracy per epoch: stale BN "
            f"buffers {[round(a, 3) for a in stale]}, recalibrated "
            f"{[round(a, 3) for a in recalibrated]}"
        )
    assert len(stale) == len(recalibrated) == 2
    assert recalibrated[0] > stale[0] + 0.2  # early in training the gap is widest
    for s, r in zip(stale, recalibrated, strict=True):
        assert r > s + (0.1 if not use_buffers else -0.01)
    assert recalibrated[-1] > 0.9


def test_every_n_epochs_and_the_logged_numbers(tmp_path):
    torch.manual_seed(0)
    train, val = _loaders(shuffle=False)
    callback = BatchNormRecalibration(max_samples=128, every_n_epochs=2, at_fit_end=False)
    logger = pl.loggers.CSVLogger(tmp_path, name="run")
    _fit(Classifier(), [callback], train, val, logger=logger, num_sanity_val_steps=0)
    assert [(e["epoch"], e["when"]) for e in callback.history] == [(1, "validation")]
    logged = (tmp_path / "run" / "version_0" / "metrics.csv").read_text()
    assert "bn_recalibration/max_mean_shift" in logged
    assert "bn_recalibration/worst_var_ratio" in logged


@pytest.mark.parametrize("one_batch_bytes", [None, 0])
def test_eval_mode_gives_the_buffers_of_bt_recalibrate_in_eval_mode(one_batch_bytes):
    torch.manual_seed(0)
    train, val = _loaders(shuffle=False)
    model = Classifier()
    before = AccuracyBefore(val)
    options = {"max_samples": 200, "mode": "eval", "one_batch_bytes": one_batch_bytes}
    callback = BatchNormRecalibration(**options, at_fit_end=False)
    _fit(model, [before, callback], train, val)
    for state, used in zip(before.states, model.validated_with, strict=True):
        reference = Classifier()
        reference.load_state_dict(state)
        bt.recalibrate(reference, train, **options)
        _assert_same_buffers(used, reference)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="mode='test' is not supported; choose one of"):
        BatchNormRecalibration(mode="test")
    with pytest.raises(ValueError, match="every_n_epochs must be a positive integer"):
        BatchNormRecalibration(every_n_epochs=0)
    with pytest.raises(ValueError, match="max_samples must be a positive integer or None"):
        BatchNormRecalibration(max_samples=0)


def test_the_example_in_docs_integrations_md_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = run_section_examples("integrations.md", "Lightning: recalibrate before validation")
    assert namespace["recalibration"].history


def test_without_lightning_the_import_error_says_what_to_install(monkeypatch):
    for name in ("lightning", "lightning.pytorch"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    monkeypatch.delitem(sys.modules, "bnstats.lightning")
    with pytest.raises(ImportError, match=r'pip install "\.\[lightning\]"'):
        importlib.import_module("bnstats.lightning")


def _fit_with_bar(bar, callbacks, train, val):
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[*callbacks, bar],
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(callbacks[0].model, train, val)


@pytest.mark.parametrize("kind", ["tqdm", "rich"])
def test_the_recalibration_shows_in_lightnings_own_progress_bar(kind, capsys, monkeypatch):
    """With Lightning's bars on, the recalibration gets a bar of Lightning's own progress-bar
    callback, counting samples; the buffers are unchanged by it."""
    torch.manual_seed(0)
    train, val = _loaders(shuffle=False)
    model = Classifier()
    before = AccuracyBefore(val)
    before.model = model
    callback = BatchNormRecalibration(max_samples=200, at_fit_end=False)
    tasks = []
    if kind == "rich":
        rich_progress = pytest.importorskip("rich.progress")
        add_task = rich_progress.Progress.add_task

        def recording(self, description, *args, **kwargs):
            tasks.append(description)
            return add_task(self, description, *args, **kwargs)

        monkeypatch.setattr(rich_progress.Progress, "add_task", recording)
        bar = pl.callbacks.RichProgressBar()
    else:
        bar = pl.callbacks.TQDMProgressBar()
    _fit_with_bar(bar, [before, callback], train, val)
    if kind == "rich":
        assert "BN recalibration" in tasks
    else:
        captured = capsys.readouterr()  # Lightning's tqdm bars write to stdout
        assert "BN recalibration" in captured.out + captured.err
    reference = Classifier()
    reference.load_state_dict(before.states[0])
    bt.recalibrate(reference, train, max_samples=200)
    _assert_same_buffers(model.validated_with[0], reference)


# -- what a user may hand the callback -------------------------------------------------------


class CountingSteps(Classifier):
    def __init__(self) -> None:
        super().__init__()
        self.steps = 0

    def training_step(self, batch, batch_idx):
        self.steps += 1
        return super().training_step(batch, batch_idx)


class NoBatchNorm(CountingSteps):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def test_a_model_without_batch_norm_is_refused_before_any_training():
    train, val = _loaders(shuffle=False)
    model = NoBatchNorm()
    with pytest.raises(ValueError, match="BatchNormRecalibration: NoBatchNorm has no batch-norm"):
        _fit(model, [BatchNormRecalibration(max_samples=64)], train, val)
    assert model.steps == 0


def test_a_list_of_batches_is_one_dataloader():
    torch.manual_seed(0)
    train, val = _loaders(shuffle=False)
    batches = _first_samples(train, 150)
    model = Classifier()
    callback = BatchNormRecalibration(max_samples=None, dataloader=batches)
    _fit(model, [callback], train, val)
    assert [entry["when"] for entry in callback.history] == ["validation", "validation", "fit_end"]
    final = copy.deepcopy(model)
    bt.recalibrate(final, batches)
    _assert_same_buffers(model.state_dict(), final)


class AuxiliaryLoss(Classifier):
    """A BN layer in an auxiliary head that only the training step uses."""

    def __init__(self) -> None:
        super().__init__()
        self.aux = nn.Sequential(nn.Linear(64, 8), nn.BatchNorm1d(8), nn.Linear(8, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        main = nn.functional.cross_entropy(self(x), y)
        return main + 0.1 * nn.functional.cross_entropy(self.aux(x), y)


def test_unreached_keep_passes_through_for_a_training_only_head():
    torch.manual_seed(0)
    train, val = _loaders(shuffle=False)
    with pytest.raises(ValueError, match=r"no forward reached BN layer\(s\) 'aux.1'"):
        _fit(AuxiliaryLoss(), [BatchNormRecalibration(max_samples=64)], train, val)
    model = AuxiliaryLoss()
    callback = BatchNormRecalibration(max_samples=64, unreached="keep", at_fit_end=False)
    with pytest.warns(UserWarning, match="no forward reached, kept as they were: 'aux.1'"):
        _fit(model, [callback], train, val)
    assert [entry["when"] for entry in callback.history] == ["validation", "validation"]
    assert {row["name"] for row in callback.history[0]["layers"]} == {"net.1", "net.4", "aux.1"}
    kept = next(row for row in callback.history[0]["layers"] if row["name"] == "aux.1")
    assert kept["mean_shift"] == 0 and kept["var_ratio"] == 1


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"max_samples": 1.5}, ValueError, "max_samples must be a positive integer"),
        ({"max_samples": True}, ValueError, "max_samples must be a positive integer"),
        ({"unreached": "ignore"}, ValueError, "unreached must be one of"),
        ({"nonfinite": "drop"}, ValueError, "nonfinite must be one of"),
        ({"tolerance": 0}, ValueError, "tolerance must be a positive number"),
        ({"one_batch_bytes": -1}, ValueError, "one_batch_bytes must be a number of bytes"),
        ({"forward": "model(x)"}, TypeError, "forward must be callable"),
    ],
)
def test_the_pass_options_are_checked_when_the_callback_is_made(options, error, match):
    with pytest.raises(error, match=match):
        BatchNormRecalibration(**options)
