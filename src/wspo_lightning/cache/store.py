"""The frozen-values store of `wspo precompute`: a folder of safetensors shards and a manifest.

Cache layout (a folder, `model.cache_dir`):

    manifest.json                        what was computed, from what (written last: no manifest, no cache)
    config.yaml                          the resolved config of the `wspo precompute` run
    train-00000-of-00002.safetensors     one shard per rank and split
    val-00000-of-00002.safetensors

A shard holds, for the records its rank saw: `index` [n] (the record's position in its split), and per
side (`chosen`, `rejected`) `{side}.length` [n] (its response tokens; -1: computed on another rank, or
no such response) and the float32 values of the response tokens, in order, concatenated over the
records: `{side}.delta_weak` (l_weak_aligned - l_weak_base; WSPO) and `{side}.reference` (l_reference;
unless the reference is not cached). Values are stored per record and response token, independent of
batch composition, padding and world size; `LogpsCache.lookup` re-pads them into any batch's [B, T'] layout.
The training split holds the rejected side only when training uses it (`train_on_rejected`, DPO).

The manifest pins what the values depend on (`cache.fingerprint.describe`), the dtype each role computed
them in included (`models.<role>.compute_dtype`: its ModelSpec dtype under the run's `trainer.precision`,
`cache.fingerprint.compute_dtype`). `fit` refuses a cache that no longer matches, naming what changed and the
command that rebuilds it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from wspo_lightning.cache.fingerprint import DEFAULT_PRECISION, compute_dtype, describe, runs_on_module_weights
from wspo_lightning.errors import InputError

log = logging.getLogger(__name__)

FORMAT, VERSION = "wspo-logps-cache", 2
"""Version 2: the manifest pins the renderer and the tokenizer files (version 1 caches are refused)."""
MANIFEST = "manifest.json"
REBUILD = "wspo precompute --config <your fit config>"


class LogpsCache:
    """A verified cache, loaded into CPU memory: `lookup` gives the cached values of a batch."""

    def __init__(self, folder: Path, manifest: dict) -> None:
        self.folder, self.manifest = folder, manifest
        self.values: list[str] = list(manifest["values"])
        self._splits: dict[str, dict] = {}

    # -- opening and verification
    @classmethod
    def open(cls, folder: str | Path, module: Any, datamodule: Any, precision: str | None = None) -> LogpsCache:
        """Read the manifest, refuse it when anything it depends on changed, then load the shards.
        `precision`: the run's `trainer.precision` (default: see `verify`)."""
        folder = Path(folder)
        manifest = read_manifest(folder)
        cache = cls(folder, manifest)
        cache.verify(module, datamodule, precision)
        for split in manifest["splits"]:
            cache._load_split(split)
        return cache

    def verify(self, module: Any, datamodule: Any, precision: str | None = None) -> None:
        """Refuse the cache (InputError) unless it holds what `module` needs, computed from the same models at the
        same precision on the same data. `precision`: the run's `trainer.precision` (default: that of the trainer
        `module` is attached to, else Lightning's default)."""
        m = self.manifest
        rebuild = f"Rebuild it: {m.get('command') or REBUILD}"
        where = f"logps cache {self.folder}"
        missing = [v for v in module.required_cache_values() if v not in m["values"]]
        if missing:
            raise InputError(f"{where} holds {m['values']}, but {type(module).__name__} needs {missing}. {rebuild}")
        trainer = getattr(module, "_trainer", None)
        precision = precision or (str(trainer.precision) if trainer is not None else DEFAULT_PRECISION)
        now = describe(module, datamodule, m["values"], known=m["models"], precision=precision)
        _compare_precision(where, m, now["models"], precision, rebuild, module)
        for role, current in now["models"].items():  # roles behind values this objective uses
            _compare_model(where, role, m["models"][role], current, rebuild)
        for split, current in now["splits"].items():
            cached = m["splits"].get(split)
            if cached is None:
                raise InputError(
                    f"{where} holds no {split!r} split, but the data has {current['records']} "
                    f"{split} records. {rebuild}"
                )
            if cached["fingerprint"] != current["fingerprint"]:
                counts = (
                    f"{cached['records']} records then, {current['records']} now"
                    if cached["records"] != current["records"]
                    else f"the same {current['records']} records, but other ids or tokens"
                )
                settings = [
                    f"data.{key}: {m['data'].get(key)!r} then, {value!r} now"
                    for key, value in now["data"].items()
                    if m["data"].get(key) != value
                ]
                why = "; ".join(settings) or "the data file or the tokenizer changed"
                raise InputError(
                    f"{where}: the {split} data changed since the cache was made ({counts}; {why}). {rebuild}"
                )
            lacking = [s for s in current["sides"] if s not in cached["sides"]]
            if lacking:
                raise InputError(
                    f"{where} holds only the {cached['sides']} responses of {split}, this run needs "
                    f"{current['sides']} (train_on_rejected?). {rebuild}"
                )

    def _load_split(self, split: str) -> None:
        """Merge the shards of `split`: per side, each record's length and offset into one values tensor.

        A record's chosen and rejected responses may come from different ranks' shards; a shard marks
        the sides it did not compute with length -1."""
        from safetensors.torch import load_file

        info = self.manifest["splits"][split]
        n = info["records"]
        lengths = {side: torch.full((n,), -1, dtype=torch.long) for side in info["sides"]}  # -1: none
        offsets = {side: torch.zeros(n, dtype=torch.long) for side in info["sides"]}
        values: dict[str, dict[str, list[Tensor]]] = {s: {v: [] for v in self.values} for s in info["sides"]}
        base = dict.fromkeys(info["sides"], 0)
        for name in info["shards"]:
            path = self.folder / name
            if not path.exists():
                raise InputError(
                    f"logps cache {self.folder}: shard {name} is missing. Rebuild the cache: "
                    f"{self.manifest.get('command') or REBUILD}"
                )
            shard = load_file(str(path))
            for side in info["sides"]:
                length = shard[f"{side}.length"]  # [records in the shard]
                here = length >= 0
                sizes = length.clamp(min=0)
                starts = torch.cumsum(sizes, 0) - sizes + base[side]
                lengths[side][shard["index"][here]] = length[here]
                offsets[side][shard["index"][here]] = starts[here]
                base[side] += int(sizes.sum())
                for v in self.values:
                    values[side][v].append(shard[f"{side}.{v}"])
        missing = int((lengths["chosen"] < 0).sum())
        if missing:
            raise InputError(
                f"logps cache {self.folder}: {missing} {split} records have no cached values. "
                f"Rebuild the cache: {self.manifest.get('command') or REBUILD}"
            )
        merged = {side: {v: torch.cat(parts) for v, parts in d.items()} for side, d in values.items()}
        self._splits[split] = {"lengths": lengths, "offsets": offsets, "values": merged}

    # -- use
    def has(self, split: str) -> bool:
        return split in self._splits

    def lookup(self, split: str, index: Tensor, sides: Sequence[str], mask: Tensor) -> dict[str, Tensor]:
        """Cached values of rows `index` [B] for `sides` (rows side after side, as the module concatenates
        them), re-padded into the [len(sides) * B, T'] layout of `mask` (True on response tokens)."""
        if split not in self._splits:
            raise InputError(f"logps cache {self.folder} holds no {split!r} split")
        data = self._splits[split]
        rows = index.detach().cpu().tolist()
        pieces: dict[str, list[Tensor]] = {v: [] for v in self.values}
        lengths = []
        for side in sides:
            length, offset = data["lengths"][side], data["offsets"][side]
            for row in rows:
                n, start = int(length[row]), int(offset[row])
                if n < 0:
                    raise InputError(f"logps cache {self.folder}: {split} record {row} has no cached {side} response")
                lengths.append(n)
                for v in self.values:
                    pieces[v].append(data["values"][side][v][start : start + n])
        expected = torch.tensor(lengths, device=mask.device)
        if not torch.equal(mask.sum(dim=1), expected):
            raise InputError(
                f"logps cache {self.folder}: a {split} batch's response lengths "
                f"{mask.sum(dim=1).tolist()} differ from the cached {lengths}. Rebuild the cache."
            )
        out = {}
        for v, parts in pieces.items():
            padded = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)  # [rows, T']
            padded[mask] = torch.cat(parts).to(mask.device)
            out[v] = padded
        return out


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.exists():
        raise InputError(
            f"model.cache_dir={folder}: no logps cache there ({MANIFEST} missing). Build it with: {REBUILD}"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not a readable manifest ({err}). Rebuild the cache with wspo precompute.") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise InputError(
            f"{path}: format {manifest.get('format')!r} v{manifest.get('version')}, expected "
            f"{FORMAT!r} v{VERSION} (this version also pins the renderer and tokenizer files). "
            f"Rebuild it: {manifest.get('command') or REBUILD}"
        )
    return manifest


