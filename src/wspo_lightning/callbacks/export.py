"""Export the trained policy as a Hugging Face folder (config + safetensors + tokenizer)."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import torch

from wspo_lightning.io import atomic_path

log = logging.getLogger(__name__)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether FSDP2 (DTensor parameters) or FSDP1 (FullyShardedDataParallel units) shards `model`."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters()) or any(
        isinstance(m, FullyShardedDataParallel) for m in model.modules()
    )


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """Gather a sharded model's parameters into one CPU state dict on rank 0 (others get {});
    None when nothing is sharded. A collective: every rank calls it."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def unsharded_copy(policy: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain CPU model of the policy's class (with its LoRA adapters, if any) holding `state_dict`.

    Built on the meta device and filled by assignment: no second initialisation, no extra copy."""
    from transformers import AutoModelForCausalLM

    base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    with torch.device("meta"):
        copy = AutoModelForCausalLM.from_config(base.config)
        if hasattr(policy, "peft_config"):
            from peft import get_peft_model

            copy = get_peft_model(copy, policy.peft_config[policy.active_adapter])
    copy.load_state_dict(state_dict, assign=True, strict=True)
    return copy


class HFExport(pl.Callback):
    """At the end of `fit`, `save_pretrained` the policy and tokenizer into `dirpath`.

    The folder loads with `AutoModelForCausalLM.from_pretrained(dirpath)`. A sharded policy (FSDP,
    FSDP2) is gathered on rank 0 first. The folder is written beside `dirpath` and renamed into place,
    so an existing export is replaced whole or not at all.

    Args:
        dirpath: output folder; None means `<trainer.log_dir>/hf_model`.
        merge_lora: fold LoRA adapters into the weights (a plain model); else save the adapter only.
    """

    def __init__(self, dirpath: str | None = None, merge_lora: bool = True) -> None:
        self.dirpath = dirpath
        self.merge_lora = merge_lora

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        out = Path(self.dirpath or Path(trainer.log_dir or trainer.default_root_dir) / "hf_model")  # every rank
        policy = pl_module.policy
        state_dict = full_state_dict(policy)  # a collective: every rank takes part
        if not trainer.is_global_zero:
            return
        if state_dict is not None:
            policy, state_dict = unsharded_copy(policy, state_dict), None
        if hasattr(policy, "merge_and_unload") and self.merge_lora:
            policy = policy.merge_and_unload()
        tokenizer = getattr(trainer.datamodule, "tokenizer", None) if trainer.datamodule is not None else None
        with atomic_path(out) as tmp:  # a run killed mid-write leaves the previous export (or none), never half a one
            policy.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        log.info("exported the policy to %s", out)
        self.exported_to = out
