"""What every bnstats.torch tool needs: find the BN layers, feed the model, leave it as found.

- Which modules are BN layers and what wraps a model are asked of the registry,
  :mod:`bnstats.torch.kinds` (:func:`is_batchnorm`, :func:`has_fixed_statistics` and
  :func:`unwrap` are re-exported here for the tools).
- :func:`find_batchnorm_layers`: every batch-norm layer that keeps running statistics, by
  qualified name (``"stages.0.0.bn1"``), in the order ``model.named_modules()`` lists them.
- :func:`layer_label`: how every message names a layer.
- How a batch reaches the model (tensors, ``(input, target)`` tuples or lists, dicts) is
  :mod:`bnstats.torch._batches`; the progress bar of long passes,
  :func:`bnstats._progress.pass_progress`.
- :class:`PreservedState`: a context manager that puts back, whatever happens, the training
  flag of every module, the ``momentum`` of every BN layer, the BN layers' running buffers
  (``running_mean``, ``running_var``, ``num_batches_tracked``) and removes the hooks it was
  given.
- :func:`cast_buffer`, :func:`write_buffers`: new statistics checked, then written at once,
  all or nothing (:func:`interrupts_deferred` holds Ctrl-C back while they are copied).
- the wording of the errors several tools share (:func:`fewer_than_two_values`,
  :func:`uninitialized_lazy_error`).
"""

from __future__ import annotations

import itertools
import signal
import threading
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from bnstats.torch.kinds import has_fixed_statistics as has_fixed_statistics
from bnstats.torch.kinds import is_batchnorm as is_batchnorm
from bnstats.torch.kinds import keeps_running_statistics
from bnstats.torch.kinds import unwrap as unwrap

_BUFFER_NAMES = ("running_mean", "running_var", "num_batches_tracked")
_LAYER_ATTRIBUTES = ("num_features", "eps", "running_var", "momentum")


def process_group_initialized() -> bool:
    """True under an initialized ``torch.distributed`` process group, where a SyncBatchNorm in
    training mode would synchronise its batch statistics with the other ranks."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def layer_label(name: str, layer: nn.Module | None = None) -> str:
    """How the tools' messages name a BN layer: by its path, ``BN layer 'stem.bn'``, and
    with ``layer`` its kind too, ``BN layer 'stem.bn' (BatchNorm2d(32))``."""
    if layer is None:
        return f"BN layer {display_name(name)}"
    features = getattr(layer, "num_features", None)
    size = "" if features is None else f"({features})"
    return f"BN layer {display_name(name)} ({type(layer).__name__}{size})"


def is_lazy_uninitialized(module: nn.Module) -> bool:
    """True for a ``LazyBatchNorm*`` whose shapes no forward has fixed yet."""
    return isinstance(module, nn.modules.lazy.LazyModuleMixin) and bool(
        module.has_uninitialized_params()
    )


def find_batchnorm_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every BN layer with running statistics, by qualified name.

    The BN layers of the registry (:func:`bnstats.torch.kinds.is_batchnorm`: torch's
    ``_BatchNorm`` family, bnstats' modules, timm's, registered classes); layers built with
    ``track_running_stats=False`` keep no statistics and are left out. A module registered
    under two names appears once, under the first. The model itself is named ``""``.

    Raises ``TypeError`` if ``model`` is not an ``nn.Module`` and ``ValueError`` if it holds no
    such layer, or a registered layer lacks an attribute the tools read.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = {
        name: module for name, module in model.named_modules() if keeps_running_statistics(module)
    }
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no batch-norm layer with running statistics "
            "(nn.BatchNorm1d/2d/3d, nn.SyncBatchNorm, nn.LazyBatchNorm*, bnstats.torch's "
            "BatchNorm1d/2d/3d with track_running_stats=True, or a class given to "
            "bnstats.torch.register_batchnorm)"
        )
    for name, layer in layers.items():
        missing = [key for key in _LAYER_ATTRIBUTES if not hasattr(layer, key)]
        if missing:
            raise ValueError(
                f"{layer_label(name)} ({type(layer).__name__}) is registered as a BN layer but "
                f"has no {', '.join(missing)}; bnstats' tools read them"
            )
    return layers


def fixed_statistics_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every layer with fixed statistics (:func:`has_fixed_statistics`), by qualified name."""
    return {name: m for name, m in model.named_modules() if has_fixed_statistics(m)}


def fewer_than_two_values(label: str, shape: tuple[int, ...], when: str = "") -> str:
    """The one wording of "batch statistics need two values per channel"."""
    return (
        f"{label}: input of shape {shape}{when} has fewer than 2 values per channel; batch "
        "statistics need at least 2"
    )


def uninitialized_lazy_error(name: str, layer: nn.Module) -> str:
    """The one wording of "this LazyBatchNorm has no shape yet"."""
    return (
        f"{layer_label(name)} is an uninitialized {type(layer).__name__}: it has no running "
        "statistics yet (run one forward first)"
    )


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """True when every value of the 1-D ``tensors`` is finite: one host read per device."""
    per_device: dict[torch.device, list[torch.Tensor]] = {}
    for tensor in tensors:
        per_device.setdefault(tensor.device, []).append(tensor)
    flags = [torch.isfinite(torch.cat(parts)).all() for parts in per_device.values()]
    return all(bool(flag) for flag in flags)


