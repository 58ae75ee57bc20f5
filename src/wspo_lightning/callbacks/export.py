"""Export the trained policy as a Hugging Face folder (config + safetensors + tokenizer + model card), merged
onto a full-precision base when it was trained as LoRA over a quantized one, and pushed to the Hub if asked."""

from __future__ import annotations

import copy
import json
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


def cast_state_dict(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`model`'s state dict with its floating tensors cast to `dtype`, a tensor shared by several names (a tied
    embedding and lm_head) cast once and shared still, so `save_pretrained` writes it once as it does uncast."""
    cast: dict[tuple, torch.Tensor] = {}
    out = {}
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point():
            out[name] = tensor
            continue
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.stride())
        if key not in cast:
            cast[key] = tensor.to(dtype)
        out[name] = cast[key]
    return out


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
    """Upload an export to a Hub model repository (created if missing); a failure is one line saying how to
    retry (the folder stays as it is)."""
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="wspo-lightning export")
    except Exception as err:  # noqa: BLE001 - network, auth and Hub errors alike: the export is safe on disk
        reason = " ".join(str(err).split())[:300] or type(err).__name__
        raise InputError(
            f"pushing {folder} to the Hub as {repo_id} failed ({reason}). The export is complete on disk; retry "
            f"with: wspo push {folder} --hub_repo_id {repo_id}"
        ) from None
    log.info("pushed %s to the Hub as %s", folder, repo_id)


def check_can_push(repo_id: str) -> None:
    """Before training: a push at the end needs a login (a token) and a reachable Hub; else one line now."""
    from huggingface_hub import get_token

    from wspo_lightning.models import hub_unreachable

    if get_token() is None:
        raise InputError(
            f"HFExport.push_to_hub: no Hugging Face login to push {repo_id} with: run `hf auth login` (or set "
            "HF_TOKEN), or set push_to_hub: false and push the export later with `wspo push DIR --hub_repo_id ID`"
        )
    reason = hub_unreachable()
    if reason is not None:
        raise InputError(
            f"HFExport.push_to_hub: the Hub cannot be reached ({reason}). Set push_to_hub: false and push the "
            f"export later with `wspo push DIR --hub_repo_id {repo_id}`"
        )


def push(dir: str, hub_repo_id: str, hub_private: bool = True) -> None:
    """Upload an export folder (HFExport's, or any `save_pretrained` folder) to a Hub model repository: the push
    HFExport does at the end of fit, or its retry.

    Args:
        dir: the folder to upload.
        hub_repo_id: e.g. me/qwen2-7b-wspo (created if missing).
        hub_private: create the repository private.
    """
    folder = Path(dir)
    if not (folder / "config.json").is_file():
        raise InputError(f"push: {folder} holds no config.json; give an export folder (HFExport's dirpath)")
    check_can_push(hub_repo_id)
    push_folder(folder, hub_repo_id, hub_private)


def main(argv: list[str] | None = None) -> int:
    """`wspo push DIR --hub_repo_id ID [--hub_private false]`."""
    from wspo_lightning.commands import run_function

    argv = list(argv or [])
    if argv and not argv[0].startswith("-"):  # the folder, given first without its flag
        argv = ["--dir", argv[0], *argv[1:]]
    return run_function(push, argv, "wspo push")


EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_dtype(dtype: str | None, precision: str, model: torch.nn.Module) -> torch.dtype:
    """The dtype an export is written in: `dtype` when given; else the training precision's (bf16 runs in
    bfloat16, fp16 runs in float16), else the dtype the policy's weights have."""
    if dtype is not None:
        return EXPORT_DTYPES[dtype]
    if "bf16" in precision:
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


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
        dtype: the weights' dtype in the export (float32 | bfloat16 | float16); null: the training precision's
            (bfloat16 for bf16 runs, whose float32 master weights would double the size), else the policy's.
        base_model: the model card's `base_model` (a Hub id); null: the policy's path when it is a Hub id.
        push_to_hub: also upload the folder to the Hub repository `hub_repo_id`: the login and the Hub are
            checked before training; a failed upload says how to retry (`wspo push DIR --hub_repo_id ID`).
        hub_repo_id: e.g. "me/qwen2-7b-wspo".
        hub_private: create the repository private.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        merge_lora: bool = True,
        dtype: str | None = None,
        base_model: str | None = None,
        push_to_hub: bool = False,
        hub_repo_id: str | None = None,
        hub_private: bool = True,
    ) -> None:
        if push_to_hub and not hub_repo_id:
            raise InputError("HFExport.push_to_hub needs hub_repo_id (e.g. me/my-model)")
        if dtype is not None and dtype not in EXPORT_DTYPES:
            raise InputError(f"HFExport.dtype must be one of {', '.join(EXPORT_DTYPES)} or null, got {dtype!r}")
        self.dirpath = dirpath
        self.merge_lora, self.dtype, self.base_model = merge_lora, dtype, base_model
        self.push_to_hub, self.hub_repo_id, self.hub_private = push_to_hub, hub_repo_id, hub_private

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.push_to_hub and trainer.is_global_zero:
            check_can_push(self.hub_repo_id)

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
        dtype = None if hasattr(policy, "peft_config") else export_dtype(self.dtype, str(trainer.precision), policy)
        if dtype is not None and state_dict is None:  # a cast copy of the tensors: the trained module stays as it is
            state_dict = cast_state_dict(policy, dtype)
        card = model_card(trainer, pl_module, lora_note, base_model=self.base_model, dtype=dtype)
        with atomic_path(out) as tmp:  # a run killed mid-write leaves the previous export (or none), never half a one
            policy.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            if dtype is not None:  # save_pretrained writes the module's dtype: name the one the weights are in
                config = json.loads((tmp / "config.json").read_text())
                (tmp / "config.json").write_text(
                    json.dumps({**config, "dtype": str(dtype).removeprefix("torch.")}, indent=2) + "\n"
                )
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            (tmp / "README.md").write_text(card, encoding="utf-8")
            config = resolved_config(trainer)
            if config is not None:
                (tmp / CONFIG_NAME).write_text(config, encoding="utf-8")
        log.info("exported the policy to %s", out)
        self.exported_to = out
        if self.push_to_hub:
            push_folder(out, self.hub_repo_id, self.hub_private)
