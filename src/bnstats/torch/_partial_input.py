"""A warning for BN layers whose own training forward normalizes only part of their input.

A pass measures each BN layer's input. A subclass with a forward of its own may normalize
something else with its running statistics: timm's ``SplitBatchNorm2d`` (AdvProp, AugMix)
normalizes only the first split of each training batch itself and hands the others to its
auxiliary layers, while in eval mode it normalizes the whole input. bnstats keeps measuring
the input (what the layer's eval-mode forward normalizes), and says so: during each such
layer's training forward a ``TorchFunctionMode`` looks at the batch-norm calls made with the
layer's own ``running_mean``, and the first whose input has another shape than the layer's
input gives one warning naming the layer. Shapes only: nothing is read from the device.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from bnstats.torch._layers import display_name
from bnstats.torch.modules import EstimatorBatchNorm

_KNOWN_FORWARDS = (nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward)


def has_own_forward(layer: nn.Module) -> bool:
    """True for a BN layer whose forward is neither torch's nor bnstats' own."""
    return not isinstance(layer, EstimatorBatchNorm) and type(layer).forward not in _KNOWN_FORWARDS


class _KernelInputs(TorchFunctionMode):
    """While active: the input shape of each batch-norm call with ``layer``'s running mean."""

    def __init__(self, layer: nn.Module, seen: Callable[[torch.Size], None]) -> None:
        super().__init__()
        self.layer, self.seen = layer, seen

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.batch_norm or func is torch.batch_norm:
            index = 1 if func is F.batch_norm else 3
            running = args[index] if len(args) > index else kwargs.get("running_mean")
            if running is not None and running is self.layer.running_mean:
                self.seen(args[0].shape if args else kwargs["input"].shape)
        return func(*args, **kwargs)


def watch_partial_input(name: str, layer: nn.Module) -> list[RemovableHandle]:
    """Hooks on ``layer`` (a BN layer with its own forward, in a train-mode pass) that warn
    once when its forward normalizes, with its running statistics, a tensor shaped unlike
    its input."""
    state: dict[str, Any] = {"warned": False}

    def seen(shape: torch.Size) -> None:
        expected = state["input_shape"]
        if state["warned"] or expected is None or shape == expected:
            return
        state["warned"] = True
        warnings.warn(
            f"bnstats: BN layer {display_name(name)} ({type(layer).__name__}) normalizes a "
            f"tensor of shape {tuple(shape)} with its running statistics in training, not its "
            f"input of shape {tuple(expected)}; its statistics are measured on its whole input, "
            "as its eval-mode forward normalizes it (mode='eval' measures exactly what "
            "inference sees)",
            stacklevel=2,
        )

    def enter(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else kwargs.get("input")
        state["input_shape"] = x.shape if isinstance(x, torch.Tensor) else None
        mode = _KernelInputs(module, seen)
        mode.__enter__()
        state["mode"] = mode

    def leave(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        mode = state.pop("mode", None)
        if mode is not None:
            mode.__exit__(None, None, None)

    return [
        layer.register_forward_pre_hook(enter, with_kwargs=True),
        layer.register_forward_hook(leave, with_kwargs=True, always_call=True),
    ]
