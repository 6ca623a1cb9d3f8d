"""The options the PyTorch commands share (``--model``, ``--weights``, ``--data``, ...), the
help formatter every command's ``--help`` uses, and turning those options into a model and
its batches (:mod:`bnstats.cli.loading` does the loading)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from bnstats.cli.loading import NPZ_BATCH_SIZE, load_batches, load_model, require_torch
from bnstats.cli.values import non_negative_float, positive_float, positive_int


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """``--help`` ends each option's help with its default, ``(default: 64)``, unless the
    default is None or False (nothing to show) or the help already names it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if default is None or default is False or default == argparse.SUPPRESS:
            return text
        if "default" in text:
            return text
        return f"{text} (default: %(default)s)"


def add_model_arguments(parser: argparse.ArgumentParser, *, data_required: bool = True) -> None:
    """``--model``, ``--weights``, ``--data``, ``--data-key``, ``--batch-size``, ``--json``."""
    parser.add_argument("--model", required=True, help="pkg.module:factory or file.py:factory")
    parser.add_argument("--weights", help="a state dict saved with torch.save")
    parser.add_argument(
        "--data",
        required=data_required,
        help="FILE.npz (array X, inputs or X_train) or pkg.module:batches",
    )
    parser.add_argument("--data-key", help="the npz array holding the inputs (npz data only)")
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        help=f"rows per batch for npz data (default: {NPZ_BATCH_SIZE})",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def add_max_samples(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-samples", type=positive_int, help="stop after this many samples")


def add_pass_mode(parser: argparse.ArgumentParser) -> None:
    """``--mode``, ``--tolerance`` and ``--one-batch-mib``, the pass options of
    ``bnstats.torch.recalibrate``."""
    parser.add_argument(
        "--mode",
        choices=("train", "eval", "eval_exact"),
        default="train",
        help="train: each BN layer's input with every BN normalizing by its batch (one pass); "
        "eval: as inference sees it, every BN using its new statistics (whole-model passes "
        "until they stop moving: 3 where the data fit in one batch, else 4 or more); "
        "eval_exact: the same, level by level",
    )
    parser.add_argument(
        "--tolerance",
        type=positive_float,
        help="stop drawing batches once every channel's mean and variance are within this "
        "(relative) of the whole data's statistics with 95%% confidence",
    )
    parser.add_argument(
        "--one-batch-mib",
        type=non_negative_float,
        help="with --mode eval: the memory in MiB the data may take to run as one batch, three "
        "passes (their largest BN input and their inputs; default: 256; 0: never)",
    )


def one_batch_bytes(args: argparse.Namespace) -> int | None:
    """``--one-batch-mib`` in bytes, None where not given."""
    mib = args.one_batch_mib
    return None if mib is None else int(mib * 2**20)


def add_out_file(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="FILE.pt", help="where to write")


def torch_tools() -> Any:
    """``bnstats.torch``, or the install hint in one line when torch is missing."""
    require_torch()
    import bnstats.torch as bt

    return bt


def load_inputs(args: argparse.Namespace) -> tuple[Any, list[Any] | None]:
    """The model ``--model`` and ``--weights`` name, and the batches of ``--data`` (None
    without it)."""
    model = load_model(args.model, args.weights)
    batches = load_batches(args.data, args.batch_size, args.data_key) if args.data else None
    return model, batches


def input_files(args: argparse.Namespace) -> dict[str, Path]:
    """The files the input options name, by option: ``--weights``, an ``.npz`` ``--data``,
    and the source file of ``--model`` and ``--data`` references (``file.py:name`` as given;
    ``pkg.module:name`` once that module is imported)."""
    files = {}
    if getattr(args, "weights", None):
        files["--weights"] = Path(args.weights)
    for option in ("--model", "--data"):
        reference = getattr(args, option.removeprefix("--"), None)
        if not reference:
            continue
        if reference.lower().endswith(".npz"):
            files[option] = Path(reference)
            continue
        source = _source_file(reference.partition(":")[0])
        if source is not None:
            files[option] = source
    return files


def _source_file(module_name: str) -> Path | None:
    if module_name.endswith(".py"):
        return Path(module_name)
    module = sys.modules.get(module_name)
    file = getattr(module, "__file__", None)
    return Path(file) if file else None


def first_input(batches: list[Any] | None) -> Any:
    """The input of the first batch (its first element for an ``(x, y)`` batch); None
    without batches."""
    if not batches:
        return None
    first = batches[0]
    return first[0] if isinstance(first, (tuple, list)) else first


__all__ = [
    "DefaultsHelpFormatter",
    "add_max_samples",
    "add_model_arguments",
    "add_out_file",
    "add_pass_mode",
    "one_batch_bytes",
    "first_input",
    "input_files",
    "load_inputs",
    "torch_tools",
]
