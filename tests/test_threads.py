"""The engine's BLAS thread limit (bnstats._threads)."""

from __future__ import annotations

import pytest

from bnstats._threads import one_blas_thread


def test_one_blas_thread_inside_the_block_only():
    threadpoolctl = pytest.importorskip("threadpoolctl")

    def blas_threads() -> list[int]:
        return [
            p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"
        ]

    before = blas_threads()
    with one_blas_thread():
        assert set(blas_threads()) <= {1}
    assert blas_threads() == before