def cast_buffer(name: str, key: str, value: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """``value`` in the dtype and on the device of ``layer``'s buffer ``key``; ``ValueError``
    naming the layer if it overflows that dtype. Called once per layer after a pass."""
    buffer = getattr(layer, key)
    cast = value.to(dtype=buffer.dtype, device=buffer.device)
    if not bool(torch.isfinite(cast).all()):
        raise ValueError(
            f"{layer_label(name)}: {key} overflows the buffer's dtype {buffer.dtype} "
            f"(largest value {float(value.abs().max()):.6g}); nothing was written"
        )
    return cast


class SigintGuard:
    """Ctrl-C (SIGINT) around steps that must not stop half-way.

    Once :meth:`arm`-ed, a Ctrl-C that would stop the program (Python's default handler:
    a ``KeyboardInterrupt``) first runs ``undo``, putting back what the steps so far
    changed; a program's own handler is called as it is (it may only set a flag); after
    :meth:`hold` (a plain attribute store, so no signal can land between it and the steps
    that follow) it is only noted, and :meth:`release` delivers it once the steps are done.
    Outside the main thread (where Python delivers no signal) this does nothing.
    """

    def __init__(self, undo: Callable[[], object] | None = None) -> None:
        self.undo = undo
        self.holding = False
        self.held = False
        self._previous: Any = None
        self._armed = False

    def arm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except (ValueError, TypeError):  # an embedded interpreter without signal support
            return
        self._armed = self._previous is not None

    def hold(self) -> None:
        self.holding = True

    def release(self) -> None:
        """Put the previous handler back, and deliver a Ctrl-C noted meanwhile."""
        self._disarm()
        if self.held:
            self.held = False
            signal.raise_signal(signal.SIGINT)

    def _disarm(self) -> Any:
        previous, self._previous = self._previous, None
        if self._armed and signal.getsignal(signal.SIGINT) == self._handle:
            signal.signal(signal.SIGINT, previous)
        self._armed = False
        return previous

    def _handle(self, signum: int, frame: Any) -> None:
        if self.holding:
            self.held = True
            return
        previous = self._previous
        if previous == signal.SIG_IGN:
            return
        if callable(previous) and previous is not signal.default_int_handler:
            previous(signum, frame)  # the program's own handler decides (it may not stop)
            return
        try:  # a KeyboardInterrupt (or the end of the process) follows: undo first
            if self.undo is not None:
                self.undo()
        finally:
            self._disarm()
            if previous is signal.default_int_handler:
                previous(signum, frame)
            else:
                signal.raise_signal(signum)


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Within the block a Ctrl-C is held back, and delivered as soon as it ends
    (:class:`SigintGuard`): for the few steps that must not stop half-way (writing new
    statistics into every layer, putting a model back as it was)."""
    guard = SigintGuard()
    guard.hold()
    guard.arm()
    try:
        yield
    finally:
        guard.release()


def write_buffers(updates: Mapping[nn.Module, Mapping[str, torch.Tensor]]) -> None:
    """Copy the new values into the layers' buffers, in place, all or nothing; a
    ``num_batches_tracked`` of None (torch allows it) stays None. bnstats' layers re-read
    their step counter.

    With Ctrl-C held back (:func:`interrupts_deferred`) and autograd off, every value is
    first made ready in its buffer's dtype and device, beside a copy of the buffer; then the
    copies run back to back, and if one raises, every buffer gets its old value back.
    """
    with interrupts_deferred(), torch.no_grad():  # one block: no line between them to stop at
        planned = [
            (layer, buffer, value.to(dtype=buffer.dtype, device=buffer.device))
            for layer, values in updates.items()
            for key, value in values.items()
            if (buffer := getattr(layer, key, None)) is not None
        ]
        saved = [buffer.clone() for _, buffer, _ in planned]
        try:
            for _, buffer, value in planned:
                buffer.copy_(value)
            for layer in updates:
                _sync_counters(layer)
        except BaseException:
            for (_, buffer, _), old in zip(planned, saved, strict=True):
                buffer.copy_(old)
            for layer in updates:
                _sync_counters(layer)
            raise


def _sync_counters(layer: nn.Module) -> None:
    """bnstats' BN modules keep ``num_batches_tracked`` on the host too (for the debiased
    EMA's and the cumulative average's weight): tell them when the buffer was written."""
    sync = getattr(layer, "sync_counters", None)
    if callable(sync):
        sync()


def on_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host numbers (a list, or a list of equal lists) as a ``dtype`` tensor on ``device``
    without making the host wait: on a GPU through pinned memory and an asynchronous copy (a
    plain copy would synchronize)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def display_name(name: str) -> str:
    """A qualified module name as error messages show it (the model itself is ``<model>``)."""
    return repr(name) if name else "<model>"


def registered_children(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every ``(name, child)`` registered in ``module``, a child held under two names (an
    alias, ``self.norm = self.bn``) once per name: ``named_children()`` lists it once."""
    for name, child in module._modules.items():
        if child is not None:
            yield name, child


