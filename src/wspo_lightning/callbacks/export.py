"""Export the trained policy as a Hugging Face folder (config + safetensors + tokenizer + model card), merged
onto a full-precision base when it was trained as LoRA over a quantized one, and pushed to the Hub if asked."""

from __future__ import annotations

import copy
import logging
from dataclasses import replace
from pathlib import Path

import lightning.pytorch as pl
import torch

from wspo_lightning.callbacks.card import CONFIG_NAME, model_card, resolved_config
from wspo_lightning.errors import InputError
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


def adapter_on_float_base(policy: torch.nn.Module, spec, gathered: dict | None = None) -> torch.nn.Module:
    """The trained LoRA adapters of a policy whose base is quantized, on that base reloaded unquantized (the
    spec's dtype): merging then adds B @ A * alpha / r to the exact weights, not to 4-bit or 8-bit rounded ones.
    A sharded policy's adapters come from its `gathered` state dict (its gathered 4-bit shards could not rebuild
    the quantized model: their quantization state is not in it)."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    from wspo_lightning.models import load_model

    adapter = policy.active_adapter
    base = load_model(replace(spec, quantization="none", lora=None, gradient_checkpointing=False), trainable=False)
    float_policy = get_peft_model(base, copy.deepcopy(policy.peft_config[adapter]))
    if gathered is None:
        set_peft_model_state_dict(float_policy, get_peft_model_state_dict(policy, adapter_name=adapter))
    else:
        adapters = {name: tensor for name, tensor in gathered.items() if ".lora_" in name}
        if not adapters or float_policy.load_state_dict(adapters, strict=False).unexpected_keys:
            raise RuntimeError("the gathered LoRA adapters do not fit the float base")
    return float_policy


def push_folder(folder: Path, repo_id: str, private: bool) -> None:
    """Upload an export to a Hub model repository (created if missing)."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="wspo-lightning export")
    log.info("pushed %s to the Hub as %s", folder, repo_id)


class HFExport(pl.Callback):
    """At the end of `fit`, `save_pretrained` the policy and tokenizer into `dirpath`.

    The folder loads with `AutoModelForCausalLM.from_pretrained(dirpath)`. A sharded policy (FSDP,
    FSDP2) is gathered on rank 0 first. The folder is written beside `dirpath` and renamed into place,
    so an existing export is replaced whole or not at all. It holds a model card (README.md: base model,
    weak pair, gamma or its schedule, objective, data, final metrics, the command) and, under LightningCLI,
    the resolved config (`training_config.yaml`).

    Args:
        dirpath: output folder; None means `<trainer.log_dir>/hf_model`.
        merge_lora: fold LoRA adapters into the weights (a plain model); else save the adapter only. A
            quantized (QLoRA) base is reloaded in its float dtype for the merge.
        push_to_hub: also upload the folder to the Hub repository `hub_repo_id` (needs a login).
        hub_repo_id: e.g. "me/qwen2-7b-wspo".
        hub_private: create the repository private.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        merge_lora: bool = True,
        push_to_hub: bool = False,
        hub_repo_id: str | None = None,
        hub_private: bool = True,
    ) -> None:
        if push_to_hub and not hub_repo_id:
            raise InputError("HFExport.push_to_hub needs hub_repo_id (e.g. me/my-model)")
        self.dirpath = dirpath
        self.merge_lora = merge_lora
        self.push_to_hub, self.hub_repo_id, self.hub_private = push_to_hub, hub_repo_id, hub_private

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        out = Path(self.dirpath or Path(trainer.log_dir or trainer.default_root_dir) / "hf_model")  # every rank
        policy = pl_module.policy
        state_dict = full_state_dict(policy)  # a collective: every rank takes part
        if not trainer.is_global_zero:
            return
        spec = getattr(pl_module, "policy_spec", None)
        quantized = spec is not None and spec.quantization != "none"
        on_float_base = False
        if (
            state_dict is not None
        ):  # a sharded QLoRA policy's 4-bit base cannot be rebuilt: its adapters go on the float one
            on_float_base = quantized and hasattr(policy, "merge_and_unload")
            policy = (
                adapter_on_float_base(policy, spec, state_dict) if on_float_base else unsharded_copy(policy, state_dict)
            )
            state_dict = None
        lora_note = None
        if hasattr(policy, "merge_and_unload"):
            lora_note = "adapters only (merge_lora: false)"
            if self.merge_lora:
                if quantized and not on_float_base:
                    policy = adapter_on_float_base(policy, spec)
                policy = policy.merge_and_unload()
                lora_note = f"merged onto the {spec.dtype} base" if quantized else "merged into the weights"
        tokenizer = getattr(trainer.datamodule, "tokenizer", None) if trainer.datamodule is not None else None
        with atomic_path(out) as tmp:  # a run killed mid-write leaves the previous export (or none), never half a one
            policy.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            (tmp / "README.md").write_text(model_card(trainer, pl_module, lora_note), encoding="utf-8")
            config = resolved_config(trainer)
            if config is not None:
                (tmp / CONFIG_NAME).write_text(config, encoding="utf-8")
        log.info("exported the policy to %s", out)
        self.exported_to = out
        if self.push_to_hub:
            push_folder(out, self.hub_repo_id, self.hub_private)
