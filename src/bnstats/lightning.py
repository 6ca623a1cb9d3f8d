"""A Lightning callback that recalibrates batch norm's statistics before validation.

Averaged weights come with averaged or stale BN buffers: Lightning's ``WeightAveraging``
and ``EMAWeightAveraging`` average the running statistics like weights (or keep the ones of
the step they started, with ``use_buffers=False``), and an EMA of the weights is a network
no batch ever ran through. Its eval-mode accuracy then says little about the weights
(timm#245: EMA validation at about 53 % instead of 78 %). :class:`BatchNormRecalibration`
runs :func:`bnstats.torch.recalibrate` on the weights being validated, on a bounded number
of training samples, just before each validation, and once more on the final weights at
the end of ``fit``.

Needs the ``lightning`` extra (``pip install ".[lightning]"``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

try:
    import lightning.pytorch as pl
except ImportError as error:  # the optional extra is missing
    raise ImportError(
        'bnstats.lightning needs Lightning: pip install ".[lightning]" (from a checkout of bnstats)'
    ) from error

from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

import bnstats.torch as bt
from bnstats.torch.options import Forward, PassOptions

MODES = ("train", "eval")
"""The ``mode`` values of :func:`bnstats.torch.recalibrate`: ``"train"``, the BN layers in
training mode and every other module in eval mode during the pass; ``"eval"``, each BN
layer measured on what it receives when the layers before it use their final statistics."""


class BatchNormRecalibration(pl.Callback):
    """Recalibrate the BN statistics of the model being validated, before each validation.

    At the first validation batch of every ``every_n_epochs``-th epoch of ``fit`` (after
    the other callbacks' ``on_validation_epoch_start``, so the weights are those being
    validated, the averaged ones under ``WeightAveraging``), and once at the end of ``fit``
    (after ``WeightAveraging``/``StochasticWeightAveraging`` have copied their average into
    the model), every BN layer's ``running_mean``/``running_var`` become the exact
    population statistics over the first ``max_samples`` samples of the training batches::

        bt.recalibrate(pl_module, dataloader, max_samples=max_samples, forward=forward)

    ``dataloader`` defaults to the trainer's train dataloader (a fresh pass; under DDP each
    rank reads its own shard and, through ``recalibrate``'s ``group``, every rank ends with
    identical buffers computed over all ranks' samples). The modes, momenta and hooks of the
    model are left as found. The sanity check is skipped.

    How far the statistics moved is logged to the trainer's loggers at each recalibration,
    with :func:`bnstats.torch.audit`'s measures of the old statistics against the new ones:
    ``bn_recalibration/max_mean_shift``, the largest ``|old - new mean| / sqrt(new var +
    eps)`` over all layers and channels, and ``bn_recalibration/worst_var_ratio``, the
    ``(old var + eps) / (new var + eps)`` farthest from 1. :attr:`history` keeps one entry
    per recalibration with each layer's worst channel (``name``, ``mean_shift``,
    ``var_ratio``), as ``bnstats recalibrate`` prints them.

    Args:
        max_samples: samples (first dimension of the batches) to recalibrate on; ``None``:
            one whole pass over the dataloader.
        every_n_epochs: recalibrate before the validations of epochs ``n - 1``, ``2n - 1``,
            ...; the validations in between use the statistics as they are.
        mode: ``"train"`` (default) or ``"eval"``, as for :func:`bnstats.torch.recalibrate`
            (anything else raises ``ValueError``).
        dataloader: the batches to recalibrate on, instead of the train dataloader: a
            DataLoader or any iterable of batches (a list of batches is one loader).
        forward: ``forward(model, batch)``, how to call the model on one batch (default:
            ``model(batch[0])`` for the ``(input, target)`` tuples of a labelled dataset).
        at_fit_end: also recalibrate the final weights when ``fit`` ends.
        float64_moments: passed on to :func:`bnstats.torch.recalibrate`, as
            :class:`bnstats.torch.PassOptions` says; like the four below, checked here,
            when the callback is made.
        group: passed on to :func:`bnstats.torch.recalibrate`.
        nonfinite: passed on to :func:`bnstats.torch.recalibrate`.
        unreached: passed on to :func:`bnstats.torch.recalibrate` (``"keep"`` for a BN
            layer only training uses, an auxiliary head).
        tolerance: passed on to :func:`bnstats.torch.recalibrate`.
        one_batch_bytes: passed on to :func:`bnstats.torch.recalibrate` (``mode="eval"``: the
            memory the data may take to run as one batch; ``None``: 256 MiB).

    A model without any BN layer with running statistics is refused when ``fit`` starts
    (``setup``), with a ``ValueError``: there would be nothing to recalibrate.
    """

    def __init__(
        self,
        max_samples: int | None = 8192,
        every_n_epochs: int = 1,
        mode: str = "train",
        dataloader: Any = None,
        forward: Forward | None = None,
        at_fit_end: bool = True,
        *,
        float64_moments: bool = False,
        group: Any = None,
        nonfinite: str = "raise",
        unreached: str = "raise",
        tolerance: float | None = None,
        one_batch_bytes: int | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not supported; choose one of {MODES}")
        if isinstance(every_n_epochs, bool) or int(every_n_epochs) < 1:
            raise ValueError(f"every_n_epochs must be a positive integer, got {every_n_epochs!r}")
        self.options = PassOptions(
            forward=forward,
            max_samples=max_samples,
            float64_moments=float64_moments,
            group=group,
            nonfinite=nonfinite,
            unreached=unreached,
            mode=mode,
            tolerance=tolerance,
            one_batch_bytes=one_batch_bytes,
            progress=False,  # the bar is Lightning's (see recalibrate), not bnstats' own
        )
        self.max_samples = max_samples
        self.every_n_epochs = int(every_n_epochs)
        self.mode = mode
        self.dataloader = dataloader
        self.forward = forward
        self.at_fit_end = at_fit_end
        self.history: list[dict[str, Any]] = []
        self._pending = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse a model without BN layers before any training."""
        if stage == "fit":
            try:
                bt.find_batchnorm_layers(bt.unwrap(pl_module))
            except ValueError as error:
                raise ValueError(
                    f"BatchNormRecalibration: {error}; there is nothing to recalibrate, "
                    "remove the callback"
                ) from error

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        due = (trainer.current_epoch + 1) % self.every_n_epochs == 0
        self._pending = due and not trainer.sanity_checking and _fitting(trainer)

    def on_validation_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._pending:
            self._pending = False
            self.recalibrate(trainer, pl_module, "validation")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_fit_end:
            self.recalibrate(trainer, pl_module, "fit_end")

    def recalibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, when: str) -> None:
        """One recalibration of ``pl_module`` now; logs and records how far it moved."""
        batches = self._batches(trainer)
        if batches is None:
            return
        before = _running_statistics(pl_module)
        with torch.inference_mode(False), _lightning_bar(trainer, self.max_samples) as advance:
            bt.recalibrate(pl_module, _Counted(batches, advance), **vars(self.options))
        layers = _moved(before, pl_module)
        entry = {
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "when": when,
            "max_mean_shift": max(row["mean_shift"] for row in layers),
            "worst_var_ratio": max((row["var_ratio"] for row in layers), key=_log_distance),
            "layers": layers,
        }
        self.history.append(entry)
        metrics = {f"bn_recalibration/{key}": entry[key] for key in _LOGGED}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def _batches(self, trainer: pl.Trainer) -> Any:
        if self.dataloader is not None:
            return self.dataloader  # the user's own: any iterable of batches
        batches = trainer.train_dataloader
        if batches is None:
            warnings.warn(
                "BatchNormRecalibration: no train dataloader to recalibrate on; pass "
                "dataloader=... (statistics left as they are)",
                stacklevel=2,
            )
            return None
        if isinstance(batches, (Mapping, list, tuple)):
            raise ValueError(
                "BatchNormRecalibration: the trainer has several train dataloaders; pass the "
                "one to recalibrate on as dataloader=..."
            )
        return batches


