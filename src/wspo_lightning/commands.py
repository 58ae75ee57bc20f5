"""How every `wspo` subcommand other than the LightningCLI ones reads its arguments: jsonargparse over a
function's signature or a dataclass (their docstrings describe each flag), with `--config YAML` and
`--print_config`. Errors are raised, never printed here: the `wspo` dispatcher owns the exit codes."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import fields, is_dataclass
from typing import Any, get_args, get_origin, get_type_hints


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
    target: Callable | type,
    argv: Sequence[str] | None,
    prog: str,
    extra_help: dict[str, str] | None = None,
    positional: Sequence[str] = (),
    nested: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Keyword arguments for `target` (a function or a dataclass) from `argv` and `--config` files.

    A bool flag given alone is true: `--force` reads as `--force true`.
    `extra_help` appends text to a flag's help by argument name: what a docstring cannot hold because it is only
    known at run time, such as the names of a registry.
    `positional` names the arguments given without a flag, in order; one of type `list[...]` takes every value
    left, one by one as a shell splits them (`wspo demo-spread RUN RUN --out FILE`).
    `nested` maps an argument to a dataclass instance: the argument is read as one `--NAME.FIELD` flag per field,
    each listed in the help, and the instance's values are their defaults (`wspo demo --settings.seed 1`)."""
    nested = nested or {}
    parser = _parser(prog, summary(target))
    skip = {*positional, *nested}
    if is_dataclass(target):
        parser.add_class_arguments(target, skip=skip)
    else:
        parser.add_function_arguments(target, as_positional=False, skip=skip)
    for name in positional:
        _add_positional(parser, target, name)
    for name, default in nested.items():
        parser.add_class_arguments(type(default), name, default=default)
    switches = _bools(target) | {f"{name}.{field}" for name, value in nested.items() for field in _bools(type(value))}
    for action in parser._actions:  # argparse keeps no public handle on an added argument
        if action.dest in (extra_help or {}):
            action.help = f"{action.help or ''} {extra_help[action.dest]}".strip()
        if action.dest in switches and action.option_strings:
            action.nargs, action.const = "?", True
    cfg = parser.parse_args(list(argv or []))
    values = parser.instantiate_classes(cfg).as_dict()
    values.pop("config", None)
    return values


def _add_positional(parser, target: Callable | type, name: str) -> None:
    """`target`'s argument `name` as a value without a flag, its help from `target`'s docstring. jsonargparse
    reads a positional `list[X]` as one JSON list: here it is `nargs="+"` of X instead."""
    from docstring_parser import parse as parse_docstring

    hint = get_type_hints(target)[name]
    many = get_origin(hint) is list
    described = {p.arg_name: p.description for p in parse_docstring(inspect.getdoc(target) or "").params}
    parser.add_argument(
        name, type=get_args(hint)[0] if many else hint, nargs="+" if many else None, help=described.get(name)
    )


def _bools(target: Callable | type) -> set[str]:
    """Names of `target`'s arguments annotated `bool` (as written: a string under `from __future__ import
    annotations`)."""
    if is_dataclass(target):
        annotations = {f.name: f.type for f in fields(target)}
    else:
        annotations = {name: p.annotation for name, p in inspect.signature(target).parameters.items()}
    return {name for name, annotation in annotations.items() if annotation in (bool, "bool")}


def run_function(function: Callable, argv: Sequence[str] | None, prog: str | None = None) -> int:
    """Parse `argv` into `function`'s arguments and call it; exit code 0."""
    function(**parse(function, argv, prog or f"wspo {function.__name__}"))
    return 0
