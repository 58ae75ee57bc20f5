"""The demo's report: `report.md` (table, verdicts, examples), PNG plots, resolved fit configs."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from wspo_lightning.io import read_jsonl
from wspo_lightning.pipeline.evaluate import EvalRow, paired_difference
from wspo_lightning.verdicts import direction, fmt_ci, verdict

WEAK_MODEL_NOTE = (
    "The weak model keeps decoder layers {layers} of SmolLM2-135M-Instruct's 30 (with its embeddings, final "
    "norm and tied lm_head) and is distilled on the strong model's own answers to the training prompts: "
    "top-32 soft targets plus the next-token loss, embeddings frozen (`wspo_lightning.pipeline.distill`). "
    "It shares the strong tokenizer by construction, so token-level WSPO applies, and it is genuinely "
    "smaller. Keeping the last layer beside the first ones starts it much closer to the strong model than "
    "the first layers alone. Its text is far poorer than the strong model's (see its KL and examples), but "
    "the *change* DPO makes to it (weak aligned - weak base) carries the sentiment signal, which is all "
    "WSPO uses."
)


DECODING_NOTE = (
    "No training of the strong model: the same weak pair steers it while it decodes (`wspo generate`). "
    "Proxy / EFT sampling draws each token from log p_strong + {proxy_alpha} * (log p_weak_aligned - "
    "log p_weak_base), untempered; its KL is estimated from the exact log-likelihood of that sampler. The search "
    "rows use the weak-to-strong search paper's sampler (temperature {search_temperature}, top-k {search_top_k}) and "
    "are compared with the strong base sampled the same way: best-of-N keeps the best of N = W x K samples by the "
    "weak log-ratio; chunk-level beam search keeps W={cbs_beam_width} beams, samples K={cbs_continuations} "
    "continuations of L={cbs_chunk_length} tokens from each, and keeps the W with the highest weak log-ratio summed "
    "over the response so far. A selection has no tractable likelihood, so their KL is not estimated."
)

ONE_SEED = (
    "One run is one draw of the whole pipeline: the weak model's samples, its pairs, the training order and the "
    "evaluation samples all follow one seed. The intervals cover the evaluation prompts and responses, not the "
    "variation from one pipeline to the next (a different weak pair can be a better or a worse teacher). "
    "`make demo-seeds` runs two more seeds on the same held-out prompts and `wspo demo-spread` tabulates the "
    "spread; the README gives it."
)


def _fmt_kl(row: dict) -> str:
    if row["kl"] is not None:
        return f"{row['kl']:.2f}"
    return "n/a (other model)" if row.get("kl_skipped") == "another model" else "n/a (selection)"


def markdown_table(results: list[dict]) -> str:
    head = (
        "| row | gold reward (95% CI) | vs its baseline (95% CI) | baseline | KL to strong base | length "
        "| distinct-2 | top word (share) | n |\n|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in results:
        diff = f"{r['diff_vs_baseline']:+.3f} {fmt_ci(r['diff_vs_baseline_ci'])}" if "diff_vs_baseline" in r else ""
        word, share = r.get("top_word", ["", 0.0])
        lines.append(
            f"| {r['name']} | {r['gold_reward_mean']:+.3f} {fmt_ci(r['gold_reward_ci'])} | {diff} "
            f"| {r.get('baseline') or ''} | {_fmt_kl(r)} | {r['mean_length']:.1f} "
            f"| {r.get('distinct_2', float('nan')):.2f} | {word} ({share:.0%}) | {r['n']} |"
        )
    return "\n".join(lines)


def _versus(r: dict) -> str:
    kl = "" if r["kl"] is None else f"at KL {r['kl']:.2f} nats"
    against = f"the {r.get('baseline') or 'strong base'}"
    return "- " + verdict(r["diff_vs_baseline"], r["diff_vs_baseline_ci"], f"**{r['name']}**", against, kl)


def _amplification(r: dict, diff: float, ci: list[float], kept: bool, base: dict) -> str:
    """Whether a WSPO row amplifies: above the weak aligned model by its interval, within the KL and
    diversity bounds (`kept`)."""
    side = direction(ci)
    meaning = (
        "it amplifies"
        if side == "above" and kept
        else "outside the KL / diversity bounds, so no amplification is claimed"
        if side == "above"
        else "it does not amplify"
        if side == "below"
        else "no amplification is shown"
    )
    bounds = f"KL {r['kl']:.2f}, distinct-2 {r.get('distinct_2', 0):.2f} vs the base's {base.get('distinct_2', 0):.2f}"
    return "- " + verdict(diff, ci, f"**{r['name']}**", "the weak aligned model", f"{bounds}: {meaning}")


def baselines_note(settings: dict) -> str:
    """How the strong fits were set: one schedule for all, each method's learning rate and strength, and where they
    were chosen."""
    lr, gamma = settings["strong_learning_rates"], settings["gammas"][0]
    return (
        "Every strong fit follows one rule: the same pairs, 10% warm-up then cosine decay, "
        f"{settings['strong_epochs']} epoch(s) at batch size {settings['strong_batch_size']}, embeddings frozen; "
        f"each method at its own learning rate and strength: WSPO gamma {gamma:g} (lr {lr['wspo']:g}), DPO beta "
        f"{settings['strong_dpo_beta']:g} (lr {lr['dpo']:g}), SFT {settings['sft_epochs']:g} x the epochs "
        f"(lr {lr['sft']:g}). Chosen by: {settings['chosen_by']}. WSPO and SFT train on the chosen responses, DPO on "
        "both; SFT asks whether WSPO's gain is more than fine-tuning on positive text. The sign control is WSPO at "
        f"gamma {gamma:g} with the weak pair swapped (delta_weak changes sign, the training text stays)."
    )


def pairs_note(settings: dict) -> str:
    """Where the preference pairs come from, and what the weak aligned model learned on."""
    n, k = settings["preference_samples"], settings["train_top_k"]
    if settings["data_design"] == "fluent":
        source = f"the strong base's own samples ({n} per training prompt, top-k {k}; no trained model wrote them)"
    else:
        source = f"the weak base's own samples ({n} per training prompt, top-k {k}; the former design)"
    return (
        f"The preference pairs are best vs worst by the gold reward (ties dropped) among {source}. The weak aligned "
        "model is the weak base after this framework's DPO of all its parameters on them, and every strong fit "
        "trains on them."
    )


def verdicts(results: list[dict], rows: list[EvalRow], max_kl: float = 5.0) -> list[str]:
    """Plain sentences, reported either way, every above / below from an interval (`wspo_lightning.verdicts`):
    each strong row against its baseline; which WSPO rows stay within `max_kl` nats (none is picked as best:
    these are the evaluation prompts); the sign control against the strong base; whether a WSPO row beats the
    weak aligned model (amplification) within `max_kl` and with distinct-2 at least 0.8x the strong base's."""
    by_name = {r["name"]: r for r in results}
    samples = {row.name: read_jsonl(row.samples) for row in rows}
    lines = [_versus(r) for r in results if r["name"].startswith("strong + ") and "diff_vs_baseline" in r]
    wspo = [r for r in results if "WSPO" in r["name"] and "sign control" not in r["name"] and r["kl"] is not None]
    within = [r for r in wspo if r["kl"] <= max_kl]
    if within:
        names = ", ".join(f"**{r['name']}**" for r in within)
        lines += [
            "",
            f"WSPO rows within {max_kl:g} nats of KL: {names} ({len(within)} of {len(wspo)}). Each row's verdict "
            "is its sentence above, from its interval; none is picked as the best on these evaluation prompts.",
        ]
    elif wspo:
        closest = min(wspo, key=lambda r: r["kl"])
        lines += [
            "",
            f"No WSPO row stays within {max_kl:g} nats of KL: the closest, **{closest['name']}**, is at "
            f"{closest['kl']:.2f} (its verdict is above).",
        ]
    for r in results:
        if "sign control" in r["name"] and "diff_vs_baseline" in r:
            ci = r["diff_vs_baseline_ci"]
            meaning = {
                "below": " The effect follows the weak pair's signal, not the training text.",
                "above": " The swap did not reverse the effect: it does not follow the weak pair's signal.",
                "not distinguishable": " Its direction is not established at this sample size.",
            }[direction(ci)]
            against = f"the {r.get('baseline') or 'strong base'}"
            lines.append(verdict(r["diff_vs_baseline"], ci, "the sign control", against) + meaning)
    base = by_name.get("strong base")
    if "weak aligned" in by_name and base is not None:
        for r in wspo:
            diff, ci = paired_difference(samples[r["name"]], samples["weak aligned"])
            kept = r["kl"] <= max_kl and r.get("distinct_2", 0) >= 0.8 * base.get("distinct_2", 0)
            lines.append(_amplification(r, diff, ci, kept, base))
    return lines


