"""Run the Python examples of one section of a Markdown page, in order, as written."""

from __future__ import annotations

import re
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def run_section_examples(page: str, section: str) -> dict:
    """Execute every ```python block under the ``## section`` heading of ``docs/page``."""
    path = DOCS / page
    text = path.read_text()
    match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"{page} has no section {section!r}"
    blocks = re.findall(r"```python\n(.*?)```", match.group(1), flags=re.S)
    assert blocks, f"{page}, section {section!r}, has no Python example"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(path), "exec"), namespace)
    return namespace