def cached_compute_dtype(manifest: dict, role: str, module: Any) -> str:
    """The dtype `role` computed the cached values in. A manifest that does not record it (written before
    `compute_dtype` was) gets it by the same rule from what it does record: the role's ModelSpec dtype and the
    run's `precision` (Lightning's default where even that is missing), with the role computed as `module` (the
    objective verifying the cache) computes it (`cache.fingerprint.compute_dtype`)."""
    model = manifest["models"][role]
    if "compute_dtype" in model:
        return model["compute_dtype"]
    own = runs_on_module_weights(module, role)
    return compute_dtype(model["spec"].get("dtype") or "float32", manifest.get("precision"), own)


def _compare_precision(where: str, manifest: dict, now: dict, precision: str, rebuild: str, module: Any) -> None:
    """Same precision: every role behind the cached values computes in the dtype it computed them in."""
    then = {role: cached_compute_dtype(manifest, role, module) for role in now}
    changed = [role for role, current in now.items() if then[role] != current["compute_dtype"]]
    if not changed:
        return
    role = changed[0]
    then_dtype, now_dtype = manifest["models"][role]["spec"].get("dtype"), now[role]["spec"]["dtype"]
    raise InputError(
        f"{where} holds the values of {', '.join(changed)} computed in {then[role]} "
        f"({role}.dtype={then_dtype}, trainer.precision={manifest.get('precision') or DEFAULT_PRECISION}), but this "
        f"run computes them in {now[role]['compute_dtype']} ({role}.dtype={now_dtype}, trainer.precision={precision}). "
        f"{rebuild}"
    )


