"""One W&B run per training run: the run's id travels with its checkpoints.

Without it, every `--ckpt_path last` or SLURM requeue opened a new W&B run and split the dashboard. `wspo fit`
adds `RunIdentity` when a config names none, and before the loggers start on a resume it gives each
`WandbLogger` that has no `id` of the user's the id the checkpoint holds (`wspo_lightning.resume.continue_runs`).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl


class RunIdentity(pl.Callback):
    """Saves each W&B logger's run id (in the trainer's logger order) in every checkpoint."""

    def __init__(self) -> None:
        self._trainer: pl.Trainer | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        from lightning.pytorch.loggers import WandbLogger

        loggers = self._trainer.loggers if self._trainer is not None else []
        return {"wandb_ids": [logger.version for logger in loggers if isinstance(logger, WandbLogger)]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore: the ids were handed to the loggers before they started."""


class StepBoundaryCheckpoints(pl.Callback):
    """Writes a checkpoint saved inside a training step as one saved at the end of the step before.

    Lightning's SLURM pre-emption handler saves the moment its signal arrives, often inside a step: the batch
    is handed out, the weights not yet updated. Lightning's restart logic expects checkpoints of step ends,
    so the resumed run logged every step one number too far. The data module, for its part, saves the batches
    the loop has processed (the step's batch is trained again)."""

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        loop = checkpoint.get("loops", {}).get("fit_loop", {})
        progress = loop.get("epoch_loop.batch_progress")
        current = progress["current"] if progress else None
        if current is None or current["ready"] == current["processed"] or current["processed"] == 0:
            return  # at a step's end (or before an epoch's first step, where no earlier step end exists)
        for part in (progress["total"], current):
            part["ready"] = part["started"] = part["processed"]
            part["completed"] = part["processed"] - 1
        loop["epoch_loop.state_dict"]["_batches_that_stepped"] -= 1
