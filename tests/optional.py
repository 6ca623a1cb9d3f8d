"""Optional packages in the tests: skipped where missing, required where CI installs them.

``.ci/run`` installs every optional package the tests use and sets
``BNSTATS_REQUIRE_EXTRAS=1``: there a missing package fails the test instead of skipping it.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def optional_import(name: str) -> ModuleType:
    """``import name``, or skip the test (fail under ``BNSTATS_REQUIRE_EXTRAS=1``)."""
    if os.environ.get("BNSTATS_REQUIRE_EXTRAS") == "1":
        return importlib.import_module(name)
    return pytest.importorskip(name)
