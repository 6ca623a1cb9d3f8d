"""``bnstats demo --norm renorm|ghost`` from the outside: the JSON names the normalization,
the layers are the chosen kind, and bad values exit with status 2 and one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bnstats.engine import BatchRenorm, GhostBatchNorm, Network
from bnstats.ghost import ghost_sizes

QUICK = ["--epochs", "2", "--hidden", "16", "--batch-size", "32"]


def test_renorm_json_and_saved_network(cli, tmp_path):
    result = cli("demo", "--json", "--norm", "renorm", *QUICK, "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["norm"] == "renorm" and "ghost_size" not in summary
    schedule = summary["renorm_schedule"]
    steps = summary["steps"]
    assert schedule["rmax_full_at"] == steps // 2 and schedule["warmup_steps"] < steps // 2
    net = Network.load(tmp_path / "network.npz")
    assert all(isinstance(layer, BatchRenorm) for layer in net.batchnorm_layers)
    assert net.batchnorm_layers[0].step == steps


def test_ghost_text_report(cli, tmp_path):
    result = cli("demo", "--norm", "ghost", "--ghost-size", "8", *QUICK, "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "Ghost Batch Norm (virtual batches of 8)" in result.stdout
    net = Network.load(tmp_path / "network.npz")
    layer = net.batchnorm_layers[0]
    assert isinstance(layer, GhostBatchNorm) and layer.ghost_size == 8
    with np.load(tmp_path / "history.npz") as history:
        batch_sizes = history["batch_size"].tolist()
    ghosts = sum(len(ghost_sizes(rows, 8)) for rows in batch_sizes)
    assert layer.estimators["ema"].num_batches_tracked == ghosts > len(batch_sizes)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--norm", "layer"], "invalid choice: 'layer'"),
        (["--ghost-size", "8"], "--ghost-size applies to --norm ghost only"),
        (["--norm", "ghost", "--ghost-size", "1"], "--ghost-size must lie between 2 and"),
        (["--norm", "ghost", "--ghost-size", "65"], "--batch-size 64, got 65"),
    ],
)
def test_bad_norm_arguments_exit_2_with_one_line(cli, args, message):
    result = cli("demo", *args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
