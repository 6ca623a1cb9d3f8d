"""The name and version every file format of bnstats carries, and their check on load.

Each file holds a header ``{"format": NAME, "version": N}`` (JSON). A reader refuses, in one
line naming the file, a header that is not a JSON object, another format, or another version.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class FileFormatError(ValueError):
    """A file bnstats cannot read, with the file and what is wrong in one line."""


def format_header(name: str, version: int) -> dict[str, Any]:
    """The header a writer puts in a file of format ``name``."""
    return {"format": name, "version": version}


def parse_header(text: str, path: Path, error: type[FileFormatError] = FileFormatError) -> Any:
    """The JSON value in ``text``, or ``error`` naming ``path``."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path}: unreadable header ({err})") from None


def check_header(
    header: Any,
    path: Path,
    name: str,
    version: int,
    error: type[FileFormatError] = FileFormatError,
) -> dict[str, Any]:
    """``header`` if it names format ``name`` at ``version``; else ``error`` naming ``path``."""
    if not isinstance(header, dict):
        raise error(
            f"{path} is not a {name} file: its header is a {type(header).__name__}, "
            "not a JSON object"
        )
    if header.get("format") != name:
        raise error(f"{path} holds {header.get('format')!r}, not a {name} file")
    found = header.get("version")
    if type(found) is not int or found != version:
        raise error(
            f"{path} is {name} format version {found!r}; this bnstats reads version {version}"
        )
    return header
