"""Chunk-level beam search (CBS, weak-to-strong search, docs/design.md section 2).

Keep W beams per prompt. Each round, every beam samples K continuations of L tokens from the frozen
strong model; each candidate is scored by the weak pair's log-ratio summed over its whole response so
far; the top W candidates per prompt survive. Stops when every beam has ended (EOS or a stop string)
or at `max_new_tokens`. W = K = 1 is plain sampling; L = 1 is token-level search.

The strong model's KV cache follows the beams (rows are reordered, never re-encoded); the weak pair
scores incrementally (`WeakPairState`). When the weak tokenizer differs from the strong one, candidate
text is decoded and re-tokenised for the weak pair.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from wspo_lightning.decoding.args import check_sampling
from wspo_lightning.decoding.generation import encode_prompts, finish
from wspo_lightning.decoding.sampling import (
    KVState,
    StopChecker,
    as_renderer,
    draw,
    eos_ids,
    response_tokens,
    row_generators,
    warp,
)
from wspo_lightning.decoding.scorer import WeakPairScorer
from wspo_lightning.render import Prompt, Renderer


@dataclass
class CBSResult:
    """The best beam for one prompt."""

    prompt: Prompt
    response: str
    """Decoded response (special tokens dropped, whitespace stripped), cut before the first stop string."""
    token_ids: list[int]
    """Strong-model response ids, up to and including the token that ended it."""
    score: float
    """Weak-pair reward: sum over the generated response (a stop string included) of
    log pi_weak_aligned - log pi_weak_base."""
    finished: bool
    """Ended by EOS or a stop string (False: cut at max_new_tokens)."""


@dataclass
class ChunkRecord:
    """One round of the search, kept when a `trace` list is passed (for inspection and tests)."""

    responses: list[list[list[int]]]
    """[prompt][candidate] strong response ids so far; candidate c came from beam c // K."""
    scores: list[list[float]]
    """[prompt][candidate] weak-pair reward; -inf for the copies 1..K-1 of a beam that had already ended."""
    kept: list[list[int]]
    """[prompt][beam] indices of the kept candidates, best first."""


