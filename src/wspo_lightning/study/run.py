"""The study's run, one seed: a fair weak-to-strong comparison along reward-vs-KL frontiers.

    prompt sets: train, tuning, test, no title or premise in two of them            (data.py)
    the strong base's own samples on the train prompts -> gold reward -> pairs      = the one preference dataset
    weak base (distilled, the demo's) -> its DPO on those pairs                     = the weak pair
    tuning prompts: each training method at its anchor x every learning rate -> the rate (wspo_lightning.protocol)
                    each method's sweep at its rate -> the demo's points
                    ExPO of the WSPO and DPO anchors x alphas -> the alphas kept
    (option) the former design: pairs of the weak base's own samples, its own weak DPO, WSPO and DPO on them
    test prompts, read once, by the final evaluation: the strong base, every sweep, ExPO, the former design,
        proxy sampling, best-of-N and CBS at rising budgets
    -> results.json, matched_kl.json, frontier.png, study.md, W&B                   (report.py)

`run_study` runs the phases in that order. Every stage writes its output whole or not at all and skips itself when
it exists, and a point's model is made only when one of its samplings is missing: a run killed at any point and
rerun ends as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from wspo_lightning import protocol
from wspo_lightning.decoding.methods import METHODS
from wspo_lightning.demo.run import VADER, open_run, resolve_precision
from wspo_lightning.demo.strong import strong_model_dir
from wspo_lightning.models import ModelSpec
from wspo_lightning.pipeline.evaluate import EvalRow, evaluate
from wspo_lightning.pipeline.stage import say, write_json
from wspo_lightning.rewards import Reward
from wspo_lightning.study import data, decode, report
from wspo_lightning.study.budget import plan_text
from wspo_lightning.study.points import BASE, Point, expo, sample_point, trained
from wspo_lightning.study.seedrun import StudyRun
from wspo_lightning.study.settings import PRESETS, TRAINED, StudySettings


def start(out: str, s: StudySettings, force: bool, cache_dir: str | None, strong: str | None, reward: Any) -> StudyRun:
    """The seed's run in `out/seed<seed>`: settings saved, precision, timer, the strong model, the prompt sets."""
    root = Path(out) / f"seed{s.seed}"
    precision = resolve_precision(s.demo())
    timer = open_run(root, s.as_dict(), precision, force, "study")
    say("study", plan_text(s, precision))
    with timer("strong model"):
        strong_dir = Path(strong) if strong else strong_model_dir(cache_dir)
    sets = Path(out) / "data"
    data.write_prompt_sets(sets, s.n_train_prompts, s.n_tuning_prompts, s.n_test_prompts, s.prompt_seed)
    return StudyRun(s, root, sets, precision, timer, strong_dir, reward, force)


def evaluate_round(run: StudyRun, name: str, split: str, files: dict[Point, Path]) -> dict[Point, dict]:
    """`wspo evaluate` of the points' scored samples against the strong base (KL, paired differences, values per
    prompt) into `eval/<name>.json`; each row is kept in `run.rows`."""
    out = run.eval / f"{name}.json"
    rows = [EvalRow(p.name, str(f)) for p, f in files.items()]
    with run.timer(f"evaluate {name}"):
        reference = ModelSpec(str(run.strong), dtype=run.precision.dtype)
        evaluate(rows, reference, str(out), baseline=BASE.name, n_boot=run.s.n_boot, per_prompt=True, force=run.force)
    found = {r["name"]: r for r in json.loads(out.read_text())}
    evaluated = {p: found[p.name] for p in files}
    run.rows.update({(p, split): row for p, row in evaluated.items()})
    return evaluated


def tuning_round(run: StudyRun, name: str, points: list[Point]) -> dict[Point, dict]:
    """The strong base and `points` sampled on the tuning prompts and evaluated."""
    prompts = data.prompts(run.prompt_sets, "tuning")
    todo = [BASE, *points]
    files = {p: sample_point(run, p, prompts, "tuning") for p in tqdm(todo, desc=f"study: {name}", unit="point")}
    return evaluate_round(run, name, "tuning", files)


