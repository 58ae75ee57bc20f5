"""Sizes and hyper-parameters of the demo: the full run and the `--quick` preset.

The data design and the strong fits' settings are the study's (`wspo study`): its fluent preference dataset, and
per method the learning rate and strength its rules chose on the tuning prompts (`CHOSEN_BY`); never the held-out
prompts of the results table, which are the study's test prompts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from wspo_lightning.decoding.args import SamplingArgs
from wspo_lightning.errors import InputError
from wspo_lightning.protocol import DEMO_METHODS, demo_defaults

CHOSEN_FILE = Path(__file__).with_name("chosen.json")
"""The study's tuning summaries the strong fits' defaults are chosen from (`wspo study` writes this file as
`study_out/seed<N>/protocol/demo_settings.json`)."""
CHOSEN, CHOSEN_BY = demo_defaults(json.loads(CHOSEN_FILE.read_text()))


@dataclass
class DemoSettings:
    """Everything the demo pipeline needs beyond paths."""

    n_train_prompts: int = 144
    """Training prompts: the samples on them give the preference pairs."""
    n_eval_prompts: int = 40
    """Held-out prompts for the results table (the study's test prompts: no movie title or premise of them is in
    another set)."""
    n_tuning_prompts: int = 40
    """Tuning prompts, disjoint in titles and premises from both: settings are chosen on them (`eval_on: tuning`)."""
    eval_on: Literal["heldout", "tuning"] = "heldout"
    """Which prompts the rows are evaluated on: the held-out ones (the results), or the tuning ones."""
    eval_samples: int = 2
    """Samples per evaluation prompt and sampled row."""
    max_new_tokens: int = 40
    """Response length cap (tokens), for every sampling stage."""
    sample_batch_size: int = 64
    """Sequences generated together."""
    data_design: Literal["fluent", "weak_samples"] = "fluent"
    """Where the preference pairs come from. fluent (the study's design): the strong base's own samples, best vs
    worst by the gold reward; no trained model wrote any of their text. The weak base is distilled on each
    prompt's first draw, the weak aligned model is its DPO on the pairs, and every strong fit trains on them.
    weak_samples (the former design): the strong model answers once per prompt to teach the weak base, and the
    pairs are the weak base's own samples."""
    train_top_k: int = 50
    """top_k of the samples the training data is made of (strong samples to distil and pair, weak samples to pair):
    with all tokens (top_k 0) a 4-layer model writes word salad, and pairs get labelled on noise. Rows of the
    results table are sampled untempered (top_k 0, temperature 1), so their KL estimates are unbiased."""
    distill_prompts: int = 144
    """Training prompts whose strong answer (one each) teaches the weak model."""
    weak_layers: int | list[int] = field(default_factory=lambda: [0, 1, 2, 29])
    """Decoder layers the weak model keeps: the first N, or indices (SmolLM2-135M has 30). Keeping the
    last layer beside the first ones halves the distillation loss reached in the same steps."""
    distill_epochs: int = 2
    """Passes over the strong samples."""
    distill_learning_rate: float = 1e-3
    """Peak learning rate of the distillation."""
    preference_samples: int = 4
    """Samples per training prompt (the strong base's, or with `data_design: weak_samples` the weak base's); best vs
    worst by the gold reward makes a pair."""
    weak_dpo_epochs: int = 2
    """DPO epochs of the weak model (all its parameters, tied embeddings and output layer included)."""
    weak_dpo_learning_rate: float = 5e-5
    """DPO learning rate of the weak model (the study's)."""
    dpo_beta: float = 0.1
    """DPO beta of the weak model."""
    gammas: list[float] = field(default_factory=lambda: [CHOSEN["wspo"]["value"]])
    """WSPO alignment strengths, one strong model each; the first pairs with the sign control. Default: the
    study's choice (`CHOSEN_BY`)."""
    strong_dpo_beta: float = CHOSEN["dpo"]["value"]
    """Beta of the strong DPO baseline. Default: the study's choice."""
    sft_epochs: float = CHOSEN["sft"]["value"]
    """Length of the SFT baseline in multiples of `strong_epochs` (below 1: that share of one epoch's batches).
    Default: the study's choice."""
    strong_learning_rates: dict[str, float] = field(
        default_factory=lambda: {method: CHOSEN[method]["lr"] for method in DEMO_METHODS}
    )
    """Peak learning rate of each strong fit (`wspo`, the sign control too; `dpo`; `sft`), each under one schedule
    (warm-up 10%, then cosine decay, embeddings frozen). Default: the study's choices."""
    chosen_by: str = CHOSEN_BY
    """Where the defaults of the strong fits come from (written with the settings, for the record)."""
    strong_epochs: int = 1
    """Epochs of every strong fit (WSPO, the sign control, DPO, SFT), on the same pairs."""
    strong_batch_size: int = 4
    """Batch size of every strong fit: at 4, one epoch of ~130 pairs is ~33 optimizer steps for the cost of
    ~16 at batch 8 (the 135M forward and backward is most of the demo's time)."""
    batch_size: int = 8
    """Training batch size of the weak model's fits (distillation, DPO)."""
    val_fraction: float = 0.08
    """Share of the pairs held out for the validation curves (reward margins)."""
    val_checks: int = 1
    """Validations per epoch of each fit (points of the margin curves)."""
    baselines: bool = True
    """Also train and evaluate the strong baselines: DPO and SFT on the same pairs, and the sign control
    (WSPO at gamma 1 with the weak pair swapped)."""
    decoding_rows: bool = True
    """Also evaluate test-time weak-to-strong decoding with the search's own sampler: the strong base,
    best-of-N and CBS (and, opt-in, proxy sampling and CBS over the WSPO model)."""
    proxy_row: bool = False
    """Also evaluate proxy / EFT sampling (strong logits + proxy_alpha x the weak log-ratio) among the decoding
    rows: one more row, about a minute."""
    proxy_alpha: float = 1.0
    """Proxy / EFT sampling: weight of the weak log-ratio added to the strong logits."""
    search_temperature: float = 0.7
    """Temperature of the search rows' sampler (the weak-to-strong search paper's scripts use 0.7)."""
    search_top_k: int = 50
    """top_k of the search rows' sampler (the paper's CBS uses 50)."""
    cbs_beam_width: int = 2
    """CBS: W, beams kept per prompt."""
    cbs_continuations: int = 2
    """CBS: K, continuations sampled per beam and chunk; best-of-N draws N = W * K samples."""
    cbs_chunk_length: int = 8
    """CBS: L, tokens per chunk."""
    wspo_cbs: bool = False
    """Also CBS over the first WSPO model (does search add to training?): one more search row."""
    search_samples: int = 1
    """Searches (CBS, best-of-N) per evaluation prompt: each costs W * K samples."""
    precision: Literal["auto", "bf16", "float32"] = "auto"
    """Precision of every stage: auto is bfloat16 where the CPU runs it natively, float32 elsewhere."""
    seed: int = 0
    """Seed of sampling, data order and training (`wspo demo-spread` compares runs that differ in it)."""
    prompt_seed: int = 0
    """Seed of the prompts and of their split: runs with another `seed` are judged on the same held-out
    prompts, never on the tuning ones."""

    def __post_init__(self) -> None:
        missing = set(DEMO_METHODS) - set(self.strong_learning_rates)
        if missing:
            raise InputError(f"demo: strong_learning_rates needs a rate for {sorted(missing)}")
        if not self.gammas or self.sft_epochs <= 0 or (self.sft_epochs > 1 and self.sft_epochs != int(self.sft_epochs)):
            raise InputError("demo: give at least one gamma, and sft_epochs > 0 (a whole number above 1)")
        for sampler in (self.train_sampling, self.eval_sampling, self.search_sampling):
            sampler()  # a bad sampling value fails here, before any stage runs

    def _sampling(self, seed: int, **warping) -> SamplingArgs:
        return SamplingArgs(max_new_tokens=self.max_new_tokens, batch_size=self.sample_batch_size, seed=seed, **warping)

    def train_sampling(self, stage: int = 0) -> SamplingArgs:
        """The sampler of the samples the training data is made of (top_k `train_top_k`), seeded `seed + stage`
        (0: the strong model's samples, 1: the weak model's samples to pair in the former design)."""
        return self._sampling(self.seed + stage, top_k=self.train_top_k)

    def eval_sampling(self) -> SamplingArgs:
        """The sampler of the results table's rows: untempered, all tokens (so their KL estimates are unbiased);
        the steered decoding rows (proxy) draw with it too."""
        return self._sampling(self.seed + 2)

    def search_sampling(self) -> SamplingArgs:
        """The sampler of the search rows (best-of-N, CBS) and of the strong base they are compared with."""
        return self._sampling(self.seed + 2, temperature=self.search_temperature, top_k=self.search_top_k)


PRESETS = {
    "full": DemoSettings(),
    # The whole chain at a smoke-test size: minutes, not a significant result.
    "quick": DemoSettings(
        n_train_prompts=24,
        n_eval_prompts=8,
        n_tuning_prompts=0,
        max_new_tokens=24,
        distill_prompts=24,
        weak_dpo_epochs=1,
        batch_size=4,  # the weak fits still run when ties leave few pairs (short answers of a weak model)
        val_fraction=0.1,
        val_checks=1,
    ),
}
