"""The keyword options shared by every bnstats tool that makes a pass over data.

:func:`~bnstats.torch.recalibrate`, :func:`~bnstats.torch.recalibrate_report`,
:func:`~bnstats.torch.audit` and :func:`~bnstats.torch.adapt` list these options in their
signatures (keyword-only, with these defaults) and check them once, here, by building a
:class:`PassOptions` from their arguments (:meth:`PassOptions.pick`). A new tool takes the
same keyword arguments and calls ``PassOptions.pick(locals())``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

from bnstats._one_batch import check_budget
from bnstats.torch._batches import Forward
from bnstats.torch._ranks import Group

CHECK_EVERY = 8
"""With ``tolerance``: batches between two checks of the standard errors (one host read each)."""
MIN_BATCHES = 16
"""With ``tolerance``: batches drawn before the first check (the spread needs a few)."""

_CHOICES = {
    "nonfinite": ("raise", "skip"),
    "unreached": ("raise", "keep"),
    "mode": ("train", "eval", "eval_exact"),
}


@dataclass(frozen=True)
class PassOptions:
    """The keyword options every tool that makes a pass takes (recalibrate, audit, adapt).

    - ``forward(model, batch)``: how to call the model on one batch. Default: ``model(x)``
      for a tensor, ``model(batch[0])`` for a tuple or list, ``model(**batch)`` for a dict.
    - ``max_samples``: stop after this many samples (first dimension); the batch crossing
      the limit is cut, and no further batch is drawn. In a group: this rank's samples.
    - ``float64_moments``: each batch's moments in float64 (slower; for activations whose
      mean dwarfs their spread).
    - ``group``: the torch.distributed ranks whose batches together are the data: ``None``
      (the default process group when torch.distributed is initialized with more than one
      rank), ``False`` (this process's data only) or a ``ProcessGroup``.
    - ``nonfinite``: ``"raise"`` (a batch bringing NaN or Inf fails the pass, naming it) or
      ``"skip"`` (such a batch weighs nothing; the pass counts it).
    - ``unreached``: ``"raise"`` (a BN layer that no forward reached fails the pass) or
      ``"keep"`` (such layers, auxiliary heads for instance, keep their statistics and are
      listed).
    - ``mode``: ``"train"`` (each BN layer's input with every BN layer normalizing with its
      batch's statistics, one pass), ``"eval"`` (each BN layer's input with every BN layer
      normalizing with its own final statistics, as at inference: whole-model passes until
      one moves no layer by more than 1e-4; three where the data run as one batch, largest
      BN input at most 256 MiB; else four where they converge fast, at most
      one per depth level of the BN layers and one more) or ``"eval_exact"`` (the same statistics
      exactly, one pass per depth level of the BN layers).
    - ``tolerance``: stop drawing batches once every channel's mean and variance, over all
      measured layers, is within ``tolerance`` (relative; the mean relative to the channel's
      standard deviation) of the whole data's statistics (for data without a length, of the
      population the batches are drawn from) with 95 % confidence: the sum over all those
      estimates of ``P(|Z| > tolerance / r)``, ``r`` each one's relative standard error
      (:meth:`bnstats.precision.BatchSpread.relative_standard_errors`; times
      ``sqrt(1 - b / len(batches))`` after ``b`` batches of data with a length), at most
      0.05 (the union bound, :func:`bnstats.precision.miss_probability`), judged every
      ``CHECK_EVERY`` batches from ``MIN_BATCHES`` batches on (in ``mode="eval"`` on its
      first pass, whose batches the other passes reuse). Not in a group.
      Under ``unreached="raise"`` a layer no forward has reached yet holds the stop back (a
      layer used in few batches is drawn until it is measured too); under ``"keep"`` it is
      kept as it was and listed, as at the end of the data.
    - ``progress``: a rich progress bar on stderr with the samples seen (and the worst
      relative standard error with ``tolerance``): ``None`` when stderr is a terminal,
      ``True`` always, ``False`` never.
    - ``one_batch_bytes``: in ``mode="eval"``, the memory the data may take to run as one
      batch (three passes): their largest BN input (values per channel over the data times
      channels times the element size; over all ranks) and their inputs each at most this
      many bytes. ``None``: 256 MiB; the forward of such a batch holds a few times it, so
      raise it only where that memory is free (on a GPU, a forward that runs out of memory
      falls back to the passes; on the CPU the system may stop the process instead). 0:
      never one batch.
    """

    forward: Forward | None = None
    max_samples: int | None = None
    float64_moments: bool = False
    group: Group = None
    nonfinite: Literal["raise", "skip"] = "raise"
    unreached: Literal["raise", "keep"] = "raise"
    mode: Literal["train", "eval", "eval_exact"] = "train"
    tolerance: float | None = None
    progress: bool | None = None
    one_batch_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.forward is not None and not callable(self.forward):
            raise TypeError(
                f"forward must be callable as forward(model, batch), got {self.forward!r}"
            )
        samples = self.max_samples
        if samples is not None and (
            isinstance(samples, bool) or not isinstance(samples, numbers.Integral) or samples < 1
        ):
            raise ValueError(f"max_samples must be a positive integer or None, got {samples!r}")
        for key, allowed in _CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} must be one of {allowed}, got {getattr(self, key)!r}")
        tolerance = self.tolerance
        if tolerance is not None and (
            isinstance(tolerance, bool)
            or not isinstance(tolerance, numbers.Real)
            or not 0 < tolerance < math.inf
        ):
            raise ValueError(f"tolerance must be a positive number or None, got {tolerance!r}")
        if self.progress is not None and not isinstance(self.progress, bool):
            raise TypeError(f"progress must be True, False or None, got {self.progress!r}")
        check_budget(self.one_batch_bytes)

    @classmethod
    def pick(cls, arguments: Mapping[str, Any]) -> PassOptions:
        """The options among a tool's ``arguments`` (its ``locals()``: every field of this
        class by name), checked."""
        return cls(**{option.name: arguments[option.name] for option in fields(cls)})

    def call(self) -> dict[str, Any]:
        """What the ranks must agree on: every option that changes the result, as the user
        gave it (all but the callable, the group and the progress bar)."""
        return {
            "max_samples": self.max_samples,
            "float64_moments": self.float64_moments,
            "nonfinite": self.nonfinite,
            "unreached": self.unreached,
            "mode": self.mode,
            "tolerance": self.tolerance,
            "one_batch_bytes": self.one_batch_bytes,
        }


__all__ = ["CHECK_EVERY", "MIN_BATCHES", "Forward", "PassOptions"]
