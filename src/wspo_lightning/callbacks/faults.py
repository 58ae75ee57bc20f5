"""Fault handling for long runs: stop (or skip) on a non-finite loss or gradient; write checkpoints atomically.

`wspo fit` adds both when a config names none (see `cli.py`): a NaN never reaches the weights or a
checkpoint, and a kill during a save never leaves a checkpoint that loads wrong.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from wspo_lightning.errors import InputError, TrainingStopped

log = logging.getLogger(__name__)
_warn = rank_zero_only(log.warning)


class NonFiniteGuard(pl.Callback):
    """Check every optimizer step's loss (each micro-batch) and gradients before the weights change.

    On a non-finite value, `action="stop"` raises `TrainingStopped` naming the global step, epoch,
    batch and its record ids, before the optimizer step: the weights, and the last checkpoint, stay
    those of the last good step (resume from it with `--ckpt_path last`). `action="skip_batch"` drops
    the step's gradients instead, so the optimizer changes no weight and no state; the step still
    counts (global step, learning-rate and gamma schedules advance). After `max_consecutive_skips`
    skipped steps in a row the run stops as with "stop".

    Costs one device sync per optimizer step. All ranks take the same decision. With fp16 and a
    GradScaler, inf gradients are the scaler's business (it skips those steps), so only the loss is
    checked then.

    Args:
        action: "stop" or "skip_batch".
        check_gradients: also check the gradients (their largest magnitude), not only the loss.
        max_consecutive_skips: with "skip_batch", stop after this many skipped steps in a row.
    """

    def __init__(
        self,
        action: Literal["stop", "skip_batch"] = "stop",
        check_gradients: bool = True,
        max_consecutive_skips: int = 10,
    ) -> None:
        if action not in ("stop", "skip_batch"):
            raise InputError(f"NonFiniteGuard.action must be stop or skip_batch, got {action!r}")
        if max_consecutive_skips < 1:
            raise InputError(f"NonFiniteGuard.max_consecutive_skips must be >= 1, got {max_consecutive_skips}")
        self.action, self.check_gradients, self.max_consecutive_skips = action, check_gradients, max_consecutive_skips
        self.skipped_steps: list[int] = []  # global steps skipped in this process
        self._losses: list[torch.Tensor] = []  # this step's micro-batch losses
        self._batch: tuple[int, int, list] = (0, 0, [])  # epoch, batch index, record ids of the last micro-batch
        self._consecutive = 0

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        ids = list(batch.get("ids", [])) if isinstance(batch, dict) else []
        self._batch = (trainer.current_epoch, batch_idx, ids)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        self._losses.append(loss.detach().float().reshape(()))

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        losses, self._losses = self._losses, []
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        checks: dict[str, torch.Tensor] = {}
        if losses:
            checks["loss"] = torch.isfinite(torch.stack(losses)).all()
        if self.check_gradients and params and getattr(trainer.precision_plugin, "scaler", None) is None:
            largest = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=float("inf"))
            if hasattr(largest, "full_tensor"):  # sharded (DTensor) gradients: their global largest value
                largest = largest.full_tensor()
            checks["gradient"] = torch.isfinite(largest)
        if not checks:
            return
        device = next(iter(checks.values())).device
        finite = dict(zip(checks, torch.stack([c.to(device) for c in checks.values()]).tolist()))  # the one sync
        if not trainer.strategy.reduce_boolean_decision(not all(finite.values()), all=False):
            self._consecutive = 0
            return
        if not finite.get("loss", True):
            value = next(float(v) for v in losses if not torch.isfinite(v))
            problem = f"non-finite loss ({value})"
        else:
            problem = "non-finite gradient" if not finite.get("gradient", True) else "non-finite values on another rank"
        if self.action == "skip_batch" and self._consecutive + 1 < self.max_consecutive_skips:
            self._consecutive += 1
            self.skipped_steps.append(trainer.global_step)
            for p in params:
                p.grad = None  # the optimizer skips parameters without a gradient: no update, no state change
            _warn(
                "%s at global step %d (%s): skipped the optimizer step (%d in a row)",
                problem,
                trainer.global_step,
                self._where(),
                self._consecutive,
            )
            return
        raise TrainingStopped(self._stop_message(trainer, problem))

    def _where(self) -> str:
        epoch, batch_idx, ids = self._batch
        shown = ", ".join(map(str, ids[:4])) + (", ..." if len(ids) > 4 else "")
        return f"epoch {epoch}, batch {batch_idx}" + (f", record ids {shown}" if ids else "")

    def _stop_message(self, trainer: pl.Trainer, problem: str) -> str:
        if self.action == "skip_batch":
            problem += f" for {self.max_consecutive_skips} optimizer steps in a row"
        step = trainer.global_step
        checkpoint = _last_checkpoint(trainer)
        saved = (
            f"the last checkpoint is {checkpoint[0]} (step {checkpoint[1]}): resume from it with "
            "--ckpt_path last, e.g. with a lower learning rate"
            if checkpoint
            else "no checkpoint was written yet"
        )
        return (
            f"training stopped at global step {step} ({self._where()}): {problem}. The optimizer step was not "
            f"taken, so the weights are those after {step} optimizer steps; {saved}. To skip such batches "
            "instead, set NonFiniteGuard(action: skip_batch)."
        )


def _last_checkpoint(trainer: pl.Trainer) -> tuple[str, int] | None:
    """(path, global step) of the checkpoint a ModelCheckpoint wrote last in this run, if any."""
    saved = [
        (cb.last_model_path or cb.best_model_path, getattr(cb, "_last_global_step_saved", -1))
        for cb in trainer.checkpoint_callbacks
        if isinstance(cb, ModelCheckpoint)
    ]
    saved = [(path, step) for path, step in saved if path and os.path.exists(path)]
    return max(saved, key=lambda item: item[1]) if saved else None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint files written atomically: to a temporary file in the same folder, flushed to disk,
    then renamed over the target (`os.replace`), and the folder synced.

    A kill or a crash at any moment leaves either the previous checkpoint or the new one, complete,
    never a truncated file (Lightning's default writes through fsspec, whose temporary file lives in
    the system temp folder: on another file system the final move is a copy that a kill can cut).
    The checkpoint is serialised straight to the file, not through an in-memory copy. A kill may
    leave `.NAME.partial` next to the target; the next save of that name replaces it. Remote
    (`scheme://`) paths fall back to Lightning's writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        try:
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, target)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        _fsync_folder(target.parent)


def _fsync_folder(folder: Path) -> None:
    """Make a rename durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
