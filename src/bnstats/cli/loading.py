"""Loading a user's model, weights and data for the PyTorch commands.

``--model pkg.module:factory`` (or ``path/to/file.py:factory``) names a callable returning an
``nn.Module``, or a module instance; ``--weights`` a ``torch.save``-d state dict;
``--data FILE.npz`` an array of inputs cut into batches, or ``pkg.module:batches`` a callable
(or iterable) giving the batches. Every failure is a ``ValueError`` naming what failed, a
``sys.exit()`` in the user's code included (it would otherwise end bnstats quietly with the
user's status); :func:`user_code_errors` does the same for a whole command.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import keyword
import pickle
import re
import sys
import traceback
import zipfile
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from bnstats._formats import npz_array, open_npz

NPZ_INPUT_KEYS = ("X", "inputs", "X_train", "x")
NPZ_BATCH_SIZE = 64
"""Rows per batch of ``.npz`` data without ``--batch-size``."""


TORCH_HINT = (
    "this command needs PyTorch: pip install torch (from a bnstats checkout: "
    'pip install ".[torch]"; CPU-only: add --index-url https://download.pytorch.org/whl/cpu)'
)


def require_torch() -> Any:
    """Import torch, or explain in one line how to get it."""
    try:
        import torch
    except ImportError:
        raise ImportError(TORCH_HINT) from None
    return torch


def resolve(reference: str, what: str) -> Any:
    """The object ``module.path:attribute`` or ``file.py:attribute`` refers to."""
    module_name, sep, attribute = reference.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(
            f"{what} must look like 'package.module:name' or 'file.py:name', got {reference!r}"
        )
    module = _import(module_name, what)
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"{what} {reference!r}: {module_name} has no attribute {attribute!r}")
        target = getattr(target, part)
    return target


def _import(module_name: str, what: str) -> Any:
    if module_name.endswith(".py"):
        return _import_file(Path(module_name), what)
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # like `python -m`: modules in the working directory
    try:
        return importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{what}: cannot import {module_name!r} ({err})") from None
    except SystemExit as err:
        raise ValueError(f"{what}: importing {module_name} failed: {exit_called(err)}") from None
    except Exception as err:  # the module's own code failed: a SyntaxError, a NameError, ...
        raise ValueError(
            f"{what}: importing {module_name} failed: {type(err).__name__}: {err}"
        ) from None


_ADDED: list[tuple[str, str]] = []
"""What loading files added to ``sys.path`` and ``sys.modules``, undone after the command."""


def _import_file(path: Path, what: str) -> Any:
    """The module of ``path``, imported as ``python path`` would see it: its folder on
    ``sys.path`` (until the command ends, so that the factory, the batches and the forward
    may import sibling modules when called), under its stem as module name when that is a
    valid identifier no other module has (so that ``torch.save`` of a model whose classes
    it defines refers to ``stem.Class``, as ``--model stem:factory`` would)."""
    if not path.is_file():
        raise ValueError(f"{what}: no such file {path}")
    folder = str(path.parent.resolve())
    name = path.stem if _free_module_name(path.stem) else f"bnstats_user_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    if folder not in sys.path:
        sys.path.insert(0, folder)
        _ADDED.append(("path", folder))
    if name == path.stem:  # as an import does: pickle looks classes up there
        sys.modules[name] = module
        _ADDED.append(("module", name))
    try:
        spec.loader.exec_module(module)
    except SystemExit as err:
        raise ValueError(f"{what}: importing {path} failed: {exit_called(err)}") from None
    except Exception as err:
        raise ValueError(f"{what}: importing {path} failed: {type(err).__name__}: {err}") from None
    return module


def _free_module_name(stem: str) -> bool:
    return stem.isidentifier() and not keyword.iskeyword(stem) and stem not in sys.modules


def release_user_files() -> None:
    """Take the folders of loaded files off ``sys.path`` and their modules out of
    ``sys.modules`` again."""
    while _ADDED:
        kind, entry = _ADDED.pop()
        if kind == "path" and entry in sys.path:
            sys.path.remove(entry)
        elif kind == "module":
            sys.modules.pop(entry, None)


def load_model(reference: str, weights: str | None = None) -> Any:
    """Build the model ``reference`` names and load ``weights`` into it (strictly)."""
    torch = require_torch()
    target = resolve(reference, "--model")
    model = target if isinstance(target, torch.nn.Module) else _call(target, reference)
    if not isinstance(model, torch.nn.Module):
        raise ValueError(
            f"--model {reference!r} gave a {type(model).__name__}, not a torch.nn.Module"
        )
    if weights:
        load_weights(model, weights)
    return model


def _call(factory: Any, reference: str) -> Any:
    if not callable(factory):
        raise ValueError(f"--model {reference!r} is neither a module nor callable")
    try:
        return factory()
    except SystemExit as err:
        raise ValueError(f"--model {reference!r} failed: {exit_called(err)}") from None
    except Exception as err:
        raise ValueError(f"--model {reference!r} raised {type(err).__name__}: {err}") from None


def load_weights(model: Any, path: str) -> None:
    """Load a state dict saved with ``torch.save`` (bare, or under 'state_dict'/'model')."""
    torch = require_torch()
    file = Path(path)
    if file.is_dir():
        raise ValueError(f"--weights {file} is a directory, not a checkpoint file")
    if not file.is_file():
        raise ValueError(f"--weights: no such file {file}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (
        RuntimeError,
        EOFError,
        OSError,
        zipfile.BadZipFile,
        ValueError,
        pickle.UnpicklingError,
    ) as err:
        raise ValueError(f"{file}: {_checkpoint_problem(err)}") from None
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{file}: expected a state dict, found a {type(state).__name__}")
    differences = state_dict_differences(
        model.state_dict(), state, optional=_filled_by_torch(torch, model)
    )
    if differences:
        raise ValueError(f"{file} does not fit the model: {differences}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{file} does not fit the model: {' '.join(str(err).split())}") from None


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_UNSUPPORTED = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _checkpoint_problem(err: BaseException) -> str:
    """Why ``torch.load(..., weights_only=True)`` refused a file, in one line: the object it
    would not unpickle when it says which (without its terminal escape codes)."""
    text = _ANSI.sub("", str(err))
    unsupported = _UNSUPPORTED.search(text)
    if unsupported:
        return (
            f"it holds an object of class {unsupported.group(1)}, which bnstats does not unpickle "
            "(torch.load with weights_only=True); save a state dict of tensors"
        )
    first = (text.strip().splitlines() or [type(err).__name__])[0]
    return f"not a readable PyTorch checkpoint ({first.strip()})"


def _filled_by_torch(torch: Any, model: Any) -> set[str]:
    """The keys torch's strict ``load_state_dict`` may find missing: ``num_batches_tracked``
    of normalization layers (checkpoints from before torch 0.4.1 lack it, and the layer's
    ``_load_from_state_dict`` fills it in). Whether it does is torch's decision, made from
    the file's metadata when loading."""
    norm = torch.nn.modules.batchnorm._NormBase
    return {
        f"{name}.num_batches_tracked" if name else "num_batches_tracked"
        for name, module in model.named_modules()
        if isinstance(module, norm) and module.track_running_stats
    }


