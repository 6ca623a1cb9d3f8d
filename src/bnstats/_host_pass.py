"""The pass of the Keras and Flax tools: every BN layer's exact population moments, merged on
the host in float64.

Each framework captures, at every call of a BN layer, the batch's per-channel ``mean`` and
``m2 = sum((z - mean)**2)`` on its own device (:func:`batch_moments`, two passes over the
values, never ``E[z**2] - E[z]**2``) and hands them to the layer's :class:`HostLayer`. The
batches gather there as device arrays and reach the host 64 at a time, one transfer per
layer, where they merge into a :class:`bnstats.Population` (Chan et al. 1979, float64): a
batch with NaN or Inf weighs nothing and is remembered. Beside it a
:class:`bnstats.precision.BatchSpread` gives the estimate's standard errors.

The eval-mode passes, level by level, are in :mod:`bnstats._host_levels`.

NumPy only: the framework passes in how to stack its arrays and bring them to NumPy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from bnstats._audit import LayerMeasurement
from bnstats._progress import pass_progress
from bnstats.precision import BatchSpread
from bnstats.stats import NonFiniteStatisticsError, Population

_GROUP = 64
"""Batches gathered per layer before they reach the host and merge into its Population."""

ToNumpy = Callable[[list[Any]], np.ndarray]
"""``to_numpy(parts)``: the framework's (2, C) arrays stacked to one float64 (B, 2, C)."""

Final = dict[str, tuple[np.ndarray, np.ndarray]]
"""Settled layers: name -> the ``(mean, var)`` they normalize with (the framework's stored
variance, over all N values)."""

Mode = Literal["train", "eval"]


def batch_moments(xp: Any, x: Any, axes: tuple[int, ...], weights: Any = None) -> tuple[Any, Any]:
    """Per-channel ``mean`` and ``m2`` of ``x`` over ``axes``, in ``xp`` (``keras.ops`` or
    ``jax.numpy``, which share these names), on the framework's device::

        mean = sum(w * x) / sum(w)
        m2   = sum(w * (x - mean)**2)

    with ``w`` the broadcast ``weights`` (a mask), or 1. Centred: no ``E[x**2] - E[x]**2``.
    Both flattened to one value per channel (several feature axes make one channel each
    combination)."""
    if weights is None:
        mean = xp.mean(x, axis=axes, keepdims=True)
        m2 = xp.sum(xp.square(x - mean), axis=axes)
    else:
        weights = xp.broadcast_to(weights, x.shape)
        total = xp.sum(weights, axis=axes, keepdims=True)
        mean = xp.sum(weights * x, axis=axes, keepdims=True) / total
        m2 = xp.sum(weights * xp.square(x - mean), axis=axes)
    return xp.reshape(mean, (-1,)), xp.reshape(m2, (-1,))


