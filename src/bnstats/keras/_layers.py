"""Which Keras layers are BN layers, how the passes reach their calls, and how statistics are
written.

- :func:`find_batchnorm_layers`: every ``keras.layers.BatchNormalization`` (subclasses too)
  in a model, nested models and layers of subclassed models included, by path
  (``"encoder/block_1/batch_normalization"``), each layer once, each path its own.
- A layer with ``trainable=False`` normalizes with its moving statistics in training too
  (Keras' meaning of freezing a BN layer): its statistics are fixed, reported, never
  recalibrated. A layer with ``renorm=True`` is refused (its training output depends on its
  renormalization statistics, not on the batch's alone).
- :func:`intercepted_calls`: within the block, ``BatchNormalization.call`` of the chosen
  layers runs a pass's handler instead (a class-level patch that looks the layer up by
  identity, so a subclass that overrides ``call`` keeps its own computation and is reached
  only through ``super().call``); every other layer runs as usual.
- :func:`write_statistics`: every layer's new ``moving_mean``/``moving_variance`` checked,
  then assigned, put back as they were if an assignment fails.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import keras
import numpy as np

Handler = Callable[[Any, Any, Any], Any]
"""``handler(layer, inputs, mask)``: what a BN layer's call returns during a pass."""


def find_batchnorm_layers(model: Any) -> dict[str, Any]:
    """Every BN layer under ``model`` by path, in the order Keras tracks them.

    Keras lets siblings of a subclassed model share a name (three ``Block(name="block")``);
    the second and later of them get ``#2``, ``#3`` in their path (``"block#2/bn"``), so that
    every layer has a path of its own."""
    found: dict[str, Any] = {}
    seen: set[int] = set()

    def visit(layer: Any, prefix: str) -> None:
        taken: dict[str, int] = {}
        for child in layer._flatten_layers(include_self=False, recursive=False):
            if id(child) in seen:
                continue
            seen.add(id(child))
            taken[child.name] = taken.get(child.name, 0) + 1
            suffix = f"#{taken[child.name]}" if taken[child.name] > 1 else ""
            path = f"{prefix}{child.name}{suffix}"
            if isinstance(child, keras.layers.BatchNormalization):
                found[path] = child
            visit(child, path + "/")

    if isinstance(model, keras.layers.BatchNormalization):
        found[model.name] = model
    visit(model, "")
    return found


def recalibrated_layers(model: Any) -> tuple[dict[str, Any], list[str]]:
    """The BN layers a pass measures (by path) and the paths of those with fixed statistics
    (``trainable=False``); ``ValueError`` for a ``renorm=True`` layer, a model without any
    BN layer or one whose BN layers are all fixed."""
    layers = find_batchnorm_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} holds no keras.layers.BatchNormalization layer")
    for path, layer in layers.items():
        if layer.renorm:
            raise ValueError(
                f"BN layer {path!r} uses renorm=True: its training output depends on its "
                "renormalization statistics, so its input in training has no fixed population; "
                "not supported"
            )
    fixed = [path for path, layer in layers.items() if not layer.trainable]
    if len(fixed) == len(layers):
        raise ValueError(
            f"every BN layer of {type(model).__name__} has trainable=False (Keras' frozen BN "
            "normalizes with its moving statistics in training too), so no layer has "
            "statistics to measure; set trainable=True on the layers to recalibrate"
        )
    return {p: layer for p, layer in layers.items() if layer.trainable}, fixed


def channel_axis(layer: Any, ndim: int) -> int:
    """The layer's feature axis as a non-negative index; ``ValueError`` naming the layer."""
    axis = int(layer.axis)
    if not -ndim <= axis < ndim:
        raise ValueError(f"BN layer {layer.name!r}: axis {axis} is out of range for rank {ndim}")
    return axis % ndim


@contextmanager
def intercepted_calls(handlers: Mapping[int, Handler]) -> Iterator[None]:
    """Within the block, the BN layers whose ``id`` is in ``handlers`` return
    ``handlers[id(layer)](layer, inputs, mask)``; the class is restored afterwards."""
    cls = keras.layers.BatchNormalization
    original = cls.__dict__["call"]

    def call(self: Any, inputs: Any, training: Any = None, mask: Any = None) -> Any:
        handler = handlers.get(id(self))
        if handler is None:
            return original(self, inputs, training=training, mask=mask)
        return handler(self, inputs, mask)

    cls.call = call
    try:
        yield
    finally:
        cls.call = original


def stored_statistics(layer: Any) -> tuple[np.ndarray, np.ndarray]:
    """The layer's ``moving_mean`` and ``moving_variance`` as float64 NumPy."""
    convert = keras.ops.convert_to_numpy
    return (
        np.asarray(convert(layer.moving_mean), dtype=np.float64),
        np.asarray(convert(layer.moving_variance), dtype=np.float64),
    )


def write_statistics(values: Mapping[str, tuple[Any, np.ndarray, np.ndarray]]) -> None:
    """Assign ``path -> (layer, mean, var)``: shapes checked first, then every assignment,
    each in the variable's dtype; on failure the earlier ones are put back."""
    for path, (layer, mean, var) in values.items():
        expected = tuple(layer.moving_mean.shape)
        if mean.shape != expected or var.shape != expected:
            raise ValueError(
                f"BN layer {path!r}: measured statistics of shape {mean.shape} for moving "
                f"statistics of shape {expected}; nothing was written"
            )
    saved = [(layer, stored_statistics(layer)) for layer, _, _ in values.values()]
    try:
        for layer, mean, var in values.values():
            _assign(layer, mean, var)
    except BaseException:
        for layer, (mean, var) in saved:
            _assign(layer, mean, var)
        raise


def _assign(layer: Any, mean: np.ndarray, var: np.ndarray) -> None:
    for variable, value in ((layer.moving_mean, mean), (layer.moving_variance, var)):
        variable.assign(np.asarray(value, dtype=keras.backend.standardize_dtype(variable.dtype)))
