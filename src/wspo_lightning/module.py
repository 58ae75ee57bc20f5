"""LightningModules: WSPO, and the DPO and SFT baselines trained the same way.

A module owns the trainable policy and the bookkeeping; the maths lives in `losses.py`, the frozen
models in `FrozenRoles` (`frozen.py`). With `cache_dir` (built by `wspo precompute`) the frozen
roles' values come from disk and only the policy loads.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from wspo_lightning import losses
from wspo_lightning.cache.store import LogpsCache
from wspo_lightning.errors import InputError
from wspo_lightning.frozen import FrozenRoles
from wspo_lightning.logprobs import response_logps, response_mask
from wspo_lightning.metrics import ObjectiveMetrics
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


def sequences(batch: dict, side: str) -> tuple[Tensor, Tensor, Tensor]:
    """(input_ids, attention_mask, labels) of one side ("chosen" or "rejected") of a collated batch."""
    return batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"], batch[f"{side}_labels"]


def step_rows(batch: dict, pairs: bool) -> tuple[list[str], tuple[Tensor, Tensor, Tensor]]:
    """The sides a step runs (chosen, then rejected when `pairs` and the batch has them) and their rows,
    concatenated for one forward (the data module pads both sides to one length)."""
    if pairs and "rejected_input_ids" in batch:
        return ["chosen", "rejected"], tuple(torch.cat(pair) for pair in zip(sequences(batch, "chosen"),
                                                                             sequences(batch, "rejected")))
    return ["chosen"], sequences(batch, "chosen")


class PreferenceModule(ObjectiveMetrics, pl.LightningModule):
    """What the objectives share: the trainable policy, frozen roles, the cache, optimiser, throughput.

    Args:
        policy: the strong model being trained.
        reference: frozen reference; None means a frozen copy of the policy's starting weights
            (with LoRA: the policy with its adapters disabled, no second copy).
        learning_rate: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_ratio: fraction of the optimizer steps spent warming up linearly, then cosine decay to 0.
        freeze_embeddings: keep the input embeddings (and a tied lm_head) fixed.
        disable_dropout: zero every dropout in the policy, so policy and reference agree at step 0.
        cache_dir: frozen log-probs written by `wspo precompute` for this config; the cached roles
            never load. A cache that no longer matches the data or the models is refused.
    """

    def __init__(self, policy: ModelSpec, reference: ModelSpec | None = None, learning_rate: float = 1e-5,
                 weight_decay: float = 0.0, warmup_ratio: float = 0.1, freeze_embeddings: bool = False,
                 disable_dropout: bool = True, cache_dir: str | None = None) -> None:
        super().__init__()
        if not learning_rate > 0:
            raise InputError(f"model.learning_rate must be > 0, got {learning_rate}")
        if not 0 <= warmup_ratio < 1:
            raise InputError(f"model.warmup_ratio must be in [0, 1), got {warmup_ratio}")
        self.save_hyperparameters()
        # LightningCLI stores hparams as plain dicts: keep the specs themselves.
        self.policy_spec, self.reference_spec = as_spec(policy), as_spec(reference)
        self.policy: nn.Module | None = None  # built in configure_model, so strategies can shard it
        self.frozen = FrozenRoles()  # not a submodule: strategies never wrap or checkpoint it
        self.cache_dir = cache_dir
        self.cache: LogpsCache | None = None  # opened in setup
        self.val_metrics = self.make_metrics(self.metric_names)

    # ---- roles and the cache --------------------------------------------------------------------------
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

    @property
    def trains_on_pairs(self) -> bool:
        """Whether a training step runs the rejected responses too (cache sides, token count)."""
        return False

    def required_cache_values(self) -> list[str]:
        """Values a cache must hold for this objective."""
        return ["reference"]

    def cacheable_values(self, reference: bool = True) -> list[str]:
        """Values `wspo precompute` writes: the reference's log-probs unless `reference` is False."""
        if not reference:
            raise InputError(f"{type(self).__name__} caches only the reference: set precompute.reference: true")
        return ["reference"]

    def cache_roles(self, values: list[str]) -> dict[str, ModelSpec]:
        """The models behind cached `values`: role -> spec (the reference defaults to the policy's weights)."""
        roles = {}
        if "reference" in values:
            roles["reference"] = self.reference_spec or self.policy_spec
        if "delta_weak" in values:
            roles.update(self.frozen_specs())
        return roles

    def _live_roles(self) -> set[str]:
        """Frozen roles computed in this process: all but those whose values come from the cache."""
        roles = set(self.frozen_specs()) | {"reference"}
        return roles - set(self.cache_roles(self.cache.values)) if self.cache is not None else roles

    def setup(self, stage: str) -> None:
        # Runs after the data module's setup, so bad data fails before any weights load.
        specs = self.all_specs()
        for role, spec in specs.items():
            check_model_path(spec, role)
        check_same_vocabulary({role: load_tokenizer(spec) for role, spec in specs.items()})
        if self.cache_dir and self.cache is None:
            self.cache = LogpsCache.open(self.cache_dir, self, self.trainer.datamodule)
            log.info("frozen values %s come from the cache %s", self.cache.values, self.cache_dir)
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        live = self._live_roles()  # a reference without a spec comes from the policy (configure_model)
        self.frozen.load({role: spec for role, spec in specs.items() if role in live and role != "policy"}, device)

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        device = self.trainer.strategy.root_device if self._trainer is not None else None
        quantized = self.policy_spec.quantization != "none"  # bitsandbytes weights cannot move after loading
        strategy = type(self.trainer.strategy).__name__ if self._trainer is not None else None
        if quantized and strategy == "FSDPStrategy":
            raise InputError("a bitsandbytes-quantized policy (QLoRA) cannot be wrapped by FSDPStrategy here: "
                             "use DDP (configs/strategies/ddp.yaml), or a float policy with FSDP")
        policy = load_model(self.policy_spec, trainable=True, device=device if quantized else None)
        if self.hparams.disable_dropout:
            disable_dropout(policy)
        if self.hparams.freeze_embeddings:
            policy.get_input_embeddings().requires_grad_(False)
        if self.reference_spec is None and not self.uses_lora and "reference" in self._live_roles():
            self.frozen.add("reference", freeze(copy.deepcopy(policy)))  # before any sharding: a full copy
        if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2 over the data-parallel mesh
            from wspo_lightning.strategies import shard_policy

            policy = shard_policy(policy, self.device_mesh, str(self.trainer.precision))
        self.policy = policy

    def on_fit_start(self) -> None:  # a reference copied in configure_model is still on the CPU
        self.frozen.place(self.device)

    on_validation_start = on_test_start = on_fit_start

    def reference_logps(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
        return self.frozen.reference_logps(self.policy, input_ids, attention_mask, labels)

    def cached(self, batch: dict, split: str, sides: list[str], mask: Tensor) -> dict[str, Tensor]:
        """Cached values for the step's rows ([len(sides) * B, T'] each, in `mask`'s layout); {} without a cache."""
        if self.cache is None:
            return {}
        return self.cache.lookup(split, batch["index"], sides, mask)

    # ---- optimisation ------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        from transformers import get_cosine_schedule_with_warmup

        params = [p for p in self.policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        schedule = get_cosine_schedule_with_warmup(optimizer, int(self.hparams.warmup_ratio * total), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def validation_step(self, batch: dict, batch_idx: int) -> Any:
        return self.evaluate(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> Any:
        return self.evaluate(batch, "test")

    def evaluate(self, batch: dict, prefix: str) -> Any:
        raise NotImplementedError(f"{type(self).__name__} defines no validation")


class WSPOModule(PreferenceModule):
    """Weak-to-strong preference optimisation (arXiv 2410.18640), token-level loss of docs/design.md.

    Args:
        weak_base: the weak model before alignment (frozen).
        weak_aligned: the same weak model after alignment (frozen).
        gamma: alignment strength; the authors' `pref_beta = b` corresponds to gamma = 1/b.
            A GammaSchedule callback may change `self.gamma` during training.
        train_on_rejected: also train on rejected responses (extra text; off, as in the design).
        Other arguments: see PreferenceModule.
    """

    metric_names = ["loss", "wspo/delta_strong", "wspo/delta_weak", "wspo/residual", "logratio/policy_reference",
                    "rewards/weak_margin", "rewards/weak_accuracy", "rewards/strong_margin",
                    "rewards/strong_accuracy"]

    def __init__(self, policy: ModelSpec, weak_base: ModelSpec, weak_aligned: ModelSpec,
                 reference: ModelSpec | None = None, gamma: float = 1.0, train_on_rejected: bool = False,
                 learning_rate: float = 1e-5, weight_decay: float = 0.0, warmup_ratio: float = 0.1,
                 freeze_embeddings: bool = False, disable_dropout: bool = True, cache_dir: str | None = None) -> None:
        if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > 0):
            raise InputError(f"model.gamma must be a finite positive number, got {gamma}")
        super().__init__(policy, reference, learning_rate, weight_decay, warmup_ratio, freeze_embeddings,
                         disable_dropout, cache_dir)
        self.weak_base_spec, self.weak_aligned_spec = as_spec(weak_base), as_spec(weak_aligned)
        self.gamma = float(gamma)  # documented hook: GammaSchedule sets it before each training batch

    @property
    def trains_on_pairs(self) -> bool:
        return self.hparams.train_on_rejected

    def frozen_specs(self) -> dict[str, ModelSpec]:
        return {"weak_base": self.weak_base_spec, "weak_aligned": self.weak_aligned_spec}

    def required_cache_values(self) -> list[str]:
        return ["delta_weak"]

    def cacheable_values(self, reference: bool = True) -> list[str]:
        return ["delta_weak"] + (["reference"] if reference else [])

    def _step_logps(self, batch: dict, split: str, pairs: bool) -> dict[str, Tensor]:
        """Per-token log-probs of a step's rows (chosen, then rejected with `pairs`), each [rows, T']: the policy
        (with grad), the reference and the weak pair, frozen values from the cache where it has them.

        A cached delta_weak stands in as weak_aligned with zeros as weak_base (the loss and rewards use only
        their difference)."""
        sides, rows = step_rows(batch, pairs)
        policy, mask = response_logps(self.policy, *rows)
        cached = self.cached(batch, split, sides, mask)
        reference = cached["reference"] if "reference" in cached else self.reference_logps(*rows)
        if "delta_weak" in cached:
            weak_aligned, weak_base = cached["delta_weak"], torch.zeros_like(cached["delta_weak"])
        else:
            weak_aligned, weak_base = self.frozen.logps("weak_aligned", *rows), self.frozen.logps("weak_base", *rows)
        return {"policy": policy, "reference": reference, "weak_aligned": weak_aligned, "weak_base": weak_base,
                "mask": mask}

    def _loss_and_stats(self, lp: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        args = (lp["policy"], lp["reference"], lp["weak_aligned"], lp["weak_base"], lp["mask"], self.gamma)
        return losses.wspo_loss(*args), losses.wspo_token_stats(*args)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        lp = self._step_logps(batch, "train", self.hparams.train_on_rejected)
        loss, stats = self._loss_and_stats(lp)
        rows, tokens = lp["mask"].shape[0], lp["mask"].sum()
        self.log("train/wspo/gamma", self.gamma, batch_size=rows)
        values = {"loss": (loss, rows), **{f"wspo/{name}": (stats[name], tokens) for name in stats},
                  "logratio/policy_reference": (stats["delta_strong"], tokens)}
        self._log_step(values, batch_size=rows)
        return loss

    def evaluate(self, batch: dict, prefix: str) -> dict[str, Tensor]:
        n = batch["chosen_input_ids"].shape[0]
        lp = self._step_logps(batch, prefix, pairs=True)
        chosen = {k: v[:n] for k, v in lp.items()}
        loss, stats = self._loss_and_stats(chosen)
        tokens = chosen["mask"].sum()
        values = {"loss": (loss, n), "logratio/policy_reference": (stats["delta_strong"], tokens)}
        values.update({f"wspo/{k}": (v, tokens) for k, v in stats.items()})
        outputs = {}
        if "rejected_input_ids" in batch:
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
        """reward_weak(x, y) = sum_t delta_weak(t) for each row: [B]. Used by SampleTable.

        NaN when the weak pair is not loaded (its values come from a cache, which holds no new text)."""
        if "weak_aligned" not in self.frozen:
            if not getattr(self, "_warned_no_weak_pair", False):
                log.warning("weak_reward: the weak pair is not loaded (cache_dir), weak rewards of new text are NaN")
                self._warned_no_weak_pair = True
            return torch.full((input_ids.shape[0],), float("nan"), device=input_ids.device)
        delta = self.frozen.delta_weak(input_ids, attention_mask, labels)
        return losses.implicit_reward(delta, torch.zeros_like(delta), response_mask(labels))


class DPOModule(PreferenceModule):
    """Direct preference optimisation (sigmoid loss, TRL's numbers and metric names).

    Args:
        beta: strength of the implicit KL penalty.
        label_smoothing: conservative DPO's assumed label-noise rate, in [0, 0.5).
        Other arguments: see PreferenceModule.
    """

    trains_on_pairs = True
    metric_names = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                    "logps/chosen", "logps/rejected", "logratio/policy_reference"]

    def __init__(self, policy: ModelSpec, reference: ModelSpec | None = None, beta: float = 0.1,
                 label_smoothing: float = 0.0, learning_rate: float = 1e-6, weight_decay: float = 0.0,
                 warmup_ratio: float = 0.1, freeze_embeddings: bool = False, disable_dropout: bool = True,
                 cache_dir: str | None = None) -> None:
        if not (beta > 0 and beta != float("inf")):
            raise InputError(f"model.beta must be a finite positive number, got {beta}")
        super().__init__(policy, reference, learning_rate, weight_decay, warmup_ratio, freeze_embeddings,
                         disable_dropout, cache_dir)

    def _step(self, batch: dict, split: str) -> dict[str, tuple[Tensor, Any]]:
        if "rejected_input_ids" not in batch:
            raise InputError("DPO needs preference pairs: every record must have 'chosen' and 'rejected'")
        n = batch["chosen_input_ids"].shape[0]
        sides, rows = step_rows(batch, pairs=True)
        policy, mask = response_logps(self.policy, *rows)
        cached = self.cached(batch, split, sides, mask)  # {} without a cache
        reference = cached["reference"] if "reference" in cached else self.reference_logps(*rows)
        policy_seq, reference_seq = losses.sequence_logps(policy, mask), losses.sequence_logps(reference, mask)
        per_example, chosen_rewards, rejected_rewards = losses.dpo_loss(
            policy_seq[:n], policy_seq[n:], reference_seq[:n], reference_seq[n:],
            beta=self.hparams.beta, label_smoothing=self.hparams.label_smoothing)
        margin, correct = losses.reward_margin(chosen_rewards, rejected_rewards)
        logratio = ((policy - reference) * mask).sum() / mask.sum().clamp(min=1)
        return {
            "loss": (per_example.mean(), n), "rewards/chosen": (chosen_rewards, 1.0),
            "rewards/rejected": (rejected_rewards, 1.0), "rewards/margins": (margin, 1.0),
            "rewards/accuracies": (correct, 1.0), "logps/chosen": (policy_seq[:n].detach(), 1.0),
            "logps/rejected": (policy_seq[n:].detach(), 1.0), "logratio/policy_reference": (logratio, mask.sum()),
        }

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        values = self._step(batch, "train")
        self._log_step(values, batch_size=batch["chosen_input_ids"].shape[0])
        return values["loss"][0]

    def evaluate(self, batch: dict, prefix: str) -> None:
        self._update_and_log(prefix, self._step(batch, prefix))


class SFTModule(PreferenceModule):
    """Supervised fine-tuning on the chosen responses: the mean negative log-likelihood of their tokens.

    A baseline for WSPO on the same text: does aligning to the weak pair's shift beat plain fine-tuning on
    the positive responses? No frozen model: nothing loads but the policy.

    Args: see PreferenceModule (`reference` is unused).
    """

    metric_names = ["loss", "logps/chosen"]

    def _live_roles(self) -> set[str]:
        return set()

    def required_cache_values(self) -> list[str]:
        return []

    def cacheable_values(self, reference: bool = True) -> list[str]:
        raise InputError("SFTModule uses no frozen model: there is nothing to precompute")

    def _step(self, batch: dict) -> dict[str, tuple[Tensor, Any]]:
        policy, mask = response_logps(self.policy, *sequences(batch, "chosen"))
        tokens = mask.sum()
        per_sequence = losses.sequence_logps(policy, mask)  # [B]
        return {"loss": (-per_sequence.sum() / tokens.clamp(min=1), tokens), "logps/chosen": (per_sequence.detach(), 1.0)}

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        values = self._step(batch)
        self._log_step(values, batch_size=batch["chosen_input_ids"].shape[0])
        return values["loss"][0]

    def evaluate(self, batch: dict, prefix: str) -> None:
        self._update_and_log(prefix, self._step(batch))
