"""Input checks shared by bnstats' batch-norm modules: one clear error naming the module and
the shape, instead of a kernel's message."""

from __future__ import annotations

from torch import Tensor, nn


def check_input(module: nn.modules.batchnorm._BatchNorm, x: Tensor, batch_stats: bool) -> None:
    """Raise ValueError unless ``x`` has the module's rank and channels (axis 1) and, when it is
    to be normalized by its own statistics, more than one value per channel."""
    label = f"{type(module).__name__}({module.num_features})"
    try:
        module._check_input_dim(x)
    except ValueError as err:
        raise ValueError(f"{label}: {err}; got input of shape {tuple(x.shape)}") from None
    if x.shape[1] != module.num_features:
        raise ValueError(
            f"{label} expects {module.num_features} channels on axis 1, "
            f"got input of shape {tuple(x.shape)}"
        )
    if batch_stats and x.numel() // x.shape[1] < 2:
        raise ValueError(
            f"{label} got input of shape {tuple(x.shape)} in training: batch statistics need "
            "more than one value per channel"
        )
