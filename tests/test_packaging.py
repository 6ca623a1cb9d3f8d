"""What a user depending on bnstats gets: py.typed in the package, an API reference for every
public module and a site whose navigation lists every page; CI checks the built wheel."""

from __future__ import annotations

import importlib.util
import re

from tests.doc_examples import DOCS, ROOT

PUBLIC_MODULES = (
    "bnstats",
    "bnstats.stats",
    "bnstats.precision",
    "bnstats.functional",
    "bnstats.engine",
    "bnstats.conventions",
    "bnstats.torch",
    "bnstats.lightning",
    "bnstats.onnx",
    "bnstats.keras",
    "bnstats.flax",
)


PYPROJECT = (ROOT / "pyproject.toml").read_text()  # read as text: tomllib is Python 3.11+


def test_py_typed_is_in_the_package_and_its_data():
    assert (ROOT / "src" / "bnstats" / "py.typed").is_file()
    section = PYPROJECT.split("[tool.setuptools.package-data]")[1].split("\n[")[0]
    assert re.search(r'^bnstats = \[.*"py\.typed".*\]', section, re.M), section


def test_the_docs_extra_is_part_of_dev():
    docs = re.search(r"^docs = \[(.*)\]$", PYPROJECT, re.M)[1]
    assert '"mkdocs>=' in docs and '"mkdocstrings[python]>=' in docs
    dev = re.search(r'^dev = \[\n\s*"bnstats\[([^\]]*)\]"', PYPROJECT, re.M)[1]
    assert "docs" in dev.split(",")


def test_every_page_is_in_the_site_navigation():
    config = (ROOT / "mkdocs.yml").read_text()
    listed = set(re.findall(r":\s*(\S+\.md)\s*$", config, re.M))
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert pages - listed == set(), "add these pages to nav in mkdocs.yml"
    assert listed - pages == set(), "mkdocs.yml lists pages that do not exist"


def test_every_public_module_has_a_reference_page():
    directives = set()
    for page in (DOCS / "api").glob("*.md"):
        directives |= set(re.findall(r"^::: ([\w.]+)\s*$", page.read_text(), re.M))
    assert directives == set(PUBLIC_MODULES)


def test_ci_builds_the_docs_strictly_and_runs_the_wheel_without_torch():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "mkdocs build --strict" in ci
    assert "pip wheel --quiet --no-deps" in ci and "[demo]" in ci
    assert 'find_spec("torch") is None' in ci and 'bnstats" demo' in ci


def test_the_hook_turns_sphinx_roles_into_references():
    spec = importlib.util.spec_from_file_location("mkdocs_hooks", ROOT / "mkdocs_hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    html = "see :func:<code>~bnstats.torch.recalibrate</code> and :meth:<code>save()</code>"
    assert hooks.on_page_content(html) == (
        'see <autoref identifier="bnstats.torch.recalibrate" optional>'
        "<code>bnstats.torch.recalibrate</code></autoref> and <code>save()</code>"
    )