_LOGGED = ("max_mean_shift", "worst_var_ratio")


class _Counted:
    """``batches`` (iterable again for every pass) calling ``advance(batch)`` on each one."""

    def __init__(self, batches: Any, advance: Callable[[Any], None]) -> None:
        self.batches, self.advance = batches, advance

    def __iter__(self) -> Iterator[Any]:
        for batch in self.batches:
            self.advance(batch)
            yield batch


@contextmanager
def _lightning_bar(trainer: pl.Trainer, total: int | None) -> Iterator[Callable[[Any], None]]:
    """A bar of Lightning's own progress-bar callback, "BN recalibration", counting samples:
    a tqdm bar made by its TQDMProgressBar, or a task of its RichProgressBar; nothing when
    the trainer shows no bar (or another kind)."""
    bar_callback = getattr(trainer, "progress_bar_callback", None)
    if isinstance(bar_callback, TQDMProgressBar) and bar_callback.is_enabled:
        bar = bar_callback.init_validation_tqdm()
        bar.set_description("BN recalibration")
        bar.reset(total=total)
        try:
            yield lambda batch: bar.update(_samples(batch))
        finally:
            bar.close()
        return
    progress = getattr(bar_callback, "progress", None)
    if isinstance(bar_callback, RichProgressBar) and bar_callback.is_enabled and progress:
        task = progress.add_task("BN recalibration", total=total)
        try:
            yield lambda batch: progress.update(task, advance=_samples(batch))
        finally:
            progress.remove_task(task)
        return
    yield lambda batch: None


