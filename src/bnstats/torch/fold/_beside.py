"""A BN beside a layer: ``layer(x) + BN(x)``, the identity branch of RepVGG-style blocks.

In eval mode ``BN(x) = scale * x + shift`` per channel. If a conv (or linear) layer ``L`` reads
the same ``x`` and its output reaches the same sum with coefficient 1, then
``L(x) + BN(x) = L'(x)`` with the BN added to the centre tap of ``L``'s kernel
(:func:`~bnstats.torch.fold.fold_weights`, ``position="beside"``). That is exact when ``L``
maps channel ``c`` to channel ``c`` at the same position through its kernel's centre: as many
input as output channels, stride 1, odd kernels and padding ``dilation * (kernel - 1) / 2``
on every side, so that the centre tap of output position ``p`` reads input position ``p``
(never a padded value, whatever the padding mode). This is the re-parameterisation of RepVGG
(Ding et al. 2021), done here on any model whose graph has that shape.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
from torch import fx, nn

from bnstats.torch.fold._weights import weight_layout

_ADDS = (operator.add, torch.add)


def is_add(node: fx.Node) -> bool:
    """``a + b`` of two tensors computed in the graph (no ``alpha``, no constants)."""
    return (
        node.op == "call_function"
        and node.target in _ADDS
        and len(node.args) == 2
        and not node.kwargs
        and all(isinstance(arg, fx.Node) for arg in node.args)
    )


def additive_layer(
    start: fx.Node,
    x: fx.Node,
    is_layer: Callable[[fx.Node], bool],
    is_identity: Callable[[fx.Node], bool],
) -> tuple[fx.Node, list[fx.Node]] | None:
    """A layer call reading ``x`` whose output reaches ``start`` only through sums and
    identities, each used once (so it counts exactly once in ``start``), with the identity
    calls on its way (whose hooks fold must check); None if there is none."""
    stack: list[tuple[fx.Node, list[fx.Node]]] = [(start, [])]
    while stack:
        node, identities = stack.pop()
        if len(node.users) != 1:
            continue
        if is_layer(node) and node.args == (x,) and not node.kwargs:
            return node, identities
        if is_identity(node):
            through = [*identities, node]
            stack.extend((arg, through) for arg in node.args if isinstance(arg, fx.Node))
        elif is_add(node):
            stack.extend((arg, identities) for arg in node.args)
    return None


def beside_problem(layer: nn.Module) -> str | None:
    """Why ``layer`` cannot absorb a BN that reads its input beside it (None if it can)."""
    transposed, groups = weight_layout(layer)
    if transposed:
        return "is a transposed conv"
    weight = layer.weight
    if weight.shape[0] != weight.shape[1] * groups:
        return f"has {weight.shape[1] * groups} input but {weight.shape[0]} output channels"
    if isinstance(layer, nn.Linear):
        return None
    kernel, dilation = layer.kernel_size, layer.dilation
    if any(k % 2 == 0 for k in kernel) or any(s != 1 for s in layer.stride):
        return "has an even kernel or a stride"
    if layer.padding == "same":
        return None
    centred = tuple(d * (k - 1) // 2 for d, k in zip(dilation, kernel, strict=True))
    padding = tuple(0 for _ in kernel) if layer.padding == "valid" else tuple(layer.padding)
    if padding != centred:
        return f"has padding {layer.padding}, not {centred}: its centre tap is shifted"
    return None


__all__ = ["additive_layer", "beside_problem", "is_add"]
