"""`PreferenceModule`: what every objective shares: the trainable policy, its frozen roles, the cache of
their values, the optimiser and the logging."""

from __future__ import annotations

import copy
import logging
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor, nn

from wspo_lightning import optim
from wspo_lightning.cache.store import LogpsCache
from wspo_lightning.errors import InputError
from wspo_lightning.frozen import FrozenRoles
from wspo_lightning.logprobs import use_packing
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
from wspo_lightning.resume import changed_hyperparameters

log = logging.getLogger(__name__)
_warn = rank_zero_only(log.warning)


def sequences(batch: dict, side: str) -> tuple[Tensor, Tensor, Tensor]:
    """(input_ids, attention_mask, labels) of one side ("chosen" or "rejected") of a collated batch."""
    return batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"], batch[f"{side}_labels"]


def step_rows(batch: dict, pairs: bool) -> tuple[list[str], tuple[Tensor, Tensor, Tensor]]:
    """The sides a step runs (chosen, then rejected when `pairs` and the batch has them) and their rows,
    concatenated for one forward (the data module pads both sides to one length)."""
    if pairs and "rejected_input_ids" in batch:
        return ["chosen", "rejected"], tuple(
            torch.cat(pair) for pair in zip(sequences(batch, "chosen"), sequences(batch, "rejected"))
        )
    return ["chosen"], sequences(batch, "chosen")


