"""bnstats.flax is tested in processes without torch."""

from __future__ import annotations

import pytest

from tests.torch_free import torch_free


@pytest.fixture(autouse=True)
def _torch_free():
    yield from torch_free()
