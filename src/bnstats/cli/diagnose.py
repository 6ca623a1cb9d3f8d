"""``bnstats diagnose``: why a model does worse in eval mode, measured on the user's data.

    bnstats diagnose --model pkg.module:factory [--weights W] --data TRAIN [--test TEST]
                     [--json] [--out DIR]

Inputs are read as the other PyTorch commands read them (:mod:`bnstats.cli.loading`); an
``.npz`` file's ``y`` array, when it has one, gives the labels (integers, one per row), so
the settings are compared by accuracy. The model is put in eval mode first (a factory builds
it in training mode, which is not the user's doing).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from bnstats._formats import npz_array, open_npz
from bnstats.cli.arguments import (
    add_max_samples,
    add_model_arguments,
    input_files,
    torch_tools,
)
from bnstats.cli.loading import load_batches, load_model, require_torch, user_code_errors
from bnstats.cli.outputs import check_page_folder

NAME = "diagnose"
HELP = "why eval mode does worse than training: the cause, the layers, the fix, measured"
LABEL_KEY = "y"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--test", help="test data, as --data (default: the training data)")
    add_max_samples(parser)
    parser.add_argument("--out", metavar="DIR", help="also write DIR/diagnose.html")


@user_code_errors
def run(args: argparse.Namespace) -> int:
    bt = torch_tools()
    page = _page_path(args) if args.out is not None else None
    model = load_model(args.model, args.weights)
    batches = labelled_batches(args.data, *_npz_options(args, args.data))
    test = (
        labelled_batches(args.test, *_npz_options(args, args.test), "--test") if args.test else None
    )
    if page:
        _page_path(args)  # again: the modules --model and --data imported
    model.eval()
    check_labels(model, batches, args.data)
    if test is not None:
        check_labels(model, test, args.test)
    report = bt.diagnose(
        model,
        batches,
        test,
        max_samples=args.max_samples,
        progress=False if args.json else None,
    )
    if page:
        from bnstats.report.diagnose_page import write_diagnose_report

        write_diagnose_report(report, page.parent)
    if args.json:
        print(json.dumps({**report.to_dict(), **({"page": str(page)} if page else {})}))
    else:
        print(str(report) + (f"\nwrote {page}" if page else ""))
    return 0


def _npz_options(args: argparse.Namespace, reference: str) -> tuple[int | None, str | None]:
    """``--batch-size`` and ``--data-key`` for ``reference``: they apply to the ``.npz`` files
    of ``--data`` and ``--test``; given with no such file, they are refused."""
    npz = [r for r in (args.data, args.test) if r and r.lower().endswith(".npz")]
    if npz and not reference.lower().endswith(".npz"):
        return None, None
    return args.batch_size, args.data_key


def labelled_batches(
    reference: str, batch_size: int | None, key: str | None, option: str = "--data"
) -> list[Any]:
    """The batches of ``reference`` (given as ``option``); for an ``.npz`` file with a ``y``
    array, ``(x, y)`` batches with ``y`` as int64 labels (0, 1, 2, ...)."""
    batches = load_batches(reference, batch_size, key, option)
    if not reference.lower().endswith(".npz"):
        return batches
    path = Path(reference)
    with open_npz(path, f"{option} data", ValueError) as archive:
        if LABEL_KEY not in archive.files:
            return batches
        labels = npz_array(archive, LABEL_KEY, path, ValueError)
    rows = sum(len(batch) for batch in batches)
    if labels.ndim != 1 or len(labels) != rows:
        raise ValueError(
            f"{reference}: {LABEL_KEY} must hold one label per input row ({rows}), got shape "
            f"{labels.shape}"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{reference}: {LABEL_KEY} must hold integer class labels, got dtype {labels.dtype}"
        )
    torch = require_torch()
    parts = torch.from_numpy(labels.astype(np.int64)).split([len(b) for b in batches])
    return list(zip(batches, parts, strict=True))


def check_labels(model: Any, batches: list[Any], reference: str) -> None:
    """Refuse labels the model cannot predict: with ``(x, y)`` batches from ``reference``
    (an ``.npz`` file's ``y``) and ``(rows, classes)`` outputs, every label must be one of
    0 to classes - 1, the model's output width seen on the first batch (in eval mode,
    without gradients). Otherwise accuracy would be 0 in every setting."""
    if not reference.lower().endswith(".npz") or not isinstance(batches[0], tuple):
        return
    torch = require_torch()
    with torch.no_grad():
        output = model(batches[0][0])
    if not isinstance(output, torch.Tensor) or output.dim() != 2 or output.shape[1] < 2:
        return  # no class scores: diagnose compares outputs, not accuracy
    classes = output.shape[1]
    labels = torch.cat([labels for _, labels in batches])
    outside = labels[(labels < 0) | (labels >= classes)]
    if len(outside):
        raise ValueError(
            f"{reference}: {LABEL_KEY} holds label {int(outside[0])}, but the model's output has "
            f"{classes} columns (classes 0 to {classes - 1})"
        )


def _page_path(args: argparse.Namespace) -> Path:
    """``--out``'s ``diagnose.html``, checked before any work."""
    from bnstats.report.diagnose_page import DIAGNOSE_PAGE

    inputs = input_files(args)
    if args.test and args.test.lower().endswith(".npz"):
        inputs["--test"] = Path(args.test)
    return check_page_folder("--out", args.out, DIAGNOSE_PAGE, inputs)
