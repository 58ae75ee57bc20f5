"""The demo's run: the controlled-sentiment experiment, end to end, as a chain of pipeline stages.

    strong model (SmolLM2-135M-Instruct, converted once to safetensors)
      -> its samples on train prompts -> gold reward (VADER) -> pairs  = the preference data (fluent text)
      -> distil 4 of its 30 layers on its first draw per prompt      = weak base
      -> DPO on the pairs                                             = weak aligned
      -> frozen roles' log-probs cached once -> WSPO of the strong model per gamma (policy only);
         baselines on the same pairs: DPO, SFT, and WSPO with the weak pair swapped (the sign control)
      -> test-time decoding with the same weak pair: proxy sampling; with the search's own sampler the
         strong base, best-of-N, CBS, and CBS over the WSPO model
      (every row is sampled on the evaluation prompts and scored as soon as its model exists)
      -> evaluate -> report

`run_demo` runs the phases in that order, each a function of the run (`DemoRun`). Every stage writes its
output whole or not at all and skips itself when the output exists: a run killed at any point and rerun ends
as an uninterrupted one (force redoes everything).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from wspo_lightning.demo.fits import gamma_slug, strong_config, weak_dpo_config, wspo_args
from wspo_lightning.demo.prompts import split_by_title
from wspo_lightning.demo.rows import STRONG_BASE, Rows
from wspo_lightning.demo.settings import PRESETS, DemoSettings
from wspo_lightning.demo.strong import strong_model_dir
from wspo_lightning.hardware import Precision, choose_precision
from wspo_lightning.io import read_jsonl, write_jsonl
from wspo_lightning.models import ModelSpec
from wspo_lightning.pipeline.distill import distill
from wspo_lightning.pipeline.evaluate import evaluate
from wspo_lightning.pipeline.fit import fit
from wspo_lightning.pipeline.pairs import pairs
from wspo_lightning.pipeline.precompute import precompute, precompute_swapped
from wspo_lightning.pipeline.sample import sample
from wspo_lightning.pipeline.score import score
from wspo_lightning.pipeline.stage import Timer, say, write_json
from wspo_lightning.rewards import Reward

VADER = "wspo_lightning.rewards.VaderReward"
SEARCH_BASE = "strong base (search sampler)"


@dataclass
class DemoRun:
    """One run of the demo: what every phase reads. Its folders are `root`'s data, models, samples and runs."""

    s: DemoSettings
    root: Path
    precision: Precision
    timer: Timer
    strong: Path
    """The strong model's folder."""
    reward: Any
    force: bool

    def __post_init__(self) -> None:
        self.data, self.models, self.samples, self.runs = (self.root / d for d in ("data", "models", "samples", "runs"))
        self.weak_pair = (self.models / "weak_base", self.models / "weak_aligned")
        self.pairs, self.train_prompts = self.data / "pairs.jsonl", self.data / "prompts_train.jsonl"
        self.eval_prompts = self.data / f"prompts_{self.s.eval_on}.jsonl"
        # the results table's rows, appended by the phases in table order
        rows = (self.s, self.precision.dtype, self.eval_prompts, self.samples / "eval", self.weak_pair)
        self.rows = Rows(*rows, self.reward, self.timer, self.force)


def resolve_precision(s: DemoSettings) -> Precision:
    """The settings' precision, or the CPU's choice ("auto"); one for every stage of the run."""
    if s.precision == "auto":
        return choose_precision()
    dtype, trainer = ("bfloat16", "bf16-mixed") if s.precision == "bf16" else ("float32", "32-true")
    return Precision(choose_precision().device, dtype, trainer, f"settings.precision={s.precision}")


