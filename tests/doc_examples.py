"""The Python examples of README.md and docs/*.md: found, classified by their markers, run.

The rule every page follows (tests/test_doc_examples.py checks it for every page):

- A ```python block with no marker runs in CI: the page's unmarked blocks run in order in one
  namespace (a later block may use what an earlier one defined), in an empty temporary
  working folder.
- A block whose shown output should be checked is followed by a fenced block (any language)
  marked ``<!-- output -->`` on the line before it: it must equal what the Python block just
  before it printed (trailing spaces ignored).
- ``<!-- sketch: why -->`` on the line before a block: not run (it needs your model, your
  data, several ranks or a GPU); the reason is required.
- ``<!-- run by tests/some_test.py -->`` before a block, or once anywhere in a page as
  ``<!-- python blocks run by tests/some_test.py -->``: that test runs the block (or every
  block of the page); the named file must exist and name the page.
- A command's output shown in a page (``torchrun ... script.py``) is marked
  ``<!-- output of SCRIPT, checked by tests/x.py -->``; that test runs the command and
  compares (:func:`shown_output`).

A block that cannot run and carries no marker fails the test, naming the page and line.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

_FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w-]*)\s*$")
_MARKER = re.compile(r"^\s*<!--\s*(?P<text>.*?)\s*-->\s*$")
_PAGE_RUNNER = re.compile(r"^\s*<!--\s*python blocks run by (?P<test>\S+)\s*-->\s*$", re.M)


@dataclass(frozen=True)
class Block:
    """One fenced block of a page: where it starts (1-based line of the fence), its language,
    its text (indentation removed) and the HTML comment on the line before it, if any."""

    page: Path
    line: int
    lang: str
    code: str
    marker: str | None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def pages() -> list[Path]:
    """README.md and every page under docs/."""
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def blocks(page: Path, text: str | None = None) -> list[Block]:
    """Every fenced block of ``page`` (or of ``text``, read as that page), in order."""
    lines = (page.read_text() if text is None else text).splitlines()
    found, i = [], 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if fence is None:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), len(lines))
        code = textwrap.dedent("\n".join(lines[i + 1 : end])) + "\n"
        previous = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = _MARKER.match(previous)
        found.append(Block(page, i + 1, fence["lang"], code, marker["text"] if marker else None))
        i = end + 1
    return found


def page_runner(page: Path, text: str | None = None) -> str | None:
    """The test named by a ``<!-- python blocks run by tests/x.py -->`` line, if any."""
    match = _PAGE_RUNNER.search(page.read_text() if text is None else text)
    return match["test"] if match else None


def runner_of(block: Block) -> str | None:
    """The test a ``<!-- run by tests/x.py -->`` marker names, if the block has one."""
    if block.marker and block.marker.startswith("run by "):
        return block.marker.removeprefix("run by ").strip()
    return None


def check_runner(test: str, page: Path) -> None:
    """The named test file exists and names the page (so it can be running its blocks)."""
    path = ROOT / test
    assert path.is_file(), f"{page.name}: 'run by {test}', but there is no such file"
    assert page.name in path.read_text(), f"{test} never names {page.name}"


def run_page(page: Path, text: str | None = None) -> int:
    """Run every unmarked Python block of ``page`` (or ``text``) and compare each shown
    output; return how many blocks ran. Raises ``AssertionError`` naming the block's line."""
    namespace: dict = {"__name__": "__doc_example__"}
    ran, printed = 0, None
    for block in blocks(page, text):
        if block.marker == "output":
            _compare(block, printed)
            printed = None
            continue
        if block.lang != "python":
            continue
        _check_marker(block)
        if block.marker is not None:
            printed = None
            continue
        printed = _execute(block, namespace)
        ran += 1
    return ran


def _check_marker(block: Block) -> None:
    if block.marker is None or runner_of(block):
        return
    if block.marker.startswith("sketch"):
        reason = block.marker.removeprefix("sketch").lstrip(":").strip()
        assert reason, f"{block.where}: say why the block is a sketch (<!-- sketch: why -->)"
        return
    raise AssertionError(
        f"{block.where}: unknown marker <!-- {block.marker} --> before a python block "
        "(use 'sketch: why' or 'run by tests/x.py')"
    )


def _execute(block: Block, namespace: dict) -> str:
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(block.code, block.where, "exec"), namespace)
    except Exception as error:
        raise AssertionError(
            f"{block.where}: the example raised {type(error).__name__}: {error} (make it run, "
            "or mark it <!-- sketch: why --> on the line before)"
        ) from error
    return out.getvalue()


def _compare(block: Block, printed: str | None) -> None:
    assert printed is not None, (
        f"{block.where}: an <!-- output --> block must follow a Python block that runs"
    )
    shown = [line.rstrip() for line in block.code.rstrip("\n").splitlines()]
    got = [line.rstrip() for line in printed.rstrip("\n").splitlines()]
    assert got == shown, f"{block.where}: the page shows\n{shown}\nbut the example printed\n{got}"


def shown_output(page: str, script: str) -> list[str]:
    """The lines of the block of ``docs/page`` marked ``<!-- output of SCRIPT, checked by
    tests/x.py -->``: a command's output, which that test compares with the command's."""
    found = [b for b in blocks(DOCS / page) if (b.marker or "").startswith(f"output of {script}")]
    assert len(found) == 1, f"{page} has {len(found)} blocks marked 'output of {script}'"
    return found[0].code.rstrip("\n").splitlines()


def run_section_examples(page: str, section: str) -> dict:
    """Execute every ```python block under the ``## section`` heading of ``docs/page``."""
    path = DOCS / page
    text = path.read_text()
    match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"{page} has no section {section!r}"
    found = re.findall(r"```python\n(.*?)```", match.group(1), flags=re.S)
    assert found, f"{page}, section {section!r}, has no Python example"
    namespace: dict = {}
    for block in found:
        exec(compile(block, str(path), "exec"), namespace)
    return namespace


@contextlib.contextmanager
def working_folder(path: Path):
    """Run with ``path`` as the working folder (examples write files such as ``run/``)."""
    before = Path.cwd()
    os.chdir(path)
    try:
        yield path
    finally:
        os.chdir(before)
