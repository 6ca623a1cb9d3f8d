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
    assert result.stderr == f"bnstats: error: bnstats: give a command: {names} (see --help)\n"


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
