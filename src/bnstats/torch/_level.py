"""How the model runs in one pass (:class:`Level`), and everything a pass sets on it,
undone on exit (:func:`pass_mode`)."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from bnstats.stats import Population
from bnstats.torch._layer_pass import LayerPass
from bnstats.torch._layers import (
    PreservedState,
    batchnorm_train_mode,
    is_lazy_uninitialized,
    process_group_initialized,
    write_buffers,
)
from bnstats.torch.modules import EstimatorBatchNorm
from bnstats.torch.options import PassOptions

MISS_PROBABILITY = 0.05
"""A ``tolerance`` is met when the probability that some channel lies outside it is at most
this (95 % confidence for all channels together)."""

MeanVar = tuple[torch.Tensor, torch.Tensor]
"""One layer's per-channel ``(mean, var)``."""
Statistics = Mapping[str, MeanVar]
"""Per BN layer (qualified name) a per-channel ``(mean, var)`` to normalize with in eval mode."""


@dataclass(frozen=True)
class Level:
    """What one pass measures, and how the model runs in it.

    :data:`TRAIN`, the pass of ``mode="train"``: every BN layer in training mode, measured.
    Every other level runs every module in eval mode and measures the input of each BN layer,
    which normalizes, by ``rule``:

    - ``"exact"`` (a level of ``mode="eval_exact"``, see
      :func:`bnstats.torch._eval_exact.measure_eval_exact`): the ``settled`` layers with their
      final populations' ``mean`` and unbiased ``var``; every other BN layer is measured and
      outputs NaN, so that each layer computed from it sees NaN and waits for a later level.
    - ``"batch"``: each call with its input's own ``mean`` and biased ``var``, as in training
      (with its buffers where the input has fewer than 2 values per channel);
    - ``"own"``: each call with its input's own population, ``mean`` and unbiased ``var``
      (with its buffers where the input has fewer than 2 values per channel), mapped by
      ``correction`` where one is given: run over all the data as one batch, the fixed point
      of eval-mode inference in one forward (:mod:`bnstats.torch._one_batch`; over a subset
      with its correction, the subset iteration's solve, :mod:`bnstats.torch._subset_iteration`);
    - ``"fixed"``: with ``statistics`` (a layer without an entry with its buffers);
    - ``"tracked"``: each batch runs twice. First with ``statistics`` (the reference; each
      call's input moments ``m_r, v_r`` are kept), then each call with ``base`` (the
      population of the reference run's input) moved as the input moved (``m_t, v_t``)::

          mean = m_t + a * (base_mean - m_r),   var = base_var * a**2,   a**2 = v_t / v_r

      the statistics the population would have if the change of the input from the
      reference were affine per channel (exact for such changes; ``a = 1`` where
      ``v_r = 0``). The second run is measured.
    """

    training: bool = True
    settled: Mapping[str, Population] = field(default_factory=dict)
    rule: str = "exact"
    statistics: Statistics = field(default_factory=dict)
    base: Statistics = field(default_factory=dict)
    awaited: frozenset[str] = frozenset()
    """Layers a ``tolerance`` stop waits for until a forward reaches them, beside every
    layer under ``unreached="raise"`` (an eval-mode level: those an earlier one reached)."""
    miss_budget: float = MISS_PROBABILITY
    """The probability that some channel measured in this pass lies outside the
    ``tolerance`` that its stop allows: :data:`MISS_PROBABILITY`, or a share of it where
    several passes each stop on their own layers (``mode="eval_exact"``)."""
    correction: Callable[[str, MeanVar], MeanVar] | None = None
    """The ``"own"`` rule: ``correction(name, (mean, var))``, the map from a call's population
    to the statistics layer ``name`` normalizes with."""

    @classmethod
    def fixed(cls, statistics: Statistics) -> Level:
        """An eval-mode level in which every BN layer normalizes with ``statistics``."""
        return cls(training=False, rule="fixed", statistics=statistics)

    def all_awaited_reached(self, watched: Iterable[LayerPass], options: PassOptions) -> bool:
        """True when each watched layer the tolerance stop waits for has had a batch."""
        waits = options.unreached == "raise"
        return all(m.batches for m in watched if waits or m.name in self.awaited)

    def measures(self, name: str) -> bool:
        return name not in self.settled

    @property
    def least_values(self) -> int:
        """Values per channel a measured layer needs: 2 to normalize with the batch's
        statistics, 1 in eval mode."""
        return 2 if self.training else 1

    @property
    def label(self) -> str:
        if self.training:
            return "BN statistics"
        if self.rule == "exact":
            return f"eval mode, {len(self.settled)} layers settled"
        return f"eval mode ({self.rule})"


