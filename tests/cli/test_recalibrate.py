"""``bnstats recalibrate --mode`` and ``--tolerance`` (bnstats.cli.recalibrate), through the
command's ``main``, against ``bnstats.torch`` called directly on the same model and data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bnstats.cli import main

torch = pytest.importorskip("torch")

import bnstats.torch as bt  # noqa: E402
from tests.cli.user_project import user_module  # noqa: E402

MODEL = ["--model", "usermodels.py:make"]


def _npz_batches(folder, name: str, batch_size: int) -> list:
    inputs = torch.from_numpy(np.load(folder / name)["X"].astype(np.float32))
    return list(torch.split(inputs, batch_size))


def _recalibrate(folder, capsys, *options: str) -> dict:
    args = ["recalibrate", *MODEL, "--data", "data.npz", "--out", "new.pt", "--json", *options]
    assert main([*args, "--batch-size", "8"]) == 0
    return json.loads(capsys.readouterr().out)


def test_mode_eval_writes_the_eval_mode_statistics(project_here, capsys):
    summary = _recalibrate(project_here, capsys, "--mode", "eval")
    assert summary["pass"]["mode"] == "eval" and summary["pass"]["passes"] == 3  # one batch
    expected = bt.recalibrate(
        user_module(project_here).make(), _npz_batches(project_here, "data.npz", 8), mode="eval"
    )
    written = torch.load(project_here / "new.pt", weights_only=True)
    for key, value in expected.state_dict().items():
        assert torch.equal(written[key], value), key
    train = bt.recalibrate(
        user_module(project_here).make(), _npz_batches(project_here, "data.npz", 8)
    )
    assert not torch.equal(written["4.running_mean"], train.state_dict()["4.running_mean"])


def test_tolerance_stops_early_as_the_python_api_does(project_here, capsys):
    rng = np.random.default_rng(1)
    np.savez(project_here / "many.npz", X=rng.normal(size=(400, 2, 6, 6)).astype(np.float32))
    args = [*MODEL, "--data", "many.npz", "--batch-size", "4", "--out", "new.pt", "--json"]
    assert main(["recalibrate", *args, "--tolerance", "0.2"]) == 0
    taken = json.loads(capsys.readouterr().out)["pass"]
    expected = bt.recalibrate_report(
        user_module(project_here).make(), _npz_batches(project_here, "many.npz", 4), tolerance=0.2
    )
    assert taken["tolerance"] == 0.2 and taken["tolerance_met"] is True
    assert taken["miss_probability"] == pytest.approx(expected.miss_probability, rel=1e-12)
    assert taken["miss_probability"] <= 0.05
    assert taken["batches"] == expected.batches < taken["data_batches"] == 100
    assert taken["samples"] == expected.samples == 4 * expected.batches
    assert taken["worst_relative_error"] == pytest.approx(expected.worst[1], rel=1e-12)
    written = torch.load(project_here / "new.pt", weights_only=True)
    for key, value in expected.model.state_dict().items():
        assert torch.equal(written[key], value), key


def test_the_text_output_says_what_the_pass_took(project_here, capsys):
    args = ["recalibrate", *MODEL, "--data", "data.npz", "--out", "new.pt", "--mode", "eval"]
    assert main(args) == 0
    assert "recalibrated (eval mode) on 30 samples in 1 batches, 3 pass(es)" in (
        capsys.readouterr().out
    )


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--tolerance", "0"], "argument --tolerance: expected a finite number > 0, got '0'"),
        (["--tolerance", "nan"], "argument --tolerance: expected a finite number > 0"),
        (["--mode", "test"], "argument --mode: invalid choice: 'test'"),
    ],
)
def test_bad_pass_options_are_one_line(project_here, capsys, option, message):
    args = ["recalibrate", *MODEL, "--data", "data.npz", "--out", "new.pt", *option]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (project_here / "new.pt").exists()


@pytest.mark.parametrize(("command", "option"), [("recalibrate", "--out"), ("fold", "--onnx")])
def test_a_name_without_room_for_its_staging_name_is_refused_before_any_work(
    project_here, capsys, command, option
):
    name = "b" * 250 + ".pt"  # the file system takes it; '.<name>.<random>.tmp' it does not
    args = [command, *MODEL, "--data", "usermodels.py:failing_batches", "--out", "x.pt"]
    if option == "--out":
        args[-1] = name
    else:
        args += ["--onnx", name]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bnstats: error: {option} bbbb") and "the name is 253 bytes" in err
    assert "x.pt" not in [p.name for p in project_here.iterdir()]


def test_one_batch_mib_sets_the_budget_of_the_one_batch(project_here, capsys):
    summary = _recalibrate(project_here, capsys, "--mode", "eval", "--one-batch-mib", "0")
    assert summary["pass"]["passes"] > 3  # no one batch: the whole passes
    expected = bt.recalibrate(
        user_module(project_here).make(),
        _npz_batches(project_here, "data.npz", 8),
        mode="eval",
        one_batch_bytes=0,
    )
    written = torch.load(project_here / "new.pt", weights_only=True)
    for key, value in expected.state_dict().items():
        assert torch.equal(written[key], value), key


def test_a_negative_one_batch_mib_is_refused_in_one_line(project_here, capsys):
    args = ["recalibrate", *MODEL, "--data", "data.npz", "--out", "new.pt"]
    assert main([*args, "--mode", "eval", "--one-batch-mib", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--one-batch-mib: expected a finite number >= 0, got '-1'" in err
    assert len(err.strip().splitlines()) == 1
