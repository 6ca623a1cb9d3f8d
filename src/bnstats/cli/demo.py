"""``bnstats demo``: train the NumPy engine and compare every way of getting test-time
statistics (see :mod:`bnstats.demo`)."""

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
from bnstats.demo import (
    DESCRIPTIONS,
    METHODS,
    NORM_LABELS,
    DemoConfig,
    DemoResult,
    build_network,
    chance_level,
    load_demo_data,
    run_demo,
)
from bnstats.report import ReportDependencyError, write_demo_report
from bnstats.report.lecture import check_layer_name

HELP = "train a batch-normalized MLP in NumPy and compare test-time statistics"
SAVED_FILES = ("history.npz", "summary.json", "network.npz")
OUT_FILES = (*SAVED_FILES, "report.html")


def add_parser(subparsers: Any) -> None:
    defaults = DemoConfig()
    p = subparsers.add_parser("demo", help=HELP, description=HELP)
    p.add_argument("--data", default=defaults.data, help="digits (default), FILE.npz or FILE.csv")
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
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
    p.add_argument("--hidden", type=hidden_sizes, default=defaults.hidden, help="e.g. 128,64")
    p.add_argument(
        "--test-fraction",
        type=float,
        default=defaults.test_fraction,
        help="share of a CSV file held out for testing",
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
        help=f"rows per virtual batch with --norm ghost (default {defaults.ghost_size})",
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
    p.set_defaults(run=run)


def hidden_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected widths like 128,64, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive widths like 128,64, got {text!r}")
    return sizes


def config_from(args: argparse.Namespace) -> DemoConfig:
    if args.ghost_size is not None and args.norm != "ghost":
        raise ValueError(f"--ghost-size applies to --norm ghost only, not --norm {args.norm}")
    ghost_size = DemoConfig.ghost_size if args.ghost_size is None else args.ghost_size
    return DemoConfig(
        data=args.data,
        epochs=args.epochs,
        batch_size=args.batch_size,
        momentum=args.momentum,
        lr=args.lr,
        seed=args.seed,
        hidden=tuple(args.hidden),
        test_fraction=args.test_fraction,
        norm=args.norm,
        ghost_size=ghost_size,
    )


def run(args: argparse.Namespace) -> int:
    config = config_from(args)
    check_report_layer(args.report_layer, args.out, config)
    if args.out:
        check_output_folder(args.out, OUT_FILES)  # fail before training, not after
    dataset = load_demo_data(config)
    check_memory(config, dataset)
    with progress_bar(enabled=not args.json) as advance:
        result = run_demo(config, progress=advance, dataset=dataset)
    saved = save_outputs(result, args.out, args.report_layer) if args.out else []
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print_report(result, saved_to=args.out, saved=saved)
    return 0


def check_report_layer(layer: str | None, out: str | None, config: DemoConfig) -> None:
    """Refuse ``--report-layer`` without ``--out`` or naming no BatchNorm layer, before any
    data is loaded (layer names depend on the hidden layers only, not on the data's width)."""
    if layer is None:
        return
    if not out:
        raise ValueError("--report-layer needs --out DIR, where report.html is written")
    net = build_network(config, features=1, classes=2, rows=config.batch_size)
    check_layer_name(layer, [bn.name for bn in net.batchnorm_layers])


def save_outputs(result: DemoResult, out: str, layer: str | None) -> list[str]:
    """Replace ``out`` by this run's files in one step (the previous run's stay if this
    fails); returns the names written."""
    with one_generation(out) as staging:
        result.save(staging)
        with one_blas_thread():  # the report evaluates the network at many batch sizes
            return [*SAVED_FILES, *save_report(result, str(staging), layer)]


def save_report(result: DemoResult, out: str, layer: str | None) -> list[str]:
    """Write report.html into ``out``; without matplotlib say so in one line on stderr and
    write nothing (the other files are already saved). Returns the names written."""
    try:
        path = write_demo_report(result, out, layer=layer)
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
        f"{data.classes} classes; MLP {data.features}-{'-'.join(map(str, config.hidden))}-"
        f"{data.classes} with {norm_label(result)}; {config.epochs} epochs of batch "
        f"{config.batch_size} "
        f"({result.history.steps} steps), momentum {config.momentum}"
    )
    print_table(result)
    print(f"\nchance level (most common class): {chance_level(data):.3f}")
    print()
    print(lecture_picture(result))
    if saved_to:
        print(f"\nsaved {', '.join(saved[:-1])} and {saved[-1]} in {saved_to}")


def norm_label(result: DemoResult) -> str:
    """The normalization layers in words, e.g. ``Ghost Batch Norm (virtual batches of 16)``."""
    config = result.config
    label = NORM_LABELS[config.norm]
    if config.norm == "ghost":
        return f"{label} (virtual batches of {config.ghost_size})"
    if config.norm == "renorm":
        s = result.net.batchnorm_layers[0].schedule
        return (
            f"{label} (plain for {s.warmup_steps} steps, rmax {s.rmax:g} by step "
            f"{s.rmax_full_at}, dmax {s.dmax:g} by step {s.dmax_full_at})"
        )
    return label


def print_table(result: DemoResult) -> None:
    rows = [(m, f"{result.test_accuracy[m]:.4f}", DESCRIPTIONS[m]) for m in METHODS]
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
    name = layer or result.net.batchnorm_layers[0].name
    trace = result.history.layers[name]
    batch = np.stack(trace["batch_mean"])[:, unit]
    ema = np.stack(trace["ema_mean"])[:, unit]
    bn = next(b for b in result.net.batchnorm_layers if b.name == name)
    population = np.full_like(batch, bn.estimators["population"].mean[unit])
    title = f"layer {name}, unit {unit}: mu of each mini-batch and its running average"
    plot = line_plot([("population", "-", population), ("batch mu", ".", batch), ("EMA", "*", ema)])
    return f"{title}\n{plot}"
