"""The audit's plain-text table (bnstats.torch._audit_table): worst first, aligned columns."""

from __future__ import annotations

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
