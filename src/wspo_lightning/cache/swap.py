"""The cache of a WSPO run with its weak pair swapped, made from the cache of the run without the swap.

Swapping `weak_base` and `weak_aligned` (WSPO's sign control) changes only the sign of the weak pair's values:
`delta_weak = l_weak_aligned - l_weak_base` becomes `l_weak_base - l_weak_aligned`, which IEEE arithmetic
gives exactly as the negation; the reference's values do not involve the pair. So the swapped cache is
written without a forward pass, and equals what `wspo precompute` of the swapped config writes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from wspo_lightning.cache.store import MANIFEST, read_manifest
from wspo_lightning.errors import InputError
from wspo_lightning.io import atomic_path

PAIR = ("weak_base", "weak_aligned")


def swap_weak_pair(source: str | Path, out: str | Path, command: str | None = None) -> Path:
    """Write to `out` the cache of `source`'s run with the weak pair swapped (see the module docstring).

    `command`: how to rebuild `out` from scratch (`wspo precompute` of the swapped config), kept in its
    manifest for the message that refuses a stale cache. `out` is written whole or not at all."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    source = Path(source)
    manifest = read_manifest(source)
    models = manifest["models"]
    if "delta_weak" not in manifest["values"] or not all(role in models for role in PAIR):
        raise InputError(
            f"logps cache {source} holds {manifest['values']} of {sorted(models)}: no weak pair to swap "
            "(a cache of a WSPO config has delta_weak)."
        )
    swapped = {
        **manifest,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command or manifest.get("command"),
        "models": {**models, "weak_base": models["weak_aligned"], "weak_aligned": models["weak_base"]},
        "derived": f"{source}, weak pair swapped (delta_weak negated)",
    }
    with atomic_path(out) as tmp:
        tmp.mkdir()
        for split in manifest["splits"].values():
            for name in split["shards"]:
                with safe_open(str(source / name), framework="pt") as shard:
                    tensors = {
                        k: -shard.get_tensor(k) if k.endswith(".delta_weak") else shard.get_tensor(k)
                        for k in shard.keys()
                    }
                    metadata = shard.metadata()
                save_file(tensors, str(tmp / name), metadata=metadata)
        config = source / "config.yaml"
        if config.exists():  # the resolved config, informational: state the swapped pair in it too
            resolved = yaml.safe_load(config.read_text())
            args = (resolved.get("model") or {}).get("init_args") or {}
            if all(role in args for role in PAIR):
                args["weak_base"], args["weak_aligned"] = args["weak_aligned"], args["weak_base"]
            (tmp / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        (tmp / MANIFEST).write_text(json.dumps(swapped, indent=1))  # last: no manifest, no cache
    return Path(out)
