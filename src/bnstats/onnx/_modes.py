"""The model in eval mode for the duration of a check or an export, its flags put back after."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def in_eval_mode(model: Any) -> Iterator[None]:
    """Every module of ``model`` in eval mode within the block; each module's ``training``
    flag as it was afterwards, also on error. Autograd is off within."""
    import torch

    modes = [(module, module.training) for module in model.modules()]
    try:
        with torch.no_grad():
            model.eval()
            yield
    finally:
        for module, training in modes:
            module.training = training