def _samples(batch: Any) -> int:
    """The batch's first dimension (its first tensor's, for tuples and dicts), else 1."""
    while isinstance(batch, (list, tuple, Mapping)) and len(batch):
        batch = next(iter(batch.values())) if isinstance(batch, Mapping) else batch[0]
    return int(batch.shape[0]) if isinstance(batch, torch.Tensor) and batch.dim() else 1


def _running_statistics(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {
        name: (
            layer.running_mean.detach().double().clone(),
            layer.running_var.detach().double().clone(),
        )
        for name, layer in bt.find_batchnorm_layers(bt.unwrap(model)).items()
    }


def _moved(
    before: dict[str, tuple[torch.Tensor, torch.Tensor]], model: torch.nn.Module
) -> list[dict[str, Any]]:
    """Per layer, the old statistics against the recalibrated ones, as :func:`bt.audit` would
    report them on the same samples (its ``mean_shift`` and ``var_ratio``, worst channel)::

        mean_shift = |old_mean - new_mean| / sqrt(new_var + eps)
        var_ratio  = (old_var + eps) / (new_var + eps)
    """
    rows = []
    for name, layer in bt.find_batchnorm_layers(bt.unwrap(model)).items():
        old_mean, old_var = before[name]
        new_mean, new_var = layer.running_mean.double(), layer.running_var.double()
        mean_shift = (old_mean - new_mean).abs() / (new_var + layer.eps).sqrt()
        var_ratio = (old_var + layer.eps) / (new_var + layer.eps)
        rows.append(
            {
                "name": name,
                "mean_shift": float(mean_shift.max()),
                "var_ratio": float(var_ratio[var_ratio.log().abs().argmax()]),
            }
        )
    return rows


def _log_distance(ratio: float) -> float:
    """How far a variance ratio is from 1, either way."""
    return abs(math.log(ratio)) if ratio > 0 else math.inf


def _fitting(trainer: pl.Trainer) -> bool:
    return trainer.state.fn == "fit"


__all__ = ["MODES", "BatchNormRecalibration"]
