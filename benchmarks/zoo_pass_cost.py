"""What a train-mode pass costs on real architectures: bt.recalibrate against update_bn.

For each of about 45 timm and torchvision architectures (random weights, ``pretrained=False``
/ ``weights=None``: nothing is downloaded), one torch thread, CPU time
(``time.process_time``) per call, the two contenders alternating over the repeats
(:func:`benchmarks.timing.alternate`, a fresh copy of the model before every timed call),
8 batches of 4x3x64x64 images per call:

- ``ratio``: ``bt.recalibrate`` time over ``torch.optim.swa_utils.update_bn`` time, the
  median of the ratios paired within a repeat (and their range);
- ``extra``: what ``bt.recalibrate`` costs over ``update_bn`` per BN layer and call (one
  call = the pass over all 8 batches), in microseconds: ``(median ours - median update_bn)
  / BN layers``;
- ``bn``: the number of BN layers (``bt.find_batchnorm_layers``).

``update_bn`` puts the whole model in training mode, ``bt.recalibrate`` only the BN layers;
so that both run the same forward, the torchvision models with auxiliary heads in training
mode (GoogLeNet) are built without them, and timm's models keep their default drop-path
rate of 0. inception_v3 needs at least 75x75 inputs: it gets 96x96. Architectures without
a BN layer (convnext, the normalizer-free and GroupNorm ResNets) and those that fail to
build or to run are listed with the reason and left out of the summary.

Run (needs timm and torchvision; about 3 minutes on 2 CPU cores)::

    PYTHONPATH=src:. python -m benchmarks.zoo_pass_cost [--repeats 5] [--only a,b] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from benchmarks.models import image_batches
from benchmarks.onnx_zoo import build
from benchmarks.timing import Contender, alternate

OURS, REFERENCE = "bt.recalibrate", "update_bn"
BATCHES, BATCH_SIZE, SIZE = 8, 4, 64
LARGER_INPUT = {"inception_v3": 96}  # its stem needs at least 75x75 (timm's and torchvision's)


def input_size(spec: str) -> int:
    """The image size architecture ``spec`` (``"source:name"``) runs on: :data:`SIZE`, or
    more where its stem needs it (:data:`LARGER_INPUT`, by name, whichever source)."""
    return LARGER_INPUT.get(spec.split(":")[-1], SIZE)


# torchvision's and timm's common BN architectures, test_zoo.py's and onnx_zoo.py's included.
MODELS = (
    "torchvision:resnet18",
    "torchvision:resnet34",
    "torchvision:resnet50",
    "torchvision:resnet101",
    "torchvision:resnext50_32x4d",
    "torchvision:densenet121",
    "torchvision:vgg11_bn",
    "torchvision:mobilenet_v2",
    "torchvision:mobilenet_v3_small",
    "torchvision:mobilenet_v3_large",
    "torchvision:efficientnet_b0",
    "torchvision:shufflenet_v2_x1_0",
    "torchvision:googlenet",
    "torchvision:regnet_x_400mf",
    "torchvision:regnet_y_400mf",
    "torchvision:mnasnet1_0",
    "timm:efficientnet_b0",
    "timm:mobilenetv3_large_100",
    "timm:cspresnet50",
    "timm:repvgg_a0",
    "timm:resnetv2_50",
    "timm:inception_v3",
    "timm:dla34",
    "timm:dpn68",
    "timm:efficientnetv2_rw_t",
    "timm:lcnet_050",
    "timm:fbnetc_100",
    "timm:mnasnet_100",
    "timm:spnasnet_100",
    "timm:res2net50_26w_4s",
    "timm:ese_vovnet19b_dw",
    "timm:cspdarknet53",
    "timm:selecsls42b",
    "timm:gernet_s",
    "timm:mixnet_s",
    "timm:ghostnet_100",
    "timm:hrnet_w18_small",
    "timm:rexnet_100",
    "timm:tf_efficientnet_lite0",
    "timm:regnety_002",
    "timm:resnet26d",
    "timm:seresnext26d_32x4d",
    "timm:mobileone_s0",
    "timm:tinynet_a",
    "timm:nf_resnet26",
    "timm:convnext_atto",
)


@dataclass
class Result:
    """One architecture's measurement; ``skipped`` holds the reason it has none."""

    model: str
    input_size: int
    bn_layers: int = 0
    update_bn_ms: float = float("nan")
    recalibrate_ms: float = float("nan")
    ratio: float = float("nan")
    ratio_min: float = float("nan")
    ratio_max: float = float("nan")
    extra_us_per_layer: float = float("nan")
    skipped: str = ""


