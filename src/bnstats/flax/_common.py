"""What the NNX and Linen passes share: how a batch reaches the model, how a BN layer's
input becomes moments, how the moments reach the host."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bnstats._host_one_batch import host_arrays
from bnstats._host_pass import HostLayer, Recorder, batch_moments

JAX_ARRAYS = host_arrays(lambda parts: jnp.concatenate(parts, axis=0))
"""JAX and NumPy arrays, joined for eval mode's one batch."""

Forward = Callable[[Any, Any], Any]
"""``forward(model, batch)``: how to call the model on one batch (its output is ignored)."""


def model_input(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The positional and keyword arguments a batch gives the model: an array ``x`` itself,
    the first element of a tuple or list ``(x, y, ...)``, a dict as keywords."""
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, tuple | list):
        if not batch:
            raise ValueError("a batch is an empty tuple or list; expected (x, ...) ")
        return (batch[0],), {}
    return (batch,), {}


def batch_size_of(batch: Any) -> int:
    """Samples in a batch: the first dimension of its first array."""
    shapes = [getattr(leaf, "shape", ()) for leaf in jax.tree.leaves(batch)]
    shapes = [shape for shape in shapes if len(shape) > 0]
    if not shapes:
        raise TypeError(f"a batch holds no array with a batch dimension: {type(batch).__name__}")
    return int(shapes[0][0])


def first_samples(batch: Any, keep: int) -> Any:
    """The first ``keep`` samples of every array in the batch."""
    return jax.tree.map(lambda leaf: leaf[:keep] if getattr(leaf, "ndim", 0) else leaf, batch)


def batch_signature(batch: Any) -> tuple[Any, ...]:
    """The shapes and dtypes of a batch's arrays: what a compiled forward is specialised on."""
    return tuple(
        (tuple(getattr(leaf, "shape", ())), str(getattr(leaf, "dtype", type(leaf))))
        for leaf in jax.tree.leaves(batch)
    )


def to_numpy(parts: list[Any]) -> np.ndarray:
    """Stacked on the device, brought to the host once, as float64."""
    return np.asarray(jnp.stack(parts), dtype=np.float64)


def feature_axes(axis: int | tuple[int, ...], ndim: int, name: str) -> tuple[int, ...]:
    """The non-negative feature axes of a BN layer for an input of rank ``ndim``."""
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    if not all(-ndim <= a < ndim for a in axes):
        raise ValueError(f"BN layer {name!r}: axis {axis} is out of range for rank {ndim}")
    return tuple(sorted(a % ndim for a in axes))


def record_moments(
    recorder: Recorder, host: HostLayer, x: Any, axis: Any, mask: Any, least: int
) -> tuple[Any, Any]:
    """Record the moments of the BN layer's input ``x`` (in float32 or wider) for ``host``;
    returns the batch's ``mean`` and variance over all values, per channel (flat)."""
    x = jnp.asarray(x)
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    features = feature_axes(axis, x.ndim, host.name)
    axes = tuple(i for i in range(x.ndim) if i not in features)
    channels = int(np.prod([x.shape[i] for i in features]))
    if not host.num_features:
        host.num_features = channels
    count: Any = int(np.prod([x.shape[i] for i in axes]))
    weights = None
    if mask is not None:
        weights = jnp.asarray(mask, x.dtype)
        count = jnp.sum(jnp.broadcast_to(weights, x.shape)) / channels
    elif count < least:
        raise ValueError(
            f"BN layer {host.name!r}: input of shape {tuple(x.shape)} has {count} value per "
            "channel; training normalization needs 2 or more (drop batches of one sample; "
            "recalibrate_nnx's mode='eval' needs no batch statistics)"
        )
    mean, m2 = batch_moments(jnp, x, axes, weights)
    recorder.record(host, count, jnp.stack([mean, m2]))
    return mean, m2 / count


def nan_like(x: Any) -> Any:
    """An eval-mode level's output of a layer not settled yet: NaN, so that every layer
    computed from it sees NaN and waits for a later level."""
    x = jnp.asarray(x)
    return jnp.full(x.shape, jnp.nan, jnp.promote_types(x.dtype, jnp.float32))