def start(out: str, s: DemoSettings, force: bool, cache_dir: str | None, strong: str | None, reward: Any) -> DemoRun:
    """The run in the folder `out`: its settings saved (a warning when they changed), its precision and timer, the
    strong model and the prompt sets."""
    root = Path(out)
    p = resolve_precision(s)
    timer = open_run(root, asdict(s), p, force, "demo")
    with timer("strong model"):
        strong_dir = Path(strong) if strong else strong_model_dir(cache_dir)
    run = DemoRun(s, root, p, timer, strong_dir, reward, force)
    train, tuning, held_out = split_by_title(
        s.n_train_prompts, s.n_tuning_prompts, s.n_eval_prompts, seed=s.prompt_seed
    )
    write_jsonl(run.train_prompts, train)
    write_jsonl(run.eval_prompts, held_out if s.eval_on == "heldout" else tuning)
    return run


def open_run(root: Path, settings: dict, precision: Precision, force: bool, who: str) -> Timer:
    """The run folder `root` with `settings` saved as settings.json (a warning when the folder's outputs were made
    with other ones), its precision said, and its timer (`root/timings.json`)."""
    root.mkdir(parents=True, exist_ok=True)
    settings_file = root / "settings.json"
    if settings_file.exists() and json.loads(settings_file.read_text()) != settings and not force:
        say(
            who,
            f"warning: {root} holds outputs made with other settings; stages whose outputs exist are "
            "still skipped. Use --force or another --out to redo them with these settings.",
        )
    write_json(settings_file, settings)
    say(
        who,
        f"precision: {precision.dtype} weights, trainer precision {precision.trainer_precision} ({precision.reason})",
    )
    return Timer(root / "timings.json", precision)


def distil_weak_base(
    s: DemoSettings, strong: Path, samples: Path, out: Path, precision: Precision, log_dir: Path, force: bool
) -> Path:
    """The weak base: the layers `s.weak_layers` of the strong model, distilled on its `samples`."""
    return distill(
        ModelSpec(str(strong)),
        str(samples),
        str(out),
        layers=s.weak_layers,
        epochs=s.distill_epochs,
        learning_rate=s.distill_learning_rate,
        batch_size=s.batch_size,
        precision=precision.trainer_precision,
        seed=s.seed,
        log_dir=str(log_dir),
        force=force,
    )


def preference_pairs(
    spec: ModelSpec, prompts: Path, samples: Path, out: Path, num_samples: int, sampling: Any, reward: Any, force: bool
) -> Path:
    """Preference pairs `out`: `num_samples` samples of `spec` per prompt (`sampling`, a `SamplingArgs`), scored by
    the gold `reward` (beside them, `.scored.jsonl`), best vs worst per prompt (ties dropped)."""
    sample(spec, str(prompts), str(samples), num_samples=num_samples, force=force, **vars(sampling))
    scored = samples.with_name(f"{samples.stem}.scored.jsonl")
    score(str(samples), str(scored), reward=reward, force=force)
    return pairs(str(scored), str(out), force=force)


def first_draws(samples: Path, out: Path, limit: int, force: bool) -> Path:
    """`out`: each prompt's first draw among `samples` (`wspo sample` output), for the first `limit` prompts: the
    weak base's distillation data when the strong base's samples also make the pairs."""
    if not out.exists() or force:
        write_jsonl(out, [r for r in read_jsonl(samples) if r["sample"] == 0][:limit])  # samples are in prompt order
    return out


