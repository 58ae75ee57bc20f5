"""Pieces shared by the decoders: stop ids, a model's incremental KV state, the seeding rule (one random generator
per response), and one sampling step that draws random numbers exactly as `generate` does.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Sequence

import torch
from torch import Tensor
from transformers import DynamicCache, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
from transformers.generation.stopping_criteria import StopStringCriteria

from wspo_lightning.render import Renderer


def as_renderer(tokenizer_or_renderer, chat_template: bool = True) -> Renderer:
    """A `Renderer` as given, or one over a tokenizer (its chat template when `chat_template` and it has one)."""
    if isinstance(tokenizer_or_renderer, Renderer):
        return tokenizer_or_renderer
    return Renderer(tokenizer_or_renderer, use_chat_template=chat_template)


def eos_ids(model, tokenizer=None, eos_token_id: int | Sequence[int] | None = None) -> list[int]:
    """The ids that end a response: given ones; else the renderer's stop ids (the chat template's end-of-turn,
    the model's generation-config eos ids and the tokenizer's eos) when a tokenizer or renderer is given;
    else the model's generation-config eos ids."""
    if eos_token_id is not None:
        return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(i) for i in eos_token_id]
    if tokenizer is not None:
        return as_renderer(tokenizer).stop_ids(model)
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if config_eos is None:
        return []
    return [int(config_eos)] if isinstance(config_eos, int) else [int(i) for i in config_eos]


def warp(logits: Tensor, temperature: float, top_p: float, top_k: int = 0) -> Tensor:
    """Temperature, then top-k, then nucleus filtering, with transformers' own warpers (`generate`'s order)."""
    if temperature not in (0, 1):
        logits = TemperatureLogitsWarper(temperature)(None, logits)
    if top_k > 0:
        logits = TopKLogitsWarper(top_k)(None, logits)
    if top_p < 1:
        logits = TopPLogitsWarper(top_p)(None, logits)
    return logits


def draw(
    scores: Tensor,
    temperature: float,
    generator: torch.Generator | Sequence[torch.Generator] | None,
    active: Tensor | None = None,
) -> Tensor:
    """One token per row from warped scores [rows, vocab]; temperature 0 is argmax.

    `generator`: one for all rows (None: torch's global RNG), or a sequence of G generators for G equal groups of
    consecutive rows (one per response, or one per prompt's beams): group g draws from generator g alone, so what
    it draws does not depend on the other rows. `active` [rows] bool: groups with no active row draw nothing (their
    token is 0). `torch.multinomial(softmax, 1)` is exactly `generate(do_sample=True)`'s draw, so a group drawn with
    a generator seeded s gets what `generate` draws for those rows after `torch.manual_seed(s)`."""
    if temperature == 0:
        return scores.argmax(dim=-1)
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1, generator=generator).squeeze(1)
    rows = scores.shape[0]
    if rows % len(generator):
        raise ValueError(f"{len(generator)} generators cannot split {rows} rows into equal groups")
    size = rows // len(generator)
    live = active.view(len(generator), size).any(dim=1).tolist() if active is not None else [True] * len(generator)
    token = torch.zeros(rows, dtype=torch.long, device=scores.device)
    for g, (gen, draws) in enumerate(zip(generator, live)):
        if draws:  # one call per group: what it draws depends on its generator and its rows alone
            part = slice(g * size, (g + 1) * size)
            token[part] = torch.multinomial(torch.softmax(scores[part], dim=-1), 1, generator=gen).squeeze(1)
    return token


def row_seed(seed: int, prompt: int, sample: int = 0) -> int:
    """The seed of sample `sample` of the prompt at position `prompt` of the input: a 63-bit hash of the three
    (the same on every machine and process), so neighbouring runs and rows get unrelated streams."""
    digest = hashlib.blake2b(f"{seed}/{prompt}/{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def row_generators(
    seed: int, prompts: Sequence[int], num_samples: int, device: torch.device | str
) -> list[torch.Generator]:
    """One generator per response, prompt-major (prompt j, sample k at j * num_samples + k), each seeded with
    `row_seed(seed, prompts[j], k)`: `prompts` are the positions of the batch's prompts in the whole input."""
    return [
        torch.Generator(device=device).manual_seed(row_seed(seed, int(i), k))
        for i in prompts
        for k in range(num_samples)
    ]


