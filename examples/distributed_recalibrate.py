"""Exact BN statistics over the data of every rank, with bnstats.torch.recalibrate.

Run on this machine (2 processes, gloo on the CPU):

    torchrun --nproc_per_node=2 examples/distributed_recalibrate.py

and across machines or on GPUs as docs/distributed.md shows (the script is the same: it
takes NCCL and one GPU per process when CUDA is available). Each rank holds a different
shard of synthetic data (different sizes, different means); after ``bt.recalibrate`` every
rank holds the statistics of all shards together, bit for bit the same on every rank, and
rank 0 checks them against one process recalibrating on the concatenated shards.
"""

from __future__ import annotations

import hashlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

import bnstats.torch as bt

SHARD_BATCHES = (3, 7, 5, 4)  # batches per rank (rank k takes entry k % 4)


def build_model() -> nn.Module:
    """The same weights on every rank (a fixed seed; load a checkpoint in real use)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, stride=2),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


def shard(rank: int) -> list[torch.Tensor]:
    """Rank ``rank``'s batches: its own number of batches, sizes and mean."""
    gen = torch.Generator().manual_seed(100 + rank)
    count = SHARD_BATCHES[rank % len(SHARD_BATCHES)]
    sizes = torch.randint(4, 17, (count,), generator=gen).tolist()
    return [torch.randn(n, 3, 16, 16, generator=gen) + 0.5 * rank for n in sizes]


def fingerprint(model: nn.Module) -> str:
    """A short hash of every BN buffer's bytes: equal strings mean bit-identical buffers."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if "running" in name or "num_batches" in name:
            digest.update(
                tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            )
    return digest.hexdigest()[:16]


def max_relative_difference(model: nn.Module, reference: nn.Module) -> float:
    """Largest difference of the BN buffers: means in standard deviations, variances
    relative to themselves."""
    worst = 0.0
    for got, expected in zip(model.modules(), reference.modules(), strict=True):
        if isinstance(got, nn.BatchNorm2d):
            sigma = expected.running_var.double().sqrt()
            mean_gap = (got.running_mean.double() - expected.running_mean.double()).abs() / sigma
            var_gap = (got.running_var.double() / expected.running_var.double() - 1).abs()
            worst = max(worst, float(mean_gap.max()), float(var_gap.max()))
    return worst


def choose_device() -> tuple[str, torch.device, str]:
    """One GPU per rank (NCCL) when there are at least as many GPUs as ranks on this machine,
    else gloo on the CPU: ``(backend, device, why)``. Several ranks on one GPU would fail at
    ``torch.cuda.set_device`` ("invalid device ordinal") or share it under NCCL, which refuses."""
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus >= local_ranks and gpus > 0:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        return "nccl", torch.device("cuda", local_rank), f"{gpus} GPU(s) for {local_ranks} ranks"
    why = f"{gpus} GPU(s) for {local_ranks} ranks" if gpus else "no GPU"
    return "gloo", torch.device("cpu"), why


def main() -> None:
    backend, device, why = choose_device()
    dist.init_process_group(backend, timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        print(f"backend {backend} on {device.type} ({why})", flush=True)

    model = build_model().to(device)
    batches = shard(rank)
    bt.recalibrate(model, batches)  # the default process group: every rank's data

    first = model[1]
    samples = sum(len(x) for x in batches)
    head = [round(v, 6) for v in first.running_mean[:3].tolist()]
    line = (
        f"rank {rank}/{world}: {len(batches)} batches, {samples} samples here; "
        f"layer '1' running_mean[:3] = {head}, "
        f"num_batches_tracked = {int(first.num_batches_tracked)}, "
        f"buffers sha256 {fingerprint(model)}"
    )
    lines: list[str | None] = [None] * world
    dist.all_gather_object(lines, line)  # rank 0 prints every rank's line, in rank order
    prints = [text.rsplit("sha256 ", 1)[1] for text in lines]
    if rank == 0:
        print("\n".join(lines), flush=True)
        reference = build_model().to(device)
        every_batch = [x for other in range(world) for x in shard(other)]
        bt.recalibrate(reference, every_batch, group=False)  # one process, all the data
        worst = max_relative_difference(model, reference)
        print(
            f"all {world} ranks bit-identical: {len(set(prints)) == 1}; "
            f"max relative difference from one process on all {len(every_batch)} batches: "
            f"{worst:.1e}",
            flush=True,
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
