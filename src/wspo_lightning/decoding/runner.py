"""Loads the models a `GenerateConfig` names, once, and draws samples for the decoding methods."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from wspo_lightning.decoding.proxy import proxy_sample
from wspo_lightning.decoding.sampling import make_generator, response_tokens, truncate_at_stop
from wspo_lightning.decoding.scorer import WeakPairScorer
from wspo_lightning.logprobs import left_pad
from wspo_lightning.models import check_same_vocabulary, load_model, load_tokenizer
from wspo_lightning.render import Prompt, Renderer


@dataclass
class Generation:
    """One decoded response."""

    completion: str
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
    """

    def __init__(self, config, device: torch.device, shared_vocabulary: bool = False) -> None:
        self.config = config
        self.renderer = Renderer(
            load_tokenizer(config.strong), config.chat_template, config.prompt_template, name=config.strong.path
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
                weak_tokenizer, config.chat_template, config.prompt_template, name=config.weak_base.path
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
        self.generator = make_generator(config.seed, device)

    def draw(self, prompts: Sequence[Prompt], num_samples: int, alpha: float | None = None) -> list[Generation]:
        """`num_samples` responses per prompt (rows prompt * num_samples + i), with weak scores when there is a
        weak pair. `alpha`: add alpha times the weak pair's log-ratio to the strong logits before each draw
        (proxy / EFT; needs the weak pair); None: the strong model's own sampler."""
        c = self.config
        pad = self.renderer.pad_id
        input_ids, attention_mask = left_pad(self.renderer.prompt_ids(prompts), pad, self.device)
        steered = alpha is not None
        weak = (self.scorer.weak_aligned, self.scorer.weak_base) if steered else (None, None)
        tokens, ended_at, logps = proxy_sample(
            self.strong,
            input_ids,
            attention_mask,
            *weak,
            alpha=alpha if steered else 0.0,
            temperature=c.temperature,
            top_p=c.top_p,
            top_k=c.top_k,
            max_new_tokens=c.max_new_tokens,
            num_samples=num_samples,
            eos_token_id=self.stop_ids,
            pad_token_id=pad,
            stop_strings=c.stop,
            tokenizer=self.tokenizer,
            generator=self.generator,
            return_ended_at=True,
            return_logps=True,
        )
        responses = response_tokens(tokens, ended_at)
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        finished = (ended_at >= 0).tolist()
        rows = [p for p in prompts for _ in range(num_samples)]
        scores: list[float | None] = [None] * len(rows)
        if self.scorer is not None:
            if self.shared_vocab:
                scores = self.scorer.score_ids(self.scorer.prompt_ids(rows), responses)
            else:
                ended = [bool(r) and r[-1] in self.stop_ids for r in responses]
                scores = self.scorer.score(rows, texts, ended)
        return [
            Generation(truncate_at_stop(text, c.stop), ids, score, end, float(row_logps.sum()))
            for text, ids, score, end, row_logps in zip(texts, responses, scores, finished, logps)
        ]
