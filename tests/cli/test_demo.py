"""``bnstats demo`` from the outside: its table, its JSON, its files, its errors."""

from __future__ import annotations

import json
import warnings
import zipfile

import numpy as np
import pytest

from bnstats.data import NPZ_KEYS
from bnstats.methods import METHODS

QUICK = ["--epochs", "3", "--hidden", "32"]


def test_json_output_is_one_object(cli):
    result = cli("demo", "--json", *QUICK)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["dataset"] == "digits" and summary["epochs"] == 3
    assert set(summary["test_accuracy"]) == set(METHODS)
    assert summary["layers"][0]["features"] == 32


def test_table_and_picture(cli, tmp_path):
    result = cli("demo", *QUICK, "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    for method in METHODS:
        assert method in result.stdout
    assert "running average" in result.stdout and "EMA" in result.stdout
    assert {p.name for p in (tmp_path / "run").iterdir()} >= {
        "history.npz",
        "summary.json",
        "network.npz",
    }


def test_user_npz_and_csv(cli, tmp_path, rng):
    X = rng.normal(size=(120, 4))
    y = (X[:, 0] + X[:, 1] > 0).astype(int)
    np.savez(tmp_path / "d.npz", X_train=X[:90], y_train=y[:90], X_test=X[90:], y_test=y[90:])
    result = cli("demo", "--json", "--data", str(tmp_path / "d.npz"), "--batch-size", "16", *QUICK)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["dataset"] == "d.npz"
    lines = ["x0,x1,x2,x3,label"] + [
        ",".join(map(str, [*row, t])) for row, t in zip(X, y, strict=True)
    ]
    (tmp_path / "d.csv").write_text("\n".join(lines))
    result = cli(
        "demo",
        "--json",
        "--data",
        str(tmp_path / "d.csv"),
        "--test-fraction",
        "0.5",
        "--batch-size",
        "16",
        *QUICK,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["test_rows"] == 60


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "missing.npz"], "missing.npz: no such file"),
        (["--data", "mnist"], "unknown dataset 'mnist'"),
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--batch-size", "1"], "--batch-size must be at least 2"),
        (["--batch-size", "5000"], "too few for --batch-size 5000"),
        (["--momentum", "1.5"], "--momentum must lie in"),
        (["--hidden", "12,x"], "expected widths"),
        (["--hidden", "128,,64"], "expected widths like 128,64, got '128,,64'"),
        (["--epochs", "1000000000"], "steps: choose fewer --epochs"),
        (["--data", "digits.npz", "--test-fraction", "0.5"], "--test-fraction does not apply"),
        (["--nonsense"], "unrecognized arguments"),
        (["--seed", "-1"], "argument --seed: expected an integer >= 0, got '-1'"),
        (["--lr", "inf"], "argument --lr: expected a finite number > 0, got 'inf'"),
        (["--lr", "nan"], "argument --lr: expected a finite number > 0, got 'nan'"),
        (
            ["--hidden", "1000000000"],
            "an MLP 64-1000000000-10 needs about 55,283 GiB of memory, more than this machine's",
        ),
    ],
)
def test_bad_arguments_exit_2_with_one_line(cli, tmp_path, args, message):
    result = cli("demo", *args, "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert list(tmp_path.iterdir()) == [], "nothing is written"


@pytest.mark.parametrize("size", ["0", "-3"])
def test_a_batch_size_below_2_is_refused_before_the_memory_estimate(cli, size):
    """The memory estimate divides by the batch size: every option is checked before it."""
    result = cli("demo", "--batch-size", size)
    assert result.returncode == 2, result.stderr
    assert (
        result.stderr
        == f"bnstats: error: --batch-size must be at least 2 for batch norm, got {size}\n"
    )


def test_no_command_prints_help(cli):
    result = cli()
    assert result.returncode == 2 and "demo" in result.stderr


def _npz(path, rng, **changes):
    arrays = {
        "X_train": rng.normal(size=(40, 3)),
        "y_train": np.arange(40) % 2,
        "X_test": rng.normal(size=(10, 3)),
        "y_test": np.arange(10) % 2,
    }
    arrays.update(changes)
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"X_train": np.full((40, 3), np.nan)}, "X_train holds 120 NaN/Inf values"),
        ({"y_test": np.arange(10) % 3}, "labels [2] that never occur in y_train"),
        ({"y_train": -(np.arange(40) % 2)}, "labels must be 0, 1, 2"),
        ({"y_train": np.r_[np.arange(39) % 2, 1e300]}, "y_train has label 1e+300"),
        ({"X_test": np.zeros((10, 4))}, "X_train has 3 columns but X_test has 4"),
        ({"X_train": np.full((40, 3), 1e300)}, "X_train holds 120 values beyond ±1e+150"),
        (
            {"y_train": np.arange(40) % 2 * 10**9, "y_test": np.arange(10) % 2 * 10**9},
            "bad.npz has labels up to 1000000000, one output unit each",
        ),
    ],
)
def test_bad_data_files_exit_2_with_one_line(cli, tmp_path, rng, change, message):
    path = _npz(tmp_path / "bad.npz", rng, **change)
    out = str(tmp_path / "out")
    result = cli("demo", "--data", path, "--batch-size", "8", "--epochs", "1", "--out", out)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert "bad.npz" in result.stderr and "Traceback" not in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["bad.npz"], "nothing is written"


