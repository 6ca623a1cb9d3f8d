"""Datasets for the engine: the embedded handwritten digits, and users' npz and csv files.

Every loader returns a :class:`Dataset` of float64 features and integer labels ``0..k-1``, or
raises :class:`DataError` with one line naming the file and what is wrong with it.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bnstats._formats import npz_array, open_npz

DIGITS = "digits"
DIGITS_FILE = ("datasets", "data", "digits.csv.gz")
"""Where scikit-learn keeps the digits, inside its package folder."""
NPZ_KEYS = ("X_train", "y_train", "X_test", "y_test")
LARGEST_FEATURE = 1e150
"""Features larger in magnitude are refused: their squares (in a variance) overflow float64."""


class DataError(ValueError):
    """Input data that cannot be used, with the file and the reason in one line."""


@dataclass
class Dataset:
    """Train and test splits; ``y`` holds integer labels in ``[0, classes)``."""

    name: str
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray

    @property
    def features(self) -> int:
        return self.X_train.shape[1]

    @property
    def classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1


def load_dataset(spec: str, *, seed: int = 0, test_fraction: float = 0.25) -> Dataset:
    """``"digits"``, a ``.npz`` file or a ``.csv`` file (split by ``test_fraction``, ``seed``)."""
    if spec == DIGITS:
        return load_digits(seed=seed, test_fraction=test_fraction)
    path = Path(spec)
    suffix = path.suffix.lower()
    if suffix not in (".npz", ".csv"):
        raise DataError(f"unknown dataset {spec!r}: give 'digits', a .npz file or a .csv file")
    if path.is_dir():
        raise DataError(f"{path} is a directory, not a file")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if suffix == ".npz":
        return load_npz(path)
    return load_csv(path, seed=seed, test_fraction=test_fraction)


def load_digits(*, seed: int = 0, test_fraction: float = 0.25) -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes), pixels scaled
    to [0, 1], split with stratification by ``seed``. Needs the ``demo`` extra."""
    X, y = digits_arrays()
    X, y = X / 16.0, y.astype(np.int64)
    train, test = stratified_split(y, test_fraction, seed)
    return Dataset(DIGITS, X[train], y[train], X[test], y[test])


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The digits' pixels (1797, 64) in 0..16 and labels (1797,), as
    ``sklearn.datasets.load_digits`` returns them.

    They are read from the file scikit-learn ships, ``sklearn/datasets/data/digits.csv.gz``
    (one row per image: 64 pixels, then the label), the way scikit-learn reads it, without
    importing scikit-learn: the import alone costs about a second of CPU, most of the demo's
    start-up. Where that file is not found (a packaging that hides it), scikit-learn's own
    loader is used.
    """
    path = _bundled_digits_file()
    if path is None:
        try:
            from sklearn.datasets import load_digits as sklearn_digits
        except ImportError:
            raise DataError(
                "the digits dataset needs scikit-learn: pip install scikit-learn "
                '(from a bnstats checkout: pip install ".[demo]")'
            ) from None
        bunch = sklearn_digits()
        return bunch.data, bunch.target
    with gzip.open(path, mode="rt", encoding="utf-8") as text:
        table = np.loadtxt(text, delimiter=",")
    return table[:, :-1], table[:, -1].astype(int)


def _bundled_digits_file() -> Path | None:
    """scikit-learn's ``datasets/data/digits.csv.gz``, located without importing scikit-learn
    (``find_spec`` of a top-level package runs none of its code); None if not there."""
    try:
        spec = importlib.util.find_spec("sklearn")
    except (ImportError, ValueError):
        return None
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root, *DIGITS_FILE)
        if path.is_file():
            return path
    return None


def stratified_split(
    y: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of a train/test split keeping each class's share (at least one test row
    per class with two or more rows)."""
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test fraction must lie strictly between 0 and 1, got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == label))
        n_test = int(round(test_fraction * len(rows)))
        n_test = min(max(n_test, 1 if len(rows) > 1 else 0), len(rows) - 1)
        test.append(rows[:n_test])
        train.append(rows[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_npz(path: str | Path) -> Dataset:
    """An ``.npz`` with ``X_train``, ``y_train``, ``X_test``, ``y_test``."""
    path = Path(path)
    what = f"a dataset with arrays {', '.join(NPZ_KEYS)}"
    with open_npz(path, what, DataError) as archive:
        missing = [key for key in NPZ_KEYS if key not in archive.files]
        if missing:
            raise DataError(f"{path}: missing arrays {missing}; expected {list(NPZ_KEYS)}")
        arrays = {key: npz_array(archive, key, path, DataError) for key in NPZ_KEYS}
    X_train = _features(arrays["X_train"], path, "X_train")
    X_test = _features(arrays["X_test"], path, "X_test")
    if X_test.shape[1] != X_train.shape[1]:
        raise DataError(
            f"{path}: X_train has {X_train.shape[1]} columns but X_test has {X_test.shape[1]}"
        )
    y_train = _labels(arrays["y_train"], len(X_train), path, "y_train")
    y_test = _labels(arrays["y_test"], len(X_test), path, "y_test")
    _check_test_labels(y_train, y_test, path)
    return Dataset(path.name, X_train, y_train, X_test, y_test)


def load_csv(
    path: str | Path, *, seed: int = 0, test_fraction: float = 0.25, label: str = "label"
) -> Dataset:
    """A ``.csv`` with a header row, a ``label`` column and numeric feature columns; labels
    may be integers or names (sorted names become 0, 1, ...)."""
    path = Path(path)
    header, rows = _read_csv_rows(path)
    if label not in header:
        raise DataError(f"{path}: no {label!r} column; the columns are {header}")
    li = header.index(label)
    if len(header) < 2:
        raise DataError(f"{path}: no feature columns besides {label!r}")
    X = np.empty((len(rows), len(header) - 1))
    raw_labels = []
    names = [h for i, h in enumerate(header) if i != li]
    for r, row in enumerate(rows, start=2):
        if len(row) != len(header):
            raise DataError(f"{path}: line {r} has {len(row)} fields, the header has {len(header)}")
        raw_labels.append(row[li].strip())
        values = [v for i, v in enumerate(row) if i != li]
        for c, (value, name) in enumerate(zip(values, names, strict=True)):
            X[r - 2, c] = _number(value, path, r, name)
    X = _features(X, path, "features")
    y = _encode_labels(raw_labels, path)
    train, test = stratified_split(y, test_fraction, seed)
    if len(test) == 0:
        raise DataError(f"{path}: too few rows ({len(rows)}) to hold out a test set")
    return Dataset(path.name, X[train], y[train], X[test], y[test])


def _read_csv_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:  # with or without a BOM
            reader = csv.reader(handle)
            header = [h.strip() for h in next(reader, [])]
            rows = [row for row in reader if any(field.strip() for field in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path}: cannot read as CSV ({err})") from None
    if not header:
        raise DataError(f"{path}: empty file (a header row with a 'label' column is needed)")
    if len(rows) < 2:
        raise DataError(f"{path}: {len(rows)} data rows; at least 2 are needed")
    return header, rows


def _number(value: str, path: Path, line: int, column: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise DataError(
            f"{path}: line {line}, column {column!r}: {value!r} is not a number"
        ) from None


def _features(X: np.ndarray, path: Path, key: str) -> np.ndarray:
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise DataError(f"{path}: {key} must be a non-empty 2-D array, got shape {X.shape}")
    if not np.issubdtype(X.dtype, np.number) or np.issubdtype(X.dtype, np.complexfloating):
        raise DataError(f"{path}: {key} must be real numbers, got dtype {X.dtype}")
    X = X.astype(np.float64)
    bad = np.argwhere(~np.isfinite(X))
    if len(bad):
        row, col = bad[0]
        raise DataError(
            f"{path}: {key} holds {len(bad)} NaN/Inf values (first at row {row}, column {col})"
        )
    huge = np.argwhere(np.abs(X) > LARGEST_FEATURE)
    if len(huge):
        row, col = huge[0]
        raise DataError(
            f"{path}: {key} holds {len(huge)} values beyond ±{LARGEST_FEATURE:g}, whose squares "
            f"overflow (first {X[row, col]:g} at row {row}, column {col}); rescale the features"
        )
    return X


def _labels(y: np.ndarray, n: int, path: Path, key: str) -> np.ndarray:
    if y.shape != (n,):
        raise DataError(f"{path}: {key} must have shape ({n},), got {y.shape}")
    if np.issubdtype(y.dtype, np.floating):
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise DataError(f"{path}: {key} must hold whole-number class labels")
        if len(y) and np.abs(y).max() >= 2.0**63:  # beyond int64: the cast would wrap
            raise DataError(f"{path}: {key} has label {y.max():g}; labels must be 0, 1, 2, ...")
    elif not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: {key} must hold integer class labels, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.min() < 0:
        raise DataError(f"{path}: {key} has label {y.min()}; labels must be 0, 1, 2, ...")
    return y


def _check_test_labels(y_train: np.ndarray, y_test: np.ndarray, path: Path) -> None:
    unseen = sorted(set(np.unique(y_test).tolist()) - set(np.unique(y_train).tolist()))
    if unseen:
        raise DataError(f"{path}: y_test has labels {unseen} that never occur in y_train")


def _encode_labels(raw: list[str], path: Path) -> np.ndarray:
    try:
        numbers = np.array([float(v) for v in raw])
    except ValueError:
        names = sorted(set(raw))
        return np.array([names.index(v) for v in raw], dtype=np.int64)
    if not np.all(np.isfinite(numbers)) or not np.all(numbers == np.round(numbers)):
        raise DataError(f"{path}: numeric labels must be whole numbers")
    if numbers.min() < 0:
        raise DataError(f"{path}: label {numbers.min():g} is negative; labels must be 0, 1, ...")
    if numbers.max() >= 2**63:
        raise DataError(f"{path}: label {numbers.max():g} is too large; labels must be 0, 1, ...")
    return numbers.astype(np.int64)
