"""LightningModules for WSPO and its DPO baseline.

The module owns the models and the bookkeeping; the maths lives in `losses.py`. Frozen roles
(reference, weak pair) are held in a plain dict, not registered as submodules: strategies never
wrap, shard or checkpoint them, and quantized weights never meet FSDP.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from wspo_lightning import losses
from wspo_lightning.errors import InputError
from wspo_lightning.models import (
    ModelSpec,
    as_spec,
    check_model_path,
    check_same_vocabulary,
    disable_dropout,
    freeze,
    load_model,
    load_tokenizer,
)

log = logging.getLogger(__name__)


def response_logps(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor
                   ) -> tuple[Tensor, Tensor]:
    """Per-token log-probs of the response tokens: ([B, T'] float32, mask [B, T'] bool).

    The lm_head runs only from the batch's first response position on (`logits_to_keep`):
    with a large vocabulary that is most of the forward's cost. T' = L - first response position.
    """
    is_response = labels != losses.IGNORE_INDEX  # [B, L]
    first = int(is_response.int().argmax(dim=1)[is_response.any(dim=1)].min()) if is_response.any() else 1
    first = max(first, 1)  # the first token is never predicted
    keep = input_ids.shape[1] - first + 1
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, use_cache=False).logits
    targets = labels[:, first:]  # [B, T']
    return losses.token_logps(logits[:, :-1], targets), targets != losses.IGNORE_INDEX


def _sequences(batch: dict, part: str) -> tuple[Tensor, Tensor, Tensor]:
    return batch[f"{part}_input_ids"], batch[f"{part}_attention_mask"], batch[f"{part}_labels"]


def _concat_pairs(batch: dict) -> tuple[Tensor, Tensor, Tensor]:
    """Chosen rows then rejected rows, one forward for both (the data module pads them to one length)."""
    return tuple(torch.cat(pair) for pair in zip(_sequences(batch, "chosen"), _sequences(batch, "rejected")))


class PreferenceModule(pl.LightningModule):
    """What WSPO and DPO share: the trainable policy, frozen roles, optimiser, throughput.

    Args:
        policy: the strong model being trained.
        reference: frozen reference; None means a frozen copy of the policy's starting weights
            (with LoRA: the policy with its adapters disabled, no second copy).
        learning_rate: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_ratio: fraction of the optimizer steps spent warming up linearly, then cosine decay to 0.
        freeze_embeddings: keep the input embeddings (and a tied lm_head) fixed.
        disable_dropout: zero every dropout in the policy, so policy and reference agree at step 0.
    """

    def __init__(self, policy: ModelSpec, reference: ModelSpec | None = None, learning_rate: float = 1e-5,
                 weight_decay: float = 0.0, warmup_ratio: float = 0.1, freeze_embeddings: bool = False,
                 disable_dropout: bool = True) -> None:
        super().__init__()
        if not learning_rate > 0:
            raise InputError(f"model.learning_rate must be > 0, got {learning_rate}")
        if not 0 <= warmup_ratio < 1:
            raise InputError(f"model.warmup_ratio must be in [0, 1), got {warmup_ratio}")
        self.save_hyperparameters()
        # LightningCLI stores hparams as plain dicts: keep the specs themselves.
        self.policy_spec, self.reference_spec = as_spec(policy), as_spec(reference)
        self.policy: nn.Module | None = None  # built in configure_model, so strategies can shard it
        self.frozen: dict[str, nn.Module] = {}  # a plain dict on purpose: not submodules
        self._last_batch_start: float | None = None
        self._last_batch_tokens = 0

    # ---- roles -------------------------------------------------------------------------
    def frozen_specs(self) -> dict[str, ModelSpec]:
        """Frozen roles this objective needs, other than the reference."""
        return {}

    def all_specs(self) -> dict[str, ModelSpec]:
        specs = {"policy": self.policy_spec}
        if self.reference_spec is not None:
            specs["reference"] = self.reference_spec
        return {**specs, **self.frozen_specs()}

    @property
    def uses_lora(self) -> bool:
        return self.policy_spec.lora is not None

    def setup(self, stage: str) -> None:
        # Runs after the data module's setup, so bad data fails before any weights load.
        specs = self.all_specs()
        for role, spec in specs.items():
            check_model_path(spec, role)
        check_same_vocabulary({role: load_tokenizer(spec) for role, spec in specs.items()})
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        for role, spec in specs.items():
            if role != "policy" and role not in self.frozen:
                self.frozen[role] = load_model(spec, trainable=False, device=device)

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        policy = load_model(self.policy_spec, trainable=True)
        if self.hparams.disable_dropout:
            disable_dropout(policy)
        if self.hparams.freeze_embeddings:
            policy.get_input_embeddings().requires_grad_(False)
        if self.reference_spec is None and not self.uses_lora:
            self.frozen["reference"] = freeze(copy.deepcopy(policy))
        self.policy = policy

    def on_fit_start(self) -> None:
        for model in self.frozen.values():
            if not getattr(model, "is_quantized", False):
                model.to(self.device)

    def reference_logps(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
        with torch.no_grad():
            if "reference" in self.frozen:
                return response_logps(self.frozen["reference"], input_ids, attention_mask, labels)[0]
            with self.policy.disable_adapter():  # LoRA: the base model is the reference
                return response_logps(self.policy, input_ids, attention_mask, labels)[0]

    def frozen_logps(self, role: str, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
        with torch.no_grad():
            return response_logps(self.frozen[role], input_ids, attention_mask, labels)[0]

    # ---- optimisation ------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        from transformers import get_cosine_schedule_with_warmup

        params = [p for p in self.policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        schedule = get_cosine_schedule_with_warmup(optimizer, int(self.hparams.warmup_ratio * total), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last_batch_start is not None and now > self._last_batch_start:
            rate = self._last_batch_tokens / (now - self._last_batch_start)
            self.log("train/tokens_per_second", rate, on_step=True, on_epoch=False)
        self._last_batch_start = now
        self._last_batch_tokens = int(batch["chosen_attention_mask"].sum()) * (2 if self.trains_on_pairs else 1)

    @property
    def trains_on_pairs(self) -> bool:
        """Whether a training step runs the rejected responses too (for the token count)."""
        return False

    def _make_metrics(self, names: list[str]) -> nn.ModuleDict:
        # torchmetrics aggregates over batches and syncs across devices at epoch end.
        return nn.ModuleDict({name.replace("/", "__"): MeanMetric() for name in names})

    def _update_and_log(self, prefix: str, values: dict[str, tuple[Tensor, Tensor | float]]) -> None:
        for name, (value, weight) in values.items():
            metric = self.val_metrics[name.replace("/", "__")]
            metric.update(value.detach().float(), weight)
            self.log(f"{prefix}/{name}", metric, on_step=False, on_epoch=True)


class WSPOModule(PreferenceModule):
    """Weak-to-strong preference optimisation (arXiv 2410.18640), token-level loss of DESIGN.md.

    Args:
        weak_base: the weak model before alignment (frozen).
        weak_aligned: the same weak model after alignment (frozen).
        gamma: alignment strength; the authors' `pref_beta = b` corresponds to gamma = 1/b.
            A GammaSchedule callback may change `self.gamma` during training.
        train_on_rejected: also train on rejected responses (extra text; off, as in DESIGN.md).
    """

    def __init__(self, policy: ModelSpec, weak_base: ModelSpec, weak_aligned: ModelSpec,
                 reference: ModelSpec | None = None, gamma: float = 1.0, train_on_rejected: bool = False,
                 learning_rate: float = 1e-5, weight_decay: float = 0.0, warmup_ratio: float = 0.1,
                 freeze_embeddings: bool = False, disable_dropout: bool = True) -> None:
        if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > 0):
            raise InputError(f"model.gamma must be a finite positive number, got {gamma}")
        super().__init__(policy, reference, learning_rate, weight_decay, warmup_ratio, freeze_embeddings,
                         disable_dropout)
        self.weak_base_spec, self.weak_aligned_spec = as_spec(weak_base), as_spec(weak_aligned)
        self.gamma = float(gamma)  # documented hook: GammaSchedule sets it before each training batch
        self.val_metrics = self._make_metrics([
            "loss", "wspo/delta_strong", "wspo/delta_weak", "wspo/residual", "kl/policy_reference",
            "rewards/weak_margin", "rewards/weak_accuracy", "rewards/strong_margin", "rewards/strong_accuracy",
        ])

    @property
    def trains_on_pairs(self) -> bool:
        return self.hparams.train_on_rejected

    def frozen_specs(self) -> dict[str, ModelSpec]:
        return {"weak_base": self.weak_base_spec, "weak_aligned": self.weak_aligned_spec}

    def _all_logps(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """One forward per model: policy (with grad), reference, weak_aligned, weak_base; each [B, T']."""
        policy, mask = response_logps(self.policy, input_ids, attention_mask, labels)
        return {
            "policy": policy,
            "reference": self.reference_logps(input_ids, attention_mask, labels),
            "weak_aligned": self.frozen_logps("weak_aligned", input_ids, attention_mask, labels),
            "weak_base": self.frozen_logps("weak_base", input_ids, attention_mask, labels),
            "mask": mask,
        }

    def _loss_and_stats(self, lp: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        args = (lp["policy"], lp["reference"], lp["weak_aligned"], lp["weak_base"], lp["mask"], self.gamma)
        return losses.wspo_loss(*args), losses.wspo_token_stats(*args)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        sequences = _sequences(batch, "chosen")
        if self.hparams.train_on_rejected and "rejected_input_ids" in batch:
            sequences = _concat_pairs(batch)
        loss, stats = self._loss_and_stats(self._all_logps(*sequences))
        batch_size = sequences[0].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/wspo/gamma", self.gamma, batch_size=batch_size)
        for name in ("delta_strong", "delta_weak", "residual"):
            self.log(f"train/wspo/{name}", stats[name], batch_size=batch_size)
        self.log("train/kl/policy_reference", stats["delta_strong"], batch_size=batch_size)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> dict[str, Tensor]:
        return self._evaluate(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> dict[str, Tensor]:
        return self._evaluate(batch, "test")

    def _evaluate(self, batch: dict, prefix: str) -> dict[str, Tensor]:
        has_pairs = "rejected_input_ids" in batch
        n = batch["chosen_input_ids"].shape[0]
        lp = self._all_logps(*(_concat_pairs(batch) if has_pairs else _sequences(batch, "chosen")))
        chosen = {k: v[:n] for k, v in lp.items()}
        loss, stats = self._loss_and_stats(chosen)
        tokens = chosen["mask"].sum()
        values = {"loss": (loss, n), "kl/policy_reference": (stats["delta_strong"], tokens)}
        values.update({f"wspo/{k}": (v, tokens) for k, v in stats.items()})
        outputs = {}
        if has_pairs:
            for kind, (a, b) in {"weak": ("weak_aligned", "weak_base"), "strong": ("policy", "reference")}.items():
                rewards = losses.implicit_reward(lp[a], lp[b], lp["mask"])  # [2n]
                margin, correct = losses.reward_margin(rewards[:n], rewards[n:])
                values[f"rewards/{kind}_margin"] = (margin, 1.0)
                values[f"rewards/{kind}_accuracy"] = (correct, 1.0)
                outputs[f"{kind}_chosen"], outputs[f"{kind}_rejected"] = rewards[:n].detach(), rewards[n:].detach()
        self.log(f"{prefix}/wspo/gamma", self.gamma, batch_size=n)
        self._update_and_log(prefix, values)
        return outputs

    @torch.no_grad()
    def weak_reward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
        """reward_weak(x, y) = sum_t delta_weak(t) for each row: [B]. Used by SampleTable."""
        aligned, mask = response_logps(self.frozen["weak_aligned"], input_ids, attention_mask, labels)
        base = self.frozen_logps("weak_base", input_ids, attention_mask, labels)
        return losses.implicit_reward(aligned, base, mask)


class DPOModule(PreferenceModule):
    """Direct preference optimisation (sigmoid loss, TRL's numbers and metric names).

    Args:
        beta: strength of the implicit KL penalty.
        label_smoothing: conservative DPO's assumed label-noise rate, in [0, 0.5).
    """

    trains_on_pairs = True

    def __init__(self, policy: ModelSpec, reference: ModelSpec | None = None, beta: float = 0.1,
                 label_smoothing: float = 0.0, learning_rate: float = 1e-6, weight_decay: float = 0.0,
                 warmup_ratio: float = 0.1, freeze_embeddings: bool = False, disable_dropout: bool = True) -> None:
        if not (beta > 0 and beta != float("inf")):
            raise InputError(f"model.beta must be a finite positive number, got {beta}")
        super().__init__(policy, reference, learning_rate, weight_decay, warmup_ratio, freeze_embeddings,
                         disable_dropout)
        self.val_metrics = self._make_metrics([
            "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected", "kl/policy_reference",
        ])

    def _step(self, batch: dict) -> dict[str, tuple[Tensor, Any]]:
        if "rejected_input_ids" not in batch:
            raise InputError("DPO needs preference pairs: every record must have 'chosen' and 'rejected'")
        n = batch["chosen_input_ids"].shape[0]
        sequences = _concat_pairs(batch)
        policy, mask = response_logps(self.policy, *sequences)
        reference = self.reference_logps(*sequences)
        policy_seq, reference_seq = losses.sequence_logps(policy, mask), losses.sequence_logps(reference, mask)
        per_example, chosen_rewards, rejected_rewards = losses.dpo_loss(
            policy_seq[:n], policy_seq[n:], reference_seq[:n], reference_seq[n:],
            beta=self.hparams.beta, label_smoothing=self.hparams.label_smoothing)
        margin, correct = losses.reward_margin(chosen_rewards, rejected_rewards)
        kl = ((policy - reference) * mask).sum() / mask.sum().clamp(min=1)
        return {
            "loss": (per_example.mean(), n), "rewards/chosen": (chosen_rewards, 1.0),
            "rewards/rejected": (rejected_rewards, 1.0), "rewards/margins": (margin, 1.0),
            "rewards/accuracies": (correct, 1.0), "logps/chosen": (policy_seq[:n].detach(), 1.0),
            "logps/rejected": (policy_seq[n:].detach(), 1.0), "kl/policy_reference": (kl, mask.sum()),
        }

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        values = self._step(batch)
        n = batch["chosen_input_ids"].shape[0]
        for name, (value, _) in values.items():
            self.log(f"train/{name}", value.float().mean(), prog_bar=name == "loss", batch_size=n)
        return values["loss"][0]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._update_and_log("val", self._step(batch))

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._update_and_log("test", self._step(batch))
