"""Exact population statistics for every BN layer of a PyTorch model, in one pass.

PreciseBN (Wu & Johnson 2021): with the weights frozen, run the model over data and store
in each BN layer the mean and variance of everything that layer received, instead of the
running average training left there. Ioffe & Szegedy (2015, Alg. 2) define the test-time
statistics as ``E[z]`` and the unbiased ``Var[z]`` over the training data; this is that,
computed exactly, each sample weighted equally however uneven the batches.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from bnstats.torch._layer_pass import LayerPass, Measured
from bnstats.torch._layers import all_finite, cast_buffer, display_name, write_buffers
from bnstats.torch._level import MISS_PROBABILITY
from bnstats.torch._many_layers import layer_precision, population_statistics
from bnstats.torch._measure import EvalMeasured, measure
from bnstats.torch._ranks import Group
from bnstats.torch.options import Forward, PassOptions

_LOG = logging.getLogger("bnstats")


@dataclass(frozen=True)
class Recalibration:
    """What :func:`recalibrate_report` did: the ``model`` (recalibrated in place), the
    ``mode``, the ``samples`` and ``batches`` used (``samples`` None for batches without a
    tensor), the ``passes`` over the data (1 in train mode, 4 or more in eval mode, one per
    depth level and one more in ``"eval_exact"``), the ``tolerance`` asked for, and per
    layer the worst channel's relative standard error of the new statistics
    (``relative_errors``, see :meth:`bnstats.precision.BatchSpread.relative_error`; inf with
    fewer than 2 batches), and
    with a ``tolerance``, ``miss_probability``: at most the probability that some channel's
    mean or variance lies farther than ``tolerance`` from the truth
    (:func:`bnstats.precision.miss_probability` over all channels, each with its own standard
    errors); ``met`` when it is at most 0.05. The truth is the whole data's statistics where
    the data have a length (``data_batches``: the errors shrink by ``sqrt(1 - drawn share)``,
    and data used to their end are exact), else the population they are drawn from; the
    ``relative_errors`` are always those of estimates of that population.

    In ``mode="eval"``: ``moved``, per layer how far the last pass moved its statistics
    (worst channel, ``|d mean| / sqrt(var + eps)`` or ``|d var| / (var + eps)``), and
    ``converged``, whether every layer moved at most 1e-4 (the passes go on past four until
    it is; only statistics that depend on themselves never converge, and are then measured
    level by level, ``passes`` counting all). Its ``relative_errors`` and
    ``miss_probability`` are those of the first pass (each layer's input with every BN layer
    normalizing with its batch's statistics), the one a ``tolerance`` stop judges; the other
    passes go over the same batches. So ``met`` says what the stop
    decided (a layer the first pass did not reach: the last pass's error). After the level
    by level fallback, each layer's error is that of the level it settled in. On data of
    at least 32 times 1,024 samples eval mode solves on a subset, the first batches holding
    1,024 samples, or more where the budget takes them joined
    (:mod:`bnstats.torch._subset_iteration`): ``subset_passes`` over those
    ``subset_batches`` batches beside the ``passes`` over all (both 0 elsewhere)."""

    model: nn.Module
    mode: str
    samples: int | None
    batches: int
    passes: int
    tolerance: float | None
    relative_errors: dict[str, float]
    moved: dict[str, float] = field(default_factory=dict)
    converged: bool | None = None
    miss_probability: float | None = None
    subset_passes: int = 0
    subset_batches: int = 0
    data_batches: int | None = None

    @property
    def worst(self) -> tuple[str | None, float]:
        """The layer with the largest relative standard error, and that error."""
        if not self.relative_errors:
            return None, math.inf
        name = max(self.relative_errors, key=lambda key: self.relative_errors[key])
        return name, self.relative_errors[name]

    @property
    def met(self) -> bool:
        """True when a ``tolerance`` was given and every channel is within it with 95 %
        confidence: ``miss_probability`` at most 0.05, as the stop judges it."""
        miss = self.miss_probability
        return self.tolerance is not None and miss is not None and miss <= MISS_PROBABILITY

    @property
    def _tolerance_text(self) -> str:
        if self.met and self.data_batches is not None and self.batches >= self.data_batches:
            return f"every batch used: the data's own statistics (tolerance {self.tolerance:g})"
        chance = min(self.miss_probability or 0.0, 1.0)
        truth = "the population" if self.data_batches is None else "the whole data"
        return (
            f"some channel outside {self.tolerance:g} of {truth}'s statistics with "
            f"probability <= {chance:.2g}"
        )

    @property
    def _subset_text(self) -> str:
        if not self.subset_passes:
            return ""
        return f" and {self.subset_passes} over the first {self.subset_batches} batches"

    def __str__(self) -> str:
        name, worst = self.worst
        where = "" if name is None else f" ({display_name(name)})"
        text = (
            f"recalibrated ({self.mode} mode) on {self.samples} samples in {self.batches} "
            f"batches, {self.passes} pass(es){self._subset_text}; worst relative standard "
            f"error {worst:.3g}{where}"
        )
        if self.miss_probability is not None:
            text += f"; {self._tolerance_text}"
        if self.moved:
            state = "converged" if self.converged else "not converged, measured level by level"
            text += f"; last pass moved the statistics by {max(self.moved.values()):.3g} ({state})"
        return text


def recalibrate(
    model: nn.Module,
    batches: Any,
    *,
    forward: Forward | None = None,
    max_samples: int | None = None,
    float64_moments: bool = False,
    group: Group = None,
    nonfinite: Literal["raise", "skip"] = "raise",
    unreached: Literal["raise", "keep"] = "raise",
    mode: Literal["train", "eval", "eval_exact"] = "train",
    tolerance: float | None = None,
    progress: bool | None = None,
    one_batch_bytes: int | None = None,
) -> nn.Module:
    """Set every BN layer's running statistics to the exact population values on ``batches``.

    For each BN layer with running statistics (torch's ``_BatchNorm`` family: its own
    layers, ``SyncBatchNorm``, ``LazyBatchNorm*``, subclasses such as timm's
    ``BatchNormAct2d``, bnstats' modules), with ``z`` every value the layer received over the
    pass, ``count`` values per channel::

        running_mean = mean(z)
        running_var  = m2 / (count - 1),      m2 = sum((z - mean(z))**2)   (unbiased)
        num_batches_tracked = batches         batch statistics merged into the layer

    merged batch by batch in float64 (:class:`bnstats.Population`, Chan et al. 1979) and
    cast to each buffer's dtype at the end, as ``update_bn`` counts ``num_batches_tracked``.
    In the single pass the BN layers normalize with each batch's own statistics, as in
    training (and in ``update_bn`` and fvcore's precise BN); every other module, children of
    BN layers included, is in eval mode.

    ``mode="eval"``: each layer gets the mean and unbiased variance of the input it receives
    when every BN layer normalizes with its own final statistics, as at inference (the fixed
    point of eval-mode inference; Wu & Johnson 2021 on the train-test inconsistency of the
    single pass). It takes whole-model eval-mode passes over ``batches`` (so they must be
    iterable again) until the last one moves no layer's statistics by more than 1e-4 of the
    layer's output scale: three where the data's largest BN input is at most 256 MiB (all
    the data run once as one batch, each BN layer normalizing with its own input's
    population, then one pass checks it), else four where they converge fast, at most one
    per depth level of the BN layers and one more (each pass makes one more level exact;
    ``mode="eval_exact"``
    measures the same statistics level by level, one pass per depth level, then a pass
    that checks them; layers side by side share a level). Any batch size works, one included,
    and images of varying size. Layers with fixed statistics
    (``FrozenBatchNorm2d``) are left as they are, with a warning naming them.

    Args:
        model: the model, or a wrapper (``DataParallel``, ``DistributedDataParallel``,
            ``torch.compile``'s module, ``AveragedModel``, timm's ``ModelEma*``): modified
            in place and returned.
        batches: an iterable of batches: tensors, ``(input, target)`` tuples or lists, lists
            of images, or dicts; each is moved to the model's device.
        forward, max_samples, float64_moments, group, nonfinite, unreached, mode,
            tolerance, progress: the options of every pass, keyword-only, as
            :class:`bnstats.torch.PassOptions` says. ``group``: torch.distributed, every rank
            passes its own batches and ends with the same buffers, bit for bit;
            ``tolerance``: stop drawing batches once every channel's mean and variance is
            within ``tolerance`` (relative) of the full-data values with 95 % confidence
            (the samples it took are logged to the ``bnstats`` logger, and
            :func:`recalibrate_report` returns them).

    All or nothing: the model's modes, momenta and hooks are left as found, and if anything
    raises, no buffer changes. Raises ``ValueError`` naming the layer for an empty
    ``batches``, a model without BN layers, a layer no forward reached, an input with fewer
    than 2 values per channel or of the wrong shape, a result overflowing a buffer's dtype;
    :class:`bnstats.NonFiniteStatisticsError` naming the layer and the batch for NaN or Inf;
    ``TypeError`` for unusable arguments; in a group, :class:`bnstats.torch.RankError` on
    every rank if any rank failed or the ranks made different calls.
    """
    return _recalibrate(model, batches, PassOptions.pick(locals()), precise=False).model


def recalibrate_report(
    model: nn.Module,
    batches: Any,
    *,
    forward: Forward | None = None,
    max_samples: int | None = None,
    float64_moments: bool = False,
    group: Group = None,
    nonfinite: Literal["raise", "skip"] = "raise",
    unreached: Literal["raise", "keep"] = "raise",
    mode: Literal["train", "eval", "eval_exact"] = "train",
    tolerance: float | None = None,
    progress: bool | None = None,
    one_batch_bytes: int | None = None,
) -> Recalibration:
    """:func:`recalibrate`, returning a :class:`Recalibration` (the model is its ``model``):
    how many samples and passes it took and how precise each layer's new statistics are.

    With ``tolerance=1e-2`` the pass stops drawing batches once every channel's mean and
    variance is within 1e-2 of the statistics of the whole data (of the population they are
    drawn from, for data without a length) with 95 % confidence: ``miss_probability`` at
    most 0.05 (checked every ``CHECK_EVERY`` batches from ``MIN_BATCHES`` on, see
    :class:`bnstats.torch.PassOptions`); data with a length used to their end are exact;
    data without one that run out first, or cut by ``max_samples``, get a warning. In
    ``mode="eval"`` the stop is judged on the first pass and the report gives that pass's
    errors (see :class:`Recalibration`).
    """
    return _recalibrate(model, batches, PassOptions.pick(locals()))


def _recalibrate(
    model: nn.Module, batches: Any, chosen: PassOptions, precise: bool = True
) -> Recalibration:
    """Measure, make every new buffer ready, summarize and warn, and only then write: a
    warning turned into an error (``warnings.simplefilter("error")``) leaves the model as
    it was, and nothing runs after the write. ``precise=False`` (:func:`recalibrate`, which
    returns the model only): the precision is measured only for a ``tolerance``, and the
    summary's ``relative_errors`` are otherwise empty."""
    measured = measure(model, batches, chosen, tool="recalibrate", precise=precise)
    updates = population_buffers(measured)
    _warn_left_alone(measured)
    result = _summary(model, measured, chosen)
    if chosen.tolerance is not None:
        if result.met:
            _LOG.info("bnstats: %s; tolerance %g met", result, chosen.tolerance)
        else:
            warnings.warn(
                f"bnstats: tolerance {chosen.tolerance:g} not met before the data ran out: "
                f"{result}",
                stacklevel=3,
            )
    write_buffers(updates)
    return result


def _summary(model: nn.Module, measured: Measured, options: PassOptions) -> Recalibration:
    """The :class:`Recalibration` of ``measured``: per written layer the relative standard
    error of the pass a ``tolerance`` stop judged (:func:`_judged`; a layer that pass did not
    reach, the written pass's), and with a ``tolerance`` the stop's ``miss_probability`` over
    those layers' channels."""
    judged = _judged(measured)
    errors, miss = _precision(measured, judged, options.tolerance)
    sizes = measured.batch_sizes
    return Recalibration(
        model=model,
        mode=options.mode,
        samples=None if any(size is None for size in sizes) else int(sum(sizes)),
        batches=len(sizes),
        passes=measured.passes,
        tolerance=options.tolerance,
        relative_errors=errors,
        moved=dict(measured.moved),
        converged=measured.converged,
        miss_probability=miss,
        subset_passes=measured.subset_passes,
        subset_batches=measured.subset_batches,
        data_batches=judged.data_batches,
    )


def _judged(measured: Measured) -> Measured:
    """The pass on which a ``tolerance`` stop was judged: ``mode="eval"``'s first pass
    (:class:`bnstats.torch._measure.EvalMeasured`), otherwise ``measured`` itself."""
    judged = measured.judged if isinstance(measured, EvalMeasured) else None
    return measured if judged is None else judged


def _precision(
    measured: Measured, judged: Measured, tolerance: float | None
) -> tuple[dict[str, float], float | None]:
    """Per reached layer of ``measured`` (whose precision was measured), the worst channel's
    relative standard error as the pass a ``tolerance`` stop judged measured it (``judged``;
    a layer it did not reach, ``measured``), and with a ``tolerance`` the stop's
    ``miss_probability`` over those layers' channels (inf without a layer): computed for all
    layers at once (:func:`bnstats.torch._many_layers.layer_precision`; one host read)."""
    chosen = {}
    for source in (measured, judged):  # the judged pass's own wherever it has the layer
        for moments in source.reached():
            if moments.precise:
                chosen[moments.name] = (moments, source.finite_batches(moments))
    written = [chosen[m.name] for m in measured.reached() if m.precise]
    if not written:
        return {}, None if tolerance is None else math.inf
    layers, finite = (list(column) for column in zip(*written, strict=True))
    worst, miss = layer_precision(layers, finite, tolerance, judged.data_batches)
    numbers = (worst if miss is None else torch.cat((worst, miss[None]))).tolist()
    errors = {m.name: float(e) for m, e in zip(layers, numbers[: len(layers)], strict=True)}
    return errors, None if miss is None else numbers[-1]


def population_buffers(measured: Measured) -> dict[nn.Module, dict[str, torch.Tensor]]:
    """The new buffers of every reached layer, computed and checked before anything is
    written: ``running_mean = mean``, ``running_var = m2 / (count - 1)`` in the buffers'
    dtypes, every value finite (one host read for all layers; if any is not, the layer-by-
    layer checks name the layer)."""
    reached = measured.reached()
    for moments in reached:
        measured.require_finite_batches(moments)
    statistics, together = population_statistics(reached)
    if not all_finite(together):
        for moments in reached:
            _population_buffers(measured, moments)  # raises, naming the layer
    return {
        moments.layer: {
            "running_mean": mean,
            "running_var": var,
            "num_batches_tracked": torch.tensor(measured.finite_batches(moments)),
        }
        for moments, (mean, var) in zip(reached, statistics, strict=True)
    }


def _population_buffers(measured: Measured, moments: LayerPass) -> dict[str, torch.Tensor]:
    population = measured.population(moments)  # raises NonFiniteStatisticsError naming it
    layer = moments.layer
    return {
        "running_mean": cast_buffer(moments.name, "running_mean", population.mean, layer),
        "running_var": cast_buffer(moments.name, "running_var", population.var, layer),
        "num_batches_tracked": torch.tensor(measured.finite_batches(moments)),
    }


def _warn_left_alone(measured: Measured) -> None:
    """Name the layers a pass found and did not write: fixed statistics, unreached ones kept,
    and how many batches were left out for NaN or Inf."""
    notes = []
    if measured.fixed:
        names = ", ".join(display_name(name) for name in measured.fixed)
        notes.append(f"layers with fixed statistics left as they are: {names}")
    if measured.unreached:
        names = ", ".join(display_name(name) for name in measured.unreached)
        notes.append(f"BN layers no forward reached, kept as they were: {names}")
    if measured.skipped:
        worst = max(measured.skipped.values())
        notes.append(f"up to {worst} batch(es) per layer left out for NaN or Inf")
    if notes:
        warnings.warn("bnstats: " + "; ".join(notes), stacklevel=3)
