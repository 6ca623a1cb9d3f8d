"""The Keras pass: every BN layer's exact population moments, on any Keras 3 backend.

``mode="train"``: the model runs with ``training=False`` (dropout off, every layer in
inference behaviour) while each measured BN layer's call is replaced for the pass (see
:func:`bnstats.keras._layers.intercepted_calls`): it takes the batch's per-channel ``mean``
and ``m2`` (:func:`bnstats._host_pass.batch_moments`, centred, in the layer's compute dtype,
float32 or wider) and normalizes with them, as in training::

    z_tilde = gamma * (z - mean) / sqrt(m2 / count + epsilon) + beta

``mode="eval"``: where the data fit, all of them as one batch through the pass of
``mode="train"`` and one pass to check (:mod:`bnstats._host_one_batch`); over the budget,
the first batches that fit as one batch, corrected by whole passes
(:mod:`bnstats._host_subset`); else one pass per depth level
(:func:`bnstats._host_levels.measure_levels`): the settled layers normalize with their final
statistics, the others are measured and output NaN. Nothing is assigned
during a pass: no variable changes until the statistics are written.

On the JAX backend each forward is compiled with ``jax.jit`` through ``model.stateless_call``
(once per batch shape; the handlers record while it is traced and the compiled function
returns the moments, see :func:`bnstats._host_pass.forward_function`); elsewhere, and for a
model not built yet, it runs eagerly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import keras
import numpy as np

from bnstats._correction import Correction, LayerMap
from bnstats._host_levels import measure_levels
from bnstats._host_one_batch import OneBatch, host_arrays
from bnstats._host_pass import (
    Entry,
    Final,
    HostLayer,
    HostMeasured,
    Recorder,
    batch_moments,
    check_pass_options,
    finish_pass,
    forward_function,
    iterate_limited,
    measure_batches,
    pass_label,
)
from bnstats._levels import require_reusable
from bnstats._one_batch import budget, check_budget
from bnstats.keras._data import batch_size_of, first_samples, input_batches, source_of
from bnstats.keras._layers import (
    channel_axis,
    intercepted_calls,
    recalibrated_layers,
    stored_statistics,
)

KERAS_ARRAYS = host_arrays(lambda parts: keras.ops.concatenate(parts, axis=0))
"""Keras' arrays (NumPy or the backend's), joined for eval mode's one batch."""


@dataclass(frozen=True)
class KerasPassOptions:
    """The keyword options of :func:`bnstats.keras.recalibrate` and :func:`bnstats.keras.audit`
    (see there)."""

    mode: Literal["train", "eval"] = "train"
    max_samples: int | None = None
    batch_size: int | None = None
    nonfinite: Literal["raise", "skip"] = "raise"
    unreached: Literal["raise", "keep"] = "raise"
    progress: bool | None = None
    one_batch_bytes: int | None = None

    def __post_init__(self) -> None:
        check_pass_options(self.mode, self.nonfinite, self.unreached, self.max_samples)
        check_budget(self.one_batch_bytes)


@dataclass
class KerasMeasured:
    """A pass's measurements (:class:`bnstats._host_pass.HostMeasured`), the measured layers
    by path and the paths of the layers with fixed statistics."""

    measured: HostMeasured
    layers: dict[str, Any]
    fixed: list[str]


def to_numpy(parts: list[Any]) -> np.ndarray:
    """Stacked on the device, brought to the host once, as float64."""
    return np.asarray(keras.ops.convert_to_numpy(keras.ops.stack(parts)), dtype=np.float64)


def measure(model: Any, data: Any, options: KerasPassOptions) -> KerasMeasured:
    """Every measured BN layer's population moments over ``data`` (nothing is written)."""
    layers, fixed = recalibrated_layers(model)
    batches = input_batches(data, options.batch_size)
    if options.mode == "train":
        measured = _one_pass(model, batches, layers, options, final=None)
        measured = finish_pass(measured, to_numpy, options.nonfinite, options.unreached, "data")
        return KerasMeasured(measured, layers, fixed)
    require_reusable(
        source_of(batches),
        argument="data",
        examples="a list, a PyDataset, an array with batch_size=",
    )

    def run_joined(joined: Any, final: Final | None, correction: Correction | None) -> HostMeasured:
        one = _one_pass(model, [joined], layers, options, final, final is not None, correction)
        return finish_pass(one, to_numpy, "skip", "keep", "data")

    one_batch = OneBatch(batches, KERAS_ARRAYS, budget(options.one_batch_bytes), run_joined)

    def run_level(final: Final, measure_settled: bool) -> HostMeasured:
        level = _one_pass(model, one_batch.batches(), layers, options, final, measure_settled)
        return finish_pass(level, to_numpy, "skip", "keep", "data")

    epsilons = {path: float(layer.epsilon) for path, layer in layers.items()}
    measured = measure_levels(run_level, options.nonfinite, options.unreached, epsilons, one_batch)
    return KerasMeasured(measured, layers, fixed)


