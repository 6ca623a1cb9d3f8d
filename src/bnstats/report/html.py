"""A self-contained HTML page: sections of a figure, the sentences beside it, and tables.

The page needs nothing but itself: styles are inline, figures are ``data:`` URIs, scripts
are inline and allowed one by one by their SHA-256 in the Content-Security-Policy, which
forbids the browser to fetch anything else, so a page that tried would show it as an error
in the console rather than quietly reach out. Every piece of text is HTML-escaped; a
section's ``widget`` is markup the report builds itself, with its values escaped.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

from bnstats import __version__
from bnstats._files import atomic_write_text

FOOTER = f"Written by bnstats {__version__}. The page is self-contained: it loads nothing."
"""The footer of every page bnstats writes."""

CONTENT_SECURITY_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto;
       max-width: 72em; padding: 1em 1.5em 3em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; }
nav ol { padding-left: 1.2em; }
.row { display: grid; grid-template-columns: minmax(0, 3fr) minmax(16em, 2fr); gap: 1.5em;
       align-items: start; }
.row figure { margin: 0; }
.row img { width: 100%; height: auto; border: 1px solid #eee; }
.row.text-only { grid-template-columns: minmax(0, 1fr); }
@media (max-width: 55em) { .row { grid-template-columns: minmax(0, 1fr); } }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.95em; }
table { display: block; max-width: 100%; overflow-x: auto; }  /* wider than the screen: the
        table scrolls sideways in its own box, the page does not */
caption { text-align: left; font-weight: 600; padding-bottom: 0.3em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25em 0.8em; text-align: left; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
footer { margin-top: 3em; color: #777; font-size: 0.9em; }
.momentum input[type=range] { width: 100%; max-width: 36em; display: block; }
.momentum output { font-weight: 600; font-variant-numeric: tabular-nums; }
.momentum .scale { color: #555; font-size: 0.9em; margin: 0.2em 0 0.8em; }
.momentum svg.panel { width: 100%; max-width: 30em; height: auto; display: block;
       border: 1px solid #eee; margin: 0.3em 0; }
.momentum svg.panel.small { max-width: none; }
.momentum svg .tick { font-size: 13px; fill: #555; }
.momentum svg .title { fill: #222; }
#momentum-panels { display: grid; grid-template-columns: repeat(auto-fill, minmax(20em, 1fr));
       gap: 0.5em; }
"""


@dataclass(frozen=True)
class Table:
    """A table of text cells; the columns listed in ``numeric`` are right-aligned."""

    header: Sequence[str]
    rows: Sequence[Sequence[str]]
    caption: str = ""
    numeric: Sequence[int] = ()

    def __post_init__(self) -> None:
        for row in self.rows:
            if len(row) != len(self.header):
                raise ValueError(
                    f"table {self.caption!r}: a row has {len(row)} cells, the header "
                    f"{len(self.header)}"
                )


@dataclass(frozen=True)
class Image:
    """An embedded figure: a ``data:`` URI and the text read in its place."""

    src: str
    alt: str

    def __post_init__(self) -> None:
        if not self.src.startswith("data:"):
            raise ValueError("the page embeds its images: give a data: URI, not a link")


@dataclass(frozen=True)
class Section:
    """A heading, an optional figure with ``sentences`` beside it, then ``tables``."""

    anchor: str
    title: str
    sentences: Sequence[str]
    image: Image | None = None
    tables: Sequence[Table] = field(default_factory=tuple)
    widget: str = ""


def content_security_policy(scripts: Sequence[str]) -> str:
    """:data:`CONTENT_SECURITY_POLICY`, allowing exactly the inline ``scripts`` (by hash)."""
    if not scripts:
        return CONTENT_SECURITY_POLICY
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() + "'"
        for s in scripts
    )
    return f"{CONTENT_SECURITY_POLICY}; script-src {hashes}"


def render_page(
    title: str,
    intro: Sequence[str],
    sections: Sequence[Section],
    footer: str = "",
    scripts: Sequence[str] = (),
) -> str:
    """The whole page as one string; ``scripts`` run at the end of the body."""
    policy = content_security_policy(scripts)
    toc = "".join(f'<li><a href="#{escape(s.anchor)}">{escape(s.title)}</a></li>' for s in sections)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{policy}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title>",
        f"<style>{STYLE}</style>",
        "</head>",
        "<body>",
        f"<h1>{escape(title)}</h1>",
        *(f"<p>{escape(text)}</p>" for text in intro),
        f"<nav><ol>{toc}</ol></nav>",
        *(render_section(section) for section in sections),
        f"<footer>{escape(footer)}</footer>" if footer else "",
        *(f"<script>{script}</script>" for script in scripts),
        "</body>",
        "</html>",
    ]
    return "\n".join(part for part in parts if part) + "\n"


def report_data(report: Any) -> dict[str, Any]:
    """What a page reads: ``report.to_dict()``, or ``report`` itself when it is that dict."""
    return report.to_dict() if hasattr(report, "to_dict") else dict(report)


def write_page(page: str, directory: str | Path, name: str) -> Path:
    """Write ``page`` as ``directory/name`` (the directory created if missing), atomically;
    returns its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(directory / name, page)


def render_section(section: Section) -> str:
    """One ``<section>``: heading, figure and sentences side by side, tables below."""
    text = "".join(f"<p>{escape(sentence)}</p>" for sentence in section.sentences)
    if section.image is None:
        row = f'<div class="row text-only"><div>{text}</div></div>' if text else ""
    else:
        img = f'<img src="{escape(section.image.src)}" alt="{escape(section.image.alt)}">'
        row = f'<div class="row"><figure>{img}</figure><div>{text}</div></div>'
    tables = "".join(render_table(table) for table in section.tables)
    return (
        f'<section id="{escape(section.anchor)}"><h2>{escape(section.title)}</h2>'
        f"{row}{section.widget}{tables}</section>"
    )


def render_table(table: Table) -> str:
    """A ``<table>`` with an optional caption."""
    numeric = set(table.numeric)

    def cells(values: Sequence[str], tag: str) -> str:
        attrs = ["" if i not in numeric else ' class="num"' for i in range(len(values))]
        return "".join(f"<{tag}{a}>{escape(v)}</{tag}>" for a, v in zip(attrs, values, strict=True))

    caption = f"<caption>{escape(table.caption)}</caption>" if table.caption else ""
    head = f"<thead><tr>{cells(table.header, 'th')}</tr></thead>"
    body = "".join(f"<tr>{cells(row, 'td')}</tr>" for row in table.rows)
    return f"<table>{caption}{head}<tbody>{body}</tbody></table>"
