"""Model roles: a `ModelSpec` per role (policy, reference, weak_base, weak_aligned) and its loader.

Frozen roles come back in eval mode with gradients off; the policy comes back trainable,
optionally wrapped in LoRA adapters (peft) over a float or bitsandbytes-quantized base.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping

import torch
from torch import nn

from wspo_lightning.errors import InputError

log = logging.getLogger(__name__)

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


def check_model_path(spec: ModelSpec, role: str) -> None:
    """Fail early, before anything loads, when a local model folder is missing or empty."""
    path = Path(spec.path)
    looks_local = path.exists() or spec.path.startswith((".", "/", "~")) or spec.path.count("/") > 1
    if not looks_local:
        return  # a hub id: transformers reports problems with it
    if not path.is_dir():
        raise InputError(f"{role}.path: {spec.path} does not exist. Point it at a model folder "
                         "(for a toy one: wspo tiny --out DIR).")
    wanted = path / spec.gguf_file if spec.gguf_file else path / "config.json"
    if not wanted.exists():
        raise InputError(f"{role}.path: {spec.path} holds no {wanted.name}; expected a folder written by "
                         "save_pretrained (config.json + safetensors weights).")


def _quantization_config(spec: ModelSpec):
    if spec.quantization == "none":
        return None
    missing = [name for name in ("bitsandbytes", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise InputError(f"model {spec.path}: quantization={spec.quantization} needs {' and '.join(missing)}: "
                         f"pip install {' '.join(missing)}")
    from transformers import BitsAndBytesConfig

    if spec.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=spec.torch_dtype,
                              bnb_4bit_use_double_quant=True)


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer

    if spec.trust_remote_code:
        log.warning("trust_remote_code is on for %s: code shipped with the model will run", spec.path)
    tokenizer = AutoTokenizer.from_pretrained(spec.path, revision=spec.revision, gguf_file=spec.gguf_file,
                                              trust_remote_code=spec.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: ModelSpec, trainable: bool = False, device: torch.device | str | None = None) -> nn.Module:
    """Load a causal LM as `spec` says. Frozen (eval, no grad) unless `trainable`.

    Quantized weights are placed on `device` at load time (bitsandbytes layers cannot move later).
    """
    from transformers import AutoModelForCausalLM

    quantization_config = _quantization_config(spec)
    if spec.trust_remote_code:
        log.warning("trust_remote_code is on for %s: code shipped with the model will run", spec.path)
    kwargs = dict(dtype=spec.torch_dtype, revision=spec.revision, trust_remote_code=spec.trust_remote_code,
                  attn_implementation=spec.attn_implementation)
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
    if not trainable:
        return freeze(model)
    model.train()  # from_pretrained returns eval mode
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if spec.lora is not None:
        model = _add_lora(model, spec)
    elif quantization_config is not None:
        raise InputError(f"policy {spec.path}: a quantized policy trains only through LoRA adapters (QLoRA); "
                         "add a `lora:` block or set quantization: none")
    return model


def _add_lora(model: nn.Module, spec: ModelSpec) -> nn.Module:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if spec.quantization != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec.gradient_checkpointing)
    lora = spec.lora
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def check_same_vocabulary(tokenizers: Mapping[str, object]) -> None:
    """Token-level WSPO compares log-probs token by token: every role must share one vocabulary."""
    (first_role, first), *rest = tokenizers.items()
    vocab = first.get_vocab()
    for role, tokenizer in rest:
        other = tokenizer.get_vocab()
        if other == vocab:
            continue
        only_first = sorted(set(vocab.items()) - set(other.items()))[:3]
        raise InputError(
            f"the tokenizers of {first_role} and {role} differ ({len(vocab)} vs {len(other)} tokens; "
            f"e.g. {only_first} of {first_role} is not in {role}). Token-level WSPO needs one vocabulary: "
            "use a weak pair from the strong model's family, or test-time decoding (wspo generate), "
            "which re-tokenises text.")


def disable_dropout(model: nn.Module) -> None:
    """Dropout makes policy and reference disagree on identical weights; preference tuning turns it off."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
