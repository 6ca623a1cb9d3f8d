"""Statistics as inference sees them: recalibrate(mode="train") vs mode="eval", batches of one,
and early stopping with tolerance.

1. accuracy: the small-batch study's models (engine MLP and torch CNN on the digits, i.i.d.
   training batches of k = 2, 4, 8, 32, plain BN; the torch CNN also with Dropout(0.2)
   before each BN), then test accuracy with the population statistics of the training set
   measured in train mode (batches of k, as in training) and in eval mode (for the torch
   CNNs with the passes ``mode="eval"`` took, ``eval_passes``);
2. batches of one: the recalibration benchmark's ResNet-18-shaped model, ``mode="eval"`` on
   one image per batch vs the same images in batches of 32 (worst relative difference);
3. early stop: the same model at widths (8, 16, 16, 16) on 32x32 images, 8192 batches of 32
   images (made on the fly, with a length, as a DataLoader has) as the full data;
   ``update_bn`` over all of it (timed) vs ``recalibrate(tolerance=1e-2)`` drawing from the
   same batches (timed): judged against the whole data's statistics (the data with their
   length) and, for comparison, against the population (the same batches without a
   length); error of running_var (relative, worst channel) against the full-data
   population.

Run: ``PYTHONPATH=src python -m benchmarks.eval_mode [--quick]`` (prints JSON lines and a summary).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from typing import Any

import numpy as np
import torch
from torch import nn

import bnstats.torch as bt
from benchmarks.models import ResNet18Shaped, image_batches, randomize_batchnorm
from benchmarks.small_batches import BATCHERS, Config, torch_cnn
from bnstats.data import load_digits
from bnstats.engine import Adam, Network
from bnstats.stats import EMA


def engine_accuracy(data: Any, size: int, seed: int, epochs: int) -> dict[str, float]:
    net = Network.mlp(
        [data.features, 128, 64, data.classes], seed=seed, estimators={"ema": EMA(0.01)}
    )
    optimizer, rng = Adam(1e-3), np.random.default_rng(seed)
    for _ in range(epochs):
        for idx in BATCHERS["iid"](data.y_train, size, rng):
            net.train_step(data.X_train[idx], data.y_train[idx], optimizer)
    net.recalibrate(data.X_train, batch_size=size, name="train", mode="train")
    net.recalibrate(data.X_train, batch_size=size, name="eval", mode="eval")
    return {m: net.evaluate(data.X_test, data.y_test, stats=m) for m in ("train", "eval")}


def dropout_cnn(momentum: float) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False),
        nn.Dropout(0.2),
        nn.BatchNorm2d(16, momentum=momentum),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False),
        nn.Dropout(0.2),
        nn.BatchNorm2d(32, momentum=momentum),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


def torch_accuracy(data: Any, size: int, seed: int, epochs: int, dropout: bool) -> dict:
    torch.manual_seed(seed)
    model = dropout_cnn(0.01) if dropout else torch_cnn("bn", size, None, 0.01)
    X = torch.tensor(data.X_train, dtype=torch.float32).view(-1, 1, 8, 8)
    y = torch.tensor(data.y_train)
    X_test = torch.tensor(data.X_test, dtype=torch.float32).view(-1, 1, 8, 8)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(epochs):
        for idx in BATCHERS["iid"](data.y_train, size, rng):
            rows = torch.from_numpy(idx)
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(X[rows]), y[rows]).backward()
            optimizer.step()
    usable = [x for x in X.split(size) if len(x) > 1]
    result = {}
    for mode in ("train", "eval"):
        report = bt.recalibrate_report(copy.deepcopy(model), usable, mode=mode)
        with torch.no_grad():
            predicted = report.model.eval()(X_test).argmax(1).numpy()
        result[mode] = float((predicted == data.y_test).mean())
        if mode == "eval":
            result["eval_passes"] = report.passes
    return result


def accuracy_study(sizes: tuple[int, ...], seeds: tuple[int, ...], epochs: int) -> list[dict]:
    data = load_digits()
    records = []
    for size in sizes:
        for seed in seeds:
            runs = {
                "engine": lambda s=size, r=seed: engine_accuracy(data, s, r, epochs),
                "torch": lambda s=size, r=seed: torch_accuracy(data, s, r, epochs // 2, False),
                "torch+dropout": lambda s=size, r=seed: torch_accuracy(
                    data, s, r, epochs // 2, True
                ),
            }
            for name, run in runs.items():
                record = {"study": "accuracy", "model": name, "k": size, "seed": seed, **run()}
                print(json.dumps(record), flush=True)
                records.append(record)
    return records


def batches_of_one(widths: tuple[int, ...], images: int, size: int, float64: bool) -> dict:
    model = randomize_batchnorm(ResNet18Shaped(widths), seed=1)
    batched = image_batches(images // 32, 32, size)
    if float64:
        model, batched = model.double(), [x.double() for x in batched]
    ones = [image[None] for batch in batched for image in batch]
    a = bt.recalibrate(copy.deepcopy(model), batched, mode="eval")
    b = bt.recalibrate(copy.deepcopy(model), ones, mode="eval")
    worst = 0.0
    for la, lb in zip(bt_layers(a), bt_layers(b), strict=True):
        worst = max(worst, float(((la.running_var - lb.running_var).abs() / la.running_var).max()))
    record = {
        "study": "batches_of_one",
        "images": images,
        "dtype": "float64" if float64 else "float32",
        "worst_var_rel_diff": worst,
    }
    print(json.dumps(record), flush=True)
    return record


def bt_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


class SeededBatches:
    """``count`` batches of random images, made afresh (same values) at every iteration."""

    def __init__(self, count: int, batch: int, size: int) -> None:
        self.count, self.batch, self.size = count, batch, size

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        gen = torch.Generator().manual_seed(0)
        for _ in range(self.count):
            yield torch.randn(self.batch, 3, self.size, self.size, generator=gen) * 1.5 + 0.3


def early_stop(widths: tuple[int, ...], batches: int, size: int, tolerance: float) -> dict:
    from torch.optim.swa_utils import update_bn

    model = randomize_batchnorm(ResNet18Shaped(widths), seed=1)
    data = SeededBatches(batches, 32, size)
    full = bt.recalibrate(copy.deepcopy(model), data)
    reference = copy.deepcopy(model)
    start = time.perf_counter()
    update_bn(data, reference)
    update_bn_s = time.perf_counter() - start
    record = {"study": "early_stop", "full_batches": batches, "tolerance": tolerance}
    record["update_bn_full_s"] = update_bn_s
    for truth, drawn in (("whole data", data), ("population", iter(data))):
        ours = copy.deepcopy(model)
        start = time.perf_counter()
        result = bt.recalibrate_report(ours, drawn, tolerance=tolerance)
        ours_s = time.perf_counter() - start
        worst = max(
            float(
                ((lo.running_var.double() - lf.running_var.double()).abs() / lf.running_var).max()
            )
            for lo, lf in zip(bt_layers(ours), bt_layers(full), strict=True)
        )
        record[truth] = {
            "samples_used": result.samples,
            "batches_used": result.batches,
            "reported_worst_rel_se": result.worst[1],
            "miss_probability": result.miss_probability,
            "worst_var_rel_error_vs_full": worst,
            "recalibrate_tolerance_s": ours_s,
            "time_ratio": ours_s / update_bn_s,
        }
    print(json.dumps(record), flush=True)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--stop-batches", type=int, default=8192)
    parser.add_argument("--tolerance", type=float, default=1e-2)
    parser.add_argument("--only", choices=("accuracy", "one", "stop"), default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    quick = args.quick
    widths = (8, 16, 16, 16) if quick else (16, 32, 64, 128)
    if args.only in (None, "one"):
        for float64 in (False, True):
            batches_of_one(widths, 64 if quick else 128, 32, float64)
    if args.only in (None, "stop"):
        early_stop((8, 16, 16, 16), 64 if quick else args.stop_batches, 32, args.tolerance)
    if args.only in (None, "accuracy"):
        sizes = (4, 32) if quick else (2, 4, 8, 32)
        accuracy_study(sizes, (0,) if quick else (0, 1, 2), 2 if quick else Config().engine_epochs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