def fresh_seed() -> int:
    """A seed for a run given none: drawn from torch's global RNG, so `seed_everything` still fixes it."""
    return int(torch.randint(0, 2**62, ()).item())


class StopChecker:
    """Which rows have just ended: an EOS id as the last token, or text ending in a stop string."""

    def __init__(self, eos: Sequence[int], tokenizer=None, stop: Sequence[str] = ()) -> None:
        self.eos = list(eos)
        self.stop = [s for s in stop if s]
        tokenizer = tokenizer.tokenizer if isinstance(tokenizer, Renderer) else tokenizer
        if self.stop and tokenizer is None:
            raise ValueError("stop strings need the tokenizer")
        self._strings = StopStringCriteria(tokenizer, self.stop) if self.stop else None

    def __call__(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """tokens: [rows, generated so far]. Returns (ended [rows], by_eos [rows])."""
        last = tokens[:, -1]
        by_eos = torch.zeros_like(last, dtype=torch.bool)
        for i in self.eos:
            by_eos |= last == i
        ended = by_eos.clone()
        if self._strings is not None:
            ended |= self._strings(tokens, None).to(ended.device)
        return ended, by_eos


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """Cut `text` before the first stop string (the OpenAI / vLLM convention)."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return text if cut < 0 else text[:cut]


def response_tokens(tokens: Tensor, ended_at: Tensor) -> list[list[int]]:
    """Each row's generated ids up to and including the token that ended it (`ended_at[row]`, -1: none)."""
    out = []
    for row, end in zip(tokens.tolist(), ended_at.tolist()):
        out.append(row if end < 0 else row[: end + 1])
    return out


class KVState:
    """One model's KV cache over a batch of rows, with its 2D attention mask (0 marks padding and
    hidden entries) and each row's next position id. Rows are reordered or repeated with `select`."""

    def __init__(self, model) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.cache = DynamicCache(config=model.config)
        self.mask: Tensor | None = None  # [rows, cached tokens]
        self.next_pos: Tensor | None = None  # [rows]
        self._keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters

    @torch.no_grad()
    def prefill(self, input_ids: Tensor, attention_mask: Tensor, last_only: bool = True) -> Tensor:
        """Encode left-padded prompts; returns float32 logits of the last position [rows, vocab]
        (or of every position [rows, tokens, vocab]). Position ids as `generate` builds them."""
        position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        self.mask = attention_mask.long()
        self.next_pos = attention_mask.long().sum(-1)
        if input_ids.shape[1] == 0:
            return input_ids.new_zeros((input_ids.shape[0], 0), dtype=torch.float32)
        return self._forward(input_ids, attention_mask.long(), position_ids, last_only)

    @torch.no_grad()
    def extend(
        self,
        tokens: Tensor,
        token_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        last_only: bool = True,
    ) -> Tensor:
        """Append tokens [rows, n] (token_mask 0: padding inside the block). Positions continue each row
        unless given. Returns float32 logits as `prefill` does."""
        rows, n = tokens.shape
        if token_mask is None:
            token_mask = torch.ones_like(tokens)
        if position_ids is None:
            position_ids = self.next_pos[:, None] + torch.arange(n, device=tokens.device)
            self.next_pos = self.next_pos + n
        else:
            self.next_pos = position_ids[:, -1] + 1
        self.mask = torch.cat([self.mask, token_mask.long()], dim=1)
        return self._forward(tokens, self.mask, position_ids, last_only)

    def hide(self, hidden: Tensor) -> None:
        """Mask cached entries out of attention from now on: hidden [rows, cached tokens] bool."""
        self.mask = self.mask.masked_fill(hidden, 0)

    def select(self, rows: Tensor) -> None:
        """Keep (and reorder, or repeat) these rows of the cache, mask and positions."""
        self.cache.batch_select_indices(rows)
        self.mask = self.mask[rows]
        self.next_pos = self.next_pos[rows]

    def _forward(self, ids: Tensor, mask: Tensor, position_ids: Tensor, last_only: bool) -> Tensor:
        kwargs = {"logits_to_keep": 1} if last_only and self._keep_arg else {}
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=self.cache,
            use_cache=True,
            return_dict=True,
            **kwargs,
        )
        self.cache = out.past_key_values
        logits = out.logits[:, -1] if last_only else out.logits
        return logits.to(dtype=torch.float32, copy=True)
