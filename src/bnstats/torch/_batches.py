"""How a batch reaches the model, in every bnstats.torch tool: what a batch is (a tensor,
an ``(input, target)`` tuple or list, a dict, nested), how many samples it holds, how it is
cut at ``max_samples``, moved to the model's device and passed to the model.

- :func:`iterate_batches`: ``(batch, samples)`` from the user's batches, the batch crossing
  ``max_samples`` cut (:func:`trim_batch`), no batch drawn after it.
- :func:`default_forward`: ``model(x)``, ``model(batch[0])``, ``model(**batch)``; a tool's
  ``forward=`` (:data:`Forward`) replaces it.
- :func:`move_to_device`, :func:`batch_size`, :func:`first_tensor`, :func:`data_length`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

Forward = Callable[[nn.Module, Any], Any]
"""``forward(model, batch)``: how to call the model on one batch (its output is ignored)."""


def move_to_device(batch: Any, device: torch.device | None) -> Any:
    """``batch`` with every tensor in it (nested tuples, lists, dicts) on ``device``."""
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch if batch.device == device else batch.to(device, non_blocking=True)
    return _map_tensors(batch, lambda value: move_to_device(value, device))


def _map_tensors(batch: Any, fn: Callable[[Any], Any]) -> Any:
    if isinstance(batch, Mapping):
        return {key: fn(value) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(fn(value) for value in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(fn(value) for value in batch)
    return batch


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Call ``model`` the usual way for this kind of batch: ``model(x)`` for a tensor,
    ``model(batch[0])`` for a tuple or list (``(input, target)``, as ``update_bn`` does),
    ``model(**batch)`` for a dict (its keys the model's keyword arguments)."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError(
                "a batch is an empty tuple/list; there is no input to call the model on"
            )
        return model(batch[0])
    if isinstance(batch, Mapping):
        try:
            return model(**batch)
        except TypeError as error:
            keys = ", ".join(map(repr, batch))
            raise TypeError(
                f"calling the model with the batch's keys ({keys}) as keyword arguments failed "
                f"({error}); pass forward=lambda model, batch: model(...) to say how to call it"
            ) from error
    raise TypeError(
        f"do not know how to call the model on a batch of type {type(batch).__name__}; "
        "pass forward=lambda model, batch: model(...) to say how"
    )


def first_tensor(batch: Any) -> torch.Tensor | None:
    """The first tensor in ``batch`` (depth first, dicts in insertion order), or None."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        values: Iterable[Any] = batch.values()
    elif isinstance(batch, (tuple, list)):
        values = batch
    else:
        return None
    for value in values:
        found = first_tensor(value)
        if found is not None:
            return found
    return None


def batch_size(batch: Any) -> int | None:
    """Samples in ``batch``: the first dimension of its first tensor (None without a tensor)."""
    tensor = first_tensor(batch)
    if tensor is None or tensor.dim() == 0:
        return None
    return int(tensor.shape[0])


def trim_batch(batch: Any, keep: int, size: int) -> Any:
    """The first ``keep`` samples of ``batch``: every tensor whose first dimension is ``size``
    is cut to ``keep`` rows; the rest passes as is."""
    if isinstance(batch, torch.Tensor):
        return batch[:keep] if batch.dim() > 0 and batch.shape[0] == size else batch
    return _map_tensors(batch, lambda value: trim_batch(value, keep, size))


def data_length(batches: Any, drawn: int = 0) -> int | None:
    """How many batches ``batches`` holds (``len``), or None for data without a length (a
    generator, an iterator, a DataLoader over an iterable dataset) and for a length below
    the ``drawn`` batches already drawn from them (one that iteration does not keep)."""
    try:
        length = len(batches)
    except TypeError:
        return None
    return length if length >= drawn else None


def iterate_batches(
    batches: Iterable[Any], max_samples: int | None = None
) -> Iterator[tuple[Any, int | None]]:
    """Yield ``(batch, samples)`` from ``batches``, stopping once ``max_samples`` are taken.

    The batch that crosses ``max_samples`` is cut (see :func:`trim_batch`) so that exactly
    ``max_samples`` samples are used, and no further batch is drawn (an endless loader is
    fine). ``samples`` is :func:`batch_size` of the batch.
    """
    if isinstance(batches, torch.Tensor):
        raise TypeError(
            "batches is a single tensor; pass an iterable of batches, "
            "e.g. [x] or x.split(64) (iterating a tensor would yield its rows)"
        )
    if not isinstance(batches, Iterable):
        raise TypeError(
            "batches must be an iterable of batches (a DataLoader, a list of tensors, ...), "
            f"got {type(batches).__name__}"
        )
    taken = 0
    for batch in batches:
        size = batch_size(batch)
        if max_samples is not None:
            if size is None:
                raise TypeError(
                    "max_samples needs batches holding tensors (samples along the first "
                    f"dimension); got a {type(batch).__name__} without any"
                )
            if taken + size > max_samples:
                keep = int(max_samples) - taken
                batch, size = trim_batch(batch, keep, size), keep
        yield batch, size
        taken += size or 0
        if max_samples is not None and taken >= max_samples:
            return
