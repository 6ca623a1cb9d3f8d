"""The name and version every file format of bnstats carries, and their check on load.

Each file holds a header ``{"format": NAME, "version": N}`` (JSON). A reader refuses, in one
line naming the file, a header that is not a JSON object, another format, or another version.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

ZIP_MAGIC = b"PK\x03\x04"
"""The first bytes of every ``.npz`` archive (a zip file)."""
NPY_MAGIC = b"\x93NUMPY"
"""The first bytes of a single ``.npy`` array."""


class FileFormatError(ValueError):
    """A file bnstats cannot read, with the file and what is wrong in one line."""


def format_header(name: str, version: int) -> dict[str, Any]:
    """The header a writer puts in a file of format ``name``."""
    return {"format": name, "version": version}


def parse_header(text: str, path: Path, error: type[FileFormatError] = FileFormatError) -> Any:
    """The JSON value in ``text``, or ``error`` naming ``path`` (also for JSON nested too
    deeply for Python's parser, which would otherwise raise a bare ``RecursionError``)."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path}: unreadable header ({err})") from None
    except RecursionError:
        raise error(f"{path}: unreadable header (JSON nested too deeply)") from None


def read_npz(
    path: Path, what: str, error: type[ValueError] = FileFormatError
) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` archive at ``path`` (nothing unpickled); ``error`` naming
    ``path`` and ``what`` it should be (``"a bnstats history file (history.npz)"``) when it
    is not a zip archive (a CSV, a pickle, a ``.npy``) or is damaged."""
    if not path.is_file() and not path.is_dir():
        raise FileNotFoundError(f"no {what} at {path}")
    with open_npz(path, what, error) as archive:
        return {key: npz_array(archive, key, path, error) for key in archive.files}


@contextmanager
def open_npz(path: Path, what: str, error: type[ValueError] = FileFormatError) -> Iterator[Any]:
    """The ``.npz`` archive at ``path`` opened with ``numpy.load`` (nothing unpickled; read
    its arrays with :func:`npz_array`), or ``error`` naming ``path`` when it is missing, a
    folder, not a zip archive (a CSV, a pickle, a ``.npy`` under an ``.npz`` name) or
    damaged; ``what`` says what it should be."""
    if path.is_dir():
        raise error(f"{path} is a directory, not a .npz file; expected {what}")
    if not path.is_file():
        raise error(f"{path}: no such file; expected {what}")
    with path.open("rb") as handle:
        start = handle.read(len(ZIP_MAGIC))
    if start == NPY_MAGIC[: len(start)] and start:
        raise error(
            f"{path} is not a .npz archive but a single .npy array (save arrays with "
            f"numpy.savez); expected {what}"
        )
    if start != ZIP_MAGIC:
        raise error(f"{path} is not a .npz archive (it starts with {start!r}); expected {what}")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise error(f"{path} is not a readable .npz archive ({err}); expected {what}") from None
    with archive:
        yield archive


def npz_array(
    archive: Any, key: str, path: Path, error: type[ValueError] = FileFormatError
) -> np.ndarray:
    """The array ``key`` of an archive from :func:`open_npz`; ``error`` naming ``path`` and
    ``key`` when it holds Python objects (which would need unpickling) or is damaged."""
    try:
        value = archive[key]
    except ValueError as err:
        if "allow_pickle" in str(err):
            raise error(
                f"{path}: array {key} holds Python objects, which bnstats does not unpickle; "
                "save arrays of numbers with numpy.savez"
            ) from None
        raise error(f"{path}: array {key} is not readable ({err})") from None
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise error(f"{path}: array {key} is not readable ({err})") from None
    if not isinstance(value, np.ndarray):
        raise error(f"{path}: {key} is not a .npy array (save with numpy.savez)")
    return value


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
