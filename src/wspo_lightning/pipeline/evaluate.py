"""Stage `evaluate`: gold reward, KL to a reference and diversity for each row of scored samples.

Every row is a file of scored samples (`wspo sample` then `wspo score`) on the same held-out
prompts. Per row: mean gold reward with a bootstrap 95% interval, the paired difference to a
baseline row with its interval, KL(row || reference) estimated from the samples as the mean of
log pi_row(y|x) - log pi_reference(y|x) (nats per response; none for a row without likelihoods, such
as chunk-level beam search), mean length, distinct-n, and the most repeated word. Intervals resample
prompts (all samples of a prompt together), so several samples per prompt do not narrow them falsely.

log pi_reference(y|x) is taken on the token ids the sampler drew only where they are the reference's ids of
the response (`reference_ids`); the values are kept beside the output and reused only for the same ids.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from wspo_lightning.commands import run_function
from wspo_lightning.errors import InputError
from wspo_lightning.hardware import resolve_device
from wspo_lightning.io import atomic_path, read_jsonl, write_jsonl
from wspo_lightning.logprobs import summed_logps
from wspo_lightning.models import ModelSpec, check_model_path, load_model, load_tokenizer
from wspo_lightning.pipeline.stage import done, say
from wspo_lightning.render import Renderer

_STOPWORDS = set(
    """a an the and or but of to in on at for with from by as is are was were be been it its it's this that
these those i you he she we they me my your his her our their not no so very just than then there here what which
who how all any some more most can could would should will one film movie""".split()
)


@dataclass
class EvalRow:
    """One row of the results table."""

    name: str
    """Row label, e.g. "strong + WSPO (gamma=1)"."""
    samples: str
    """Scored samples (JSONL with prompt, response, response_ids, logp, num_tokens, reward; `completion` instead of
    `response`, as older versions of `wspo generate` wrote, is read too)."""
    baseline: str | None = None
    """Name of the row this one's paired difference is taken against (None: evaluate's `baseline`), e.g.
    a strong base sampled as this row's sampler samples."""
    kl: bool = True
    """Estimate KL to the reference. False for a row sampled by another model than a tuned copy of the
    reference (the demo's weak models): its KL measures no alignment, and skipping it saves a reference pass."""


