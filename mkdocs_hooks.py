"""A hook of the documentation build (mkdocs.yml): the docstrings' Sphinx roles as links.

The docstrings name other objects the Sphinx way, ``:func:`bnstats.torch.recalibrate```;
mkdocstrings renders that as the text ``:func:`` before the code. Here the role is dropped
and the code becomes a cross-reference, resolved by mkdocs-autorefs where the reference
knows the name (a full dotted name, ``~`` dropped) and left as code where it does not.
"""

from __future__ import annotations

import re

_ROLE = re.compile(r":(?:func|class|meth|mod|data|attr|exc|obj):<code>~?([\w.]+)(\(\))?</code>")


def _link(match: re.Match) -> str:
    name = match[1]
    shown = f"<code>{name}{match[2] or ''}</code>"
    return f'<autoref identifier="{name}" optional>{shown}</autoref>' if "." in name else shown


def on_page_content(html: str, **_) -> str:
    """Every role in a rendered page, replaced before the cross-references are resolved."""
    return _ROLE.sub(_link, html)
