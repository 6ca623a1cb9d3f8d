"""Eval mode's one batch for the Keras and Flax tools: the fixed point of inference in one
forward where the data fit, then one pass over the batches as given to check it.

``F(s)`` is every BN layer's input population (``mean``, variance over all N values: what
Keras and Flax store) over all the data when every BN layer normalizes with ``s``; eval mode
looks for ``s* = F(s*)``. All the data run as one batch through the framework's own
batch-statistics pass (every BN layer normalizing with its input's ``mean`` and ``m2 / N``,
everything else in inference behaviour), so each layer normalizes with its population over
all the data, and every layer's statistics are ``s*`` when the forward reaches it
(:mod:`bnstats._one_batch`): the level-by-level result in one forward, whatever the depth.
Then one pass over the batches as given, every layer normalizing with those statistics and
measured, is what is written, where it moved no layer by more than
:data:`bnstats._host_levels.CHECK_TARGET`.

Used where it is safe (:meth:`OneBatch.solve`): every BN layer called at most once per
forward, the largest BN input of the first pass within the budget (its values times 4 bytes;
``one_batch_bytes``, by default :data:`bnstats._one_batch.ONE_BATCH_BYTES`), the batches of
the first pass kept within that budget and joined (:func:`bnstats._one_batch.join`), a one-batch
forward that runs and reaches every layer the first pass reached with finite statistics.
Where the data are larger than the budget, the first batches that join within it (at least
:data:`SUBSET_LEAST` samples, :func:`subset_within`) are the subset of
:mod:`bnstats._host_subset`, whose rounds of one whole pass each solve the same fixed point.
Anywhere else, and where the check pass moved a layer (a batch whose first dimension is not
its samples, a model that mixes its samples) or the subset's rounds stop shrinking, the
levels go on from the first pass (:func:`bnstats._host_levels.measure_levels`): a wrong join
costs passes, never a wrong number.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from bnstats._host_levels import CHECK_TARGET, LevelRun, movements
from bnstats._host_pass import HostMeasured
from bnstats._host_subset import JoinedRun, Spent, iterate_on_subset, joined_statistics
from bnstats._one_batch import ArrayKind, KeptBatches, fits_budget, join_or_none, largest_input

VALUE_BYTES = 4
"""Bytes per value of a BN input, for the budget (float32)."""

SUBSET_LEAST = 64
"""The fewest samples of eval mode's subset over the budget (:func:`subset_within`). Fewer
than the torch tools' 256 (``bnstats.torch._subset_choice.SHRUNK_LEAST``), which solve a
subset that does not join by passes over it instead; here the alternative is one pass per
depth level: 64 images, a 16th of the data, took the same 4 passes as 512 on the 10-block
conv chain of ``benchmarks/eval_host_subset.py``, and 9 (+ 15 subset forwards) where the
levels took 53 on keras.applications' MobileNetV2 (random weights, 256 images 32x32)."""


def host_arrays(concatenate: Callable[[list[Any]], Any]) -> ArrayKind:
    """NumPy, JAX and Keras arrays as joining sees them: anything with a ``shape``, a
    ``dtype`` and ``nbytes``; they join with the same trailing shape and dtype, by the
    framework's ``concatenate(parts)``."""
    return ArrayKind(
        is_array=lambda value: all(hasattr(value, key) for key in ("shape", "dtype", "nbytes")),
        joins_with=lambda first, part: (
            len(part.shape) >= 1
            and tuple(part.shape[1:]) == tuple(first.shape[1:])
            and str(part.dtype) == str(first.dtype)
        ),
        concatenate=concatenate,
        nbytes=lambda array: int(array.nbytes),
    )


