"""Stage `pairs`: preference pairs from scored samples (best vs worst response per prompt)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from wspo_lightning.commands import run_function
from wspo_lightning.errors import InputError
from wspo_lightning.io import read_jsonl, write_jsonl
from wspo_lightning.pipeline.stage import done, say


def make_pairs(records: list[dict], min_margin: float = 0.0) -> list[dict]:
    """Per prompt: chosen = the highest-reward response, rejected = the lowest.

    Prompts whose best and worst rewards differ by `min_margin` or less (ties) give no pair; responses
    without text are left out. What sampling knew travels with each response: `{side}_ids` (the token ids as
    drawn), `{side}_finished` (ended by a stop token, not cut by the length limit) and, per pair, the
    `tokenizer_fingerprint` of the renderer that sampled them (when both responses carry one and they agree).
    """
    groups: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        if str(record["response"]).strip():
            groups[str(record.get("id", record["prompt"]))].append(record)
    pairs = []
    for key, group in groups.items():
        best = max(group, key=lambda r: r["reward"])
        worst = min(group, key=lambda r: r["reward"])
        if best["reward"] - worst["reward"] <= min_margin:
            continue
        pair = {
            "id": key,
            "prompt": best["prompt"],
            "chosen": best["response"],
            "rejected": worst["response"],
            "chosen_reward": best["reward"],
            "rejected_reward": worst["reward"],
            "chosen_finished": best.get("finished", True),
            "rejected_finished": worst.get("finished", True),
        }
        fingerprint = best.get("tokenizer_fingerprint")
        if (
            fingerprint
            and fingerprint == worst.get("tokenizer_fingerprint")
            and best.get("response_ids") is not None
            and worst.get("response_ids") is not None
        ):
            pair.update(
                chosen_ids=best["response_ids"], rejected_ids=worst["response_ids"], tokenizer_fingerprint=fingerprint
            )
        pairs.append(pair)
    return pairs


def pairs(scored: str, out: str, min_margin: float = 0.0, force: bool = False) -> Path:
    """Write preference pairs {id, prompt, chosen, rejected, chosen_reward, rejected_reward, chosen_finished,
    rejected_finished, and chosen_ids, rejected_ids, tokenizer_fingerprint when sampling kept them} as JSONL.

    Args:
        scored: JSONL of scored samples (`wspo score`), several per prompt id.
        out: output JSONL of pairs, readable by `PreferenceDataModule`.
        min_margin: drop prompts whose best and worst rewards differ by this much or less.
        force: redo even if `out` exists.
    """
    if done("pairs", out, force):
        return Path(out)
    records = read_jsonl(scored, required=["prompt", "response", "reward"])
    result = make_pairs(records, min_margin)
    if not result:
        raise InputError(
            f"{scored}: no prompt has two responses whose rewards differ by more than {min_margin}; "
            "sample more responses per prompt (num_samples >= 2)"
        )
    write_jsonl(out, result)
    prompts = len({str(r.get("id", r["prompt"])) for r in records})
    say("pairs", f"{len(result)} pairs from {prompts} prompts ({prompts - len(result)} ties dropped) -> {out}")
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    return run_function(pairs, argv, "wspo pairs")
