"""Loads the models a `GenerateConfig` names, once, and draws samples for the decoding methods."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from wspo_lightning.decoding.generation import generate_responses
from wspo_lightning.decoding.sampling import fresh_seed, row_generators
from wspo_lightning.decoding.scorer import WeakPairScorer
from wspo_lightning.models import check_same_vocabulary, load_model, load_tokenizer
from wspo_lightning.render import Prompt, Renderer


@dataclass
class Generation:
    """One decoded response."""

    response: str
    """Response text (special tokens dropped), cut before the first stop string."""
    token_ids: list[int]
    """Strong-model response ids, up to and including the token that ended it."""
    score: float | None
    """Weak-pair reward of the response (None without a weak pair)."""
    finished: bool
    """Ended by a stop id or a stop string (False: cut at max_new_tokens)."""
    logp: float | None
    """Log-likelihood of the response under the sampler that drew it (sample, proxy); None for CBS and
    best-of-N, whose selection has no tractable likelihood."""


class Decoder:
    """The models a config names, loaded once, and the sampling step the decoding methods share: a method
    (`wspo_lightning.decoding.methods`) answers a batch with `method.decode(decoder, prompts)`.

    Args:
        config: a `GenerateConfig`.
        device: where the models run.
        shared_vocabulary: check that the strong model and the weak pair share one vocabulary (a method that
            mixes their logits token by token needs it).

    Attributes:
        indices: the positions in the prompts file of the batch being decoded (`generate` sets them before each
            `method.decode`): they seed its draws (`draw`, `generators`), so a prompt's response depends on neither
            the batch size nor the other prompts of its batch.
        seed: the run's seed (the config's, or a fresh one when it has none).
    """

    def __init__(self, config, device: torch.device, shared_vocabulary: bool = False) -> None:
        self.config = config
        self.renderer = Renderer(
            load_tokenizer(config.strong), config.use_chat_template, config.prompt_template, name=config.strong.path
        )
        self.tokenizer = self.renderer.tokenizer
        self.scorer: WeakPairScorer | None = None
        self.shared_vocab = True
        if config.weak_base is not None:
            weak_tokenizer = load_tokenizer(config.weak_base)
            check_same_vocabulary({"weak_base": weak_tokenizer, "weak_aligned": load_tokenizer(config.weak_aligned)})
            if shared_vocabulary:
                check_same_vocabulary({"strong": self.tokenizer, "weak_base": weak_tokenizer})
            self.shared_vocab = weak_tokenizer.get_vocab() == self.tokenizer.get_vocab()
            weak_renderer = Renderer(
                weak_tokenizer, config.use_chat_template, config.prompt_template, name=config.weak_base.path
            )
            self.scorer = WeakPairScorer(
                load_model(config.weak_aligned, device=device),
                load_model(config.weak_base, device=device),
                weak_renderer,
                batch_size=config.batch_size,
            )
        self.strong = load_model(config.strong, device=device)
        self.stop_ids = self.renderer.stop_ids(self.strong)
        self.device = device
        self.seed = config.seed if config.seed is not None else fresh_seed()
        self.sampling = config.sampling(seed=self.seed)
        self.indices: list[int] = []

    def _indices(self, prompts: Sequence[Prompt], indices: Sequence[int] | None) -> list[int]:
        if indices is None:  # the batch `generate` is decoding, else the prompts' own order
            indices = self.indices or range(len(prompts))
        indices = list(indices)
        if len(indices) != len(prompts):
            raise ValueError(
                f"{len(prompts)} prompts but {len(indices)} indices: pass indices= (the prompts' positions in the "
                "input) when decoding other prompts than the batch's"
            )
        return indices

    def generators(
        self, prompts: Sequence[Prompt], num_samples: int = 1, indices: Sequence[int] | None = None
    ) -> list[torch.Generator]:
        """One seeded generator per response to `prompts` (prompt-major, `sampling.row_generators`); `indices` as
        in `draw`."""
        return row_generators(self.seed, self._indices(prompts, indices), num_samples, self.device)

    def draw(
        self,
        prompts: Sequence[Prompt],
        num_samples: int,
        alpha: float | None = None,
        indices: Sequence[int] | None = None,
    ) -> list[Generation]:
        """`num_samples` responses per prompt (rows prompt * num_samples + i), with weak scores when there is a
        weak pair. `alpha`: add alpha times the weak pair's log-ratio to the strong logits before each draw
        (proxy / EFT; needs the weak pair); None: the strong model's own sampler. `indices`: the prompts'
        positions in the input (default: the batch's, `self.indices`)."""
        steered = alpha is not None
        responses = generate_responses(
            self.strong,
            self.renderer,
            prompts,
            self.sampling,
            indices=self._indices(prompts, indices),
            num_samples=num_samples,
            weak_pair=(self.scorer.weak_aligned, self.scorer.weak_base) if steered else None,
            alpha=alpha if steered else 0.0,
            stop_ids=self.stop_ids,
        )
        rows = [p for p in prompts for _ in range(num_samples)]
        scores: list[float | None] = [None] * len(rows)
        if self.scorer is not None:
            if self.shared_vocab:
                scores = self.scorer.score_ids(self.scorer.prompt_ids(rows), [r.token_ids for r in responses])
            else:
                ids = [r.token_ids for r in responses]
                ended = [bool(i) and i[-1] in self.stop_ids for i in ids]
                # the text as drawn (a stop string included), as CBS scores its candidates
                scores = self.scorer.score(rows, self.tokenizer.batch_decode(ids, skip_special_tokens=True), ended)
        return [Generation(r.text, r.token_ids, score, r.finished, r.logp) for r, score in zip(responses, scores)]