class OneBatch:
    """The one batch of an eval-mode call over ``batches`` within ``limit`` bytes (the
    call's budget, :func:`bnstats._one_batch.budget`): the passes go over :meth:`batches`
    (the first one keeps what it draws), and :meth:`solve` runs the one batch after the
    first pass, or the subset iteration where the data do not fit; ``spent``: the passes it
    ran (the forward over the one batch counts as one), ``subset_spent``: its forwards over
    the subset."""

    def __init__(
        self, batches: Iterable[Any], kind: ArrayKind, limit: int, run_joined: JoinedRun
    ) -> None:
        self.spent = self.subset_spent = 0
        self._given = batches
        self._kept = KeptBatches(batches, kind, limit, keep_first=True)
        self._first_drawn = False
        self._run_joined = run_joined

    def batches(self) -> Iterable[Any]:
        """What a pass goes over: the batches as given, kept by the first pass."""
        if self._first_drawn:
            return self._given
        self._first_drawn = True
        return self._kept

    def solve(
        self, first: HostMeasured, run_level: LevelRun, epsilons: Mapping[str, float]
    ) -> HostMeasured | None:
        """After the first pass ``first``: where the data fit, the one-batch forward, then
        the check pass (``run_level(final, True)``), whose measurements are the result (3
        passes); where they do not, the subset iteration over the first batches that fit
        (:func:`subset_within`, :mod:`bnstats._host_subset`). None where the data (or the
        subset) do not join, a forward failed, the check pass moved a layer by more than
        :data:`CHECK_TARGET` or the subset's rounds stopped shrinking."""
        kept, first_batches = self._kept.kept, self._kept.first
        self._kept.kept, self._kept.first = None, []  # the inputs are not needed after this
        if kept is None or not fits_one_batch(first, self._kept.limit):
            return self._on_subset(first, first_batches, run_level, epsilons)
        joined = join_or_none(kept, self._kept.kind)
        if joined is None:
            return None
        self.spent += 1
        reached = [host.name for host in first.reached()]
        final = joined_statistics(self._run_joined, joined, None, None, reached)
        if final is None:
            return None
        checked = run_level(final, True)
        self.spent += 1
        if max(movements(final, checked, epsilons).values()) > CHECK_TARGET:
            return None
        layers = {name: checked.layers[name] for name in first.layers}
        return HostMeasured(layers, checked.batch_sizes, unreached=first.unreached, passes=3)

    def _on_subset(
        self,
        first: HostMeasured,
        first_batches: list[Any],
        run_level: LevelRun,
        epsilons: Mapping[str, float],
    ) -> HostMeasured | None:
        """The subset iteration (:func:`bnstats._host_subset.iterate_on_subset`) over the
        first batches that join within the budget; None where there are none such."""
        subset = subset_within(first, first_batches, self._kept.limit)
        joined = None if subset is None else join_or_none(subset, self._kept.kind)
        if joined is None:
            return None
        spent = Spent()
        result = iterate_on_subset(
            first, joined, lambda final: run_level(final, True), self._run_joined, epsilons, spent
        )
        self.spent, self.subset_spent = self.spent + spent.whole, spent.subset
        return result


def fits_one_batch(first: HostMeasured, limit: int) -> bool:
    """True where no BN layer was called more than once in a forward of the pass ``first``
    and its largest BN input (values over the pass times :data:`VALUE_BYTES`) is at most
    ``limit`` bytes (:func:`bnstats._one_batch.fits_budget`)."""
    return fits_budget(_bn_inputs(first), limit)


def subset_within(first: HostMeasured, batches: Sequence[Any], limit: int) -> list[Any] | None:
    """The first of ``batches`` (those the pass ``first`` drew first, in order) whose largest
    BN input fits ``limit`` bytes, at the size per sample the pass measured (its largest BN
    input over its samples): eval mode's subset (:mod:`bnstats._host_subset`); None where
    those hold fewer than :data:`SUBSET_LEAST` samples, or a BN layer was called more than
    once in a forward."""
    largest, samples = largest_input(_bn_inputs(first)), sum(first.batch_sizes)
    if not largest or not samples:
        return None
    per_sample = largest / samples
    taken = held = 0
    for size in first.batch_sizes[: len(batches)]:
        if (held + size) * per_sample > limit:
            break
        taken, held = taken + 1, held + size
    return list(batches[:taken]) if held >= SUBSET_LEAST else None


def _bn_inputs(first: HostMeasured) -> Iterator[tuple[int, float]]:
    """Per BN layer the pass ``first`` reached: the most calls one forward made and the bytes
    of its input over the pass (values times :data:`VALUE_BYTES`)."""
    return ((host.max_calls_per_forward, host.values * VALUE_BYTES) for host in first.reached())
