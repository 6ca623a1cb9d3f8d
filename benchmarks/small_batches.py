"""Test accuracy against the normalization batch size: batch norm, Batch Renorm, Ghost BN.

    python benchmarks/small_batches.py            # the full run (a few minutes on 2 cores)
    python benchmarks/small_batches.py --quick    # a smaller grid, under a minute
    python benchmarks/small_batches.py --json     # one JSON object instead of tables

Digits (scikit-learn's bundled 8x8 images, the split of ``bnstats.data.load_digits(seed=0)``)
are learned by the NumPy engine's MLP 64-128-64-10 and by a small torch CNN on the images as
1x8x8 (conv3x3 16 - norm - ReLU - conv3x3/2 32 - norm - ReLU - linear). For a normalization
batch size k:

- bn, renorm: training batches of k rows (Batch Renorm's schedule is the paper's fitted to the
  run with ``RenormSchedule.scaled_to``: its ramps end half-way);
- ghost: training batches of ``ghost_batch`` (64) rows, normalized in virtual batches of k, so
  the optimizer takes fewer, larger steps than bn and renorm at the same k. The column k = 64
  is plain batch norm with those same 64-row steps: the baseline that separates the effect of
  the normalization size from that of the step count.

Batches are either i.i.d. (a shuffled pass, equal-size batches, a short remainder dropped) or
"two-class": every batch holds k/2 rows of each of 2 classes drawn at random (as many batches
per epoch as an i.i.d. pass). Every run trains with Adam (lr 1e-3) from a seed-dependent
start for the same number of epochs (engine 10, torch 5: the same examples seen, so fewer
steps at larger k); test accuracy uses the running average (EMA, momentum 0.01 per update),
as a deployed model would. Each cell is the mean and the sample standard deviation over the
seeds. BLAS and torch run single-threaded: on 2 busy cores their second thread costs far more
than it brings for these small matrices.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # 2 threads on 2 busy cores crawl
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import asdict, dataclass, replace  # noqa: E402
from functools import partial  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from bnstats.data import Dataset, load_digits  # noqa: E402
from bnstats.engine import Adam, BatchNorm, BatchRenorm, GhostBatchNorm, Network  # noqa: E402
from bnstats.engine.network import NormFactory  # noqa: E402
from bnstats.renorm import RenormSchedule  # noqa: E402
from bnstats.stats import EMA  # noqa: E402

NORMS = ("bn", "renorm", "ghost")
MODES = ("iid", "two-class")
FRAMEWORKS = ("engine", "torch")


@dataclass(frozen=True)
class Config:
    """The grid and the training budget."""

    sizes: tuple[int, ...] = (2, 4, 8, 32, 64)  # 64: the ghost batch itself, ghost = bn
    norms: tuple[str, ...] = NORMS
    modes: tuple[str, ...] = MODES
    frameworks: tuple[str, ...] = FRAMEWORKS
    seeds: tuple[int, ...] = (0, 1, 2)
    ghost_batch: int = 64
    engine_epochs: int = 10
    torch_epochs: int = 5
    momentum: float = 0.01
    lr: float = 1e-3


QUICK = Config(sizes=(4, 32), seeds=(0,), engine_epochs=3, torch_epochs=2)


def iid_batches(y: np.ndarray, batch: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """One shuffled pass in batches of exactly ``batch`` rows (a shorter remainder dropped)."""
    order = rng.permutation(len(y))
    for start in range(0, len(y) - batch + 1, batch):
        yield order[start : start + batch]


def two_class_batches(y: np.ndarray, batch: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """``len(y) // batch`` batches, each ``batch // 2`` rows of each of 2 random classes,
    shuffled within the batch (rows drawn without replacement within a batch)."""
    if batch % 2:
        raise ValueError(f"two-class batches need an even batch size, got {batch}")
    by_class = {c: np.flatnonzero(y == c) for c in np.unique(y)}
    for _ in range(len(y) // batch):
        pair = rng.choice(list(by_class), size=2, replace=False)
        rows = [rng.choice(by_class[c], size=batch // 2, replace=False) for c in pair]
        yield rng.permutation(np.concatenate(rows))


BATCHERS: dict[str, Callable[..., Iterator[np.ndarray]]] = {
    "iid": iid_batches,
    "two-class": two_class_batches,
}


def training_batch(norm: str, size: int, config: Config) -> int:
    """Rows per optimizer step: k for bn and renorm, ``ghost_batch`` for ghost."""
    return max(config.ghost_batch, size) if norm == "ghost" else size


def total_steps(norm: str, size: int, rows: int, epochs: int, config: Config) -> int:
    return epochs * (rows // training_batch(norm, size, config))


def run_engine(data: Dataset, norm: str, size: int, mode: str, seed: int, config: Config) -> float:
    """Train the engine's MLP once; test accuracy with the EMA statistics."""
    rows, epochs = len(data.X_train), config.engine_epochs
    factory: NormFactory = BatchNorm
    if norm == "ghost":
        factory = partial(GhostBatchNorm, ghost_size=size)
    if norm == "renorm":
        schedule = RenormSchedule().scaled_to(total_steps(norm, size, rows, epochs, config))
        factory = partial(BatchRenorm, schedule=schedule)
    net = Network.mlp(
        [data.features, 128, 64, data.classes],
        seed=seed,
        estimators={"ema": EMA(config.momentum)},
        norm=factory,
    )
    optimizer, rng = Adam(config.lr), np.random.default_rng(seed)
    batch = training_batch(norm, size, config)
    for _ in range(epochs):
        for idx in BATCHERS[mode](data.y_train, batch, rng):
            net.train_step(data.X_train[idx], data.y_train[idx], optimizer)
    return net.evaluate(data.X_test, data.y_test, stats="ema")


