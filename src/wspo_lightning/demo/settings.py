"""Sizes and hyper-parameters of the demo: the full run and the `--quick` preset.

The values were chosen on the tuning prompts (`eval_on: tuning`), never on the held-out prompts of the
results table; the gammas are fixed here before a run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from wspo_lightning.decoding.args import SamplingArgs


@dataclass
class DemoSettings:
    """Everything the demo pipeline needs beyond paths."""

    n_train_prompts: int = 144
    """Training prompts: the weak model's samples on them give the preference pairs."""
    n_eval_prompts: int = 40
    """Held-out prompts for the results table."""
    n_tuning_prompts: int = 40
    """Tuning prompts, disjoint from both: settings are chosen on them (`eval_on: tuning`)."""
    eval_on: Literal["heldout", "tuning"] = "heldout"
    """Which prompts the rows are evaluated on: the held-out ones (the results), or the tuning ones."""
    eval_samples: int = 2
    """Samples per evaluation prompt and sampled row."""
    max_new_tokens: int = 40
    """Response length cap (tokens), for every sampling stage."""
    sample_batch_size: int = 64
    """Sequences generated together."""
    train_top_k: int = 50
    """top_k of the samples the weak pair is made from (strong samples to distil, weak samples to pair):
    with all tokens (top_k 0) a 4-layer model writes word salad, and pairs get labelled on noise. Rows of the
    results table are sampled untempered (top_k 0, temperature 1), so their KL estimates are unbiased."""
    distill_prompts: int = 144
    """Training prompts the strong model answers (once each) to teach the weak model."""
    weak_layers: int | list[int] = field(default_factory=lambda: [0, 1, 2, 29])
    """Decoder layers the weak model keeps: the first N, or indices (SmolLM2-135M has 30). Keeping the
    last layer beside the first ones halves the distillation loss reached in the same steps."""
    distill_epochs: int = 2
    """Passes over the strong samples."""
    distill_learning_rate: float = 1e-3
    """Peak learning rate of the distillation."""
    weak_samples: int = 4
    """Weak-model samples per training prompt; best vs worst by gold reward makes a pair."""
    weak_dpo_epochs: int = 2
    """DPO epochs of the weak model (all its parameters, tied embeddings and output layer included)."""
    weak_dpo_learning_rate: float = 5e-5
    """DPO learning rate of the weak model: on the tuning prompts the weak aligned model's gold reward was
    0.51 at 2e-5 and 0.79-0.86 at 5e-5, and WSPO at gamma 1 lifted more with it (README, "How the settings
    were chosen")."""
    dpo_beta: float = 0.1
    """DPO beta (the weak model and the strong DPO baseline)."""
    gammas: list[float] = field(default_factory=lambda: [1.0])
    """WSPO alignment strengths, one strong model each. Gamma 1 pairs with the sign control; `[1, 2]` adds
    gamma 2 (about 1.5 more minutes; it lifts more but at ~8 nats of KL on the tuning prompts, see the
    README)."""
    strong_epochs: int = 1
    """Epochs of every strong fit (WSPO, the sign control, DPO, SFT), on the same pairs."""
    strong_batch_size: int = 4
    """Batch size of every strong fit: at 4, one epoch of ~130 pairs is ~33 optimizer steps for the cost of
    ~16 at batch 8 (the 135M forward and backward is most of the demo's time)."""
    strong_learning_rate: float = 3e-5
    """Peak learning rate of every strong fit: one rule for WSPO and its baselines (warm-up 10%, then cosine
    decay, embeddings frozen), so no baseline is handicapped by a smaller step."""
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
        for sampler in (self.train_sampling, self.eval_sampling, self.search_sampling):
            sampler()  # a bad sampling value fails here, before any stage runs

    def _sampling(self, seed: int, **warping) -> SamplingArgs:
        return SamplingArgs(max_new_tokens=self.max_new_tokens, batch_size=self.sample_batch_size, seed=seed, **warping)

    def train_sampling(self, stage: int = 0) -> SamplingArgs:
        """The sampler of the samples the weak pair is made from (top_k `train_top_k`), seeded `seed + stage`
        (0: the strong model's samples to distil, 1: the weak model's samples to pair)."""
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
