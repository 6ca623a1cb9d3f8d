"""``bt.diagnose``: why eval mode differs from training, measured with bnstats' own tools."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from bnstats.torch._batches import Forward, iterate_batches
from bnstats.torch._eval_exact import require_reusable_batches
from bnstats.torch._layers import (
    PreservedState,
    find_batchnorm_layers,
    fixed_statistics_layers,
    unwrap,
)
from bnstats.torch._ranks import resolve_group
from bnstats.torch.adapt import adapt
from bnstats.torch.diagnose._evaluate import Buffers, Evaluator, Setting, load_buffers, read_buffers
from bnstats.torch.diagnose._findings import (
    Measurements,
    best_recalibration,
    findings,
    worth,
)
from bnstats.torch.diagnose._frozen import frozen_setting
from bnstats.torch.diagnose._report import DiagnoseReport, LayerEffect
from bnstats.torch.options import PassOptions
from bnstats.torch.recalibrate import recalibrate_report

MAX_LAYERS = 64
"""Per-layer attribution evaluates each BN layer alone up to this many layers; beyond, it
evaluates groups of consecutive layers (about this many groups) and says so."""
ADAPT_SOURCE_WEIGHTS = (0.25, 0.75)
"""The priors ``bt.adapt`` is tried with besides 0: ``N = w / (1 - w) * n`` for these source
weights ``w = N / (N + n)``, ``n`` the largest test batch."""


@dataclass(frozen=True)
class _Call:
    """The arguments every pass of one diagnosis shares."""

    options: dict[str, Any]
    group: Any


def diagnose(
    model: nn.Module,
    batches: Any,
    test_batches: Any = None,
    *,
    forward: Forward | None = None,
    max_samples: int | None = None,
    group: Any = None,
    progress: bool | None = None,
    float64_moments: bool = False,
    nonfinite: Literal["raise", "skip"] = "raise",
    unreached: Literal["raise", "keep"] = "raise",
    max_layers: int = MAX_LAYERS,
) -> DiagnoseReport:
    """Why the model does worse in eval mode than in training: the cause, the layers, the
    fix, each measured on ``test_batches``.

    ``batches``: the training data as the model was trained on it (``x`` or ``(x, y)`` with
    integer class labels); ``test_batches``: the data it is evaluated on (default:
    ``batches``). Both must be iterable again (a list, a DataLoader without shuffling).
    ``forward(model, batch)`` must return the model's output. Settings, each evaluated on the
    test batches (accuracy with labels and class scores, and the relative RMS change of the
    outputs against ``as_is``)::

        as_is              eval mode, the model's running statistics
        recalibrated       eval mode, bt.recalibrate(model, batches)
        recalibrated_eval  eval mode, bt.recalibrate(model, batches, mode="eval")
        batch_statistics   BN layers in training mode on the test batches as given
        test_statistics    eval mode, bt.recalibrate(model, test_batches) (test_batches given)

    ``report.layers``: the effect of giving each BN layer alone its population statistics
    (from the ``recalibrated`` pass), one evaluation per layer, or per group of consecutive
    layers beyond ``max_layers``. ``report.findings``: ``left_in_train_mode``,
    ``stale_statistics``, ``distribution_shift`` (``bt.adapt`` tried with a few priors),
    ``batch_dependence``, ``frozen_statistics``; thresholds in
    :mod:`bnstats.torch.diagnose._findings`.

    Cost: 1 + 3 recalibration passes over ``batches`` where they fit in one batch (train
    mode, eval mode; else 1 + 4, more, up to one per depth level of the BN layers and one,
    where eval mode's four do not converge),
    one pass over them with frozen layers (when there are any), 1 + 2 passes over
    ``test_batches`` when given (their statistics, two adapt priors), and one evaluation over
    ``test_batches`` per setting and per attributed layer (``report.passes`` counts them all).

    The model is not changed: its buffers (bit for bit), modes, momenta and hooks are as
    found afterwards, also when anything raises. The pass options (``max_samples``, applied
    to ``batches`` and ``test_batches`` alike, ``group``, ``progress``,
    ``float64_moments``, ``nonfinite``, ``unreached``) are those of
    :func:`bnstats.torch.recalibrate`; in a group every rank passes its own batches, the
    statistics are merged and the evaluation sums added over the ranks.
    """
    options = {
        "forward": forward,
        "max_samples": max_samples,
        "group": group,
        "progress": progress,
        "float64_moments": float64_moments,
        "nonfinite": nonfinite,
        "unreached": unreached,
    }
    PassOptions(**options)  # the same checks and errors as recalibrate's, before any work
    if isinstance(max_layers, bool) or not isinstance(max_layers, int) or max_layers < 1:
        raise ValueError(f"max_layers must be a positive integer, got {max_layers!r}")
    require_reusable_batches(batches, "diagnose")
    if test_batches is not None:
        require_reusable_batches(test_batches, "diagnose", "test_batches")
    inner = unwrap(model)
    layers = find_batchnorm_layers(inner)
    fixed = fixed_statistics_layers(inner)
    with PreservedState(inner, layers), _fixed_buffers_kept(fixed):
        call = _Call(options, resolve_group(group))
        return _Diagnosis(inner, layers, fixed, batches, test_batches, call, max_layers).run()


@contextmanager
def _fixed_buffers_kept(fixed: Mapping[str, nn.Module]) -> Iterator[None]:
    """Frozen layers' statistics put back in place afterwards, also on error."""
    saved = {
        name: (layer.running_mean.detach().clone(), layer.running_var.detach().clone())
        for name, layer in fixed.items()
    }
    try:
        yield
    finally:
        with torch.no_grad():
            for name, (mean, var) in saved.items():
                fixed[name].running_mean.copy_(mean)
                fixed[name].running_var.copy_(var)


class _Diagnosis:
    """One run of :func:`diagnose` on the unwrapped ``model`` (inside its preserved state)."""

    def __init__(
        self,
        model: nn.Module,
        layers: Mapping[str, nn.Module],
        fixed: Mapping[str, nn.Module],
        batches: Any,
        test_batches: Any,
        call: _Call,
        max_layers: int,
    ) -> None:
        self.model, self.layers, self.fixed = model, layers, fixed
        self.batches, self.test_batches, self.call = batches, test_batches, call
        self.max_layers = max_layers
        self.passes = 0
        self.notes: list[str] = []
        self.evaluator = Evaluator(
            model,
            layers,
            batches if test_batches is None else test_batches,
            forward=call.options["forward"],
            max_samples=call.options["max_samples"],
            group=call.group,
            progress=call.options["progress"],
        )

    def run(self) -> DiagnoseReport:
        training_layers = [name for name, layer in self.layers.items() if layer.training]
        model_training = self.model.training
        original = read_buffers(self.layers)
        settings = {"as_is": self.evaluator.run("as_is")}
        recalibrated, spread = self._recalibrated("recalibrated", original, self.batches)
        settings["recalibrated"] = self._evaluate("recalibrated", recalibrated)
        evaluated, _ = self._recalibrated("recalibrated_eval", original, self.batches, "eval")
        settings["recalibrated_eval"] = self._evaluate("recalibrated_eval", evaluated)
        batch = self._batch_statistics(original)
        if batch is not None:
            settings["batch_statistics"] = batch
        measured = Measurements(
            settings,
            self.evaluator.discordant,
            training_layers=training_layers,
            model_training=model_training,
            spread=spread,
            train_batch_size=_training_batch_size(self.batches),
            test_batch_size=self.evaluator.largest_batch,
        )
        effects = self._attribution(original, recalibrated, measured)
        measured.attribution = [effect.name for effect in effects]
        if self.test_batches is not None:
            self._shift(original, recalibrated, measured)
        if self.fixed:
            load_buffers(self.layers, original)
            measured.frozen, measured.frozen_setting = frozen_setting(
                self.model, self.fixed, self.batches, self.evaluator, self.call.options
            )
            self.passes += 1
        load_buffers(self.layers, original)
        return DiagnoseReport(
            settings=settings,
            layers=effects,
            findings=findings(measured),
            attribution=self._attribution_text(),
            samples=settings["as_is"].samples,
            labelled=measured.labelled,
            passes=self.passes + self.evaluator.passes,
            notes=self.notes,
        )

    # -- settings -----------------------------------------------------------------------------

    def _recalibrated(
        self, name: str, start: Buffers, batches: Any, mode: str = "train"
    ) -> tuple[Buffers, list[str]]:
        """The buffers ``bt.recalibrate`` writes from ``start``, and the layers ordered by
        the spread of their batch statistics (relative standard error, largest first)."""
        load_buffers(self.layers, start)
        with warnings.catch_warnings():  # frozen layers are diagnosed on their own
            warnings.filterwarnings("ignore", message="bnstats: layers with fixed statistics")
            result = recalibrate_report(self.model, batches, mode=mode, **self.call.options)
        self.passes += result.passes
        errors = result.relative_errors
        order = sorted(errors, key=lambda key: -errors[key] if math.isfinite(errors[key]) else 0)
        return read_buffers(self.layers), order

    def _evaluate(self, name: str, buffers: Buffers) -> Setting:
        load_buffers(self.layers, buffers)
        return self.evaluator.run(name)

    def _batch_statistics(self, original: Buffers) -> Setting | None:
        """BN layers in training mode on the test batches; None (with a note) where a test
        batch has a single value per channel, which batch statistics cannot normalize."""
        load_buffers(self.layers, original)
        try:
            return self.evaluator.run("batch_statistics", batch_statistics=True)
        except ValueError as error:
            if "Expected more than 1 value per channel" not in str(error):
                raise
            self.notes.append(
                "batch_statistics not measured: a test batch has a single value per channel"
            )
            return None
        finally:
            load_buffers(self.layers, original)

    # -- per-layer attribution ---------------------------------------------------------------

    def _groups(self) -> list[list[str]]:
        names = list(self.layers)
        size = math.ceil(len(names) / self.max_layers)
        return [names[i : i + size] for i in range(0, len(names), size)]

    def _attribution_text(self) -> str:
        groups = self._groups()
        if all(len(group) == 1 for group in groups):
            return f"each of the {len(self.layers)} BN layers alone"
        return (
            f"{len(self.layers)} BN layers in {len(groups)} groups of up to "
            f"{len(groups[0])} consecutive layers (max_layers={self.max_layers}); each layer "
            "shows its group's effect"
        )

    def _attribution(
        self, original: Buffers, recalibrated: Buffers, measured: Measurements
    ) -> list[LayerEffect]:
        """Per layer (or group), the model with that layer alone given its population
        statistics; most important first."""
        as_is = measured.settings["as_is"]
        effects = []
        for group in self._groups():
            load_buffers(self.layers, original)
            load_buffers(self.layers, {name: recalibrated[name] for name in group})
            label = group[0] if len(group) == 1 else f"{group[0]} .. {group[-1]}"
            setting = self.evaluator.run(f"layer {label}")
            gain = None
            if as_is.accuracy is not None and setting.accuracy is not None:
                gain = setting.accuracy - as_is.accuracy
            effects += [
                LayerEffect(
                    name=name,
                    kind=type(self.layers[name]).__name__,
                    accuracy_gain=gain,
                    output_change=setting.output_change,
                    group=None if len(group) == 1 else list(group),
                )
                for name in group
            ]
        order = {name: i for i, name in enumerate(self.layers)}
        return sorted(
            effects,
            key=lambda e: (-(e.accuracy_gain or 0.0), -e.output_change, order[e.name]),
        )

    # -- distribution shift -------------------------------------------------------------------

    def _shift(self, original: Buffers, recalibrated: Buffers, measured: Measurements) -> None:
        """``test_statistics``, ``bt.adapt`` with a few priors, and the layers ordered by how
        far the test data's statistics are from the training data's."""
        settings = measured.settings
        tested, _ = self._recalibrated("test_statistics", original, self.test_batches)
        settings["test_statistics"] = self._evaluate("test_statistics", tested)
        measured.shift = _shift_order(recalibrated, tested, self.layers)
        stale = worth(best_recalibration(measured), settings["as_is"], measured)
        measured.adapted_from_recalibrated = stale
        source = recalibrated if stale else original
        n = measured.test_batch_size or 1
        for weight in ADAPT_SOURCE_WEIGHTS:
            prior = float(round(weight / (1 - weight) * n))
            load_buffers(self.layers, source)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="bnstats.adapt: BN layer")
                adapt(self.model, self.test_batches, prior=prior, **self.call.options)
            self.passes += 1
            measured.adapted[prior] = self.evaluator.run(f"adapted prior {prior:g}")


