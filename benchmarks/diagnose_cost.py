"""What ``bt.diagnose`` costs against one ``bt.recalibrate`` on the same model and data.

The recalibration benchmark's ResNet-18-shaped model (20 BN layers, widths (8, 16, 16, 16)
on 32x32 images; ``--quick``: 16x16 images), 16 training batches of 32 images and 8 test
batches of 32 with integer labels. Contenders, timed side by side (:func:`alternate`, CPU
time, one thread): ``recalibrate`` (one pass over the training batches), ``diagnose`` with
the test batches (every BN layer attributed alone), and ``diagnose`` with
``max_layers=5`` (the 20 layers in 5 groups). The ratio diagnose / recalibrate is printed
with the passes over data each diagnose took (``report.passes``).

Run: ``PYTHONPATH=src python -m benchmarks.diagnose_cost [--quick] [--repeats N]``.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

import bnstats.torch as bt
from benchmarks.models import ResNet18Shaped, image_batches, randomize_batchnorm
from benchmarks.timing import Contender, alternate

WIDTHS = (8, 16, 16, 16)


def data(size: int) -> tuple[list, list]:
    generator = torch.Generator().manual_seed(1)
    train = [
        (x, torch.randint(0, 10, (len(x),), generator=generator))
        for x in image_batches(16, 32, size, seed=0)
    ]
    test = [
        (x, torch.randint(0, 10, (len(x),), generator=generator))
        for x in image_batches(8, 32, size, seed=2)
    ]
    return train, test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    size = 16 if args.quick else 32
    repeats = args.repeats or (2 if args.quick else 5)
    model = randomize_batchnorm(ResNet18Shaped(WIDTHS), seed=0).eval()
    train, test = data(size)
    layers = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    passes = {}

    def run_diagnose(max_layers: int, name: str):
        def run(_):
            passes[name] = bt.diagnose(model, train, test, progress=False, max_layers=max_layers)

        return run

    contenders = [
        Contender(
            "recalibrate",
            lambda copied: bt.recalibrate(copied, train, progress=False),
            prepare=lambda: copy.deepcopy(model),
        ),
        Contender("diagnose", run_diagnose(64, "diagnose")),
        Contender("diagnose_grouped", run_diagnose(5, "diagnose_grouped")),
    ]
    timings = alternate(contenders, repeats=repeats, basis="cpu")
    result = {
        "bn_layers": layers,
        "image_size": size,
        "train_batches": len(train),
        "test_batches": len(test),
        "repeats": repeats,
        "recalibrate_seconds": timings.median("recalibrate"),
    }
    for name in ("diagnose", "diagnose_grouped"):
        report = passes[name]
        result[name] = {
            "seconds": timings.median(name),
            "ratio_to_recalibrate": timings.ratio(name, "recalibrate"),
            "range": timings.ratio_range(name, "recalibrate"),
            "passes": report.passes,
            "attribution": report.attribution,
        }
    print(json.dumps(result))
    for name in ("diagnose", "diagnose_grouped"):
        entry = result[name]
        low, high = entry["range"]
        print(
            f"{name}: {entry['ratio_to_recalibrate']:.1f}x one recalibrate "
            f"(repeats {low:.1f}-{high:.1f}), {entry['passes']} passes over data; "
            f"{entry['attribution']}"
        )


if __name__ == "__main__":
    main()