def _summaries(rows: dict[Point, dict], points: list[Point], by_lr: bool = False) -> list[dict]:
    """Tuning summaries for a rule: each candidate's `value` (its strength, or with `by_lr` its learning rate),
    gold reward and KL."""
    keys = ("gold_reward_mean", "kl")
    return [{"value": p.lr if by_lr else p.value, **{k: rows[p][k] for k in keys}} for p in points]


def _drop_models(run: StudyRun, points: list[Point]) -> None:
    """Remove the models of points no later phase samples (their tuning samples stay)."""
    for p in points:
        if (run.models / p.name).exists():
            shutil.rmtree(run.models / p.name)


def choose_learning_rates(run: StudyRun) -> dict[str, float]:
    """Each training method at its anchor with every candidate learning rate, on the tuning prompts; the rule
    (`protocol.choose_learning_rate`) picks one per method; the other candidates' models are removed."""
    s = run.s
    candidates = {m: [trained(m, s.anchor_value(m), lr) for lr in s.learning_rates] for m in TRAINED}
    rows = tuning_round(run, "tuning_lr", [p for points in candidates.values() for p in points])
    summaries = {m: _summaries(rows, points, by_lr=True) for m, points in candidates.items()}
    chosen = {m: protocol.choose_learning_rate(summaries[m], s.lr_kl_cap) for m in TRAINED}
    write_json(
        run.protocol / "learning_rate.json",
        {"rule": protocol.RULES["learning_rate"], "cap": s.lr_kl_cap, "chosen": chosen, "candidates": summaries},
    )
    _drop_models(run, [p for m, points in candidates.items() for p in points if p.lr != chosen[m]])
    return chosen


def sweeps(run: StudyRun, lr: dict[str, float]) -> list[Point]:
    """Every training method swept over its strength at its learning rate, on the tuning prompts; the demo's points
    are chosen from them (`protocol.choose_demo_points`)."""
    s = run.s
    grid = {m: [trained(m, v, lr[m]) for v in s.grid(m)] for m in TRAINED}
    rows = tuning_round(run, "tuning_sweeps", [p for points in grid.values() for p in points])
    summaries = {m: _summaries(rows, points) for m, points in grid.items()}
    chosen = protocol.choose_demo_points(summaries, s.demo_kl_cap)
    write_json(run.protocol / "demo.json", {"rule": protocol.RULES["demo"], "cap": s.demo_kl_cap, "chosen": chosen})
    lr_candidates = json.loads((run.protocol / "learning_rate.json").read_text())["candidates"]
    chosen_by = f"wspo study, seed {s.seed}, tuning prompts ({s.n_tuning_prompts}): {protocol.RULES['demo']}"
    record = protocol.demo_record(chosen_by, s.lr_kl_cap, lr_candidates, s.demo_kl_cap, summaries)
    write_json(run.protocol / "demo_settings.json", record)  # the demo's defaults: src/wspo_lightning/demo/chosen.json
    return [p for points in grid.values() for p in points]


def choose_expo(run: StudyRun, lr: dict[str, float]) -> list[Point]:
    """ExPO of the WSPO and DPO anchors at every candidate alpha, on the tuning prompts; the rule
    (`protocol.choose_expo_alphas`) keeps a few per anchor for the test split; the others' models are removed."""
    s = run.s
    candidates = {m: [expo(trained(m, s.anchor_value(m), lr[m]), a) for a in s.expo_alphas] for m in ("wspo", "dpo")}
    rows = tuning_round(run, "tuning_expo", [p for points in candidates.values() for p in points])
    kept = {m: protocol.choose_expo_alphas(_summaries(rows, ps), s.kl_cap, s.expo_keep) for m, ps in candidates.items()}
    write_json(run.protocol / "expo.json", {"rule": protocol.RULES["expo"], "cap": s.kl_cap, "kept": kept})
    _drop_models(run, [p for m, points in candidates.items() for p in points if p.value not in kept[m]])
    return [p for m, points in candidates.items() for p in points if p.value in kept[m]]


