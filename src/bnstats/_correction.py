"""The correction of eval mode's subset iteration, in every framework: per layer and channel,
the affine map taking the subset's input populations to the whole data's, both measured
while every BN layer normalizes with the same statistics.

``F(s)`` is every BN layer's input population over all the data when every BN layer
normalizes with ``s``; ``F_sub(s)`` the same over a subset of the data. They differ by
sampling, and that difference changes little with ``s``, so measured once at ``s`` it
corrects the subset at nearby statistics too::

    mean -> mean_w + a * (mean - mean_s),   var -> var * a**2,   a**2 = var_w / var_s

(``mean_s, var_s`` of ``F_sub(s)``, ``mean_w, var_w`` of ``F(s)``; a channel constant over
the subset, ``var_s = 0``, is shifted instead: ``var -> var + var_w``). Solving
``s = C(F_sub(s))`` on the subset and checking with one pass over the whole data is a round;
the torch tools (:mod:`bnstats.torch._subset_iteration`) and the Keras and Flax tools
(:mod:`bnstats._host_subset`) run them. NumPy-free: a framework says how its arrays select
and convert (:class:`ArrayMath`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

SHRINK = 0.5
"""A round goes on only where its whole pass moved the statistics by less than this share of
what the round before moved them (else the subset is no guide: the exact passes take over).
The first round after the subset's own fixed point is not judged: that point had no
correction, and how far its whole pass moved says nothing of how well the subset guides."""

MeanVar = tuple[Any, Any]
"""A layer's ``(mean, var)`` per channel, in a framework's arrays."""


@dataclass(frozen=True)
class ArrayMath:
    """What the correction asks of a framework's arrays: ``where(condition, a, b)`` and
    ``align(value, like)`` (``value`` in ``like``'s dtype and on its device)."""

    where: Callable[[Any, Any, Any], Any]
    align: Callable[[Any, Any], Any]


@dataclass(frozen=True)
class LayerMap:
    """One layer's map per channel: ``mean -> mean_w + scale * (mean - mean_s)``,
    ``var -> var * squared + shift`` (``squared = scale**2 = var_w / var_s``, ``shift = 0``;
    where ``var_s = 0``: ``squared = 1``, ``shift = var_w``)."""

    mean_s: Any
    mean_w: Any
    scale: Any
    squared: Any
    shift: Any

    def __call__(self, mean: Any, var: Any) -> MeanVar:
        """``(mean, var)`` mapped (arrays the map's fields broadcast with)."""
        return self.mean_w + self.scale * (mean - self.mean_s), var * self.squared + self.shift

    def converted(self, convert: Callable[[Any], Any]) -> LayerMap:
        """The same map with every field ``convert``-ed (into a framework's arrays, say)."""
        return LayerMap(*(convert(getattr(self, field.name)) for field in fields(self)))


class Correction:
    """Per layer, the affine map per channel from the ``subset``'s populations to the
    ``whole`` data's (``name -> (mean, var)``), both measured normalizing with the same
    statistics (see the module); layers ``subset`` lacks have none."""

    def __init__(
        self, subset: Mapping[str, MeanVar], whole: Mapping[str, MeanVar], math: ArrayMath
    ) -> None:
        self.maps: dict[str, LayerMap] = {}
        self._align = math.align
        for name, (mean_w, var_w) in whole.items():
            if name not in subset:
                continue
            mean_s, var_s = (math.align(v, mean_w) for v in subset[name])
            spread = var_s > 0
            squared = math.where(spread, var_w / math.where(spread, var_s, 1.0), 1.0)
            shift = math.where(spread, 0.0, var_w)
            self.maps[name] = LayerMap(mean_s, mean_w, squared**0.5, squared, shift)

    def __call__(self, statistics: Mapping[str, MeanVar]) -> dict[str, MeanVar]:
        """``statistics`` mapped, layer by layer (:meth:`layer`)."""
        return {name: self.layer(name, value) for name, value in statistics.items()}

    def layer(self, name: str, statistics: MeanVar) -> MeanVar:
        """Layer ``name``'s ``(mean, var)`` mapped (aligned to the map's arrays first); as it
        is without a map."""
        if name not in self.maps:
            return statistics
        layer_map = self.maps[name]
        mean, var = (self._align(v, layer_map.mean_w) for v in statistics)
        return layer_map(mean, var)
