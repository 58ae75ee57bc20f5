"""The weak pair's own side of each record: its rendering of the same prompt and responses, and for each weak
response token the policy response token its log-ratio lands on. Tokenizers only, no models."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from wspo_lightning.crossvocab.align import place
from wspo_lightning.crossvocab.spans import Span, check_offsets, decoded_spans, rendered_spans
from wspo_lightning.render import Renderer

log = logging.getLogger(__name__)

SIDES = ("chosen", "rejected")


def add_weak_features(
    records: Sequence[dict],
    features: Sequence[dict],
    policy: Renderer,
    weak: Renderer,
    max_length: int,
    chunk_size: int = 1024,
) -> None:
    """Add the weak side to each feature of `tokenize_records` (in place): `weak_prompt_ids`, and per side
    `weak_{side}_ids` (the weak renderer's tokens of the same response text, ending with its end-of-turn when
    the policy's does) and `weak_{side}_map` (for each of those tokens, the index of the policy response token
    it lands on; see `align.place`), None where the record has no such response.

    A response the length limit cut keeps the weak tokens that end within the policy tokens it keeps. The
    weak response is never cut further (it covers the policy's text); its prompt is cut from the left, one
    token at least kept, to fit `max_length` with the longer weak response, as the policy's is.
    """
    check_offsets(policy, "the policy's")
    check_offsets(weak, "the weak pair's")
    redecoded = 0
    for start in range(0, len(records), chunk_size):
        chunk, feats = records[start : start + chunk_size], features[start : start + chunk_size]
        prompts = [r["prompt"] for r in chunk]
        policy_prompts, weak_prompts = policy.prompt_ids(prompts), weak.prompt_ids(prompts)
        texts = {r: [r.prompt_text(p) for p in prompts] if r.chat else None for r in (policy, weak)}
        sides: dict[str, list[tuple[list[int], list[int]] | None]] = {}
        for side in SIDES:
            todo = [i for i, r in enumerate(chunk) if r[side] is not None]
            args = (
                [prompts[i] for i in todo],
                [chunk[i][side] for i in todo],
                [chunk[i].get(f"{side}_finished", True) for i in todo],
            )
            policy_ids, policy_spans = rendered_spans(
                policy, *args, [policy_prompts[i] for i in todo], _pick(texts[policy], todo)
            )
            weak_ids, weak_spans = rendered_spans(
                weak, *args, [weak_prompts[i] for i in todo], _pick(texts[weak], todo)
            )
            out: list[tuple[list[int], list[int]] | None] = [None] * len(chunk)
            for j, i in enumerate(todo):
                record, kept = chunk[i], feats[i][f"{side}_ids"]
                if list(kept) == policy_ids[j][: len(kept)]:
                    spans, whole = policy_spans[j], len(policy_ids[j])
                else:  # token ids kept from sampling, split otherwise than the text's tokenization
                    spans, whole = _sampled_spans(policy, record, side)
                    redecoded += 1
                where = f"{record['source']}: field {side!r}"
                landing = place(spans[: len(kept)], weak_spans[j], record[side], len(kept) < whole, where)
                out[i] = (weak_ids[j][: len(landing)], landing)
            sides[side] = out
        for i, feature in enumerate(feats):
            longest = max(len(sides[s][i][0]) for s in SIDES if sides[s][i] is not None)
            prompt = weak_prompts[i]
            if len(prompt) + longest > max_length:
                prompt = prompt[-max(1, max_length - longest) :]
            feature["weak_prompt_ids"] = prompt
            for side in SIDES:
                ids, landing = sides[side][i] or (None, None)
                feature[f"weak_{side}_ids"], feature[f"weak_{side}_map"] = ids, landing
    if redecoded:
        log.info("%d responses kept their sampled token ids: placed on their text by decoding", redecoded)


def _pick(values: list | None, rows: list[int]) -> list | None:
    return None if values is None else [values[i] for i in rows]


def _sampled_spans(policy: Renderer, record: dict, side: str) -> tuple[list[Span | None], int]:
    ids = record.get(f"{side}_ids")
    if ids is None:
        raise RuntimeError(f"{record['source']}: the {side} response's tokens are neither rendered nor sampled")
    return decoded_spans(policy, ids, record[side], record.get(f"{side}_finished", True)), len(ids)
