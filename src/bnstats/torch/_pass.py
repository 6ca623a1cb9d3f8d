"""The pass of recalibrate, audit and adapt: every BN layer's exact population moments.

The model runs over the batches with its BN layers in training mode (each normalizes with
its batch's own ``mu`` and biased ``var``) and every other module in eval mode, autograd
off, each batch on the model's device. For each call of a BN layer, with ``count = numel / C``
values per channel, the batch's per-channel ``mean`` and ``m2 = var * count`` come from
torch's own kernels:

- a layer whose forward is torch's BN kernel call (see
  :func:`bnstats.torch.modules.kernel_writes_moments`) gets update weight 1 for the pass
  (:func:`bnstats.torch.modules.moments_from_kernel`), so the kernel that normalizes the
  batch also leaves the batch's mean and unbiased variance in its buffers; a forward
  pre-hook copies them at the layer's next call. No extra pass over the activations.
- any other layer (its own forward, half-precision buffers, ``float64_moments=True``): the
  pre-hook takes the moments with ``torch.batch_norm_update_stats`` (``torch.var_mean`` in
  float64 with ``float64_moments``).

Per layer the batches gather on the device and are merged, 64 at a time, into a
:class:`bnstats.Population` (Chan et al. 1979, in float64), with no host read: a batch with
NaN or Inf weighs nothing and is remembered by index; the pass reads the verdict once, at
the end. Across ``torch.distributed`` ranks each rank's Populations travel as one flat
float64 tensor (:meth:`Population.to_flat`) and every rank merges them in rank order, so all
ranks end with bit-identical numbers (:mod:`bnstats.torch._ranks` has the protocol).

The model is left exactly as found, also on error (:class:`PreservedState`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import nn

from bnstats._array import widen
from bnstats._precision import relative_error, spread_rows, standard_errors
from bnstats.stats import NonFiniteStatisticsError, Population
from bnstats.torch._layers import (
    Forward,
    PreservedState,
    batchnorm_train_mode,
    default_forward,
    display_name,
    fewer_than_two_values,
    find_batchnorm_layers,
    fixed_statistics_layers,
    is_lazy_uninitialized,
    iterate_batches,
    layer_label,
    model_device,
    move_to_device,
    pass_progress,
    process_group_initialized,
    uninitialized_lazy_error,
    unwrap,
    write_buffers,
)
from bnstats.torch._ranks import (
    Group,
    all_gather_float64,
    check_same_layers,
    layout_of,
    resolve_group,
    run_and_exchange,
)
from bnstats.torch.modules import frozen_for_pass, kernel_writes_moments, moments_from_kernel

_NARROW = (torch.float16, torch.bfloat16)
_GROUP = 64
"""Batches gathered per layer before they are merged into its Population."""
_HEADER = 3  # per layer in the flat exchange: batches, max calls per forward, first reached
CHECK_EVERY = 8
"""With ``tolerance``: batches between two checks of the standard errors (one host read each)."""
MIN_BATCHES = 16
"""With ``tolerance``: batches drawn before the first check (the spread needs a few)."""


@dataclass(frozen=True)
class PassOptions:
    """The keyword options every tool that makes a pass takes (recalibrate, audit, adapt).

    - ``forward(model, batch)``: how to call the model on one batch. Default: ``model(x)``
      for a tensor, ``model(batch[0])`` for a tuple or list, ``model(**batch)`` for a dict.
    - ``max_samples``: stop after this many samples (first dimension); the batch crossing
      the limit is cut, and no further batch is drawn. In a group: this rank's samples.
    - ``float64_moments``: each batch's moments in float64 (slower; for activations whose
      mean dwarfs their spread).
    - ``group``: the torch.distributed ranks whose batches together are the data (see
      :func:`bnstats.torch._ranks.resolve_group`).
    - ``nonfinite``: ``"raise"`` (a batch bringing NaN or Inf fails the pass, naming it) or
      ``"skip"`` (such a batch weighs nothing; the pass counts it).
    - ``unreached``: ``"raise"`` (a BN layer that no forward reached fails the pass) or
      ``"keep"`` (such layers, auxiliary heads for instance, keep their statistics and are
      listed).
    - ``mode``: ``"train"`` (each BN layer's input with every BN layer normalizing with its
      batch's statistics, one pass) or ``"eval"`` (each BN layer's input with every BN layer
      before it normalizing with its own final statistics, as at inference: one pass per
      depth level, see :func:`measure_eval_mode`).
    - ``tolerance``: stop drawing batches once every measured layer's relative standard
      error (:meth:`LayerPass.relative_error`) is below it, judged every
      ``CHECK_EVERY`` batches from ``MIN_BATCHES`` batches on. Not in a group.
    - ``progress``: a rich progress bar on stderr with the samples seen (and the worst
      relative standard error with ``tolerance``): ``None`` when stderr is a terminal,
      ``True`` always, ``False`` never (see :func:`bnstats.torch._layers.pass_progress`).
    """

    forward: Forward | None = None
    max_samples: int | None = None
    float64_moments: bool = False
    group: Group = None
    nonfinite: Literal["raise", "skip"] = "raise"
    unreached: Literal["raise", "keep"] = "raise"
    mode: Literal["train", "eval"] = "train"
    tolerance: float | None = None
    progress: bool | None = None

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
        choices = (
            ("nonfinite", ("raise", "skip")),
            ("unreached", ("raise", "keep")),
            ("mode", ("train", "eval")),
        )
        for key, allowed in choices:
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} must be one of {allowed}, got {getattr(self, key)!r}")
        tolerance = self.tolerance
        if tolerance is not None and (
            isinstance(tolerance, bool)
            or not isinstance(tolerance, numbers.Real)
            or not 0 < tolerance < math.inf
        ):
            raise ValueError(f"tolerance must be a positive number or None, got {tolerance!r}")

    def call(self) -> dict[str, Any]:
        """What the ranks must agree on (everything but the callable and the group)."""
        return {
            "max_samples": self.max_samples,
            "float64_moments": self.float64_moments,
            "nonfinite": self.nonfinite,
            "unreached": self.unreached,
            "mode": self.mode,
        }


@dataclass
class LayerPass:
    """One BN layer during a pass: its ``population`` of every value it received (float64),
    how many batch statistics were merged (``batches``: one per call), the most calls one
    forward made (``max_calls_per_forward``) and when the first forward reached it.

    For the precision of the estimate it also keeps ``spread``, a Population of per-batch
    values (3C of them), each batch ``k`` weighing its ``n_k`` values per channel::

        [mean_k,  u_k,  mean_k + u_k],    u_k = m2_k / n_k + (mean_k - center)**2

    ``u_k`` is batch k's mean of ``(z - center)**2``, ``center`` the layer's
    ``running_mean`` when the pass began (any fixed value would do; a close one keeps the
    sums well conditioned). Its ``m2`` holds ``S_mm = sum n_k (mean_k - mu)**2``, ``S_uu``
    and ``S_mm + S_uu + 2 S_um`` (:meth:`standard_errors` has the formulas).
    """

    name: str
    layer: nn.Module
    population: Population = field(default_factory=Population)
    spread: Population = field(default_factory=Population)
    center: torch.Tensor | None = field(default=None, repr=False)
    batches: int = 0
    max_calls_per_forward: int = 0
    first_reached: int | None = None
    calls_this_forward: int = field(default=0, repr=False)
    _pending: list[tuple[int, int, torch.Tensor]] = field(default_factory=list, repr=False)
    _awaiting: tuple[int, int] | None = field(default=None, repr=False)
    _verdict: torch.Tensor | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return layer_label(self.name)

    def add_batch(self, index: int, count: int, mean_m2: torch.Tensor) -> None:
        """Gather batch ``index``: ``count`` values per channel, its per-channel ``mean`` and
        ``m2`` stacked (2, C). Merged into :attr:`population` by :meth:`flush`."""
        self._pending.append((index, count, mean_m2))
        self.batches += 1
        if len(self._pending) >= _GROUP:
            self.flush()

    def flush(self) -> None:
        """Merge the gathered batches at once; a batch with NaN or Inf weighs nothing, and the
        verdict ``[first bad batch index or inf, batches skipped]`` stays on the device."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        stacked = widen(torch.stack([part for _, _, part in pending]))  # (batches, 2, C)
        finite = torch.isfinite(stacked).flatten(1).all(dim=1)
        counts = _on_device([count for _, count, _ in pending], stacked) * finite
        indices = _on_device([index for index, _, _ in pending], stacked)
        clean = torch.where(finite[:, None, None], stacked, torch.zeros_like(stacked))
        self.population.update_batches(counts, clean[:, 0], clean[:, 1])
        self._add_spread(counts, clean[:, 0], clean[:, 1])
        verdict = torch.stack(
            (torch.where(finite, math.inf, indices).min(), (~finite).sum(dtype=stacked.dtype))
        )
        if self._verdict is None:
            self._verdict = verdict
        else:
            self._verdict = torch.stack(
                (torch.minimum(self._verdict[0], verdict[0]), self._verdict[1] + verdict[1])
            )

    def _add_spread(self, counts: torch.Tensor, means: torch.Tensor, m2s: torch.Tensor) -> None:
        """Merge the batches' ``[mean_k, u_k, mean_k + u_k]`` into :attr:`spread`."""
        center = 0.0 if self.center is None else self.center.to(means)
        values = spread_rows(counts, means, m2s, center)
        self.spread.update_batches(counts, values, torch.zeros_like(values))

    def standard_errors(self, finite_batches: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per channel, the standard errors of the population ``mean`` and unbiased ``var``
        from the spread between the ``finite_batches`` batches
        (:func:`bnstats._precision.standard_errors` has the formulas); infinite with fewer
        than 2 batches."""
        population = self.population
        center = 0.0
        if self.center is not None and population.mean is not None:
            center = self.center.to(population.mean)
        errors = standard_errors(population, self.spread, center, finite_batches)
        if errors is None:
            device = None if population.mean is None else population.mean.device
            channels = int(self.layer.num_features)
            infinite = torch.full((channels,), math.inf, dtype=torch.float64, device=device)
            return infinite, infinite
        return errors

    def relative_error(self, finite_batches: int) -> torch.Tensor:
        """The worst channel's relative standard error, on the device
        (:func:`bnstats._precision.relative_error`)."""
        return relative_error(self.population, *self.standard_errors(finite_batches))

    def take_kernel_moments(self) -> None:
        """Gather the mean and unbiased variance the kernel wrote at the layer's last call."""
        (index, count), self._awaiting = self._awaiting, None
        layer = self.layer
        mean_m2 = torch.stack((layer.running_mean, layer.running_var * (count - 1)))
        self.add_batch(index, count, mean_m2)


def _on_device(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """``values`` as a float64 tensor on ``like``'s device without making the host wait: on
    a GPU through pinned memory and an asynchronous copy (a plain copy would synchronize)."""
    host = torch.tensor(values, dtype=like.dtype)
    if like.device.type == "cpu":
        return host
    return host.pin_memory().to(like.device, non_blocking=True)


@dataclass
class Measured:
    """What a pass measured: every BN layer's :class:`LayerPass` by qualified name, the sizes
    of the batches used, the layers no forward reached (kept as they were under
    ``unreached="keep"``), the layers with fixed statistics (found and left alone), and the
    batches skipped for NaN or Inf per layer (``nonfinite="skip"``)."""

    layers: dict[str, LayerPass]
    batch_sizes: list[int | None]
    unreached: list[str] = field(default_factory=list)
    fixed: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    first_bad: tuple[str, int] | None = None
    passes: int = 1

    def finite_batches(self, moments: LayerPass) -> int:
        """Batches of ``moments`` that entered its population (none with NaN or Inf)."""
        return moments.batches - self.skipped.get(moments.name, 0)

    def reached(self) -> list[LayerPass]:
        """The layers some forward reached, in the order the first forward reached them."""
        reached = [m for m in self.layers.values() if m.name not in self.unreached]
        return sorted(reached, key=lambda m: m.first_reached or 0)

    def population(self, moments: LayerPass) -> Population:
        """``moments.population``, with :class:`NonFiniteStatisticsError` naming the layer if
        its statistics are NaN or Inf (a finite batch too large for float64, say)."""
        population = moments.population
        if not bool(torch.isfinite(population.m2).all() & torch.isfinite(population.mean).all()):
            raise NonFiniteStatisticsError(
                f"{moments.label}: the population statistics are NaN or Inf after "
                f"{moments.batches} batches; nothing was written"
            )
        return population


# -- the pass on this process -----------------------------------------------------------------


def batch_moments(x: torch.Tensor, float64: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``mean`` and BIASED ``var`` of ``x`` (N, C, ...) over all axes but 1, widened.

    ``torch.batch_norm_update_stats`` (the kernel training BN uses; float16 and bfloat16 off
    CUDA are upcast to float32 first, as the CPU kernel would return half-precision moments);
    ``float64=True``: ``torch.var_mean`` of ``x`` in float64.
    """
    if float64:
        axes = (0, *range(2, x.dim()))
        var, mean = torch.var_mean(widen(x), dim=axes, correction=0)
        return mean, var
    if x.dtype in _NARROW and x.device.type != "cuda":
        x = x.float()
    mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
    return widen(mean), widen(var)


def check_layer_input(moments: LayerPass, x: Any, least: int = 2) -> int:
    """Values per channel in ``x``; ``TypeError``/``ValueError`` naming the layer if unusable
    (fewer than ``least`` values per channel: 2 where the layer normalizes with the batch's
    statistics, 1 in an eval-mode pass)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{moments.label} was called on a {type(x).__name__}, not a tensor")
    shape, features = tuple(x.shape), moments.layer.num_features
    if len(shape) < 2 or shape[1] != features:
        raise ValueError(
            f"{moments.label}: expected input of shape (N, {features}, ...), got {shape}"
        )
    count = x.numel() // shape[1]
    if count < least:
        raise ValueError(
            fewer_than_two_values(moments.label, shape)
            + " (drop batches of one sample, choose max_samples so that the last batch "
            "keeps 2 or more, or pass mode='eval', which needs no batch statistics)"
        )
    return count


class _Recorder:
    """The forward pre-hooks of one pass: per call, gather what the kernel wrote at the
    layer's previous call (one hook per layer, not two), check the input, then leave this
    call's moments to the kernel or take them here."""

    def __init__(
        self, state: PreservedState, kernel: set[str], options: PassOptions, least: int
    ) -> None:
        self.state, self.kernel, self.options, self.least = state, kernel, options, least
        self.batch_index = 0
        self.reached = 0

    def hook(self, moments: LayerPass) -> Callable[..., None]:
        def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if moments._awaiting is not None:
                moments.take_kernel_moments()
                if self.options.nonfinite == "skip":  # 0 * NaN would persist into the next
                    module.running_mean.nan_to_num_(0.0, 0.0, 0.0)
                    module.running_var.nan_to_num_(1.0, 1.0, 1.0)
            self.state.record_buffers(moments.name)  # a LazyBatchNorm is initialized by now
            x = args[0] if args else kwargs.get("input")
            count = check_layer_input(moments, x, self.least)
            if moments.center is None:
                moments.center = widen(module.running_mean.detach()).clone()
            if moments.name in self.kernel and x.dtype == module.running_var.dtype:
                moments._awaiting = (self.batch_index, count)
            else:
                mean, var = batch_moments(x.detach(), self.options.float64_moments)
                moments.add_batch(self.batch_index, count, torch.stack((mean, var * count)))
            moments.calls_this_forward += 1
            if moments.first_reached is None:
                self.reached += 1
                moments.first_reached = self.reached

        return pre_hook


def _unsettled_output(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    """An eval-mode pass: the output of a layer whose statistics are not final yet is NaN,
    so that every layer computed from it sees NaN and waits for a later level."""
    return torch.full_like(output, math.nan) if isinstance(output, torch.Tensor) else output


def collect_moments(
    model: nn.Module,
    batches: Any,
    options: PassOptions,
    *,
    check_coverage: bool = True,
    final: Mapping[str, Population] | None = None,
) -> Measured:
    """One pass of ``model`` (unwrapped) over ``batches``: every BN layer's population moments.

    With ``final`` (an eval-mode level, see :func:`measure_eval_mode`) every module is in
    eval mode, the layers named in ``final`` normalize with those populations' mean and
    unbiased variance, and every other BN layer is measured and outputs NaN.

    Raises ``ValueError`` if ``batches`` is empty or (``unreached="raise"``) a BN layer was
    never reached, and :class:`NonFiniteStatisticsError` naming the layer and the batch if a
    batch brought NaN or Inf (``nonfinite="raise"``), unless ``check_coverage=False`` (across
    ranks these are judged on all ranks' passes together).
    """
    layers = find_batchnorm_layers(model)
    forward = options.forward or default_forward
    moments = {name: LayerPass(name, layer) for name, layer in layers.items()}
    measured_names = [name for name in layers if final is None or name not in final]
    sizes: list[int | None] = []
    kernel = (
        set()
        if options.float64_moments or final is not None
        else {n for n, m in layers.items() if kernel_writes_moments(m)}
    )
    with ExitStack() as stack:
        state = stack.enter_context(PreservedState(model, layers))
        stack.enter_context(torch.no_grad())
        for name, layer in layers.items():
            if not is_lazy_uninitialized(layer):
                moments[name].center = widen(layer.running_mean.detach()).clone()
        if final is None:
            batchnorm_train_mode(model, layers)
            stack.enter_context(local_batch_statistics(model))
            stack.enter_context(moments_from_kernel([layers[name] for name in kernel]))
            stack.enter_context(frozen_for_pass(m for n, m in layers.items() if n not in kernel))
        else:
            model.eval()
            write_buffers(
                {
                    layers[n]: {"running_mean": p.mean, "running_var": p.var}
                    for n, p in final.items()
                }
            )
        recorder = _Recorder(state, kernel, options, least=2 if final is None else 1)
        for name in measured_names:
            layer = layers[name]
            hook = recorder.hook(moments[name])
            state.add_hook(layer.register_forward_pre_hook(hook, with_kwargs=True))
            if final is not None:
                state.add_hook(layer.register_forward_hook(_unsettled_output))
        device = model_device(model)
        label = "BN statistics" if final is None else f"eval mode, {len(final)} layers settled"
        advance = stack.enter_context(pass_progress(options.progress, label))
        worst, samples = math.inf, 0
        for batch, size in iterate_batches(batches, options.max_samples):
            for layer_moments in moments.values():
                layer_moments.calls_this_forward = 0
            forward(model, move_to_device(batch, device))
            sizes.append(size)
            recorder.batch_index += 1
            for layer_moments in moments.values():
                layer_moments.max_calls_per_forward = max(
                    layer_moments.max_calls_per_forward, layer_moments.calls_this_forward
                )
            samples += size or 0
            if _time_to_check(options.tolerance, len(sizes)):
                worst = worst_relative_error(moments.values())[0]
            advance(samples, worst)
            if options.tolerance is not None and worst < options.tolerance:
                break
        for layer_moments in moments.values():
            if layer_moments._awaiting is not None:
                layer_moments.take_kernel_moments()
            layer_moments.flush()
    measured = Measured(moments, sizes, fixed=list(fixed_statistics_layers(model)))
    _read_verdicts(measured)
    if check_coverage:
        _raise_if_bad(measured.first_bad, options)
        _check_coverage(measured, options, world_size=1)
    return measured


def _time_to_check(tolerance: float | None, batches: int) -> bool:
    """With ``tolerance``, every ``CHECK_EVERY`` batches from ``MIN_BATCHES`` on: time to
    read the worst relative standard error (two host reads per check, none between)."""
    return tolerance is not None and batches >= MIN_BATCHES and not batches % CHECK_EVERY


def worst_relative_error(layers: Iterable[LayerPass]) -> tuple[float, str | None]:
    """The largest :meth:`LayerPass.relative_error` over the layers that received a finite
    batch, and that layer's name (``(inf, None)`` if there is none)."""
    live = []
    for moments in layers:
        moments.flush()
        if moments._verdict is not None:
            live.append(moments)
    if not live:
        return math.inf, None
    skipped = torch.stack([m._verdict[1] for m in live]).cpu().tolist()
    judged = [(m, m.batches - int(s)) for m, s in zip(live, skipped, strict=True)]
    judged = [(m, finite) for m, finite in judged if finite > 0]
    if not judged:
        return math.inf, None
    on_device = [m.relative_error(finite) for m, finite in judged]
    errors = torch.stack([e.to(on_device[0].device) for e in on_device]).cpu().tolist()
    worst = max(range(len(errors)), key=lambda i: errors[i])
    return float(errors[worst]), judged[worst][0].name


def _read_verdicts(measured: Measured) -> None:
    """The one host read of the pass: per layer, the first batch with NaN or Inf and how many
    batches were left out for it (into ``measured.first_bad`` and ``measured.skipped``)."""
    judged = [m for m in measured.layers.values() if m._verdict is not None]
    if not judged:
        return
    verdicts = torch.stack([m._verdict for m in judged]).cpu().tolist()
    bad = [
        (index, m.first_reached or 0, m.name)
        for m, (index, _) in zip(judged, verdicts, strict=True)
    ]
    index, _, name = min(bad)
    if math.isfinite(index):
        measured.first_bad = (name, int(index))
    measured.skipped = {
        m.name: int(skipped) for m, (_, skipped) in zip(judged, verdicts, strict=True) if skipped
    }


def _raise_if_bad(first_bad: tuple[str, int] | None, options: PassOptions, where: str = "") -> None:
    """Under ``nonfinite="raise"``, fail the pass at the first batch that brought NaN or Inf."""
    if first_bad is None or options.nonfinite != "raise":
        return
    name, index = first_bad
    raise NonFiniteStatisticsError(
        f"{layer_label(name)}: batch {index} (counting from 0){where} brought NaN or Inf "
        "statistics; nothing was written. Pass nonfinite='skip' to leave such batches out"
    )


def _check_coverage(measured: Measured, options: PassOptions, world_size: int) -> None:
    """No batch at all, or (``unreached="raise"``) a layer no forward reached, fails the pass;
    under ``unreached="keep"`` those layers are listed in ``measured.unreached``."""
    where = "" if world_size == 1 else f" on any of the {world_size} ranks"
    if not measured.batch_sizes:
        raise ValueError(
            f"batches yielded no batch{where}; there is nothing to measure statistics on"
        )
    measured.unreached = [name for name, m in measured.layers.items() if m.batches == 0]
    if measured.unreached and options.unreached == "raise":
        names = ", ".join(display_name(name) for name in measured.unreached)
        raise ValueError(
            f"no forward{where} reached BN layer(s) {names} in {len(measured.batch_sizes)} "
            "batches, so their statistics cannot be measured; nothing was written. If a layer "
            "is used only in training mode (an auxiliary head), pass forward=... that calls it, or "
            "unreached='keep' to leave such layers as they are"
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


# -- across ranks -------------------------------------------------------------------------


Check = Callable[[nn.Module], None]
"""``check(model)``: validation run before the pass, on every rank inside the protocol."""


def measure(
    model: nn.Module, batches: Any, options: PassOptions, *, tool: str, check: Check | None = None
) -> Measured:
    """Every BN layer's population moments over all ranks' ``batches``.

    ``mode="train"``: one pass (:func:`measure_pass`); ``mode="eval"``: one pass per depth
    level (:func:`measure_eval_mode`).
    """
    if options.mode == "eval":
        return measure_eval_mode(model, batches, options, tool=tool, check=check)
    return measure_pass(model, batches, options, tool=tool, check=check)


def measure_pass(
    model: nn.Module,
    batches: Any,
    options: PassOptions,
    *,
    tool: str,
    check: Check | None = None,
    final: Mapping[str, Population] | None = None,
) -> Measured:
    """One pass: every BN layer's population moments over all ranks' ``batches``.

    Without a group (see :func:`resolve_group`) this is :func:`collect_moments` on the
    unwrapped model. In a group each rank runs the pass on its batches; one status exchange
    (which also checks that every rank runs the same ``tool`` with the same options); one
    ``all_gather`` of every layer's flat Populations; every rank merges them in rank order
    with :meth:`Population.merge`: the numbers of one process over all ranks' batches, rank
    0's first, bit-identical on every rank. ``check(model)`` runs first on every rank.
    ``final``: an eval-mode level (see :func:`collect_moments`).
    """
    chosen = resolve_group(options.group)
    inner = unwrap(model)
    if chosen is None:
        if check is not None:
            check(inner)
        return collect_moments(inner, batches, options, final=final)
    if options.tolerance is not None:
        raise ValueError(
            "tolerance cannot be used across torch.distributed ranks (they would have to "
            "agree on when to stop); pass max_samples, or group=False"
        )

    def local() -> tuple[Measured, dict[str, Any]]:
        if check is not None:
            check(inner)
        measured = collect_moments(inner, batches, options, check_coverage=False, final=final)
        _require_initialized(measured)
        layers = {name: m.layer for name, m in measured.layers.items()}
        summary = {
            "layers": layout_of(layers),
            "sizes": measured.batch_sizes,
            "first_bad": measured.first_bad,
            "skipped": measured.skipped,
        }
        return measured, summary

    call = {"tool": tool, **options.call()}
    measured, summaries = run_and_exchange(chosen, local, call)
    check_same_layers(chosen, [summary["layers"] for summary in summaries])
    for rank, summary in enumerate(summaries):  # the same verdict on every rank
        _raise_if_bad(summary["first_bad"], options, where=f" on rank {rank}")
    skipped: dict[str, int] = {}
    for summary in summaries:
        for name, count in summary["skipped"].items():
            skipped[name] = skipped.get(name, 0) + count
    gathered = all_gather_float64(chosen, _pack(measured))
    merged = Measured(
        _merge(measured, gathered),
        [size for summary in summaries for size in summary["sizes"]],
        fixed=measured.fixed,
        skipped=skipped,
    )
    _check_coverage(merged, options, world_size=len(gathered))
    return merged


# -- eval mode: one pass per depth level --------------------------------------------------


def measure_eval_mode(
    model: nn.Module, batches: Any, options: PassOptions, *, tool: str, check: Check | None = None
) -> Measured:
    """Every BN layer's population moments with every BN layer before it normalizing with
    its own final statistics: the fixed point of eval-mode inference.

    Level by level: each pass (:func:`measure_pass` with ``final``) runs the model in eval
    mode; the layers already settled normalize with their population ``mean`` and unbiased
    ``var``, every other BN layer is measured and outputs NaN. A layer whose input was finite
    in every batch depends on settled layers only: its measurement is exact and it settles.
    A layer that saw NaN in every batch is computed from an unsettled one and waits for the
    next level. So the cost is one pass over ``batches`` per depth level of the BN layers
    (the longest chain of BN layers one after another; layers side by side, a residual
    block's shortcut BN beside its branch, settle in the same pass), never more than the
    number of BN layers. ``batches`` must be iterable again at each level (a list, a
    DataLoader). Any batch size works, one included: eval mode needs no batch statistics.

    A layer with NaN or Inf in some batches but not all received it from the data: it fails
    the pass (``nonfinite="raise"``) or settles without those batches (``"skip"``). The data
    flow is what is tracked: a layer is taken as independent of an unsettled one when no NaN
    from it arrives (an input chosen by ``argmax`` of one, say, is not seen as dependent).
    In a group every rank makes the same levels: the decisions use the merged counts.
    """
    if iter(batches) is batches:
        raise TypeError(
            "mode='eval' passes over batches once per depth level and needs an iterable it "
            "can go over again (a list, a DataLoader), not a one-shot iterator or generator"
        )
    level_options = replace(options, nonfinite="skip", unreached="keep", mode="train")
    settled: dict[str, LayerPass] = {}
    skipped: dict[str, int] = {}
    first: Measured | None = None
    sizes: list[int | None] = []
    passes = 0
    while True:
        final = {name: moments.population for name, moments in settled.items()}
        measured = measure_pass(model, batches, level_options, tool=tool, check=check, final=final)
        passes += 1
        sizes = max(sizes, measured.batch_sizes, key=len)
        if first is None:
            first = measured
            _check_coverage(first, options, world_size=1)
        pending = [
            m
            for name, m in measured.layers.items()
            if name not in settled and name not in first.unreached
        ]
        if not pending:
            break
        ready = _settle_level(pending, measured, options, skipped)
        for moments in ready:
            moments.first_reached = first.layers[moments.name].first_reached
            settled[moments.name] = moments
        if len(ready) == len(pending):
            break
    layers = {name: settled.get(name, moments) for name, moments in first.layers.items()}
    return Measured(
        layers,
        sizes,
        unreached=first.unreached,
        fixed=first.fixed,
        skipped=skipped,
        passes=passes,
    )


def _settle_level(
    pending: list[LayerPass], measured: Measured, options: PassOptions, skipped: dict[str, int]
) -> list[LayerPass]:
    """The layers of this level: those whose input was finite in some batch (NaN in every
    batch: computed from an unsettled layer). A layer with NaN in some batches only got it
    from the data: ``nonfinite="raise"`` fails, ``"skip"`` counts them into ``skipped``."""
    ready = []
    for moments in pending:
        bad = measured.skipped.get(moments.name, 0)
        if bad >= moments.batches:
            continue
        if bad and moments.max_calls_per_forward > 1:
            raise ValueError(
                f"mode='eval': {moments.label} is called {moments.max_calls_per_forward} times "
                "per forward and some calls received NaN: one call's input comes from another "
                "call's output (no eval-mode order for it), or the data holds NaN; nothing "
                "was written"
            )
        if bad and options.nonfinite == "raise":
            raise NonFiniteStatisticsError(
                f"{moments.label}: {bad} of {moments.batches} batches brought NaN or Inf "
                "statistics in eval mode; nothing was written. Pass nonfinite='skip' to leave "
                "such batches out"
            )
        if bad:
            skipped[moments.name] = bad
        ready.append(moments)
    if not ready:
        names = ", ".join(display_name(m.name) for m in pending)
        raise ValueError(
            f"mode='eval': BN layer(s) {names} received NaN or Inf in every batch even with "
            "every layer before them settled: NaN in the data, or a layer computed from its "
            "own output (called more than once per forward); nothing was written"
        )
    return ready


def _require_initialized(measured: Measured) -> None:
    for name, moments in measured.layers.items():
        if is_lazy_uninitialized(moments.layer):
            raise ValueError(
                uninitialized_lazy_error(name, moments.layer)
                + "; no batch on this rank reached it, so it has no shape to receive the merged "
                "statistics: run one forward on every rank first"
            )


def _pack(measured: Measured) -> torch.Tensor:
    """One flat float64 tensor: per layer ``[batches, calls, first, population flat, spread
    flat]`` (the spread of the batch statistics, :class:`LayerPass`, has 3C channels)."""
    parts = []
    for moments in measured.layers.values():
        header = [moments.batches, moments.max_calls_per_forward, moments.first_reached or 0]
        channels = int(moments.layer.num_features)
        flats = (moments.population.to_flat(channels), moments.spread.to_flat(3 * channels))
        parts += [torch.tensor(header, dtype=torch.float64)]
        parts += [torch.as_tensor(flat).double().cpu() for flat in flats]
    return torch.cat(parts)


def _merge(measured: Measured, gathered: list[torch.Tensor]) -> dict[str, LayerPass]:
    """Each layer's Population merged over the ranks in rank order (Chan et al. 1979)."""
    merged = {}
    offset = 0
    ranks_order = len(measured.layers) + 1  # first_reached: by first rank, then its order
    for name, local in measured.layers.items():
        channels = int(local.layer.num_features)
        middle = offset + _HEADER + 2 + 2 * channels
        size = _HEADER + 2 + 2 * channels + 2 + 6 * channels
        result = LayerPass(name, local.layer, center=local.center)
        for rank, flat in enumerate(gathered):
            batches, calls, first = (int(v) for v in flat[offset : offset + _HEADER])
            part = Population.from_flat(flat[offset + _HEADER : middle])
            spread = Population.from_flat(flat[middle : offset + size])
            if part.mean is not None:
                result.population = result.population.merge(part)
                result.spread = result.spread.merge(spread)
                if result.first_reached is None:
                    result.first_reached = rank * ranks_order + first
            result.batches += batches
            result.max_calls_per_forward = max(result.max_calls_per_forward, calls)
        merged[name] = result
        offset += size
    return merged
