"""Fuzzing the data loaders: malformed npz and csv files give DataError naming the file, and
never another exception."""

from __future__ import annotations

import io
import zipfile

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bnstats.data import DataError, load_csv, load_npz

CSV_CELLS = st.one_of(
    st.sampled_from(["1", "-2.5", "nan", "inf", "", "label", "x", "1e309", " 3 ", '"4"', "0x10"]),
    st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=6),
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    header=st.lists(st.sampled_from(["a", "b", "label", "", "c"]), max_size=4),
    rows=st.lists(st.lists(CSV_CELLS, max_size=5), max_size=8),
    sep=st.sampled_from([",", ";", ",,"]),
)
def test_malformed_csv_gives_data_error_or_a_valid_dataset(tmp_path, header, rows, sep):
    path = tmp_path / "fuzz.csv"
    lines = [sep.join(header)] + [sep.join(row) for row in rows]
    path.write_text("\n".join(lines), encoding="utf-8")
    try:
        data = load_csv(path)
    except DataError as err:
        assert "fuzz.csv" in str(err)
        return
    assert np.isfinite(data.X_train).all() and data.y_train.min() >= 0
    assert data.X_train.shape[1] == data.X_test.shape[1]


ARRAYS = st.one_of(
    st.builds(np.zeros, st.tuples(st.integers(0, 4), st.integers(0, 3))),
    st.builds(np.zeros, st.tuples(st.integers(0, 4))),
    st.just(np.array(["a", "b"])),
    st.just(np.array([np.nan, 1.0])),
    st.just(np.array([[1.0, np.inf]])),
    st.just(np.array([0.5, 1.0])),
    st.just(np.array([-1, 0])),
    st.just(np.array([0, 1, 1, 0])),
    st.just(np.ones((4, 2)) + 0j),
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    arrays=st.dictionaries(
        st.sampled_from(["X_train", "y_train", "X_test", "y_test", "junk"]), ARRAYS
    )
)
def test_malformed_npz_gives_data_error_or_a_valid_dataset(tmp_path, arrays):
    path = tmp_path / "fuzz.npz"
    np.savez(path, **arrays)
    try:
        data = load_npz(path)
    except DataError as err:
        assert "fuzz.npz" in str(err)
        return
    assert np.isfinite(data.X_train).all() and len(data.y_train) == len(data.X_train)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(cut=st.integers(0, 2000), noise=st.binary(max_size=64))
def test_truncated_or_corrupted_npz(tmp_path, cut, noise):
    buffer = io.BytesIO()
    np.savez(
        buffer,
        X_train=np.ones((4, 2)),
        y_train=np.array([0, 1, 0, 1]),
        X_test=np.ones((2, 2)),
        y_test=np.array([0, 1]),
    )
    blob = buffer.getvalue()
    path = tmp_path / "broken.npz"
    path.write_bytes(blob[:cut] + noise)
    try:
        load_npz(path)
    except DataError as err:
        assert "broken.npz" in str(err)


def test_pickled_object_arrays_are_refused(tmp_path):
    path = tmp_path / "objects.npz"
    with zipfile.ZipFile(path, "w") as archive:
        buffer = io.BytesIO()
        np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        archive.writestr("X_train.npy", buffer.getvalue())
    try:
        load_npz(path)
    except DataError as err:
        assert "objects.npz" in str(err)
    else:
        raise AssertionError("an object array must not load")
