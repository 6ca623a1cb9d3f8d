"""All or nothing, also when interrupted: every tool that writes statistics leaves the model
either exactly as found or exactly as a finished call leaves it, whatever raises where.

Three kinds of probes:

- warnings turned into errors (``warnings.simplefilter("error")``): every warning is given
  before anything is written;
- a real Ctrl-C (``signal.raise_signal(SIGINT)``) at each line of the code that writes the
  new statistics or puts the model back (traced with ``sys.settrace``);
- a ``KeyboardInterrupt`` raised by the k-th ``Tensor.copy_`` of a call (a step that fails
  half-way through a write or a restore), for every k.
"""

from __future__ import annotations

import copy
import functools
import importlib
import signal
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import nn

import bnstats
import bnstats.torch as bt
from bnstats.torch import _layers, _level
from tests.torch import reference as ref
from tests.torch import zoo
from tests.torch.extra_models import AuxiliaryHead
from tests.torch.models import scramble_batchnorm

NAN = float("nan")
# the modules, not the functions bnstats.torch re-exports under the same names
adapt, recalibrate, sync_batchnorm = (
    importlib.import_module(f"bnstats.torch.{name}")
    for name in ("adapt", "recalibrate", "sync_batchnorm")
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Hundreds of tiny calls: one thread spares them the thread pool's start-up cost."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _data() -> list[torch.Tensor]:
    return zoo.batches("mlp", sizes=[6, 7])


Tool = Callable[[nn.Module], Any]
TOOLS: dict[str, Tool] = {
    "recalibrate": lambda m: bt.recalibrate(m, _data()),
    "recalibrate_eval": lambda m: bt.recalibrate(m, _data(), mode="eval"),
    "adapt": lambda m: bt.adapt(m, _data(), prior=8),
    "recalibrate_bnstats_layers": lambda m: bt.recalibrate(m, _data()),
}


def _model(tool: str) -> nn.Module:
    """Two BN layers, one after the other (two eval-mode levels), few other modules."""
    torch.manual_seed(0)
    model = scramble_batchnorm(
        nn.Sequential(nn.BatchNorm1d(16), nn.Linear(16, 3), nn.BatchNorm1d(3))
    )
    if tool == "recalibrate_bnstats_layers":  # their host-side step counters are re-read
        model = bt.convert(model, bnstats.EMA(0.1))
    return model


def _functions(*functions: Any) -> set:
    return {getattr(f, "__wrapped__", f).__code__ for f in functions}


CRITICAL = _functions(
    _layers.write_buffers,
    _layers.interrupts_deferred,
    _layers._sync_counters,
    _layers.PreservedState.__exit__,
    _layers.PreservedState._restore,
    _layers.PreservedState._remove_hooks,
    _layers.PreservedState._restore_switches,
    _layers.SigintGuard.hold,
    _layers.SigintGuard.release,
    _layers.SigintGuard._disarm,
    _layers.SigintGuard._handle,
    _layers.PreservedState._restore_modes,
    _layers.PreservedState._restore_buffers,
    _layers.PreservedState._restore_momenta,
    _level.pass_mode,
    _level.local_batch_statistics,
    recalibrate._recalibrate,
    adapt.adapt,
    sync_batchnorm._replace,
)
"""Where the statistics are written and the model put back."""


@contextmanager
def _ctrl_c_at_line(line: int, codes: set) -> Iterator[list[int]]:
    """A real SIGINT at the ``line``-th line run inside ``codes``; yields the line count."""
    seen = [0]

    def local(frame, event, arg):
        if event == "line":
            seen[0] += 1
            if seen[0] == line:
                signal.raise_signal(signal.SIGINT)
        return local

    def calls(frame, event, arg):
        return local if frame.f_code in codes else None

    previous = signal.getsignal(signal.SIGINT)
    if previous in (signal.SIG_IGN, signal.SIG_DFL):  # a process started in the background
        signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.settrace(calls)
    try:
        yield seen
    finally:
        sys.settrace(None)
        signal.signal(signal.SIGINT, previous)


@contextmanager
def _copy_fails_at(call: int) -> Iterator[list[int]]:
    """``Tensor.copy_`` raising KeyboardInterrupt at its ``call``-th use (once)."""
    original, seen = torch.Tensor.copy_, [0]

    def copy_(self, *args, **kwargs):
        seen[0] += 1
        if seen[0] == call:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    torch.Tensor.copy_ = copy_
    try:
        yield seen
    finally:
        torch.Tensor.copy_ = original


def _setup(model: nn.Module) -> dict[str, Any]:
    """Everything a pass changes and must put back, beside the state dict."""
    return {
        "grad_enabled": torch.is_grad_enabled(),
        "modes": ref.modes(model),
        "momenta": {n: getattr(m, "momentum", None) for n, m in model.named_modules()},
        "hooks": [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()],
        "pass_weights": [m for m in model.modules() if "_pass_weight" in m.__dict__],
        "counters": [
            getattr(m, "_steps", None) for m in model.modules() if isinstance(m, bt.BatchNorm1d)
        ],
    }


@functools.cache
def _outcomes(tool: str) -> tuple[dict, dict]:
    before = _model(tool)
    after = copy.deepcopy(before)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        TOOLS[tool](after)
    assert not ref.same_state(after, ref.snapshot(before))  # the call does change the model
    return ref.snapshot(before), ref.snapshot(after)


def _interrupted(tool: str, probe: Callable[[], Any]) -> tuple[bool, int]:
    """Run ``tool`` under ``probe``; return whether it was interrupted, and the probe's
    count; assert the model is all old or all new, and set up as found."""
    old, new = _outcomes(tool)
    model = _model(tool)
    setup = _setup(model)
    interrupted = False
    with probe() as seen, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            TOOLS[tool](model)
        except KeyboardInterrupt:
            interrupted = True
    assert ref.same_state(model, old) or ref.same_state(model, new)
    assert _setup(model) == setup
    return interrupted, seen[0]


@pytest.mark.parametrize("tool", list(TOOLS))
def test_ctrl_c_at_any_line_of_writing_or_restoring_leaves_all_old_or_all_new(tool):
    _, lines = _interrupted(tool, lambda: _ctrl_c_at_line(10**9, CRITICAL))
    assert lines > 20
    for line in range(1, lines + 1):
        interrupted, _ = _interrupted(tool, lambda: _ctrl_c_at_line(line, CRITICAL))  # noqa: B023
        assert interrupted, line  # the Ctrl-C is never lost, only held back


@pytest.mark.parametrize("tool", list(TOOLS))
def test_a_copy_failing_at_any_point_leaves_all_old(tool):
    _, calls = _interrupted(tool, lambda: _copy_fails_at(10**9))
    assert calls >= 4  # the write's copies at least (the pass writes no buffer of torch's layers)
    for call in range(1, calls + 1):
        interrupted, _ = _interrupted(tool, lambda: _copy_fails_at(call))  # noqa: B023
        assert interrupted, call


# -- every warning comes before the write ------------------------------------------------------


def _one_nan() -> list[torch.Tensor]:
    data = _data()
    data[1][0, 0] = NAN
    return data


WARNED: dict[str, tuple[Callable[[], nn.Module], Tool, str]] = {
    "nonfinite_skip": (
        lambda: zoo.build("mlp"),
        lambda m: bt.recalibrate(m, _one_nan(), nonfinite="skip"),
        "left out for NaN or Inf",
    ),
    "nonfinite_skip_eval": (
        lambda: zoo.build("mlp"),
        lambda m: bt.recalibrate(m, _one_nan(), nonfinite="skip", mode="eval"),
        "left out for NaN or Inf",
    ),
    "unreached_keep": (
        AuxiliaryHead,
        lambda m: bt.recalibrate(m, [torch.randn(4, 5) for _ in range(2)], unreached="keep"),
        "no forward reached, kept as they were",
    ),
    "tolerance_not_met": (
        lambda: zoo.build("mlp"),
        lambda m: bt.recalibrate_report(m, iter(_data()), tolerance=1e-9),
        "tolerance 1e-09 not met",
    ),
    "adapt_never_updated": (
        lambda: nn.Sequential(nn.Linear(16, 4), nn.BatchNorm1d(4)),
        lambda m: bt.adapt(m, _data()),
        "were never updated",
    ),
}


@pytest.mark.parametrize("case", list(WARNED))
def test_a_warning_turned_into_an_error_leaves_the_model_as_found(case):
    build, call, message = WARNED[case]
    torch.manual_seed(0)
    model = build()
    saved = ref.snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match=message):
            call(model)
    assert ref.same_state(model, saved)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        call(model)
    assert not ref.same_state(model, saved)  # the same call does write when it may warn


