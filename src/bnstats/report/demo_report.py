"""The demo's report: one self-contained HTML page about one run of ``bnstats demo``.

The page holds the lecture's picture for one BatchNorm layer (each mini-batch's ``mu`` of a
few units with the EMA running through them, the debiased EMA and the population value),
the same for ``var``, test accuracy per test-time method, and test accuracy against test
batch size (batch statistics vs running estimates). Beside each figure a few sentences say
what it shows, with numbers computed from the run; tables repeat the numbers, so the page
reads without its figures. Figures need matplotlib (the ``report`` extra).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from bnstats.engine import BATCH, BatchNorm, BatchRenorm, GhostBatchNorm
from bnstats.methods import METHODS, POPULATION, RUNNING_EMA
from bnstats.report.captions import (
    SYMBOL,
    accuracy_sentences,
    batch_size_sentences,
    lecture_sentences,
)
from bnstats.report.html import FOOTER, Image, Section, Table, render_page, write_page
from bnstats.report.lecture import LectureTrace, lecture_traces
from bnstats.report.momentum import GRID, momentum_section
from bnstats.report.momentum_script import SCRIPT

if TYPE_CHECKING:  # the page is drawn from a finished run; it never runs the demo
    from bnstats.demo import DemoResult

LECTURE = "the lecture “Batch Norm at Test Time” of a deep learning course"
"""The lecture whose picture and notation the page follows."""

REPORT_NAME = "report.html"
INSTALL_HINT = 'pip install ".[report]" (from a checkout of bnstats)'
TEST_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)
"""Test batch sizes tried with the batch's own statistics (those up to the test set's size,
and the whole test set)."""
FLAT_LINES = (RUNNING_EMA, POPULATION)
"""Running estimates drawn as flat lines against test batch size."""


class ReportDependencyError(ImportError):
    """matplotlib, which the report's figures need, is not installed."""


def write_demo_report(
    result: DemoResult,
    directory: str | Path,
    layer: str | None = None,
    units: Sequence[int] | None = None,
) -> Path:
    """Write ``report.html`` for ``result`` into ``directory`` (created if missing),
    atomically; returns its path. See :func:`demo_report_html` for ``layer`` and ``units``."""
    page = demo_report_html(result, layer=layer, units=units)
    return write_page(page, directory, REPORT_NAME)


def demo_report_html(
    result: DemoResult, layer: str | None = None, units: Sequence[int] | None = None
) -> str:
    """The report page for ``result``. ``layer`` names the BatchNorm layer of the lecture's
    picture (default: the first, ``bn1``); ``units`` its units to draw (default: the first
    three). A bad name or unit raises ``ValueError`` naming what is available; missing
    matplotlib raises :class:`ReportDependencyError`."""
    traces = lecture_traces(result.history, result.net, layer=layer, units=units)
    figures = load_figures()
    sections = [
        settings_section(result, traces["mean"]),
        *(lecture_section(result, trace, figures) for trace in traces.values()),
        momentum_section(result.history, traces, result.accuracy_by_momentum(GRID)),
        accuracy_section(result, figures),
        batch_size_section(result, figures),
    ]
    return render_page(
        "bnstats demo: batch norm's test-time statistics",
        intro_sentences(result),
        sections,
        footer=FOOTER,
        scripts=(SCRIPT,),
    )


def load_figures() -> ModuleType:
    """:mod:`bnstats.report.figures`, or :class:`ReportDependencyError` without matplotlib."""
    try:
        return importlib.import_module("bnstats.report.figures")
    except ImportError as err:
        if (err.name or "").split(".")[0] != "matplotlib":
            raise
        raise ReportDependencyError(f"{REPORT_NAME} needs matplotlib: {INSTALL_HINT}") from err


def intro_sentences(result: DemoResult) -> list[str]:
    """What was run, in two sentences."""
    config, data = result.config, result.dataset
    return [
        f"bnstats trained an MLP ({result.architecture}) normalized with "
        f"{result.norm_description} from scratch in NumPy on {data.name} for {config.epochs} "
        f"epochs ({result.history.steps} steps), then recomputed each normalization layer's "
        "exact population statistics with the weights frozen.",
        f"In training {training_words(result.net.batchnorm_layers[0])}; at test time the "
        "network needs one fixed estimate per layer, because a test batch may hold a single "
        "row. This page shows where the estimates come from and what each one gives, in the "
        f"notation of {LECTURE} (z, μ, σ², z_norm, z̃ = γ·z_norm + β).",
    ]


def training_words(layer: BatchNorm) -> str:
    """How ``layer`` normalizes a training batch, in words."""
    if isinstance(layer, GhostBatchNorm):
        return (
            f"each mini-batch is cut into virtual batches of {layer.ghost_size} rows, each "
            "normalized with its own μ and σ², and the estimators take one update per "
            "virtual batch"
        )
    if isinstance(layer, BatchRenorm):
        return (
            "each mini-batch is normalized with its own μ and σ², then corrected toward the "
            "running estimates by Batch Renorm's r and d"
        )
    return "each mini-batch is normalized with its own μ and σ²"


