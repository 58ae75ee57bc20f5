"""Plain and proxy / EFT sampling from the strong model, with KV caches for all three models.

Proxy sampling (arXiv 2405.19262, docs/design.md section 2) shifts the strong model's next-token logits by
the weak pair's log-ratio, `log pi_strong + alpha * (log pi_weak_aligned - log pi_weak_base)`, then
applies the usual temperature and top-p. It needs one vocabulary shared by all three models.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from wspo_lightning.decoding.args import check_sampling
from wspo_lightning.decoding.sampling import KVState, StopChecker, draw, eos_ids, row_generators, warp


def proxy_logits(strong: Tensor, weak_aligned: Tensor | None, weak_base: Tensor | None, alpha: float) -> Tensor:
    """Next-token scores [rows, vocab] = strong logits + alpha * (log pi_weak_aligned - log pi_weak_base).

    Raw strong logits stand in for `log pi_strong`: they differ by a per-row constant, which neither
    softmax, temperature nor top-p sees, and alpha = 0 then gives the strong logits bit for bit.
    Vocabularies are cut to the smallest logits width (checkpoints pad their embeddings differently).
    """
    if alpha == 0:
        return strong
    vocab = min(strong.shape[-1], weak_aligned.shape[-1], weak_base.shape[-1])
    shift = torch.log_softmax(weak_aligned[:, :vocab], -1) - torch.log_softmax(weak_base[:, :vocab], -1)
    return strong[:, :vocab] + alpha * shift.to(strong.device)


@torch.no_grad()
def proxy_sample(
    strong,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    weak_aligned=None,
    weak_base=None,
    *,
    alpha: float = 1.0,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    max_new_tokens: int = 128,
    num_samples: int = 1,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    stop_strings: Sequence[str] = (),
    tokenizer=None,
    seed: int | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    return_ended_at: bool = False,
    return_logps: bool = False,
) -> Tensor | tuple[Tensor, ...]:
    """Sample continuations of left-padded prompts; returns the new tokens [rows, generated].

    Args:
        strong, weak_aligned, weak_base: causal LMs over one vocabulary (the weak pair may be None when alpha = 0).
        input_ids, attention_mask: [rows, prompt tokens], left-padded (0 in the mask marks padding).
        alpha: weight of the weak log-ratio; 0 is plain sampling from `strong`.
        temperature, top_k, top_p: applied to the combined scores in `generate`'s order (temperature 0: greedy;
            top_k 0 and top_p 1: off).
        max_new_tokens: length limit.
        num_samples: continuations per prompt, as rows prompt * num_samples + i (each prompt is encoded
            once and its cache repeated).
        eos_token_id: ids that end a row (default: the stop ids of `tokenizer`'s renderer, see `eos_ids`).
        pad_token_id: fills rows after they end (default: the model's pad id, else the first EOS id).
        stop_strings: a row also ends when its text ends with one of these (needs `tokenizer`).
        tokenizer: the strong tokenizer or its `Renderer` (for stop ids and stop strings).
        seed: one generator per row, seeded from (seed, prompt row, sample) (`row_generators`): a row's draws
            do not depend on the other rows, and equal `generate(do_sample=True, top_k=0)` on that row alone after
            `torch.manual_seed(row_seed(seed, prompt row, sample))` at alpha 0.
        generator: instead of `seed`, one generator per row (rows prompt * num_samples + i), or one shared by
            all rows (drawn from as `generate` draws from torch's RNG for the whole batch). Neither: torch's
            global RNG, shared.
        return_ended_at: also return, per row, the index of the token that ended it (-1: cut at the limit).
        return_logps: also return [rows, generated] float32: the log-probability of each drawn token under
            the distribution it was drawn from (after the weak shift, temperature, top_k and top_p; 0 when greedy;
            0 after a row ended). Their sum over a response is its exact log-likelihood under this sampler,
            so KL(sampler || strong) can be estimated from the samples.
    """
    check_sampling(temperature, top_p, max_new_tokens, top_k)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if alpha != 0 and (weak_aligned is None or weak_base is None):
        raise ValueError(f"alpha={alpha} needs both weak_aligned and weak_base models (alpha=0 is plain sampling)")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    eos = eos_ids(strong, tokenizer, eos_token_id)
    if pad_token_id is None:
        pad_token_id = getattr(strong.generation_config, "pad_token_id", None)
        pad_token_id = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    stopper = StopChecker(eos, tokenizer, stop_strings)
    models = [strong] + ([weak_aligned, weak_base] if alpha != 0 else [])
    states = [KVState(model) for model in models]
    device = states[0].device  # tokens, draws and bookkeeping live with the strong model
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    if generator is None and seed is not None:
        generator = row_generators(seed, range(input_ids.shape[0]), num_samples, device)

    logits = [
        state.prefill(input_ids.to(state.device), attention_mask.to(state.device)) for state in states
    ]  # each [prompts, vocab]
    if num_samples > 1:
        repeat = torch.arange(input_ids.shape[0], device=device).repeat_interleave(num_samples)
        for state in states:
            state.select(repeat.to(state.device))
        logits = [row_logits[repeat.to(row_logits.device)] for row_logits in logits]
    rows = input_ids.shape[0] * num_samples
    tokens = input_ids.new_zeros((rows, 0))  # [rows, generated]
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    ended_at = torch.full((rows,), -1, dtype=torch.long, device=device)
    logps = []  # per step [rows]
    for step in range(max_new_tokens):
        scores = proxy_logits(logits[0], *(logits[1:] if alpha != 0 else (None, None)), alpha)
        warped = warp(scores, temperature, top_p, top_k)
        token = draw(warped, temperature, generator, active=~done)
        if return_logps:
            drawn = (
                torch.zeros(rows, device=device)
                if temperature == 0
                else torch.log_softmax(warped, dim=-1).gather(1, token[:, None]).squeeze(1)
            )
            logps.append(torch.where(done, 0.0, drawn))
        token = torch.where(done, pad_token_id, token)
        tokens = torch.cat([tokens, token[:, None]], dim=1)
        ended, _ = stopper(tokens)
        ended_at = torch.where(ended & ~done, step, ended_at)
        done |= ended
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits = [state.extend(token[:, None].to(state.device)) for state in states]
    extra = ([ended_at] if return_ended_at else []) + ([torch.stack(logps, dim=1)] if return_logps else [])
    return (tokens, *extra) if extra else tokens


def sample(model, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs) -> Tensor:
    """Plain sampling from `model`: `proxy_sample` with alpha = 0 (same arguments, same RNG use)."""
    return proxy_sample(model, input_ids, attention_mask, alpha=0.0, **kwargs)
