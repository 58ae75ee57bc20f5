"""What every stage shares: a status line, skip-if-done, and the command that runs a stage function."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

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
