"""The rule of the tests of bnstats.keras and bnstats.flax: no torch in their process.

Their ``conftest.py`` uses :func:`torch_free_fixture`: a test skips when torch is already
imported (the main test run, where other tests import it) and fails if torch was imported
while it ran. ``python tests/run_torch_free.py`` runs them in processes of their own.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

SKIP_REASON = (
    "torch is imported in this process; bnstats.keras and bnstats.flax are tested without it: "
    "python tests/run_torch_free.py"
)


def torch_free() -> Iterator[None]:
    """Skip if torch is imported already; fail if the test imported it."""
    if "torch" in sys.modules:
        pytest.skip(SKIP_REASON)
    yield
    assert "torch" not in sys.modules, "the test imported torch"
