"""How many real timm/torchvision models ``export_folded`` accepts.

Each model has random weights and the statistics of two training-mode batches of random
images (as after a little training: running means and variances far from 0 and 1, which is
where float32 rounding grows with depth). For each model: fold, export with torch's default
exporter, run onnxruntime, and judge the same graph twice: by the float64 rule of
``bnstats.onnx`` (onnxruntime about as close to a float64 run as torch's float32 eval, see
``bnstats/onnx/_agreement.py``), and by the fixed rule of bnstats 0.2 (``max |onnxruntime -
torch| <= 1e-5 * max |torch|``, and every ``BatchNormalization`` node checked as a layer's,
weight-standardisation nodes included).

    python benchmarks/onnx_zoo.py [model ...]     # needs timm, torchvision and the onnx extra

Prints one line per model and the two counts; a model takes 10-120 s on 2 CPU cores.
"""

from __future__ import annotations

import sys
import time

import numpy as np

MODELS = (
    "timm:inception_v3",
    "timm:dla34",
    "timm:dpn68",
    "timm:efficientnetv2_rw_t",
    "timm:lcnet_050",
    "timm:fbnetc_100",
    "timm:mnasnet_100",
    "timm:res2net50_26w_4s",
    "timm:ese_vovnet19b_dw",
    "timm:cspdarknet53",
    "timm:selecsls42b",
    "timm:gernet_s",
    "torchvision:shufflenet_v2_x1_0",
    "torchvision:googlenet",
    "torchvision:regnet_y_400mf",
    "timm:nf_resnet26",
    "timm:resnetv2_50x1_bit",
)


def build(spec: str):
    import torch

    library, name = spec.split(":")
    torch.manual_seed(0)
    if library == "timm":
        import timm

        return timm.create_model(name, pretrained=False).eval()
    import torchvision

    extra = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    return torchvision.models.get_model(name, weights=None, **extra).eval()


def judge(spec: str) -> dict:
    import onnx
    import torch

    import bnstats.torch as bt
    from bnstats.onnx._agreement import reference_outputs, run_onnxruntime
    from bnstats.onnx.export import _exported_bytes, quiet_exporter
    from bnstats.onnx.nodes import check_batchnorm_nodes

    model = build(spec)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.train()
        for _ in range(2):
            model(torch.randn(4, 3, 160, 160, generator=gen) * 2 + 0.5)
        model.eval()
    x = torch.randn(2, 3, 160, 160, generator=gen) * 2 + 0.5
    start = time.perf_counter()
    with quiet_exporter(), torch.no_grad():
        reference = reference_outputs(model, (x,))
        folded = bt.fold(model, (x,))
        data = _exported_bytes(torch, folded, (x,), {}, len(reference.outputs))
        nodes = check_batchnorm_nodes(onnx.load_from_string(data), folded)
        agreement = reference.agreement(run_onnxruntime(data, (x,)), 1e-5, 4.0)
    fixed_ok = agreement.torch_difference <= 1e-5 * float(np.abs(reference.outputs[0]).max())
    return {
        "model": spec,
        "new": nodes.ok and agreement.ok,
        "old": nodes.ok and not nodes.weight_standardization and fixed_ok,
        "bn_nodes": len(nodes.nodes),
        "ws_nodes": len(nodes.weight_standardization),
        "torch_rel": agreement.torch_error / agreement.scale,
        "ort_rel": agreement.graph_error / agreement.scale,
        "diff_rel": agreement.torch_difference / agreement.scale,
        "seconds": time.perf_counter() - start,
    }


def main(specs: list[str]) -> None:
    new = old = 0
    for spec in specs:
        try:
            row = judge(spec)
        except Exception as error:  # one line per model, go on with the next
            print(f"{spec:34s} ERROR {type(error).__name__}: {str(error)[:150]}", flush=True)
            continue
        new, old = new + row["new"], old + row["old"]
        print(
            f"{spec:34s} new {'accept' if row['new'] else 'REFUSE'}  "
            f"fixed-1e-5 {'accept' if row['old'] else 'REFUSE'}  "
            f"BN nodes {row['bn_nodes']} (+{row['ws_nodes']} WS)  "
            f"torch-f64 {row['torch_rel']:.1e}  "
            f"ort-f64 {row['ort_rel']:.1e}  ort-torch {row['diff_rel']:.1e}  "
            f"({row['seconds']:.0f} s)",
            flush=True,
        )
    print(f"accepted: {new} of {len(specs)} (float64 rule), {old} of {len(specs)} (fixed 1e-5)")


if __name__ == "__main__":
    main(sys.argv[1:] or list(MODELS))
