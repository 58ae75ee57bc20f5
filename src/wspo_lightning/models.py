"""Model roles: a `ModelSpec` per role (policy, reference, weak_base, weak_aligned) and its loader.

Frozen roles come back in eval mode with gradients off; the policy comes back trainable,
optionally wrapped in LoRA adapters (peft) over a float or bitsandbytes-quantized base.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from torch import nn

from wspo_lightning.errors import InputError

log = logging.getLogger(__name__)
_warn = rank_zero_only(log.warning)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoraSpec:
    """LoRA adapters for the policy (peft). The reference is then the base with adapters disabled."""

    r: int = 16
    """Adapter rank."""
    alpha: int = 32
    """Scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] | str = "all-linear"
    """Module names to adapt, or peft's shorthand "all-linear"."""

    def __post_init__(self) -> None:
        if self.r < 1:
            raise InputError(f"lora.r must be >= 1, got {self.r}")


@dataclass
class ModelSpec:
    """Where a model comes from and how to load it."""

    path: str
    """Local folder with config.json (or a Hugging Face id where a hub is reachable)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weight dtype (and compute dtype of quantized layers)."""
    quantization: Literal["none", "8bit", "4bit"] = "none"
    """bitsandbytes quantization; needs bitsandbytes and accelerate."""
    attn_implementation: str | None = None
    """"sdpa", "eager", "flash_attention_2"; None lets transformers choose."""
    trust_remote_code: bool = False
    """Run Python code shipped with the model folder. Off unless you trust the source."""
    revision: str | None = None
    """Hub revision (branch, tag or commit)."""
    gguf_file: str | None = None
    """Load from this GGUF file inside `path` (dequantized on load; slow, convert once)."""
    lora: LoraSpec | None = None
    """LoRA adapters (policy only)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory (policy only)."""

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = LoraSpec(**self.lora)
        if self.dtype not in DTYPES:
            raise InputError(f"model {self.path}: dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.quantization not in ("none", "8bit", "4bit"):
            raise InputError(f"model {self.path}: quantization must be none, 8bit or 4bit, got {self.quantization!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def as_spec(spec: ModelSpec | dict | None) -> ModelSpec | None:
    """Accept a ModelSpec or its dict form (as configs and checkpoints' hparams hold it)."""
    return ModelSpec(**spec) if isinstance(spec, dict) else spec


def local_folder(path: str) -> Path | None:
    """`path` as a local folder when it looks like one (it exists, starts with . / ~ or has 2+ slashes); else None
    (a hub id)."""
    folder = Path(path).expanduser()
    looks_local = folder.exists() or path.startswith((".", "/", "~")) or path.count("/") > 1
    return folder if looks_local else None


def hub_unreachable() -> str | None:
    """Why the Hugging Face Hub cannot be reached from here (offline mode, or no connection to its endpoint
    within 5 s), or None. Behind a proxy nothing is tried: the proxy decides."""
    import os
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE") == "1":
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=5).close()
    except OSError as err:
        return f"{endpoint.hostname} cannot be reached: {err.strerror or err}"
    return None


def check_hub_model(spec: ModelSpec, role: str, filename: str = "config.json") -> None:
    """A Hub id loads from the local cache, or from a Hub that answers: else one line with the command that
    downloads it, at once (offline, transformers would retry for about a minute before its own error)."""
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(spec.path, spec.gguf_file or filename, revision=spec.revision), str):
        return
    reason = hub_unreachable()
    if reason is not None:
        raise InputError(
            f"{role}.path: {spec.path} is not a local folder, so it was read as a Hugging Face Hub id; it is not "
            f"in the local cache and {reason}. Download it where the Hub is reachable: `hf download {spec.path} "
            "--local-dir DIR`, then set the path to DIR."
        )