def _metrics(csv_path: Path) -> dict[str, list[tuple[int, float]]]:
    """Logged series of a CSVLogger file: name -> [(step, value)]."""
    series: dict[str, list[tuple[int, float]]] = {}
    if not csv_path.exists():
        return series
    for row in csv.DictReader(csv_path.open()):
        step = int(float(row.get("step") or 0))
        for key, value in row.items():
            if key not in ("step", "epoch") and value not in ("", None):
                series.setdefault(key, []).append((step, float(value)))
    return series


def plot_rewards(results: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    names = [r["name"] for r in results][::-1]
    means = [r["gold_reward_mean"] for r in results][::-1]
    errs = [
        [m - r["gold_reward_ci"][0] for m, r in zip(means, results[::-1])],
        [r["gold_reward_ci"][1] - m for m, r in zip(means, results[::-1])],
    ]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(names) + 1.2))
    ax.barh(names, means, xerr=errs, capsize=4, color=["#4c72b0" if "strong" in n else "#dd8452" for n in names])
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("mean gold reward (VADER compound), 95% bootstrap CI")
    ax.set_title("Held-out gold reward per row")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_reward_vs_kl(results: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    # The weak rows sit hundreds of nats away (another model's text): they would squash the strong rows.
    for r in [r for r in results if r["name"].startswith("strong") and r["kl"] is not None]:
        lo, hi = r["gold_reward_ci"]
        m = r["gold_reward_mean"]
        ax.errorbar(r["kl"], m, yerr=[[m - lo], [hi - m]], fmt="o", capsize=3)
        ax.annotate(r["name"], (r["kl"], m), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("KL to the strong base (nats per response, from samples)")
    ax.set_ylabel("mean gold reward")
    ax.set_title("Reward vs KL (strong sampled rows; the rest are in the table)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_training(runs: dict[str, Path], path: Path) -> None:
    """Training loss per step and the validation strong margin (DPO: reward margin) per fit."""
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_margin) = plt.subplots(1, 2, figsize=(11, 4))
    for name, run_dir in runs.items():
        m = _metrics(run_dir / "logs" / "metrics.csv")
        if "train/loss" in m:
            steps, values = zip(*m["train/loss"])
            ax_loss.plot(steps, values, label=name, lw=1)
        margin = m.get("val/rewards/strong_margin") or m.get("val/rewards/margins")
        if margin:
            steps, values = zip(*([(0, 0.0)] + margin))  # policy == reference at step 0: margin 0
            ax_margin.plot(steps, values, marker="o", label=name)
    ax_loss.set(xlabel="optimizer step", ylabel="train/loss", title="Training loss", yscale="log")
    ax_margin.set(
        xlabel="optimizer step",
        ylabel="val strong margin (DPO: rewards/margins)",
        title="Implicit reward margin on validation pairs",
    )
    for ax in (ax_loss, ax_margin):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(root: Path, rows: list[EvalRow], timings: dict[str, float], precision: Any) -> str:
    """Write report.md, plots/*.png and configs/*.yaml into `root`; return the markdown table."""
    results = json.loads((root / "results.json").read_text())
    settings = json.loads((root / "settings.json").read_text())
    plots, configs = root / "plots", root / "configs"
    plots.mkdir(exist_ok=True)
    configs.mkdir(exist_ok=True)
    runs = {d.name: d for d in sorted((root / "runs").iterdir()) if (d / "logs" / "metrics.csv").exists()}
    for name, run_dir in runs.items():
        for source, suffix in ((run_dir / "logs" / "config.yaml", ""), (run_dir / "fit.yaml", ".as_given")):
            if source.exists():
                shutil.copy(source, configs / f"{name}{suffix}.yaml")
    plot_rewards(results, plots / "gold_reward.png")
    plot_reward_vs_kl(results, plots / "reward_vs_kl.png")
    plot_training(runs, plots / "training.png")

    table = markdown_table(results)
    n_prompts = settings["n_eval_prompts" if settings["eval_on"] == "heldout" else "n_tuning_prompts"]
    examples = []
    for r in results:
        examples.append(f"**{r['name']}**\n")
        for e in r.get("examples", []):
            text = e["response"].replace("\n", " ")
            examples.append(f"- ({e['reward']:+.2f}) *{e['prompt']}* -> {text}")
        examples.append("")
    total = sum(timings.values())
    timing_lines = [f"| {k} | {v:.0f} |" for k, v in timings.items()]
    text = "\n".join(
        [
            "# WSPO demo: controlled sentiment (SmolLM2-135M-Instruct, VADER gold reward)",
            "",
            f"Evaluation prompts: {settings['eval_on']} ({n_prompts}), "
            f"{settings['eval_samples']} samples per prompt and row (search rows: {settings['search_samples']} search "
            f"per prompt), up to {settings['max_new_tokens']} new tokens. Sampled rows are untempered (temperature "
            "1, all tokens), so their KL estimates are unbiased.",
            "KL is the mean of log q_row(y|x) - log pi_strong_base(y|x) over the row's samples, q_row being the "
            "distribution each response was drawn from (nats per response); the weak models are other models than "
            "the strong base, so theirs is not estimated. Intervals are bootstrap 95% over prompts; 'vs its "
            "baseline' is the paired difference per prompt.",
            f"Precision of every stage: {precision.dtype} weights, trainer precision {precision.trainer_precision} "
            f"({precision.reason}).",
            "",
            table,
            "",
            "## Verdicts",
            "",
            *verdicts(results, rows),
            "",
            "Reward hacking shows as a high reward with a large KL, a low distinct-2 and one word in most responses "
            "(see the top-word column).",
            "",
            "## What one seed can show",
            "",
            ONE_SEED,
            "",
            "## Baselines",
            "",
            baselines_note(settings),
            "",
            "## Plots",
            "",
            "![gold reward](plots/gold_reward.png)",
            "",
            "![reward vs KL](plots/reward_vs_kl.png)",
            "",
            "![training](plots/training.png)",
            "",
            "## The weak pair",
            "",
            WEAK_MODEL_NOTE.format(layers=settings["weak_layers"]),
            pairs_note(settings),
            "",
            "## Test-time decoding rows",
            "",
            DECODING_NOTE.format(
                **{
                    k: settings.get(k)
                    for k in (
                        "proxy_alpha",
                        "cbs_beam_width",
                        "cbs_continuations",
                        "cbs_chunk_length",
                        "search_temperature",
                        "search_top_k",
                    )
                }
            )
            + (" The last row runs the search over the WSPO model." if settings.get("wspo_cbs") else ""),
            "",
            "## Example completions",
            "",
            *examples,
            "## Files",
            "",
            "- `results.json`: the table as data; `settings.json`: sizes and hyper-parameters",
            "- `configs/`: the resolved config of every fit (`NAME.yaml`) and the config as given "
            "(`NAME.as_given.yaml`)",
            "- `wandb/`: offline W&B runs (`wandb sync wandb/offline-run-*` uploads them); "
            "`runs/*/logs/metrics.csv`: the same metrics as CSV",
            "- `samples/`, `data/`, `models/`: every stage's output (a rerun skips stages whose output exists)",
            "",
            "## Wall time per stage (from the run that did the work)",
            "",
            f"Machine: {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads.",
            "",
            "| stage | seconds |",
            "|---|---|",
            *timing_lines,
            f"| **total** | {total:.0f} |",
            "",
        ]
    )
    (root / "report.md").write_text(text)
    return table
