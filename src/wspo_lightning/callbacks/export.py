"""Export the trained policy as a Hugging Face folder (config + safetensors + tokenizer)."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import torch

log = logging.getLogger(__name__)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """Gather sharded (FSDP2 / DTensor) parameters into one CPU state dict; None when nothing is sharded."""
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class HFExport(pl.Callback):
    """At the end of `fit`, `save_pretrained` the policy and tokenizer into `dirpath`.

    The folder loads with `AutoModelForCausalLM.from_pretrained(dirpath)`.

    Args:
        dirpath: output folder; None means `<trainer.log_dir>/hf_model`.
        merge_lora: fold LoRA adapters into the weights (a plain model); else save the adapter only.
    """

    def __init__(self, dirpath: str | None = None, merge_lora: bool = True) -> None:
        self.dirpath = dirpath
        self.merge_lora = merge_lora

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        out = Path(self.dirpath or Path(trainer.log_dir or trainer.default_root_dir) / "hf_model")
        policy = pl_module.policy
        state_dict = full_state_dict(policy)  # a collective: every rank takes part
        if not trainer.is_global_zero:
            return
        if hasattr(policy, "merge_and_unload") and self.merge_lora:
            policy = policy.merge_and_unload()
        out.mkdir(parents=True, exist_ok=True)
        policy.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
        tokenizer = getattr(trainer.datamodule, "tokenizer", None) if trainer.datamodule is not None else None
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        log.info("exported the policy to %s", out)
        self.exported_to = out