def check_model_path(spec: ModelSpec, role: str) -> None:
    """Fail early, before anything loads: a local model folder that is missing, holds no config.json
    (or no `gguf_file`), or holds weights only as pickles; quantization without its packages."""
    _check_quantization_packages(spec, role)
    path = local_folder(spec.path)
    if path is None:
        check_hub_model(spec, role)
        return
    if not path.is_dir():
        raise InputError(
            f"{role}.path: {spec.path} does not exist. Point it at a model folder (for a toy one: wspo tiny --out DIR)."
        )
    if spec.gguf_file:
        if not (path / spec.gguf_file).exists():
            raise InputError(
                f"{role}.path: {spec.path} holds no {spec.gguf_file} (gguf_file). Fix gguf_file or the path."
            )
        return
    if not (path / "config.json").exists():
        raise InputError(
            f"{role}.path: {spec.path} holds no config.json; expected a folder written by "
            "save_pretrained (config.json + safetensors weights)."
        )
    if not any(path.glob("*.safetensors")) and any(path.glob("*.bin")):
        raise InputError(
            f"{role}.path: {spec.path} holds pickle weights (*.bin) but no *.safetensors; wspo never "
            "unpickles weights. If you trust the file, convert it once: AutoModelForCausalLM."
            "from_pretrained(DIR, use_safetensors=False).save_pretrained(NEW_DIR)."
        )


