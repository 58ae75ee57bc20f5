"""The study's outputs per seed: results.json (every evaluated point), points.json (their per-prompt values),
matched_kl.json, frontier.png, study.md and a W&B run; and, over the finished seeds, the top-level results.json,
matched_kl.json, frontier.png and study.md with the spread. Every verdict sentence comes from
`wspo_lightning.verdicts.verdict`, decided by an interval alone."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import numpy as np

from wspo_lightning.demo.spread import spread_table
from wspo_lightning.pipeline.evaluate import bootstrap_ci
from wspo_lightning.pipeline.stage import say, write_json
from wspo_lightning.study.decode import EQUAL_BUDGET
from wspo_lightning.study.frontier import matched_kl, plot_frontier, point_summary
from wspo_lightning.study.points import LABELS, Point
from wspo_lightning.verdicts import verdict

MATCHED = ("wspo", "dpo", "ipo", "sft", "expo-wspo", "expo-dpo", "wspo-own", "dpo-own", "proxy", "bon")
"""Methods placed on the matched-KL table (every one with a KL estimate or bound); CBS has neither."""


def point_record(point: Point, split: str, seed: int, row: dict, n_boot: int, kl_bound: float | None) -> tuple:
    """(the results.json entry, the frontier point) of one evaluated point: `row` is its `wspo evaluate` row
    (with `per_prompt`); reward and KL intervals resample prompts (`frontier.point_summary`)."""
    per_prompt = row["per_prompt"]
    frontier_point = {
        "method": point.method,
        "knob": point.knob,
        "value": point.value,
        "reward": per_prompt["reward"],
        "kl": per_prompt["kl"],
    }
    if kl_bound is not None:
        frontier_point["kl_bound"] = kl_bound
    summary = point_summary(frontier_point, n_boot, seed=0)
    result = {
        "name": point.label,
        "method": point.method,
        "knob": point.knob,
        "value": point.value,
        "learning_rate": point.lr,
        "split": split,
        "seed": seed,
        "gold_reward_mean": summary["gold_reward_mean"],
        "gold_reward_ci": summary["gold_reward_ci"],
        "kl": summary["kl"],
        "kl_ci": summary["kl_ci"],
        "kl_source": summary["kl_source"],
        "mean_length": row["mean_length"],
        "distinct_2": row["distinct_2"],
        "top_word": row["top_word"],
        "diff_vs_baseline": row["diff_vs_baseline"],
        "diff_vs_baseline_ci": row["diff_vs_baseline_ci"],
        "baseline": LABELS["base"],
        "extrapolates": point.extrapolates.label if point.extrapolates else None,
        "n": row["n"],
    }
    return result, {**frontier_point, "split": split, "name": point.name}


def by_method(points: list[dict], split: str, methods: tuple[str, ...] | None = None) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for p in points:
        if p["split"] == split and (methods is None or p["method"] in methods):
            grouped.setdefault(p["method"], []).append(p)
    return grouped


def _fmt(x: float | None, ci: list[float] | None = None, digits: int = 3) -> str:
    if x is None:
        return "-"
    text = f"{x:+.{digits}f}"
    return text + (f" [{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]" if ci else "")


def _kl(r: dict) -> str:
    if r["kl"] is None:
        return "n/a (selection)"
    if r["kl_source"] == "bound":
        return f"<= {r['kl']:.2f} (bound)"
    return f"{r['kl']:.2f} [{r['kl_ci'][0]:.2f}, {r['kl_ci'][1]:.2f}]"


def points_table(results: list[dict]) -> str:
    columns = ["point", "gold reward (95% CI)", "vs strong base (95% CI)", "KL to strong base", "length"]
    columns += ["distinct-2", "top word"]
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for r in results:
        word, share = r["top_word"]
        lines.append(
            f"| {r['name']} | {_fmt(r['gold_reward_mean'], r['gold_reward_ci'])} | "
            f"{_fmt(r['diff_vs_baseline'], r['diff_vs_baseline_ci'])} | {_kl(r)} | {r['mean_length']:.1f} | "
            f"{r['distinct_2']:.2f} | {word} ({share:.0%}) |"
        )
    return "\n".join(lines)


def matched_table(matched: dict) -> str:
    targets = matched["targets"]
    lines = ["| method | " + " | ".join(f"KL {t:g}" for t in targets) + " | KL range of its frontier |"]
    lines.append("|---" * (len(targets) + 2) + "|")
    for method, values in matched["methods"].items():
        cells = [_fmt(a["gold_reward"], a["ci"]) for a in values["at"]]
        span = values["kl_range"]
        lines.append(
            f"| {LABELS.get(method, method)} | "
            + " | ".join(cells)
            + f" | {'-' if span is None else f'{span[0]:.2f} .. {span[1]:.2f}'} |"
        )
    for method, rows in matched["diff_vs_baseline"].items():
        cells = [_fmt(r["diff"], r["ci"]) for r in rows]
        lines.append(f"| WSPO minus {LABELS.get(method, method)} | " + " | ".join(cells) + " | |")
    return "\n".join(lines)


def matched_verdicts(matched: dict) -> list[str]:
    """One sentence per method and KL target where both frontiers reach it; a list of where they do not."""
    out, outside = [], []
    for method, rows in matched["diff_vs_baseline"].items():
        name = LABELS.get(method, method)
        missing = [f"{r['kl_target']:g}" for r in rows if r["diff"] is None or r["ci"] is None]
        if missing:
            outside.append(f"{name} at {', '.join(missing)}")
        for r in rows:
            if r["diff"] is not None and r["ci"] is not None:
                note = f"{r['kept_draws']} of {matched['n_boot']} bootstrap draws inside both KL ranges"
                what = f"WSPO at {r['kl_target']:g} nats"
                out.append("- " + verdict(r["diff"], r["ci"], what=what, against=f"{name} at the same KL", note=note))
    if outside:
        out.append("- No comparison where WSPO's frontier or the other's does not reach the KL: " + "; ".join(outside))
    return out


def budget_verdicts(frontier_points: list[dict]) -> list[str]:
    """CBS against best-of-N at each equal budget N, paired by prompt on the test split."""
    test = {(p["method"], p["value"]): np.asarray(p["reward"]) for p in frontier_points if p["split"] == "test"}
    out = []
    for (method, n), rewards in sorted(test.items()):
        other = EQUAL_BUDGET.get(method)
        if (other, n) not in test:
            continue
        diffs = rewards - test[(other, n)]  # [prompts]
        ci = bootstrap_ci([np.array([d]) for d in diffs])
        what, against = f"{LABELS[method]} at N={n:g}", f"{LABELS[other]} at N={n:g}"
        out.append("- " + verdict(float(diffs.mean()), ci, what=what, against=against))
    return out


def _rule(choice: dict) -> str:
    return f"{choice['rule']}; cap {choice['cap']:g} nats"


def seed_report(root: Path, seed: int, results: list[dict], frontier_points: list[dict], protocol: dict, s) -> str:
    """Write the seed's results.json, points.json, matched_kl.json, frontier.png and study.md; return study.md."""
    write_json(root / "results.json", results)
    write_json(root / "points.json", frontier_points)
    test_points = by_method(frontier_points, "test")
    matched = matched_kl(by_method(frontier_points, "test", MATCHED), s.matched_kls, "wspo", s.n_boot, seed=0)
    write_json(root / "matched_kl.json", matched)
    title = f"Gold reward vs KL, test prompts, seed {seed}"
    plot_frontier(test_points, root / "frontier.png", title, n_boot=s.n_boot)
    test = [r for r in results if r["split"] == "test"]
    lr_lines = [f"- {LABELS[m]}: {lr:g}" for m, lr in protocol["learning_rate"]["chosen"].items()]
    expo_lines = [f"- {LABELS['expo-' + m]}: alphas {alphas}" for m, alphas in protocol["expo"]["kept"].items()]
    demo_lines = [
        f"- {LABELS[m]}: {p['value']:g} (tuning gold reward {p['gold_reward_mean']:+.3f}, KL {p['kl']:.2f})"
        for m, p in protocol["demo"]["chosen"].items()
    ]
    text = [
        f"## Seed {seed}",
        "",
        "### Choices made on the tuning prompts",
        "",
        f"Learning rate ({_rule(protocol['learning_rate'])}):",
        *lr_lines,
        "",
        f"ExPO ({_rule(protocol['expo'])}):",
        *expo_lines,
        "",
        f"The demo's points ({_rule(protocol['demo'])}):",
        *demo_lines,
        "",
        "### Gold reward at matched KL (test prompts)",
        "",
        "Each method's upper frontier, interpolated linearly between neighbouring points; null outside the KL range "
        "its sweep covers. Intervals: paired bootstrap over prompts (95%).",
        "",
        matched_table(matched),
        "",
        *matched_verdicts(matched),
        "",
        "### Search at equal budget (test prompts)",
        "",
        *budget_verdicts(frontier_points),
        "",
        "### Every test point",
        "",
        points_table(test),
        "",
    ]
    report = "\n".join(text)
    (root / "study.md").write_text(report)
    return report


