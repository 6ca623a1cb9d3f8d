"""history.npz and summary.json carry their format and version; a bad file gets one error
naming it."""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest

from bnstats._formats import FileFormatError
from bnstats.engine import GhostBatchNorm, Network
from bnstats.engine.training import History


@pytest.fixture
def saved(rng, tmp_path):
    net = Network.mlp([4, 6, 2], seed=0)
    X, y = rng.normal(size=(24, 4)), rng.integers(0, 2, size=24)
    net.fit(X, y, epochs=2, batch_size=8).save(tmp_path, summary={"note": "x"})
    with np.load(tmp_path / "history.npz") as data:
        arrays = {key: data[key] for key in data.files}
    return tmp_path, arrays


def test_both_files_carry_their_format_and_version(saved):
    folder, arrays = saved
    assert json.loads(str(arrays["__format__"])) == {
        "format": "bnstats.engine.History",
        "version": 1,
    }
    summary = History.load_summary(folder / "summary.json")
    assert summary["format"] == "bnstats.engine.History.summary" and summary["version"] == 1
    assert summary["steps"] == History.load(folder / "history.npz").steps == 6


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"__format__": None}, "not a bnstats history file (no __format__)"),
        ({"loss": None}, "missing arrays ['loss']"),
        ({"bn1/batch_mean": np.zeros((5, 6))}, "bn1/batch_mean has shape (5, 6), expected (6, 6)"),
        ({"bn1/ema_var": np.zeros((6, 3))}, "bn1/ema_var has shape (6, 3), expected (6, 6)"),
        ({"batch_size": np.zeros(2)}, "batch_size has shape (2,), expected (6,)"),
        ({"loss": np.array(["a"] * 6)}, "loss holds <U1, not real numbers"),
        (
            {
                "__format__": np.array(
                    json.dumps({"format": "bnstats.engine.History", "version": 2})
                )
            },
            "version 2; this bnstats reads version 1",
        ),
        ({"__format__": np.array("[1]")}, "its header is a list, not a JSON object"),
    ],
)
def test_a_bad_history_gets_one_error_naming_the_file(saved, change, message):
    folder, arrays = saved
    for key, value in change.items():
        if value is None:
            del arrays[key]
        else:
            arrays[key] = value
    np.savez(folder / "history.npz", **arrays)
    with pytest.raises(FileFormatError, match="history.npz") as caught:
        History.load(folder / "history.npz")
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"steps": 3, "layers": {}}', "holds None, not a bnstats.engine.History.summary file"),
        ("[]", "its header is a list"),
        ("{", "unreadable header"),
        ('{"format": "bnstats.engine.History.summary", "version": 1}', "damaged summary"),
    ],
)
def test_a_bad_summary_gets_one_error_naming_the_file(tmp_path, text, message):
    (tmp_path / "summary.json").write_text(text)
    with pytest.raises(FileFormatError, match="summary.json") as caught:
        History.load_summary(tmp_path / "summary.json")
    assert message in str(caught.value)


def _deep_json(depth: int = 100_000) -> str:
    return "[" * depth + "]" * depth


def test_deeply_nested_json_gets_the_one_line_error(saved):
    folder, arrays = saved
    arrays["__format__"] = np.array(_deep_json())
    np.savez(folder / "history.npz", **arrays)
    with pytest.raises(FileFormatError, match=r"history\.npz: unreadable header \(JSON nested"):
        History.load(folder / "history.npz")
    (folder / "summary.json").write_text(_deep_json())
    with pytest.raises(FileFormatError, match=r"summary\.json: unreadable header \(JSON nested"):
        History.load_summary(folder / "summary.json")


def test_a_csv_history_gets_an_error_naming_the_file_and_the_format(saved):
    folder, _ = saved
    csv = folder / "history.csv"
    csv.write_text("step,loss\n0,2.3\n1,2.1\n")
    with pytest.raises(FileFormatError) as caught:
        History.load(csv)
    message = str(caught.value)
    assert message.startswith(f"{csv} is not a .npz archive (it starts with b'step')")
    assert "expected a bnstats history file (history.npz, from History.save)" in message
    assert "pickle" not in message


def test_a_ghost_batch_norm_history_loads_with_its_several_updates_per_step(rng, tmp_path):
    """Ghost BN updates its estimators once per virtual batch: ``batch_mean`` has more rows
    than there are steps, the estimators' trajectories one per step; both load back."""
    net = Network.mlp([4, 6, 2], seed=0, norm=partial(GhostBatchNorm, ghost_size=4))
    X, y = rng.normal(size=(24, 4)), rng.integers(0, 2, size=24)
    history = net.fit(X, y, epochs=2, batch_size=12)
    history.save(tmp_path, summary={"note": "x"})
    loaded = History.load(tmp_path / "history.npz")
    layer = next(iter(history.layers))
    assert len(loaded.layers[layer]["batch_mean"]) == 3 * history.steps
    assert len(loaded.layers[layer]["ema_mean"]) == history.steps
