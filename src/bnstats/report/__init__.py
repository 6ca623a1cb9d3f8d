"""Figures (matplotlib) and the self-contained HTML report of a demo run.

``write_demo_report(result, directory)`` writes ``report.html`` for a
:class:`bnstats.demo.DemoResult`: the lecture's picture of per-batch ``mu`` and ``var``
with the running averages through them, test accuracy per test-time method, and test
accuracy against test batch size. Importing this package does not import matplotlib;
drawing the figures needs it (the ``report`` extra) and raises
:class:`ReportDependencyError` without it.
"""

from bnstats.report.demo_report import (
    INSTALL_HINT,
    REPORT_NAME,
    ReportDependencyError,
    demo_report_html,
    write_demo_report,
)
from bnstats.report.lecture import LectureTrace, lecture_traces, unbiased_batch_var

__all__ = [
    "INSTALL_HINT",
    "REPORT_NAME",
    "LectureTrace",
    "ReportDependencyError",
    "demo_report_html",
    "lecture_traces",
    "unbiased_batch_var",
    "write_demo_report",
]
