"""`wspo demo`: the controlled-sentiment experiment, end to end, as a chain of pipeline stages.

    strong model (SmolLM2-135M-Instruct, converted once to safetensors)
      -> sample on train prompts -> distil 4 of its 30 layers      = weak base
      -> weak samples -> gold reward (VADER) -> pairs -> DPO          = weak aligned
      -> frozen roles' log-probs cached once -> WSPO of the strong model per gamma (policy only);
         baselines on the same pairs: DPO, SFT, and WSPO with the weak pair swapped (the sign control)
      -> test-time decoding with the same weak pair: proxy sampling; with the search's own sampler the
         strong base, best-of-N, CBS, and CBS over the WSPO model
      (every row is sampled on the evaluation prompts and scored as soon as its model exists)
      -> evaluate -> report

Every stage writes its output whole or not at all and skips itself when the output exists: a run killed at
any point and rerun ends as an uninterrupted one (--force redoes everything).
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from wspo_lightning.cache.swap import swap_weak_pair
from wspo_lightning.demo.fits import gamma_slug, strong_config, weak_dpo_config, wspo_args
from wspo_lightning.demo.prompts import split_prompts
from wspo_lightning.demo.rows import STRONG_BASE, Rows
from wspo_lightning.demo.settings import PRESETS, DemoSettings
from wspo_lightning.demo.strong import strong_model_dir
from wspo_lightning.hardware import Precision, choose_precision
from wspo_lightning.io import atomic_path, write_jsonl
from wspo_lightning.models import ModelSpec
from wspo_lightning.pipeline.distill import distill
from wspo_lightning.pipeline.evaluate import evaluate
from wspo_lightning.pipeline.fit import fit
from wspo_lightning.pipeline.pairs import pairs
from wspo_lightning.pipeline.sample import sample
from wspo_lightning.pipeline.score import score
from wspo_lightning.pipeline.stage import RUNS, done, say

VADER = "wspo_lightning.rewards.VaderReward"
SEARCH_BASE = "strong base (search sampler)"


def write_json(path: Path, value: Any) -> None:
    """A JSON file written whole or not at all (a kill mid-write leaves the previous one)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(value, indent=2) + "\n")


class Timer:
    """Wall time per stage, saved to `timings.json` as the run goes. A stage skipped in this run
    keeps the time recorded when it last did its work, so the file always describes a whole run."""

    def __init__(self, path: Path, precision: Precision) -> None:
        self.path, self.start, self.precision = path, time.perf_counter(), precision
        self.stages: dict[str, float] = json.loads(path.read_text()).get("stages", {}) if path.exists() else {}

    @contextmanager
    def __call__(self, name: str):
        start, ran = time.perf_counter(), RUNS["ran"]
        yield
        if RUNS["ran"] > ran or name not in self.stages:
            self.stages[name] = round(time.perf_counter() - start, 1)
        this_run = round(time.perf_counter() - self.start, 1)
        write_json(
            self.path,
            {
                "stages": self.stages,
                "total": self.total,
                "this_run": this_run,
                "precision": asdict(self.precision),
                "cpus": os.cpu_count(),
            },
        )

    @property
    def total(self) -> float:
        return round(sum(self.stages.values()), 1)


def resolve_precision(s: DemoSettings) -> Precision:
    """The settings' precision, or the CPU's choice ("auto"); one for every stage of the run."""
    if s.precision == "auto":
        return choose_precision()
    dtype, trainer = ("bfloat16", "bf16-mixed") if s.precision == "bf16" else ("float32", "32-true")
    return Precision(choose_precision().device, dtype, trainer, f"settings.precision={s.precision}")


def precompute_stage(config: dict, cache: Path, run_dir: Path, force: bool) -> None:
    """`wspo precompute` for a fit config into `cache`, skipped when it exists (written aside, renamed when whole)."""
    from wspo_lightning.lightning_cli import precompute

    if done("precompute", cache, force):
        return
    path, command = write_precompute_config(config, run_dir, cache)
    with atomic_path(cache) as tmp:
        precompute(["--config", str(path), f"--model.init_args.cache_dir={tmp}"], command=command)


def write_precompute_config(config: dict, run_dir: Path, cache: Path) -> tuple[Path, str]:
    """Save `config` as `run_dir/precompute.yaml`; return its path and the `wspo precompute` command that
    builds `cache` from it."""
    import yaml

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "precompute.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, f"wspo precompute --config {path} --model.init_args.cache_dir {cache}"