def settings_section(result: DemoResult, trace: LectureTrace) -> Section:
    """The run's settings as a table."""
    config, data = result.config, result.dataset
    rows = [
        ("dataset", data.name),
        ("training rows", str(len(data.X_train))),
        ("test rows", str(len(data.X_test))),
        ("classes", str(data.classes)),
        (
            "network",
            f"MLP {result.architecture}, Linear → {result.norm_description} → ReLU per hidden "
            "layer",
        ),
        ("epochs", str(config.epochs)),
        ("training batch size", str(config.batch_size)),
        ("training steps", str(result.history.steps)),
        ("optimizer", f"Adam, learning rate {config.lr:g}"),
        ("momentum", f"{config.momentum:g} (weight of the newest batch, PyTorch's convention)"),
        ("seed", str(config.seed)),
        ("layer shown", f"{trace.layer}, units {', '.join(map(str, trace.units))}"),
    ]
    table = Table(("setting", "value"), rows, caption="The run's settings")
    return Section("settings", "The run", sentences=(), tables=(table,))


def lecture_section(result: DemoResult, trace: LectureTrace, figures: ModuleType) -> Section:
    """The lecture's picture for one statistic, its sentences and the final numbers."""
    sym = SYMBOL[trace.stat]
    name = "μ (mean)" if trace.stat == "mean" else "σ² (variance)"
    image = Image(
        figures.png_data_uri(figures.lecture_figure(trace)),
        alt=f"Per-mini-batch {sym} of layer {trace.layer} over training, with the EMA, the "
        "debiased EMA and the population value",
    )
    rows = [
        (
            str(unit),
            f"{trace.batch[-1, unit]:.4g}",
            f"{trace.ema[-1, unit]:.4g}",
            f"{trace.ema_debiased[-1, unit]:.4g}",
            f"{trace.population[unit]:.4g}",
        )
        for unit in trace.units
    ]
    table = Table(
        ("unit", f"last batch {sym}", "EMA", "debiased EMA", "population"),
        rows,
        caption=f"Layer {trace.layer}, {sym} at the end of training"
        + (" (all unbiased)" if trace.stat == "var" else ""),
        numeric=(1, 2, 3, 4),
    )
    return Section(
        f"lecture-{trace.stat}",
        f"The lecture's picture: {name} of layer {trace.layer}",
        sentences=lecture_sentences(trace, result.config.epochs, len(result.dataset.X_train)),
        image=image,
        tables=(table,),
    )


def accuracy_section(result: DemoResult, figures: ModuleType) -> Section:
    """Bars of test accuracy per method, their sentences and the accuracy table."""
    data, accuracy = result.dataset, {m: result.test_accuracy[m] for m in METHODS}
    chance = result.chance_level
    single = result.net.predict(data.X_test, stats=BATCH, batch_size=1)
    image = Image(
        figures.png_data_uri(figures.accuracy_figure(accuracy, chance)),
        alt="Test accuracy for each way of getting the test-time statistics",
    )
    rows = [(name, f"{accuracy[name]:.4f}", m.description) for name, m in METHODS.items()]
    rows.append(("chance level", f"{chance:.4f}", "always answering the most common class"))
    table = Table(
        ("statistics", "test accuracy", "what it is"),
        rows,
        caption="Test accuracy by test-time statistics",
        numeric=(1,),
    )
    return Section(
        "accuracy",
        "Test accuracy per test-time method",
        sentences=accuracy_sentences(accuracy, chance, len(data.X_test), len(np.unique(single))),
        image=image,
        tables=(table,),
    )


def batch_size_section(result: DemoResult, figures: ModuleType) -> Section:
    """Accuracy against test batch size: batch statistics vs fixed running estimates."""
    data = result.dataset
    by_size = result.accuracy_by_batch_size(batch_sizes_to_try(len(data.X_test)))
    fixed = {m.name: result.test_accuracy[m.name] for m in FLAT_LINES}
    image = Image(
        figures.png_data_uri(figures.batch_size_figure(by_size, fixed, result.chance_level)),
        alt="Test accuracy against test batch size, batch statistics and running estimates",
    )
    rows = [(str(s), f"{a:.4f}") for s, a in by_size.items()]
    table = Table(
        ("test batch size", "accuracy with batch statistics"),
        rows,
        caption="Test accuracy with the test batch's own statistics; "
        + ", ".join(f"{METHODS[k].label} {v:.4f} at every size" for k, v in fixed.items()),
        numeric=(0, 1),
    )
    return Section(
        "batch-size",
        "Test accuracy against test batch size",
        sentences=batch_size_sentences(by_size, fixed),
        image=image,
        tables=(table,),
    )


def batch_sizes_to_try(test_rows: int) -> tuple[int, ...]:
    """:data:`TEST_BATCH_SIZES` up to ``test_rows``, then ``test_rows`` itself."""
    sizes = [s for s in TEST_BATCH_SIZES if s < test_rows]
    return (*sizes, test_rows)
