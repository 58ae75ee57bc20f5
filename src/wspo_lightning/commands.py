"""How every `wspo` subcommand other than the LightningCLI ones reads its arguments: jsonargparse over a
function's signature or a dataclass (their docstrings describe each flag), with `--config YAML` and
`--print_config`. Errors are raised, never printed here: the `wspo` dispatcher owns the exit codes."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import is_dataclass
from typing import Any


def _parser(prog: str, description: str):
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(prog=prog, description=description, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML with any of the options below")
    return parser


def summary(target: Any) -> str:
    """The first paragraph of `target`'s docstring, on one line."""
    return " ".join(inspect.getdoc(target).split("\n\n")[0].split()) if inspect.getdoc(target) else ""


def parse(
    target: Callable | type, argv: Sequence[str] | None, prog: str, extra_help: dict[str, str] | None = None
) -> dict[str, Any]:
    """Keyword arguments for `target` (a function or a dataclass) from `argv` and `--config` files.

    `extra_help` appends text to a flag's help by argument name: what a docstring cannot hold because it is only
    known at run time, such as the names of a registry."""
    parser = _parser(prog, summary(target))
    if is_dataclass(target):
        parser.add_class_arguments(target)
    else:
        parser.add_function_arguments(target, as_positional=False)
    for action in parser._actions:  # argparse keeps no public handle on an added argument's help
        if action.dest in (extra_help or {}):
            action.help = f"{action.help or ''} {extra_help[action.dest]}".strip()
    cfg = parser.parse_args(list(argv or []))
    values = parser.instantiate_classes(cfg).as_dict()
    values.pop("config", None)
    return values


def run_function(function: Callable, argv: Sequence[str] | None, prog: str | None = None) -> int:
    """Parse `argv` into `function`'s arguments and call it; exit code 0."""
    function(**parse(function, argv, prog or f"wspo {function.__name__}"))
    return 0