def summary(out: Path) -> None:
    """The top-level outputs over every finished seed folder: results.json (all points), matched_kl.json (per seed),
    frontier.png (the first seed's) and study.md (the spread over seeds, then each seed's section)."""
    seeds = sorted((f for f in out.glob("seed*") if (f / "study.md").exists()), key=lambda f: int(f.name[4:]))
    if not seeds:
        return
    results = [r for f in seeds for r in json.loads((f / "results.json").read_text())]
    write_json(out / "results.json", results)
    write_json(out / "matched_kl.json", {f.name[4:]: json.loads((f / "matched_kl.json").read_text()) for f in seeds})
    shutil.copyfile(seeds[0] / "frontier.png", out / "frontier.png")
    text = ["# The weak-to-strong study", ""]
    if len(seeds) > 1:
        runs = [(f, {"seed": int(f.name[4:])}, [r for r in results if r["seed"] == int(f.name[4:])]) for f in seeds]
        # a point is the same across seeds whatever learning rate each seed's rule chose
        test_runs = [(f, setting, [_by_setting(r) for r in rows if r["split"] == "test"]) for f, setting, rows in runs]
        text += ["## Spread over seeds (test prompts)", "", spread_table(test_runs), "", _matched_spread(seeds), ""]
    for f in seeds:
        text += [(f / "study.md").read_text(), f"![gold reward vs KL, {f.name}]({f.name}/frontier.png)", ""]
    (out / "study.md").write_text("\n".join(text))
    say("study", f"report in {out / 'study.md'} ({len(seeds)} seed(s))")


