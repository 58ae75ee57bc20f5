"""LightningModules for WSPO and its DPO baseline.

The module owns the models and the bookkeeping; the maths lives in `losses.py`. Frozen roles
(reference, weak pair) are held in a plain dict, not registered as submodules: strategies never
wrap, shard or checkpoint them, and quantized weights never meet FSDP. With `cache_dir` (built by
`wspo precompute`) their values come from disk and only the policy loads.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from wspo_lightning.precompute import LogpsCache

log = logging.getLogger(__name__)


def response_logps(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor
                   ) -> tuple[Tensor, Tensor]:
    """Per-token log-probs of the response tokens: ([B, T'] float32, mask [B, T'] bool).

    The lm_head runs only from the batch's first response position on (`logits_to_keep`):
    with a large vocabulary that is most of the forward's cost. T' = L - first response position.
    """
    first = response_start(labels)
    keep = input_ids.shape[1] - first + 1
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, use_cache=False).logits
    targets = labels[:, first:]  # [B, T']
    return losses.token_logps(logits[:, :-1], targets), targets != losses.IGNORE_INDEX


def response_start(labels: Tensor) -> int:
    """The batch's first response position (at least 1: the first token is never predicted)."""
    is_response = labels != losses.IGNORE_INDEX  # [B, L]
    first = int(is_response.int().argmax(dim=1)[is_response.any(dim=1)].min()) if is_response.any() else 1
    return max(first, 1)


def response_mask(labels: Tensor) -> Tensor:
    """The [B, T'] mask of response tokens in the layout `response_logps` returns."""
    return labels[:, response_start(labels):] != losses.IGNORE_INDEX


def _sequences(batch: dict, part: str) -> tuple[Tensor, Tensor, Tensor]:
    return batch[f"{part}_input_ids"], batch[f"{part}_attention_mask"], batch[f"{part}_labels"]


def _concat_pairs(batch: dict) -> tuple[Tensor, Tensor, Tensor]:
    """Chosen rows then rejected rows, one forward for both (the data module pads them to one length)."""
    return tuple(torch.cat(pair) for pair in zip(_sequences(batch, "chosen"), _sequences(batch, "rejected")))


