"""`wspo demo`: the demo's command line. Its options are `run_demo`'s arguments (`run.py`, the chain of stages),
and every field of the preset's `DemoSettings` is a `--settings.KEY` flag."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import replace

from wspo_lightning.commands import parse
from wspo_lightning.demo import run
from wspo_lightning.demo.run import run_demo
from wspo_lightning.demo.settings import PRESETS


def main(argv: list[str] | None = None) -> int:
    """`wspo demo [--quick] [--out DIR] [--force] [--settings.KEY VALUE ...]`."""
    # the options come from run_demo's definition; the call goes through this module's name, which a test may
    # replace
    return preset_command(run.run_demo, run_demo, PRESETS, argv, "wspo demo")


def preset_command(definition: Callable, call: Callable, presets: dict, argv: list[str] | None, prog: str) -> int:
    """Parse `argv` as `definition`'s arguments (out, quick, force, cache_dir, strong, reward, settings), the
    preset it names (`presets["quick"]` or `["full"]`) giving the defaults of the `--settings.KEY` flags, and
    `call` them in that order."""
    argv = list(sys.argv[1:] if argv is None else argv)
    preset = presets["quick" if asks_quick(argv) else "full"]
    args = parse(definition, argv, prog, nested={"settings": replace(preset)})
    call(*(args[k] for k in ("out", "quick", "force", "cache_dir", "strong", "reward", "settings")))
    return 0


def asks_quick(argv: list[str]) -> bool:
    """Whether the command line names the quick preset (`--quick`, `--quick true`, `--quick=true`; the last one
    given wins). Read before parsing: the preset gives the defaults of the `--settings.KEY` flags."""
    quick = False
    for i, arg in enumerate(argv):
        if arg == "--quick":
            quick = i + 1 == len(argv) or argv[i + 1].lower() != "false"
        elif arg.startswith("--quick="):
            quick = arg.partition("=")[2].lower() == "true"
    return quick
