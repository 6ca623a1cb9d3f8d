"""A command's output files: checked before any work, written all together or not at all.

:func:`check_outputs` refuses, in one line, an output that is a folder, whose folder is
missing or not writable, whose name the file system does not take, that two options share
(``--out X --onnx X``) or that names an input (``--out mymodel.py`` for
``--model mymodel.py:build``, ``--out`` equal to ``--data`` or ``--weights``): a file is
created under each name and removed again, so that the work is not done for nothing.
:func:`written_together` stages every file under a short hidden name beside its target and
renames them all into place only once every one is complete; if anything fails before, the
staged files are removed and no output changes. An interruption during the renames can
leave later outputs missing, never an old output beside a new one.
"""

from __future__ import annotations

import io
import os
import pickle
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bnstats._files import check_name_fits, file_mode

STAGING_PREFIX = ".bnstats-"
STAGING_SUFFIX = ".tmp"


def check_outputs(outputs: Mapping[str, str | Path], inputs: Mapping[str, Path]) -> None:
    """Raise ``ValueError`` naming the option if an output (by option, ``{"--out": path}``)
    cannot be written, is shared by two options or is one of ``inputs`` (by option)."""
    seen: dict[Path, str] = {}
    for option, given in outputs.items():
        if str(given) == "":
            raise ValueError(f"{option} is empty; give a file name")
        path = Path(given)
        _check_writable(option, path)
        for other, earlier in seen.items():
            if _same_file(path, other):
                raise ValueError(f"{option} {given} is also {earlier}; give two different names")
        for input_option, source in inputs.items():
            if _same_file(path, source):
                raise ValueError(
                    f"{option} {given} is the {input_option} file {source}: writing it would "
                    "replace an input; give another name"
                )
        seen[path] = option


def check_page_folder(option: str, directory: str, page: str, inputs: Mapping[str, Path]) -> Path:
    """``directory/page``, for a command writing one page into the folder ``option`` names
    (``audit --out DIR``), checked as :func:`check_outputs` checks a file: ``directory`` is a
    folder where ``page`` can be written, or is missing and can be created in an existing
    folder (it is made, its parents are not)."""
    folder = Path(directory)
    if directory == "":
        raise ValueError(f"{option} is empty; give the folder to write {page} in")
    if folder.is_dir():
        check_outputs({option: folder / page}, inputs)
    elif folder.exists():
        raise ValueError(f"{option} {folder} is a file; give the folder to write {page} in")
    else:
        check_outputs({option: folder}, inputs)
    return folder / page


def saved_bytes(torch: Any, obj: Any, option: str = "--out") -> bytes:
    """What ``torch.save(obj, file)`` writes; ``ValueError`` naming ``option`` when ``obj``
    cannot be pickled (a class not importable by its module's name)."""
    buffer = io.BytesIO()
    try:
        torch.save(obj, buffer)
    except (pickle.PicklingError, AttributeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(
            f"{option}: torch.save cannot pickle the model ({first}); every class it keeps "
            "must be importable by its module's name: name the file as a module "
            "(--model module:factory) or rename it to a valid, unused module name"
        ) from None
    return buffer.getvalue()


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def _check_writable(option: str, path: Path) -> None:
    """The folder exists, ``path`` is no folder, its name leaves room for a staging name, and
    a file of that name can be made there."""
    if not path.parent.is_dir():
        raise ValueError(f"{option} {path}: directory {path.parent} does not exist")
    check_name_fits(option, path)
    try:
        if path.is_dir():
            raise ValueError(f"{option} {path} is a directory; give a file name")
        if path.exists():
            if not os.access(path.parent, os.W_OK | os.X_OK):
                raise ValueError(f"{option} {path}: cannot write in {path.parent}")
            return
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as err:
        raise ValueError(f"{option} {path}: cannot create it ({err.strerror})") from None
    path.unlink()


@contextmanager
def written_together(paths: list[Path]) -> Iterator[dict[Path, Path]]:
    """Yield, for each target, an empty staging file in its folder to write in full; when
    the block ends without error, each becomes its target (with the mode ``open()`` would
    give it). On error, or if staging fails, every staging file is removed and no target
    changes.

    The renames are one after the other, so to make a mix of old and new files impossible
    the targets after the first are removed before the first rename. Interrupted there (a
    signal, a full disk), the targets are all old, or the first old and some later ones
    missing, or the first new and some later ones missing; never an old file beside a new
    one."""
    staging: dict[Path, Path] = {}
    try:
        for path in paths:
            fd, name = tempfile.mkstemp(
                dir=path.parent, prefix=STAGING_PREFIX, suffix=STAGING_SUFFIX
            )
            os.close(fd)
            staging[path] = Path(name)
        yield staging
        for path, staged in staging.items():
            os.chmod(staged, file_mode(path))
        for path in paths[1:]:  # no old file may stay beside a new first one
            path.unlink(missing_ok=True)
        for path, staged in staging.items():
            os.replace(staged, path)
    finally:
        for staged in staging.values():
            staged.unlink(missing_ok=True)


__all__ = ["check_outputs", "check_page_folder", "saved_bytes", "written_together"]
