"""A run's output folder, replaced as one: every file of one run or every file of the last.

Each file is written atomically (:mod:`bnstats._files`), but a set of files is not: a run
killed or failing half-way through would leave new files beside old ones. So a run writes
into a fresh hidden sibling folder, ``.<name>.<random>.new.tmp``, and only when every file is
there swaps it with the output folder in one step: ``renameat2(RENAME_EXCHANGE)`` on Linux;
elsewhere two renames, old folder aside then new folder in (a run killed between them leaves
the old folder aside, and the next run puts it back). A failed run removes its folder and
leaves the old set as it was. Leftovers of killed runs (the sibling folders
``.<name>.<random>.new.tmp`` and ``.old.tmp``, staging files in the folder) are removed by
the next run.

The folder is swapped as a whole, so it may hold only what the run writes: regular files with
the names a run writes and their staging names (``.<name>.<random>.tmp``). A folder holding
anything else (another file, a folder or a link even if named like an output, any other
hidden ``.tmp``) is refused before any work is done, and so is a folder that is not
writable: the swap would put a writable one in its place.

An output path that is a symbolic link is refused too, before anything is touched. It has
two plausible meanings (replace the folder it points to, or point the link at the new run)
and the swap above fits neither: it exchanges directory entries, so it would put a real
folder where the user's link was. Guessing would change something the user owns; the error
names the folder the link points to, which a run can replace.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

from bnstats._files import check_name_fits, current_umask

NEW_SUFFIX = ".new.tmp"
OLD_SUFFIX = ".old.tmp"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def check_output_folder(out: str | Path, names: Collection[str], option: str = "--out") -> Path:
    """``out`` as a Path if a run may replace it: missing (its nearest existing ancestor a
    writable folder), or a writable folder holding only regular files named as in ``names``
    and the staging files of killed runs writing them (``.<name>.<random>.tmp``). Raises
    ``ValueError`` naming ``option`` otherwise (an empty name too); creates nothing."""
    if str(out) == "":
        raise ValueError(f"{option} is empty; give the folder to write in")
    out = Path(out)
    refuse_symlink(out, option)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{option} {out} is a file, not a folder")
    check_name_fits(option, out, len(".") + len(".") + 8 + len(NEW_SUFFIX))
    here = Path.cwd().resolve()
    if out.resolve() == here or out.resolve() in here.parents:
        raise ValueError(f"{option} {out} holds the working folder; give a folder inside it")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if not _ours(p, names))
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise ValueError(
                f"{option} {out} holds files a run did not write ({shown}); it is replaced "
                "as a whole, so give a new or empty folder"
            )
        if _read_only(out):
            raise ValueError(
                f"{option} {out}: the folder is read-only; a run would replace it, so make "
                "it writable or give another folder"
            )
    ancestor = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    if not ancestor.is_dir():
        raise ValueError(f"{option} {out}: {ancestor} is a file, not a folder")
    writable = out.parent if out.parent.exists() else ancestor
    if not os.access(writable, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {out}: cannot write in {writable}")
    return out


def _read_only(folder: Path) -> bool:
    """Not writable by this process, or by nobody at all (mode 555: root could still write,
    but the owner made it read-only)."""
    no_write_bits = folder.stat().st_mode & 0o222 == 0
    return no_write_bits or not os.access(folder, os.W_OK | os.X_OK)


def refuse_symlink(out: Path, option: str = "--out") -> None:
    """``ValueError`` if ``out`` itself is a symbolic link (dangling or not); see the module's
    docstring for why a link is not followed."""
    if out.is_symlink():
        target = os.readlink(out)
        raise ValueError(
            f"{option} {out} is a symbolic link (to {target}); give the folder itself "
            f"({out.resolve()}) or a new path"
        )


def _ours(path: Path, names: Collection[str]) -> bool:
    """Whether ``path`` is a regular file a run writes: one of ``names``, or the staging file
    of one (``.<name>.<random>.tmp``, from :func:`bnstats._files.atomic_write_bytes`)."""
    if path.is_symlink() or not path.is_file():
        return False
    name = path.name
    staging = name.endswith(".tmp") and any(name.startswith(f".{n}.") for n in names)
    return name in names or staging


@contextmanager
def one_generation(out: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder; when the block ends without error, the staging folder
    becomes ``out`` in one step and the previous ``out`` is removed. On error the staging
    folder is removed and ``out`` stays as it was. A symbolic link at ``out`` is refused
    (``ValueError``) before anything is created or removed."""
    out = Path(out)
    refuse_symlink(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=NEW_SUFFIX))
    try:
        yield staging
        staging.chmod(_folder_mode(out))
        _fsync(staging)
        _replace_folder(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync(out.parent)


def _folder_mode(out: Path) -> int:
    """The mode ``mkdir`` would give a new folder; an existing one keeps its own."""
    if out.is_dir():
        return out.stat().st_mode & 0o7777
    return 0o777 & ~current_umask()


def _replace_folder(new: Path, out: Path) -> None:
    """Put ``new`` at ``out`` and delete what was there."""
    if not out.exists():
        os.rename(new, out)
        return
    if _exchange(new, out):
        shutil.rmtree(new)  # now the previous generation
        return
    aside = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=OLD_SUFFIX))
    os.replace(out, aside)  # onto the empty folder just made, to reserve the name
    os.rename(new, out)
    shutil.rmtree(aside)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux's ``renameat2``; False where unavailable."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):  # not Linux, or no C library to load
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    done = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return done == 0


def remove_leftovers(out: Path) -> None:
    """Undo what killed runs left: put back a folder left aside, remove staging folders and
    ``.*.tmp`` files in ``out``."""
    prefix = f".{out.name}."
    leftovers = sorted(
        p for p in out.parent.iterdir() if p.name.startswith(prefix) and p.name.endswith(".tmp")
    )
    for path in leftovers:
        if not path.is_dir() or path.is_symlink():
            continue
        if path.name.endswith(OLD_SUFFIX) and not out.exists() and any(path.iterdir()):
            os.rename(path, out)
        elif path.name.endswith((NEW_SUFFIX, OLD_SUFFIX)):
            shutil.rmtree(path, ignore_errors=True)
    if out.is_dir():
        for path in out.glob(".*.tmp"):
            if path.is_file():
                path.unlink(missing_ok=True)


def _fsync(folder: Path) -> None:
    """Make a folder's entries durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