TRAIN = Level()


@contextmanager
def pass_mode(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    level: Level,
    kernel: set[str],
    own_forward: Collection[str] = (),
) -> Iterator[PreservedState]:
    """Everything one pass sets on ``model`` (unwrapped; ``layers`` its BN layers), undone on
    exit, also on error; autograd is off within.

    The ``own_forward`` layers run :func:`kernel_forward`, which writes none of their buffers
    (not recorded, nothing to put back). A training level: every BN layer in training mode,
    every other module in eval mode
    (:func:`bnstats.torch._layers.batchnorm_train_mode`); every SyncBatchNorm local
    (:func:`local_batch_statistics`); the ``kernel`` layers update with weight 1 from finite
    buffers (``0 * NaN`` would persist): torch's through ``momentum = 1``, bnstats' through
    their ``_pass_weight``; bnstats' other layers normalize each batch with its own
    statistics (ghost batches, renorm's ``r, d``) and leave their buffers alone
    (``_pass_weight = 0``): the pass measures them itself. An eval-mode level: every module
    in eval mode, the settled layers' buffers holding their populations. Modes, momenta,
    buffers, hooks and the ``_pass_weight`` switches come back through the
    :class:`PreservedState` this yields, also on Ctrl-C.
    """
    ours = [(name, m) for name, m in layers.items() if isinstance(m, EstimatorBatchNorm)]
    with ExitStack() as stack:
        state = stack.enter_context(
            PreservedState(model, layers, transient=("_pass_weight",), unwritten=own_forward)
        )
        stack.enter_context(torch.no_grad())
        if level.training:
            batchnorm_train_mode(model, layers)
            stack.enter_context(local_batch_statistics(model))
            for name in kernel:
                if not isinstance(layers[name], EstimatorBatchNorm):
                    layers[name].momentum = 1.0
                layers[name].running_mean.zero_()
                layers[name].running_var.fill_(1.0)
            for name, layer in ours:
                layer._pass_weight = 1.0 if name in kernel else 0.0
        else:
            model.eval()
            settled = {name: (p.mean, p.var) for name, p in level.settled.items()}
            normalize_with(layers, settled if level.rule == "exact" else level.statistics)
        yield state


def normalize_with(layers: Mapping[str, nn.Module], statistics: Statistics) -> None:
    """Write ``statistics`` into the running buffers of ``layers`` (those present)."""
    write_buffers(
        {
            layers[name]: {"running_mean": mean, "running_var": var}
            for name, (mean, var) in statistics.items()
            if name in layers and not is_lazy_uninitialized(layers[name])
        }
    )


@contextmanager
def local_batch_statistics(model: nn.Module) -> Iterator[None]:
    """Within the block, every ``nn.SyncBatchNorm`` (its subclasses too) normalizes with its
    local batch's statistics without any collective, its own forward still running.

    Under an initialized process group a SyncBatchNorm in training mode all-gathers each
    batch's statistics (and refuses CPU input); the pass must stay local. Such a layer is
    put in eval mode with its running buffers hidden: torch's forward then normalizes with
    the batch's statistics (``bn_training``) and syncs nothing; the forward pre-hook
    measures the batch. Flags and buffers are put back afterwards, also on error.
    """
    if not process_group_initialized():
        yield
        return
    layers = [m for m in model.modules() if isinstance(m, nn.SyncBatchNorm)]
    saved = [(m, m.training, m._buffers["running_mean"], m._buffers["running_var"]) for m in layers]
    try:
        for layer in layers:
            layer.training = False
            layer._buffers["running_mean"] = layer._buffers["running_var"] = None
        yield
    finally:
        for layer, training, mean, var in saved:
            layer.training = training
            layer._buffers["running_mean"], layer._buffers["running_var"] = mean, var
