"""Writing files so that nothing is ever half-written.

Every file bnstats writes goes to a temporary name in the same directory, is flushed to
disk, and is then renamed over the target (``os.replace`` is atomic on POSIX and Windows):
a reader sees the old file or the new one, never a truncated one. The file gets the mode
``open()`` would give it: an existing file keeps its mode, a new one ``0o666`` less the umask.
"""

from __future__ import annotations

import io
import os
import stat
import tempfile
from pathlib import Path

import numpy as np


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; the directory must exist."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: directory {path.parent} does not exist")
    mode = file_mode(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, mode)  # mkstemp's 0600 would otherwise survive os.replace
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


STAGING_AFFIXES = len(".") + len(".") + 8 + len(".tmp")
"""What :func:`atomic_write_bytes` adds to a name for its staging file:
``.<name>.<8 random characters>.tmp``."""


def check_name_fits(option: str, path: Path, affixes: int = STAGING_AFFIXES) -> None:
    """``ValueError`` naming ``option`` if ``path``'s name, with the ``affixes`` bytes a
    staging name adds, is longer than its file system takes (``PC_NAME_MAX``, else 255): the
    staging file would fail only once the work is done."""
    folder = next((p for p in (path.parent, *path.parent.parents) if p.is_dir()), Path("."))
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # not POSIX, or no limit to report
        limit = 255
    length = len(os.fsencode(path.name))
    if length + affixes > limit:
        raise ValueError(
            f"{option} {path.name[:20]}...: the name is {length} bytes; at most "
            f"{limit - affixes} fit here (the file system takes {limit}, and the hidden "
            f"staging name written first adds {affixes})"
        )


def file_mode(path: Path) -> int:
    """The permission bits ``open(path, "w")`` leaves: the existing file's, else ``0o666``
    less the process's umask."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return 0o666 & ~current_umask()


def current_umask() -> int:
    """The process's umask (``os.umask`` can only be read by setting it, so set it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """The bytes of an uncompressed ``.npz`` archive holding ``arrays``."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()
