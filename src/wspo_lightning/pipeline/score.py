"""Stage `score`: add a gold `reward` to every sampled response.

The reward is anything with `__call__(prompts, responses) -> list[float]` (see
`wspo_lightning.rewards.Reward`): VADER sentiment by default, a reward model (`rm:PATH`, any
`AutoModelForSequenceClassification`), or a class of your own given by its import path or a
`class_path` / `init_args` block.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from wspo_lightning.commands import run_function
from wspo_lightning.io import read_jsonl, write_jsonl
from wspo_lightning.pipeline.stage import done, say
from wspo_lightning.rewards import describe, load_reward


def score(
    samples: str,
    out: str,
    reward: str | dict[str, Any] = "wspo_lightning.rewards.VaderReward",
    batch_size: int = 64,
    force: bool = False,
) -> Path:
    """Score each record's `response` with `reward` and write the records with a `reward` field.

    Args:
        samples: JSONL with `prompt` and `response` fields (the output of `wspo sample` or `wspo generate`); a
            file of an older version with `completion` instead is read too (copied to `response`).
        out: output JSONL: the input records plus `reward`.
        reward: `vader`, `rm:PATH` (a reward model folder), the import path of a reward class or function,
            or a class_path / init_args block (see `wspo_lightning.rewards.load_reward`).
        batch_size: responses passed to the reward at once.
        force: redo even if `out` exists.
    """
    if done("score", out, force):
        return Path(out)
    records = read_jsonl(samples, required=["prompt", ("response", "completion")])
    for record in records:  # older versions of `wspo generate` wrote `completion`
        record.setdefault("response", record.get("completion"))
    scorer = load_reward(reward)
    name = describe(reward)
    say("score", f"{len(records)} responses of {samples} with {name}")
    for first in tqdm(range(0, len(records), batch_size), desc="score", unit="batch", dynamic_ncols=True):
        batch = records[first : first + batch_size]
        values = scorer([r["prompt"] for r in batch], [r["response"] for r in batch])
        if len(values) != len(batch):
            raise ValueError(f"reward {name} returned {len(values)} scores for {len(batch)} responses")
        for record, value in zip(batch, values):
            record["reward"] = float(value)
    write_jsonl(out, records)
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    return run_function(score, argv, "wspo score")