# -- revert_sync_batchnorm: every layer replaced, or none -------------------------------------


def _sync_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.SyncBatchNorm.convert_sync_batchnorm(
        nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    )


def _kinds(model: nn.Module) -> list[str]:
    return [type(m).__name__ for m in model]


def test_revert_sync_batchnorm_interrupted_at_any_line_replaces_all_or_none():
    codes = _functions(sync_batchnorm._replace, _layers.interrupts_deferred)
    lines = 0
    with _ctrl_c_at_line(10**9, codes) as seen:
        sync_batchnorm.revert_sync_batchnorm(_sync_net())
    lines = seen[0]
    assert lines > 5
    outcomes = set()
    for line in range(1, lines + 1):
        model = _sync_net()
        with pytest.raises(KeyboardInterrupt), _ctrl_c_at_line(line, codes):
            sync_batchnorm.revert_sync_batchnorm(model)
        outcomes.add(tuple(_kinds(model)))
    all_old = ("Conv2d", "SyncBatchNorm", "Conv2d", "SyncBatchNorm")
    all_new = ("Conv2d", "BatchNorm2d", "Conv2d", "BatchNorm2d")
    assert outcomes <= {all_old, all_new} and all_new in outcomes


def test_revert_sync_batchnorm_whose_second_replacement_fails_replaces_none(monkeypatch):
    model = _sync_net()
    original, calls = nn.Module.__setattr__, []

    def fails_on_the_second_layer(self, name, value):
        if isinstance(value, nn.BatchNorm2d) and self is model:
            calls.append(name)
            if len(calls) == 2:
                raise KeyboardInterrupt
        original(self, name, value)

    monkeypatch.setattr(nn.Module, "__setattr__", fails_on_the_second_layer)
    with pytest.raises(KeyboardInterrupt):
        sync_batchnorm.revert_sync_batchnorm(model)
    monkeypatch.undo()
    assert _kinds(model) == ["Conv2d", "SyncBatchNorm", "Conv2d", "SyncBatchNorm"]


def test_a_programs_own_sigint_handler_is_called_and_the_pass_goes_on():
    """A handler that only notes the Ctrl-C (a graceful stop) must not see the model put
    back in the middle of the pass: at any line, the pass goes on to the uninterrupted
    result."""
    _, new = _outcomes("recalibrate_eval")
    _, lines = _interrupted("recalibrate_eval", lambda: _ctrl_c_at_line(10**9, CRITICAL))
    noted = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: noted.append(signum))
    try:
        for line in range(1, lines + 1):
            model = _model("recalibrate_eval")
            with _ctrl_c_at_line(line, CRITICAL), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                TOOLS["recalibrate_eval"](model)
            assert ref.same_state(model, new), line
    finally:
        signal.signal(signal.SIGINT, previous)
    assert noted == [signal.SIGINT] * lines
