"""One BLAS thread for the engine's small matrix products.

The engine multiplies matrices of a few hundred rows; splitting them over BLAS threads gains
nothing, and when the cores are busy OpenBLAS's waiting threads spin: ``bnstats demo`` took
37 s instead of 1.8 s on 2 cores shared with other work. threadpoolctl (a dependency of
scikit-learn, so present with the ``demo`` extra) limits the threads for a block of code;
without it nothing changes.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext


def one_blas_thread() -> AbstractContextManager:
    """A context in which NumPy's BLAS uses a single thread (a no-op without threadpoolctl)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return nullcontext()
    return threadpool_limits(limits=1, user_api="blas")
