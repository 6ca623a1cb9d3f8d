"""bnstats._host_pass driven without a framework: plain NumPy functions as layers.

A fake framework pass (:func:`recalibrate` below, built as bnstats.keras and bnstats.flax
build theirs: handlers that record each BN call's moments, :func:`forward_function`,
:func:`iterate_limited`, :func:`measure_batches`, :func:`finish_pass`,
:func:`measure_levels`) runs a tiny network::

    z_a = x @ W1 + c1        bn "a"   h = relu(gamma_a * (z_a - mu) / sqrt(var + eps) + beta_a)
    z_b = h @ W2             bn "b"

and every number is checked against the same network written out here with ``np.mean`` and
``np.var`` over the concatenated inputs of each layer (no Population, no Chan merge):
the population ``mean``, the unbiased ``var`` (``ddof=1``) and the stored variance over all
N values (``ddof=0``, what Keras and Flax keep). Keras' and Flax's own tests run the module
through those frameworks (``python tests/run_torch_free.py``); this one needs NumPy only and
runs in the main test run.

The module has no tolerance stop (only the torch pass takes ``tolerance=``), so none is
tested here.
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from bnstats._correction import Correction, LayerMap
from bnstats._host_levels import measure_levels
from bnstats._host_one_batch import OneBatch, host_arrays
from bnstats._host_pass import (
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
from bnstats._one_batch import budget
from bnstats.stats import NonFiniteStatisticsError

EPS = 1e-3
UNEVEN = [5, 12, 5, 3, 12]
Handler = Callable[[str, np.ndarray], np.ndarray]


# -- the fake framework --------------------------------------------------------------------------


@dataclass
class Net:
    """``steps``: a BN layer's name (``str``) or a NumPy function of the activations; ``widths``
    the BN layers' channels; ``gamma``/``beta`` their affine parameters."""

    steps: list[Any]
    widths: dict[str, int]
    gamma: dict[str, np.ndarray]
    beta: dict[str, np.ndarray]
    forwards: int = 0

    def run(self, x: np.ndarray, bn: Handler) -> np.ndarray:
        """One forward: each BN step is ``bn(name, z)`` (NaN and Inf flow on silently, as on a
        device)."""
        self.forwards += 1
        with np.errstate(invalid="ignore"):
            for step in self.steps:
                x = bn(step, x) if isinstance(step, str) else step(x)
        return x


def chain(rng: np.random.Generator, steps: list[str] | None = None) -> Net:
    """``x (n, 3) -> W1 -> bn a -> relu -> W2 -> bn b``, or another order of the same pieces
    (``"W1"``, ``"relu"``, ``"W2"``, or a BN layer's name)."""
    w1, c1 = rng.normal(size=(3, 4)), rng.normal(size=4) * 3
    w2 = rng.normal(size=(4, 4))
    pieces = {
        "W1": lambda x: x @ w1 + c1,
        "relu": lambda x: np.maximum(x, 0.0),
        "W2": lambda x: x @ w2,
    }
    names = steps or ["W1", "a", "relu", "W2", "b"]
    layers = [name for name in names if name not in pieces]
    return Net(
        [pieces.get(name, name) for name in names],
        {name: 4 for name in layers},
        {name: rng.uniform(0.5, 2.0, size=4) for name in layers},
        {name: rng.normal(size=4) for name in layers},
    )


def to_numpy(parts: list[Any]) -> np.ndarray:
    return np.asarray(np.stack(parts), dtype=np.float64)


def normalize(net: Net, name: str, z: np.ndarray, mean: Any, var: Any) -> np.ndarray:
    return net.gamma[name] * (z - mean) / np.sqrt(var + EPS) + net.beta[name]


def measuring(
    net: Net,
    host: HostLayer,
    eval_level: bool,
    recorder: Recorder,
    layer_map: LayerMap | None = None,
) -> Handler:
    """A measured BN call: its moments recorded; the batch's own statistics (train; mapped by
    ``layer_map`` where given, the subset's solve) or NaN (an eval-mode level) out."""

    def call(name: str, z: np.ndarray) -> np.ndarray:
        mean, m2 = batch_moments(np, z, (0,))
        recorder.record(host, z.shape[0], np.stack([mean, m2]))
        if eval_level:
            return np.full_like(z, math.nan)
        statistics = (mean, m2 / z.shape[0])
        return normalize(net, name, z, *(layer_map or (lambda *pair: pair))(*statistics))

    return call