def make_weak_pair(run: DemoRun) -> None:
    """1-2. The preference pairs and the weak pair, each model with its row, then the strong base's row. The weak
    base is 4 of the strong model's layers distilled on its answers; the weak aligned model is its DPO on the pairs.
    The pairs (`data_design`): the strong base's own samples, best vs worst by the gold reward (fluent, its first
    draw per prompt also teaches the weak base), or the weak base's own samples (the former design)."""
    s, weak_base, weak_aligned = run.s, *run.weak_pair
    strong_samples = run.samples / "strong_train.jsonl"
    if s.data_design == "fluent":
        with run.timer("pairs: strong samples, reward"):
            spec, sampling = run.rows.spec(run.strong), s.train_sampling(0)
            preference_pairs(
                spec,
                run.train_prompts,
                strong_samples,
                run.pairs,
                s.preference_samples,
                sampling,
                run.reward,
                run.force,
            )
        distill_data = first_draws(
            strong_samples, run.samples / "strong_train.distill.jsonl", s.distill_prompts, run.force
        )
    else:
        with run.timer("weak base: strong samples"):
            spec, sampling = run.rows.spec(run.strong), vars(s.train_sampling(0))
            sample(
                spec, str(run.train_prompts), str(strong_samples), limit=s.distill_prompts, force=run.force, **sampling
            )
        distill_data = strong_samples
    with run.timer("weak base: distil"):
        distil_weak_base(s, run.strong, distill_data, weak_base, run.precision, run.runs / "distill", run.force)
    run.rows.sampled("weak base", weak_base, kl=False)
    if s.data_design == "weak_samples":
        with run.timer("pairs: weak samples, reward"):
            weak_samples = run.samples / "weak_train.jsonl"
            spec, sampling = run.rows.spec(weak_base), s.train_sampling(1)
            preference_pairs(
                spec, run.train_prompts, weak_samples, run.pairs, s.preference_samples, sampling, run.reward, run.force
            )
    with run.timer("weak aligned: DPO"):
        config = weak_dpo_config(
            s, run.precision.trainer_precision, weak_base, run.pairs, run.runs / "weak_dpo", run.root
        )
        fit(config, str(weak_aligned), str(run.runs / "weak_dpo"), force=run.force)
    run.rows.sampled("weak aligned", weak_aligned, kl=False)
    run.rows.sampled(STRONG_BASE, run.strong)


def train_strong(run: DemoRun) -> None:
    """3. The strong model trained on the pairs, each fit with its row: WSPO per gamma on the chosen responses;
    with `baselines`, the sign control (WSPO at the first gamma with the weak pair swapped, so delta_weak changes
    sign while the training text stays), DPO and SFT."""
    for gamma in run.s.gammas:
        name = f"wspo_gamma{gamma_slug(gamma)}"
        _wspo(run, gamma, name, run.weak_pair)
        run.rows.sampled(f"strong + WSPO (gamma={gamma:g})", run.models / name)
    if run.s.baselines:
        gamma = run.s.gammas[0]
        control = f"wspo_gamma{gamma_slug(gamma)}_sign_control"
        _wspo(run, gamma, control, run.weak_pair[::-1])
        run.rows.sampled(f"strong + WSPO (gamma={gamma:g}, sign control: weak pair swapped)", run.models / control)
        _strong_fit(run, "DPOModule", "dpo")
        run.rows.sampled("strong + DPO", run.models / "dpo")
        _strong_fit(run, "SFTModule", "sft")
        run.rows.sampled("strong + SFT (chosen responses)", run.models / "sft")


def _strong_config(run: DemoRun, objective: str, name: str, run_dir: Path, **model_args) -> dict:
    precision = run.precision.trainer_precision
    return strong_config(run.s, precision, objective, run.strong, run.pairs, run_dir, run.root, name, **model_args)


def _strong_fit(run: DemoRun, objective: str, name: str, **model_args) -> Path:
    with run.timer(f"strong {name}"):
        config = _strong_config(run, objective, name, run.runs / name, **model_args)
        return fit(config, str(run.models / name), str(run.runs / name), force=run.force)


def _wspo(run: DemoRun, gamma: float, name: str, pair: tuple[Path, Path]) -> None:
    """WSPO with the weak `pair`. The frozen roles' values (reference log-probs, delta_weak) do not depend on
    gamma: computed once, every WSPO fit loads only the policy."""
    with run.timer(f"strong {name}: precompute frozen roles"):
        cache = _frozen_cache(run, name, pair, gamma)
    _strong_fit(run, "WSPOModule", name, **wspo_args(*pair, gamma, cache))