def _compare_model(where: str, role: str, then: dict, now: dict, rebuild: str) -> None:
    """Same outputs: the same loading options and the same weight files (by sha256; the path may move)."""
    for key, value in then["spec"].items():
        if key != "path" and now["spec"].get(key) != value:
            raise InputError(f"{where} was made with {role}.{key}={value!r}, now {now['spec'].get(key)!r}. {rebuild}")
    path = then["spec"]["path"]
    if then["files"] is None or now["files"] is None:
        if then["files"] is not None or now["spec"]["path"] != path:
            raise InputError(
                f"{where}: cannot verify the weights of {role} ({now['spec']['path']}): no local "
                f"files to hash. {rebuild}"
            )
        log.warning("%s: %s (%s) is a hub id without local files: its weights are not verified", where, role, path)
        return
    for name in sorted(set(then["files"]) | set(now["files"])):
        a, b = then["files"].get(name), now["files"].get(name)
        if a is None or b is None:
            change = "appeared in" if a is None else "disappeared from"
            raise InputError(
                f"{where}: {role} changed since the cache was made ({name} {change} {now['spec']['path']}). {rebuild}"
            )
        if a["sha256"] != b["sha256"]:
            raise InputError(
                f"{where}: {role} changed since the cache was made ({now['spec']['path']}/{name}: "
                f"sha256 {a['sha256'][:12]}... then, {b['sha256'][:12]}... now). {rebuild}"
            )


def shard_name(split: str, rank: int, world_size: int) -> str:
    return f"{split}-{rank:05d}-of-{world_size:05d}.safetensors"


class CacheWriter(pl.Callback):
    """Gathers `predict_step` outputs per split and side; at the end each rank writes its shards
    (length -1 for a side computed elsewhere, or absent), then rank 0 writes the manifest after a
    barrier, so a manifest marks a complete cache."""

    def __init__(self, folder: Path, splits: list[str], manifest: dict) -> None:
        self.folder, self.splits, self.manifest = folder, splits, manifest
        self.parts: dict[str, list[dict]] = {split: [] for split in splits}

    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        outputs = {k: v.detach().cpu() if isinstance(v, Tensor) else v for k, v in outputs.items()}
        self.parts[self.splits[dataloader_idx]].append({**outputs, "sides": batch["sides"]})

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from safetensors.torch import save_file

        rank, world = trainer.global_rank, trainer.world_size
        values = self.manifest["values"]
        for split in self.splits:
            sides = self.manifest["splits"][split]["sides"]
            per_record: dict[int, dict] = {}
            for part in self.parts[split]:
                starts = torch.cumsum(part["length"], 0) - part["length"]
                for row, (index, side) in enumerate(zip(part["index"].tolist(), part["sides"])):
                    start, n = int(starts[row]), int(part["length"][row])
                    per_record.setdefault(index, {})[side] = {v: part[v][start : start + n] for v in values}
            indices = sorted(per_record)
            tensors = {"index": torch.tensor(indices, dtype=torch.long)}
            for side in sides:
                got = [per_record[i].get(side) for i in indices]
                tensors[f"{side}.length"] = torch.tensor(
                    [-1 if g is None else len(g[values[0]]) for g in got], dtype=torch.long
                )
                for v in values:
                    parts = [g[v] for g in got if g is not None]
                    tensors[f"{side}.{v}"] = torch.cat(parts).float() if parts else torch.zeros(0)
            save_file(
                tensors,
                str(self.folder / shard_name(split, rank, world)),
                metadata={"split": split, "rank": str(rank), "world_size": str(world)},
            )
        trainer.strategy.barrier("wspo-precompute-shards")
        if trainer.is_global_zero:
            manifest = dict(self.manifest)
            for split in self.splits:
                manifest["splits"][split]["shards"] = [shard_name(split, r, world) for r in range(world)]
            tmp = self.folder / (MANIFEST + ".tmp")
            tmp.write_text(json.dumps(manifest, indent=1))
            tmp.replace(self.folder / MANIFEST)
        trainer.strategy.barrier("wspo-precompute-manifest")


def clear_cache(folder: Path) -> None:
    """Remove a previous cache's files (the manifest first, so a half-removed cache never looks valid)."""
    (folder / MANIFEST).unlink(missing_ok=True)
    for path in folder.glob("*-of-*.safetensors"):
        path.unlink(missing_ok=True)
