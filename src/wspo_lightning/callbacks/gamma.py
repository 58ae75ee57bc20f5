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

    One source for gamma: the schedule's target (`value`) is the module's `gamma` unless the config gives it;
    giving both `model.gamma` and a different `value` is refused by `wspo fit` in one line.

    Args:
        kind: "constant" (always the target); "linear_warmup" (`start` -> target over `warmup_steps`, then
            the target); "cosine" (`start` -> target along a half cosine over `total_steps`); "step" (`start`,
            multiplied by `factor` every `every` steps, capped at the target).
        value: the target gamma, > 0; null: the module's `gamma` (resolved when training starts).
        start: gamma at step 0: >= 0 for linear_warmup and cosine (null: 0); > 0 for step (required: a
            product of 0 stays 0).
        warmup_steps: length of the linear warm-up.
        total_steps: length of the cosine; None means the run's optimizer steps.
        every: steps between two multiplications (step).
        factor: multiplier (step), > 0.
    """

    def __init__(
        self,
        kind: Literal["constant", "linear_warmup", "cosine", "step"] = "constant",
        value: float | None = None,
        start: float | None = None,
        warmup_steps: int = 0,
        total_steps: int | None = None,
        every: int = 100,
        factor: float = 2.0,
    ) -> None:
        if kind not in ("constant", "linear_warmup", "cosine", "step"):
            raise InputError(f"GammaSchedule.kind must be constant, linear_warmup, cosine or step, got {kind!r}")
        for name, number in (("value", value), ("start", start), ("factor", factor)):
            if number is not None and not math.isfinite(number):
                raise InputError(f"GammaSchedule.{name} must be finite, got {number}")
        if value is not None and not value > 0:
            raise InputError(f"GammaSchedule.value (the target gamma) must be > 0, got {value}")
        if kind == "step" and not (start is not None and start > 0 and factor > 0):
            raise InputError(
                f"GammaSchedule(kind=step) needs start > 0 and factor > 0 (start {start} would stay there): "
                "set GammaSchedule.start, e.g. to the target divided by factor**3"
            )
        if start is not None and start < 0:
            raise InputError(f"GammaSchedule.start must be >= 0, got {start}")
        if warmup_steps < 0 or every < 1:
            raise InputError("GammaSchedule.warmup_steps must be >= 0 and GammaSchedule.every >= 1")
        self.kind, self.value, self.start = kind, value, 0.0 if start is None else start
        self.warmup_steps, self.total_steps, self.every, self.factor = warmup_steps, total_steps, every, factor
        self.active = True

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.active = "gamma" in pl_module.hparams  # DPO and SFT have no gamma: the schedule has nothing to set
        if not self.active and stage == "fit":
            log.warning("GammaSchedule: %s has no gamma; the schedule does nothing", type(pl_module).__name__)
        elif stage == "fit" and self.value is None:  # the target: the module's gamma (before a schedule changed it)
            self.value = float(pl_module.hparams.gamma)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # validation before the first training batch logs the schedule's gamma too, not the module's default
        if self.active:
            pl_module.gamma = self.gamma_at(trainer.global_step, int(trainer.estimated_stepping_batches))

    def gamma_at(self, step: int, total_steps: int | None = None) -> float:
        if self.value is None:
            raise RuntimeError("GammaSchedule.gamma_at before setup: the target (the module's gamma) is not known")
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
        if self.active:
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
