"""The audit's plain-text table (bnstats.torch._audit_table): worst first, aligned columns."""

from __future__ import annotations

import pytest

import bnstats.torch as bt
from bnstats.torch.audit import format_report
from tests.torch.models import TinyResNet, image_batches, scramble_batchnorm


def test_rows_are_worst_first_and_aligned():
    model = scramble_batchnorm(TinyResNet(), seed=1).eval()
    report = bt.audit(model, image_batches(n_batches=2))
    lines = format_report(report).splitlines()
    assert lines[0].startswith("bnstats audit: 6 BN layers, 16 samples in 2 batches")
    header = next(i for i, line in enumerate(lines) if line.startswith("layer"))
    body = lines[header + 1 :]
    assert [row.split()[0] for row in body] == [layer.name for layer in report.worst_first()]
    kl_column = lines[header].index("KL mean/max")
    assert all(len(row) >= kl_column for row in body)
    assert str(report) == format_report(report)


def _legend(text: str) -> list[str]:
    lines = text.splitlines()
    return lines[: next(i for i, line in enumerate(lines) if line.startswith("layer"))]


def test_the_legend_fits_100_columns_and_says_what_worst_means():
    model = scramble_batchnorm(TinyResNet(), seed=1).eval()
    text = str(bt.audit(model, image_batches(n_batches=2)))
    legend = _legend(text)
    assert len(legend) >= 5 and max(map(len, legend)) <= 100, legend
    joined = " ".join(" ".join(legend).split())
    assert "worst is the channel farthest from 1 either way (so it may lie below the mean)" in (
        joined
    )
    for term in ("shift", "var ratio", "KL", "rel. s.e."):
        assert any(line.strip().startswith(term) for line in legend), term


def test_a_worst_var_ratio_below_the_mean_is_the_channel_farthest_from_one():
    """Channel ratios 1.5, 1.5 and 0.2: the mean 1.07 and the worst 0.2 (|log 0.2| largest)."""
    import torch

    bn = torch.nn.BatchNorm2d(3).eval()
    batches = [torch.randn(16, 3, 4, 4, generator=torch.Generator().manual_seed(i)) for i in (0, 1)]
    population = torch.cat(batches).transpose(0, 1).flatten(1)
    with torch.no_grad():
        bn.running_mean.copy_(population.mean(1))
        bn.running_var.copy_((population.var(1) + bn.eps) * torch.tensor([1.5, 1.5, 0.2]) - bn.eps)
    ratio = bt.audit(bn, batches).layers[0].var_ratio
    assert ratio.channel == 2 and ratio.worst < ratio.mean
    assert ratio.worst == pytest.approx(0.2, rel=1e-5)


def test_a_layer_record_counts_values_per_channel_and_the_report_rows():
    model = scramble_batchnorm(TinyResNet(), seed=1).eval()
    batches = image_batches(n_batches=2)
    record = bt.audit(model, batches).to_dict()
    rows = sum(len(batch) for batch in batches)
    assert record["samples"] == rows
    for layer, audit in zip(record["layers"], bt.audit(model, batches).layers, strict=True):
        assert "samples" not in layer and layer["values_per_channel"] == audit.samples
    first = next(layer for layer in record["layers"] if layer["name"] == "stem.1")
    assert first["values_per_channel"] > rows
