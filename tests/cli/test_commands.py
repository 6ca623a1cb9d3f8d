"""The ``bnstats`` command itself (bnstats.cli): one module per command, a bare call, and
``--help`` showing defaults."""

from __future__ import annotations

import importlib

import pytest

import bnstats.cli as command


def test_every_command_is_one_module_listed_once():
    for name in command.COMMANDS:
        module = importlib.import_module(f"bnstats.cli.{name}")
        assert name == module.NAME
        assert isinstance(module.HELP, str) and module.HELP
        assert callable(module.add_arguments) and callable(module.run)
    choices = command.build_parser()._subparsers._group_actions[0].choices
    assert list(choices) == list(command.COMMANDS)


def test_a_bare_bnstats_is_one_line_pointing_at_help(cli):
    result = cli()
    assert result.returncode == 2 and result.stdout == ""
    names = ", ".join(command.COMMANDS)
    assert result.stderr == f"bnstats: error: give a command: {names} (see --help)\n"


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("demo", ["--epochs EPOCHS       passes over the data (default: 20)", "(default: 0)"]),
        ("recalibrate", ["(default: 64)", "(default: train)"]),
        ("audit", ["(default: 64)"]),
        ("fold", ["(default: 64)"]),
    ],
)
def test_help_shows_the_defaults(capsys, name, shown):
    with pytest.raises(SystemExit) as done:
        command.main([name, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for words in shown:
        assert words in text, text
    assert "(default: None)" not in text and "(default: False)" not in text


MODEL = ["--model", "usermodels.py:make"]


def _odd_files(folder):
    """data65.npz (65 rows of 7, for ``broken``: 64 + a last batch of one), a checkpoint
    holding a numpy scalar, an empty .onnx."""
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    np.savez(folder / "data65.npz", X=np.random.default_rng(0).normal(size=(65, 7)))
    torch.save({"epoch": np.float64(3.0)}, folder / "numpy.pt")
    (folder / "empty.onnx").write_bytes(b"")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["audit", "--model", "usermodels.py:broken", "--data", "data65.npz"],
            "choose another --batch-size (or --max-samples) so that no batch has one sample, "
            "or recalibrate with --mode eval",
        ),
        (
            ["audit", *MODEL, "--data", "data.npz", "--weights", "numpy.pt"],
            "numpy.pt: it holds an object of class numpy.",
        ),
        (["audit", *MODEL, "--data", "data.npz", "--onnx", "empty.onnx"], "empty.onnx is empty"),
        (
            ["audit", *MODEL, "--data", "data.npz", "--batch-size", "1" + "0" * 22],
            "--batch-size: expected an integer from 1 to 9223372036854775807",
        ),
        (
            ["audit", *MODEL, "--data", "usermodels.py:batches", "--batch-size", "3"],
            "--batch-size applies to .npz data only; --data usermodels.py:batches gives its own",
        ),
        (
            ["audit", *MODEL, "--data", "usermodels.py:batches", "--data-key", "X"],
            "--data-key applies to .npz data only",
        ),
        (["--nonsense"], "bnstats: error: unrecognized arguments: --nonsense"),
    ],
)
def test_messages_name_the_command_lines_options(project_here, capsys, args, message):
    """One line, no escape codes, no doubled 'bnstats:', advice in the options' words."""
    _odd_files(project_here)
    assert command.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert "\x1b" not in err and "bnstats: bnstats" not in err and "error: bnstats:" not in err
    assert "max_samples" not in err and "mode='eval'" not in err
