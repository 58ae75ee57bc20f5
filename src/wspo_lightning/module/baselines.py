"""The baselines trained the same way as WSPO: `DPOModule` (TRL's numbers and metric names) and `SFTModule`."""

from __future__ import annotations

import logging
from typing import Any

from torch import Tensor

from wspo_lightning import losses
from wspo_lightning.errors import InputError
from wspo_lightning.logprobs import response_logps
from wspo_lightning.losses import DPOLoss, PairLoss
from wspo_lightning.models import ModelSpec
from wspo_lightning.module.base import PreferenceModule, sequences, step_rows

log = logging.getLogger(__name__)


def shorthand_loss(beta: float | None, label_smoothing: float | None) -> DPOLoss:
    """DPOModule's `beta` / `label_smoothing` shorthand as its loss (null: DPOLoss's defaults, 0.1 and 0)."""
    beta = 0.1 if beta is None else beta
    label_smoothing = 0.0 if label_smoothing is None else label_smoothing
    if not (beta > 0 and beta != float("inf")):
        raise InputError(f"model.beta must be a finite positive number, got {beta}")
    if not 0 <= label_smoothing < 0.5:
        raise InputError(f"model.label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    return DPOLoss(beta, label_smoothing)


class DPOModule(PreferenceModule):
    """Direct preference optimisation and its family (TRL's numbers and metric names).

    Args:
        beta: shorthand for ``loss: DPOLoss(beta, label_smoothing)``: the strength of the implicit KL penalty
            (null: 0.1). Give it, or `loss`, not both.
        label_smoothing: the shorthand's conservative-DPO label-noise rate, in [0, 0.5) (null: 0).
        loss: the pair loss, a `wspo_lightning.losses.PairLoss` class_path / init_args block (DPOLoss,
            RobustDPOLoss, HingeLoss, IPOLoss; each owns its beta and an optional sft_weight); null: the
            shorthand's DPOLoss.
        Other arguments: see PreferenceModule, which declares those every objective shares (`**kwargs` here)
            once, with their defaults; learning_rate is declared here too, for DPO's own default (1e-6, TRL's).

    ``pair_loss`` is the loss in use, whichever way it was given (the model card names it).
    """

    trains_on_pairs = True
    metric_names = [
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "logratio/policy_reference",
    ]

    def __init__(
        self,
        policy: ModelSpec,
        reference: ModelSpec | None = None,
        beta: float | None = None,
        label_smoothing: float | None = None,
        loss: PairLoss | None = None,
        learning_rate: float = 1e-6,  # DPO's own default: the one shared argument declared here again
        **kwargs: Any,
    ) -> None:
        shorthand = " and ".join(
            f"model.{k}" for k, v in (("beta", beta), ("label_smoothing", label_smoothing)) if v is not None
        )
        if loss is not None and shorthand:
            raise InputError(
                f"{shorthand} and model.loss are both given: the loss owns its hyperparameters, so set them in "
                f"model.loss's init_args and leave {shorthand} unset"
            )
        pair_loss = loss if loss is not None else shorthand_loss(beta, label_smoothing)
        if loss is not None:
            # save_hyperparameters reads this frame's `loss`: leave the loss's YAML block there, as LightningCLI's
            # hparams hold it, not the module (checkpoints load with weights_only, which refuses pickled classes)
            cls = type(loss)
            loss = {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": loss.init_args()}
        super().__init__(policy, reference, learning_rate=learning_rate, **kwargs)
        self.pair_loss = pair_loss  # no parameters: nothing added to checkpoints or to the optimizer

    def _step(self, batch: dict, split: str) -> dict[str, tuple[Tensor, Any]]:
        if "rejected_input_ids" not in batch:
            raise InputError("DPO needs preference pairs: every record must have 'chosen' and 'rejected'")
        n = batch["chosen_input_ids"].shape[0]
        sides, rows = step_rows(batch, pairs=True)
        policy, mask = response_logps(self.policy, *rows)
        cached = self.cached(batch, split, sides, mask)  # {} without a cache
        reference = cached["reference"] if "reference" in cached else self.reference_logps(*rows)
        per_example, chosen_rewards, rejected_rewards = self.pair_loss(
            policy[:n], policy[n:], reference[:n], reference[n:], mask[:n], mask[n:]
        )
        policy_seq = losses.sequence_logps(policy, mask).detach()  # [2n]
        margin, correct = losses.reward_margin(chosen_rewards, rejected_rewards)
        logratio = ((policy - reference) * mask).sum() / mask.sum().clamp(min=1)
        return {
            "loss": (per_example.mean(), n),
            "rewards/chosen": (chosen_rewards, 1.0),
            "rewards/rejected": (rejected_rewards, 1.0),
            "rewards/margins": (margin, 1.0),
            "rewards/accuracies": (correct, 1.0),
            "logps/chosen": (policy_seq[:n], 1.0),
            "logps/rejected": (policy_seq[n:], 1.0),
            "logratio/policy_reference": (logratio, mask.sum()),
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
        return {
            "loss": (-per_sequence.sum() / tokens.clamp(min=1), tokens),
            "logps/chosen": (per_sequence.detach(), 1.0),
        }

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        values = self._step(batch)
        self._log_step(values, batch_size=batch["chosen_input_ids"].shape[0])
        return values["loss"][0]

    def evaluate(self, batch: dict, prefix: str) -> None:
        self._update_and_log(prefix, self._step(batch))