def _training_batch_size(batches: Any) -> int | None:
    """The training batch size without drawing a batch: a DataLoader's ``batch_size``, the
    largest batch of a list or tuple; None otherwise."""
    size = getattr(batches, "batch_size", None)
    if isinstance(size, int):
        return size
    if isinstance(batches, (list, tuple)):
        sizes = [size for _, size in iterate_batches(batches) if size is not None]
        return max(sizes) if sizes else None
    return None


def _shift_order(train: Buffers, test: Buffers, layers: Mapping[str, nn.Module]) -> list[str]:
    """The layers by the mean over channels of ``KL(N(mu_test, var_test + eps) ||
    N(mu_train, var_train + eps))``, largest first (the audit's divergence)."""
    distances = {}
    for name, layer in layers.items():
        eps = float(layer.eps)
        mu, var = train[name]["running_mean"].double(), train[name]["running_var"].double()
        mu_t, var_t = test[name]["running_mean"].double(), test[name]["running_var"].double()
        ratio = (var + eps) / (var_t + eps)
        shift = (mu - mu_t) ** 2 / (var_t + eps)
        kl = 0.5 * (ratio.log() + (1 + shift) / ratio - 1)
        distances[name] = float(kl.mean())
    return sorted(distances, key=lambda name: -distances[name])