def _by_setting(result: dict) -> dict:
    """The result named by its method and strength alone (ExPO: and the method it extrapolates)."""
    name = f"{LABELS.get(result['method'], result['method'])} {result['knob']}={result['value']:g}"
    return {**result, "name": LABELS["base"] if result["method"] == "base" else name}


def _matched_spread(seeds: list[Path]) -> str:
    """WSPO minus each method at each matched KL, per seed with its interval, their mean and range."""
    per_seed = [json.loads((f / "matched_kl.json").read_text())["diff_vs_baseline"] for f in seeds]
    head = "| WSPO minus, at KL | " + " | ".join(f"{f.name}" for f in seeds) + " | mean | min .. max |"
    lines = [head, "|---" * (len(seeds) + 3) + "|"]
    for method, rows in per_seed[0].items():
        for j, row in enumerate(rows):
            cells = [(d[method][j]["diff"], d[method][j]["ci"]) if method in d else (None, None) for d in per_seed]
            seen = [c[0] for c in cells if c[0] is not None]
            middle = " | ".join(_fmt(x, ci) for x, ci in cells)
            stats = f"{_fmt(statistics.fmean(seen))} | {_fmt(min(seen))} .. {_fmt(max(seen))}" if seen else "- | -"
            lines.append(f"| {LABELS.get(method, method)}, {row['kl_target']:g} | {middle} | {stats} |")
    return "\n".join(lines)


WANDB_COLUMNS = ["point", "method", "knob", "value", "gold_reward", "ci_low", "ci_high", "kl", "diff_vs_base"]


def log_to_wandb(root: Path, seed: int, results: list[dict]) -> None:
    """One W&B run (project wspo-study, offline unless configured) with the test points' table, a gold reward vs KL
    scatter and the frontier PNG, as `wspo evaluate --wandb_project` logs its table. Once per seed folder."""
    marker = root / "wandb_logged.json"
    if marker.exists():
        return
    import wandb

    rows = [
        [r["name"], r["method"], r["knob"], r["value"], r["gold_reward_mean"], *r["gold_reward_ci"], r["kl"]]
        + [r["diff_vs_baseline"]]
        for r in results
        if r["split"] == "test"
    ]
    run = wandb.init(project="wspo-study", name=f"study-seed{seed}", dir=str(root), job_type="study")
    table = wandb.Table(columns=WANDB_COLUMNS, data=rows)
    with_kl = wandb.Table(columns=WANDB_COLUMNS, data=[row for row in rows if row[7] is not None])
    run.log(
        {
            "study/points": table,
            "study/reward_vs_kl": wandb.plot.scatter(with_kl, "kl", "gold_reward", title="gold reward vs KL"),
            "study/frontier": wandb.Image(str(root / "frontier.png")),
        }
    )
    folder = run.dir
    run.finish()
    write_json(marker, {"run_dir": folder})
