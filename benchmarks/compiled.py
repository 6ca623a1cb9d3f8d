"""g) Fold before torch.compile: eager eval vs bt.fold vs torch.compile vs fold then compile.

One ResNet-18-shaped model in eval mode (BN statistics randomized as after training), four
ways:

- ``eval``: the model as it is, eager;
- ``bt.fold``: ``bt.fold(model)``, eager;
- ``compile``: ``torch.compile(model, dynamic=False)``;
- ``bt.fold + compile``: ``torch.compile(bt.fold(model), dynamic=False)``.

Each model is folded in float32 and then cast to ``compile_dtype`` (float16 on a GPU, as in
issue 12's H200 measurement, where inductor left the BN layers of an eval-mode model
unfolded and compiling the folded model was 1.6x faster at batch 64). Every batch size gets
its own compilation (``torch._dynamo.reset()`` first, inductor's caches off), and the
compile time is the wall-clock time of the first call, device synchronized. Latency per call
under ``torch.no_grad()``, the four alternating over twice the configured repeats; the
compiled models' outputs are checked against ``eval``'s.

On the CPU the default run leaves this comparison out (inductor's C++ compilation takes tens
of seconds per model there); ``--only g`` runs it.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from benchmarks.config import Config
from benchmarks.device import dtype_named
from benchmarks.inference import repeated_calls
from benchmarks.models import ResNet18Shaped, randomize_batchnorm
from benchmarks.report import Goal, Result, Table
from benchmarks.timing import Contender, alternate, calls_for, synchronizer, time_block

REFERENCE = "eval"
COMPILED = ("compile", "bt.fold + compile")


def eager_models(config: Config) -> dict[str, nn.Module]:
    """``eval`` and ``bt.fold``, in eval mode, on the device, in ``compile_dtype``."""
    import bnstats.torch as bt

    torch.manual_seed(0)
    model = randomize_batchnorm(ResNet18Shaped(config.resnet_widths), seed=5).eval()
    folded = bt.fold(model).eval()
    dtype = dtype_named(config.compile_dtype)
    return {"eval": model.to(config.device, dtype), "bt.fold": folded.to(config.device, dtype)}


@contextlib.contextmanager
def _no_inductor_caches() -> Iterator[None]:
    """Inductor compiles from scratch (its on-disk caches would turn the second compilation
    of the same graph into a cache hit), without the warning that says so at every
    compilation; caches as they are where the setting does not exist."""
    import torch._inductor.config as inductor_config

    if not hasattr(inductor_config, "force_disable_caches"):
        yield
        return
    with warnings.catch_warnings(), inductor_config.patch(force_disable_caches=True):
        warnings.filterwarnings("ignore", message=".*force_disable_caches", category=UserWarning)
        yield


def warm_up_compiler(x: torch.Tensor, backend: str) -> None:
    """Compile and run a one-line function once, so that the first timed compilation does not
    also pay for the compiler's imports and one-time set-up."""
    torch._dynamo.reset()
    with _no_inductor_caches(), torch.no_grad():
        torch.compile(lambda t: torch.relu(t * 2.0 + 1.0), backend=backend, dynamic=False)(x)


def compile_timed(
    model: nn.Module, x: torch.Tensor, backend: str, sync: Callable[[], None]
) -> tuple[Callable[[torch.Tensor], torch.Tensor], float]:
    """``torch.compile(model)`` and the seconds its first call on ``x`` took (compilation)."""
    torch._dynamo.reset()
    with _no_inductor_caches(), torch.no_grad():
        sync()
        start = time.perf_counter()
        compiled = torch.compile(model, backend=backend, dynamic=False)
        compiled(x)
        sync()
        seconds = time.perf_counter() - start
    return compiled, seconds


def relative_difference(model: Callable, reference: nn.Module, x: torch.Tensor) -> float:
    """max |model(x) - reference(x)| / max |reference(x)|, in float32."""
    with torch.no_grad():
        expected = reference(x).float()
        return float((model(x).float() - expected).abs().max() / expected.abs().max())


