"""`wspo study`: the study's command line. Its options are `run_study`'s arguments (`run.py`), and every field of
the preset's `StudySettings` is a `--settings.KEY` flag (`--settings.seed 1` runs seed 1)."""

from __future__ import annotations

from wspo_lightning.demo.command import preset_command
from wspo_lightning.study import run
from wspo_lightning.study.run import run_study
from wspo_lightning.study.settings import PRESETS


def main(argv: list[str] | None = None) -> int:
    """`wspo study [--quick] [--out DIR] [--force] [--settings.KEY VALUE ...]`."""
    # the options come from run_study's definition; the call goes through this module's name, which a test may
    # replace
    return preset_command(run.run_study, run_study, PRESETS, argv, "wspo study")
