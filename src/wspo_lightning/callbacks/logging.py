"""Validation-time logging: reward distributions and sample tables.

Both read what `WSPOModule.validation_step` returns (per-example rewards) and the documented
`weak_reward` method; they never reach into the module's internals.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.loggers import WandbLogger

from wspo_lightning.logprobs import cut_at_stop, left_pad
from wspo_lightning.render import plain_text


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
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        for logger in _wandb_loggers(trainer):
            import wandb

            logger.experiment.log(
                {f"val/hist/{name}": wandb.Histogram(values.numpy()) for name, values in histograms.items()}
                | {"trainer/global_step": trainer.global_step}
            )


class SampleTable(pl.Callback):
    """At each validation end, complete a few fixed validation prompts with the policy and log a table.

    Prompts are rendered, and generation stops, as in training (`PreferenceDataModule.renderer`: the chat
    template's end-of-turn among the stop ids). Columns: step, prompt, completion, finished (ended by a stop
    id rather than the length limit), weak reward (WSPO runs with the weak pair loaded: sum of the weak pair's
    log-ratio over the completion, computed as for training records: `PreferenceDataModule.batch_of`,
    `WSPOModule.weak_reward`; absent when the weak pair's values come from a cache).
    Written to `<log_dir>/samples/step_<N>.jsonl`, and to W&B as one table holding the rows of every
    validation so far (so its latest version shows the whole history).

    Args:
        num_prompts: how many validation prompts (the first ones, so every table is comparable).
        max_new_tokens: completion length limit.
        do_sample: sample instead of greedy decoding.
    """

    columns = ["step", "prompt", "completion", "finished", "weak_reward"]
    key = "val/samples"
    """The table's W&B key."""

    def __init__(self, num_prompts: int = 4, max_new_tokens: int = 32, do_sample: bool = False) -> None:
        self.num_prompts, self.max_new_tokens, self.do_sample = num_prompts, max_new_tokens, do_sample
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
        renderer = datamodule.renderer
        policy = pl_module.policy
        stop = renderer.stop_ids(policy)
        pad = renderer.pad_id
        prompt_ids = renderer.prompt_ids(prompts)
        input_ids, attention_mask = left_pad(prompt_ids, pad, pl_module.device)
        was_training = policy.training
        policy.eval()
        generated = policy.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=self.max_new_tokens,
            do_sample=self.do_sample,
            pad_token_id=pad,
            eos_token_id=stop,
        )
        policy.train(was_training)
        width = input_ids.shape[1]
        completion_ids = generated[:, width:]  # [B, new]
        keep, finished = cut_at_stop(completion_ids, stop)
        finished = finished.tolist()
        responses = [row[kept].tolist() for row, kept in zip(completion_ids, keep)]
        completions = [renderer.decode(ids) for ids in responses]
        rows = [
            {"prompt": plain_text(p), "completion": c, "finished": f} for p, c, f in zip(prompts, completions, finished)
        ]
        if hasattr(pl_module, "weak_reward"):  # the completions as training records: rendered, batched, scored alike
            batch = datamodule.batch_of(prompts, completions, responses, finished)
            rewards = pl_module.weak_reward(move_data_to_device(batch, pl_module.device))
            for row, reward in zip(rows, rewards.tolist() if rewards is not None else []):
                row["weak_reward"] = reward
        return rows
