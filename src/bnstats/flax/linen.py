"""Exact population statistics for every ``flax.linen.BatchNorm`` of a Linen module."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bnstats._host_pass import (
    HostLayer,
    Recorder,
    check_max_samples,
    finish_pass,
    forward_function,
    iterate_limited,
    measure_batches,
)
from bnstats.flax._common import (
    batch_signature,
    batch_size_of,
    first_samples,
    model_input,
    record_moments,
    to_numpy,
)


def recalibrate_linen(
    module: nn.Module,
    variables: Mapping[str, Any],
    batches: Iterable[Any],
    *,
    max_samples: int | None = None,
    progress: bool | None = None,
    nonfinite: str = "raise",
    unreached: str = "raise",
    jit: bool = True,
    **apply_kwargs: Any,
) -> dict[str, Any]:
    """New ``variables`` whose ``batch_stats`` hold, for every ``nn.BatchNorm``, the exact
    population statistics of its input over ``batches``::

        mean = mu  = sum(z) / N
        var        = sum((z - mu)**2) / N      (over all N values: Flax's convention)

    merged in float64 (:class:`bnstats.Population`), cast to each entry's dtype.

    ``module.apply(variables, x, **apply_kwargs)`` runs on each batch (``x``, ``(x, y, ...)``
    or a dict of keyword inputs); ``apply_kwargs`` must put the BN layers in training mode
    (``train=True``, say): a BN layer that would normalize with its running average raises.
    Dropout is off for the pass (``nn.Dropout`` returns its input), so no rng is needed.
    ``variables`` and every param are left unchanged (JAX arrays are immutable; the
    returned dict shares every array but the new statistics). ``max_samples``,
    ``nonfinite``, ``unreached``, ``progress``: as in :func:`bnstats.keras.recalibrate`;
    ``jit``: compile each forward with ``jax.jit`` (once per batch shape; ``apply_kwargs``
    are fixed for the pass), ``False`` runs it eagerly.
    """
    check_max_samples(max_samples)
    stats = variables.get("batch_stats")
    if not stats:
        raise ValueError("variables have no 'batch_stats' collection: no BatchNorm to recalibrate")
    paths = _statistics_paths(stats)
    hosts = {
        path: HostLayer("/".join(path), 0, np.asarray(_at(stats, path)["mean"], np.float64).ravel())
        for path in paths
    }
    recorder = Recorder()

    def interceptor(next_fun: Any, args: Any, kwargs: Any, context: Any) -> Any:
        target = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        if isinstance(target, nn.Dropout):
            return _first_input(_call_arguments(target, args, kwargs))
        if not isinstance(target, nn.BatchNorm):
            return next_fun(*args, **kwargs)
        host = hosts.get(tuple(target.path))
        if host is None:
            raise ValueError(f"BN layer {'/'.join(target.path)!r} has no entry in batch_stats")
        given = _call_arguments(target, args, kwargs)
        _require_training(target, given.get("use_running_average"), host.name)
        record_moments(recorder, host, _first_input(given), target.axis, given.get("mask"), 2)
        return next_fun(*args, **kwargs)

    def run(variables: Any, batch: Any) -> None:
        args, kwargs = model_input(batch)
        with nn.intercept_methods(interceptor):
            module.apply(variables, *args, **kwargs, **apply_kwargs, mutable=["batch_stats"])

    forward = forward_function(
        recorder, run, jax.jit if jit else None, lambda args: batch_signature(args[1])
    )
    limited = iterate_limited(batches, max_samples, batch_size_of, first_samples)
    try:
        measured = measure_batches(
            {host.name: host for host in hosts.values()},
            limited,
            lambda batch: forward(variables, batch),
            to_numpy,
            progress,
            "BN statistics",
        )
        finish_pass(measured, to_numpy, nonfinite, unreached, "batches")
    except jax.errors.UnexpectedTracerError as error:
        raise ValueError(
            "a BN layer's input could not be read out of a JAX transform: BN layers inside "
            "Flax's lifted transforms (nn.remat, nn.scan, nn.vmap) are not supported; "
            "nothing was written"
        ) from error
    new_stats = _thawed(stats)
    for path, host in hosts.items():
        if host.name in measured.unreached:
            continue
        mean, var = host.statistics()
        entry = _at(new_stats, path)
        entry["mean"] = jnp.asarray(np.reshape(mean, entry["mean"].shape), entry["mean"].dtype)
        entry["var"] = jnp.asarray(np.reshape(var, entry["var"].shape), entry["var"].dtype)
    return {**dict(variables), "batch_stats": new_stats}


def _statistics_paths(stats: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple]:
    """The paths of the entries of ``batch_stats`` that hold a BN layer's ``mean`` and ``var``."""
    if "mean" in stats and "var" in stats and not isinstance(stats["mean"], Mapping):
        return [prefix]
    paths = []
    for key, value in stats.items():
        if isinstance(value, Mapping):
            paths += _statistics_paths(value, (*prefix, key))
    return paths


def _at(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _thawed(tree: Mapping[str, Any]) -> dict[str, Any]:
    """A nested plain-dict copy of the mapping's structure (arrays shared)."""
    return {k: _thawed(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def _call_arguments(layer: nn.Module, args: Any, kwargs: Any) -> dict[str, Any]:
    """The arguments of a call of ``nn.BatchNorm`` or ``nn.Dropout`` (subclasses too) by
    name (``x``, ``use_running_average``, ``mask``; ``inputs``, ...), given by position or
    keyword; ``self`` left out."""
    bound = inspect.signature(type(layer).__call__).bind(layer, *args, **kwargs)
    return dict(list(bound.arguments.items())[1:])


def _first_input(arguments: dict[str, Any]) -> Any:
    """The array the layer is called on: its first argument."""
    return next(iter(arguments.values()))


def _require_training(layer: nn.BatchNorm, given: Any, name: str) -> None:
    """``ValueError`` if this call would normalize with the running average."""
    running = nn.merge_param("use_running_average", layer.use_running_average, given)
    if running:
        raise ValueError(
            f"BN layer {name!r} runs with use_running_average=True under these apply "
            "arguments; pass what puts the module in training mode (train=True, say)"
        )