def _reason(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:160]


def measure(spec: str, repeats: int) -> Result:
    """Time both contenders on ``spec``; a model that fails is returned with ``skipped``."""
    import torch.optim.swa_utils as swa_utils

    import bnstats.torch as bt

    size = input_size(spec)
    result = Result(spec, size)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = build(spec)
    except Exception as error:  # noqa: BLE001 - reported, not raised
        result.skipped = f"does not build: {_reason(error)}"
        return result
    try:
        result.bn_layers = len(bt.find_batchnorm_layers(model))
    except ValueError:  # raised where there is none
        result.skipped = "no BN layer with running statistics"
        return result
    batches = image_batches(BATCHES, BATCH_SIZE, size)

    def fresh() -> nn.Module:
        return copy.deepcopy(model)

    runs: dict[str, Callable[[nn.Module], object]] = {
        OURS: lambda m: bt.recalibrate(m, batches),
        REFERENCE: lambda m: swa_utils.update_bn(batches, m),
    }
    contenders = [Contender(name, run, fresh) for name, run in runs.items()]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            timings = alternate(contenders, repeats=repeats, warmup=1, basis="cpu")
    except Exception as error:  # noqa: BLE001 - reported, not raised
        result.skipped = f"does not run at {size}x{size}: {_reason(error)}"
        return result
    ours, reference = timings.median(OURS), timings.median(REFERENCE)
    result.recalibrate_ms, result.update_bn_ms = 1e3 * ours, 1e3 * reference
    result.ratio = timings.ratio(OURS, REFERENCE)
    result.ratio_min, result.ratio_max = timings.ratio_range(OURS, REFERENCE)
    result.extra_us_per_layer = 1e6 * (ours - reference) / result.bn_layers
    return result


HEADER = (
    f"{'model':<34} {'input':>5} {'bn':>4} {'update_bn ms':>12} {'ours ms':>9} "
    f"{'ratio':>6} {'range':>13} {'extra us/layer':>14}"
)


def line(r: Result) -> str:
    if r.skipped:
        return f"{r.model:<34} skipped: {r.skipped}"
    return (
        f"{r.model:<34} {r.input_size:>5} {r.bn_layers:>4} {r.update_bn_ms:>12.1f} "
        f"{r.recalibrate_ms:>9.1f} {r.ratio:>6.3f} {r.ratio_min:>6.3f}-{r.ratio_max:<6.3f} "
        f"{r.extra_us_per_layer:>14.1f}"
    )


def summary(results: list[Result]) -> list[str]:
    measured = [r for r in results if not r.skipped]
    if not measured:
        return ["no model measured"]
    out = [f"{len(measured)} models measured, {len(results) - len(measured)} left out"]
    for label, key, fmt in (
        ("ratio bt.recalibrate / update_bn", "ratio", ".3f"),
        ("extra us per BN layer and call", "extra_us_per_layer", ".1f"),
    ):
        values = {r.model: getattr(r, key) for r in measured}
        low, high = min(values, key=values.__getitem__), max(values, key=values.__getitem__)
        out.append(
            f"{label}: median {statistics.median(values.values()):{fmt}}, "
            f"min {values[low]:{fmt}} ({low}), max {values[high]:{fmt}} ({high})"
        )
    return out


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with NaN (not measured) as null: strict JSON."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}


def _versions() -> str:
    found = []
    for library in ("timm", "torchvision"):
        try:
            found.append(f"{library} {__import__(library).__version__}")
        except ImportError:
            found.append(f"no {library}")
    return ", ".join(found)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", default="", help="comma-separated specs, e.g. timm:dla34")
    parser.add_argument("--json", default="", metavar="PATH", help="also write results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    specs = [s for s in args.only.split(",") if s] or list(MODELS)
    print(
        f"torch {torch.__version__}, {_versions()}; one thread, CPU time; {BATCHES} batches of "
        f"{BATCH_SIZE}x3x{SIZE}x{SIZE} per call, {args.repeats} repeats"
    )
    print(HEADER, flush=True)
    results: list[Result] = []
    start = time.perf_counter()
    for spec in specs:
        result = measure(spec, args.repeats)
        results.append(result)
        print(line(result), flush=True)
    print()
    for text in summary(results):
        print(text)
    print(f"total {time.perf_counter() - start:.0f} s wall-clock")
    if args.json:
        with open(args.json, "w") as stream:
            json.dump([_plain(asdict(r)) for r in results], stream, indent=1)


if __name__ == "__main__":
    main()