def _frozen_cache(run: DemoRun, name: str, pair: tuple[Path, Path], gamma: float) -> Path:
    """The frozen roles' cache of WSPO with `pair`: one for the pair in order; the pair swapped (the sign control)
    gets the cache in order with delta_weak negated, derived without a forward pass."""
    run_dir = run.runs / f"{name}_precompute"
    config = _strong_config(run, "WSPOModule", name, run_dir, **wspo_args(*pair, gamma, None))  # any gamma
    if pair == run.weak_pair:
        return precompute(config, run.data / "wspo_frozen_cache", run_dir, run.force)
    in_order = partial(_frozen_cache, run, f"{name}_in_order", run.weak_pair, gamma)
    return precompute_swapped(config, run.data / f"{name}_frozen_cache", run_dir, in_order, run.force)


def decode_rows(run: DemoRun) -> None:
    """4. Test-time weak-to-strong decoding with the same weak pair, no training of the strong model: proxy
    sampling (`proxy_row`); with the search's own sampler the strong base, best-of-N, CBS, and CBS over the first
    WSPO model (`wspo_cbs`)."""
    s, rows = run.s, run.rows
    if not s.decoding_rows:
        return
    if s.proxy_row:
        rows.decoded(f"strong + proxy (alpha={s.proxy_alpha:g})", "proxy", run.strong)
    rows.decoded(SEARCH_BASE, "sample", run.strong)
    n = s.cbs_beam_width * s.cbs_continuations
    rows.decoded(f"strong + best-of-{n}", "bon", run.strong, baseline=SEARCH_BASE)
    rows.decoded("strong + CBS", "cbs", run.strong, baseline=SEARCH_BASE)
    if s.wspo_cbs:
        first = run.models / f"wspo_gamma{gamma_slug(s.gammas[0])}"
        rows.decoded(f"strong + WSPO (gamma={s.gammas[0]:g}) + CBS", "cbs", first, baseline=SEARCH_BASE)


def evaluate_and_report(run: DemoRun) -> list[dict]:
    """5-6. Every row evaluated (reward intervals, KL to the strong base, diversity, paired differences), then
    the report (table, verdicts, plots, configs); the table is printed, the results rows returned."""
    from wspo_lightning.demo.report import write_report

    with run.timer("evaluate"):
        strong = run.rows.spec(run.strong)
        evaluate(run.rows.rows, strong, str(run.root / "results.json"), baseline=STRONG_BASE, force=run.force)
    with run.timer("report"):
        table = write_report(run.root, run.rows.rows, run.timer.stages, run.precision)
    minutes = (time.perf_counter() - run.timer.start) / 60
    report = run.root / "report.md"
    say("demo", f"done in {minutes:.1f} min (all stages: {run.timer.total / 60:.1f} min); report in {report}")
    print(table)
    return json.loads((run.root / "results.json").read_text())


def run_demo(
    out: str = "demo_out",
    quick: bool = False,
    force: bool = False,
    cache_dir: str | None = None,
    strong: str | None = None,
    reward: str | dict[str, Any] | Reward = VADER,
    settings: DemoSettings | None = None,
) -> list[dict]:
    """Run (or resume) the controlled-sentiment experiment in `out`, end to end, as a chain of pipeline stages.
    The report is `out/report.md`; the results rows, returned, are `out/results.json`.

    Args:
        out: report folder; also holds the data, models and logs of every stage.
        quick: the small preset (a few minutes); ignored when `settings` is given.
        force: redo every stage, even those whose outputs exist.
        cache_dir: where the converted strong model is kept (default ~/.cache/wspo-lightning).
        strong: a strong model folder to use instead of SmolLM2-135M-Instruct (its tokenizer must
            have a chat template; tests pass a tiny random model).
        reward: gold reward: `vader`, `rm:PATH` (a reward model folder), the import path of a reward class,
            a class_path / init_args block, or an instance (see `wspo_lightning.rewards`).
        settings: sizes and hyper-parameters (default: the preset).
    """
    os.environ.setdefault("WANDB_MODE", "offline")  # W&B runs land in out/wandb, nothing is sent
    s = settings or PRESETS["quick" if quick else "full"]
    run = start(out, s, force, cache_dir, strong, reward)
    make_weak_pair(run)
    train_strong(run)
    decode_rows(run)
    return evaluate_and_report(run)
