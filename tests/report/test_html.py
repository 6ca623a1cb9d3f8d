"""The page builder: escaped text, embedded images only, tables that fit their header."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest

from bnstats.report.html import (
    CONTENT_SECURITY_POLICY,
    Image,
    Section,
    Table,
    render_page,
)

PIXEL = "data:image/png;base64,iVBORw0KGgo="


class Collector(HTMLParser):
    """Tags with their attributes, and the text, of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def parse(page: str) -> Collector:
    collector = Collector()
    collector.feed(page)
    return collector


def test_page_escapes_text_and_keeps_structure():
    section = Section(
        "a<b",
        "x < y & z",
        sentences=["<script>alert(1)</script>"],
        image=Image(PIXEL, alt='say "hi"'),
        tables=(Table(("k", "v"), [("<b>", "1.0")], caption="c&d", numeric=(1,)),),
    )
    page = render_page("T <1>", ["intro & more"], [section], footer="f")
    assert "<script>" not in page and "&lt;script&gt;" in page
    parsed = parse(page)
    text = "".join(parsed.text)
    assert "x < y & z" in text and "intro & more" in text and "<b>" in text
    imgs = [attrs for tag, attrs in parsed.tags if tag == "img"]
    assert imgs == [{"src": PIXEL, "alt": 'say "hi"'}]
    cells = [attrs.get("class") for tag, attrs in parsed.tags if tag in ("td", "th")]
    assert cells == [None, "num", None, "num"]
    assert ("section", {"id": "a<b"}) in parsed.tags


def test_page_is_self_contained():
    page = render_page("T", [], [Section("s", "S", ["one"], image=Image(PIXEL, "alt"))])
    metas = [attrs for tag, attrs in parse(page).tags if tag == "meta"]
    assert {"http-equiv": "Content-Security-Policy", "content": CONTENT_SECURITY_POLICY} in metas
    assert "default-src 'none'" in CONTENT_SECURITY_POLICY
    assert not re.search(r"(src|href)=\"(https?:|//)", page)
    assert "<script" not in page and "<link" not in page


def test_image_must_be_embedded():
    with pytest.raises(ValueError, match="data: URI"):
        Image("https://example.com/figure.png", "alt")


def test_table_rows_must_match_the_header():
    with pytest.raises(ValueError, match="table 'accuracy': a row has 3 cells, the header 2"):
        Table(("a", "b"), [("1", "2", "3")], caption="accuracy")


def test_section_without_figure_or_text_is_just_its_tables():
    page = render_page("T", [], [Section("s", "S", (), tables=(Table(("a",), [("1",)]),))])
    assert 'class="row' not in page and "<table>" in page
