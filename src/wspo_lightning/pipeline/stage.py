"""What every stage shares: a status line, skip-if-done, JSON written whole, and a timer of a chain of stages."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wspo_lightning.io import atomic_path

if TYPE_CHECKING:  # hardware imports torch, which a stage such as `pairs` never needs
    from wspo_lightning.hardware import Precision

RUNS = {"ran": 0, "skipped": 0}  # stage calls in this process, for timers that tell skips from work


def say(stage: str, message: str) -> None:
    """One status line per stage event, on stderr beside the progress bars."""
    print(f"[{stage}] {message}", file=sys.stderr, flush=True)


def done(stage: str, out: str | Path, force: bool) -> bool:
    """True (and say so) when `out` exists and is not to be redone; with `force`, remove it first.

    Outputs are written whole or not at all (`io.atomic_path`), so an existing `out` is a finished one."""
    out = Path(out)
    RUNS["skipped" if out.exists() and not force else "ran"] += 1
    if not out.exists():
        return False
    if not force:
        say(stage, f"skip: {out} exists (force to redo)")
        return True
    say(stage, f"redo: removing {out}")
    shutil.rmtree(out) if out.is_dir() else out.unlink()
    return False


def write_json(path: Path, value: Any) -> None:
    """A JSON file written whole or not at all (a kill mid-write leaves the previous one)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(value, indent=2) + "\n")


class Timer:
    """Wall time per stage, saved to `path` (JSON) as the run goes, with the precision and CPU count it ran on. A
    stage skipped in this run keeps the time recorded when it last did its work, so the file always describes a
    whole run."""

    def __init__(self, path: Path, precision: Precision) -> None:
        self.path, self.start, self.precision = path, time.perf_counter(), precision
        self.stages: dict[str, float] = json.loads(path.read_text()).get("stages", {}) if path.exists() else {}

    @contextmanager
    def __call__(self, name: str):
        start, ran = time.perf_counter(), RUNS["ran"]
        yield
        if RUNS["ran"] > ran or name not in self.stages:
            self.stages[name] = round(time.perf_counter() - start, 1)
        this_run = round(time.perf_counter() - self.start, 1)
        write_json(
            self.path,
            {
                "stages": self.stages,
                "total": self.total,
                "this_run": this_run,
                "precision": asdict(self.precision),
                "cpus": os.cpu_count(),
            },
        )

    @property
    def total(self) -> float:
        return round(sum(self.stages.values()), 1)