class PreferenceModule(ObjectiveMetrics, pl.LightningModule):
    """What the objectives share: the trainable policy, frozen roles, the cache, optimiser, throughput.

    Args:
        policy: the strong model being trained.
        reference: frozen reference; None means a frozen copy of the policy's starting weights
            (with LoRA: the policy with its adapters disabled, no second copy).
        learning_rate: peak AdamW learning rate (the default optimizer's; a given `optimizer` has its own lr).
        weight_decay: AdamW weight decay (the default optimizer's).
        warmup_ratio: fraction of the optimizer steps spent warming up linearly, then cosine decay to 0
            (the default schedule's).
        freeze_embeddings: keep the input embeddings (and a tied lm_head) fixed.
        disable_dropout: zero every dropout in the policy, so policy and reference agree at step 0.
        cache_dir: frozen log-probs written by `wspo precompute` for this config; the cached roles
            never load. A cache that no longer matches the data or the models is refused.
        optimizer: an optimizer class_path / init_args block (torch.optim.*, bitsandbytes.optim.AdamW8bit,
            PagedAdamW, PagedAdamW8bit, ...); null: AdamW at learning_rate (`wspo_lightning.optim`).
        lr_scheduler: a schedule class_path / init_args block; an unset `num_training_steps` or `total_steps`
            gets the run's optimizer steps; null: warm-up over warmup_ratio, then cosine decay.

    These arguments are declared here alone: an objective declares its own and passes the rest on as
    `**kwargs` (jsonargparse follows them here, so its CLI help and configs list every one), restating a
    shared one only to change its default.
    """

    def __init__(
        self,
        policy: ModelSpec,
        reference: ModelSpec | None = None,
        learning_rate: float = 1e-5,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.1,
        freeze_embeddings: bool = False,
        disable_dropout: bool = True,
        cache_dir: str | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        if not learning_rate > 0:
            raise InputError(f"model.learning_rate must be > 0, got {learning_rate}")
        if not 0 <= warmup_ratio < 1:
            raise InputError(f"model.warmup_ratio must be in [0, 1), got {warmup_ratio}")
        self.save_hyperparameters()
        # the callables themselves (hparams hold their config blocks under LightningCLI)
        self.optimizer_callable, self.lr_scheduler_callable = optimizer, lr_scheduler
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

    def check_tokenizers(self, datamodule: Any) -> None:
        """Token-level objectives compare log-probs token by token: every role shares one vocabulary.
        `datamodule`: the run's (set up), for objectives whose roles render the data on their own."""
        check_same_vocabulary({role: load_tokenizer(spec) for role, spec in self.all_specs().items()})

    def setup(self, stage: str) -> None:
        # Runs after the data module's setup, so bad data fails before any weights load.
        specs = self.all_specs()
        for role, spec in specs.items():
            check_model_path(spec, role)
        self.check_tokenizers(self.trainer.datamodule if self._trainer is not None else None)
        if self.cache_dir and self.cache is None:
            self.cache = LogpsCache.open(self.cache_dir, self, self.trainer.datamodule)
            log.info("frozen values %s come from the cache %s", self.cache.values, self.cache_dir)
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        live = self._live_roles()  # a reference without a spec comes from the policy (configure_model)
        frozen = {role: spec for role, spec in specs.items() if role in live and role != "policy"}
        if self.frozen_placement != "replicate":  # float roles load sharded in configure_model
            frozen = {role: spec for role, spec in frozen.items() if spec.quantization != "none"}
        self.frozen.load(frozen, device)

    @property
    def frozen_placement(self) -> str:
        """Where the strategy keeps frozen roles: "replicate" (a copy per device), "shard" or "offload" (FSDP2)."""
        return getattr(self.trainer.strategy, "frozen_roles", "replicate") if self._trainer is not None else "replicate"

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        device = self.trainer.strategy.root_device if self._trainer is not None else None
        quantized = self.policy_spec.quantization != "none"  # bitsandbytes weights cannot move after loading
        strategy = type(self.trainer.strategy).__name__ if self._trainer is not None else None
        if quantized and strategy == "FSDPStrategy":
            raise InputError(
                "a bitsandbytes-quantized policy (QLoRA) cannot be wrapped by FSDPStrategy (FSDP1) here: "
                "use FSDP2 (configs/strategies/fsdp2.yaml) or DDP (configs/strategies/ddp.yaml)"
            )
        copy_reference = self.reference_spec is None and not self.uses_lora and "reference" in self._live_roles()
        if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2 over the data-parallel mesh
            policy = self._configure_sharded(device, copy_reference)
        else:
            policy = load_model(self.policy_spec, trainable=True, device=device if quantized else None)
            self._prepare_policy(policy)
            if copy_reference:
                self.frozen.add("reference", freeze(copy.deepcopy(policy)))
        if self._trainer is not None and getattr(self.trainer.datamodule, "packing", False):
            for model in [policy, *(self.frozen[role] for role in self.frozen)]:
                use_packing(model)
        self.policy = policy

    def _prepare_policy(self, policy: nn.Module) -> None:
        if self.hparams.disable_dropout:
            disable_dropout(policy)
        if self.hparams.freeze_embeddings:
            policy.get_input_embeddings().requires_grad_(False)

    def _configure_sharded(self, device: torch.device, copy_reference: bool) -> nn.Module:
        """FSDP2: the policy, and with `frozen_roles` shard/offload the float frozen roles, built on the meta device
        and sharded, each rank reading only its rows of the weights (`shard_load`); a model that cannot load so
        loads whole, then is sharded. A reference copy of the policy is read from the policy's files."""
        from wspo_lightning.shard_load import load_sharded
        from wspo_lightning.strategies import shard_frozen, shard_policy

        quantized = self.policy_spec.quantization != "none"

        def policy_shards(model: nn.Module) -> nn.Module:
            return shard_policy(model, self.device_mesh, str(self.trainer.precision))

        policy = load_sharded(
            self.policy_spec, policy_shards, device, trainable=True, before_shard=self._prepare_policy
        )
        if policy is None:
            policy = load_model(self.policy_spec, trainable=True, device=device if quantized else None)
            self._prepare_policy(policy)
            if copy_reference and self.frozen_placement == "replicate":  # a whole copy per rank, as asked
                self.frozen.add("reference", freeze(copy.deepcopy(policy)))
            policy = policy_shards(policy)
        roles = {"reference": self.policy_spec} if copy_reference and "reference" not in self.frozen else {}
        if self.frozen_placement == "replicate":
            self.frozen.load(roles)  # placed on the device in on_fit_start
            return policy
        offload = self.frozen_placement == "offload"

        def frozen_shards(model: nn.Module) -> nn.Module:
            return shard_frozen(model, self.device_mesh, offload=offload)

        live = self._live_roles()
        roles.update({role: spec for role, spec in self.frozen_specs().items() if role in live})
        if self.reference_spec is not None and "reference" in live:
            roles["reference"] = self.reference_spec
        for role, spec in roles.items():
            if role in self.frozen:  # quantized: loaded whole on the device in setup
                continue
            model = load_sharded(spec, frozen_shards, "cpu" if offload else device)
            self.frozen.add(role, model if model is not None else frozen_shards(load_model(spec)))
        return policy

    def on_fit_start(self) -> None:  # a reference copied in configure_model is still on the CPU
        self.frozen.place(self.device)

    on_validation_start = on_test_start = on_fit_start

    def reference_logps(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
        return self.frozen.reference_logps(self.policy, input_ids, attention_mask, labels)

    def cached(self, batch: dict, split: str, sides: list[str], mask: Tensor) -> dict[str, Tensor]:
        """Cached values for the step's rows ([len(sides) * B, T'] each, in `mask`'s layout); {} without a cache."""
        if self.cache is None:
            return {}
        if split == "test":  # `wspo test` without a test_path reads the validation data
            split = getattr(self.trainer.datamodule, "test_split", split)
        return self.cache.lookup(split, batch["index"], sides, mask)

    # ---- optimisation ------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        params = [p for p in self.policy.parameters() if p.requires_grad]
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        hp = self.hparams
        configured = optim.configure(
            params,
            total,
            self.optimizer_callable,
            self.lr_scheduler_callable,
            hp.learning_rate,
            hp.weight_decay,
            hp.warmup_ratio,
        )
        self._configured_groups = optim.group_settings(configured["optimizer"])
        return configured

    def _frozen_quantized_base(self) -> set[str]:
        """State-dict keys of a quantized (QLoRA) policy's frozen base: it reloads from `policy.path`, and
        bitsandbytes cannot load its packed weights and quantization state back through `load_state_dict`."""
        if self.policy is None or self.policy_spec.quantization == "none":
            return set()
        trained = {f"policy.{name}" for name, p in self.policy.named_parameters() if p.requires_grad}
        return {key for key in self.state_dict() if key.startswith("policy.") and key not in trained}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        base = self._frozen_quantized_base()
        if base:  # a QLoRA checkpoint holds the adapters (MBs), not the 4-bit base (GBs)
            checkpoint["state_dict"] = _without(checkpoint["state_dict"], base)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        for line in changed_hyperparameters(checkpoint.get("hyper_parameters") or {}, dict(self.hparams)):
            _warn(line)
        base = self._frozen_quantized_base()
        if base:
            checkpoint["state_dict"] = _without(checkpoint["state_dict"], base)  # (older ones hold the base too)
            missing = sorted(set(self.state_dict()) - base - set(checkpoint["state_dict"]))
            if missing:
                raise InputError(f"the checkpoint lacks trained weights of the policy, e.g. {missing[:3]}")
            self.strict_loading = False  # the base's keys are absent on purpose

    def on_train_start(self) -> None:
        # A resumed optimizer state brings the old run's settings (weight decay, peak learning rate): the
        # config's win (`optim.reapply_settings`).
        if self.trainer.ckpt_path is not None and getattr(self, "_configured_groups", None) is not None:
            config = self.trainer.lr_scheduler_configs[0] if self.trainer.lr_scheduler_configs else None
            optim.reapply_settings(
                self.trainer.optimizers[0], config.scheduler if config else None, self._configured_groups
            )

    def validation_step(self, batch: dict, batch_idx: int) -> Any:
        return self.evaluate(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> Any:
        return self.evaluate(batch, "test")

    def evaluate(self, batch: dict, prefix: str) -> Any:
        raise NotImplementedError(f"{type(self).__name__} defines no validation")


def _without(state: dict[str, Any], keys: set[str]) -> dict[str, Any]:
    """`state` less `keys` and the entries under them (a 4-bit weight's `weight.absmax`, `weight.quant_map`, ...)."""
    prefixes = tuple(f"{key}." for key in keys)
    return {k: v for k, v in state.items() if k not in keys and not k.startswith(prefixes)}