@dataclass
class HostLayer:
    """One BN layer during a pass: its ``population`` of every value it received (float64),
    the ``spread`` of its batch statistics (for the standard errors), how many batch
    statistics were merged (``batches``: one per call), those left out for NaN or Inf
    (``skipped``, the first one's index in ``first_bad``), the most calls one forward made
    and when the first forward reached it, and ``values``: values per channel times channels
    over every call, finite or not (the size of all its input). ``center`` is the layer's
    stored mean when the pass began."""

    name: str
    num_features: int
    center: np.ndarray
    population: Population = field(default_factory=Population)
    spread: BatchSpread = field(init=False)
    batches: int = 0
    skipped: int = 0
    first_bad: int | None = None
    max_calls_per_forward: int = 0
    calls_this_forward: int = 0
    first_reached: int | None = None
    values: float = 0.0
    _pending: list[tuple[int, Any, Any]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.spread = BatchSpread(self.center)

    def built(self, center: np.ndarray) -> None:
        """The layer got its shape in the pass's first call: ``center`` (its stored mean,
        C values) for the population and the spread alike."""
        self.num_features = int(center.shape[0])
        self.center = center
        self.spread = BatchSpread(center)

    def add_batch(self, index: int, count: Any, mean_m2: Any, to_numpy: ToNumpy) -> None:
        """Gather batch ``index``: ``count`` values per channel (a number, or a framework
        scalar under a mask), its ``mean`` and ``m2`` stacked (2, C) on the device."""
        self._pending.append((index, count, mean_m2))
        self.batches += 1
        self.calls_this_forward += 1
        if len(self._pending) >= _GROUP:
            self.flush(to_numpy)

    def flush(self, to_numpy: ToNumpy) -> None:
        """Bring the gathered batches to the host at once and merge them; a batch with NaN or
        Inf (or a count that is not positive) weighs nothing."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        stacked = to_numpy([part for _, _, part in pending])  # (batches, 2, C)
        counts = np.array([float(np.asarray(count)) for _, count, _ in pending])
        self.values += float(counts.sum()) * self.num_features
        finite = np.isfinite(stacked).reshape(len(pending), -1).all(axis=1) & (counts > 0)
        if not finite.all():
            bad = [index for (index, _, _), ok in zip(pending, finite, strict=True) if not ok]
            self.skipped += len(bad)
            self.first_bad = min(bad) if self.first_bad is None else min(self.first_bad, *bad)
        counts = np.where(finite, counts, 0.0)
        clean = np.where(finite[:, None, None], stacked, 0.0)
        self.population.update_batches(counts, clean[:, 0], clean[:, 1])
        self.spread.update_batches(counts, clean[:, 0], clean[:, 1])

    def end_forward(self) -> None:
        self.max_calls_per_forward = max(self.max_calls_per_forward, self.calls_this_forward)
        self.calls_this_forward = 0

    @property
    def finite_batches(self) -> int:
        return self.batches - self.skipped

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """The population ``mean`` and the variance over all N values ``m2 / N`` (what Keras
        and Flax store); :class:`NonFiniteStatisticsError` naming the layer if NaN or Inf."""
        population = self.population
        mean, var = population.mean, population.biased_var
        if mean is None or not (np.isfinite(mean).all() and np.isfinite(var).all()):
            raise NonFiniteStatisticsError(
                f"BN layer {self.name!r}: the population statistics are NaN or Inf after "
                f"{self.batches} batches; nothing was written"
            )
        return mean, var

    def measurement(self, kind: str, eps: float, tracked: int | None = None) -> LayerMeasurement:
        """What :func:`bnstats._audit.audit_layer` needs; the population variance is the one
        the framework stores (over all N values), its standard error scaled alike."""
        population = self.population
        count = float(population.count)
        with np.errstate(all="ignore"):
            mean = np.asarray(population.mean, dtype=np.float64)
            var = np.asarray(population.biased_var, dtype=np.float64)
            batches = self.finite_batches
            if population.mean is None or batches < 2:
                infinite = np.full(self.num_features, math.inf)
                se_mean, se_var, worst = infinite, infinite, math.inf
            else:
                se_mean, se_unbiased = self.spread.standard_errors(population, batches)
                worst = float(self.spread.relative_error(population, batches))
                se_var = se_unbiased * ((count - 1) / count)
        return LayerMeasurement(
            name=self.name,
            kind=kind,
            num_features=self.num_features,
            tracked=tracked,
            samples=count,
            calls_per_forward=self.max_calls_per_forward,
            eps=eps,
            population_mean=mean,
            population_var=var,
            mean_standard_error=np.asarray(se_mean),
            var_standard_error=np.asarray(se_var),
            relative_error=worst,
            skipped=self.skipped,
        )


@dataclass
class HostMeasured:
    """What a pass measured: every BN layer's :class:`HostLayer` by name, the sizes of the
    batches used, the layers no forward reached, the number of passes made over all the
    data and of forwards over eval mode's subset (:mod:`bnstats._host_subset`)."""

    layers: dict[str, HostLayer]
    batch_sizes: list[int]
    unreached: list[str] = field(default_factory=list)
    passes: int = 1
    subset_passes: int = 0

    def reached(self) -> list[HostLayer]:
        return [m for name, m in self.layers.items() if name not in self.unreached]


# -- one forward, eager or compiled -------------------------------------------------------------

Entry = tuple[HostLayer, Any, Any]
"""One BN call's record: its layer, ``count`` and ``(2, C)`` ``mean``/``m2`` array."""


@dataclass
class Recorder:
    """The BN calls of one forward, in call order (the layers' handlers record here)."""

    entries: list[Entry] = field(default_factory=list)

    def record(self, host: HostLayer, count: Any, mean_m2: Any) -> None:
        self.entries.append((host, count, mean_m2))

    def take(self) -> list[Entry]:
        entries, self.entries = self.entries, []
        return entries


def forward_function(
    recorder: Recorder,
    run: Callable[..., Any],
    jit: Callable[[Callable[..., Any]], Callable[..., Any]] | None,
    signature: Callable[[tuple[Any, ...]], Any],
) -> Callable[..., list[Entry]]:
    """``forward(*args)``: ``run(*args)`` (one forward of the model), returning what its BN
    calls recorded. With ``jit`` (``jax.jit``) the forward is compiled once per input
    ``signature`` (shapes and dtypes): the handlers record while it is traced, the compiled
    function returns their arrays, and the layers they belong to are remembered per
    signature. Without, it runs eagerly."""
    if jit is None:

        def eager(*args: Any) -> list[Entry]:
            recorder.take()
            run(*args)
            return recorder.take()

        return eager
    orders: dict[Any, list[HostLayer]] = {}
    current: list[Any] = [None]  # the signature of the call being traced, taken outside

    def traced(*args: Any) -> list[tuple[Any, Any]]:
        recorder.take()
        run(*args)
        entries = recorder.take()
        orders[current[0]] = [host for host, _, _ in entries]
        return [(count, mean_m2) for _, count, mean_m2 in entries]

    compiled = jit(traced)

    def forward(*args: Any) -> list[Entry]:
        current[0] = signature(args)
        values = compiled(*args)
        hosts = orders[current[0]]
        return [(h, c, a) for h, (c, a) in zip(hosts, values, strict=True)]

    return forward


def deliver(entries: list[Entry], batch: int, to_numpy: ToNumpy) -> None:
    """Hand one forward's records to their layers (batch index ``batch``)."""
    for host, count, mean_m2 in entries:
        host.add_batch(batch, count, mean_m2, to_numpy)


# -- one pass ----------------------------------------------------------------------------------


def iterate_limited(
    batches: Iterable[Any],
    max_samples: int | None,
    size_of: Callable[[Any], int],
    trim: Callable[[Any, int], Any],
) -> Iterator[tuple[Any, int]]:
    """``(batch, size)`` for each batch, stopping after ``max_samples`` samples: the batch
    crossing the limit is cut to ``trim(batch, keep)`` and no further batch is drawn."""
    taken = 0
    for batch in batches:
        size = size_of(batch)
        if max_samples is not None and taken + size > max_samples:
            keep = max_samples - taken
            batch, size = trim(batch, keep), keep
        yield batch, size
        taken += size
        if max_samples is not None and taken >= max_samples:
            return


def measure_batches(
    hosts: dict[str, HostLayer],
    batches: Iterable[tuple[Any, int]],
    forward: Callable[[Any], list[Entry]],
    to_numpy: ToNumpy,
    progress: bool | None,
    label: str,
) -> HostMeasured:
    """One pass: ``forward(batch)`` for each ``(batch, size)`` of ``batches`` (from
    :func:`iterate_limited`), its records handed to their layers; notes the order in which
    forwards first reached the layers and the batch sizes, under a progress bar ``label``."""
    measured = HostMeasured(hosts, [])
    reached = 0
    with pass_progress(progress, label) as advance:
        for index, (batch, size) in enumerate(batches):
            deliver(forward(batch), index, to_numpy)
            for host in hosts.values():
                if host.calls_this_forward and host.first_reached is None:
                    reached += 1
                    host.first_reached = reached
                host.end_forward()
            measured.batch_sizes.append(size)
            advance(sum(measured.batch_sizes), math.inf)
    return measured


def pass_label(final: Final | None) -> str:
    """The progress bar's label of a pass (``final``: the settled layers of an eval level)."""
    return "BN statistics" if final is None else f"eval mode, {len(final)} layers settled"


def check_pass_options(mode: str, nonfinite: str, unreached: str, max_samples: Any) -> None:
    """``ValueError`` naming the first of the pass's options that is not one it takes."""
    check_choice("mode", mode, ("train", "eval"))
    check_choice("nonfinite", nonfinite, ("raise", "skip"))
    check_choice("unreached", unreached, ("raise", "keep"))
    check_max_samples(max_samples)


def check_max_samples(max_samples: Any) -> None:
    if max_samples is not None and (
        isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1
    ):
        raise ValueError(f"max_samples must be a positive integer or None, got {max_samples!r}")


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def finish_pass(
    measured: HostMeasured, to_numpy: ToNumpy, nonfinite: str, unreached: str, where: str
) -> HostMeasured:
    """After the last batch: flush every layer, then fail on no batch at all, on NaN or Inf
    (``nonfinite="raise"``) or on layers no forward reached (``unreached="raise"``; under
    ``"keep"`` they are listed in ``measured.unreached``)."""
    for layer in measured.layers.values():
        layer.flush(to_numpy)
    if not measured.batch_sizes:
        raise ValueError(f"{where} yielded no batch; there is nothing to measure statistics on")
    bad = [(m.first_bad, m.first_reached or 0, m.name) for m in measured.layers.values()]
    bad = [entry for entry in bad if entry[0] is not None]
    if bad and nonfinite == "raise":
        index, _, name = min(bad)
        raise NonFiniteStatisticsError(
            f"BN layer {name!r}: batch {index} (counting from 0) brought NaN or Inf "
            "statistics; nothing was written. Pass nonfinite='skip' to leave such batches out"
        )
    check_unreached(measured, unreached)
    return measured


def check_unreached(measured: HostMeasured, unreached: str) -> None:
    """List the layers no forward reached in ``measured.unreached``; under
    ``unreached="raise"`` fail naming them."""
    measured.unreached = [name for name, m in measured.layers.items() if m.batches == 0]
    if measured.unreached and unreached == "raise":
        names = ", ".join(repr(name) for name in measured.unreached)
        raise ValueError(
            f"no forward reached BN layer(s) {names} in {len(measured.batch_sizes)} batches, "
            "so their statistics cannot be measured; nothing was written. Call the model so "
            "that it reaches them (forward=, where the function takes one), or pass "
            "unreached='keep' to leave such layers as they are"
        )


__all__ = [
    "HostLayer",
    "Recorder",
    "deliver",
    "forward_function",
    "HostMeasured",
    "batch_moments",
    "finish_pass",
    "iterate_limited",
    "measure_batches",
]
