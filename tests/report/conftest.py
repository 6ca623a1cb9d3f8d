"""A short demo run shared by the report's tests (two epochs, two BatchNorm layers)."""

from __future__ import annotations

import pytest

from bnstats.demo import DemoConfig, DemoResult, run_demo

QUICK = DemoConfig(epochs=2, hidden=(16, 8))


@pytest.fixture(scope="session")
def quick_run() -> DemoResult:
    return run_demo(QUICK)


@pytest.fixture(scope="session")
def quick_page(quick_run) -> str:
    """The report page of :func:`quick_run` with the default layer and units."""
    from bnstats.report import demo_report_html

    return demo_report_html(quick_run)