def _sides(batch: dict, pairs: bool) -> tuple[list[str], tuple[Tensor, Tensor, Tensor]]:
    """The sides a step runs (chosen, then rejected when `pairs` and the batch has them) and their rows."""
    if pairs and "rejected_input_ids" in batch:
        return ["chosen", "rejected"], _concat_pairs(batch)
    return ["chosen"], _sequences(batch, "chosen")


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
        self.frozen: dict[str, nn.Module] = {}  # a plain dict on purpose: not submodules
        self.cache_dir = cache_dir
        self.cache: LogpsCache | None = None  # opened in setup
        self.precomputing: list[str] | None = None  # set by `wspo precompute`: the values it computes
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

    # ---- the logps cache (wspo precompute) ---------------------------------------------
    def required_cache_values(self) -> list[str]:
        """Values a cache must hold for this objective."""
        return ["reference"]

    def cacheable_values(self, reference: bool = True) -> list[str]:
        """Values `wspo precompute` writes: the reference's log-probs unless `reference` is False."""
        if not reference:
            raise InputError(f"{type(self).__name__} caches only the reference: drop --no-reference")
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
        """Frozen roles computed in this process: those `precomputing` needs, else all but the cached ones."""
        if self.precomputing is not None:
            return set(self.cache_roles(self.precomputing))
        roles = set(self.frozen_specs()) | {"reference"}
        return roles - set(self.cache_roles(self.cache.values)) if self.cache is not None else roles

    def setup(self, stage: str) -> None:
        # Runs after the data module's setup, so bad data fails before any weights load.
        specs = self.all_specs()
        for role, spec in specs.items():
            check_model_path(spec, role)
        check_same_vocabulary({role: load_tokenizer(spec) for role, spec in specs.items()})
        if self.cache_dir and self.precomputing is None and self.cache is None:
            from wspo_lightning.precompute import LogpsCache

            self.cache = LogpsCache.open(self.cache_dir, self, self.trainer.datamodule)
            log.info("frozen values %s come from the cache %s", self.cache.values, self.cache_dir)
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        live = self._live_roles()
        for role, spec in specs.items():
            if role in live and role not in self.frozen:  # a reference without a spec comes from the policy
                self.frozen[role] = load_model(spec, trainable=False, device=device)

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        reference_from_policy = self.reference_spec is None and "reference" in self._live_roles()
        device = self.trainer.strategy.root_device if self._trainer is not None else None
        if self.precomputing is not None:  # no training: the policy loads only as the reference
            if reference_from_policy and not self.uses_lora:
                self.frozen["reference"] = load_model(self.policy_spec, trainable=False, device=device)
            if not (reference_from_policy and self.uses_lora):
                return
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
        if reference_from_policy and not self.uses_lora:
            self.frozen["reference"] = freeze(copy.deepcopy(policy))  # before any sharding: a full copy
        if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2 over the data-parallel mesh
            from wspo_lightning.strategies import shard_policy

            policy = shard_policy(policy, self.device_mesh, str(self.trainer.precision))
        self.policy = policy

    def _place_frozen(self) -> None:
        for model in self.frozen.values():
            if not getattr(model, "is_quantized", False):
                model.to(self.device)

    def on_fit_start(self) -> None:  # a reference copied in configure_model is still on the CPU
        self._place_frozen()

    on_validation_start = on_test_start = on_predict_start = on_fit_start

    def reference_logps(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
        with torch.no_grad():
            if "reference" in self.frozen:
                return response_logps(self.frozen["reference"], input_ids, attention_mask, labels)[0]
            with self.policy.disable_adapter():  # LoRA: the base model is the reference
                return response_logps(self.policy, input_ids, attention_mask, labels)[0]

    def frozen_logps(self, role: str, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
        with torch.no_grad():
            return response_logps(self.frozen[role], input_ids, attention_mask, labels)[0]

    def cached(self, batch: dict, split: str, sides: list[str], mask: Tensor) -> dict[str, Tensor]:
        """Cached values for the step's rows ([len(sides) * B, T'] each, in `mask`'s layout); {} without a cache."""
        if self.cache is None:
            return {}
        return self.cache.lookup(split, batch["index"], sides, mask)

    @torch.no_grad()
    def frozen_values(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                      values: list[str]) -> tuple[dict[str, Tensor], Tensor]:
        """The cacheable `values` of each row, [B, T'] float32, and the response mask [B, T']."""
        out = {}
        if "delta_weak" in values:
            out["delta_weak"] = (self.frozen_logps("weak_aligned", input_ids, attention_mask, labels)
                                 - self.frozen_logps("weak_base", input_ids, attention_mask, labels))
        if "reference" in values:
            out["reference"] = self.reference_logps(input_ids, attention_mask, labels)
        return out, response_mask(labels)

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """For `wspo precompute`: per row, its response length and the values of its response tokens,
        concatenated row after row (`{"index": [B], "length": [B], value: [sum of lengths]}`)."""
        if self.precomputing is None:
            raise RuntimeError("predict_step computes the logps cache: run it through `wspo precompute`")
        values, mask = self.frozen_values(*_sequences(batch, "chosen"), self.precomputing)
        return {"index": batch["index"], "length": mask.sum(dim=1),
                **{name: value[mask].float() for name, value in values.items()}}

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

    def _log_step(self, values: dict[str, tuple[Tensor, Tensor | float]], batch_size: int) -> None:
        """Log `train/` step values, each (scalar mean, weight) or a per-example vector, as means over the
        global batch: under DDP/FSDP one all-reduce of (sum, weight) pairs, so two ranks log what one
        process holding both halves would (a token-weighted mean stays token-weighted)."""
        means = {name: value.detach().float().mean() for name, (value, _) in values.items()}
        if self.trainer.world_size > 1:
            sums, weights = [], []
            for value, weight in values.values():
                value = value.detach().float()
                n = torch.as_tensor(value.numel() if value.dim() else weight, dtype=torch.float32, device=self.device)
                sums.append(value.sum() if value.dim() else value * n)
                weights.append(n)
            totals = self.trainer.strategy.reduce(torch.stack([torch.stack(sums), torch.stack(weights)]),
                                                  reduce_op="sum")  # [2, metrics]
            means = dict(zip(values, totals[0] / totals[1].clamp(min=1e-12)))
        for name, value in means.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=batch_size)

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
        Other arguments: see PreferenceModule.
    """

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
        self.val_metrics = self._make_metrics([
            "loss", "wspo/delta_strong", "wspo/delta_weak", "wspo/residual", "kl/policy_reference",
            "rewards/weak_margin", "rewards/weak_accuracy", "rewards/strong_margin", "rewards/strong_accuracy",
        ])

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
        """`_all_logps` of a step's rows (chosen, then rejected with `pairs`), frozen values from the cache if any."""
        sides, sequences = _sides(batch, pairs)
        return self._all_logps(*sequences, cached=self.cached(batch, split, sides, response_mask(sequences[2])))

    def _all_logps(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                   cached: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """One forward per model: policy (with grad), reference, weak_aligned, weak_base; each [B, T'].

        `cached` values replace forwards: "reference", and "delta_weak" as weak_aligned with zeros as
        weak_base (the loss and rewards use only their difference)."""
        cached = cached or {}
        sequences = (input_ids, attention_mask, labels)
        policy, mask = response_logps(self.policy, *sequences)
        reference = cached["reference"] if "reference" in cached else self.reference_logps(*sequences)
        if "delta_weak" in cached:
            weak_aligned, weak_base = cached["delta_weak"], torch.zeros_like(cached["delta_weak"])
        else:
            weak_aligned = self.frozen_logps("weak_aligned", *sequences)
            weak_base = self.frozen_logps("weak_base", *sequences)
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
                  "kl/policy_reference": (stats["delta_strong"], tokens)}
        self._log_step(values, batch_size=rows)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> dict[str, Tensor]:
        return self._evaluate(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> dict[str, Tensor]:
        return self._evaluate(batch, "test")

    def _evaluate(self, batch: dict, prefix: str) -> dict[str, Tensor]:
        has_pairs = "rejected_input_ids" in batch
        n = batch["chosen_input_ids"].shape[0]
        lp = self._step_logps(batch, prefix, pairs=True)
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
        """reward_weak(x, y) = sum_t delta_weak(t) for each row: [B]. Used by SampleTable.

        NaN when the weak pair is not loaded (its values come from a cache, which holds no new text)."""
        if "weak_aligned" not in self.frozen:
            if not getattr(self, "_warned_no_weak_pair", False):
                log.warning("weak_reward: the weak pair is not loaded (cache_dir), weak rewards of new text are NaN")
                self._warned_no_weak_pair = True
            return torch.full((input_ids.shape[0],), float("nan"), device=input_ids.device)
        aligned, mask = response_logps(self.frozen["weak_aligned"], input_ids, attention_mask, labels)
        base = self.frozen_logps("weak_base", input_ids, attention_mask, labels)
        return losses.implicit_reward(aligned, base, mask)


class DPOModule(PreferenceModule):
    """Direct preference optimisation (sigmoid loss, TRL's numbers and metric names).

    Args:
        beta: strength of the implicit KL penalty.
        label_smoothing: conservative DPO's assumed label-noise rate, in [0, 0.5).
        Other arguments: see PreferenceModule.
    """

    trains_on_pairs = True

    def __init__(self, policy: ModelSpec, reference: ModelSpec | None = None, beta: float = 0.1,
                 label_smoothing: float = 0.0, learning_rate: float = 1e-6, weight_decay: float = 0.0,
                 warmup_ratio: float = 0.1, freeze_embeddings: bool = False, disable_dropout: bool = True,
                 cache_dir: str | None = None) -> None:
        if not (beta > 0 and beta != float("inf")):
            raise InputError(f"model.beta must be a finite positive number, got {beta}")
        super().__init__(policy, reference, learning_rate, weight_decay, warmup_ratio, freeze_embeddings,
                         disable_dropout, cache_dir)
        self.val_metrics = self._make_metrics([
            "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected", "kl/policy_reference",
        ])

    def _step(self, batch: dict, split: str) -> dict[str, tuple[Tensor, Any]]:
        if "rejected_input_ids" not in batch:
            raise InputError("DPO needs preference pairs: every record must have 'chosen' and 'rejected'")
        n = batch["chosen_input_ids"].shape[0]
        sides, sequences = _sides(batch, pairs=True)
        policy, mask = response_logps(self.policy, *sequences)
        cached = self.cached(batch, split, sides, mask)  # {} without a cache
        reference = cached["reference"] if "reference" in cached else self.reference_logps(*sequences)
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
        values = self._step(batch, "train")
        self._log_step(values, batch_size=batch["chosen_input_ids"].shape[0])
        return values["loss"][0]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._update_and_log("val", self._step(batch, "val"))

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._update_and_log("test", self._step(batch, "test"))