def check_search(beam_width: int, num_continuations: int, chunk_length: int) -> None:
    for name, value in (
        ("beam_width (W)", beam_width),
        ("num_continuations (K)", num_continuations),
        ("chunk_length (L)", chunk_length),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


@torch.no_grad()
def chunk_beam_search(
    strong,
    strong_tokenizer,
    weak_aligned,
    weak_base,
    weak_tokenizer,
    prompts: Sequence[Prompt],
    *,
    beam_width: int = 4,
    num_continuations: int = 4,
    chunk_length: int = 10,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    stop_strings: Sequence[str] = (),
    chat_template: bool = True,
    seed: int | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    rescore_text: bool | None = None,
    reuse_cache: bool = True,
    trace: list[ChunkRecord] | None = None,
    score_batch_size: int = 16,
) -> list[CBSResult]:
    """Run CBS over a batch of prompts; one `CBSResult` (the best beam) per prompt.

    Args:
        strong, strong_tokenizer: the frozen model that proposes continuations, and its tokenizer or `Renderer`.
        weak_aligned, weak_base, weak_tokenizer: the weak pair that scores them, and its tokenizer or `Renderer`
            (None: the strong one).
        prompts: text (one user turn) or message lists.
        beam_width, num_continuations, chunk_length: W, K, L.
        temperature, top_p, top_k, max_new_tokens, eos_token_id, stop_strings: as in `proxy_sample`.
        chat_template: with tokenizers (not renderers): render prompts with each one's chat template.
        seed: one generator per prompt, seeded from (seed, its position in `prompts`, 0), which all its beams
            draw from in turn: a prompt's result does not depend on the other prompts. With W = K = 1 the draws
            equal `sample`'s with the same seed.
        generator: instead of `seed`, one generator per prompt (`sampling.row_generators` with the prompts'
            positions in a larger input), or one shared by all rows. Neither: torch's global RNG.
        rescore_text: score decoded text re-tokenised by the weak tokenizer (default: only when the two
            vocabularies differ; otherwise the weak pair scores the strong token ids themselves).
        reuse_cache: False re-encodes every prefix each round and rescores from scratch (for checking and
            benchmarks; same results up to float rounding).
        trace: if a list, one `ChunkRecord` is appended per round.
        score_batch_size: candidates the weak pair scores per forward when it rescores text.
    """
    check_search(beam_width, num_continuations, chunk_length)
    check_sampling(temperature, top_p, max_new_tokens, top_k)
    if weak_aligned is None or weak_base is None:
        raise ValueError("chunk_beam_search needs both weak_aligned and weak_base models to score candidates")
    if not prompts:
        return []
    strong_renderer = as_renderer(strong_tokenizer, chat_template)
    weak_renderer = as_renderer(weak_tokenizer, chat_template) if weak_tokenizer is not None else strong_renderer
    if rescore_text is None:
        rescore_text = weak_renderer.tokenizer.get_vocab() != strong_renderer.tokenizer.get_vocab()
    search = _Search(
        strong,
        strong_renderer,
        WeakPairScorer(weak_aligned, weak_base, weak_renderer, batch_size=score_batch_size),
        prompts,
        beam_width,
        num_continuations,
        eos_token_id,
        stop_strings,
        rescore_text,
        reuse_cache,
    )
    if generator is None and seed is not None:
        generator = row_generators(seed, range(len(prompts)), 1, search.device)
    while search.length < max_new_tokens and not search.all_done:
        search.expand()
        search.sample_chunk(min(chunk_length, max_new_tokens - search.length), temperature, top_p, top_k, generator)
        search.keep_best(trace)
        if search.length < max_new_tokens and not search.all_done:
            search.feed_last()
    return search.results()


class _Search:
    """The state of one CBS run over B prompts: B * W beam rows, B * W * K while sampling a chunk."""

    def __init__(
        self,
        strong,
        renderer: Renderer,
        scorer: WeakPairScorer,
        prompts,
        W: int,
        K: int,
        eos_token_id,
        stop_strings,
        rescore_text: bool,
        reuse_cache: bool,
    ) -> None:
        self.renderer, self.tokenizer, self.scorer, self.prompts = renderer, renderer.tokenizer, scorer, list(prompts)
        self.W, self.K, self.B = W, K, len(prompts)
        self.rescore_text, self.reuse_cache, self.stop_strings = rescore_text, reuse_cache, list(stop_strings)
        self.device = next(strong.parameters()).device
        self.eos = eos_ids(strong, renderer, eos_token_id)
        self.stopper = StopChecker(self.eos, self.tokenizer, stop_strings)
        self.pad = renderer.pad_id
        self.prompt_ids, self.prompt_mask = encode_prompts(renderer, prompts, self.device)
        self.weak_prompt_ids = scorer.prompt_ids(prompts)

        beams = torch.arange(self.B, device=self.device).repeat_interleave(W)
        self.prompt_of = beams  # [rows] prompt index of each row
        self.strong = KVState(strong)
        self.logits = self.strong.prefill(self.prompt_ids, self.prompt_mask)[beams]  # [rows, vocab]
        self.strong.select(beams)
        self.weak = scorer.start(self.weak_prompt_ids) if reuse_cache and scorer.incremental else None
        if self.weak is not None:
            self.weak.select(beams)
        rows = self.B * W
        self.tokens = torch.zeros((rows, 0), dtype=torch.long, device=self.device)  # [rows, generated]
        self.ended_at = torch.full((rows,), -1, dtype=torch.long, device=self.device)  # index of the last token
        self.by_eos = torch.zeros(rows, dtype=torch.bool, device=self.device)
        self.scores = torch.zeros(rows, dtype=torch.float64)
        self.parent_done = torch.zeros(rows, dtype=torch.bool, device=self.device)

    @property
    def length(self) -> int:
        return self.tokens.shape[1]

    @property
    def all_done(self) -> bool:
        return bool((self.ended_at >= 0).all())

    def _select(self, rows: Tensor) -> None:
        self.strong.select(rows)
        if self.weak is not None:
            self.weak.select(rows)
        self.logits, self.tokens, self.prompt_of = self.logits[rows], self.tokens[rows], self.prompt_of[rows]
        self.ended_at, self.by_eos, self.scores = self.ended_at[rows], self.by_eos[rows], self.scores[rows.cpu()]

    def expand(self) -> None:
        """Each beam row becomes K candidate rows."""
        self._select(torch.arange(self.B * self.W, device=self.device).repeat_interleave(self.K))
        self.parent_done = self.ended_at >= 0

    def sample_chunk(self, n: int, temperature: float, top_p: float, top_k: int, generator) -> None:
        """Sample up to n tokens on every candidate row; the last one is fed after selection."""
        for step in range(n):
            if step > 0:
                self.logits = self.strong.extend(self.tokens[:, -1:])
            done = self.ended_at >= 0
            token = draw(warp(self.logits, temperature, top_p, top_k), temperature, generator, active=~done)
            token = torch.where(done, self.pad, token)
            self.tokens = torch.cat([self.tokens, token[:, None]], dim=1)
            ended, by_eos = self.stopper(self.tokens)
            newly = ended & ~done
            self.ended_at = torch.where(newly, self.length - 1, self.ended_at)
            self.by_eos |= by_eos & newly
            if self.all_done:
                break

    def feed_last(self) -> None:
        """Feed each kept beam's last token (or, without cache reuse, re-encode prompt + response)."""
        if self.reuse_cache:
            self.logits = self.strong.extend(self.tokens[:, -1:])
            return
        ids = torch.cat([self.prompt_ids[self.prompt_of], self.tokens], dim=1)
        mask = torch.cat([self.prompt_mask[self.prompt_of], torch.ones_like(self.tokens)], dim=1)
        self.strong = KVState(self.strong.model)
        self.logits = self.strong.prefill(ids, mask)

    def _candidate_scores(self, responses: list[list[int]]) -> Tensor:
        if self.rescore_text:
            texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
            prompts = [self.prompts[i] for i in self.prompt_of.tolist()]
            responses = self.scorer.response_ids(prompts, texts, self.by_eos.tolist())
        if self.weak is not None:
            scores = self.weak.update(responses)
        else:
            prompts = [self.weak_prompt_ids[i] for i in self.prompt_of.tolist()]
            scores = self.scorer.score_ids(prompts, responses)
        return torch.tensor(scores, dtype=torch.float64)

    def keep_best(self, trace: list[ChunkRecord] | None) -> None:
        """Score every candidate and keep the top W per prompt (ties: the earlier candidate)."""
        responses = response_tokens(self.tokens, self.ended_at)
        scores = self._candidate_scores(responses)
        copy = (torch.arange(len(scores)) % self.K != 0) & self.parent_done.cpu()
        scores[copy] = -math.inf  # a beam that had ended stays once, not K times
        per_prompt = scores.view(self.B, self.W * self.K)
        order = torch.sort(per_prompt, dim=1, descending=True, stable=True).indices[:, : self.W]  # [B, W]
        keep = (torch.arange(self.B)[:, None] * self.W * self.K + order).flatten()
        if trace is not None:
            n = self.W * self.K
            trace.append(
                ChunkRecord(
                    responses=[responses[b * n : (b + 1) * n] for b in range(self.B)],
                    scores=per_prompt.tolist(),
                    kept=order.tolist(),
                )
            )
        self.scores = scores
        self._select(keep.to(self.device))

    def results(self) -> list[CBSResult]:
        best = torch.arange(self.B, device=self.device) * self.W  # rows are sorted best first after every round
        responses = finish(self.renderer, self.tokens[best], self.eos, self.stop_strings, self.ended_at[best])
        return [
            CBSResult(prompt, r.text, r.token_ids, float(self.scores[int(row)]), r.finished)
            for prompt, r, row in zip(self.prompts, responses, best.tolist())
        ]
