"""Every ```python block of README.md and docs/*.md runs here, with its shown output compared,
or is marked: a sketch with its reason, or run by a named test. The rule is in
tests/doc_examples.py's docstring (and CONTRIBUTING.md)."""

from __future__ import annotations

import importlib.util

import pytest

from tests.doc_examples import (
    ROOT,
    blocks,
    check_runner,
    page_runner,
    pages,
    run_page,
    runner_of,
    working_folder,
)

PAGES = pages()


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_python_block_runs_or_is_marked(page, tmp_path):
    found = [b for b in blocks(page) if b.lang == "python"]
    runner = page_runner(page)
    if runner is not None:
        check_runner(runner, page)
        return
    for block in found:
        if runner_of(block):
            check_runner(runner_of(block), page)
    runs = [b for b in found if b.marker is None]
    if any("torch" in b.code for b in runs) and importlib.util.find_spec("torch") is None:
        pytest.skip(f"{page.name}'s examples need PyTorch")
    with working_folder(tmp_path):
        assert run_page(page) == len(runs)


# -- the rule itself, on pages written here -------------------------------------------------

FAKE = ROOT / "docs" / "example.md"


def _page(*parts: str) -> str:
    return "\n".join(parts) + "\n"


def test_an_unmarked_block_that_cannot_run_fails_naming_its_line():
    text = _page("# page", "", "```python", "x = 1", "```", "", "```python", "model.eval()", "```")
    with pytest.raises(AssertionError, match=r"docs/example\.md:7: the example raised NameError"):
        run_page(FAKE, text)


def test_a_sketch_is_not_run_but_needs_a_reason():
    sketch = _page("<!-- sketch: model is yours -->", "```python", "model.eval()", "```")
    assert run_page(FAKE, sketch) == 0
    bare = _page("<!-- sketch -->", "```python", "model.eval()", "```")
    with pytest.raises(AssertionError, match="say why the block is a sketch"):
        run_page(FAKE, bare)
    unknown = _page("<!-- skip -->", "```python", "model.eval()", "```")
    with pytest.raises(AssertionError, match="unknown marker <!-- skip -->"):
        run_page(FAKE, unknown)


def test_shown_output_is_compared():
    code = ("```python", "print(2 + 2)", "print('four')", "```", "prints", "<!-- output -->")
    assert run_page(FAKE, _page(*code, "```", "4", "four", "```")) == 1
    with pytest.raises(AssertionError, match=r"example\.md:7: the page shows\n\['5', 'four'\]"):
        run_page(FAKE, _page(*code, "```", "5", "four", "```"))
    orphan = _page("<!-- sketch: x -->", "```python", "print(1)", "```", "<!-- output -->", "```")
    with pytest.raises(AssertionError, match="must follow a Python block that runs"):
        run_page(FAKE, orphan + "1\n```\n")


def test_blocks_share_one_namespace_per_page_and_indented_blocks_count():
    text = _page("```python", "x = 20", "```", "- item:", "", "  ```python", "  print(x + 1)")
    text += _page("  ```", "", "<!-- output -->", "```", "21", "```")
    assert run_page(FAKE, text) == 2


def test_a_named_runner_must_exist_and_name_the_page():
    check_runner("tests/test_conventions.py", ROOT / "docs" / "conventions.md")
    with pytest.raises(AssertionError, match="no such file"):
        check_runner("tests/test_nothing_here.py", FAKE)
    with pytest.raises(AssertionError, match="never names example.md"):
        check_runner("tests/test_conventions.py", FAKE)
