"""Sizes and hyper-parameters of the demo: the full run and the `--quick` preset."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DemoSettings:
    """Everything the demo pipeline needs beyond paths. Every row is sampled with the same settings."""

    n_train_prompts: int = 200
    """Training prompts: the weak model's samples on them give the preference pairs."""
    n_eval_prompts: int = 40
    """Held-out prompts for the results table."""
    eval_samples: int = 2
    """Samples per held-out prompt and row."""
    max_new_tokens: int = 48
    """Response length cap (tokens), for every sampling stage."""
    sample_batch_size: int = 64
    """Sequences generated together."""
    distill_prompts: int = 200
    """Training prompts the strong model answers (once each) to teach the weak model."""
    weak_layers: int | list[int] = field(default_factory=lambda: [0, 1, 2, 29])
    """Decoder layers the weak model keeps: the first N, or indices (SmolLM2-135M has 30). Keeping the
    last layer beside the first ones halves the distillation loss reached in the same steps."""
    distill_epochs: int = 3
    """Passes over the strong samples."""
    distill_learning_rate: float = 1e-3
    """Peak learning rate of the distillation."""
    weak_samples: int = 4
    """Weak-model samples per training prompt; best vs worst by gold reward makes a pair (of 2, the
    reward gap is often noise: the weak DPO then memorised its pairs, validation accuracy ~0.5)."""
    weak_dpo_epochs: int = 3
    """DPO epochs of the weak model (with 2, it barely moved away from the weak base)."""
    weak_dpo_learning_rate: float = 2e-5
    """DPO learning rate of the weak model."""
    dpo_beta: float = 0.1
    """DPO beta (weak model and the strong DPO baseline)."""
    gammas: list[float] = field(default_factory=lambda: [1.0, 2.0])
    """WSPO alignment strengths, one strong model each."""
    wspo_epochs: int = 1
    """WSPO epochs (on the chosen responses of the pairs)."""
    wspo_learning_rate: float = 3e-5
    """WSPO learning rate."""
    strong_dpo_epochs: int = 1
    """Epochs of the strong DPO baseline (on the same pairs)."""
    strong_dpo_learning_rate: float = 1e-5
    """Learning rate of the strong DPO baseline."""
    batch_size: int = 8
    """Training batch size of every fit."""
    val_fraction: float = 0.08
    """Share of the pairs held out for the validation curves (reward margins)."""
    val_checks: int = 1
    """Validations per epoch of each fit (points of the margin curves)."""
    decoding_rows: bool = True
    """Also evaluate test-time weak-to-strong decoding: strong + proxy, strong + CBS, WSPO model + CBS."""
    proxy_alpha: float = 1.0
    """Proxy / EFT sampling: weight of the weak log-ratio added to the strong logits."""
    cbs_beam_width: int = 2
    """CBS: W, beams kept per prompt (smaller than the library's default 4, for CPU time)."""
    cbs_continuations: int = 2
    """CBS: K, continuations sampled per beam and chunk."""
    cbs_chunk_length: int = 8
    """CBS: L, tokens per chunk."""
    cbs_samples: int = 1
    """CBS searches per held-out prompt (a search costs W*K samples: fewer than `eval_samples`, for CPU time)."""
    seed: int = 0
    """Seed of prompts, sampling, data order and training."""


PRESETS = {
    "full": DemoSettings(),
    # The whole chain at a smoke-test size: minutes, not a significant result.
    "quick": DemoSettings(
        n_train_prompts=64,
        n_eval_prompts=16,
        max_new_tokens=24,
        distill_prompts=64,
        distill_epochs=2,
        weak_dpo_epochs=1,
        val_fraction=0.1,
        val_checks=1,
    ),
}
