"""Gamma schedules: the alignment strength as a function of the optimizer step.

The value is a pure function of `trainer.global_step`, which Lightning restores on resume, so a
resumed run follows the schedule exactly. The callback's state is saved anyway, to catch a
schedule changed between the run and its resume.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import lightning.pytorch as pl

from wspo_lightning.errors import InputError

log = logging.getLogger(__name__)


class GammaSchedule(pl.Callback):
    """Set `pl_module.gamma` before every training batch.

    Args:
        kind: "constant" (always `value`); "linear_warmup" (`start` -> `value` over `warmup_steps`,
            then `value`); "cosine" (`start` -> `value` along a half cosine over `total_steps`);
            "step" (`start`, multiplied by `factor` every `every` steps, capped at `value`).
        value: the target gamma.
        start: gamma at step 0 (linear_warmup, cosine, step).
        warmup_steps: length of the linear warm-up.
        total_steps: length of the cosine; None means the run's optimizer steps.
        every: steps between two multiplications (step).
        factor: multiplier (step).
    """

    def __init__(
        self,
        kind: Literal["constant", "linear_warmup", "cosine", "step"] = "constant",
        value: float = 1.0,
        start: float = 0.0,
        warmup_steps: int = 0,
        total_steps: int | None = None,
        every: int = 100,
        factor: float = 2.0,
    ) -> None:
        if kind not in ("constant", "linear_warmup", "cosine", "step"):
            raise InputError(f"GammaSchedule.kind must be constant, linear_warmup, cosine or step, got {kind!r}")
        for name, number in (("value", value), ("start", start), ("factor", factor)):
            if not math.isfinite(number):
                raise InputError(f"GammaSchedule.{name} must be finite, got {number}")
        if warmup_steps < 0 or every < 1:
            raise InputError("GammaSchedule.warmup_steps must be >= 0 and GammaSchedule.every >= 1")
        self.kind, self.value, self.start = kind, value, start
        self.warmup_steps, self.total_steps, self.every, self.factor = warmup_steps, total_steps, every, factor

    def gamma_at(self, step: int, total_steps: int | None = None) -> float:
        if self.kind == "constant":
            return self.value
        if self.kind == "linear_warmup":
            if step >= self.warmup_steps:
                return self.value
            return self.start + (self.value - self.start) * step / self.warmup_steps
        if self.kind == "cosine":
            total = max(self.total_steps or total_steps or 1, 1)
            progress = min(step / total, 1.0)
            return self.value + (self.start - self.value) * 0.5 * (1 + math.cos(math.pi * progress))
        gamma = self.start * self.factor ** (step // self.every)
        return min(gamma, self.value) if self.factor >= 1 else max(gamma, self.value)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        pl_module.gamma = self.gamma_at(trainer.global_step, int(trainer.estimated_stepping_batches))

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "value": self.value,
            "start": self.start,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "every": self.every,
            "factor": self.factor,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict != self.state_dict():
            log.warning(
                "GammaSchedule differs from the checkpoint's (%s); following the new one: %s",
                state_dict,
                self.state_dict(),
            )
