"""A memory-lean FSDP2 start: each rank builds a model on the meta device, shards it, and reads only its own
rows of every weight from the safetensors files.

Loading the whole model on every rank and sharding it afterwards costs each rank the full model in host memory
(twice, when the reference is a copy of the policy). Here each rank holds its shard and, while one weight is
read, that weight's rows: host memory grows by about 1/world of each model.

    model = load_sharded(spec, lambda m: shard_policy(m, mesh), device, trainable=True)

FSDP2 splits each weight along its first dimension in `torch.chunk` fashion (rank r owns rows
[r * ceil(n / world), ...)), so a rank's rows are one contiguous byte range of the file, which safetensors' slices
read without touching the rest. A file is opened per weight and closed after it, so its mapped pages never add up
to more than the weight being read.

A model this cannot load returns None with the reason logged (the caller loads it whole): quantized weights
(bitsandbytes quantizes while loading), GGUF files, LoRA adapters, a Hub id not in the local cache, or a
checkpoint whose weight names are not the model's (transformers renames some older layouts while loading).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from wspo_lightning.models import ModelSpec, local_folder, prepare_loaded

log = logging.getLogger(__name__)


def load_sharded(
    spec: ModelSpec,
    shard: Callable[[nn.Module], nn.Module],
    device: torch.device | str,
    trainable: bool = False,
    before_shard: Callable[[nn.Module], None] | None = None,
) -> nn.Module | None:
    """The model of `spec`, sharded by `shard` (which calls `fully_shard`), its weights read rank by rank onto
    `device`; frozen unless `trainable` (as `models.load_model` returns it). `before_shard` runs on the model while
    it is still on the meta device (dropout, frozen embeddings). None when `spec` cannot load this way."""
    found = checkpoint_index(spec)
    if isinstance(found, str):
        log.info("%s loads whole on every rank, then is sharded: %s", spec.path, found)
        return None
    folder, files = found
    model = _meta_model(spec, folder)
    sources = _sources(model, files)
    if isinstance(sources, str):
        log.info("%s loads whole on every rank, then is sharded: %s", spec.path, sources)
        return None
    model = prepare_loaded(model, spec, trainable)
    if before_shard is not None:
        before_shard(model)
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers() if buffer.device.type != "meta"}
    model = shard(model)
    model.to_empty(device=device)
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    tied = getattr(model.config, "tie_word_embeddings", False)
    if tied and head is not None and head.weight is not embeddings.weight:
        model.tie_weights()  # to_empty of a module FSDP does not manage gives each name its own tensor
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name in buffers:  # computed at construction (rotary frequencies): not in the files
                buffer.copy_(buffers[name])
        for name, (key, file) in sources.items():  # fully_shard swapped each weight for a DTensor of its name
            _read_rows(_tensor(model, name), file, key)
    log.info("%s: loaded only this rank's shard of each weight from %d file(s)", spec.path, len(set(files.values())))
    return model


def checkpoint_index(spec: ModelSpec) -> tuple[Path, dict[str, Path]] | str:
    """(folder, weight name -> safetensors file) of `spec`, or why it cannot be read shard by shard."""
    if spec.quantization != "none":
        return "bitsandbytes quantizes weights while loading"
    if spec.gguf_file:
        return "GGUF weights are dequantized while loading"
    if spec.lora is not None:
        return "LoRA adapters are added while loading"
    folder = local_folder(spec.path)
    if folder is None:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            folder = Path(snapshot_download(spec.path, revision=spec.revision, local_files_only=True))
        except (LocalEntryNotFoundError, OSError, ValueError):
            return "not in the local Hugging Face cache"
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return folder, {key: folder / name for key, name in weight_map.items()}
    from safetensors import safe_open

    files = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as handle:
            files.update(dict.fromkeys(handle.keys(), path))
    return (folder, files) if files else "no safetensors weights"


def _meta_model(spec: ModelSpec, folder: Path) -> nn.Module:
    """The model of `spec` with its parameters on the meta device; buffers computed at construction (rotary
    frequencies) are real, so they can be restored after `to_empty`."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(folder, trust_remote_code=spec.trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(
            config,
            dtype=spec.torch_dtype,
            attn_implementation=spec.attn_implementation,
            trust_remote_code=spec.trust_remote_code,
        )
    model.tie_weights()  # from_config leaves meta weights untied (from_pretrained ties them after loading)
    model.config.name_or_path = spec.path  # as from_pretrained sets it (export's base_model)
    if (folder / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model


def _sources(model: nn.Module, files: dict[str, Path]) -> dict[str, tuple[str, Path]] | str:
    """Each parameter (and persistent buffer) of `model` by its first name -> (its name in the files, the file), a
    tied weight once, under whichever of its names the files hold; or what is missing or misshapen."""
    from safetensors import safe_open

    aliases: dict[int, list[str]] = {}
    shapes: dict[str, list[int]] = {}
    persistent = set(model.state_dict())
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]:
        if name in persistent:
            aliases.setdefault(id(tensor), []).append(name)
            shapes[name] = list(tensor.shape)
    meta = {name for name, tensor in model.state_dict(keep_vars=True).items() if tensor.device.type == "meta"}
    sources: dict[str, tuple[str, Path]] = {}
    for names in aliases.values():
        stored = next((name for name in names if name in files), None)
        if stored is not None:
            sources[names[0]] = (stored, files[stored])
        elif names[0] in meta:  # a buffer with a value from construction is kept; a weight must be there
            return f"the checkpoint holds no weight named {names[0]}"
    for path in {file for _, file in sources.values()}:
        with safe_open(path, "pt") as handle:
            for name, (stored, file) in sources.items():
                shape = list(handle.get_slice(stored).get_shape()) if file == path else shapes[name]
                if shape != shapes[name]:
                    return f"{stored} is {shape} in the checkpoint, {shapes[name]} in the model"
    return sources


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    module, _, leaf = name.rpartition(".")
    owner = model.get_submodule(module)
    return owner._parameters[leaf] if leaf in owner._parameters else owner._buffers[leaf]


def _read_rows(tensor: torch.Tensor, file: Path, key: str) -> None:
    """Copy this rank's rows of weight `key` of `file` into `tensor` (a DTensor sharded on dim 0 by FSDP2, or a
    plain tensor, read whole)."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor, Shard

    local, rows = tensor, None
    if isinstance(tensor, DTensor):
        local = tensor.to_local()
        placements = [p for p in tensor.placements if isinstance(p, Shard)]
        if placements:
            if len(tensor.placements) != 1 or placements[0].dim != 0:
                raise RuntimeError(f"{key}: expected FSDP2's dim-0 sharding, got {tensor.placements}")
            n, world = tensor.shape[0], tensor.device_mesh.size()
            start = min(tensor.device_mesh.get_local_rank() * -(-n // world), n)
            rows = slice(start, start + local.shape[0])
    if local.numel() == 0:
        return
    with safe_open(file, "pt") as handle:  # opened per weight: its mapped pages go when it closes
        value = handle.get_slice(key)[rows] if rows is not None else handle.get_tensor(key)
    local.copy_(value)
