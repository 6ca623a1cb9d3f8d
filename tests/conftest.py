"""Shared test helpers."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


@pytest.fixture(scope="session", autouse=True)
def _one_blas_thread():
    """The tests' matrices are small; one BLAS thread keeps OpenBLAS from spinning against
    torch's threads on a 2-core machine."""
    from bnstats._threads import one_blas_thread

    with one_blas_thread():
        yield