def old_design_points(run: StudyRun, lr: dict[str, float]) -> list[Point]:
    """The former design's data and weak pair (made now); its WSPO and DPO points, fitted at the learning rates
    chosen for WSPO and DPO on the fluent data, are trained when the final evaluation samples them."""
    if not run.s.old_design:
        return []
    data.old_design(run)
    points = [trained("wspo-own", g, lr["wspo"]) for g in run.s.old_wspo_gammas]
    return points + [trained("dpo-own", b, lr["dpo"]) for b in run.s.old_dpo_betas]


def final_evaluation(run: StudyRun, points: list[Point]) -> dict[Point, dict]:
    """The test split, read here once: the strong base, `points` and the decoding points, sampled and evaluated."""
    prompts = data.test_prompts(run.prompt_sets)
    todo = [BASE, *points]
    files = {p: sample_point(run, p, prompts, "test") for p in tqdm(todo, desc="study: test", unit="point")}
    files.update(decode.decode_points(run, prompts))
    return evaluate_round(run, "test", "test", files)


def write_reports(run: StudyRun) -> list[dict]:
    """The seed's results (tuning and test points), report and W&B run; the trained models are removed unless
    `keep_models`."""
    s = run.s
    results, frontier_points = [], []
    for (point, split), row in run.rows.items():
        method = METHODS.get(point.method)  # a decoding point's KL bound, where its method has one
        bound = method.kl_bound(int(point.value)) if method is not None else None
        result, frontier_point = report.point_record(point, split, s.seed, row, s.n_boot, bound)
        results.append(result)
        frontier_points.append(frontier_point)
    chosen = {
        name: json.loads((run.protocol / f"{name}.json").read_text()) for name in ("learning_rate", "expo", "demo")
    }
    with run.timer("report"):
        report.seed_report(run.root, s.seed, results, frontier_points, chosen, s)
        report.log_to_wandb(run.root, s.seed, results)
    if not s.keep_models:
        _drop_models(run, [p for p, _ in run.rows if p.method != "base"])
    return results


def run_study(
    out: str = "study_out",
    quick: bool = False,
    force: bool = False,
    cache_dir: str | None = None,
    strong: str | None = None,
    reward: str | dict[str, Any] | Reward = VADER,
    settings: StudySettings | None = None,
) -> list[dict]:
    """Run (or resume) one seed of the study in `out/seed<seed>`, then rewrite the summary over every finished
    seed (`out/study.md`, `out/results.json`, `out/matched_kl.json`, `out/frontier.png`); returns the seed's
    results.

    Args:
        out: the study's folder; each seed's data, models, samples and logs are under `out/seed<seed>`.
        quick: the small preset (a smoke test); ignored when `settings` is given.
        force: redo every stage of this seed, even those whose outputs exist.
        cache_dir: where the converted strong model is kept (default ~/.cache/wspo-lightning).
        strong: a strong model folder to use instead of SmolLM2-135M-Instruct (tests pass a tiny random model).
        reward: gold reward: `vader`, `rm:PATH`, the import path of a reward class, a class_path / init_args block,
            or an instance (see `wspo_lightning.rewards`).
        settings: sizes, grids and rules (default: the preset); `--settings.seed` picks the seed.
    """
    os.environ.setdefault("WANDB_MODE", "offline")  # W&B runs land in the seed's folder, nothing is sent
    s = settings or PRESETS["quick" if quick else "full"]
    run = start(out, s, force, cache_dir, strong, reward)
    data.fluent_pairs(run)
    data.weak_pair(run)
    lr = choose_learning_rates(run)
    points = sweeps(run, lr)
    points += choose_expo(run, lr)
    points += old_design_points(run, lr)
    final_evaluation(run, points)
    results = write_reports(run)
    report.summary(Path(out))
    minutes = (time.perf_counter() - run.timer.start) / 60
    say("study", f"seed {s.seed} done in {minutes:.1f} min (all stages: {run.timer.total / 60:.1f} min)")
    return results
