"""Loads the models a `GenerateConfig` names and decodes batches of prompts with its method."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from wspo_lightning.decoding.cbs import chunk_beam_search
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
    """`decoder(prompts) -> [Generation per prompt]` for one config."""

    def __init__(self, config, device: torch.device) -> None:
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
            if config.method == "proxy":  # per-token logits need one vocabulary
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

    def __call__(self, prompts: Sequence[Prompt]) -> list[Generation]:
        c = self.config
        if c.method == "cbs":
            results = chunk_beam_search(
                self.strong,
                self.renderer,
                self.scorer.weak_aligned,
                self.scorer.weak_base,
                self.scorer.renderer,
                prompts,
                beam_width=c.beam_width,
                num_continuations=c.num_continuations,
                chunk_length=c.chunk_length,
                max_new_tokens=c.max_new_tokens,
                temperature=c.temperature,
                top_p=c.top_p,
                top_k=c.top_k,
                eos_token_id=self.stop_ids,
                stop_strings=c.stop,
                generator=self.generator,
                score_batch_size=c.batch_size,
            )
            return [Generation(r.completion, r.token_ids, r.score, r.finished, None) for r in results]
        if c.method == "bon":
            return self._best_of(prompts)
        return self._sample(prompts)

    def _draw(self, prompts: Sequence[Prompt], num_samples: int) -> list[Generation]:
        """`num_samples` responses per prompt (rows prompt * num_samples + i), with weak scores when there is a
        weak pair."""
        c = self.config
        pad = self.renderer.pad_id
        input_ids, attention_mask = left_pad(self.renderer.prompt_ids(prompts), pad, self.device)
        weak = (self.scorer.weak_aligned, self.scorer.weak_base) if c.method == "proxy" else (None, None)
        tokens, ended_at, logps = proxy_sample(
            self.strong,
            input_ids,
            attention_mask,
            *weak,
            alpha=c.alpha if c.method == "proxy" else 0.0,
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

    def _sample(self, prompts: Sequence[Prompt]) -> list[Generation]:
        return self._draw(prompts, 1)

    def _best_of(self, prompts: Sequence[Prompt]) -> list[Generation]:
        """Best-of-N: N plain samples per prompt, the one with the highest weak-pair reward kept."""
        n = self.config.best_of
        drawn = self._draw(prompts, n)
        best = [max(drawn[i * n : (i + 1) * n], key=lambda g: g.score) for i in range(len(prompts))]
        return [Generation(g.completion, g.token_ids, g.score, g.finished, None) for g in best]