def time_batch(models: dict[str, nn.Module], batch: int, config: Config) -> dict[str, Any]:
    """Compile for ``batch``, then time the four alternately; ratios to eager ``eval``."""
    size, dtype = config.image_size, dtype_named(config.compile_dtype)
    gen = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 3, size, size, generator=gen).to(config.device, dtype)
    sync = synchronizer(config.device)
    runnable: dict[str, Callable] = dict(models)
    compile_s: dict[str, float] = {}
    warm_up_compiler(x, config.compile_backend)
    for name, source in zip(COMPILED, models.values(), strict=True):
        runnable[name], compile_s[name] = compile_timed(source, x, config.compile_backend, sync)
    pilot = (
        time_block(
            Contender("pilot", repeated_calls(models[REFERENCE], x, 2, torch.no_grad)), 1, sync
        )
        / 2
    )
    calls = calls_for(pilot, 0.5 * config.budget, at_least=2)
    contenders = [
        Contender(name, repeated_calls(m, x, calls, torch.no_grad)) for name, m in runnable.items()
    ]
    timings = alternate(
        contenders, repeats=2 * config.repeats, warmup=1, basis=config.basis, sync=sync
    )
    out: dict[str, Any] = {"calls_per_block": calls, "compile_s": compile_s}
    for name, model in runnable.items():
        low, high = timings.ratio_range(name, REFERENCE)
        out[name] = {
            "median_s": timings.median(name) / calls,
            "x_eval": timings.ratio(name, REFERENCE),
            "x_eval_range": [low, high],
            "output_rel_diff": relative_difference(model, models[REFERENCE], x),
        }
    return out


def _goals(data: dict[str, Any], config: Config) -> list[Goal]:
    """At every batch size: fold then compile no slower than compile alone; and the folded
    model no slower to compile (at the largest batch)."""
    goals = []
    for batch in config.inference_batches:
        measured = data[f"batch_{batch}"]
        ratio = measured["bt.fold + compile"]["x_eval"] / measured["compile"]["x_eval"]
        goals.append(Goal(f"batch {batch}: bt.fold + compile latency / compile", ratio, 1.0))
    compile_s = data[f"batch_{max(config.inference_batches)}"]["compile_s"]
    goals.append(
        Goal(
            "compile time of the folded model / of the model",
            compile_s["bt.fold + compile"] / compile_s["compile"],
            1.0,
        )
    )
    return goals


def run(config: Config) -> Result:
    models = eager_models(config)
    data: dict[str, Any] = {}
    table = Table(
        f"Latency per call (median), torch.no_grad, {config.compile_dtype}; compile time",
        ["batch", "model", "median ms", "x eval", "range", "compile s", "output rel diff"],
    )
    for batch in config.inference_batches:
        measured = time_batch(models, batch, config)
        data[f"batch_{batch}"] = measured
        for name in (*models, *COMPILED):
            m = measured[name]
            low, high = m["x_eval_range"]
            table.add(
                batch,
                name,
                1e3 * m["median_s"],
                m["x_eval"],
                f"{low:.3f}-{high:.3f}",
                measured["compile_s"].get(name, "-"),
                m["output_rel_diff"],
            )
    return Result(
        key="g",
        title="Fold before torch.compile: eval vs bt.fold vs compile vs bt.fold + compile",
        settings={
            "model": f"ResNet18Shaped{tuple(config.resnet_widths)}",
            "input": f"3x{config.image_size}x{config.image_size}",
            "dtype": config.compile_dtype,
            "backend": config.compile_backend,
            "device": config.device,
            "repeats": 2 * config.repeats,
            "times": f"{config.basis}, {config.threads} thread(s); compile: wall",
        },
        data=data,
        tables=[table],
        goals=_goals(data, config),
        notes=[
            f"compile time: the first call of the compiled model (tracing and the "
            f"{config.compile_backend} backend's work), inductor's caches off, device "
            "synchronized, after one warm-up compilation of a one-line function",
        ],
    )