def _one_pass(
    model: Any,
    batches: Any,
    layers: dict[str, Any],
    options: KerasPassOptions,
    final: Final | None,
    measure_settled: bool = False,
    correction: Correction | None = None,
) -> HostMeasured:
    """One pass over ``batches``: with ``final`` an eval-mode level (its settled layers
    measured too where ``measure_settled``), else every BN layer normalizing with its batch's
    statistics (mapped by ``correction`` where given: the subset's solve,
    :mod:`bnstats._host_subset`)."""
    hosts = {path: _host_layer(path, layer) for path, layer in layers.items()}
    recorder = Recorder()
    handlers = {}
    for path, layer in layers.items():
        if final is not None and path in final:
            settled = _settled_call(*final[path])
            if measure_settled:
                settled = _measured_too(_measuring_call(hosts[path], True, recorder), settled)
            handlers[id(layer)] = settled
        else:
            layer_map = None if correction is None else correction.maps.get(path)
            handlers[id(layer)] = _measuring_call(
                hosts[path], final is not None, recorder, layer_map
            )
    limited = iterate_limited(batches, options.max_samples, batch_size_of, first_samples)
    with intercepted_calls(handlers):
        forward = _forward(model, recorder, compiled=all(layer.built for layer in layers.values()))
        return measure_batches(
            hosts, limited, forward, to_numpy, options.progress, pass_label(final)
        )


def _forward(model: Any, recorder: Recorder, compiled: bool) -> Callable[[Any], list[Entry]]:
    """``forward(x)``: one ``training=False`` forward, returning what the BN calls recorded.
    On the JAX backend (and a built model) compiled with ``jax.jit`` through
    ``model.stateless_call``, once per input shape; eagerly elsewhere."""
    if keras.backend.backend() != "jax" or not compiled:
        eager = forward_function(recorder, lambda x: model(x, training=False), None, _signature)
        return eager
    import jax

    def run(trainable: Any, non_trainable: Any, x: Any) -> None:
        model.stateless_call(trainable, non_trainable, x, training=False)

    jitted = forward_function(recorder, run, jax.jit, lambda args: _signature(args[2:]))
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    return lambda x: jitted(trainable, non_trainable, x)


def _signature(args: Any) -> tuple[Any, ...]:
    return tuple((tuple(leaf.shape), str(leaf.dtype)) for leaf in keras.tree.flatten(args))


def _host_layer(path: str, layer: Any) -> HostLayer:
    if layer.built:
        center = stored_statistics(layer)[0]
        return HostLayer(path, int(center.shape[0]), center)
    return HostLayer(path, 0, np.zeros(0))


def _compute(layer: Any, inputs: Any) -> Any:
    """The input in the dtype the layer computes in (float32 or wider), as its call does."""
    dtype = keras.backend.result_type(inputs.dtype, "float32")
    return keras.ops.cast(inputs, dtype)


def _measuring_call(
    host: HostLayer, eval_level: bool, recorder: Recorder, layer_map: LayerMap | None = None
) -> Any:
    """A measured BN call: NaN out at an eval-mode level, else the input normalized with its
    batch's ``mean`` and ``m2 / count``, mapped by ``layer_map`` where given."""
    least = 1 if eval_level else 2

    def call(layer: Any, inputs: Any, mask: Any) -> Any:
        x = _compute(layer, inputs)
        axis = channel_axis(layer, len(x.shape))
        axes = tuple(i for i in range(len(x.shape)) if i != axis)
        channels = int(x.shape[axis])
        if not host.num_features:  # built during this call
            host.built(stored_statistics(layer)[0])
        weights = None
        count: Any = int(np.prod([x.shape[i] for i in axes]))
        if mask is not None:
            weights = keras.ops.expand_dims(keras.ops.cast(mask, x.dtype), axis=-1)
            count = keras.ops.sum(keras.ops.broadcast_to(weights, x.shape)) / channels
        elif count < least:
            raise ValueError(
                f"BN layer {host.name!r}: input of shape {tuple(x.shape)} has {count} value per "
                "channel; training normalization needs 2 or more (drop batches of one sample, "
                "or pass mode='eval', which needs no batch statistics)"
            )
        mean, m2 = batch_moments(keras.ops, x, axes, weights)
        recorder.record(host, count, keras.ops.stack([mean, m2]))
        if eval_level:
            return keras.ops.cast(keras.ops.full_like(x, math.nan), layer.compute_dtype)
        if layer_map is None:
            return _normalize(layer, x, mean, m2 / count)
        as_tensor = keras.ops.convert_to_tensor
        mapped = layer_map.converted(lambda value: as_tensor(value, x.dtype))
        return _normalize(layer, x, *mapped(mean, m2 / count))

    return call


def _measured_too(measure: Any, settled: Any) -> Any:
    """A settled layer's call that also measures its input (the check pass of eval mode)."""

    def call(layer: Any, inputs: Any, mask: Any) -> Any:
        measure(layer, inputs, mask)
        return settled(layer, inputs, mask)

    return call


def _settled_call(mean: np.ndarray, var: np.ndarray) -> Any:
    def call(layer: Any, inputs: Any, mask: Any) -> Any:
        x = _compute(layer, inputs)
        as_tensor = keras.ops.convert_to_tensor
        return _normalize(layer, x, as_tensor(mean, x.dtype), as_tensor(var, x.dtype))

    return call


def _normalize(layer: Any, x: Any, mean: Any, var: Any) -> Any:
    """The layer's own normalization (``keras.ops.batch_normalization``) with these
    statistics, cast to its compute dtype as its call does."""
    gamma = None if layer.gamma is None else keras.ops.cast(layer.gamma, x.dtype)
    beta = None if layer.beta is None else keras.ops.cast(layer.beta, x.dtype)
    out = keras.ops.batch_normalization(
        x, mean, var, axis=layer.axis, offset=beta, scale=gamma, epsilon=layer.epsilon
    )
    return keras.ops.cast(out, layer.compute_dtype)
