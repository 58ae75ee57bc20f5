"""`wspo demo`: the controlled-sentiment experiment, end to end, as a chain of pipeline stages.

    strong model (SmolLM2-135M-Instruct, converted once to safetensors)
      -> sample on train prompts -> distil 4 of its 30 layers      = weak base
      -> weak samples -> gold reward (VADER) -> pairs -> DPO          = weak aligned
      -> frozen roles' log-probs cached once -> WSPO of the strong model per gamma (policy only);
         DPO of the strong model on the same pairs
      -> test-time decoding with the same weak pair: proxy sampling, CBS, CBS over the WSPO model
      (every row is sampled on the held-out prompts and scored as soon as its model exists)
      -> evaluate -> report

Every stage skips itself when its output exists (rerun to resume; --force redoes).
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

from wspo_lightning.demo.fits import dpo_config, gamma_slug, wspo_config
from wspo_lightning.demo.prompts import split_prompts
from wspo_lightning.demo.settings import PRESETS, DemoSettings
from wspo_lightning.demo.strong import strong_model_dir
from wspo_lightning.io import atomic_path, read_jsonl, write_jsonl
from wspo_lightning.models import ModelSpec
from wspo_lightning.pipeline.distill import distill
from wspo_lightning.pipeline.evaluate import EvalRow, evaluate
from wspo_lightning.pipeline.fit import fit
from wspo_lightning.pipeline.pairs import pairs
from wspo_lightning.pipeline.sample import sample
from wspo_lightning.pipeline.score import score
from wspo_lightning.pipeline.stage import RUNS, done, say

VADER = "wspo_lightning.rewards.VaderReward"


class Timer:
    """Wall time per stage, saved to `timings.json` as the run goes. A stage skipped in this run
    keeps the time recorded when it last did its work, so the file always describes a whole run."""

    def __init__(self, path: Path) -> None:
        self.path, self.start = path, time.perf_counter()
        self.stages: dict[str, float] = {}
        if path.exists():
            self.stages = json.loads(path.read_text()).get("stages", {})

    @contextmanager
    def __call__(self, name: str):
        start, ran = time.perf_counter(), RUNS["ran"]
        yield
        if RUNS["ran"] > ran or name not in self.stages:
            self.stages[name] = round(time.perf_counter() - start, 1)
        self.path.write_text(
            json.dumps(
                {"stages": self.stages, "total": self.total, "this_run": round(time.perf_counter() - self.start, 1)},
                indent=2,
            )
            + "\n"
        )

    @property
    def total(self) -> float:
        return round(sum(self.stages.values()), 1)


def bf16(path: Path) -> ModelSpec:
    """Frozen models sample and score in bfloat16: on CPU steadier and several times faster than float32."""
    return ModelSpec(str(path), dtype="bfloat16")


def decode(s: DemoSettings, method: str, strong: Path, models: Path, prompts: Path, out: Path, force: bool) -> None:
    """`wspo generate` (proxy or CBS, steered by the demo's weak pair) on the held-out prompts, each prompt
    `eval_samples` times (CBS: `cbs_samples`), with the sampling stages' length limit and temperature."""
    from wspo_lightning.decoding.command import GenerateConfig, generate

    if done("generate", out, force):
        return
    cbs = method == "cbs"
    repeated = out.with_name(f"{out.stem}.prompts.jsonl")
    write_jsonl(repeated, [r for r in read_jsonl(prompts) for _ in range(s.cbs_samples if cbs else s.eval_samples)])
    generate(
        GenerateConfig(
            strong=bf16(strong),
            weak_base=bf16(models / "weak_base"),
            weak_aligned=bf16(models / "weak_aligned"),
            prompts=str(repeated),
            output=str(out),
            method=method,
            alpha=s.proxy_alpha,
            beam_width=s.cbs_beam_width,
            num_continuations=s.cbs_continuations,
            chunk_length=s.cbs_chunk_length,
            max_new_tokens=s.max_new_tokens,
            seed=s.seed + 2,
            batch_size=max(s.sample_batch_size // (s.cbs_beam_width * s.cbs_continuations if cbs else 1), 1),
        )
    )
    repeated.unlink()


def precompute_stage(config: dict, cache: Path, run_dir: Path, force: bool) -> None:
    """`wspo precompute` for a fit config into `cache`, skipped when it exists (written aside, renamed when whole)."""
    import yaml

    from wspo_lightning.lightning_cli import precompute

    if done("precompute", cache, force):
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "precompute.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    with atomic_path(cache) as tmp:
        precompute(
            ["--config", str(path), f"--model.init_args.cache_dir={tmp}"],
            command=f"wspo precompute --config {path} --model.init_args.cache_dir {cache}",
        )


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
    settings_file, settings_text = root / "settings.json", json.dumps(asdict(s), indent=2) + "\n"
    if settings_file.exists() and settings_file.read_text() != settings_text and not force:
        say(
            "demo",
            f"warning: {out} holds outputs made with other settings; stages whose outputs exist are "
            "still skipped. Use --force or another --out to redo them with these settings.",
        )
    settings_file.write_text(settings_text)
    timer = Timer(root / "timings.json")

    with timer("strong model"):
        strong_dir = Path(strong) if strong else strong_model_dir(cache_dir)
    sampling = dict(max_new_tokens=s.max_new_tokens, batch_size=s.sample_batch_size, force=force)

    train_prompts, eval_prompts = data / "prompts_train.jsonl", data / "prompts_heldout.jsonl"
    train, held_out = split_prompts(s.n_train_prompts, s.n_eval_prompts, seed=s.seed)
    write_jsonl(train_prompts, train)
    write_jsonl(eval_prompts, held_out)

    eval_rows: list[EvalRow] = []

    def held_out(name: str, model: Path, method: str = "sample") -> None:
        """Sample (or decode with `method`: proxy, cbs) and score one row on the held-out prompts as soon
        as its model exists (same length limit, temperature and seed for every row), so a stopped run
        keeps every finished row."""
        slug = f"{len(eval_rows):02d}_" + "".join(c if c.isalnum() else "_" for c in name).strip("_")
        raw, scored = samples / "eval" / f"{slug}.jsonl", samples / "eval" / f"{slug}.scored.jsonl"
        with timer(f"held-out samples: {name}"):
            if method == "sample":
                sample(
                    bf16(model), str(eval_prompts), str(raw), num_samples=s.eval_samples, seed=s.seed + 2, **sampling
                )
            else:
                decode(s, method, model, models, eval_prompts, raw, force)
            score(str(raw), str(scored), reward=reward, force=force)
        eval_rows.append(EvalRow(name, str(scored)))

    # 1. Weak base: 4 of the strong model's layers, distilled on its own samples.
    with timer("weak base: strong samples"):
        sample(
            bf16(strong_dir),
            str(train_prompts),
            str(samples / "strong_train.jsonl"),
            seed=s.seed,
            limit=s.distill_prompts,
            **sampling,
        )
    with timer("weak base: distil"):
        distill(
            ModelSpec(str(strong_dir)),
            str(samples / "strong_train.jsonl"),
            str(models / "weak_base"),
            layers=s.weak_layers,
            epochs=s.distill_epochs,
            learning_rate=s.distill_learning_rate,
            batch_size=s.batch_size,
            seed=s.seed,
            log_dir=str(runs / "distill"),
            force=force,
        )
    held_out("weak base", models / "weak_base")

    # 2. Weak aligned: DPO on pairs of weak samples labelled by the gold reward.
    with timer("weak aligned: samples, reward, pairs"):
        sample(
            bf16(models / "weak_base"),
            str(train_prompts),
            str(samples / "weak_train.jsonl"),
            num_samples=s.weak_samples,
            seed=s.seed + 1,
            **sampling,
        )
        score(str(samples / "weak_train.jsonl"), str(samples / "weak_train.scored.jsonl"), reward=reward, force=force)
        pairs(str(samples / "weak_train.scored.jsonl"), str(data / "pairs.jsonl"), force=force)
    with timer("weak aligned: DPO"):
        fit(
            dpo_config(
                s,
                models / "weak_base",
                data / "pairs.jsonl",
                runs / "weak_dpo",
                root,
                "weak_dpo",
                s.weak_dpo_epochs,
                s.weak_dpo_learning_rate,
            ),
            str(models / "weak_aligned"),
            str(runs / "weak_dpo"),
            force=force,
        )
    held_out("weak aligned", models / "weak_aligned")
    held_out("strong base", strong_dir)

    # 3. Strong: WSPO per gamma, and DPO directly on the same pairs. The frozen roles' values (reference
    # log-probs, delta_weak) do not depend on gamma: computed once, every WSPO fit loads only the policy.
    def wspo(gamma: float, name: str, cache: Path | None = None) -> dict:
        return wspo_config(
            s,
            strong_dir,
            models / "weak_base",
            models / "weak_aligned",
            data / "pairs.jsonl",
            runs / name,
            root,
            name,
            gamma,
            cache,
        )

    cache = data / "wspo_frozen_cache"
    with timer("strong WSPO: precompute frozen roles"):
        precompute_stage(wspo(s.gammas[0], "wspo_precompute"), cache, runs / "wspo_precompute", force)
    for gamma in s.gammas:
        name = f"wspo_gamma{gamma_slug(gamma)}"
        with timer(f"strong WSPO gamma={gamma:g}"):
            fit(wspo(gamma, name, cache), str(models / name), str(runs / name), force=force)
        held_out(f"strong + WSPO (gamma={gamma:g})", models / name)
    with timer("strong DPO"):
        fit(
            dpo_config(
                s,
                strong_dir,
                data / "pairs.jsonl",
                runs / "strong_dpo",
                root,
                "strong_dpo",
                s.strong_dpo_epochs,
                s.strong_dpo_learning_rate,
            ),
            str(models / "strong_dpo"),
            str(runs / "strong_dpo"),
            force=force,
        )
    held_out("strong + DPO", models / "strong_dpo")

    # 4. Test-time weak-to-strong decoding with the same weak pair: no training of the strong model.
    if s.decoding_rows:
        held_out(f"strong + proxy (alpha={s.proxy_alpha:g})", strong_dir, "proxy")
        held_out("strong + CBS", strong_dir, "cbs")
        first = f"wspo_gamma{gamma_slug(s.gammas[0])}"
        held_out(f"strong + WSPO (gamma={s.gammas[0]:g}) + CBS", models / first, "cbs")

    # 5. Evaluate: reward intervals, KL to the strong base, diversity, paired differences.
    with timer("evaluate"):
        evaluate(eval_rows, bf16(strong_dir), str(root / "results.json"), baseline="strong base", force=force)

    # 6. Report: table, plots, configs.
    from wspo_lightning.demo.report import write_report

    with timer("report"):
        table = write_report(root, eval_rows, timer.stages)
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
    parser.add_argument("--reward", default=VADER, help="gold reward: import path of a Reward class")
    parser.add_class_arguments(DemoSettings, "settings", default=replace(preset))
    cfg = parser.parse_args(argv)
    settings = DemoSettings(**cfg.settings.as_dict()) if hasattr(cfg.settings, "as_dict") else cfg.settings
    run_demo(cfg.out, cfg.quick, cfg.force, cfg.cache_dir, cfg.strong, cfg.reward, settings)
    return 0