def torch_cnn(norm: str, size: int, schedule: RenormSchedule | None, momentum: float) -> Any:
    """The small CNN for 1x8x8 images with the chosen normalization layers."""
    from torch import nn

    from bnstats.torch.ghost import GhostBatchNorm2d
    from bnstats.torch.renorm import BatchRenorm2d

    def norm_layer(channels: int) -> nn.Module:
        if norm == "renorm":
            return BatchRenorm2d(channels, momentum=momentum, schedule=schedule)
        if norm == "ghost":
            return GhostBatchNorm2d(channels, momentum=momentum, ghost_size=size)
        return nn.BatchNorm2d(channels, momentum=momentum)

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False),
        norm_layer(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False),
        norm_layer(32),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


def run_torch(data: Dataset, norm: str, size: int, mode: str, seed: int, config: Config) -> float:
    """Train the torch CNN once; test accuracy in eval mode (running statistics)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small kernels: one thread is fastest, and 2 busy cores crawl
    try:
        return _train_torch(data, norm, size, mode, seed, config)
    finally:
        torch.set_num_threads(threads)


def _train_torch(
    data: Dataset, norm: str, size: int, mode: str, seed: int, config: Config
) -> float:
    import torch

    torch.manual_seed(seed)
    rows, epochs = len(data.X_train), config.torch_epochs
    schedule = None
    if norm == "renorm":
        schedule = RenormSchedule().scaled_to(total_steps(norm, size, rows, epochs, config))
    model = torch_cnn(norm, size, schedule, config.momentum)
    X = torch.tensor(data.X_train, dtype=torch.float32).view(-1, 1, 8, 8)
    y = torch.tensor(data.y_train)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    rng = np.random.default_rng(seed)
    batch = training_batch(norm, size, config)
    model.train()
    for _ in range(epochs):
        for idx in BATCHERS[mode](data.y_train, batch, rng):
            rows_t = torch.from_numpy(idx)
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(X[rows_t]), y[rows_t])
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        X_test = torch.tensor(data.X_test, dtype=torch.float32).view(-1, 1, 8, 8)
        predicted = model(X_test).argmax(1).numpy()
    return float((predicted == data.y_test).mean())


RUNNERS = {"engine": run_engine, "torch": run_torch}


def run_grid(
    config: Config, data: Dataset, progress: Callable[[str], None] | None = None
) -> list[dict[str, Any]]:
    """Every (framework, mode, norm, size, seed) of ``config``: one record per run, with
    BLAS held to one thread (when threadpoolctl, a scikit-learn dependency, is there)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return _run_grid(config, data, progress)
    with threadpool_limits(limits=1, user_api="blas"):
        return _run_grid(config, data, progress)