def test_training_that_fails_leaves_no_folder_and_one_line(cli, tmp_path):
    """Adam with a step of 1e300 overflows: numpy warns, then batch norm refuses NaN."""
    result = cli("demo", "--lr", "1e300", *QUICK, "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "NaN or Inf" in result.stderr and "(after a warning" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_npz_members_that_are_not_arrays_exit_2(cli, tmp_path):
    path = tmp_path / "zipped.npz"
    with zipfile.ZipFile(path, "w") as archive:
        for key in ("X_train", "y_train", "X_test", "y_test"):
            archive.writestr(key, "hello")
    result = cli("demo", "--data", str(path))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "zipped.npz: X_train is not a .npy array" in result.stderr


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (lambda p: np.save(p.open("wb"), np.zeros((10, 3))), "is not a .npz archive but a single"),
        (lambda p: p.write_text("hello"), "is not a .npz archive (it starts with b'hell')"),
        (lambda p: p.mkdir(), "is a directory, not a file"),
        (
            lambda p: np.savez(p, **{k: np.array([[1], [2, 3]], dtype=object) for k in NPZ_KEYS}),
            "array X_train holds Python objects",
        ),
    ],
)
def test_files_that_are_no_npz_archive_exit_2_naming_the_file(cli, tmp_path, write, message):
    path = tmp_path / "data.npz"
    write(path)
    result = cli("demo", "--data", str(path), "--epochs", "1")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"{path} {message}" in result.stderr or f"{path}: {message}" in result.stderr


def test_csv_with_a_byte_order_mark_runs(cli, tmp_path, rng):
    X = rng.normal(size=(60, 2))
    lines = ["label,x0,x1"] + [f"{int(a > 0)},{a},{b}" for a, b in X]
    (tmp_path / "excel.csv").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode())
    result = cli(
        "demo", "--json", "--data", str(tmp_path / "excel.csv"), "--batch-size", "9", *QUICK
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["dataset"] == "excel.csv"


def test_out_at_an_existing_file_exit_2(cli, tmp_path):
    (tmp_path / "taken").write_text("x")
    result = cli("demo", *QUICK, "--out", str(tmp_path / "taken"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "taken is a file, not a folder" in result.stderr


def test_warnings_keep_to_one_line_each(monkeypatch, capsys):
    """A warning before an error folds into the error's line; after success, one line each."""
    from bnstats import cli as command

    def warn_then(outcome):
        def run(args):
            warnings.warn("first thing\nover two lines", RuntimeWarning, stacklevel=1)
            warnings.warn("second thing", UserWarning, stacklevel=1)
            if outcome == "fail":
                raise ValueError("it failed")
            return 0

        return run

    monkeypatch.setattr(command.demo, "run", warn_then("fail"))
    assert command.main(["demo"]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == "bnstats: error: it failed (after a warning and 1 more: first thing over two lines)\n"
    )
    monkeypatch.setattr(command.demo, "run", warn_then("succeed"))
    assert command.main(["demo"]) == 0
    err = capsys.readouterr().err
    assert err == "bnstats: warning: first thing over two lines\nbnstats: warning: second thing\n"


def test_wrong_columns_in_csv_exit_2(cli, tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("a,b,target\n1,2,0\n3,4,1\n")
    result = cli("demo", "--data", str(path))
    assert result.returncode == 2 and "no 'label' column" in result.stderr
    assert result.stderr.count("\n") == 1


def test_unwritable_out_directory_exit_2(cli, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = cli("demo", *QUICK, "--out", str(blocker / "run"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr


def test_json_gives_the_chance_level(cli):
    summary = json.loads(cli("demo", "--json", *QUICK).stdout)
    assert summary["chance_level"] == pytest.approx(0.102, abs=0.001)
    assert summary["test_accuracy"]["batch@1"] <= summary["chance_level"] + 0.02
