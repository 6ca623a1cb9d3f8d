"""Why is my EMA model worse than the model it averages? ``bt.diagnose`` finds out.

    python examples/diagnose_ema.py [--out DIR]

A small network is trained on scikit-learn's handwritten digits (1797 8x8 images) with an
exponential moving average of its weights (``torch.optim.swa_utils.AveragedModel``, decay
0.99, as timm's ModelEma and ema-pytorch keep one). The averaged copy carries the trained
model's BN buffers: statistics of other weights (timm#245, ema-pytorch#29). diagnose compares
the settings on the test split, names the cause and the layer, and prints the remedy; the
script then applies the remedy as printed and shows the accuracy it gives.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import bnstats.torch as bt
from bnstats.data import load_digits

BATCH = 64


def digits_batches() -> tuple[list, list]:
    digits = load_digits(seed=0)
    x, y = torch.tensor(digits.X_train, dtype=torch.float32), torch.tensor(digits.y_train)
    keep = len(x) // BATCH * BATCH
    batches = list(zip(x[:keep].split(BATCH), y[:keep].split(BATCH), strict=True))
    x_test = torch.tensor(digits.X_test, dtype=torch.float32)
    y_test = torch.tensor(digits.y_test)
    return batches, list(zip(x_test.split(BATCH), y_test.split(BATCH), strict=True))


def train_with_ema(batches: list, epochs: int = 4) -> nn.Module:
    """Adam at 0.03; the EMA of the weights starts at step 20."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(),
        nn.Linear(32, 32), nn.BatchNorm1d(32), nn.ReLU(),
        nn.Linear(32, 10),
    )  # fmt: skip
    optimizer = torch.optim.Adam(model.parameters(), 0.03)
    ema, step = None, 0
    for _ in range(epochs):
        for x, y in batches:
            if step == 20:
                ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.99))
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if ema is not None:
                ema.update_parameters(model)
    return ema.eval()


def accuracy(model: nn.Module, batches: list) -> float:
    with torch.no_grad():
        right = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches)
    return right / sum(len(y) for _, y in batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write DIR/diagnose.html")
    args = parser.parse_args()
    torch.set_num_threads(1)
    batches, test_batches = digits_batches()
    model = train_with_ema(batches)
    report = bt.diagnose(model, batches, test_batches, progress=False)
    print(report)
    if args.out:
        from bnstats.report.diagnose_page import write_diagnose_report

        print(f"wrote {write_diagnose_report(report, args.out)}")
    fixed = copy.deepcopy(model)
    remedy = report.findings[0].remedy
    exec(remedy, {"bt": bt, "model": fixed, "batches": batches, "test_batches": test_batches})
    print(
        f"\nafter {remedy}: test accuracy {100 * accuracy(fixed, test_batches):.2f}% "
        f"(before: {100 * accuracy(model, test_batches):.2f}%)"
    )


if __name__ == "__main__":
    main()
