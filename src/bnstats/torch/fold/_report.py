"""What :func:`bnstats.torch.fold` did with each BatchNorm layer, and why.

``fused.fold_report`` is a :class:`FoldReport`: one :class:`FoldEntry` per BatchNorm layer of
the original model (frozen BNs included), in ``named_modules()`` order. A folded entry names
the layer that absorbed the BN and whether the BN sat after it (``layer -> BN``), before it
(``BN -> layer``) or beside it (``layer(x) + BN(x)``, RepVGG's identity branch); a kept entry
carries a short ``code`` and a sentence. The codes:

==========================  =====================================================================
``training``                the BN is in training mode: its output depends on the batch
``no_running_stats``        ``track_running_stats=False``: it always uses the batch's statistics
``bad_statistics``          ``running_var + eps`` is not positive, or a statistic is NaN/Inf
``bn_unsupported``          a forward fold does not know (a subclass overriding it, a class that
                            only shares a known class's name), forward or backward hooks, called
                            more than once, read elsewhere, lazy and never run
``not_called``              never called in ``forward``: tracing dropped it
``no_layer``                no conv/linear layer directly before or after it
``layer_unsupported``       the neighbour cannot absorb it (transposed conv after the BN, shared,
                            hooked or parametrized layer, overridden ``forward`` or
                            ``_conv_forward`` as in weight-standardised convs, a hooked
                            ``nn.Identity`` between a layer and the sum it shares with the BN)
``norm_act``                the BN applies its own drop/activation (timm's ``BatchNormAct2d``):
                            only the layer before it can absorb it
``shared_tensor``           the tensor between them is also used elsewhere (residual branches)
``padding``                 the conv after it pads with zeros AFTER the BN, and BN(0) != 0
``needs_example_inputs``    BatchNorm1d (or SyncBatchNorm, frozen BN) next to a linear/conv: only
                            the input's rank tells whether the BN's dim 1 is the layer's channels
``channel_axis``            ``example_inputs`` showed that it is not
``overflow``                the folded weights would not be finite in the layer's dtype
==========================  =====================================================================
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from bnstats.torch.fold._weights import Position

_ARROWS = {"after": "layer -> BN", "before": "BN -> layer", "beside": "layer(x) + BN(x)"}


@dataclass(frozen=True)
class FoldEntry:
    """One BatchNorm layer: folded into ``folded_into`` or kept for ``reason``.

    ``name`` is the BN's qualified name in the original model, ``kind`` its class name.
    ``position`` is ``"after"`` for ``layer -> BN`` (output channels scaled), ``"before"``
    for ``BN -> layer`` (input channels scaled) and ``"beside"`` for ``layer(x) + BN(x)``
    (the BN added to the kernel's centre). ``code`` and ``reason`` are None when folded.
    """

    name: str
    kind: str
    folded_into: str | None = None
    position: Position | None = None
    code: str | None = None
    reason: str | None = None

    @property
    def folded(self) -> bool:
        return self.folded_into is not None

    def __str__(self) -> str:
        if self.folded:
            arrow = _ARROWS[self.position or "after"]
            return f"folded  {self.name} ({self.kind}) into {self.folded_into} ({arrow})"
        return f"kept    {self.name} ({self.kind}) [{self.code}]: {self.reason}"


@dataclass
class FoldReport:
    """Every BatchNorm layer of the model ``model`` (its class name) and what fold did with it."""

    model: str
    entries: list[FoldEntry] = field(default_factory=list)

    @property
    def folded(self) -> list[FoldEntry]:
        """The BN layers that are gone, absorbed by a neighbouring layer."""
        return [e for e in self.entries if e.folded]

    @property
    def kept(self) -> list[FoldEntry]:
        """The BN layers that stayed (or, with code ``not_called``, were never used)."""
        return [e for e in self.entries if not e.folded]

    def __getitem__(self, name: str) -> FoldEntry:
        for entry in self.entries:
            if entry.name == name:
                return entry
        known = ", ".join(e.name for e in self.entries) or "none"
        raise KeyError(f"no BatchNorm layer named {name!r} in {self.model} (known: {known})")

    def __len__(self) -> int:
        return len(self.entries)

    def to_dict(self) -> dict[str, Any]:
        """Plain data: ``{"model": ..., "entries": [{name, kind, folded_into, ...}, ...]}``."""
        return {"model": self.model, "entries": [asdict(e) for e in self.entries]}

    def __str__(self) -> str:
        head = (
            f"fold({self.model}): {len(self.folded)} of {len(self.entries)} BatchNorm layers "
            f"folded, {len(self.kept)} kept"
        )
        return "\n".join([head, *(f"  {entry}" for entry in self.entries)])


__all__ = ["FoldEntry", "FoldReport"]