def _check_quantization_packages(spec: ModelSpec, role: str | None = None) -> None:
    if spec.quantization == "none":
        return
    missing = [name for name in ("bitsandbytes", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        where = f"{role}.quantization" if role else f"model {spec.path}: quantization"
        raise InputError(
            f"{where}={spec.quantization} needs {' and '.join(missing)}: "
            f"pip install {' '.join(missing)} (or set quantization: none)"
        )


def _quantization_config(spec: ModelSpec):
    if spec.quantization == "none":
        return None
    _check_quantization_packages(spec)
    from transformers import BitsAndBytesConfig

    if spec.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=spec.torch_dtype,
        bnb_4bit_use_double_quant=True,
        # packed 4-bit weights viewed as the model's float dtype, so FSDP can shard them with the other weights
        bnb_4bit_quant_storage=spec.torch_dtype,
    )


def load_tokenizer(source: ModelSpec | str, trust_remote_code: bool = False, role: str = "tokenizer"):
    """The one tokenizer loader (data and models): AutoTokenizer from a ModelSpec, a local folder or a hub id.

    A missing local folder or an unreadable tokenizer raises InputError. A tokenizer without a pad
    token pads with eos (said once per path: labels mask padding, so eos is still learned).
    `trust_remote_code` comes from the spec when `source` is one; when on, it is logged.
    """
    from transformers import AutoTokenizer

    spec = source if isinstance(source, ModelSpec) else ModelSpec(path=str(source), trust_remote_code=trust_remote_code)
    folder = local_folder(spec.path)
    if folder is not None and not folder.is_dir():
        raise InputError(
            f"{role}: {spec.path} does not exist. Point it at a folder holding tokenizer files "
            "(tokenizer.json, tokenizer_config.json), such as a model folder (under wspo fit: "
            "model.policy.path)."
        )
    if folder is None:
        check_hub_model(spec, role, "tokenizer_config.json")
    _note_remote_code(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            spec.path, revision=spec.revision, gguf_file=spec.gguf_file, trust_remote_code=spec.trust_remote_code
        )
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(
            f"{role}: cannot load a tokenizer from {spec.path} ({first_line}). Give a folder holding "
            "tokenizer files (tokenizer.json, tokenizer_config.json) or a hub id."
        ) from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
        _once(
            f"pad:{spec.path}",
            "tokenizer %s has no pad token: padding with eos %r (labels mask padding, so eos is still learned)",
            spec.path,
            tokenizer.eos_token,
        )
    return tokenizer


_said: set[str] = set()


def _once(key: str, message: str, *args: object) -> None:
    """A warning said once per process for `key` (one per path, not one per role or per stage)."""
    if key not in _said:
        _said.add(key)
        _warn(message, *args)


def _note_remote_code(spec: ModelSpec) -> None:
    if spec.trust_remote_code:
        _once(f"remote:{spec.path}", "trust_remote_code is on for %s: Python code shipped with it will run", spec.path)


def load_model(spec: ModelSpec, trainable: bool = False, device: torch.device | str | None = None) -> nn.Module:
    """Load a causal LM as `spec` says. Frozen (eval, no grad) unless `trainable`.

    Quantized weights are placed on `device` at load time (bitsandbytes layers cannot move later).
    """
    from transformers import AutoModelForCausalLM

    quantization_config = _quantization_config(spec)
    _note_remote_code(spec)
    kwargs = dict(
        dtype=spec.torch_dtype,
        revision=spec.revision,
        trust_remote_code=spec.trust_remote_code,
        attn_implementation=spec.attn_implementation,
    )
    if spec.gguf_file:
        kwargs["gguf_file"] = spec.gguf_file
    else:
        kwargs["use_safetensors"] = True  # never unpickle weights
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        kwargs["device_map"] = {"": torch.device(device or "cpu")}
    model = AutoModelForCausalLM.from_pretrained(spec.path, **kwargs)
    if device is not None and quantization_config is None:
        model.to(device)
    return prepare_loaded(model, spec, trainable)


def prepare_loaded(model: nn.Module, spec: ModelSpec, trainable: bool) -> nn.Module:
    """A freshly built model of `spec` as a role uses it: frozen, or trainable with activation checkpointing and
    LoRA adapters as `spec` says (`load_model`, and `shard_load` on the meta device)."""
    contiguous_lm_head_input(model)
    if not trainable:
        return freeze(model)
    model.train()  # from_pretrained returns eval mode
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if spec.lora is not None:
        model = _add_lora(model, spec)
    elif spec.quantization != "none":
        raise InputError(
            f"policy {spec.path}: a quantized policy trains only through LoRA adapters (QLoRA); "
            "add a `lora:` block or set quantization: none"
        )
    return model


def _contiguous(module: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(), *args[1:])


def contiguous_lm_head_input(model: nn.Module) -> nn.Module:
    """Hand the lm_head a contiguous input. With `logits_to_keep`, transformers feeds it a slice of the
    hidden states ([:, -k:, :], strided), and on CPU a bfloat16 matmul with a strided input takes a slow
    path: 8x slower for 45 kept positions, 100x for 1 (every generation step). The copy costs a few
    hidden-state rows. benchmarks/lm_head_slice.py measures it."""
    head = model.get_output_embeddings()
    if head is not None and _contiguous not in head._forward_pre_hooks.values():
        head.register_forward_pre_hook(_contiguous)
    return model


def _add_lora(model: nn.Module, spec: ModelSpec) -> nn.Module:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if spec.quantization != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec.gradient_checkpointing)
    lora = spec.lora
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def check_same_vocabulary(tokenizers: Mapping[str, object], advice: str | None = None) -> None:
    """Token-level WSPO compares log-probs token by token: every role must share one vocabulary.
    `advice`: what the error suggests instead of the default."""
    (first_role, first), *rest = tokenizers.items()
    vocab = first.get_vocab()
    for role, tokenizer in rest:
        other = tokenizer.get_vocab()
        if other == vocab:
            continue
        only_first = sorted(set(vocab.items()) - set(other.items()))[:3]
        raise InputError(
            f"the tokenizers of {first_role} and {role} differ ({len(vocab)} vs {len(other)} tokens; "
            f"e.g. {only_first} of {first_role} is not in {role}). "
            + (
                advice
                or "Log-probs compared token by token need one vocabulary: the reference is the policy's starting "
                "model (or null: a frozen copy of the policy). A weak pair may have another tokenizer than the "
                "policy: training maps its log-ratios by characters (model.init_args.weak_tokenization: auto, "
                "docs/cross-tokenizer.md), CBS and best-of-N score text; proxy decoding needs one vocabulary."
            )
        )


def disable_dropout(model: nn.Module) -> None:
    """Dropout makes policy and reference disagree on identical weights; preference tuning turns it off."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
