"""`wspo demo`: the demo's command line. Its options are `run_demo`'s arguments (`run.py`, the chain of stages),
and every field of the preset's `DemoSettings` is a `--settings.KEY` flag."""

from __future__ import annotations

import sys
from dataclasses import replace

from wspo_lightning.commands import parse
from wspo_lightning.demo import run
from wspo_lightning.demo.run import run_demo
from wspo_lightning.demo.settings import PRESETS


def main(argv: list[str] | None = None) -> int:
    """`wspo demo [--quick] [--out DIR] [--force] [--settings.KEY VALUE ...]`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    preset = PRESETS["quick" if _asks_quick(argv) else "full"]
    # the options come from run_demo's definition; the call goes through this module's name, which a test may
    # replace
    args = parse(run.run_demo, argv, "wspo demo", nested={"settings": replace(preset)})
    run_demo(
        args["out"], args["quick"], args["force"], args["cache_dir"], args["strong"], args["reward"], args["settings"]
    )
    return 0


def _asks_quick(argv: list[str]) -> bool:
    """Whether the command line names the quick preset (`--quick`, `--quick true`, `--quick=true`; the last one
    given wins). Read before parsing: the preset gives the defaults of the `--settings.KEY` flags."""
    quick = False
    for i, arg in enumerate(argv):
        if arg == "--quick":
            quick = i + 1 == len(argv) or argv[i + 1].lower() != "false"
        elif arg.startswith("--quick="):
            quick = arg.partition("=")[2].lower() == "true"
    return quick