def bootstrap_ci(
    values_by_prompt: list[np.ndarray], n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile interval of the mean, resampling prompts with replacement (each with all its values)."""
    rng = np.random.default_rng(seed)
    sums = np.array([v.sum() for v in values_by_prompt])
    counts = np.array([len(v) for v in values_by_prompt])
    picks = rng.integers(0, len(sums), size=(n_boot, len(sums)))  # [n_boot, prompts]
    means = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct n-grams over all n-grams of the responses (words, lower-cased): 1 = no repetition."""
    grams = Counter()
    for text in texts:
        words = re.findall(r"[a-z']+", text.lower())
        grams.update(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    return len(grams) / max(sum(grams.values()), 1)


def top_word(texts: list[str]) -> tuple[str, float]:
    """The content word found in most responses, and the share of responses that contain it."""
    counts = Counter()
    for text in texts:
        counts.update(set(re.findall(r"[a-z']+", text.lower())) - _STOPWORDS)
    if not counts:
        return "", 0.0
    word, count = counts.most_common(1)[0]
    return word, count / max(len(texts), 1)


def _by_prompt(records: list[dict], key: str) -> dict[str, np.ndarray]:
    groups: dict[str, list[float]] = {}
    for r in records:
        groups.setdefault(str(r["id"]), []).append(float(r[key]))
    return {k: np.array(v) for k, v in groups.items()}


def reference_ids(renderer: Renderer, records: list[dict]) -> list[list[int]]:
    """The response ids the reference (`renderer`: its tokenizer and rendering) scores for each record.

    A record's `response_ids` as the sampler drew them, when they are the reference's ids of its `response`:
    - they equal the reference's rendering of the response text (`Renderer.response_ids`, ending with the
      end-of-turn when the record `finished`), or
    - the reference's renderer drew them (the record's `tokenizer_fingerprint` is its fingerprint) and they decode
      (`Renderer.decode`) to the response text: drawn tokens may split the text otherwise than tokenizing it
      does, and the KL is over the tokens drawn.
    Otherwise (ids of another tokenizer or template, or a response edited after sampling) their log-probability
    under the reference would be of other text, or of another vocabulary's ids: the reference scores its own
    rendering of the response text instead."""
    if not records:
        return []
    finished = [bool(r.get("finished", True)) for r in records]
    rendered = renderer.response_ids([r["prompt"] for r in records], [r["response"] for r in records], finished)
    out = []
    for record, own in zip(records, rendered):
        drawn = record.get("response_ids")
        drawn = list(drawn) if drawn is not None else None
        sampled_here = (
            drawn is not None
            and record.get("tokenizer_fingerprint") == renderer.fingerprint
            and renderer.decode(drawn) == record["response"]
        )
        out.append(drawn if drawn == own or sampled_here else own)
    return out


def reference_logps(
    model, renderer: Renderer, records: list[dict], batch_size: int = 16, desc: str = "reference"
) -> list[float]:
    """sum_t log pi_model(y_t | x, y_<t) of each record's response ids (`reference_ids`) after its rendered prompt."""
    prompts = renderer.prompt_ids([r["prompt"] for r in records])
    return _summed(model, renderer.pad_id, prompts, reference_ids(renderer, records), batch_size, desc)


def _summed(model, pad: int, prompts: list[list[int]], responses: list[list[int]], batch_size: int, desc: str):
    out: list[float] = []
    chunk = batch_size * 8
    for first in tqdm(range(0, len(prompts), chunk), desc=desc, unit="chunk", dynamic_ncols=True, leave=False):
        end = first + chunk
        out += summed_logps(model, prompts[first:end], responses[first:end], pad, batch_size)
    return out


def _scored_key(reference: ModelSpec, prompt_ids: list[int], response_ids: list[int]) -> str:
    """What a kept reference log-probability was computed on: the reference and the exact ids."""
    scored = [reference.path, reference.dtype, prompt_ids, response_ids]
    return hashlib.sha256(json.dumps(scored).encode()).hexdigest()


def has_likelihood(records: list[dict]) -> bool:
    """Whether every record carries the log-likelihood of its sampler (`logp`; null after a search)."""
    return all(r.get("logp") is not None for r in records)


def paired_difference(
    records: list[dict], other: list[dict], n_boot: int = 2000, seed: int = 0
) -> tuple[float, list[float]]:
    """Mean over shared prompts of (mean reward here - mean reward in `other`), with its bootstrap 95% interval."""
    mine, theirs = _by_prompt(records, "reward"), _by_prompt(other, "reward")
    shared = sorted(set(mine) & set(theirs))
    if not shared:
        raise InputError("the two rows share no prompt id: evaluate them on the same prompts")
    diffs = [np.array([mine[k].mean() - theirs[k].mean()]) for k in shared]
    return float(np.mean([d[0] for d in diffs])), list(bootstrap_ci(diffs, n_boot, seed))


def per_prompt_values(records: list[dict]) -> dict:
    """Per prompt id, in sorted id order: `ids`, the mean gold `reward`, and the mean `kl` (log pi_row - log
    pi_reference of its samples; None for the whole row when a record has no likelihood or no reference value)."""
    ids = sorted({str(r["id"]) for r in records})
    rewards = _by_prompt(records, "reward")
    with_kl = all(r.get("logp") is not None and r.get("ref_logp") is not None for r in records)
    kls = _by_prompt([{"id": r["id"], "kl": r["logp"] - r["ref_logp"]} for r in records], "kl") if with_kl else None
    return {
        "ids": ids,
        "reward": [float(rewards[k].mean()) for k in ids],
        "kl": [float(kls[k].mean()) for k in ids] if kls is not None else None,
    }


def row_stats(
    name: str,
    records: list[dict],
    baseline: list[dict] | None,
    n_boot: int,
    seed: int,
    num_examples: int = 3,
    estimate_kl: bool = True,
) -> dict:
    """The numbers of one row (see the module docstring)."""
    rewards = _by_prompt(records, "reward")
    texts = [r["response"] for r in records]
    kl = kl_ci = None  # a search (CBS) has no likelihood to estimate KL with
    if estimate_kl and has_likelihood(records):
        per_record = [{"id": r["id"], "kl": r["logp"] - r["ref_logp"]} for r in records]
        kl = float(np.mean([r["kl"] for r in per_record]))
        kl_ci = list(bootstrap_ci(list(_by_prompt(per_record, "kl").values()), n_boot, seed))
    stats = {
        "name": name,
        "gold_reward_mean": float(np.mean([r["reward"] for r in records])),
        "gold_reward_ci": list(bootstrap_ci(list(rewards.values()), n_boot, seed)),
        "kl": kl,
        "kl_ci": kl_ci,
        "kl_skipped": None if kl is not None else ("another model" if not estimate_kl else "no likelihood"),
        "mean_length": float(np.mean([r["num_tokens"] for r in records])),
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "top_word": list(top_word(texts)),
        "n": len(records),
    }
    if baseline is not None:
        stats["diff_vs_baseline"], stats["diff_vs_baseline_ci"] = paired_difference(records, baseline, n_boot, seed)
    stats["examples"] = [
        {"prompt": r["prompt"], "response": r["response"], "reward": r["reward"]} for r in records[:num_examples]
    ]
    return stats


def evaluate(
    rows: list[EvalRow],
    reference: ModelSpec,
    out: str,
    baseline: str | None = None,
    n_boot: int = 2000,
    batch_size: int = 16,
    seed: int = 0,
    num_examples: int = 3,
    use_chat_template: bool = True,
    prompt_template: str = "{prompt}",
    device: str = "auto",
    force: bool = False,
    wandb_project: str | None = None,
    wandb_entity: str | None = None,
    wandb_name: str | None = None,
    wandb_dir: str | None = None,
    per_prompt: bool = False,
) -> Path:
    """Write `out` (results.json): a list with one object per row.

    Args:
        rows: name and scored-samples file of each row.
        reference: the model KL is measured against (the strong base), e.g. in bfloat16.
        out: output JSON file. Beside it, `<out stem>_logps/` keeps the reference log-probs of each row, each with
            the ids it was computed on: a later run reuses a value only for the same reference and ids.
        baseline: name of the row that differences are taken against (paired by prompt id), for rows that
            name none of their own (`EvalRow.baseline`).
        n_boot: bootstrap resamples.
        batch_size: sequences per reference forward.
        seed: bootstrap seed.
        num_examples: example completions kept per row.
        use_chat_template: render prompts with the tokenizer's chat template when it has one (as sampled).
        prompt_template: plain template with a `{prompt}` field, used without a chat template.
        device: "auto" (a GPU when there is one), "cpu", "cuda", ...
        force: redo even if `out` exists.
        wandb_project: also log the table and a gold-reward-vs-KL plot to a W&B run of this project
            (WANDB_MODE=offline writes it locally for `wandb sync`); None: no W&B.
        wandb_entity: W&B entity (user or team); None: the default one.
        wandb_name: the W&B run's name; None: "evaluate".
        wandb_dir: folder for the W&B run's files; None: beside `out`.
        per_prompt: also give each row its values per prompt (`per_prompt_values`), for frontiers and their
            intervals.
    """
    if done("evaluate", out, force):
        return Path(out)
    names = [r.name for r in rows]
    for wanted in {baseline, *(r.baseline for r in rows)} - {None}:
        if wanted not in names:
            raise InputError(f"evaluate: baseline {wanted!r} is not one of the rows {names}")
    data = {
        r.name: read_jsonl(
            r.samples, required=["id", "prompt", ("response", "completion"), "response_ids", "logp", "reward"]
        )
        for r in rows
    }
    for record in (record for records in data.values() for record in records):
        record.setdefault("response", record.get("completion"))  # a file of an older `wspo generate`
    cache_dir = Path(out).with_name(Path(out).stem + "_logps")
    model = renderer = None
    for i, row in enumerate(rows):
        cache, records = cache_dir / f"{i:02d}.jsonl", data[row.name]
        if not row.kl or not has_likelihood(records):
            continue
        if renderer is None:
            check_model_path(reference, "reference")
            renderer = Renderer(load_tokenizer(reference), use_chat_template, prompt_template, name=reference.path)
        prompts, responses = renderer.prompt_ids([r["prompt"] for r in records]), reference_ids(renderer, records)
        keys = [_scored_key(reference, p, y) for p, y in zip(prompts, responses)]
        # a kept value counts only for the reference and ids it was computed on (older files keep no key)
        kept = {
            c["key"]: c["ref_logp"] for c in (read_jsonl(cache) if cache.exists() and not force else []) if "key" in c
        }
        todo = [j for j, key in enumerate(keys) if key not in kept]
        if todo:
            if model is None:
                model = load_model(reference, trainable=False, device=resolve_device(device))
            values = _summed(
                model,
                renderer.pad_id,
                [prompts[j] for j in todo],
                [responses[j] for j in todo],
                batch_size,
                desc=f"KL {row.name}",
            )
            kept.update((keys[j], value) for j, value in zip(todo, values))
            write_jsonl(cache, [{"name": row.name, "key": key, "ref_logp": kept[key]} for key in keys])
        for record, key in zip(records, keys):
            record["ref_logp"] = kept[key]
    results = [
        row_stats(r.name, data[r.name], data.get(r.baseline or baseline), n_boot, seed, num_examples, r.kl)
        | {"baseline": r.baseline or baseline}
        | ({"per_prompt": per_prompt_values(data[r.name])} if per_prompt else {})
        for r in rows
    ]
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    say("evaluate", f"wrote {out}")
    if wandb_project:
        log_to_wandb(results, wandb_project, wandb_entity, wandb_name, wandb_dir or str(Path(out).parent))
    return Path(out)


TABLE_KEY, PLOT_KEY = "evaluate/results", "evaluate/reward_vs_kl"
"""Where `wspo evaluate` logs its table and its gold-reward-vs-KL plot in a W&B run."""
TABLE_COLUMNS = ["row", "gold_reward", "ci_low", "ci_high", "kl", "diff_vs_baseline", "mean_length", "distinct_2", "n"]


def log_to_wandb(results: list[dict], project: str, entity: str | None, name: str | None, save_dir: str) -> str:
    """One W&B run holding the results table (`TABLE_KEY`) and a scatter of gold reward against KL
    (`PLOT_KEY`; rows without a KL, such as searches, are left out of it). Returns the run's folder."""
    import wandb

    rows = [
        [
            r["name"],
            r["gold_reward_mean"],
            *r["gold_reward_ci"],
            r["kl"],
            r.get("diff_vs_baseline"),
            r["mean_length"],
            r["distinct_2"],
            r["n"],
        ]
        for r in results
    ]
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=project, entity=entity, name=name or "evaluate", dir=save_dir, job_type="evaluate")
    table = wandb.Table(columns=TABLE_COLUMNS, data=rows)
    with_kl = wandb.Table(columns=TABLE_COLUMNS, data=[row for row in rows if row[4] is not None])
    run.log({TABLE_KEY: table, PLOT_KEY: wandb.plot.scatter(with_kl, "kl", "gold_reward", title="gold reward vs KL")})
    folder = run.dir
    run.finish()
    say("evaluate", f"logged the table and the reward-vs-KL plot to W&B ({project})")
    return folder


def main(argv: list[str] | None = None) -> int:
    return run_function(evaluate, argv, "wspo evaluate")
