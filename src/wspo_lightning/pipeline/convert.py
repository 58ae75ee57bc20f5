"""Stage `convert`: a GGUF checkpoint -> a plain safetensors folder (done once, then cached).

transformers dequantizes a GGUF file on every load (~25 s for SmolLM2-135M); the converted
folder reloads in about a second and works with every `ModelSpec` option.
"""

from __future__ import annotations

from pathlib import Path

from wspo_lightning.commands import run_function
from wspo_lightning.errors import InputError
from wspo_lightning.io import atomic_path
from wspo_lightning.pipeline.stage import done, say


def convert(gguf: str, out: str, dtype: str = "float32", force: bool = False) -> Path:
    """Dequantize `gguf` and save model + tokenizer (with its chat template) to the folder `out`.

    Args:
        gguf: path of a .gguf file.
        out: output folder (save_pretrained layout).
        dtype: dtype of the saved weights (float32 keeps the dequantized values exactly).
        force: redo even if `out` exists.
    """
    if done("convert", out, force):
        return Path(out)
    path = Path(gguf)
    if not path.is_file():
        raise InputError(f"convert: {gguf} is not a file")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say("convert", f"dequantizing {path.name} (once; about half a minute for a 135M model)")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    quantized = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are plain tensors now
    config._name_or_path = path.stem
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.generation_config = quantized.generation_config
    with atomic_path(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    say("convert", f"wrote {out}")
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    return run_function(convert, argv, "wspo convert")
