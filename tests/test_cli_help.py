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
