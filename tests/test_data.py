"""Data loaders: the digits split, npz and csv files, and their errors."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import numpy as np
import pytest

from bnstats import data as data_module
from bnstats.data import (
    DataError,
    digits_arrays,
    load_csv,
    load_dataset,
    load_digits,
    load_npz,
    stratified_split,
)
from tests.optional import optional_import


def test_digits_split_is_fixed_by_seed_and_stratified():
    a, b, c = load_digits(seed=0), load_digits(seed=0), load_digits(seed=1)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.X_test, c.X_test)
    assert len(a.X_train) + len(a.X_test) == 1797 and a.classes == 10 and a.features == 64
    assert a.X_train.min() >= 0.0 and a.X_train.max() <= 1.0
    shares = np.bincount(a.y_test) / len(a.y_test)
    assert shares.min() > 0.08 and shares.max() < 0.12


def test_digits_read_from_the_bundled_file_equal_scikit_learns_loader():
    sklearn_datasets = optional_import("sklearn.datasets")
    X, y = digits_arrays()
    bunch = sklearn_datasets.load_digits()
    assert X.dtype == bunch.data.dtype and y.dtype == bunch.target.dtype
    np.testing.assert_array_equal(X, bunch.data)
    np.testing.assert_array_equal(y, bunch.target)


def test_digits_load_without_importing_scikit_learn():
    optional_import("sklearn")
    code = (
        "import sys; from bnstats.data import load_digits; load_digits(); "
        "print('sklearn' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_digits_fall_back_to_scikit_learn_where_the_file_is_not_found(monkeypatch):
    optional_import("sklearn")
    expected = digits_arrays()
    monkeypatch.setattr(data_module, "_bundled_digits_file", lambda: None)
    X, y = digits_arrays()
    np.testing.assert_array_equal(X, expected[0])
    np.testing.assert_array_equal(y, expected[1])


def test_digits_without_scikit_learn_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(data_module.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(DataError, match="needs scikit-learn: pip install scikit-learn"):
        load_digits()


def test_npz_round_trip(rng, tmp_path):
    path = tmp_path / "d.npz"
    X = rng.normal(size=(10, 3))
    np.savez(
        path, X_train=X, y_train=np.arange(10) % 2, X_test=X[:4], y_test=np.array([0, 1, 0, 1])
    )
    data = load_npz(path)
    assert data.features == 3 and data.classes == 2 and data.name == "d.npz"


def test_csv_with_named_labels(tmp_path):
    path = tmp_path / "d.csv"
    rows = ["a,b,label"] + [f"{i},{i * 2},{'cat' if i % 2 else 'dog'}" for i in range(20)]
    path.write_text("\n".join(rows) + "\n")
    data = load_csv(path, test_fraction=0.3, seed=0)
    assert data.features == 2 and data.classes == 2
    assert len(data.X_test) == 6 and len(data.X_train) == 14


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("a,b\n1,2\n3,4\n", "no 'label' column"),
        ("a,label\n1,0\nx,1\n3,0\n", r"line 3, column 'a': 'x' is not a number"),
        ("a,label\n1,0\nnan,1\n3,0\n", "NaN"),
        ("a,label\n1,0\n2,-1\n3,0\n", "negative"),
        ("a,label\n1,0\n2,1e20\n3,0\n", "label 1e\\+20 is too large"),
        ("a,label\n1,0\n", "at least 2"),
        ("", "empty file"),
        ("a,label\n1,0\n2\n3,1\n", "line 3 has 1 fields"),
    ],
)
def test_bad_csv_files(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        load_csv(path)
    assert "bad.csv" in str(info.value)


def test_bad_npz_files(rng, tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, X_train=np.zeros((3, 2)))
    with pytest.raises(DataError, match=r"bad.npz: missing arrays \['y_train'"):
        load_npz(path)
    good = {
        "X_train": rng.normal(size=(4, 2)),
        "y_train": np.array([0, 1, 0, 1]),
        "X_test": rng.normal(size=(2, 2)),
        "y_test": np.array([0, 2]),
    }
    np.savez(path, **good)
    with pytest.raises(DataError, match=r"labels \[2\] that never occur"):
        load_npz(path)
    np.savez(path, **{**good, "X_test": rng.normal(size=(2, 3)), "y_test": np.array([0, 1])})
    with pytest.raises(DataError, match="2 columns but X_test has 3"):
        load_npz(path)
    path.write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(DataError, match="not a readable"):
        load_npz(path)


def test_unknown_dataset_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'mnist'"):
        load_dataset("mnist")
    with pytest.raises(DataError, match="no such file"):
        load_dataset(str(tmp_path / "x.csv"))


def test_stratified_split_keeps_every_class(rng):
    y = np.repeat(np.arange(4), [2, 5, 9, 1])
    train, test = stratified_split(y, 0.3, 0)
    assert set(y[test]) == {0, 1, 2} and set(y[train]) == {0, 1, 2, 3}
    assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == len(y)
    with pytest.raises(DataError, match="between 0 and 1"):
        stratified_split(y, 1.0, 0)


def test_csv_with_a_byte_order_mark(tmp_path):
    """Excel's "CSV UTF-8" starts the file with a byte-order mark."""
    path = tmp_path / "excel.csv"
    rows = ["label,a,b"] + [f"{i % 2},{i},{i * 2}" for i in range(12)]
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(rows).encode())
    data = load_csv(path, test_fraction=0.25, seed=0)
    assert data.features == 2 and data.classes == 2 and len(data.X_train) == 8
    assert sorted(data.X_train[:, 0] * 2) == sorted(data.X_train[:, 1])


def test_npz_members_that_are_not_arrays(tmp_path):
    path = tmp_path / "zipped.npz"
    with zipfile.ZipFile(path, "w") as archive:
        for key in ("X_train", "y_train", "X_test", "y_test"):
            archive.writestr(key, "hello")
    with pytest.raises(DataError, match=r"zipped.npz: X_train is not a .npy array"):
        load_npz(path)


def test_features_whose_squares_overflow_are_refused(rng, tmp_path):
    path = tmp_path / "huge.csv"
    path.write_text("a,label\n1,0\n1e300,1\n3,0\n4,1\n")
    with pytest.raises(DataError, match=r"huge.csv: features holds 1 values beyond ±1e\+150"):
        load_csv(path)