def run_demo(
    out: str = "demo_out",
    quick: bool = False,
    force: bool = False,
    cache_dir: str | None = None,
    strong: str | None = None,
    reward: Any = VADER,
    settings: DemoSettings | None = None,
) -> list[dict]:
    """Run (or resume) the demo in `out` and return the results rows (also in `out/results.json`).

    Args:
        out: report folder; also holds the data, models and logs of every stage.
        quick: the small preset (a few minutes); ignored when `settings` is given.
        force: redo every stage, even those whose outputs exist.
        cache_dir: where the converted strong model is kept (default ~/.cache/wspo-lightning).
        strong: a strong model folder to use instead of SmolLM2-135M-Instruct (its tokenizer must
            have a chat template; tests pass a tiny random model).
        reward: gold reward: import path or instance (see `wspo_lightning.rewards`).
        settings: sizes and hyper-parameters (default: the preset).
    """
    s = settings or PRESETS["quick" if quick else "full"]
    os.environ.setdefault("WANDB_MODE", "offline")  # W&B runs land in out/wandb, nothing is sent
    root = Path(out)
    data, models, samples, runs = (root / d for d in ("data", "models", "samples", "runs"))
    root.mkdir(parents=True, exist_ok=True)
    settings_file = root / "settings.json"
    if settings_file.exists() and json.loads(settings_file.read_text()) != asdict(s) and not force:
        say(
            "demo",
            f"warning: {out} holds outputs made with other settings; stages whose outputs exist are "
            "still skipped. Use --force or another --out to redo them with these settings.",
        )
    write_json(settings_file, asdict(s))
    p = resolve_precision(s)
    say("demo", f"precision: {p.dtype} weights, trainer precision {p.trainer_precision} ({p.reason})")
    timer = Timer(root / "timings.json", p)

    with timer("strong model"):
        strong_dir = Path(strong) if strong else strong_model_dir(cache_dir)
    train, tuning, held_out = split_prompts(s.n_train_prompts, s.n_tuning_prompts, s.n_eval_prompts, seed=s.prompt_seed)
    train_prompts, eval_prompts = data / "prompts_train.jsonl", data / f"prompts_{s.eval_on}.jsonl"
    write_jsonl(train_prompts, train)
    write_jsonl(eval_prompts, held_out if s.eval_on == "heldout" else tuning)
    weak_base, weak_aligned, pairs_file = models / "weak_base", models / "weak_aligned", data / "pairs.jsonl"
    rows = Rows(s, p.dtype, eval_prompts, samples / "eval", (weak_base, weak_aligned), reward, timer, force)
    spec = rows.spec
    training = dict(max_new_tokens=s.max_new_tokens, batch_size=s.sample_batch_size, top_k=s.train_top_k, force=force)

    # 1. Weak base: 4 of the strong model's layers, distilled on its own samples.
    with timer("weak base: strong samples"):
        sample(
            spec(strong_dir),
            str(train_prompts),
            str(samples / "strong_train.jsonl"),
            seed=s.seed,
            limit=s.distill_prompts,
            **training,
        )
    with timer("weak base: distil"):
        distill(
            ModelSpec(str(strong_dir)),
            str(samples / "strong_train.jsonl"),
            str(weak_base),
            layers=s.weak_layers,
            epochs=s.distill_epochs,
            learning_rate=s.distill_learning_rate,
            batch_size=s.batch_size,
            precision=p.trainer_precision,
            seed=s.seed,
            log_dir=str(runs / "distill"),
            force=force,
        )
    rows.sampled("weak base", weak_base, kl=False)

    # 2. Weak aligned: DPO on pairs of weak samples labelled by the gold reward.
    with timer("weak aligned: samples, reward, pairs"):
        weak_samples = samples / "weak_train.jsonl"
        sample(
            spec(weak_base),
            str(train_prompts),
            str(weak_samples),
            num_samples=s.weak_samples,
            seed=s.seed + 1,
            **training,
        )
        score(str(weak_samples), str(samples / "weak_train.scored.jsonl"), reward=reward, force=force)
        pairs(str(samples / "weak_train.scored.jsonl"), str(pairs_file), force=force)
    with timer("weak aligned: DPO"):
        fit(
            weak_dpo_config(s, p.trainer_precision, weak_base, pairs_file, runs / "weak_dpo", root),
            str(weak_aligned),
            str(runs / "weak_dpo"),
            force=force,
        )
    rows.sampled("weak aligned", weak_aligned, kl=False)
    rows.sampled(STRONG_BASE, strong_dir)

    # 3. Strong: WSPO per gamma on the chosen responses. The frozen roles' values (reference log-probs,
    # delta_weak) do not depend on gamma: computed once, every WSPO fit loads only the policy.
    def strong_fit(objective: str, name: str, **model_args) -> Path:
        with timer(f"strong {name}"):
            config = strong_config(
                s, p.trainer_precision, objective, strong_dir, pairs_file, runs / name, root, name, **model_args
            )
            return fit(config, str(models / name), str(runs / name), force=force)

    def frozen_cache(name: str, pair: tuple[Path, Path], gamma: float) -> Path:
        """The frozen roles' cache of WSPO with `pair`: the weak pair swapped (the sign control) is the cache
        of the pair in order with delta_weak negated, derived without a forward pass (`cache.swap`)."""
        config = strong_config(
            s,
            p.trainer_precision,
            "WSPOModule",
            strong_dir,
            pairs_file,
            runs / f"{name}_precompute",
            root,
            name,
            **wspo_args(*pair, gamma, None),  # the values do not depend on gamma
        )
        if pair == (weak_base, weak_aligned):
            precompute_stage(config, data / "wspo_frozen_cache", runs / f"{name}_precompute", force)
            return data / "wspo_frozen_cache"
        cache = data / f"{name}_frozen_cache"
        if not done("precompute", cache, force):
            in_order = frozen_cache(f"{name}_in_order", (weak_base, weak_aligned), gamma)
            _, command = write_precompute_config(config, runs / f"{name}_precompute", cache)
            swap_weak_pair(in_order, cache, command=command)
        return cache

    def wspo(gamma: float, name: str, pair: tuple[Path, Path] = (weak_base, weak_aligned)) -> None:
        with timer(f"strong {name}: precompute frozen roles"):
            cache = frozen_cache(name, pair, gamma)
        strong_fit("WSPOModule", name, **wspo_args(*pair, gamma, cache))

    for gamma in s.gammas:
        name = f"wspo_gamma{gamma_slug(gamma)}"
        wspo(gamma, name)
        rows.sampled(f"strong + WSPO (gamma={gamma:g})", models / name)
    if s.baselines:
        # The sign control: the weak pair swapped, so delta_weak changes sign while the training text stays.
        wspo(1.0, "wspo_gamma1_sign_control", (weak_aligned, weak_base))
        rows.sampled("strong + WSPO (gamma=1, sign control: weak pair swapped)", models / "wspo_gamma1_sign_control")
        strong_fit("DPOModule", "dpo")
        rows.sampled("strong + DPO", models / "dpo")
        strong_fit("SFTModule", "sft")
        rows.sampled("strong + SFT (chosen responses)", models / "sft")

    # 4. Test-time weak-to-strong decoding with the same weak pair: no training of the strong model.
    if s.decoding_rows:
        if s.proxy_row:
            rows.decoded(f"strong + proxy (alpha={s.proxy_alpha:g})", "proxy", strong_dir)
        rows.decoded(SEARCH_BASE, "sample", strong_dir)
        n = s.cbs_beam_width * s.cbs_continuations
        rows.decoded(f"strong + best-of-{n}", "bon", strong_dir, baseline=SEARCH_BASE)
        rows.decoded("strong + CBS", "cbs", strong_dir, baseline=SEARCH_BASE)
        if s.wspo_cbs:
            first = f"wspo_gamma{gamma_slug(s.gammas[0])}"
            rows.decoded(f"strong + WSPO (gamma={s.gammas[0]:g}) + CBS", "cbs", models / first, baseline=SEARCH_BASE)

    # 5. Evaluate: reward intervals, KL to the strong base, diversity, paired differences.
    with timer("evaluate"):
        evaluate(rows.rows, spec(strong_dir), str(root / "results.json"), baseline=STRONG_BASE, force=force)

    # 6. Report: table, verdicts, plots, configs.
    from wspo_lightning.demo.report import write_report

    with timer("report"):
        table = write_report(root, rows.rows, timer.stages, p)
    minutes = (time.perf_counter() - timer.start) / 60
    say("demo", f"done in {minutes:.1f} min (all stages: {timer.total / 60:.1f} min); report in {root / 'report.md'}")
    print(table)
    return json.loads((root / "results.json").read_text())