def state_dict_differences(
    expected: dict[str, Any], found: dict[str, Any], optional: Collection[str] = ()
) -> str:
    """The keys and shapes by which ``found`` (a file's) differs from ``expected`` (the
    model's), in one line; empty if they agree. Keys in ``optional`` may be missing."""
    missing = [key for key in expected if key not in found and key not in optional]
    unexpected = [key for key in found if key not in expected]
    shapes = [
        f"{key} is {_shape(found[key])} in the file, {_shape(value)} in the model"
        for key, value in expected.items()
        if key in found and _shape(found[key]) != _shape(value)
    ]
    parts = [
        f"{len(missing)} keys missing ({_few(missing)})" if missing else "",
        f"{len(unexpected)} unexpected keys ({_few(unexpected)})" if unexpected else "",
        f"{len(shapes)} shapes differ ({_few(shapes)})" if shapes else "",
    ]
    return "; ".join(part for part in parts if part)


def _shape(value: Any) -> tuple[int, ...] | None:
    return tuple(value.shape) if hasattr(value, "shape") else None


def _few(items: list[str], shown: int = 3) -> str:
    return ", ".join(items[:shown]) + (
        f", ... ({len(items) - shown} more)" if len(items) > shown else ""
    )


def load_batches(
    reference: str,
    batch_size: int | None = None,
    key: str | None = None,
    option: str = "--data",
) -> list[Any]:
    """The batches for a command: from an ``.npz`` file cut into ``batch_size`` rows
    (:data:`NPZ_BATCH_SIZE` when None), or from ``module:batches`` (a callable returning an
    iterable, or an iterable), which takes neither ``batch_size`` nor ``key``. Errors name
    ``option``, the option that gave ``reference``."""
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    if reference.lower().endswith(".npz"):
        return _npz_batches(Path(reference), batch_size or NPZ_BATCH_SIZE, key, option)
    given = [name for name, value in (("--batch-size", batch_size), ("--data-key", key)) if value]
    if given:
        raise ValueError(
            f"{' and '.join(given)} {'apply' if len(given) > 1 else 'applies'} to .npz data "
            f"only; {option} {reference} gives its own batches"
        )
    source = resolve(reference, option)
    batches = source() if callable(source) else source
    if not isinstance(batches, Iterable):
        raise ValueError(f"{option} {reference!r} gave a {type(batches).__name__}, not batches")
    batches = list(batches)
    if not batches:
        raise ValueError(f"{option} {reference!r} gave no batches")
    return batches


