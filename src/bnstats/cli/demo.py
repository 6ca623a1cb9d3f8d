"""``bnstats demo``: the command line of :mod:`bnstats.demo`, which holds the demo itself;
here are its options, its progress bar and what it prints."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np

from bnstats._output_set import check_output_folder, one_generation
from bnstats._threads import one_blas_thread
from bnstats.cli.memory import check_memory
from bnstats.cli.textplot import line_plot
from bnstats.cli.values import non_negative_int, positive_float
from bnstats.data import load_dataset
from bnstats.demo import (
    DEFAULT_GHOST_SIZE,
    NORM_LABELS,
    DemoConfig,
    DemoResult,
    check_config,
    prepare_demo,
    train_demo,
)
from bnstats.methods import METHODS, POPULATION, RUNNING_EMA
from bnstats.report import ReportDependencyError, lecture_traces, write_demo_report

NAME = "demo"
HELP = "train a batch-normalized MLP in NumPy and compare test-time statistics"
SAVED_FILES = ("history.npz", "summary.json", "network.npz")
OUT_FILES = (*SAVED_FILES, "report.html")


def add_arguments(p: argparse.ArgumentParser) -> None:
    defaults = DemoConfig()
    p.add_argument("--data", default=defaults.data, help="digits (default), FILE.npz or FILE.csv")
    p.add_argument("--epochs", type=int, default=defaults.epochs, help="passes over the data")
    p.add_argument(
        "--batch-size", type=int, default=defaults.batch_size, help="rows per mini-batch"
    )
    p.add_argument(
        "--momentum",
        type=float,
        default=defaults.momentum,
        help="weight of the newest batch in the running average (PyTorch's convention)",
    )
    p.add_argument("--lr", type=positive_float, default=defaults.lr, help="Adam's learning rate")
    p.add_argument(
        "--seed", type=non_negative_int, default=defaults.seed, help="split, weights, shuffling"
    )
    p.add_argument(
        "--hidden",
        type=hidden_sizes,
        default=defaults.hidden,
        help=f"hidden layer widths (default: {','.join(map(str, defaults.hidden))})",
    )
    p.add_argument(
        "--test-fraction",
        type=float,
        help="share of the digits or a CSV file held out for testing (an .npz file has its "
        f"own split; default: {defaults.test_fraction})",
    )
    p.add_argument(
        "--norm",
        choices=list(NORM_LABELS),
        default=defaults.norm,
        help="bn: batch norm (default); renorm: Batch Renormalization, its schedule fitted to "
        "the run; ghost: Ghost Batch Norm",
    )
    p.add_argument(
        "--ghost-size",
        type=int,
        default=None,
        help=f"rows per virtual batch with --norm ghost (default {DEFAULT_GHOST_SIZE})",
    )
    p.add_argument(
        "--out", metavar="DIR", help="save history.npz, summary.json, network.npz, report.html"
    )
    p.add_argument(
        "--report-layer",
        metavar="NAME",
        help="BatchNorm layer drawn in report.html (default: the first, bn1)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead")


def hidden_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected widths like 128,64, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive widths like 128,64, got {text!r}")
    return sizes


def config_from(args: argparse.Namespace) -> DemoConfig:
    if args.report_layer is not None and args.out is None:
        raise ValueError("--report-layer needs --out DIR, where report.html is written")
    if args.test_fraction is not None and args.data.lower().endswith(".npz"):
        raise ValueError(
            f"--test-fraction does not apply to {args.data}: an .npz file has its own test "
            "split (X_test, y_test)"
        )
    return DemoConfig(
        data=args.data,
        epochs=args.epochs,
        batch_size=args.batch_size,
        momentum=args.momentum,
        lr=args.lr,
        seed=args.seed,
        hidden=tuple(args.hidden),
        test_fraction=DemoConfig().test_fraction
        if args.test_fraction is None
        else args.test_fraction,
        norm=args.norm,
        ghost_size=args.ghost_size,
        report_layer=args.report_layer,
    )


def run(args: argparse.Namespace) -> int:
    config = config_from(args)
    if args.out is not None:
        check_output_folder(args.out, OUT_FILES)  # fail before training, not after
    dataset = load_dataset(config.data, seed=config.seed, test_fraction=config.test_fraction)
    check_config(config, dataset)  # every option first: the memory estimate divides by them
    check_memory(config, dataset)  # before the network is built
    dataset, net = prepare_demo(config, dataset)
    with progress_bar(enabled=not args.json) as advance:
        result = train_demo(config, dataset, net, progress=advance)
    saved = save_outputs(result, args.out) if args.out else []
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print_report(result, saved_to=args.out, saved=saved)
    return 0


def save_outputs(result: DemoResult, out: str) -> list[str]:
    """Replace ``out`` by this run's files in one step (the previous run's stay if this
    fails); returns the names written."""
    with one_generation(out) as staging:
        result.save(staging)
        with one_blas_thread():  # the report evaluates the network at many batch sizes
            return [*SAVED_FILES, *save_report(result, str(staging))]


def save_report(result: DemoResult, out: str) -> list[str]:
    """Write report.html into ``out``; without matplotlib say so in one line on stderr and
    write nothing (the other files are already saved). Returns the names written."""
    try:
        path = write_demo_report(result, out, layer=result.config.report_layer)
    except ReportDependencyError as err:
        print(f"bnstats: {err} (the other files were saved)", file=sys.stderr)
        return []
    return [path.name]


def progress_bar(enabled: bool):
    """A context giving a ``(step, total, loss)`` callback that drives a rich progress bar on
    stderr (nothing when disabled, when stderr is not a terminal or rich is not installed)."""
    if not enabled:
        return nullcontext(None)
    try:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    except ImportError:
        return nullcontext(None)
    if not Console(stderr=True).is_terminal:
        return nullcontext(None)

    return _RichProgress(
        Progress(
            TextColumn("training"),
            BarColumn(),
            TextColumn("step {task.completed}/{task.total}  loss {task.fields[loss]:.3f}"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
    )


class _RichProgress:
    def __init__(self, progress: Any) -> None:
        self.progress = progress
        self.task = None

    def __enter__(self):
        self.progress.__enter__()

        def advance(step: int, total: int, loss: float) -> None:
            if self.task is None:
                self.task = self.progress.add_task("train", total=total, loss=loss)
            self.progress.update(self.task, completed=step, loss=loss)

        return advance

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)


def print_report(
    result: DemoResult, saved_to: str | None = None, saved: Sequence[str] = SAVED_FILES
) -> None:
    """The accuracy table and the lecture's picture, on stdout."""
    config, data = result.config, result.dataset
    print(
        f"{data.name}: {len(data.X_train)} training rows, {len(data.X_test)} test rows, "
        f"{data.classes} classes; MLP {result.architecture} with {result.norm_description}; "
        f"{config.epochs} epochs of batch {config.batch_size} "
        f"({result.history.steps} steps), momentum {config.momentum}"
    )
    print_table(result)
    print(f"\nchance level (most common class): {result.chance_level:.3f}")
    print()
    print(lecture_picture(result))
    if saved_to:
        print(f"\nsaved {', '.join(saved[:-1])} and {saved[-1]} in {saved_to}")


