"""The README's first screen gives the two commands, and CI runs the same test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _first_code_block() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def test_readme_gives_the_demo_and_the_test_command():
    demo, tests = _first_code_block()[:2]
    assert demo.endswith("bnstats demo") and "pip install" in demo
    assert "pytest" in tests and "pip install" in tests


def test_ci_runs_the_readme_test_command():
    tests = _first_code_block()[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in [line.strip() for line in ci]


def test_the_readme_s_inline_python_comparisons_hold():
    """Inline code such as `bnstats.momentum_from_decay(0.99) == 0.01` is a claim: it is
    evaluated and must be True (not merely close)."""
    import bnstats

    text = (ROOT / "README.md").read_text()
    claims = re.findall(r"`(bnstats\.[\w.]+\([^`]*\) == [^`]+)`", text)
    assert claims, "the README shows no inline comparison"
    for claim in claims:
        assert eval(claim, {"bnstats": bnstats}) is True, claim