def main(argv: list[str] | None = None) -> int:
    """`wspo demo [--quick] [--out DIR] [--force] [--settings.KEY VALUE ...]`."""
    from jsonargparse import ArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    preset = PRESETS["quick" if "--quick" in argv or "--quick=true" in argv else "full"]
    parser = ArgumentParser(
        prog="wspo demo", description=__doc__.split("\n\n")[0] + " Report: DIR/report.md.", exit_on_error=False
    )
    parser.add_argument("--out", default="demo_out", help="report folder (also holds data, models, logs)")
    parser.add_argument("--quick", action="store_true", help="the small preset (a few minutes)")
    parser.add_argument("--force", action="store_true", help="redo every stage")
    parser.add_argument("--cache_dir", default=None, help="where the converted strong model is kept")
    parser.add_argument("--strong", default=None, help="strong model folder instead of SmolLM2-135M-Instruct")
    parser.add_argument(
        "--reward",
        type=str | dict,
        default=VADER,
        help="gold reward: vader, rm:PATH (a reward model folder), the import path of a Reward class, "
        "or a class_path/init_args block",
    )
    parser.add_class_arguments(DemoSettings, "settings", default=replace(preset))
    cfg = parser.parse_args(argv)
    settings = DemoSettings(**cfg.settings.as_dict()) if hasattr(cfg.settings, "as_dict") else cfg.settings
    run_demo(cfg.out, cfg.quick, cfg.force, cfg.cache_dir, cfg.strong, cfg.reward, settings)
    return 0
