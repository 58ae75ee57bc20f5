"""Records -> token ids (through the one `Renderer`) -> truncated features -> padded batches."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from wspo_lightning.crossvocab.batch import pad_maps
from wspo_lightning.errors import located
from wspo_lightning.logprobs import right_pad
from wspo_lightning.render import Renderer

log = logging.getLogger(__name__)


def tokenize_records(
    records: Sequence[dict],
    renderer: Renderer,
    max_length: int,
    max_prompt_length: int | None = None,
    keep_header: bool = True,
    chunk_size: int = 1024,
) -> list[dict]:
    """Records of `load_records` -> features `{index, id, prompt_ids, chosen_ids, rejected_ids | None, truncated}`.

    Prompt and responses are rendered by `renderer` (a finished response ends with the end-of-turn, a cut one
    without it). Response ids a pipeline kept from sampling are used as drawn when the record's
    `tokenizer_fingerprint` equals the renderer's, else the text is rendered again. Over `max_length` (or
    `max_prompt_length`), the prompt is cut first, by the longer response's need so chosen and rejected share it,
    inside the user's content so the template's header and system turn stay (`Renderer.fit_prompt`; with
    `keep_header` False, from the left, as earlier versions did); then responses from the right (a response cut
    so loses its end-of-turn).
    """
    features, reused, stale = [], 0, 0
    for start in range(0, len(records), chunk_size):
        chunk = records[start : start + chunk_size]
        prompts = renderer.prompt_ids([r["prompt"] for r in chunk])
        responses: dict[str, list[list[int] | None]] = {}
        for side in ("chosen", "rejected"):
            ids: list[list[int] | None] = [None] * len(chunk)
            todo = []
            for i, record in enumerate(chunk):
                if record[side] is None:
                    continue
                kept = record.get(f"{side}_ids")
                if kept is not None and record.get("tokenizer_fingerprint") == renderer.fingerprint:
                    ids[i], reused = list(kept), reused + 1
                else:
                    stale += kept is not None
                    todo.append(i)
            rendered = renderer.response_ids(
                [chunk[i]["prompt"] for i in todo],
                [chunk[i][side] for i in todo],
                [chunk[i].get(f"{side}_finished", True) for i in todo],
                prompt_ids=[prompts[i] for i in todo],
            )
            for i, row in zip(todo, rendered):
                ids[i] = row
            responses[side] = ids
        for i, record in enumerate(chunk):
            chosen, rejected, prompt = responses["chosen"][i], responses["rejected"][i], prompts[i]
            budget = max(1, max_length - max(len(chosen), len(rejected or ())))
            budget = min(budget, max_prompt_length or budget)
            if len(prompt) <= budget:
                fitted = prompt
            else:
                fitted = renderer.fit_prompt(record["prompt"], budget) if keep_header else prompt[-budget:]
            feature = _truncate(record, fitted, chosen, rejected, max_length)
            feature["truncated"] |= fitted is not prompt
            features.append({"index": start + i, "id": record["id"], **feature})
    if reused or stale:
        log.info(
            "responses: %d as sampled (token ids kept), %d rendered again from text (sampled by another "
            "tokenizer or template)",
            reused,
            stale,
        )
    return features


def tokenize_record(record: dict, renderer: Renderer, max_length: int, **options) -> dict:
    """One record -> its feature (see `tokenize_records` and its options), with `index` 0."""
    return tokenize_records([record], renderer, max_length, **options)[0]


def _truncate(record: dict, prompt: list[int], chosen: list[int], rejected: list[int] | None, max_length: int) -> dict:
    longest = max(len(chosen), len(rejected or ()))
    truncated = len(prompt) + longest > max_length
    if truncated:
        prompt = prompt[-max(1, max_length - longest) :]
        room = max_length - len(prompt)
        if room < 1:
            raise located(
                record["source"],
                None,
                "chosen",
                f"the response is empty after truncation to max_length={max_length}. Raise max_length.",
            )
        chosen, rejected = chosen[:room], None if rejected is None else rejected[:room]
    if not chosen:
        raise located(
            record["source"],
            None,
            "chosen",
            "the response has no tokens (an empty response that was cut before its end-of-turn). Remove the record.",
        )
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected, "truncated": truncated}


def collate(features: Sequence[dict], pad_token_id: int, weak_pad_token_id: int | None = None) -> dict:
    """Right-padded batch: `{side}_input_ids`, `{side}_attention_mask`, `{side}_labels` [batch, tokens]
    for side chosen (and rejected when every feature has one, padded to the same length), `index`
    [batch] and `ids` (list of str). Labels are the input ids with IGNORE_INDEX on prompt and padding.
    Features with a weak side (`crossvocab.add_weak_features`) add the same keys prefixed `weak_` for the
    weak pair's rows (padded with `weak_pad_token_id`) and `weak_{side}_map` (`crossvocab.pad_maps`).

    Two features, pad id 0. Each row is prompt + response; the longest row of either side (b's rejected,
    1 + 5 tokens) sets one length for both sides:

    >>> features = [
    ...     {"index": 0, "id": "a", "prompt_ids": [5, 6], "chosen_ids": [7, 8, 2], "rejected_ids": [9, 2]},
    ...     {"index": 1, "id": "b", "prompt_ids": [5], "chosen_ids": [7, 2], "rejected_ids": [8, 9, 9, 9, 2]},
    ... ]
    >>> batch = collate(features, pad_token_id=0)
    >>> batch["chosen_input_ids"]
    tensor([[5, 6, 7, 8, 2, 0],
            [5, 7, 2, 0, 0, 0]])
    >>> batch["chosen_attention_mask"]
    tensor([[1, 1, 1, 1, 1, 0],
            [1, 1, 1, 0, 0, 0]])
    >>> batch["chosen_labels"]  # the response ids; -100 (IGNORE_INDEX) on prompt and padding
    tensor([[-100, -100,    7,    8,    2, -100],
            [-100,    7,    2, -100, -100, -100]])
    >>> batch["rejected_labels"]
    tensor([[-100, -100,    9,    2, -100, -100],
            [-100,    8,    9,    9,    9,    2]])
    >>> batch["index"], batch["ids"]
    (tensor([0, 1]), ['a', 'b'])

    One feature without a rejected response: the batch has the chosen side alone.

    >>> features[1]["rejected_ids"] = None
    >>> sorted(collate(features, pad_token_id=0))
    ['chosen_attention_mask', 'chosen_input_ids', 'chosen_labels', 'ids', 'index']
    """
    sides = ["chosen", "rejected"] if all(f["rejected_ids"] is not None for f in features) else ["chosen"]
    batch = _pad_sides(features, sides, "", pad_token_id)
    if "weak_prompt_ids" in features[0]:
        batch.update(_pad_sides(features, sides, "weak_", weak_pad_token_id))
        batch.update(pad_maps(features, sides))
    batch["index"] = torch.tensor([f["index"] for f in features], dtype=torch.long)
    batch["ids"] = [f["id"] for f in features]
    return batch


def _pad_sides(features: Sequence[dict], sides: Sequence[str], prefix: str, pad_token_id: int) -> dict[str, Any]:
    length = max(len(f[f"{prefix}prompt_ids"]) + len(f[f"{prefix}{side}_ids"]) for f in features for side in sides)
    batch: dict[str, Any] = {}
    for side in sides:
        input_ids, attention_mask, labels = right_pad(
            [f[f"{prefix}prompt_ids"] for f in features],
            [f[f"{prefix}{side}_ids"] for f in features],
            pad_token_id,
            length,
        )
        batch.update(
            {
                f"{prefix}{side}_input_ids": input_ids,
                f"{prefix}{side}_attention_mask": attention_mask,
                f"{prefix}{side}_labels": labels,
            }
        )
    return batch
