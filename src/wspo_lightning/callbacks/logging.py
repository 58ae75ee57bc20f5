"""Validation-time logging: reward distributions and sample tables.

Both read what `WSPOModule.validation_step` returns (per-example rewards) and the documented
`weak_reward` method; they never reach into the module's internals.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.loggers import WandbLogger

from wspo_lightning.decoding.args import SamplingArgs
from wspo_lightning.decoding.generation import generate_responses
from wspo_lightning.errors import InputError
from wspo_lightning.render import plain_text

log = logging.getLogger(__name__)


def _wandb_loggers(trainer: pl.Trainer) -> list[WandbLogger]:
    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


class RewardMarginLogger(pl.Callback):
    """Distributions of the implicit rewards on validation pairs.

    The module logs the mean margins and accuracies (`val/rewards/*`) to every logger. This adds
    their spread: quantiles of the weak and strong margins to every logger, and histograms of
    chosen/rejected rewards and margins to W&B.

    Args:
        quantiles: margin quantiles to log as `val/rewards/{weak,strong}_margin_q{NN}`.
    """

    def __init__(self, quantiles: tuple[float, ...] = (0.1, 0.5, 0.9)) -> None:
        self.quantiles = quantiles
        self._rewards: dict[str, list[torch.Tensor]] = {}

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._rewards = {}

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        for name, values in (outputs or {}).items():
            self._rewards.setdefault(name, []).append(values.detach().float())

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._rewards or trainer.sanity_checking:
            return
        rewards = {
            name: pl_module.all_gather(torch.cat(parts)).reshape(-1).cpu() for name, parts in self._rewards.items()
        }
        if not trainer.is_global_zero:
            return
        metrics: dict[str, float] = {}
        histograms: dict[str, torch.Tensor] = dict(rewards)
        for kind in ("weak", "strong"):
            if f"{kind}_chosen" not in rewards:
                continue
            margin = rewards[f"{kind}_chosen"] - rewards[f"{kind}_rejected"]
            histograms[f"{kind}_margin"] = margin
            for q in self.quantiles:
                metrics[f"val/rewards/{kind}_margin_q{round(q * 100):02d}"] = float(margin.quantile(q))
        # through Lightning's logging, so the rows land at the step its validation metrics use (a resumed run's
        # CSV keeps the rows before its checkpoint's step: logged at global_step they would sit one step late)
        pl_module.log_dict(metrics, rank_zero_only=True)
        for logger in _wandb_loggers(trainer):
            import wandb

            logger.experiment.log(
                {f"val/hist/{name}": wandb.Histogram(values.numpy()) for name, values in histograms.items()}
                | {"trainer/global_step": trainer.global_step}
            )


GREEDY = SamplingArgs(temperature=0.0, max_new_tokens=32)
"""`SampleTable`'s default sampler: greedy, 32 new tokens."""


class SampleTable(pl.Callback):
    """At each validation end, answer a few fixed validation prompts with the policy and log a table.

    Responses come from the project's one generate path (`generate_responses`): prompts rendered, and generation
    stopped, as in training (`PreferenceDataModule.renderer`: the chat template's end-of-turn among the stop ids),
    prompt i of the table drawn from its own generator seeded by (seed, i, 0), so every rank draws the same and
    every validation draws with the same random numbers. Columns: step, prompt, response, finished (ended by a stop
    id rather than the length limit), weak reward (WSPO runs with the weak pair loaded: sum of the weak pair's
    log-ratio over the response, computed as for training records: `PreferenceDataModule.batch_of`,
    `WSPOModule.weak_reward`; absent when the weak pair's values come from a cache).
    Written to `<log_dir>/samples/step_<N>.jsonl`, and to W&B as one table holding the rows of every
    validation so far (so its latest version shows the whole history).

    Args:
        num_prompts: how many validation prompts (the first ones, so every table is comparable).
        sampling: the sampler (`SamplingArgs`; default greedy, 32 new tokens). In YAML, keys left out keep these
            defaults: `sampling: {max_new_tokens: 64}` is still greedy.
        max_new_tokens: deprecated, `sampling.max_new_tokens`.
        do_sample: deprecated, `sampling.temperature` (true: 1, false: 0, greedy).
    """

    columns = ["step", "prompt", "response", "finished", "weak_reward"]
    key = "val/samples"
    """The table's W&B key."""

    def __init__(
        self,
        num_prompts: int = 4,
        sampling: SamplingArgs = GREEDY,
        max_new_tokens: int | None = None,
        do_sample: bool | None = None,
    ) -> None:
        if max_new_tokens is not None or do_sample is not None:
            if sampling != GREEDY:
                raise InputError(
                    "SampleTable: max_new_tokens and do_sample are the old names of sampling.max_new_tokens and "
                    "sampling.temperature: give only sampling"
                )
            log.warning(
                "SampleTable: max_new_tokens and do_sample are deprecated, use sampling.max_new_tokens and "
                "sampling.temperature (0: greedy)"
            )
            sampling = replace(
                sampling,
                max_new_tokens=max_new_tokens if max_new_tokens is not None else sampling.max_new_tokens,
                temperature=1.0 if do_sample else 0.0,
            )
        self.num_prompts, self.sampling = num_prompts, replace(sampling)
        self.history: list[dict] = []

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.datamodule is None:
            return
        prompts = trainer.datamodule.prompts("val", self.num_prompts)
        if not prompts:
            return
        rows = self._complete(pl_module, trainer.datamodule, prompts)
        # trainer.log_dir is a broadcast: every rank must ask for it
        out = Path(trainer.log_dir or trainer.default_root_dir) / "samples" / f"step_{trainer.global_step}.jsonl"
        if not trainer.is_global_zero:
            return
        for row in rows:
            row["step"] = trainer.global_step
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(row) + "\n" for row in rows))
        self.history += rows
        columns = [c for c in self.columns if c in rows[0]]
        for logger in _wandb_loggers(trainer):
            logger.log_table(key=self.key, columns=columns, data=[[r[c] for c in columns] for r in self.history])

    def _complete(self, pl_module: pl.LightningModule, datamodule: Any, prompts: list) -> list[dict]:
        policy = pl_module.policy
        was_training = policy.training
        policy.eval()
        # every rank draws the same (seeded per prompt), so every rank runs the same forwards: FSDP-safe
        responses = generate_responses(policy, datamodule.renderer, prompts, self.sampling)
        policy.train(was_training)
        rows = [
            {"prompt": plain_text(p), "response": r.text, "finished": r.finished} for p, r in zip(prompts, responses)
        ]
        if hasattr(pl_module, "weak_reward"):  # the responses as training records: rendered, batched, scored alike
            batch = datamodule.batch_of(
                prompts, [r.text for r in responses], [r.token_ids for r in responses], [r.finished for r in responses]
            )
            rewards = pl_module.weak_reward(move_data_to_device(batch, pl_module.device))
            for row, reward in zip(rows, rewards.tolist() if rewards is not None else []):
                row["weak_reward"] = reward
        return rows
