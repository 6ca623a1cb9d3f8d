"""``bnstats diagnose`` on a user's model and .npz data, run as a separate process."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")

USER_MODULE = """
import torch
from torch import nn

def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
"""


def _data(rng, n):
    """Three classes of 8-feature points around different centres, offset by 5."""
    y = rng.integers(0, 3, size=n)
    centres = np.eye(3, 8) * 3.0
    return (centres[y] + rng.normal(size=(n, 8)) + 5.0).astype(np.float32), y


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """usermodels.py, train.npz and test.npz (with labels y), inputs.npz (without), and
    weights.pt: the model trained here, its running statistics then reset to 0 and 1."""
    root = tmp_path_factory.mktemp("diagnose")
    (root / "usermodels.py").write_text(textwrap.dedent(USER_MODULE))
    rng = np.random.default_rng(0)
    x, y = _data(rng, 256)
    x_test, y_test = _data(rng, 200)
    np.savez(root / "train.npz", X=x, y=y)
    np.savez(root / "test.npz", X=x_test, y=y_test)
    np.savez(root / "inputs.npz", X=x)
    np.savez(root / "floaty.npz", X=x, y=y.astype(np.float32))
    namespace: dict = {}
    exec(USER_MODULE, namespace)
    model = namespace["make"]()
    optimizer = torch.optim.Adam(model.parameters(), 0.03)
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(5):
        for xs, ys in zip(inputs.split(32), labels.split(32), strict=True):
            loss = torch.nn.functional.cross_entropy(model(xs), ys)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model[1].reset_running_stats()
    torch.save(model.state_dict(), root / "weights.pt")
    return root


ARGS = ("diagnose", "--model", "usermodels:make", "--weights", "weights.pt", "--data", "train.npz")


def test_json_names_the_stale_statistics_with_accuracy(cli, project):
    result = cli(*ARGS, "--test", "test.npz", "--json", cwd=project)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["labelled"] and report["samples"] == 200
    assert set(report["settings"]) == {
        "as_is",
        "recalibrated",
        "recalibrated_eval",
        "batch_statistics",
        "test_statistics",
    }
    first = report["findings"][0]
    assert first["kind"] == "stale_statistics" and first["layers"] == ["1"]
    assert first["remedy"] == "bt.recalibrate(model, batches)"
    gain = report["settings"]["recalibrated"]["accuracy"] - report["settings"]["as_is"]["accuracy"]
    assert first["gain"] == pytest.approx(gain) and gain > 0.05


def test_table_and_page(cli, project):
    result = cli(*ARGS, "--out", "page", cwd=project)
    assert result.returncode == 0, result.stderr
    assert "stale_statistics" in result.stdout and "remedy: bt.recalibrate" in result.stdout
    assert "wrote" in result.stdout and "diagnose.html" in result.stdout
    page = (project / "page" / "diagnose.html").read_text()
    assert 'data-kind="stale_statistics"' in page


def test_without_labels_it_compares_outputs(cli, project):
    args = ["diagnose", "--model", "usermodels:make", "--weights", "weights.pt"]
    result = cli(*args, "--data", "inputs.npz", "--json", cwd=project)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert not report["labelled"] and report["settings"]["as_is"]["accuracy"] is None
    assert report["findings"][0]["kind"] == "stale_statistics"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--test", "missing.npz"), "--test: no such file missing.npz"),
        (("--data", "floaty.npz"), "integer class labels"),
        (("--out", "train.npz"), "is a file"),
    ],
)
def test_bad_input_exits_2_with_one_line(cli, project, args, message):
    base = list(ARGS)
    if args[0] == "--data":
        base[-1] = args[1]
        args = ()
    result = cli(*base, *args, cwd=project)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(("label", "option"), [(-1, "--test"), (3, "--test"), (7, "--data")])
def test_labels_outside_the_models_classes_are_refused(cli, project, label, option):
    """A label the model's 3 outputs cannot predict would score 0% in every setting and
    find nothing: refused, naming the file, y, the label and the output width."""
    x, y = _data(np.random.default_rng(1), 64)
    y[5] = label
    np.savez(project / f"label{label}.npz", X=x, y=y)
    base = list(ARGS)
    if option == "--data":
        base[-1] = f"label{label}.npz"
        args = ()
    else:
        args = ("--test", f"label{label}.npz")
    result = cli(*base, *args, cwd=project)
    assert result.returncode == 2, result.stdout
    assert result.stderr.strip() == (
        f"bnstats: error: label{label}.npz: y holds label {label}, but the model's output has "
        "3 columns (classes 0 to 2)"
    )
