"""Fixtures shared by the torch tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def without_one_batch(monkeypatch):
    """``mode="eval"`` as on data too large to run as one batch (bnstats.torch._one_batch):
    the whole-pass and subset schedules that such data take."""
    monkeypatch.setattr("bnstats._one_batch.ONE_BATCH_BYTES", 0)