def _npz_batches(path: Path, batch_size: int, key: str | None, option: str) -> list[Any]:
    torch = require_torch()
    if not path.exists():
        raise ValueError(f"{option}: no such file {path}")
    wanted = key or " or ".join(NPZ_INPUT_KEYS)
    with open_npz(path, f"{option} inputs (array {wanted})", ValueError) as archive:
        names = [key] if key else [k for k in NPZ_INPUT_KEYS if k in archive.files]
        if not names or names[0] not in archive.files:
            raise ValueError(f"{path}: no array {wanted}; it holds {archive.files}")
        inputs = npz_array(archive, names[0], path, ValueError)
    if inputs.ndim < 2 or len(inputs) == 0:
        raise ValueError(f"{path}: inputs must be (N, ...) with N > 0, got shape {inputs.shape}")
    if not np.issubdtype(inputs.dtype, np.number) or np.iscomplexobj(inputs):
        raise ValueError(f"{path}: inputs must be real numbers, got dtype {inputs.dtype}")
    if not np.isfinite(inputs).all():
        raise ValueError(f"{path}: inputs hold NaN or Inf")
    with np.errstate(over="ignore"):
        single = np.ascontiguousarray(inputs, dtype=np.float32)
    if not np.isfinite(single).all():
        largest = float(np.abs(inputs).max())
        raise ValueError(
            f"{path}: inputs reach {largest:g}, beyond float32's range (3.4e+38) the model "
            "computes in; rescale them"
        )
    return list(torch.split(torch.from_numpy(single), batch_size))


def exit_called(err: SystemExit) -> str:
    """``sys.exit(3) was called at mymodel.py:12``: where the user's code asked to end."""
    frames = traceback.extract_tb(err.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    return f"sys.exit({err.code!r}) was called{where}"


def user_code_errors(run: Callable[[argparse.Namespace], int]) -> Callable:
    """``run`` (a command), with failures inside the user's model or data (a shape mismatch,
    a forward or a batch source raising anything, ``sys.exit()``) turned into one
    ``ValueError`` line, reported with exit status 2."""

    @functools.wraps(run)
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except (ValueError, OSError, ImportError, MemoryError):
            raise  # already one line
        except SystemExit as err:
            raise ValueError(f"{args.command}: {exit_called(err)}") from None
        except Exception as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ValueError(f"{args.command}: {type(err).__name__}: {first}") from err
        finally:
            release_user_files()

    return wrapped


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
