"""Sizes, grids and rules of the study: the full run and the `--quick` preset.

Every grid and every rule is fixed here, before a run: the learning rate of each training method, the ExPO alphas
and the points the demo uses are then chosen on the tuning prompts by the rules in `wspo_lightning.protocol`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from wspo_lightning.demo.settings import DemoSettings
from wspo_lightning.errors import InputError

TRAINED = ("wspo", "dpo", "ipo", "sft")
"""The training methods, each swept over its strength on the one fluent preference dataset."""
KNOBS = {"wspo": "gamma", "dpo": "beta", "ipo": "beta", "sft": "epochs"}
"""Each training method's strength: WSPO's gamma, the pair losses' beta, SFT's length in epochs of the shared
step budget (its number of steps: 0.5 is half the steps every other fit takes)."""


@dataclass
class StudySettings:
    """Everything the study needs beyond paths."""

    n_train_prompts: int = 144
    """Training prompts: the strong base's samples on them make the preference dataset."""
    n_tuning_prompts: int = 40
    """Tuning prompts: every choice (learning rate, ExPO alphas, the demo's points) is made on them."""
    n_test_prompts: int = 40
    """Test prompts: read once per seed, by the final evaluation."""
    prompt_seed: int = 0
    """Seed of the prompt sets (their titles and premises are dealt to the sets first): the same for every seed."""
    seed: int = 0
    """Seed of sampling, data order and training (the study's seeds are 0, 1 and 2)."""
    eval_samples: int = 2
    """Samples per tuning or test prompt and point."""
    max_new_tokens: int = 40
    """Response length cap (tokens), for every sampling stage."""
    sample_batch_size: int = 64
    """Sequences generated together."""
    preference_samples: int = 4
    """The strong base's samples per training prompt; best vs worst by the gold reward makes a pair."""
    train_top_k: int = 50
    """top_k of the samples training data is made of (evaluation samples are untempered, all tokens)."""
    weak_layers: int | list[int] = field(default_factory=lambda: [0, 1, 2, 29])
    """Decoder layers the weak base keeps (the demo's weak base)."""
    distill_epochs: int = 2
    """Passes of the distillation over the strong samples (one per training prompt)."""
    distill_learning_rate: float = 1e-3
    """Peak learning rate of the distillation."""
    weak_dpo_epochs: int = 2
    """DPO epochs of the weak model, on the preference dataset."""
    weak_dpo_learning_rate: float = 5e-5
    """DPO learning rate of the weak model (the demo's)."""
    weak_dpo_beta: float = 0.1
    """DPO beta of the weak model."""
    batch_size: int = 8
    """Batch size of the weak model's fits (distillation, DPO)."""
    strong_batch_size: int = 4
    """Batch size of every strong fit."""
    strong_epochs: int = 1
    """Epochs of every strong fit: one step count for all (SFT's knob is a multiple of it)."""
    val_fraction: float = 0.08
    """Share of the pairs held out for the validation curves."""
    learning_rates: list[float] = field(default_factory=lambda: [1e-5, 3e-5, 1e-4])
    """Candidate learning rates, tried for every training method at its anchor (`protocol.choose_learning_rate`)."""
    lr_kl_cap: float = 4.0
    """Learning-rate rule: the best tuning reward among candidates within this KL (nats per response). The middle of
    the matched-KL targets: the anchor lands inside their range, one weaker and two stronger points around it."""
    wspo_gammas: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])
    """WSPO's gamma, rising strength."""
    dpo_betas: list[float] = field(default_factory=lambda: [0.3, 0.1, 0.05, 0.025])
    """DPO's beta (a sequence-level KL weight), rising strength."""
    ipo_betas: list[float] = field(default_factory=lambda: [4.0, 2.0, 1.0, 0.5])
    """IPO's beta, rising strength. It acts per token: the target gap 1 / (2 beta) is between per-token means of
    the log-ratios, so 4 .. 0.5 aim at 0.125 .. 1 nat per token (TRL's default 0.1 would aim at 5)."""
    sft_epochs: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])
    """SFT's length in multiples of the shared step budget, rising strength (a fraction < 1: that share of one
    epoch's batches)."""
    anchor: int = 1
    """Index in every grid of the point the learning rate is chosen at (1: the second weakest; the demo's gamma
    1, DPO's beta 0.1, one epoch of SFT)."""
    expo_alphas: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    """ExPO candidates, applied to the WSPO and the DPO anchor at their chosen learning rates."""
    expo_keep: int = 2
    """ExPO rule: at most this many alphas go to the test split (`protocol.choose_expo_alphas`)."""
    kl_cap: float = 8.0
    """ExPO and demo rules: points past this tuning KL are not kept (the matched-KL table ends at 8 nats)."""
    demo_kl_cap: float = 5.0
    """Demo rule: each method's point for the demo is its best tuning reward within this KL."""
    old_design: bool = True
    """Also the demo's former data design: the weak pair's own samples as the pairs, its own weak DPO on them,
    and a smaller WSPO and DPO sweep on those pairs (test split only)."""
    old_wspo_gammas: list[float] = field(default_factory=lambda: [1.0, 2.0])
    """WSPO's gammas on the former design's pairs."""
    old_dpo_betas: list[float] = field(default_factory=lambda: [0.1, 0.05])
    """DPO's betas on the former design's pairs."""
    proxy_alphas: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    """Proxy / EFT sampling: weights of the weak log-ratio (test split)."""
    budgets: list[int] = field(default_factory=lambda: [2, 4, 8, 16])
    """Best-of-N's N and CBS's W * K, strong samples per response (test split; best-of-N takes prefixes of the
    largest budget's draws)."""
    cbs_chunk_length: int = 8
    """CBS: L, tokens per chunk."""
    matched_kls: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0])
    """KL targets of the matched-KL table (nats per response)."""
    n_boot: int = 1000
    """Bootstrap draws of every interval."""
    keep_models: bool = False
    """Keep the trained strong models after the final evaluation (about 0.27 GB each in bfloat16)."""
    precision: Literal["auto", "bf16", "float32"] = "auto"
    """Precision of every stage: auto is bfloat16 where the CPU runs it natively, float32 elsewhere."""

    def __post_init__(self) -> None:
        for name in ("wspo_gammas", "dpo_betas", "ipo_betas", "sft_epochs"):
            if len(getattr(self, name)) < 2 or not 0 <= self.anchor < len(getattr(self, name)):
                raise InputError(f"study: {name} needs at least 2 values and a value at anchor index {self.anchor}")
        if len({len(self.grid(m)) for m in TRAINED}) != 1:
            raise InputError("study: every training method gets the same number of points: give grids of one length")
        if any(b < 2 for b in self.budgets) or any(e <= 0 for e in self.sft_epochs):
            raise InputError("study: budgets must be >= 2 and sft_epochs > 0")
        if any(e > 1 and e != int(e) for e in self.sft_epochs):
            raise InputError("study: an sft_epochs value above 1 must be a whole number of epochs")
        if not self.learning_rates:
            raise InputError("study: give at least one learning rate")
        self.demo()  # a bad sampling value fails here, before any stage runs

    def grid(self, method: str) -> list[float]:
        """The strength values of a training method, rising strength."""
        return {"wspo": self.wspo_gammas, "dpo": self.dpo_betas, "ipo": self.ipo_betas, "sft": self.sft_epochs}[method]

    def anchor_value(self, method: str) -> float:
        return self.grid(method)[self.anchor]

    def demo(self) -> DemoSettings:
        """The demo's settings these stand for: the shared pieces (weak pair, fit configs, samplers) read them."""
        return DemoSettings(
            n_train_prompts=self.n_train_prompts,
            n_eval_prompts=self.n_test_prompts,
            n_tuning_prompts=self.n_tuning_prompts,
            eval_samples=self.eval_samples,
            max_new_tokens=self.max_new_tokens,
            sample_batch_size=self.sample_batch_size,
            train_top_k=self.train_top_k,
            distill_prompts=self.n_train_prompts,
            weak_layers=self.weak_layers,
            distill_epochs=self.distill_epochs,
            distill_learning_rate=self.distill_learning_rate,
            preference_samples=self.preference_samples,
            weak_dpo_epochs=self.weak_dpo_epochs,
            weak_dpo_learning_rate=self.weak_dpo_learning_rate,
            dpo_beta=self.weak_dpo_beta,
            strong_epochs=self.strong_epochs,
            strong_batch_size=self.strong_batch_size,
            batch_size=self.batch_size,
            val_fraction=self.val_fraction,
            precision=self.precision,
            seed=self.seed,
            prompt_seed=self.prompt_seed,
        )

    def as_dict(self) -> dict:
        return asdict(self)


PRESETS = {
    "full": StudySettings(),
    # The whole chain at a smoke-test size: every phase and every kind of point, no significant result.
    "quick": StudySettings(
        n_train_prompts=24,
        n_tuning_prompts=8,
        n_test_prompts=8,
        max_new_tokens=24,
        weak_dpo_epochs=1,  # the distillation keeps its 2 epochs: a weaker weak base ties most of its own pairs
        batch_size=4,
        val_fraction=0.1,
        learning_rates=[3e-5, 1e-4],
        expo_alphas=[0.5, 1.0],
        expo_keep=1,
        old_wspo_gammas=[1.0],
        old_dpo_betas=[0.1],
        proxy_alphas=[1.0],
        budgets=[2, 4],
        n_boot=200,
    ),
}