def one_pass(
    net: Net,
    batches: Iterable[np.ndarray],
    final: Final | None,
    options: dict[str, Any],
    measure_settled: bool = False,
    correction: Correction | None = None,
) -> HostMeasured:
    """One pass over ``batches``, as bnstats.keras' ``_one_pass``."""
    hosts = {name: HostLayer(name, width, np.zeros(width)) for name, width in net.widths.items()}
    recorder = Recorder()
    handlers: dict[str, Handler] = {}
    for name, host in hosts.items():
        if final is not None and name in final:
            mean, var = final[name]
            measure = measuring(net, host, True, recorder) if measure_settled else None
            handlers[name] = lambda n, z, m=mean, v=var, measure=measure: (
                measure and measure(n, z),
                normalize(net, n, z, m, v),
            )[1]
        else:
            layer_map = None if correction is None else correction.maps.get(name)
            handlers[name] = measuring(net, host, final is not None, recorder, layer_map)
    forward = forward_function(
        recorder,
        lambda x: net.run(x, lambda name, z: handlers[name](name, z)),
        options.get("jit"),
        lambda args: tuple(a.shape for a in args),
    )
    limited = iterate_limited(
        batches, options.get("max_samples"), len, lambda batch, keep: batch[:keep]
    )
    return measure_batches(hosts, limited, forward, to_numpy, False, pass_label(final))


def recalibrate(
    net: Net,
    batches: Iterable[np.ndarray],
    mode: str = "train",
    nonfinite: str = "raise",
    unreached: str = "raise",
    **options: Any,
) -> HostMeasured:
    """The fake framework's pass, as bnstats.keras' ``measure`` (eval mode's one batch where
    ``one_batch=True``, level by level alone otherwise)."""
    check_pass_options(mode, nonfinite, unreached, options.get("max_samples"))
    if mode == "train":
        measured = one_pass(net, batches, None, options)
        return finish_pass(measured, to_numpy, nonfinite, unreached, "batches")
    require_reusable(batches)
    one_batch = None
    if options.get("one_batch"):  # as bnstats.keras always does

        def run_joined(
            joined: np.ndarray, final: Final | None, correction: Correction | None
        ) -> HostMeasured:
            one = one_pass(net, [joined], final, options, final is not None, correction)
            return finish_pass(one, to_numpy, "skip", "keep", "")

        limit = budget(options.get("one_batch_bytes"))
        one_batch = OneBatch(batches, host_arrays(np.concatenate), limit, run_joined)

    def run_level(final: Final, measure_settled: bool) -> HostMeasured:
        given = batches if one_batch is None else one_batch.batches()
        measured = one_pass(net, given, final, options, measure_settled)
        return finish_pass(measured, to_numpy, "skip", "keep", "batches")

    epsilons = dict.fromkeys(net.widths, EPS)
    return measure_levels(run_level, nonfinite, unreached, epsilons, one_batch)


def as_compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A stand-in for ``jax.jit`` that runs ``fn`` each call: the compiled path's plumbing
    (records returned as values, given back to their layers by signature) without JAX."""
    return fn


# -- the same network written out with np.mean and np.var --------------------------------------


def layer_inputs(net: Net, batches: list[np.ndarray], stats: dict[str, Any]) -> dict[str, list]:
    """Each BN layer's input in every batch; a layer normalizes with ``stats[name]`` (mean,
    variance over all N) when given, else with its batch's own mean and ``np.var``."""
    seen: dict[str, list] = {name: [] for name in net.widths}

    def bn(name: str, z: np.ndarray) -> np.ndarray:
        seen[name].append(z)
        mean, var = stats.get(name) or (z.mean(axis=0), z.var(axis=0))
        return normalize(net, name, z, mean, var)

    for x in batches:
        net.run(x, bn)
    return seen


