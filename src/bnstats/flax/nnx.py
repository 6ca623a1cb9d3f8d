"""Exact population statistics for every ``flax.nnx.BatchNorm`` of an NNX model."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bnstats._correction import Correction, LayerMap
from bnstats._host_levels import measure_levels
from bnstats._host_one_batch import OneBatch
from bnstats._host_pass import (
    Entry,
    Final,
    HostLayer,
    HostMeasured,
    Recorder,
    check_pass_options,
    finish_pass,
    forward_function,
    iterate_limited,
    measure_batches,
    pass_label,
)
from bnstats._levels import require_reusable
from bnstats._one_batch import budget, check_budget
from bnstats.flax._common import (
    JAX_ARRAYS,
    Forward,
    batch_signature,
    batch_size_of,
    first_samples,
    model_input,
    nan_like,
    record_moments,
    to_numpy,
)

Handler = Callable[..., Any]


def find_batchnorm_layers(model: Any) -> dict[str, Any]:
    """Every ``nnx.BatchNorm`` (subclasses too) under ``model`` by dotted path, each once."""
    found: dict[str, Any] = {}
    for path, module in _iter_modules(model):
        if isinstance(module, nnx.BatchNorm) and all(m is not module for m in found.values()):
            found[".".join(str(part) for part in path) or "<model>"] = module
    return found


def _iter_modules(model: Any) -> Iterator[tuple[tuple[Any, ...], Any]]:
    if hasattr(nnx, "iter_modules"):
        return nnx.iter_modules(model)
    return model.iter_modules()  # flax before 0.12


def recalibrate_nnx(
    model: Any,
    batches: Iterable[Any],
    *,
    forward: Forward | None = None,
    mode: Literal["train", "eval"] = "train",
    max_samples: int | None = None,
    progress: bool | None = None,
    nonfinite: Literal["raise", "skip"] = "raise",
    unreached: Literal["raise", "keep"] = "raise",
    jit: bool = True,
    one_batch_bytes: int | None = None,
) -> Any:
    """Write every ``nnx.BatchNorm``'s ``mean`` and ``var`` in place as the exact population
    statistics of its input over ``batches``; returns ``model``.

    Per layer, over all N values per channel of its input (every sample and position)::

        mean = mu  = sum(z) / N
        var        = sum((z - mu)**2) / N

    merged in float64 (:class:`bnstats.Population`) and cast to the variables' dtype. The
    variance is over all N values: Flax normalizes with ``var`` as stored and trains on
    biased batch variances (``bnstats.conventions.CONVENTIONS["flax"].variance``).

    - ``batches``: an iterable of ``x``, ``(x, y, ...)`` (``model(x)``) or dicts
      (``model(**batch)``); ``forward(model, batch)`` calls the model otherwise.
    - ``mode="train"``: each layer's input with every BN layer normalizing with its batch's
      statistics (Flax's own training computation) and every other module in eval mode
      (``deterministic=True``: dropout off). ``mode="eval"``: as inference sees it, every
      BN layer before it using its final statistics (``batches`` re-iterable; batches of
      one sample are fine): where the data fit, all of them as one batch and one pass to
      check (3 passes, :mod:`bnstats._host_one_batch`); over the budget, the first batches
      that fit solved as one batch and corrected by whole passes
      (:mod:`bnstats._host_subset`); else one pass per depth level.
    - ``max_samples``, ``nonfinite``, ``unreached``, ``progress``: as in
      :func:`bnstats.keras.recalibrate`.
    - ``jit``: compile the forward with ``jax.jit`` (once per batch shape) on a copy of the
      model's state; ``False`` runs it eagerly (a ``forward`` that cannot be traced).
    - ``one_batch_bytes``: in ``mode="eval"``, the memory the data may take to run as one
      batch, as in :func:`bnstats.keras.recalibrate` (``None``: 256 MiB; 0: never, level by
      level).

    The model is left in the mode it found (every ``use_running_average`` and
    ``deterministic`` flag, ``momentum``, ``scale``, ``bias``, every other variable);
    nothing is written unless the whole pass succeeds.
    """
    check_pass_options(mode, nonfinite, unreached, max_samples)
    check_budget(one_batch_bytes)
    layers = find_batchnorm_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} holds no nnx.BatchNorm layer")
    run = _Runner(model, layers, forward, max_samples, progress, batches, jit)
    with _preserved(model, layers):
        if mode == "train":
            measured = finish_pass(run.level(None), to_numpy, nonfinite, unreached, "batches")
        else:
            require_reusable(batches)
            one_batch = OneBatch(
                batches,
                JAX_ARRAYS,
                budget(one_batch_bytes),
                lambda joined, final, correction: finish_pass(
                    run.level(final, final is not None, [joined], correction),
                    to_numpy,
                    "skip",
                    "keep",
                    "batches",
                ),
            )
            measured = measure_levels(
                lambda final, measure_settled: finish_pass(
                    run.level(final, measure_settled, one_batch.batches()),
                    to_numpy,
                    "skip",
                    "keep",
                    "batches",
                ),
                nonfinite,
                unreached,
                {name: float(layer.epsilon) for name, layer in layers.items()},
                one_batch,
            )
        values = {m.name: m.statistics() for m in measured.reached()}
    for name, (mean, var) in values.items():
        _assign(layers[name], mean, var)
    return model


@dataclass
class _Runner:
    model: Any
    layers: dict[str, Any]
    forward: Forward | None
    max_samples: int | None
    progress: bool | None
    batches: Iterable[Any]
    jit: bool

    def level(
        self,
        final: Final | None,
        measure_settled: bool = False,
        over: Iterable[Any] | None = None,
        correction: Correction | None = None,
    ) -> HostMeasured:
        """One pass over ``over`` (``batches`` where None); ``final``: an eval-mode level
        (see :func:`bnstats._host_levels`), its settled layers measured too where
        ``measure_settled``; without it every layer normalizes with its batch's statistics,
        mapped by ``correction`` where given (the subset's solve, :mod:`bnstats._host_subset`)."""
        hosts = {
            name: HostLayer(name, 0, np.asarray(layer.mean[...], np.float64).reshape(-1))
            for name, layer in self.layers.items()
        }
        recorder = Recorder()
        by_path: dict[str, Handler] = {}
        for name, layer in self.layers.items():
            if final is not None and name in final:
                mean, var = final[name]
                _assign(layer, mean, var)
                by_path[name] = (
                    _measured_too(_measuring(hosts[name], True, recorder))
                    if measure_settled
                    else _settled
                )
            else:
                layer_map = None if correction is None else correction.maps.get(name)
                by_path[name] = _measuring(hosts[name], final is not None, recorder, layer_map)
        handlers = _handlers_of(self.layers, by_path)
        given = self.batches if over is None else over
        limited = iterate_limited(given, self.max_samples, batch_size_of, first_samples)
        with _intercepted(handlers):
            forward = self._forward(recorder, by_path, handlers)
            return measure_batches(
                hosts, limited, forward, to_numpy, self.progress, pass_label(final)
            )

    def _forward(
        self, recorder: Recorder, by_path: dict[str, Handler], handlers: dict[int, Handler]
    ) -> Callable[[Any], list[Entry]]:
        """``forward(batch)`` compiled with ``jax.jit`` (``jit=True``) on a merged copy of
        the model's state, so that the BN layers' own updates in the forward never reach
        the model; eagerly on the model itself with ``jit=False``."""
        call = self.forward or _default_forward
        if not self.jit:
            return forward_function(recorder, lambda b: call(self.model, b), None, batch_signature)
        graphdef, state = nnx.split(self.model)

        def run(state: Any, batch: Any) -> None:
            copy = nnx.merge(graphdef, state)  # new layer objects: handlers found by path
            handlers.update(_handlers_of(find_batchnorm_layers(copy), by_path))
            call(copy, batch)

        compiled = forward_function(recorder, run, jax.jit, lambda args: batch_signature(args[1]))
        return lambda batch: compiled(state, batch)


def _handlers_of(layers: dict[str, Any], by_path: dict[str, Handler]) -> dict[int, Handler]:
    return {id(layer): by_path[name] for name, layer in layers.items()}


def _default_forward(model: Any, batch: Any) -> Any:
    args, kwargs = model_input(batch)
    return model(*args, **kwargs)


def _measuring(
    host: HostLayer, eval_level: bool, recorder: Recorder, layer_map: LayerMap | None = None
) -> Handler:
    """A measured BN call: NaN out at an eval-mode level, else Flax's own training
    computation, or with ``layer_map`` the batch's ``mean`` and variance mapped by it."""

    def call(original: Handler, layer: Any, x: Any, mask: Any) -> Any:
        mean, var = record_moments(recorder, host, x, layer.axis, mask, 1 if eval_level else 2)
        if eval_level:
            return nan_like(x)
        if layer_map is None:
            return original(layer, x, use_running_average=False, mask=mask)
        mapped = layer_map.converted(lambda value: jnp.asarray(value, mean.dtype))(mean, var)
        _assign(layer, *mapped)  # the copy's variables in the compiled forward
        return _settled(original, layer, x, mask)

    return call


def _settled(original: Handler, layer: Any, x: Any, mask: Any) -> Any:
    return original(layer, x, use_running_average=True, mask=mask)


def _measured_too(measure: Handler) -> Handler:
    """A settled layer's call that also measures its input (the check pass of eval mode)."""

    def call(original: Handler, layer: Any, x: Any, mask: Any) -> Any:
        measure(original, layer, x, mask)
        return _settled(original, layer, x, mask)

    return call


@contextmanager
def _intercepted(handlers: dict[int, Handler]) -> Iterator[None]:
    """Within the block, ``nnx.BatchNorm.__call__`` of the layers in ``handlers`` runs
    ``handlers[id(layer)](original, layer, x, mask)``; a subclass overriding ``__call__``
    keeps its own computation (reached through ``super().__call__``). Any other
    ``nnx.BatchNorm`` called raises ``ValueError``: a transform's copy of a layer, whose
    statistics would otherwise be left out unseen."""
    cls = nnx.BatchNorm
    original = cls.__dict__["__call__"]

    def call(self: Any, x: Any, use_running_average: Any = None, *, mask: Any = None) -> Any:
        handler = handlers.get(id(self))
        if handler is None:
            raise ValueError(
                "an nnx.BatchNorm that is not one of the model's layers ran in the pass: a "
                "copy made by a transform inside the model (nnx.remat, nnx.scan, nnx.vmap) "
                "or a layer of another model; bnstats cannot measure or write its "
                "statistics, so such models are not supported; nothing was written"
            )
        return handler(original, self, x, mask)

    cls.__call__ = call
    try:
        yield
    finally:
        cls.__call__ = original


@contextmanager
def _preserved(model: Any, layers: dict[str, Any]) -> Iterator[None]:
    """Every module's ``deterministic`` set to True for the block (dropout off); afterwards,
    also on error, every flag and every BN layer's ``mean``/``var`` put back."""
    flags = [
        (module, key, getattr(module, key))
        for _, module in _iter_modules(model)
        for key in ("deterministic", "use_running_average")
        if hasattr(module, key)
    ]
    saved = [(layer, layer.mean[...], layer.var[...]) for layer in layers.values()]
    try:
        for module, key, _ in flags:
            if key == "deterministic":
                setattr(module, key, True)
        yield
    finally:
        for module, key, value in flags:
            setattr(module, key, value)
        for layer, mean, var in saved:
            layer.mean[...] = mean
            layer.var[...] = var


def _assign(layer: Any, mean: np.ndarray, var: np.ndarray) -> None:
    for variable, value in ((layer.mean, mean), (layer.var, var)):
        current = variable[...]
        variable[...] = jnp.asarray(np.reshape(value, current.shape), dtype=current.dtype)
