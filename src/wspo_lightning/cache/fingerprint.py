"""What cached frozen values depend on: each frozen model's loading options and files (weights, config,
tokenizer, chat template), the dtype it computes in, the rendering, and every split's record ids and token ids."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from wspo_lightning.errors import InputError
from wspo_lightning.models import ModelSpec

# spec fields that change a frozen model's log-probs (not LoRA or gradient checkpointing: policy-only)
SPEC_FIELDS = ("path", "dtype", "quantization", "attn_implementation", "revision", "gguf_file", "trust_remote_code")
_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json", ".jinja", ".model")
_NAMES = (
    "config.json",
    "adapter_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def model_dir(spec: ModelSpec) -> Path | None:
    """The local folder holding the model's files (a hub id resolves to its local snapshot, if any)."""
    if Path(spec.path).is_dir():
        return Path(spec.path)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec.path, revision=spec.revision, local_files_only=True))
    except Exception:  # not downloaded, or not a hub id: nothing to hash
        return None


def model_fingerprint(spec: ModelSpec, known: dict | None = None) -> dict:
    """The spec fields that matter for a frozen model's outputs, and size/mtime/sha256 of its files:
    weights, config, tokenizer and chat template.

    `known`: a fingerprint recorded earlier; a file whose size and mtime it matches keeps its recorded
    hash (the quick check of make and rsync), so verifying an unchanged multi-GB model costs a stat.
    """
    spec_fields = {name: getattr(spec, name) for name in SPEC_FIELDS}
    folder = model_dir(spec)
    if folder is None:
        return {"spec": spec_fields, "files": None}
    known_files = (known or {}).get("files") or {}
    files = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or not (path.name in _NAMES or path.name.endswith(_SUFFIXES)):
            continue
        if spec.gguf_file and path.suffix == ".gguf" and path.name != spec.gguf_file:
            continue
        stat = path.stat()
        old = known_files.get(path.name)
        same = old is not None and old["size"] == stat.st_size and old["mtime_ns"] == stat.st_mtime_ns
        files[path.name] = {
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "sha256": old["sha256"] if same else sha256_file(path),
        }
    return {"spec": spec_fields, "files": files}


DEFAULT_PRECISION = "32-true"
"""Lightning's `trainer.precision` when none is set."""


def compute_dtype(dtype: str, precision: str | None, module_weights: bool = False) -> str:
    """The dtype a frozen role of ModelSpec `dtype` computes its log-probs in under `trainer.precision`.

    A "-mixed" half precision (bf16-mixed, 16-mixed, or their short names bf16, 16) autocasts every forward pass of
    a step to its dtype, whatever the weights. A "-true" one (bf16-true, 16-true) converts the LightningModule's own
    weights to its dtype, not the frozen roles, which are kept outside it: only a role computed by the module's
    weights (`module_weights`: the reference of a LoRA policy, its base with the adapters off) computes in it; the
    others keep their weights' dtype (their values equal 32-true's). Any other precision (32-true, 64-true, ...)
    leaves the weights' dtype. So a float32 role under bf16-mixed computes in bfloat16, and a bfloat16 role under
    32-true too:

    >>> [compute_dtype(d, p) for d, p in [("float32", "32-true"), ("float32", "bf16-mixed"), ("bfloat16", "32-true")]]
    ['float32', 'bfloat16', 'bfloat16']
    >>> [compute_dtype("float32", "bf16-true"), compute_dtype("float32", "bf16-true", module_weights=True)]
    ['float32', 'bfloat16']
    """
    name = str(precision or DEFAULT_PRECISION)
    half = "bfloat16" if name.startswith("bf16") else "float16" if name.startswith("16") else None
    if half is None or (name.endswith("-true") and not module_weights):
        return dtype
    return half


def runs_on_module_weights(objective: Any, role: str) -> bool:
    """Whether `objective` computes `role` with its LightningModule's own weights: the reference of a LoRA policy
    without a reference model (`wspo fit` and `wspo precompute` alike), which a "-true" precision converts."""
    return role == "reference" and getattr(objective, "reference_spec", None) is None and objective.uses_lora


def split_fingerprint(features: Sequence[dict]) -> str:
    """sha256 over every record's id and token ids, in order (and the weak side's ids and maps, when the weak
    pair has its own tokenizer): changes with the data, tokenizers, templates and max_length."""
    digest = hashlib.sha256()
    for f in features:
        row = [f["id"], f["prompt_ids"], f["chosen_ids"], f["rejected_ids"]]
        if "weak_prompt_ids" in f:
            row += [f["weak_prompt_ids"]] + [f[f"weak_{s}_{k}"] for s in ("chosen", "rejected") for k in ("ids", "map")]
        digest.update(json.dumps(row).encode())
    return digest.hexdigest()


def data_features(datamodule: Any) -> dict[str, list[dict]]:
    """Tokenized records per split ('train', 'val', 'test') of a set-up PreferenceDataModule."""
    features = getattr(datamodule, "features", None)
    if not features:
        raise InputError("a logps cache needs the PreferenceDataModule (trainer.datamodule), set up")
    return {split: list(features.get(split) or []) for split in ("train", "val", "test")}


def describe(
    objective: Any, datamodule: Any, values: Sequence[str], known: dict | None = None, precision: str | None = None
) -> dict:
    """What cached `values` of `objective` (a PreferenceModule) depend on: model fingerprints per role, each with
    the dtype it computes in under `precision` (`trainer.precision`, None: Lightning's default; `compute_dtype`),
    data settings and split fingerprints. `known`: the manifest's model fingerprints (see `model_fingerprint`)."""
    features = data_features(datamodule)
    roles = objective.cache_roles(values)  # role -> spec
    known = known or {}
    splits = {}
    for split, feats in features.items():
        if not feats:
            continue
        sides = ["chosen"] + (["rejected"] if (split != "train" or objective.trains_on_pairs) else [])
        splits[split] = {"records": len(feats), "fingerprint": split_fingerprint(feats), "sides": sides}
    renderer = getattr(datamodule, "renderer", None)
    return {
        "values": sorted(values),
        "models": {
            role: {
                **model_fingerprint(spec, known.get(role)),
                "compute_dtype": compute_dtype(spec.dtype, precision, runs_on_module_weights(objective, role)),
            }
            for role, spec in roles.items()
        },
        "data": {
            "tokenizer": getattr(datamodule, "tokenizer_path", None),
            "max_length": getattr(datamodule, "max_length", None),
            "use_chat_template": getattr(datamodule, "use_chat_template", None),
            "prompt_template": getattr(datamodule, "prompt_template", None),
            "renderer": getattr(renderer, "fingerprint", None),
            "weak_renderer": getattr(getattr(datamodule, "weak_renderer", None), "fingerprint", None),
        },
        "splits": splits,
    }