def model_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter or buffer (None for a model without any)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if not isinstance(tensor, nn.parameter.UninitializedTensorMixin):
            return tensor.device
    return None


def batchnorm_train_mode(model: nn.Module, layers: Mapping[str, nn.Module]) -> None:
    """Every module in eval mode except the BN ``layers``, whose own flag goes to training.

    The BN layers then normalize with each batch's own statistics (as in training, as
    ``update_bn`` and fvcore's precise BN do); dropout and every other module behave as at
    test time, children of a BN layer included (timm's ``BatchNormAct2d`` with a DropBlock
    ``drop_layer``), so the statistics describe the activations the model will see at test
    time.
    """
    model.eval()
    for module in layers.values():
        module.training = True


class PreservedState:
    """Put back what a pass over the model changes, on success, on error and on Ctrl-C.

    On entry it records the training flag of every module, the ``momentum`` of every BN
    layer, the running buffers of the initialized BN layers (their values and the tensor
    objects) and whether autograd is on; on exit it removes the hooks handed to
    :meth:`add_hook`, removes the ``transient`` instance attributes set on the layers,
    leaves the buffers of the ``unwritten`` layers (which the caller does not write) alone,
    and restores the rest, copying the recorded buffer values back in place (BN layers in
    training mode update their buffers at every forward). A ``LazyBatchNorm*`` that the
    pass initialized is recorded by :meth:`record_buffers` just before its first forward
    and restored to those fresh values (zeros, ones, 0): its shapes stay inferred, as after
    any forward.

    A Ctrl-C while it is entered puts everything back at once, before the
    ``KeyboardInterrupt`` goes on (:class:`SigintGuard`), and one during the exit is held
    back until the exit is done: a model is never left half restored.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Mapping[str, nn.Module],
        transient: tuple[str, ...] = (),
        unwritten: Collection[str] = (),
    ) -> None:
        self.model = model
        self.layers = dict(layers)
        self.transient = transient
        self.unwritten = frozenset(unwritten)
        self._modes: list[tuple[nn.Module, bool]] = []
        self._momenta: dict[str, Any] = {}
        self._buffers: dict[str, dict[str, torch.Tensor]] = {}
        self._buffer_objects: dict[str, dict[str, torch.Tensor | None]] = {}
        self._grad_enabled = True
        self._handles: list[RemovableHandle] = []
        self._guard = SigintGuard(self._restore)

    def __enter__(self) -> PreservedState:
        self._modes = [(module, module.training) for module in self.model.modules()]
        self._momenta = {name: layer.momentum for name, layer in self.layers.items()}
        self._grad_enabled = torch.is_grad_enabled()
        for name, layer in self.layers.items():
            if name not in self.unwritten and not is_lazy_uninitialized(layer):
                self.record_buffers(name)
        self._guard.arm()
        return self

    def record_buffers(self, name: str) -> None:
        """Record layer ``name``'s running buffers, unless already recorded."""
        if name in self._buffers:
            return
        layer = self.layers[name]
        self._buffer_objects[name] = {key: layer._buffers.get(key) for key in _BUFFER_NAMES}
        self._buffers[name] = {
            key: getattr(layer, key).detach().clone()
            for key in _BUFFER_NAMES
            if getattr(layer, key, None) is not None
        }

    def add_hook(self, handle: RemovableHandle) -> None:
        """A hook to remove on exit."""
        self._handles.append(handle)

    def __exit__(self, *exc_info: object) -> None:
        """Put everything back, a Ctrl-C held back meanwhile. Every step runs even if one
        before it raised, and as each step can be repeated, a round that raised is run once
        more; the first error is raised after."""
        self._guard.hold()
        try:
            errors = self._restore()
            if errors:
                self._restore()
        finally:
            self._guard.release()
        if errors:
            raise errors[0]

    def _restore(self) -> list[BaseException]:
        errors: list[BaseException] = []
        for step in (
            self._remove_hooks,
            self._restore_switches,
            self._restore_modes,
            self._restore_buffers,
            self._restore_momenta,
        ):
            try:
                step()
            except BaseException as error:  # the other steps still run
                errors.append(error)
        return errors

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _restore_switches(self) -> None:
        for layer in self.layers.values():
            for key in self.transient:
                layer.__dict__.pop(key, None)
        torch.set_grad_enabled(self._grad_enabled)

    def _restore_modes(self) -> None:
        for module, training in self._modes:
            module.training = training

    def _restore_buffers(self) -> None:
        with torch.no_grad():
            for name, saved in self._buffers.items():
                layer = self.layers[name]
                for key, tensor in self._buffer_objects[name].items():
                    if layer._buffers.get(key) is not tensor:
                        layer._buffers[key] = tensor
                for key, value in saved.items():
                    getattr(layer, key).copy_(value)
                _sync_counters(layer)

    def _restore_momenta(self) -> None:
        for name, momentum in self._momenta.items():
            if self.layers[name].momentum != momentum:
                self.layers[name].momentum = momentum
