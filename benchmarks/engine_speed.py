"""d) The NumPy engine vs PyTorch on the CPU: training steps of the same MLP on digits.

The engine's ``Network.mlp([64, 128, 64, 10])`` (Linear without bias - BatchNorm - ReLU,
twice, then Linear; one EMA(0.1) estimator per BatchNorm) and the same layers in torch
(``benchmarks.models.digits_mlp``), each trained with Adam(1e-3) on softmax cross-entropy:
forward in training mode, loss, backward, optimizer step. The engine computes in float64,
so **torch in float64 is the fair peer**; torch in float32 is shown too, as people would
run it. Same fixed rows of the digits training set for every contender, batch 64 and 1024.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks.config import Config
from benchmarks.models import digits_mlp
from benchmarks.report import Goal, Result, Table
from benchmarks.timing import Contender, alternate, calls_for, time_block

ENGINE = "engine (float64)"
TORCH64 = "torch float64"
TORCH32 = "torch float32"
BATCH_SIZES = (64, 1024)
SIZES = (64, 128, 64, 10)


def _engine_steps(x: np.ndarray, y: np.ndarray, steps: int) -> Any:
    from bnstats.engine import Adam, Network

    net = Network.mlp(list(SIZES), batchnorm=True, seed=0)
    optimizer = Adam(1e-3)

    def run(_state: object) -> None:
        for _ in range(steps):
            net.train_step(x, y, optimizer)

    return run


def _torch_steps(x: np.ndarray, y: np.ndarray, steps: int, dtype: torch.dtype) -> Any:
    torch.manual_seed(0)
    model = digits_mlp(SIZES).to(dtype).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    inputs, labels = torch.as_tensor(x, dtype=dtype), torch.as_tensor(y)

    def run(_state: object) -> None:
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(inputs), labels).backward()
            optimizer.step()

    return run


def time_batch(x: np.ndarray, y: np.ndarray, config: Config) -> dict[str, Any]:
    pilot = time_block(Contender("pilot", _engine_steps(x, y, 3)), 1) / 3
    steps = calls_for(pilot, 0.5 * config.budget, at_least=3)
    contenders = [
        Contender(ENGINE, _engine_steps(x, y, steps)),
        Contender(TORCH64, _torch_steps(x, y, steps, torch.float64)),
        Contender(TORCH32, _torch_steps(x, y, steps, torch.float32)),
    ]
    timings = alternate(contenders, repeats=config.repeats, warmup=1, basis=config.basis)
    other = timings.other_basis()
    out: dict[str, Any] = {"steps_per_block": steps, "basis": config.basis}
    for name in (ENGINE, TORCH64, TORCH32):
        low, high = timings.ratio_range(name, ENGINE)
        out[name] = {
            "median_step_s": timings.median(name) / steps,
            "examples_per_s": len(x) * steps / timings.median(name),
            # engine speed / this contender's speed = this contender's time / engine's time
            "engine_speedup": timings.ratio(name, ENGINE),
            "engine_speedup_range": [low, high],
            f"engine_speedup_{other}": timings.ratio(name, ENGINE, other),
        }
    return out


def run(config: Config) -> Result:
    from bnstats.data import load_digits

    digits = load_digits(seed=0)
    data: dict[str, Any] = {}
    other = "wall" if config.basis == "cpu" else "cpu"
    table = Table(
        "Training examples per second (median) and the engine's speed relative to each",
        ["batch", "implementation", "examples/s", "engine speed / this", "range", f"({other})"],
    )
    for batch in BATCH_SIZES:
        x, y = digits.X_train[:batch], digits.y_train[:batch]
        measured = time_batch(x, y, config)
        data[f"batch_{batch}"] = measured
        for name in (ENGINE, TORCH64, TORCH32):
            m = measured[name]
            low, high = m["engine_speedup_range"]
            table.add(
                batch,
                name,
                m["examples_per_s"],
                m["engine_speedup"],
                f"{low:.3f}-{high:.3f}",
                m[f"engine_speedup_{other}"],
            )
    return Result(
        key="d",
        title="NumPy engine vs PyTorch CPU, MLP on digits",
        settings={
            "mlp": list(SIZES),
            "optimizer": "Adam(1e-3)",
            "repeats": config.repeats,
            "times": f"{config.basis}, {config.threads} thread(s)",
        },
        data=data,
        tables=[table],
        goals=[
            Goal(
                f"batch 64: engine examples/s / {TORCH64} examples/s",
                data["batch_64"][TORCH64]["engine_speedup"],
                1.0,
                at_most=False,
            )
        ],
        notes=["the engine is float64: torch float64 is the fair peer; float32 is shown too"],
    )