def _run_grid(
    config: Config, data: Dataset, progress: Callable[[str], None] | None
) -> list[dict[str, Any]]:
    records = []
    for framework in config.frameworks:
        for mode in config.modes:
            for norm in config.norms:
                for size in config.sizes:
                    for seed in config.seeds:
                        start = time.perf_counter()
                        accuracy = RUNNERS[framework](data, norm, size, mode, seed, config)
                        seconds = time.perf_counter() - start
                        record = {
                            "framework": framework,
                            "mode": mode,
                            "norm": norm,
                            "size": size,
                            "seed": seed,
                            "accuracy": accuracy,
                            "seconds": round(seconds, 3),
                        }
                        records.append(record)
                        if progress:
                            progress(f"{framework} {mode} {norm} k={size} seed={seed}: {accuracy}")
    return records


def summarize(records: list[dict[str, Any]]) -> dict[tuple[str, str, str, int], tuple]:
    """``(framework, mode, norm, size) -> (mean, std, n)`` of the test accuracy over seeds
    (sample standard deviation; 0 for a single seed)."""
    groups: dict[tuple[str, str, str, int], list[float]] = {}
    for r in records:
        groups.setdefault((r["framework"], r["mode"], r["norm"], r["size"]), []).append(
            r["accuracy"]
        )
    return {
        key: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v))
        for key, v in groups.items()
    }


def markdown_tables(summary: dict[tuple[str, str, str, int], tuple], config: Config) -> str:
    """One table per framework and batch kind: rows are the norms, columns the sizes k."""
    out = []
    for framework in config.frameworks:
        for mode in config.modes:
            out.append(f"**{framework}, {mode} batches** (test accuracy, mean ± std)\n")
            out.append("| k | " + " | ".join(str(k) for k in config.sizes) + " |")
            out.append("|---|" + "---|" * len(config.sizes))
            for norm in config.norms:
                cells = []
                for k in config.sizes:
                    mean, std, _ = summary[(framework, mode, norm, k)]
                    cells.append(f"{mean:.3f} ± {std:.3f}")
                out.append(f"| {norm} | " + " | ".join(cells) + " |")
            out.append("")
    return "\n".join(out)


def machine() -> dict[str, Any]:
    """Where the numbers were measured."""
    info = {
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = 1
    except ImportError:
        info["torch"] = None
    return info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="k in 4, 32; one seed; fewer epochs")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--only", choices=FRAMEWORKS, help="run one framework")
    parser.add_argument("--seeds", type=int, help="number of seeds (default 3, quick 1)")
    parser.add_argument("--save", metavar="FILE", help="also write the JSON object to FILE")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = QUICK if args.quick else Config()
    if args.only:
        config = replace(config, frameworks=(args.only,))
    if args.seeds:
        config = replace(config, seeds=tuple(range(args.seeds)))
    data = load_digits(seed=0)
    start = time.perf_counter()
    log = None if args.json else (lambda line: print(line, file=sys.stderr, flush=True))
    records = run_grid(config, data, progress=log)
    elapsed = time.perf_counter() - start
    summary = summarize(records)
    report = {"config": asdict(config), "machine": machine(), "seconds": elapsed, "runs": records}
    if args.save:
        with open(args.save, "w") as handle:
            json.dump(report, handle, indent=1)
    if args.json:
        print(json.dumps(report))
        return 0
    command = "python benchmarks/small_batches.py" + (" --quick" if args.quick else "")
    print(f"`{command}`: {len(records)} runs in {elapsed:.0f} s; machine {machine()}\n")
    print(markdown_tables(summary, config))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
