"""One W&B run and one CSV version folder per training run: their ids travel with the checkpoints.

Without it, every `--ckpt_path last` or SLURM requeue opened a new W&B run and a new `version_N` folder, and
split the dashboard and metrics.csv. `wspo fit` adds `RunIdentity` when a config names none, and before the
loggers start on a resume it gives each `WandbLogger` without an `id` of the user's the id the checkpoint holds,
and each `CSVLogger` without a `version` of the user's the checkpoint's version
(`wspo_lightning.resume.continue_runs`); `continue_csv_logs` then makes those CSV loggers append to their
metrics.csv instead of deleting it, as Lightning does with a version that exists.
"""

from __future__ import annotations

import csv
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_only


class RunIdentity(pl.Callback):
    """Saves each W&B logger's run id and each CSV logger's version (in the trainer's logger order) in every
    checkpoint."""

    def __init__(self) -> None:
        self._trainer: pl.Trainer | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        from lightning.pytorch.loggers import WandbLogger

        loggers = self._trainer.loggers if self._trainer is not None else []
        return {
            "wandb_ids": [logger.version for logger in loggers if isinstance(logger, WandbLogger)],
            "csv_versions": [logger.version for logger in loggers if isinstance(logger, CSVLogger)],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore: the ids were handed to the loggers before they started."""


class ContinuedMetricsWriter(ExperimentWriter):
    """A CSVLogger's writer that continues an existing metrics.csv from `resume_step`, a checkpoint's global step.

    Lightning logs a training step's rows, and those of the validation after it, at that step's index, so the
    rows at steps before `resume_step` are the work the checkpoint holds: they stay. The later ones go: a killed
    run wrote them between its last checkpoint and the kill, and the resumed run logs those steps again, so the
    file ends with each step once, as an uninterrupted run's. The file's columns are kept, so the earlier rows
    keep their values when a new column makes Lightning rewrite the file. (A callback that logs a validation's
    figures at `trainer.global_step`, one past Lightning's step, as `RewardMarginLogger` does, loses that row
    when the validation ran right after the checkpoint's step.)"""

    def __init__(self, log_dir: str, resume_step: int) -> None:
        self.resume_step = resume_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        """Lightning's deletes metrics.csv here; this one keeps the rows before `resume_step`."""
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            rows = [row for row in reader if int(float(row["step"])) < self.resume_step]
            self.metrics_keys = sorted(reader.fieldnames or [])
        partial = self.metrics_file_path + ".partial"  # a kill while writing leaves the old file whole
        with self._fs.open(partial, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)
        self._fs.mv(partial, self.metrics_file_path)


def continue_csv_logs(trainer: pl.Trainer, versions: list, resume_step: int) -> None:
    """Each CSVLogger of `trainer` whose version is the one `versions` (a checkpoint's, in logger order) holds
    appends to that version's metrics.csv from `resume_step` on (`ContinuedMetricsWriter`). On rank 0, before
    the loggers start; other ranks write no CSV."""
    if rank_zero_only.rank != 0:
        return
    loggers = [logger for logger in trainer.loggers if isinstance(logger, CSVLogger)]
    for logger, saved in zip(loggers, versions):
        if logger._experiment is None and str(logger.version) == str(saved):
            logger._experiment = ContinuedMetricsWriter(logger.log_dir, resume_step)


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
