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
from lightning.pytorch.loggers import WandbLogger

from wspo_lightning.losses import IGNORE_INDEX


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

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        for name, values in (outputs or {}).items():
            self._rewards.setdefault(name, []).append(values.detach().float())

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._rewards or trainer.sanity_checking:
            return
        rewards = {name: pl_module.all_gather(torch.cat(parts)).reshape(-1).cpu()
                   for name, parts in self._rewards.items()}
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

            logger.experiment.log({f"val/hist/{name}": wandb.Histogram(values.numpy())
                                   for name, values in histograms.items()} | {"trainer/global_step":
                                                                              trainer.global_step})


class SampleTable(pl.Callback):
    """At each validation end, complete a few fixed validation prompts with the policy and log a table.

    Columns: step, prompt, completion, weak reward (WSPO runs: sum of the weak pair's log-ratio over
    the completion). Logged to W&B as a table and written to `<log_dir>/samples/step_<N>.jsonl`.

    Args:
        num_prompts: how many validation prompts (the first ones, so every table is comparable).
        max_new_tokens: completion length limit.
        do_sample: sample instead of greedy decoding.
    """

    def __init__(self, num_prompts: int = 4, max_new_tokens: int = 32, do_sample: bool = False) -> None:
        self.num_prompts, self.max_new_tokens, self.do_sample = num_prompts, max_new_tokens, do_sample

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.datamodule is None:
            return
        prompts = trainer.datamodule.prompts("val", self.num_prompts)
        if not prompts:
            return
        rows = self._complete(pl_module, trainer.datamodule.tokenizer, prompts)
        # trainer.log_dir is a broadcast: every rank must ask for it
        out = Path(trainer.log_dir or trainer.default_root_dir) / "samples" / f"step_{trainer.global_step}.jsonl"
        if not trainer.is_global_zero:
            return
        for row in rows:
            row["step"] = trainer.global_step
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(row) + "\n" for row in rows))
        columns = ["step", "prompt", "completion", "weak_reward"]
        for logger in _wandb_loggers(trainer):
            logger.log_table(key="val/samples", columns=columns, data=[[r[c] for c in columns] for r in rows])

    def _complete(self, pl_module: pl.LightningModule, tokenizer: Any, prompts: list[str]) -> list[dict]:
        padding_side = tokenizer.padding_side
        tokenizer.padding_side = "left"  # generation appends on the right
        try:
            encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        finally:
            tokenizer.padding_side = padding_side
        encoded = encoded.to(pl_module.device)
        policy = pl_module.policy
        was_training = policy.training
        policy.eval()
        generated = policy.generate(**encoded, max_new_tokens=self.max_new_tokens, do_sample=self.do_sample,
                                    pad_token_id=tokenizer.pad_token_id)
        policy.train(was_training)
        prompt_len = encoded["input_ids"].shape[1]
        completion_ids = generated[:, prompt_len:]
        completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        rewards = [None] * len(prompts)
        if hasattr(pl_module, "weak_reward"):
            labels = generated.clone()
            labels[:, :prompt_len] = IGNORE_INDEX
            attention_mask = torch.cat([encoded["attention_mask"], torch.ones_like(completion_ids)], dim=1)
            after_eos = _after_first_eos(completion_ids, tokenizer.eos_token_id)
            labels[:, prompt_len:][after_eos] = IGNORE_INDEX
            attention_mask[:, prompt_len:][after_eos] = 0
            rewards = pl_module.weak_reward(generated, attention_mask, labels).tolist()
        return [{"prompt": p, "completion": c, "weak_reward": r} for p, c, r in zip(prompts, completions, rewards)]


def _after_first_eos(ids: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """Mask [B, T] of positions strictly after each row's first EOS (generate pads there)."""
    if eos_token_id is None:
        return torch.zeros_like(ids, dtype=torch.bool)
    is_eos = (ids == eos_token_id).int()
    return (is_eos.cumsum(dim=1) - is_eos) > 0
