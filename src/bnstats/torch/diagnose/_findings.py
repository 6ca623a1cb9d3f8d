"""From measured settings to findings: the thresholds and one rule per kind.

Every rule compares two settings measured on the same test samples. With labels, a
finding is raised when its remedy gains at least ``MIN_GAIN`` (half a point of accuracy)
and at least ``MIN_PREDICTIONS`` test predictions, and the gain is clear of the noise of
the test set: of the predictions the two settings disagree on, ``fixed`` the remedy gets
right and ``broken`` it gets wrong, and (McNemar's test, one-sided, about 2 %)::

    fixed - broken >= Z * sqrt(fixed + broken),      Z = 2

Without labels, which setting is better cannot be measured:
a finding is raised when the remedy changes the outputs by at least ``MIN_OUTPUT_CHANGE``
(relative RMS), and ``batch_dependence`` is not judged. docs/diagnose.md explains the
choices.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from bnstats.torch.diagnose._evaluate import Setting
from bnstats.torch.diagnose._report import (
    BATCH_DEPENDENCE,
    DISTRIBUTION_SHIFT,
    FROZEN_STATISTICS,
    LEFT_IN_TRAIN_MODE,
    STALE_STATISTICS,
    Finding,
)

MIN_GAIN = 0.005
"""A finding must recover at least half a point of accuracy..."""
MIN_PREDICTIONS = 2
"""...and at least this many test predictions."""
MIN_OUTPUT_CHANGE = 0.05
"""Without labels: the remedy must change the outputs by 5 % (relative RMS)."""
Z = 2.0
"""How many standard deviations of the disagreement a gain must clear."""

Discordant = Callable[[Setting, Setting], tuple[int, int]]
"""``discordant(better, base)``: the test predictions ``better`` gets right and ``base``
wrong, and the reverse."""


@dataclass
class Measurements:
    """What the passes measured, for the rules: the ``settings``; the adapted settings by
    prior (``adapted``; prior 0 is ``test_statistics``); the BN layers found in training mode
    (``training_layers``) and whether the model itself was; the layer orders each kind
    reports (``attribution``: by the effect of each layer's population statistics,
    ``spread``: by how much its batch statistics vary, ``shift``: by how far the test data's
    statistics are from the training data's); frozen layers and the setting with their
    population statistics; the training and test batch sizes; and whether the adapt source
    was the recalibrated model (``adapted_from_recalibrated``)."""

    settings: dict[str, Setting]
    discordant: Discordant
    adapted: dict[float, Setting] = field(default_factory=dict)
    training_layers: list[str] = field(default_factory=list)
    model_training: bool = False
    attribution: list[str] = field(default_factory=list)
    spread: list[str] = field(default_factory=list)
    shift: list[str] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)
    frozen_setting: Setting | None = None
    train_batch_size: int | None = None
    test_batch_size: int | None = None
    adapted_from_recalibrated: bool = False

    @property
    def labelled(self) -> bool:
        return self.settings["as_is"].accuracy is not None

    @property
    def samples(self) -> int:
        return self.settings["as_is"].samples


def worth(better: Setting, base: Setting, measured: Measurements) -> bool:
    """True when ``better`` gains enough over ``base`` for a finding (see the module)."""
    gain = gain_between(better, base, measured)
    if not measured.labelled:
        return gain >= MIN_OUTPUT_CHANGE
    if gain < MIN_GAIN or gain * measured.samples < MIN_PREDICTIONS - 1e-9:
        return False
    fixed, broken = measured.discordant(better, base)
    return fixed - broken >= Z * math.sqrt(fixed + broken)


def score(setting: Setting) -> float:
    """What "better" means: accuracy with labels (the output change cannot say)."""
    return setting.accuracy if setting.accuracy is not None else -setting.output_change


def gain_between(better: Setting, base: Setting, measured: Measurements) -> float:
    """Accuracy of ``better`` minus that of ``base``; without labels the output change of
    ``better`` beyond that of ``base`` (both against ``as_is``)."""
    if measured.labelled:
        return better.accuracy - base.accuracy  # type: ignore[operator]
    return better.output_change - base.output_change


def best_recalibration(measured: Measurements) -> Setting:
    """``recalibrated`` or ``recalibrated_eval``, whichever is better (train mode on ties)."""
    train, evaluated = measured.settings["recalibrated"], measured.settings["recalibrated_eval"]
    if measured.labelled and evaluated.accuracy > train.accuracy:  # type: ignore[operator]
        return evaluated
    return train


def recalibrate_call(setting: Setting) -> str:
    mode = ', mode="eval"' if setting.name == "recalibrated_eval" else ""
    return f"bt.recalibrate(model, batches{mode})"


def describe(setting: Setting) -> str:
    """``recalibrated 91.20%`` (or the output change without labels)."""
    if setting.accuracy is None:
        return f"{setting.name} (output change {setting.output_change:.3g})"
    return f"{setting.name} {100 * setting.accuracy:.2f}%"


# -- the rules --------------------------------------------------------------------------------


def left_in_train_mode(measured: Measurements) -> Finding | None:
    """The model (or a BN layer) was found in training mode: inference normalizes each batch
    by itself. Gain: eval mode (``as_is``) against ``batch_statistics``."""
    if not (measured.model_training or measured.training_layers):
        return None
    as_is = measured.settings["as_is"]
    batch = measured.settings.get("batch_statistics")
    where = "the model" if measured.model_training else "some BN layers"
    if batch is None:
        gain, numbers = 0.0, "batch statistics could not be measured on these test batches"
    else:
        gain = (
            as_is.accuracy - batch.accuracy  # type: ignore[operator]
            if measured.labelled
            else batch.output_change
        )
        numbers = f"{describe(batch)} in training mode against {describe(as_is)} in eval mode"
    return Finding(
        LEFT_IN_TRAIN_MODE,
        list(measured.training_layers),
        gain,
        f"{where} was found in training mode, so inference normalizes each test batch "
        f"(of {measured.test_batch_size}) by itself: {numbers}.",
        "model.eval()",
    )


def stale_statistics(measured: Measurements) -> Finding | None:
    """The running statistics are not the population's for these weights."""
    as_is = measured.settings["as_is"]
    best = best_recalibration(measured)
    if not worth(best, as_is, measured):
        return None
    gain = gain_between(best, as_is, measured)
    top = measured.attribution[0] if measured.attribution else None
    lead = f"; layer {top!r} matters most" if top is not None else ""
    return Finding(
        STALE_STATISTICS,
        list(measured.attribution),
        gain,
        f"exact population statistics of the training data raise the test result from "
        f"{describe(as_is)} to {describe(best)}{lead}.",
        recalibrate_call(best),
    )


def distribution_shift(measured: Measurements) -> Finding | None:
    """The test data's own statistics do better than the training population's. Without
    labels "better" cannot be judged: the test data's own statistics (prior 0) must change
    the outputs by :data:`MIN_OUTPUT_CHANGE` more than recalibrating does (the output change
    is no score to maximize there: ``as_is`` changes nothing)."""
    if "test_statistics" not in measured.settings:
        return None
    candidates = {0.0: measured.settings["test_statistics"], **measured.adapted}
    if measured.labelled:
        base = max((measured.settings["as_is"], best_recalibration(measured)), key=score)
        prior = max(candidates, key=lambda p: (score(candidates[p]), p))
    else:
        base, prior = best_recalibration(measured), 0.0
    best = candidates[prior]
    if not worth(best, base, measured):
        return None
    gain = gain_between(best, base, measured)
    prior_text = f"{prior:g}"
    remedy = f"bt.adapt(model, test_batches, prior={prior_text})"
    if prior > 0 and measured.adapted_from_recalibrated:
        remedy = f"bt.recalibrate(model, batches); {remedy}"
    return Finding(
        DISTRIBUTION_SHIFT,
        list(measured.shift),
        gain,
        f"the test data's own statistics (adapted with prior {prior_text}) give "
        f"{describe(best)} against {describe(base)} with the training population's; the "
        f"test data differs most at layer {measured.shift[0]!r}."
        if measured.shift
        else f"the test data's own statistics give {describe(best)} against {describe(base)}.",
        remedy,
    )


def batch_dependence(measured: Measurements) -> Finding | None:
    """Much better with batch statistics than with any population statistics."""
    batch = measured.settings.get("batch_statistics")
    if batch is None or not measured.labelled:
        return None
    population = [s for name, s in measured.settings.items() if name != "batch_statistics"]
    population += list(measured.adapted.values())
    best = max(population, key=score)
    if not worth(batch, best, measured):
        return None
    gain = gain_between(batch, best, measured)
    train, evaluated = measured.settings["recalibrated"], measured.settings["recalibrated_eval"]
    remedy = (
        "retrain with Batch Renorm or Ghost BN: swap the BN layers for "
        "bt.BatchRenorm2d / bt.GhostBatchNorm2d (1d, 3d alike), then bt.recalibrate(model, "
        "batches)"
    )
    if worth(evaluated, train, measured):
        remedy = f'bt.recalibrate(model, batches, mode="eval"); or {remedy}'
    sizes = f"batches of {measured.test_batch_size}"
    if measured.train_batch_size not in (None, measured.test_batch_size):
        sizes += f" (training batches: {measured.train_batch_size})"
    return Finding(
        BATCH_DEPENDENCE,
        list(measured.spread),
        gain,
        f"normalizing each test batch by itself ({sizes}) gives {describe(batch)}, the best "
        f"population statistics only {describe(best)}: the model relies on batch statistics.",
        remedy,
    )


def frozen_statistics(measured: Measurements) -> Finding | None:
    """Frozen BN layers whose fixed statistics are far from the data."""
    frozen = measured.frozen_setting
    if frozen is None:
        return None
    as_is = measured.settings["as_is"]
    if not worth(frozen, as_is, measured):
        return None
    gain = gain_between(frozen, as_is, measured)
    return Finding(
        FROZEN_STATISTICS,
        list(measured.frozen),
        gain,
        f"giving the {len(measured.frozen)} frozen BN layer(s) the population statistics of "
        f"the training data gives {describe(frozen)} against {describe(as_is)}.",
        "replace each frozen BN layer by an nn.BatchNorm2d with the same weight, bias and "
        "statistics (model.eval() keeps it fixed), then bt.recalibrate(model, batches)",
    )


RULES: tuple[Callable[[Measurements], Finding | None], ...] = (
    left_in_train_mode,
    stale_statistics,
    distribution_shift,
    batch_dependence,
    frozen_statistics,
)


def findings(measured: Measurements) -> list[Finding]:
    """Every rule's finding, largest gain first (the rules' order on ties)."""
    found = [finding for rule in RULES if (finding := rule(measured)) is not None]
    return sorted(found, key=lambda finding: -finding.gain)