def print_table(result: DemoResult) -> None:
    rows = [
        (name, f"{result.test_accuracy[name]:.4f}", m.description) for name, m in METHODS.items()
    ]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print()
        for method, acc, what in rows:
            print(f"  {method:<14} {acc:>8}   {what}")
        return
    table = Table(title="test accuracy by test-time statistics")
    table.add_column("statistics")
    table.add_column("accuracy", justify="right")
    table.add_column("what it is")
    for row in rows:
        table.add_row(*row)
    Console(file=sys.stdout, soft_wrap=True).print(table)


def lecture_picture(result: DemoResult, layer: str | None = None, unit: int = 0) -> str:
    """Per-batch mu of one unit, the running average through it, and the population value."""
    trace = lecture_traces(result.history, result.net, layer=layer, units=[unit])["mean"]
    batch = trace.batch[:, unit]
    population = np.full_like(batch, trace.population[unit])
    kind = "virtual batch" if trace.virtual else "mini-batch"
    title = f"layer {trace.layer}, unit {unit}: mu of each {kind} and its running average"
    plot = line_plot(
        [
            (POPULATION.label, "-", population),
            ("batch mu", ".", batch),
            (RUNNING_EMA.label, "*", trace.ema[:, unit]),
        ],
        x_label="update" if trace.virtual else "step",
    )
    return f"{title}\n{plot}"
