"""`commands.parse`, the one reader of every non-Lightning command's arguments: a bool flag alone is true,
positional values, a dataclass read as one flag per field, help from the docstrings."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from jsonargparse import ArgumentError

from wspo_lightning.commands import parse


@dataclass
class Knobs:
    """Toy settings."""

    size: int = 1
    """How many things."""
    loud: bool = False
    """Say more."""


def toy(folders: list[str], out: str | None = None, force: bool = False, knobs: Knobs | None = None) -> None:
    """A toy command.

    Args:
        folders: the runs to read.
        out: where to write.
        force: redo.
        knobs: its settings.
    """


def read(argv: list[str], **options) -> dict:
    return parse(toy, argv, "toy", positional=["folders"], **options)


@pytest.mark.parametrize(
    "flags, force", [([], False), (["--force"], True), (["--force", "true"], True), (["--force=false"], False)]
)
def test_a_bool_flag_alone_is_true_and_still_takes_a_value(flags, force):
    assert read(["a", *flags])["force"] is force


@pytest.mark.parametrize("argv", [["a", "b", "c", "--out", "o.md"], ["--out", "o.md", "a", "b", "c"]])
def test_a_positional_list_takes_one_value_per_item_beside_the_flags(argv):
    args = read(argv)
    assert args["folders"] == ["a", "b", "c"] and args["out"] == "o.md"


def test_a_positional_argument_is_required():
    with pytest.raises(ArgumentError, match="folders"):
        read(["--out", "o.md"])


def test_a_nested_dataclass_is_one_flag_per_field_over_the_given_defaults():
    args = read(["a", "--knobs.loud"], nested={"knobs": Knobs(size=7)})
    assert args["knobs"] == Knobs(size=7, loud=True)
    assert read(["a", "--knobs.size", "3"], nested={"knobs": Knobs(size=7)})["knobs"] == Knobs(size=3)


def test_help_lists_the_positional_and_every_nested_field_with_its_docstring(capsys):
    with pytest.raises(SystemExit) as done:
        read(["--help"], nested={"knobs": Knobs()}, extra_help={"out": "Markdown."})
    assert done.value.code == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "A toy command." in printed and "usage: toy" in printed and "folders [folders ...]" in printed
    assert "the runs to read" in printed and "where to write. Markdown." in printed
    assert "--knobs.size SIZE How many things." in printed and "Say more." in printed
