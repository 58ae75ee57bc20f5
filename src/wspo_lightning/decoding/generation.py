"""The one generate path: render and left-pad the prompts, draw (`proxy_sample`, alpha 0 for plain sampling),
cut at the stop ids and stop strings, decode. `wspo sample`, `wspo generate` (sample, proxy, best-of-N) and
`SampleTable` call `generate_responses`; chunk-level beam search runs its own loop between the same two halves
(`encode_prompts`, `finish`).

Seeding rule: sample k of the prompt at position i of the input draws from its own generator, seeded from
(seed, i, k) (`sampling.row_seed`), so a response depends on neither the batch size nor its batch's other prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from wspo_lightning.decoding.args import SamplingArgs
from wspo_lightning.decoding.proxy import proxy_sample
from wspo_lightning.decoding.sampling import fresh_seed, row_generators, truncate_at_stop
from wspo_lightning.logprobs import cut_at_stop, left_pad
from wspo_lightning.render import Prompt, Renderer


@dataclass
class Response:
    """One generated response."""

    text: str
    """Decoded text (special tokens dropped, surrounding whitespace stripped), cut before the first stop string."""
    token_ids: list[int]
    """Token ids as drawn, up to and including the stop id (or the last token of the stop string) that ended it."""
    finished: bool
    """Ended by a stop id or a stop string (False: cut at max_new_tokens)."""
    logp: float | None
    """sum_t log q(y_t | x, y_<t) under the distribution q each token was drawn from (weak shift, temperature,
    top_k and top_p applied; 0 when greedy); None when the response was selected among draws (a search)."""


def encode_prompts(renderer: Renderer, prompts: Sequence[Prompt], device: torch.device | str) -> tuple[Tensor, Tensor]:
    """The render-and-pad half: token ids of the rendered prompts, left-padded with the renderer's pad id
    (input_ids [rows, width], attention_mask [rows, width], 0 on padding)."""
    return left_pad(renderer.prompt_ids(prompts), renderer.pad_id, device)


def finish(
    renderer: Renderer,
    tokens: Tensor,
    stop_ids: Sequence[int],
    stop: Sequence[str] = (),
    ended_at: Tensor | None = None,
    token_logps: Tensor | None = None,
) -> list[Response]:
    """The cut-and-decode half. tokens [rows, generated]: each row is kept up to and including its first stop id
    (`cut_at_stop`) or the token at `ended_at` [rows] (where the sampler saw a stop string end; -1: none); the text
    is decoded and cut before the first stop string. `token_logps` [rows, generated]: summed over the kept tokens
    into `Response.logp` (None: no likelihood)."""
    keep, finished = cut_at_stop(tokens, stop_ids)  # [rows, generated], [rows]
    if ended_at is not None:
        by_sampler = ended_at >= 0
        steps = torch.arange(tokens.shape[1], device=tokens.device)
        keep &= ~by_sampler[:, None] | (steps[None] <= ended_at[:, None])
        finished |= by_sampler
    out = []
    for row in range(tokens.shape[0]):
        ids = tokens[row][keep[row]].tolist()
        logp = float(token_logps[row][keep[row]].sum()) if token_logps is not None else None
        text = truncate_at_stop(renderer.decode(ids), stop).strip()
        out.append(Response(text, ids, bool(finished[row]), logp))
    return out


@torch.no_grad()
def generate_responses(
    model,
    renderer: Renderer,
    prompts: Sequence[Prompt],
    args: SamplingArgs,
    *,
    indices: Sequence[int] | None = None,
    num_samples: int = 1,
    weak_pair: tuple | None = None,
    alpha: float = 0.0,
    stop_ids: Sequence[int] | None = None,
    progress: Callable[[list[Response]], None] | None = None,
) -> list[Response]:
    """`num_samples` responses to each prompt, prompt-major (prompt j, sample k at j * num_samples + k).

    Args:
        model: the causal LM that writes the responses (the strong model, the policy, ...).
        renderer: its `Renderer` (prompts as at training; the end-of-turn is a stop id).
        prompts: text or message lists.
        args: the sampler, length limit, stop strings, seed (None: a fresh one) and batch size.
        indices: each prompt's position in the whole input, which seeds its draws (default 0, 1, ...): a run over
            some of a file's prompts passes their positions to draw what the whole file's run draws for them.
        num_samples: responses per prompt (its prompt is encoded once).
        weak_pair: (weak_aligned, weak_base) for proxy / EFT sampling; None: plain sampling.
        alpha: weight of the weak pair's log-ratio added to the model's logits (0: plain sampling).
        stop_ids: ids that end a response (default: the renderer's stop ids for `model`).
        progress: called with each batch's responses.
    """
    indices = list(range(len(prompts))) if indices is None else [int(i) for i in indices]
    if len(indices) != len(prompts):
        raise ValueError(f"{len(indices)} indices for {len(prompts)} prompts")
    stop_ids = list(stop_ids) if stop_ids is not None else renderer.stop_ids(model)
    seed = args.seed if args.seed is not None else fresh_seed()
    device = next(model.parameters()).device
    per_batch = max(1, args.batch_size // num_samples)  # a prompt's samples share its batch (and its cache)
    out: list[Response] = []
    for first in range(0, len(prompts), per_batch):
        input_ids, attention_mask = encode_prompts(renderer, prompts[first : first + per_batch], device)
        tokens, ended_at, logps = proxy_sample(
            model,
            input_ids,
            attention_mask,
            *(weak_pair or (None, None)),
            alpha=alpha,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            max_new_tokens=args.max_new_tokens,
            num_samples=num_samples,
            eos_token_id=stop_ids,
            pad_token_id=renderer.pad_id,
            stop_strings=args.stop,
            tokenizer=renderer,
            generator=row_generators(seed, indices[first : first + per_batch], num_samples, device),
            return_ended_at=True,
            return_logps=True,
        )
        batch = finish(renderer, tokens, stop_ids, args.stop, ended_at, logps)
        if progress is not None:
            progress(batch)
        out += batch
    return out
