"""`WSPOModule`: weak-to-strong preference optimisation, the token-level loss of docs/design.md."""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import torch
from torch import Tensor

from wspo_lightning import losses
from wspo_lightning.errors import InputError
from wspo_lightning.logprobs import response_logps, response_mask
from wspo_lightning.models import ModelSpec, as_spec, check_same_vocabulary, load_tokenizer
from wspo_lightning.module.base import PreferenceModule, step_rows
from wspo_lightning.render import tokenizer_fingerprint

log = logging.getLogger(__name__)


class WSPOModule(PreferenceModule):
    """Weak-to-strong preference optimisation (arXiv 2410.18640), token-level loss of docs/design.md.

    Args:
        weak_base: the weak model before alignment (frozen).
        weak_aligned: the same weak model after alignment (frozen).
        gamma: alignment strength; the authors' `pref_beta = b` corresponds to gamma = 1/b.
            A GammaSchedule callback may change `self.gamma` during training.
        train_on_rejected: also train on rejected responses (extra text; off, as in the design).
        weak_tokenization: how the weak pair reads the text. "shared": the policy's tokens (one vocabulary);
            "own": its own tokenizer's rendering of the same prompt and response text, each weak token's
            log-ratio added onto the policy token holding its last character (docs/cross-tokenizer.md);
            "auto": own when the weak pair's vocabulary differs from the policy's, else shared.
        Other arguments: see PreferenceModule, which declares those every objective shares (`**kwargs` here)
            once, with their defaults.
    """

    metric_names = [
        "loss",
        "wspo/delta_strong",
        "wspo/delta_weak",
        "wspo/residual",
        "logratio/policy_reference",
        "rewards/weak_margin",
        "rewards/weak_accuracy",
        "rewards/strong_margin",
        "rewards/strong_accuracy",
    ]

    def __init__(
        self,
        policy: ModelSpec,
        weak_base: ModelSpec,
        weak_aligned: ModelSpec,
        reference: ModelSpec | None = None,
        gamma: float = 1.0,
        train_on_rejected: bool = False,
        *,
        weak_tokenization: Literal["auto", "shared", "own"] = "auto",
        **kwargs: Any,
    ) -> None:
        if weak_tokenization not in ("auto", "shared", "own"):
            raise InputError(f"model.weak_tokenization must be auto, shared or own, got {weak_tokenization!r}")
        if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > 0):
            raise InputError(f"model.gamma must be a finite positive number, got {gamma}")
        super().__init__(policy, reference, **kwargs)
        self.weak_base_spec, self.weak_aligned_spec = as_spec(weak_base), as_spec(weak_aligned)
        self.gamma = float(gamma)  # documented hook: GammaSchedule sets it before each training batch

    @property
    def trains_on_pairs(self) -> bool:
        return self.hparams.train_on_rejected

    def frozen_specs(self) -> dict[str, ModelSpec]:
        return {"weak_base": self.weak_base_spec, "weak_aligned": self.weak_aligned_spec}

    def required_cache_values(self) -> list[str]:
        return ["delta_weak"]

    def check_tokenizers(self, datamodule: Any) -> None:
        """The strong roles share one vocabulary and the weak pair one; the weak pair shares the policy's, or
        (weak_tokenization own, or auto with another vocabulary) `datamodule` renders the weak side too."""
        tokenizers = {role: load_tokenizer(spec) for role, spec in self.all_specs().items()}
        weak = {role: tokenizers.pop(role) for role in ("weak_base", "weak_aligned")}
        check_same_vocabulary(tokenizers)
        check_same_vocabulary(
            weak,
            "The weak pair's log-ratio compares its two models token by token, so they need one vocabulary "
            "(the pair may have another one than the policy's: docs/cross-tokenizer.md).",
        )
        policy, weak_base = tokenizers["policy"], weak["weak_base"]
        mode = self.hparams.weak_tokenization
        same = weak_base.get_vocab() == policy.get_vocab()
        if mode == "shared" and not same:
            raise InputError(
                f"model.weak_tokenization=shared, but the tokenizers of policy and weak_base differ "
                f"({len(policy)} vs {len(weak_base)} tokens). Set it to auto (or own): the weak pair then "
                "scores its own tokenization of the text (docs/cross-tokenizer.md)."
            )
        if mode == "shared" or (mode == "auto" and same):
            return
        if not hasattr(datamodule, "use_weak_tokenizer"):
            raise InputError(
                "a weak pair with its own tokenizer needs the PreferenceDataModule (it renders the weak side "
                f"of the data); got {type(datamodule).__name__}"
            )
        if tokenizer_fingerprint(weak["weak_aligned"]) != tokenizer_fingerprint(weak_base):
            log.warning(
                "weak_base and weak_aligned have different tokenizer files or chat templates: both score the "
                "rendering of weak_base's (%s)",
                self.weak_base_spec.path,
            )
        datamodule.use_weak_tokenizer(weak_base, name=self.weak_base_spec.path)

    def cacheable_values(self, reference: bool = True) -> list[str]:
        return ["delta_weak"] + (["reference"] if reference else [])

    def _step_logps(self, batch: dict, split: str, pairs: bool) -> dict[str, Tensor]:
        """Per-token log-probs of a step's rows (chosen, then rejected with `pairs`), each [rows, T']: the policy
        (with grad), the reference and the weak pair, frozen values from the cache where it has them.

        delta_weak (cached, or `FrozenRoles.step_delta_weak`: on the policy's tokens or mapped onto them) stands
        in as weak_aligned with zeros as weak_base (the loss and rewards use only their difference)."""
        sides, rows = step_rows(batch, pairs)
        policy, mask = response_logps(self.policy, *rows)
        cached = self.cached(batch, split, sides, mask)
        reference = cached["reference"] if "reference" in cached else self.reference_logps(*rows)
        delta_weak = cached["delta_weak"] if "delta_weak" in cached else self.frozen.step_delta_weak(batch, sides, rows)
        return {
            "policy": policy,
            "reference": reference,
            "weak_aligned": delta_weak,
            "weak_base": torch.zeros_like(delta_weak),
            "mask": mask,
        }

    def _loss_and_stats(self, lp: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        args = (lp["policy"], lp["reference"], lp["weak_aligned"], lp["weak_base"], lp["mask"], self.gamma)
        return losses.wspo_loss(*args), losses.wspo_token_stats(*args)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        lp = self._step_logps(batch, "train", self.hparams.train_on_rejected)
        loss, stats = self._loss_and_stats(lp)
        rows, tokens = lp["mask"].shape[0], lp["mask"].sum()
        self.log("train/wspo/gamma", self.gamma, batch_size=rows)
        values = {
            "loss": (loss, rows),
            **{f"wspo/{name}": (stats[name], tokens) for name in stats},
            "logratio/policy_reference": (stats["delta_strong"], tokens),
        }
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
    def weak_reward(self, batch: dict) -> Tensor | None:
        """reward_weak(x, y) = sum_t delta_weak(t) of each chosen row of a collated batch (the weak side
        included: `PreferenceDataModule.batch_of`), [B], as training computes delta_weak. Used by SampleTable.

        None when the weak pair is not loaded (its values come from a cache, which holds no new text)."""
        if "weak_aligned" not in self.frozen:
            return None
        sides, rows = step_rows(batch, pairs=False)
        delta = self.frozen.step_delta_weak(batch, sides, rows)
        return losses.implicit_reward(delta, torch.zeros_like(delta), response_mask(rows[2]))