def train_reference(net: Net, batches: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Every layer's input over all batches, each layer normalizing with its batch's statistics."""
    return {name: np.concatenate(z) for name, z in layer_inputs(net, batches, {}).items()}


def eval_reference(net: Net, batches: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Every layer's input with every layer before it normalizing with its final statistics:
    layer by layer in call order, each settled from the concatenated data."""
    stats: dict[str, Any] = {}
    for name in net.widths:
        values = np.concatenate(layer_inputs(net, batches, stats)[name])
        stats[name] = (values.mean(axis=0), values.var(axis=0))
    return {name: np.concatenate(z) for name, z in layer_inputs(net, batches, stats).items()}


def assert_population(host: HostLayer, values: np.ndarray) -> None:
    """``host`` holds exactly ``values``: count, mean, unbiased and stored variance."""
    assert host.population.count == len(values)
    np.testing.assert_allclose(host.population.mean, values.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(host.population.var, values.var(axis=0, ddof=1), rtol=1e-11)
    mean, var = host.statistics()
    np.testing.assert_allclose(mean, values.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(var, values.var(axis=0, ddof=0), rtol=1e-11)


def data(rng: np.random.Generator, sizes: list[int]) -> list[np.ndarray]:
    """Batches far from 0 (mean 50, spread 2), where E[z**2] - E[z]**2 would lose digits."""
    return [rng.normal(50.0, 2.0, size=(size, 3)) for size in sizes]


# -- the module imports no framework -----------------------------------------------------------


def test_the_module_imports_no_framework():
    code = (
        "import sys, bnstats._host_pass, bnstats._levels, bnstats._host_levels, "
        "bnstats._host_one_batch, bnstats._one_batch, bnstats._host_subset, bnstats._correction; "
        "print([m for m in ('torch', 'keras', 'jax', 'flax') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- train mode ----------------------------------------------------------------------------------


@pytest.mark.parametrize("jit", [None, as_compiled], ids=["eager", "compiled"])
@pytest.mark.parametrize("sizes", [UNEVEN, [2, 3, 4, 5] * 17 + [7]], ids=["uneven", "70_batches"])
def test_train_mode_gives_the_exact_population_over_uneven_batches(rng, sizes, jit):
    """70 batches: more than one group of 64 reaches the host before the merge."""
    net, batches = chain(rng), data(rng, sizes)
    measured = recalibrate(net, batches, jit=jit)
    assert net.forwards == len(sizes)
    expected = train_reference(net, batches)
    for name, values in expected.items():
        assert_population(measured.layers[name], values)
        assert measured.layers[name].batches == len(sizes)
        assert measured.layers[name].skipped == 0
    assert measured.batch_sizes == sizes
    assert measured.passes == 1 and measured.unreached == []
    assert [measured.layers[name].first_reached for name in "ab"] == [1, 2]


def test_batch_moments_are_centred_and_take_a_mask():
    x = np.array([[1e8 + 1.0, 2.0], [1e8 + 3.0, 4.0], [1e8 + 8.0, 9.0]])
    mean, m2 = batch_moments(np, x, (0,))
    np.testing.assert_allclose(mean, x.mean(axis=0))
    np.testing.assert_allclose(m2, ((x - x.mean(axis=0)) ** 2).sum(axis=0), rtol=1e-12)
    mask = np.array([[1.0], [1.0], [0.0]])  # the last row masked out
    mean, m2 = batch_moments(np, x, (0,), mask)
    np.testing.assert_allclose(mean, x[:2].mean(axis=0))
    np.testing.assert_allclose(m2, x[:2].var(axis=0) * 2, rtol=1e-12)


def test_max_samples_cuts_the_batch_that_crosses_it_and_draws_no_more(rng):
    net, batches = chain(rng), data(rng, UNEVEN)
    drawn = []

    def source():
        for batch in batches:
            drawn.append(len(batch))
            yield batch

    measured = recalibrate(net, source(), max_samples=20)
    assert measured.batch_sizes == [5, 12, 3] and drawn == [5, 12, 5]
    expected = train_reference(net, [batches[0], batches[1], batches[2][:3]])
    for name, values in expected.items():
        assert_population(measured.layers[name], values)


def test_a_generator_is_enough_for_train_mode(rng):
    net, batches = chain(rng), data(rng, UNEVEN)
    measured = recalibrate(net, (b for b in batches))
    for name, values in train_reference(net, batches).items():
        assert_population(measured.layers[name], values)


def test_no_batch_and_bad_options_are_refused(rng):
    net = chain(rng)
    with pytest.raises(ValueError, match="batches yielded no batch"):
        recalibrate(net, [])
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        recalibrate(net, data(rng, [4]), nonfinite="ignore")
    with pytest.raises(ValueError, match="max_samples must be a positive integer"):
        recalibrate(net, data(rng, [4]), max_samples=0)


# -- NaN and Inf -----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_bad_batch_is_refused_under_raise_naming_the_first_layer_and_batch(rng, bad):
    net, batches = chain(rng), data(rng, UNEVEN)
    batches[2][1, 0] = bad
    with pytest.raises(NonFiniteStatisticsError, match=r"BN layer 'a': batch 2 \(counting"):
        recalibrate(net, batches)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_bad_batch_weighs_nothing_under_skip(rng, bad):
    net, batches = chain(rng), data(rng, UNEVEN)
    batches[2][1, 0] = bad
    measured = recalibrate(net, batches, nonfinite="skip")
    expected = train_reference(net, batches[:2] + batches[3:])
    for name, values in expected.items():
        layer = measured.layers[name]
        assert_population(layer, values)
        assert (layer.batches, layer.skipped, layer.first_bad) == (5, 1, 2)
        assert layer.finite_batches == 4


def test_a_batch_of_count_zero_weighs_nothing():
    host = HostLayer("a", 2, np.zeros(2))
    values = np.array([[1.0, 2.0], [3.0, 5.0], [4.0, 9.0]])
    for index, (count, part) in enumerate([(2, values[:2]), (0, values[:1]), (1, values[2:])]):
        mean, m2 = batch_moments(np, part, (0,))
        host.add_batch(index, count, np.stack([mean, m2]), to_numpy)
    host.flush(to_numpy)
    assert (host.skipped, host.first_bad) == (1, 1)
    assert_population(host, values)


def test_batches_that_are_all_bad_leave_no_statistics_to_write(rng):
    net, batches = chain(rng), data(rng, [4, 4])
    for batch in batches:
        batch[0, 0] = math.nan
    measured = recalibrate(net, batches, nonfinite="skip")
    with pytest.raises(NonFiniteStatisticsError, match="BN layer 'a'.*after 2 batches"):
        measured.layers["a"].statistics()


# -- layers no forward reached ---------------------------------------------------------------


def test_a_layer_no_forward_reached_is_refused_or_kept(rng):
    net, batches = chain(rng), data(rng, UNEVEN)
    net.widths["c"] = 4  # a BN layer the forward never calls
    with pytest.raises(ValueError, match=r"no forward reached BN layer\(s\) 'c' in 5 batches"):
        recalibrate(net, batches)
    measured = recalibrate(net, batches, unreached="keep")
    assert measured.unreached == ["c"]
    assert [layer.name for layer in measured.reached()] == ["a", "b"]
    evaluated = recalibrate(net, batches, mode="eval", unreached="keep")
    assert evaluated.unreached == ["c"] and evaluated.passes == 2 + 1  # levels, check
    with pytest.raises(ValueError, match=r"no forward reached BN layer\(s\) 'c'"):
        recalibrate(net, batches, mode="eval")


# -- eval mode: one pass per depth level ---------------------------------------------------


def test_eval_mode_settles_level_by_level_with_batches_of_one(rng):
    net, batches = chain(rng), data(rng, [1, 4, 1, 4, 1])
    measured = recalibrate(net, batches, mode="eval")
    assert measured.passes == 2 + 1 and net.forwards == 3 * len(batches)  # levels, check
    for name, values in eval_reference(net, batches).items():
        assert_population(measured.layers[name], values)
    assert measured.batch_sizes == [1, 4, 1, 4, 1]
    assert [measured.layers[name].first_reached for name in "ab"] == [1, 2]


def test_eval_mode_differs_from_train_mode_after_the_first_layer(rng):
    """The first layer's input is the same in both modes; the second's is not."""
    net, batches = chain(rng), data(rng, UNEVEN)
    train = recalibrate(net, batches)
    evaluated = recalibrate(net, batches, mode="eval")
    np.testing.assert_allclose(
        train.layers["a"].statistics()[1], evaluated.layers["a"].statistics()[1]
    )
    assert not np.allclose(train.layers["b"].statistics()[0], evaluated.layers["b"].statistics()[0])


def test_layers_of_one_depth_settle_in_one_pass(rng):
    """``b`` reads ``a``'s input (kept aside), not its output: one level, one pass."""
    net = chain(rng, ["W1", "a", "b"])
    kept: list[np.ndarray] = []
    w1 = net.steps[0]
    net.steps = [lambda x: kept.append(w1(x)) or kept[-1], "a", lambda _: kept[-1], "b"]
    batches = data(rng, UNEVEN)
    measured = recalibrate(net, batches, mode="eval")
    assert measured.passes == 1 + 1  # the level, the check
    for name, values in eval_reference(net, batches).items():
        assert_population(measured.layers[name], values)
    np.testing.assert_array_equal(
        measured.layers["a"].population.mean, measured.layers["b"].population.mean
    )


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_eval_mode_with_a_bad_batch_raises_or_skips_it(rng, bad):
    net, batches = chain(rng), data(rng, UNEVEN)
    batches[2][1, 0] = bad
    with pytest.raises(NonFiniteStatisticsError, match="BN layer 'a': 1 of 5 batches"):
        recalibrate(net, batches, mode="eval")
    measured = recalibrate(net, batches, mode="eval", nonfinite="skip")
    for name, values in eval_reference(net, batches[:2] + batches[3:]).items():
        assert_population(measured.layers[name], values)
        assert measured.layers[name].skipped == 1
    assert measured.passes == 2 + 1


def test_eval_mode_refuses_a_layer_computed_from_its_own_output(rng):
    net = chain(rng, ["W1", "a", "relu", "a"])
    with pytest.raises(ValueError, match="'a' is called 2 times per forward"):
        recalibrate(net, data(rng, UNEVEN), mode="eval")


def test_eval_mode_refuses_data_that_is_nan_in_every_batch(rng):
    net, batches = chain(rng), data(rng, [4, 4])
    for batch in batches:
        batch[0, 0] = math.nan
    with pytest.raises(
        ValueError, match=r"BN layer\(s\) 'a', 'b' received NaN or Inf in every batch"
    ):
        recalibrate(net, batches, mode="eval", nonfinite="skip")


def test_eval_mode_refuses_a_one_shot_iterator_before_any_forward(rng):
    net, batches = chain(rng), data(rng, UNEVEN)
    for one_shot in (iter(batches), (b for b in batches)):
        with pytest.raises(TypeError, match="passes over batches several times .* one-shot"):
            recalibrate(net, one_shot, mode="eval")
    assert net.forwards == 0


# -- what an audit reads ---------------------------------------------------------------------


def test_the_measurement_has_the_standard_errors_of_the_batches_spread(rng):
    """Against the cluster-sampling formulas written out per batch ``k`` (``n_k`` values,
    ``N`` in all, ``B`` batches, population ``mu`` and ``v`` over all N)::

        se_mean**2 = sum n_k (mean_k - mu)**2 / (N (B - 1))
        d_k        = mean over batch k of (z - mu)**2
        se_var**2  = sum n_k (d_k - v)**2 / (N (B - 1))     (the stored variance's)
    """
    net, batches = chain(rng), data(rng, UNEVEN)
    measured = recalibrate(net, batches)
    for name, values in train_reference(net, batches).items():
        parts = np.split(values, np.cumsum(UNEVEN)[:-1])
        n = np.array(UNEVEN, dtype=float)[:, None]
        total, count = len(values), len(UNEVEN)
        mu, v = values.mean(axis=0), values.var(axis=0)
        means = np.array([p.mean(axis=0) for p in parts])
        d = np.array([((p - mu) ** 2).mean(axis=0) for p in parts])
        se_mean = np.sqrt((n * (means - mu) ** 2).sum(axis=0) / (total * (count - 1)))
        se_var = np.sqrt((n * (d - v) ** 2).sum(axis=0) / (total * (count - 1)))
        got = measured.layers[name].measurement("BatchNormalization", EPS)
        np.testing.assert_allclose(got.mean_standard_error, se_mean, rtol=1e-8)
        np.testing.assert_allclose(got.var_standard_error, se_var, rtol=1e-8)
        unbiased = values.var(axis=0, ddof=1)
        worst = max(
            np.max(se_mean / np.sqrt(unbiased)), np.max(se_var * total / (total - 1) / unbiased)
        )
        assert got.relative_error == pytest.approx(worst, rel=1e-8)
        assert (got.samples, got.skipped, got.calls_per_forward) == (total, 0, 1)
        np.testing.assert_allclose(got.population_var, v, rtol=1e-11)


def test_one_batch_gives_infinite_standard_errors(rng):
    net = chain(rng)
    got = recalibrate(net, data(rng, [6])).layers["a"].measurement("BatchNormalization", EPS)
    assert np.isinf(got.mean_standard_error).all() and np.isinf(got.var_standard_error).all()
    assert got.relative_error == math.inf


def test_eval_mode_checks_its_levels_and_names_a_dependence_no_nan_showed(rng):
    """A comparison between the layers turns the first level's NaN into numbers, so ``b``
    looks independent of ``a`` and both settle in one level, ``b`` measured on ``NaN > 0``:
    the check pass, every layer normalizing with its statistics, moves ``b`` and fails."""
    net = chain(rng)
    net.steps.insert(2, lambda x: (x > 0).astype(np.float64))
    with pytest.raises(ValueError, match=r"mode='eval'.*BN layer 'b' moves by .*sign, nan_to_num"):
        recalibrate(net, data(rng, UNEVEN), mode="eval")
