"""The study's data: three prompt sets disjoint in titles and premises, one fluent preference dataset made before
any model is trained, and the weak pair trained on it (plus, as an option, the demo's former design: pairs of
the weak model's own samples and a weak pair aligned on them).

The test prompts have one accessor, `test_prompts`, that only the final evaluation calls (tests/test_study.py
holds the code to it): no choice can read them.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from wspo_lightning.demo.fits import weak_dpo_config
from wspo_lightning.demo.prompts import split_by_title
from wspo_lightning.demo.run import distil_weak_base, first_draws, preference_pairs
from wspo_lightning.io import write_jsonl
from wspo_lightning.models import ModelSpec
from wspo_lightning.pipeline.fit import fit

if TYPE_CHECKING:
    from wspo_lightning.study.seedrun import StudyRun

SPLITS = ("train", "tuning", "test")
READS: Counter = Counter()
"""Calls of `test_prompts` in this process (a test checks one per run)."""


def write_prompt_sets(folder: Path, n_train: int, n_tuning: int, n_test: int, prompt_seed: int) -> None:
    """The three prompt sets as `folder/prompts_{train,tuning,test}.jsonl`, written (never read back) by every run:
    the same for every seed."""
    for split, records in zip(SPLITS, split_by_title(n_train, n_tuning, n_test, seed=prompt_seed)):
        write_jsonl(folder / f"prompts_{split}.jsonl", records)


def prompts(folder: Path, split: str) -> Path:
    """The training or tuning prompts; the test prompts only through `test_prompts`."""
    if split not in SPLITS[:2]:
        raise ValueError(f"prompts({split!r}): the test prompts are read by the final evaluation alone (test_prompts)")
    return folder / f"prompts_{split}.jsonl"


def test_prompts(folder: Path) -> Path:
    """The test prompts: called once per seed, by the final evaluation, and by nothing else."""
    READS["test"] += 1
    return folder / "prompts_test.jsonl"


test_prompts.__test__ = False  # pytest: not a test function


def fluent_pairs(run: StudyRun) -> None:
    """The one preference dataset: the strong base's own samples (`preference_samples` per training prompt, top-k
    `train_top_k`), best vs worst by the gold reward. No trained model wrote any of its text."""
    d = run.d
    with run.timer("data: strong samples, reward, pairs"):
        spec = ModelSpec(str(run.strong), dtype=run.precision.dtype)
        samples = run.data / "strong_train.jsonl"
        prompts_file = prompts(run.prompt_sets, "train")
        preference_pairs(
            spec, prompts_file, samples, run.pairs, d.preference_samples, d.train_sampling(0), run.reward, run.force
        )


def weak_pair(run: StudyRun) -> None:
    """The weak base, the demo's: 4 layers of the strong model distilled on its first sample per training prompt
    (drawn as the demo draws its distillation samples); the weak aligned model: its DPO on the preference dataset."""
    d = run.d
    weak_base, weak_aligned = run.weak_pair
    with run.timer("weak base: distil"):
        distill_samples = first_draws(
            run.data / "strong_train.jsonl", run.data / "strong_train.distill.jsonl", d.distill_prompts, run.force
        )
        distil_weak_base(d, run.strong, distill_samples, weak_base, run.precision, run.runs / "distill", run.force)
    with run.timer("weak aligned: DPO"):
        _weak_dpo(run, run.pairs, weak_aligned, "weak_dpo")


def old_design(run: StudyRun) -> None:
    """The demo's former data design: the weak base's own samples (top-k 50) make the pairs, and its DPO on them
    the weak aligned model; WSPO and DPO of the strong model then train on those pairs (`points.own_fit`)."""
    d = run.d
    with run.timer("old design: weak samples, reward, pairs"):
        spec = ModelSpec(str(run.weak_pair[0]), dtype=run.precision.dtype)
        samples = run.data / "weak_train.jsonl"
        prompts_file = prompts(run.prompt_sets, "train")
        preference_pairs(
            spec, prompts_file, samples, run.own_pairs, d.preference_samples, d.train_sampling(1), run.reward, run.force
        )
    with run.timer("old design: weak DPO"):
        _weak_dpo(run, run.own_pairs, run.own_weak_pair[1], "weak_dpo_own")


def _weak_dpo(run: StudyRun, pairs: Path, out: Path, name: str) -> None:
    config = weak_dpo_config(run.d, run.precision.trainer_precision, run.weak_pair[0], pairs, run.runs / name, run.root)
    fit(config, str(out), str(run.runs / name), force=run.force)
