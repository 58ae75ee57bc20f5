"""What the recipe tests share: tiny stand-ins of the recipes' model families and data, a recipe rewritten for a
CPU, `wspo` run as its own process would (its W&B run ends with it), and an environment restored after each
test (in-process DDP/FSDP2 runs and W&B set variables that later launches would inherit).

The stand-ins and the rewriting live in benchmarks/recipe_stand_ins.py, which benchmarks/gpu_check.py runs on a
GPU too."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from helpers import ROOT

sys.path.append(str(ROOT / "benchmarks"))  # recipe_stand_ins, after everything else

from recipe_stand_ins import (  # noqa: E402
    RECIPES,
    ROLES,
    TINY,
    for_device,
    readme_gpu_commands,
    run,
    run_readme_path,
    stand_in,
    write_stand_ins,
)

__all__ = ["RECIPES", "ROLES", "TINY", "on_cpu", "own_environment", "readme_gpu_commands", "run"]
__all__ += ["run_readme_path", "stand_in", "write_stand_ins"]


def on_cpu(recipe: Path, models: dict[str, Path], out: Path, keep_runs: bool = False) -> Path:
    """The recipe on a CPU with only model paths, device counts, lengths, step counts and FSDP1 changed;
    written to `out`, also the working folder (the recipe's relative `runs/...` paths land there)."""
    return for_device(recipe, models, out, keep_runs)


def own_environment():
    """What in-process DDP/FSDP2 runs and W&B put in the environment (MASTER_PORT, WANDB_SERVICE, ...) goes
    with each test: later tests launch processes that would inherit it."""
    saved = dict(os.environ)
    yield
    for name in set(os.environ) - set(saved):
        del os.environ[name]
    os.environ.update(saved)
