"""The study's points: one setting of one method, its model (trained, extrapolated or none), and its samples on a
split.

A point's model is made only when a sampling of it is missing: a finished point costs nothing on a rerun, and a
model removed once evaluated is never needed again. Every strong fit follows one rule (`demo.fits.strong_config`:
the same epochs, batch size, warm-up and frozen embeddings) at the learning rate chosen for its method; the
frozen roles' log-probs are computed once per design (`wspo precompute`), so each fit loads only the policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from wspo_lightning.demo.fits import gamma_slug, set_length, strong_config, wspo_args
from wspo_lightning.models import ModelSpec
from wspo_lightning.pipeline.extrapolate import extrapolate
from wspo_lightning.pipeline.fit import fit
from wspo_lightning.pipeline.precompute import precompute
from wspo_lightning.pipeline.sample import sample
from wspo_lightning.pipeline.score import score
from wspo_lightning.study.settings import KNOBS

if TYPE_CHECKING:
    from wspo_lightning.study.seedrun import StudyRun

OBJECTIVES = {"wspo": "WSPOModule", "dpo": "DPOModule", "ipo": "DPOModule", "sft": "SFTModule"}
IPO = "wspo_lightning.losses.IPOLoss"
LABELS = {
    "base": "strong base",
    "wspo": "WSPO",
    "dpo": "DPO",
    "ipo": "IPO",
    "sft": "SFT",
    "expo-wspo": "ExPO of WSPO",
    "expo-dpo": "ExPO of DPO",
    "wspo-own": "WSPO (weak pair's own pairs)",
    "dpo-own": "DPO (weak pair's own pairs)",
    "proxy": "proxy",
    "bon": "best-of-N",
    "cbs": "CBS",
}


@dataclass(frozen=True)
class Point:
    """One setting of one method. `lr`: the learning rate of a trained point; `extrapolates`: the trained point an
    ExPO point pushes further."""

    method: str
    knob: str
    value: float
    lr: float | None = None
    extrapolates: Point | None = None

    @property
    def name(self) -> str:
        """A file name: e.g. wspo_gamma1_lr3e-05, expo-dpo_alpha0p5, bon_N4, base."""
        if self.method == "base":
            return "base"
        name = f"{self.method}_{self.knob}{gamma_slug(self.value)}"
        return name + (f"_lr{self.lr:g}" if self.lr is not None else "")

    @property
    def label(self) -> str:
        """For reports: e.g. "WSPO gamma=1 (lr 3e-05)", "ExPO alpha=0.5 of DPO beta=0.1 (lr 3e-05)"."""
        if self.method == "base":
            return LABELS["base"]
        if self.extrapolates is not None:
            return f"ExPO {self.knob}={self.value:g} of {self.extrapolates.label}"
        text = f"{LABELS.get(self.method, self.method)} {self.knob}={self.value:g}"
        return text + (f" (lr {self.lr:g})" if self.lr is not None else "")


def trained(method: str, value: float, lr: float) -> Point:
    """A strong fit's point; `method` ends in -own on the former design's pairs."""
    return Point(method, KNOBS[method.removesuffix("-own")], value, lr)


def expo(base: Point, alpha: float) -> Point:
    return Point(f"expo-{base.method}", "alpha", alpha, extrapolates=base)


BASE = Point("base", "strength", 0.0)


def model(run: StudyRun, point: Point) -> Path:
    """The point's model folder, made if missing: the strong base itself, an ExPO extrapolation or a strong fit."""
    if point.method == "base":
        return run.strong
    out = run.models / point.name
    if point.extrapolates is not None:
        base = model(run, point.extrapolates)
        with run.timer(f"extrapolate {point.name}"):
            reference, trained_model = ModelSpec(str(run.strong)), ModelSpec(str(base))
            return extrapolate(reference, trained_model, point.value, str(out), dtype="bfloat16", force=run.force)
    config = fit_config(run, point)  # the frozen roles' cache first, under its own timer
    with run.timer(f"fit {point.name}"):
        return fit(config, str(out), str(run.runs / point.name), force=run.force, export_dtype="bfloat16")


def fit_config(run: StudyRun, point: Point) -> dict:
    """The strong fit of a trained point: the one rule of every strong fit, at its method's learning rate."""
    method = point.method.removesuffix("-own")
    own = point.method.endswith("-own")
    pairs = run.own_pairs if own else run.pairs
    weak_pair = run.own_weak_pair if own else run.weak_pair
    cache = None if method == "sft" else frozen_cache(run, method, own)
    model_args = wspo_args(*weak_pair, point.value, cache) if method == "wspo" else {"cache_dir": str(cache)}
    config = _config(run, OBJECTIVES[method], point.name, pairs, **({} if method == "sft" else model_args))
    init = config["model"]["init_args"]
    init["learning_rate"] = point.lr
    if method == "dpo":
        init["beta"] = point.value
    elif method == "ipo":
        init.pop("beta")
        init["loss"] = {"class_path": IPO, "init_args": {"beta": point.value}}
    elif method == "sft":
        set_length(config["trainer"], point.value * run.s.strong_epochs)
    return config


def _config(run: StudyRun, objective: str, name: str, pairs: Path, **model_args) -> dict:
    precision = run.precision.trainer_precision
    config = strong_config(
        run.d, precision, objective, run.strong, pairs, run.runs / name, run.root, name, **model_args
    )
    for logger in config["trainer"]["logger"]:
        if logger["class_path"].endswith("WandbLogger"):
            logger["init_args"]["project"] = "wspo-study"
    return config


def frozen_cache(run: StudyRun, method: str, own: bool) -> Path:
    """The frozen roles' cache of a design's WSPO fits (reference log-probs and delta_weak, chosen responses) or of
    its DPO and IPO fits (the reference's log-probs of both responses): computed once, read by every fit."""
    kind = ("wspo" if method == "wspo" else "dpo") + ("_own" if own else "")
    cache = run.data / f"{kind}_frozen_cache"
    if cache.exists() and not run.force:
        return cache
    run_dir = run.runs / f"{kind}_precompute"
    pairs = run.own_pairs if own else run.pairs
    weak_pair = run.own_weak_pair if own else run.weak_pair
    model_args = wspo_args(*weak_pair, 1.0, None) if method == "wspo" else {}  # any gamma, any beta
    config = _config(run, OBJECTIVES[method], f"{kind}_precompute", pairs, **model_args)
    with run.timer(f"precompute {kind}"):
        return precompute(config, cache, run_dir, run.force)


def scored_file(run: StudyRun, point: Point, split: str) -> Path:
    return run.samples / split / f"{point.name}.scored.jsonl"


def sample_point(run: StudyRun, point: Point, prompts: Path, split: str) -> Path:
    """The point's samples on `prompts` (`eval_samples` each, untempered: their KL estimates are unbiased), scored
    by the gold reward; its model is made only when they are missing."""
    scored = scored_file(run, point, split)
    if scored.exists() and not run.force:
        return scored
    folder = model(run, point)
    raw = scored.with_name(f"{point.name}.jsonl")
    with run.timer(f"{split} samples: {point.name}"):
        spec = ModelSpec(str(folder), dtype=run.precision.dtype)
        sampling = vars(run.d.eval_sampling())
        sample(spec, str(prompts), str(raw), num_samples=run.s.eval_samples, force=run.force, **sampling)
        score(str(raw), str(scored), reward=run.reward, force=run.force)
    return scored
