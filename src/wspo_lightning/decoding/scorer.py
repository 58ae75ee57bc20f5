"""The weak pair as a scorer of responses: `sum_t log pi_weak_aligned(y_t) - log pi_weak_base(y_t)` over
the response tokens under the weak renderer (`reward_weak` of docs/design.md section 2), computed directly
or incrementally as responses grow chunk by chunk.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from transformers import DynamicCache

from wspo_lightning.decoding.sampling import KVState, as_renderer
from wspo_lightning.logprobs import IGNORE_INDEX, left_pad, summed_logps, token_logps
from wspo_lightning.render import Prompt


class WeakPairScorer:
    """Scores (prompt, response) pairs with a frozen weak pair sharing one tokenizer.

    Prompts and response text are rendered by the weak pair's `Renderer` (`tokenizer` may be one, or a
    tokenizer whose chat template is used when `chat_template`) as training renders its weak side
    (`crossvocab.add_weak_features`) for a record of that response: the text as the pipeline writes a response
    (`Renderer.decode`: surrounding whitespace stripped; the callers decode with special tokens dropped), then the
    weak template's end-of-turn when the response ended, none when it was cut.
    """

    def __init__(self, weak_aligned, weak_base, tokenizer, chat_template: bool = True, batch_size: int = 16) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.weak_aligned, self.weak_base = weak_aligned, weak_base
        self.renderer = as_renderer(tokenizer, chat_template)
        self.tokenizer = self.renderer.tokenizer
        self.batch_size = batch_size
        self.device = next(weak_aligned.parameters()).device
        # Incremental scoring hides stale cache columns by position; sliding-window caches drop columns
        # themselves, so weak models with sliding-window attention are rescored from scratch instead.
        self.incremental = not any(any(DynamicCache(config=m.config).is_sliding) for m in (weak_aligned, weak_base))

    def prompt_ids(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        return self.renderer.prompt_ids(prompts)

    def response_ids(
        self, prompts: Sequence[Prompt], responses: Sequence[str], ended: Sequence[bool] | None = None
    ) -> list[list[int]]:
        """Weak token ids of each response text, stripped of surrounding whitespace as a sampled response's text is
        (`Renderer.decode`), which training's weak side renders; `ended` (default all False): it ends with the
        end-of-turn."""
        ended = list(ended) if ended is not None else [False] * len(responses)
        return self.renderer.response_ids(prompts, [text.strip() for text in responses], ended)

    def score(
        self, prompts: Sequence[Prompt], responses: Sequence[str], ended: Sequence[bool] | None = None
    ) -> list[float]:
        """reward_weak of each (prompt, response text), recomputed from scratch; the text rendered as
        `response_ids` renders it; `ended`: with the end-of-turn."""
        return self.score_ids(self.prompt_ids(prompts), self.response_ids(prompts, responses, ended))

    def score_ids(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]]) -> list[float]:
        """reward_weak of each (prompt ids, response ids): the weak pair's summed log-ratio, full forwards."""
        pad = self.renderer.pad_id
        aligned = summed_logps(self.weak_aligned, prompt_ids, response_ids, pad, self.batch_size)
        base = summed_logps(self.weak_base, prompt_ids, response_ids, pad, self.batch_size)
        return [a - b for a, b in zip(aligned, base)]

    def start(self, prompt_ids: Sequence[Sequence[int]]) -> WeakPairState:
        """Incremental scoring state for one row per prompt (empty responses)."""
        return WeakPairState(self, prompt_ids)


class WeakPairState:
    """The weak pair's KV caches over rows (beams), for scoring responses that grow.

    Row i tracks seq = [last prompt token] + response ids; the caches hold the prompt's other tokens and
    seq[:-1]. `update` takes each row's new response, finds the longest prefix it shares with the row's
    previous one, hides cache entries past it and feeds only the rest: with one tokenizer that is just
    the new chunk; after cross-tokenizer re-tokenisation that changed earlier tokens, a little more.
    """

    def __init__(self, scorer: WeakPairScorer, prompt_ids: Sequence[Sequence[int]]) -> None:
        self.prompt_len = [len(p) for p in prompt_ids]
        ids, mask = left_pad([p[:-1] for p in prompt_ids], 0, scorer.device)
        self.models = [KVState(scorer.weak_aligned), KVState(scorer.weak_base)]
        for state in self.models:
            state.prefill(ids, mask)
        self.seqs = [[p[-1]] for p in prompt_ids]
        self.cols: list[list[int]] = [[] for _ in prompt_ids]  # cache column of seq[j], j < len(seq) - 1
        self.deltas: list[list[float]] = [[] for _ in prompt_ids]  # delta_weak of each response token

    def select(self, rows: Tensor) -> None:
        """Keep (reorder, repeat) these rows."""
        for state in self.models:
            state.select(rows)
        index = rows.tolist()
        self.prompt_len = [self.prompt_len[i] for i in index]
        self.seqs = [self.seqs[i] for i in index]
        self.cols = [self.cols[i] for i in index]
        self.deltas = [self.deltas[i] for i in index]

    def scores(self) -> list[float]:
        return [sum(row) for row in self.deltas]

    @torch.no_grad()
    def update(self, responses: Sequence[Sequence[int]]) -> list[float]:
        """Set each row's response (weak token ids) and return its reward_weak."""
        width_old = self.models[0].mask.shape[1]
        new_seqs, starts, feeds = [], [], []
        for old, response in zip(self.seqs, responses):
            new = old[:1] + list(response)
            start = len(old) - 1 if new[: len(old)] == old else _common_prefix(old, new) - 1
            new_seqs.append(new)
            starts.append(start)
            feeds.append(new[start:-1])  # predicts new[start + 1:]
        self._feed(new_seqs, starts, feeds, max(len(f) for f in feeds), width_old)
        self.seqs = new_seqs
        return self.scores()

    def _feed(self, new_seqs, starts, feeds, width: int, width_old: int) -> None:
        device = self.models[0].mask.device
        hidden = torch.zeros((len(feeds), width_old), dtype=torch.bool)
        tokens = torch.zeros((len(feeds), width), dtype=torch.long)  # right-padded block [rows, width]
        token_mask = torch.zeros_like(tokens)
        labels = torch.full_like(tokens, IGNORE_INDEX)
        for i, (seq, start, feed) in enumerate(zip(new_seqs, starts, feeds)):
            hidden[i, self.cols[i][start:]] = True  # stale entries past the shared prefix
            if feed:
                tokens[i, : len(feed)] = torch.tensor(feed)
                token_mask[i, : len(feed)] = 1
                labels[i, : len(feed)] = torch.tensor(seq[start + 1 :])
        first = torch.tensor([p - 1 + s for p, s in zip(self.prompt_len, starts)])
        position_ids = (first[:, None] + torch.arange(width)[None]).to(device)
        tokens, token_mask, labels = tokens.to(device), token_mask.to(device), labels.to(device)
        logps = []
        for state in self.models:
            state.hide(hidden.to(device))
            if width:  # else nothing to feed: rows only kept or shortened their responses
                logits = state.extend(tokens, token_mask, position_ids, last_only=False)  # [rows, width, vocab]
                logps.append(token_logps(logits, labels))
        delta = (logps[0] - logps[1]).tolist() if width else [[] for _ in feeds]  # [rows, width]
        for i, (start, feed) in enumerate(zip(starts, feeds)):
            self.deltas[i] = self.deltas[i][:start] + delta[i][: len(feed)]
            self.cols[i] = self.cols[i][:start] + list(range(width_old, width_old + len(feed)))


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
