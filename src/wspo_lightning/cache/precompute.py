"""`wspo precompute`'s work: one pass of the frozen roles over the data, into the store of `cache.store`.

`PrecomputeModule` is a predict-only LightningModule holding the frozen roles of an objective (WSPO:
the weak pair, and the reference unless told otherwise; DPO and SFT: the reference); `build_cache`
runs it with any trainer (DDP: one shard per rank) and writes the manifest last.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch import Tensor
from torch.utils.data import DataLoader

from wspo_lightning.cache.fingerprint import data_features, describe
from wspo_lightning.cache.store import FORMAT, VERSION, CacheWriter, clear_cache
from wspo_lightning.data.tokenize import collate
from wspo_lightning.frozen import FrozenRoles
from wspo_lightning.logprobs import response_mask, use_packing
from wspo_lightning.models import freeze, load_model

log = logging.getLogger(__name__)


class PrecomputeModule(pl.LightningModule):
    """The cacheable `values` of `objective` ("delta_weak", "reference") for each record and side.

    A LoRA policy without a reference model caches its base (adapters disabled) as the reference,
    exactly as `fit` computes it."""

    def __init__(self, objective: Any, values: Sequence[str], packing: bool = False) -> None:
        super().__init__()
        self.values, self.packing = list(values), packing
        self.specs = objective.cache_roles(self.values)  # role -> ModelSpec
        self.policy_spec = objective.policy_spec
        self.lora_reference = "reference" in self.values and objective.reference_spec is None and objective.uses_lora
        self.frozen = FrozenRoles()
        self.policy = None

    def configure_model(self) -> None:
        device = self.trainer.strategy.root_device
        specs = dict(self.specs)
        if self.lora_reference:
            specs.pop("reference")
            if self.policy is None:
                quantized = self.policy_spec.quantization != "none"
                self.policy = freeze(load_model(self.policy_spec, trainable=True, device=device if quantized else None))
        self.frozen.load(specs, device)
        for model in [*(self.frozen[role] for role in self.frozen), *([self.policy] if self.policy else [])]:
            use_packing(model, self.packing)  # data.packing: the same values, without computing the padding

    def on_predict_start(self) -> None:
        self.frozen.place(self.device)

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """Per row, its response length and the values of its response tokens, concatenated row after row
        (`{"index": [B], "length": [B], value: [sum of lengths]}`)."""
        sequences = batch["chosen_input_ids"], batch["chosen_attention_mask"], batch["chosen_labels"]
        mask = response_mask(sequences[2])
        out = {"index": batch["index"], "length": mask.sum(dim=1)}
        if "delta_weak" in self.values:  # in the policy's tokens, mapped there for a weak pair of its own
            out["delta_weak"] = self.frozen.step_delta_weak(batch, ["chosen"], sequences)[mask].float()
        if "reference" in self.values:
            out["reference"] = self.frozen.reference_logps(self.policy, *sequences)[mask].float()
        return out


def side_items(features: Sequence[dict], sides: Sequence[str]) -> list[dict]:
    """One item per (record, side) with that side's response as `chosen_ids` (and its weak side, if any, as
    `weak_chosen_ids` and `weak_chosen_map`), longest first (least padding)."""
    items = []
    for f in features:
        for side in sides:
            response = f[f"{side}_ids"]
            if response is not None:
                item = {
                    "index": f["index"],
                    "id": f["id"],
                    "prompt_ids": f["prompt_ids"],
                    "chosen_ids": response,
                    "rejected_ids": None,
                    "side": side,
                }
                if "weak_prompt_ids" in f:
                    item.update(
                        weak_prompt_ids=f["weak_prompt_ids"],
                        weak_chosen_ids=f[f"weak_{side}_ids"],
                        weak_chosen_map=f[f"weak_{side}_map"],
                    )
                items.append(item)
    return sorted(items, key=lambda it: -(len(it["prompt_ids"]) + len(it["chosen_ids"])))


def _collate_items(items: list[dict], **pad_ids: int | None) -> dict:
    batch = collate(items, **pad_ids)
    batch["sides"] = [it["side"] for it in items]
    return batch


def build_cache(
    objective: Any,
    datamodule: Any,
    trainer: pl.Trainer,
    folder: str | Path,
    values: Sequence[str],
    batch_size: int | None = None,
    command: str | None = None,
) -> Path:
    """Compute `values` of `objective` (a PreferenceModule) on the train, val and test data of `datamodule`
    with `trainer`, and write the cache to `folder` (see `cache.store`). `command`: how to rebuild it, kept in
    the manifest for the message that refuses a stale cache."""
    folder = Path(folder)
    datamodule.setup("predict")
    objective.check_tokenizers(datamodule)  # a weak pair with its own tokenizer: the data's weak side
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "objective": type(objective).__name__,
        "dtype": "float32",
        "precision": str(trainer.precision),
        "command": command,
        **describe(objective, datamodule, values, precision=str(trainer.precision)),
    }
    features = data_features(datamodule)
    splits = list(manifest["splits"])
    loaders = [
        DataLoader(
            side_items(features[s], manifest["splits"][s]["sides"]),
            shuffle=False,
            batch_size=batch_size or datamodule.eval_batch_size,
            collate_fn=partial(_collate_items, **datamodule.pad_ids()),
        )
        for s in splits
    ]
    folder.mkdir(parents=True, exist_ok=True)
    clear_cache(folder)
    trainer.callbacks.append(CacheWriter(folder, splits, manifest))
    start = time.perf_counter()
    module = PrecomputeModule(objective, values, packing=getattr(datamodule, "packing", False))
    trainer.predict(module, dataloaders=loaders, return_predictions=False)
    if trainer.is_global_zero:
        counts = ", ".join(f"{s}: {len(features[s])} records" for s in splits)
        log.info(
            "wrote the logps cache %s (%s; %s) in %.1f s",
            folder,
            ", ".join(values),
            counts,
            time.perf_counter() - start,
        )
    return folder
