"""Check on a CUDA machine that bnstats never makes the host wait for the GPU.

    python benchmarks/gpu_check.py            # one PASS/FAIL line per case; exit 1 if any fails

Each case runs under ``torch.cuda.set_sync_debug_mode("error")``, in which torch raises at
any operation that synchronizes the host with the device (``.item()``, ``bool(tensor)``, a
copy to pageable host memory, ``torch.cuda.synchronize()``):

- the training step (forward, cross-entropy, backward, SGD step) of a ``bt.convert``-ed
  ResNet-18-shaped model, for each estimator: ``EMA(0.1)``, ``EMA(0.1, debias=True)``,
  ``CumulativeAverage()`` and ``EMA(0.1, nonfinite="skip")`` (with a NaN batch among its
  steps, which must be skipped and counted on the device, checked afterwards);
- ``bt.recalibrate`` of the same model with torch's ``nn.BatchNorm2d``, batches on the GPU.

Two untimed steps (or one recalibration) run first outside the mode: cuDNN's and the
allocator's first-call work is not the per-step code under test. A FAIL line names the
error and the innermost bnstats line it came from. tests/torch/test_gpu_sync.py runs the
same checks where CUDA is present.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from pathlib import Path

if __name__ == "__main__":  # as a script: benchmarks/ is on the path, run.py sets it right
    from run import use_this_checkout

    use_this_checkout()

import torch  # noqa: E402
from torch import nn  # noqa: E402

import bnstats  # noqa: E402
import bnstats.torch as bt  # noqa: E402
from benchmarks.models import ResNet18Shaped, image_batches, randomize_batchnorm  # noqa: E402

WIDTHS = (16, 32, 64, 128)
STEPS = 3
Guard = Callable[[Callable[[], object]], "str | None"]

ESTIMATORS: dict[str, Callable[[], bnstats.Estimator]] = {
    "EMA(0.1)": lambda: bnstats.EMA(0.1),
    "EMA(0.1, debias=True)": lambda: bnstats.EMA(0.1, debias=True),
    "CumulativeAverage()": lambda: bnstats.CumulativeAverage(),
    'EMA(0.1, nonfinite="skip")': lambda: bnstats.EMA(0.1, nonfinite="skip"),
}


def where_in_bnstats(error: BaseException) -> str:
    """The innermost line of bnstats' code in ``error``'s traceback, else the innermost."""
    frames = traceback.extract_tb(error.__traceback__)
    ours = [f for f in frames if "bnstats" in Path(f.filename).parts]
    frame = (ours or frames)[-1] if frames else None
    if frame is None:
        return "?"
    return f"{Path(frame.filename).name}:{frame.lineno} {frame.line}"


def sync_error(work: Callable[[], object]) -> str | None:
    """Run ``work()`` under ``torch.cuda.set_sync_debug_mode("error")``: None if it never
    synchronized, else one line saying what raised and where."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return _caught(work)
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def _model(device: str) -> nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorm(ResNet18Shaped(WIDTHS), seed=1).to(device)


def _images(device: str, batch: int = 16, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(batch, 3, size, size, generator=gen)
    return x.to(device), torch.randint(0, 10, (batch,), generator=gen).to(device)


def check_training_step(
    estimator: str, device: str = "cuda", guard: Guard = sync_error
) -> str | None:
    """None if ``STEPS`` training steps of a model converted with ``ESTIMATORS[estimator]``
    never synchronize (and, under ``nonfinite="skip"``, a NaN batch among them is skipped:
    the statistics stay finite and one skip per layer is counted); else what went wrong.
    ``guard`` runs the steps (:func:`sync_error`; the CPU tests pass one that only runs
    them)."""
    model = bt.convert(_model(device), ESTIMATORS[estimator]()).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    x, y = _images(device)
    skip = "skip" in estimator
    poisoned = x.clone()
    poisoned[0, 0, 0, 0] = float("nan")

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()

    def steps() -> None:
        for index in range(STEPS):
            step()
            if skip and index == 0:
                with torch.no_grad():
                    model(poisoned)  # statistics only: the weights stay finite

    for _ in range(2):
        step()
    failure = guard(steps)
    if failure or not skip:
        return failure
    return _skipped_once(model)


def _skipped_once(model: nn.Module) -> str | None:
    """Host reads, after the checked steps: statistics finite, one skip counted per layer."""
    for name, layer in model.named_modules():
        if not hasattr(layer, "num_batches_skipped"):
            continue
        finite = bool(
            torch.isfinite(layer.running_mean).all() & torch.isfinite(layer.running_var).all()
        )
        skipped = int(layer.num_batches_skipped)
        if not finite or skipped != 1:
            return f"{name}: statistics finite {finite}, {skipped} batch(es) skipped (expected 1)"
    return None


def sync_error_in_loop(work: Callable[[], object]) -> str | None:
    """:func:`sync_error` for a pass: ``work`` is given the batches through
    :func:`while_iterating`, so the check covers every forward, hook and merge of the loop
    and leaves out the one read of the results after the last batch, which the pass makes on
    purpose (one transfer at the end)."""
    return _caught(work)


def while_iterating(batches: list) -> object:
    """``batches``, with ``set_sync_debug_mode("error")`` on from the first batch drawn until
    the last one is done."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield from batches
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def _caught(work: Callable[[], object]) -> str | None:
    try:
        work()
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"{first} (at {where_in_bnstats(error)})"
    return None


def check_recalibrate(device: str = "cuda", guard: Guard = sync_error_in_loop) -> str | None:
    """None if ``bt.recalibrate`` of a model with torch's BN layers on ``device`` never
    synchronizes while it draws batches (batches on the device; the results are read once
    after the last) and sets the same statistics as the unchecked call before it (to 1e-6),
    else what went wrong."""
    model = _model(device)
    batches = [b.to(device) for b in image_batches(4, 16, 32)]
    bt.recalibrate(model, batches)
    expected = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("running_var")}
    with torch.no_grad():
        for name in expected:  # spoil the statistics the checked call must set again
            model.get_submodule(name.rsplit(".", 1)[0]).running_var.fill_(3.0)
    iterate = while_iterating if device.startswith("cuda") else iter
    failure = guard(lambda: bt.recalibrate(model, iterate(batches)))
    if failure:
        return failure
    for name, var in expected.items():
        if not torch.allclose(model.state_dict()[name], var, rtol=1e-6, atol=0.0):
            return f"{name} differs from the first recalibration's"
    return None


def cases() -> dict[str, Callable[[], str | None]]:
    """Every check by name."""
    out: dict[str, Callable[[], str | None]] = {
        f"training step, {name}": (lambda name=name: check_training_step(name))
        for name in ESTIMATORS
    }
    out["bt.recalibrate"] = check_recalibrate
    return out


def main() -> int:
    if not torch.cuda.is_available():
        print(
            f"gpu_check.py: error: CUDA is not available here (torch {torch.__version__}); "
            "run it on a machine with an NVIDIA GPU",
            file=sys.stderr,
        )
        return 2
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    failed = 0
    for name, check in cases().items():
        try:
            failure = check()
        except Exception as error:  # one line per case, the others still run
            failure = f"{type(error).__name__}: {error} (at {where_in_bnstats(error)})"
        failed += failure is not None
        print(f"PASS  {name}" if failure is None else f"FAIL  {name}: {failure}", flush=True)
    print(f"{failed} of {len(cases())} failed" if failed else "all passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
