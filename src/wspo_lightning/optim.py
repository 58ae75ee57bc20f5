"""Optimizers and learning-rate schedules chosen in YAML, the LightningCLI way.

An objective's `optimizer` and `lr_scheduler` arguments are `OptimizerCallable` / `LRSchedulerCallable`:
jsonargparse turns a `class_path` / `init_args` block into a `functools.partial` of the class with the
init_args as keywords, which `configure_optimizers` calls with the parameters (optimizer) or the optimizer
(schedule). A schedule that needs the run's length gets it there: an argument named `num_training_steps`
or `total_steps` left unset (null) is filled with the run's optimizer steps
(`trainer.estimated_stepping_batches`), so `torch.optim.lr_scheduler.OneCycleLR` or `TransformersSchedule`
need no step count in the config. Without either argument: AdamW at `learning_rate` with `weight_decay`,
and a linear warm-up over `warmup_ratio` of the steps, then cosine decay to 0.

    model:
      init_args:
        optimizer:
          class_path: bitsandbytes.optim.PagedAdamW8bit   # or AdamW8bit, PagedAdamW, torch.optim.SGD, ...
          init_args: {lr: 1.0e-5, weight_decay: 0.0}
        lr_scheduler:
          class_path: wspo_lightning.optim.TransformersSchedule
          init_args: {name: linear, warmup_ratio: 0.05}
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

STEP_COUNT_ARGUMENTS = ("num_training_steps", "total_steps")
"""Arguments of a schedule that `configure_optimizers` fills with the run's optimizer steps when left unset."""


class TransformersSchedule(LambdaLR):
    """One of transformers' schedules (`transformers.get_scheduler`), warm-up given as a share of the run.

    Args:
        optimizer: given by the module.
        name: linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup,
            inverse_sqrt, cosine_with_min_lr, warmup_stable_decay, ... (transformers' SchedulerType).
        warmup_ratio: share of the optimizer steps spent warming up linearly from 0.
        num_training_steps: the run's optimizer steps; null: filled in by the module.
        scheduler_specific_kwargs: extra arguments of that schedule (e.g. {num_cycles: 2}).
        last_epoch: the index of the last step (-1: start).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        name: str = "cosine",
        warmup_ratio: float = 0.1,
        num_training_steps: int | None = None,
        scheduler_specific_kwargs: dict[str, Any] | None = None,
        last_epoch: int = -1,
    ) -> None:
        from transformers import get_scheduler

        from wspo_lightning.errors import InputError

        if num_training_steps is None or num_training_steps < 1:
            raise InputError(f"TransformersSchedule needs num_training_steps >= 1, got {num_training_steps}")
        if not 0 <= warmup_ratio < 1:
            raise InputError(f"TransformersSchedule.warmup_ratio must be in [0, 1), got {warmup_ratio}")
        schedule = get_scheduler(
            name,
            optimizer,
            num_warmup_steps=int(warmup_ratio * num_training_steps),
            num_training_steps=num_training_steps,
            scheduler_specific_kwargs=scheduler_specific_kwargs,
        )
        if not isinstance(schedule, LambdaLR):
            raise InputError(f"TransformersSchedule: {name!r} is not a per-step schedule; use its torch class instead")
        self.name = name
        super().__init__(optimizer, schedule.lr_lambdas, last_epoch)


def unset_step_counts(lr_scheduler: Callable, total_steps: int) -> dict[str, int]:
    """`{name: total_steps}` for each argument of `STEP_COUNT_ARGUMENTS` that the schedule's class takes and
    the config left unset (absent, or null). jsonargparse hands over a `functools.partial` whose keywords
    are the init_args (older versions leave defaults out), with the class as its function or an argument."""
    keywords = getattr(lr_scheduler, "keywords", None) or {}
    target = lr_scheduler
    while isinstance(target, partial):
        classes = [a for a in (target.func, *target.args) if inspect.isclass(a)]
        target = classes[-1] if classes else target.func
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):  # a builtin without a signature: nothing to fill
        return {}
    return {name: total_steps for name in STEP_COUNT_ARGUMENTS if name in parameters and keywords.get(name) is None}


def configure(
    params: Iterable[torch.nn.Parameter],
    total_steps: int,
    optimizer: Callable | None,
    lr_scheduler: Callable | None,
    learning_rate: float,
    weight_decay: float,
    warmup_ratio: float,
) -> dict[str, Any]:
    """What `configure_optimizers` returns: the optimizer and its schedule, stepped every optimizer step
    (a `ReduceLROnPlateau` once per validation, on its `monitor`, default `val/loss`)."""
    if optimizer is None:
        built = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    else:
        built = optimizer(params)
    if lr_scheduler is None:
        from transformers import get_cosine_schedule_with_warmup

        schedule = get_cosine_schedule_with_warmup(built, int(warmup_ratio * total_steps), total_steps)
    else:
        schedule = lr_scheduler(built, **unset_step_counts(lr_scheduler, total_steps))
    config: dict[str, Any] = {"scheduler": schedule, "interval": "step"}
    if isinstance(schedule, torch.optim.lr_scheduler.ReduceLROnPlateau):
        config.update(interval="epoch", monitor=getattr(schedule, "monitor", "val/loss"))
    return {"optimizer": built, "lr_scheduler": config}


def group_settings(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each parameter group's settings as the config built them (everything but the parameters)."""
    return [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]


def reapply_settings(optimizer: torch.optim.Optimizer, scheduler: Any, configured: list[dict[str, Any]]) -> None:
    """After a resume: the configured settings (`group_settings` of the freshly built optimizer) over the ones
    the checkpoint's optimizer state brought back, keeping its moments and its place in the schedule.

    Every constructor setting (weight decay, betas, eps, ...) is the config's. A changed peak learning rate
    (`initial_lr`, set by per-step schedules) scales the current rate and the schedule's base rates by new/old,
    so the schedule goes on from where it was at the new peak."""
    for group, want in zip(optimizer.param_groups, configured, strict=True):
        for key in optimizer.defaults:
            if key not in ("lr", "initial_lr") and key in want:
                group[key] = want[key]
        if want.get("initial_lr") and group.get("initial_lr") and group["initial_lr"] != want["initial_lr"]:
            group["lr"] *= want["initial_lr"] / group["initial_lr"]
            group["initial_lr"] = want["initial_lr"]
    if scheduler is not None and hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [
            group.get("initial_lr", base) for group, base in zip(optimizer.param_groups, scheduler.base_lrs)
        ]
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
