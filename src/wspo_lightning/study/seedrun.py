"""One seed of the study: its settings, folders, precision, timer, strong model and gold reward, which every phase
reads, and the evaluated rows the phases collect."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wspo_lightning.demo.settings import DemoSettings
from wspo_lightning.hardware import Precision
from wspo_lightning.pipeline.stage import Timer
from wspo_lightning.study.settings import StudySettings


@dataclass
class StudyRun:
    """One seed of the study: what every phase reads. Its folders are `root`'s data, models, samples, runs, eval
    and protocol; the prompt sets are the study's (`prompt_sets`, shared by every seed)."""

    s: StudySettings
    root: Path
    prompt_sets: Path
    precision: Precision
    timer: Timer
    strong: Path
    reward: Any
    force: bool

    def __post_init__(self) -> None:
        self.d: DemoSettings = self.s.demo()
        folders = ("data", "models", "samples", "runs", "eval", "protocol")
        self.data, self.models, self.samples, self.runs, self.eval, self.protocol = (self.root / f for f in folders)
        self.weak_pair = (self.models / "weak_base", self.models / "weak_aligned")
        self.own_weak_pair = (self.models / "weak_base", self.models / "weak_aligned_own")
        self.pairs, self.own_pairs = self.data / "pairs.jsonl", self.data / "pairs_own.jsonl"
        self.rows: dict[tuple[Any, str], dict] = {}
        """Every evaluated (`points.Point`, split) and its `wspo evaluate` row, in evaluation order."""
