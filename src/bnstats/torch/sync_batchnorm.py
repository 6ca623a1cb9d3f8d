"""Reverting ``nn.SyncBatchNorm`` to ``nn.BatchNorm1d/2d/3d``: the counterpart of
``nn.SyncBatchNorm.convert_sync_batchnorm`` that PyTorch lacks.

A model trained with SyncBatchNorm must be reverted before it runs on a CPU in training
mode, is exported, or is folded: ``SyncBatchNorm`` accepts any input of two or more
dimensions and so no longer knows whether it was a 1d, 2d or 3d layer. That is read from
an example forward (the dimensions of the input each layer receives) or, without one,
guessed from the neighbouring layers.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from bnstats.torch._batches import Forward, default_forward, move_to_device
from bnstats.torch._layers import (
    PreservedState,
    display_name,
    interrupts_deferred,
    model_device,
    registered_children,
    unwrap,
)
from bnstats.torch.kinds import synchronises

_BY_INPUT_DIM: dict[int, type[nn.Module]] = {
    2: nn.BatchNorm1d,
    3: nn.BatchNorm1d,
    4: nn.BatchNorm2d,
    5: nn.BatchNorm3d,
}
_BY_SPATIAL_DIMS: dict[int, type[nn.Module]] = {
    1: nn.BatchNorm1d,
    2: nn.BatchNorm2d,
    3: nn.BatchNorm3d,
}
# Neighbours whose class fixes the layout of the activations they produce or take:
# (class, spatial dimensions; 1 also stands for the (N, C) input of a Linear).
_NEIGHBOURS: tuple[tuple[type[nn.Module], int], ...] = (
    (nn.Conv1d, 1), (nn.Conv2d, 2), (nn.Conv3d, 3),
    (nn.ConvTranspose1d, 1), (nn.ConvTranspose2d, 2), (nn.ConvTranspose3d, 3),
    (nn.Linear, 1), (nn.BatchNorm1d, 1), (nn.BatchNorm2d, 2), (nn.BatchNorm3d, 3),
    (nn.InstanceNorm1d, 1), (nn.InstanceNorm2d, 2), (nn.InstanceNorm3d, 3),
    (nn.MaxPool1d, 1), (nn.MaxPool2d, 2), (nn.MaxPool3d, 3),
    (nn.AvgPool1d, 1), (nn.AvgPool2d, 2), (nn.AvgPool3d, 3),
    (nn.AdaptiveAvgPool1d, 1), (nn.AdaptiveAvgPool2d, 2), (nn.AdaptiveAvgPool3d, 3),
    (nn.AdaptiveMaxPool1d, 1), (nn.AdaptiveMaxPool2d, 2), (nn.AdaptiveMaxPool3d, 3),
)  # fmt: skip


def revert_sync_batchnorm(
    model: nn.Module, example_inputs: Any = None, *, forward: Forward | None = None
) -> nn.Module:
    """Every ``nn.SyncBatchNorm`` in ``model`` back to ``nn.BatchNorm1d``, ``2d`` or ``3d``.

    The new layer takes over the old one's parameters and buffers (the same tensor objects,
    so an optimizer built before keeps updating them), its ``eps``, ``momentum``, ``affine``,
    ``track_running_stats``, training flag, hooks and any other attribute; only
    ``process_group`` goes. A layer registered under several names is replaced by one new
    layer everywhere. Its kind:

    - with ``example_inputs`` (a batch, called as ``forward(model, batch)``: ``model(x)``
      for a tensor, ``model(batch[0])`` for a tuple, ``model(**batch)`` for a dict), from
      the input each layer receives: 2-D or 3-D ``BatchNorm1d``, 4-D ``2d``, 5-D ``3d``.
      The forward runs in eval mode without gradients and changes nothing;
    - otherwise (and for a layer that forward did not reach), from its neighbours in the
      order the model registers its modules: the nearest convolution, linear, pooling or
      normalization layer before it (after it, if none is before) with a known number of
      spatial dimensions. This follows the definition order, not the forward; pass
      ``example_inputs`` when the two differ.

    Subclasses of ``SyncBatchNorm`` with their own forward (timm's ``SyncBatchNormAct``)
    are left as they are, with a warning: reverting them would drop what their forward adds.

    Returns the model, modified in place; if ``model`` itself is a ``SyncBatchNorm`` the new
    layer is returned. Wrappers (``DistributedDataParallel``, ...) are looked through. All or
    nothing: every layer's kind is decided before any is replaced; ``ValueError`` names a
    layer whose kind cannot be decided or whose input has an unusable shape.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inner = unwrap(model)
    layers = _sync_layers(inner)
    if not layers:
        return model
    dims = {} if example_inputs is None else _input_dims(inner, layers, example_inputs, forward)
    kinds = {name: _kind(inner, name, layer, dims.get(name)) for name, layer in layers.items()}
    replacements = {id(layer): _reverted(layer, kinds[name]) for name, layer in layers.items()}
    if id(inner) in replacements:
        return replacements[id(inner)]
    _replace(inner, replacements)
    return model


def _sync_layers(model: nn.Module) -> dict[str, nn.SyncBatchNorm]:
    layers: dict[str, nn.SyncBatchNorm] = {}
    kept: list[str] = []
    for name, module in model.named_modules():
        if type(module) is nn.SyncBatchNorm:
            layers[name] = module
        elif synchronises(module):
            kept.append(f"{display_name(name)} ({type(module).__name__})")
    if kept:
        shown = ", ".join(kept[:3]) + (f" and {len(kept) - 3} more" if len(kept) > 3 else "")
        warnings.warn(
            f"{shown}: subclasses of SyncBatchNorm with their own forward are left as they are "
            "(their library's own converter reverts them, e.g. timm's)",
            stacklevel=3,
        )
    return layers


def _input_dims(
    model: nn.Module,
    layers: dict[str, nn.SyncBatchNorm],
    example_inputs: Any,
    forward: Forward | None,
) -> dict[str, int]:
    """The number of dimensions of the input each layer receives in one eval forward."""
    dims: dict[str, int] = {}
    call = forward or default_forward
    with PreservedState(model, layers) as state, torch.no_grad():
        for name, layer in layers.items():
            state.add_hook(layer.register_forward_pre_hook(_recorder(name, dims)))
        model.eval()
        call(model, move_to_device(example_inputs, model_device(model)))
    return dims


def _recorder(name: str, dims: dict[str, int]):
    def record(module: nn.Module, args: tuple[Any, ...]) -> None:
        if args and isinstance(args[0], torch.Tensor):
            dims.setdefault(name, args[0].dim())

    return record


def _kind(model: nn.Module, name: str, layer: nn.SyncBatchNorm, dim: int | None) -> type:
    if dim is not None:
        if dim not in _BY_INPUT_DIM:
            raise ValueError(
                f"SyncBatchNorm {display_name(name)} received a {dim}-D input; BatchNorm1d/2d/3d "
                "take 2-D to 5-D inputs (N, C, ...)"
            )
        return _BY_INPUT_DIM[dim]
    spatial = _spatial_dims_of_neighbours(model, name)
    if spatial is None:
        raise ValueError(
            f"SyncBatchNorm {display_name(name)} ({layer.num_features} features): no "
            "convolution, linear, pooling or normalization layer next to it tells whether it "
            "was 1d, 2d or 3d; pass example_inputs (a batch the model can be called on)"
        )
    return _BY_SPATIAL_DIMS[spatial]


def _spatial_dims_of_neighbours(model: nn.Module, name: str) -> int | None:
    """The spatial dimensions of the nearest known layer before ``name`` in registration
    order, else of the nearest after it (its own children are not neighbours)."""
    order = [(n, _known(m)) for n, m in model.named_modules()]
    position = [n for n, _ in order].index(name)
    before = [known for _, known in reversed(order[:position])]
    after = [known for n, known in order[position + 1 :] if not n.startswith(name + ".")]
    return next((known for known in (*before, *after) if known is not None), None)


def _known(module: nn.Module) -> int | None:
    for cls, spatial in _NEIGHBOURS:
        if type(module) is cls:
            return spatial
    return None


def _reverted(layer: nn.SyncBatchNorm, cls: type) -> nn.Module:
    new = cls(
        layer.num_features,
        eps=layer.eps,
        momentum=layer.momentum,
        affine=layer.affine,
        track_running_stats=layer.track_running_stats,
    )
    state = {key: value for key, value in vars(layer).items() if key != "process_group"}
    vars(new).update(state)  # parameters, buffers, hooks, training flag: the same objects
    return new


def _replace(model: nn.Module, replacements: dict[int, nn.Module]) -> None:
    """Every replacement, all or nothing: each place a layer is registered is listed first,
    then the layers are swapped back to back with Ctrl-C held back; if a swap raises, every
    place gets its old layer back."""
    places = [
        (module, child_name, child, replacements[id(child)])
        for module in model.modules()
        for child_name, child in registered_children(module)
        if id(child) in replacements
    ]
    with interrupts_deferred():
        try:
            for module, child_name, _, new in places:
                setattr(module, child_name, new)
        except BaseException:
            for module, child_name, old, _ in places:
                module._modules[child_name] = old
            raise
