"""The study's plan in units of work, and its time on a 2-core CPU with native bfloat16, estimated before a run.

Each unit's cost was measured on such a CPU (quiet, two torch threads): the full demo's stages (`make demo`: its
strong fits, samplings and evaluations) and the study's quick run's stages (`wspo study --quick`, `timings.json`).
Costs are for 40 new tokens; a sampled sequence scales with the new tokens, a training step with prompt plus
response (about 45 + new tokens). On CPUs without native bfloat16 (float32) the README's demo ran 2.1-2.8x
longer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from wspo_lightning.study.settings import TRAINED, StudySettings

SECONDS = {
    "fit": 8.0,  # per strong fit: loading the policy, the trainer, validation, the bfloat16 export
    "step": 1.8,  # per optimizer step of a strong fit over chosen responses (WSPO, SFT), batch 4
    "pair_step": 2.4,  # per optimizer step over chosen and rejected responses (DPO, IPO), batch 4
    "strong_seq": 0.10,  # per sequence sampled from the strong model (batch 64)
    "weak_seq": 0.03,  # per sequence sampled from the weak base
    "steered_seq": 0.2,  # per sequence of proxy sampling, or per strong sample of CBS (the weak pair scores too)
    "reference_seq": 0.03,  # per sequence the reference scores for a KL
    "precompute_pair": 0.25,  # per preference pair and frozen-roles cache (four caches with the former design)
    "extrapolate": 6.0,  # per ExPO model written
    "weak_fits": 130.0,  # the distillation and the weak DPO at the full preset's size
    "point": 3.0,  # per point and split: loading its model to sample
}
"""Seconds per unit at 40 new tokens (see the module docstring)."""


@dataclass
class Plan:
    """Units of work of one seed."""

    fits: int = 0
    steps: float = 0.0
    pair_steps: float = 0.0
    strong_seqs: int = 0
    weak_seqs: int = 0
    steered_seqs: int = 0
    reference_seqs: int = 0
    precompute_pairs: int = 0
    extrapolations: int = 0
    sampled_points: int = 0

    def minutes(self, s: StudySettings) -> dict[str, float]:
        """Estimated minutes per kind of work."""
        sample_scale, step_scale = s.max_new_tokens / 40, (45 + s.max_new_tokens) / 85
        weak_scale = s.n_train_prompts / 144 * s.distill_epochs / 2 * step_scale
        c = SECONDS
        seconds = {
            "strong fits": self.fits * c["fit"]
            + (self.steps * c["step"] + self.pair_steps * c["pair_step"]) * step_scale,
            "sampling": (
                self.strong_seqs * c["strong_seq"]
                + self.weak_seqs * c["weak_seq"]
                + self.steered_seqs * c["steered_seq"]
            )
            * sample_scale
            + self.sampled_points * c["point"],
            "KL and precompute": (
                self.reference_seqs * c["reference_seq"] + self.precompute_pairs * c["precompute_pair"]
            )
            * step_scale,
            "weak pair": c["weak_fits"] * weak_scale * (2 if s.old_design else 1),
            "ExPO": self.extrapolations * c["extrapolate"],
        }
        return {k: v / 60 for k, v in seconds.items()}


def plan(s: StudySettings) -> Plan:
    """The units of one seed of `s` (pairs: one per training prompt; ties are rare)."""
    p = Plan()
    steps = math.ceil(s.n_train_prompts * (1 - s.val_fraction) / s.strong_batch_size) * s.strong_epochs
    n_lr, n_grid = len(s.learning_rates), len(s.wspo_gammas)
    for method in TRAINED:
        multiples = [s.anchor_value(method)] * n_lr + [v for i, v in enumerate(s.grid(method)) if i != s.anchor]
        p.fits += len(multiples)
        fit_steps = sum(multiples) * steps if method == "sft" else len(multiples) * steps
        if method in ("dpo", "ipo"):
            p.pair_steps += fit_steps
        else:
            p.steps += fit_steps
    own = (len(s.old_wspo_gammas), len(s.old_dpo_betas)) if s.old_design else (0, 0)
    p.fits += sum(own)
    p.steps, p.pair_steps = p.steps + own[0] * steps, p.pair_steps + own[1] * steps
    # sampled once per split: the base (evaluated in the three tuning rounds) and the anchors (in two)
    tuning_points = 1 + 4 * n_lr + 4 * (n_grid - 1) + 2 * len(s.expo_alphas)
    tuning_rows = tuning_points + 2 + 4
    test_points = 1 + 4 * n_grid + 2 * s.expo_keep + sum(own)
    tuning, test = s.n_tuning_prompts * s.eval_samples, s.n_test_prompts * s.eval_samples
    p.sampled_points = tuning_points + test_points
    p.strong_seqs = s.n_train_prompts * s.preference_samples + tuning_points * tuning + test_points * test
    p.strong_seqs += max(s.budgets) * s.n_test_prompts  # best-of-N's draws
    p.weak_seqs = s.n_train_prompts * s.preference_samples if s.old_design else 0
    p.steered_seqs = len(s.proxy_alphas) * test + sum(s.budgets) * s.n_test_prompts
    p.reference_seqs = tuning_rows * tuning + (test_points + len(s.proxy_alphas)) * test
    p.precompute_pairs = s.n_train_prompts * (4 if s.old_design else 2)
    p.extrapolations = 2 * len(s.expo_alphas)
    return p


def plan_text(s: StudySettings, precision) -> str:
    """One paragraph: the plan's units and its estimated minutes, said at the start of a run."""
    p = plan(s)
    minutes = p.minutes(s)
    parts = ", ".join(f"{k} {v:.0f}" for k, v in minutes.items())
    total = sum(minutes.values())
    note = "" if precision.dtype == "bfloat16" else " (measured with native bfloat16; float32 runs 2.1-2.8x longer)"
    return (
        f"plan for seed {s.seed}: {p.fits} strong fits ({p.steps + p.pair_steps:.0f} optimizer steps), "
        f"{p.strong_seqs + p.weak_seqs + p.steered_seqs} sampled sequences, {p.extrapolations} ExPO models; "
        f"estimated {total:.0f} minutes on a 2-core CPU with native bfloat16{note} ({parts})"
    )
