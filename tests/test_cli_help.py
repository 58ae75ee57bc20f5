"""`wspo --help` names every subcommand with its line of help, and every subcommand answers its own --help."""

from __future__ import annotations

import subprocess
import sys

import pytest

from wspo_lightning.cli import COMMANDS, main


def test_wspo_help_lists_every_subcommand_with_its_line():
    printed = subprocess.run(
        [sys.executable, "-m", "wspo_lightning.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    listed = [line.split()[0] for line in printed.split("commands:\n")[1].split("\n\n")[0].splitlines()]
    assert listed == list(COMMANDS)
    for name, (_, text) in COMMANDS.items():
        assert f"  {name} " in printed and text in printed


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_subcommand_has_its_own_help(name, capsys):
    with pytest.raises(SystemExit) as done:
        main([name, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and "--" in out


@pytest.mark.parametrize("name", ["fit", "validate", "test", "precompute"])
def test_the_lightning_commands_help_says_how_to_list_the_objectives_keys_and_that_command_works(name, capsys):
    with pytest.raises(SystemExit):
        main([name, "--help"])
    hint = f"wspo {name} --model.help WSPOModule"
    assert hint in " ".join(capsys.readouterr().out.split())  # (argparse wraps the epilog)
    with pytest.raises(SystemExit) as done:
        main(hint.split()[1:])
    listed = capsys.readouterr().out
    assert done.value.code == 0 and "--model.gamma" in listed and "--model.weak_base.path" in listed


def test_an_unknown_model_key_points_at_the_objectives_key_list(tiny_world, tmp_path, capsys):
    from helpers import tiny_config

    assert main(["fit", "--config", str(tiny_config(tiny_world, tmp_path)), "--model.init_args.gama=2"]) == 2
    assert "the objective's: wspo fit --model.help WSPOModule" in capsys.readouterr().err
