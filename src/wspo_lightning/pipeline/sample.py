"""Stage `sample`: completions of prompts from one model, with their log-likelihood under the sampler.

Plain `transformers` generation, batched with left padding, prompts rendered and stopped as in
training (`Renderer`: the chat template's end-of-turn is a stop id). Each output record keeps the
response text, its token ids as drawn (the stop token included), whether a stop id ended it
(`finished`; False: cut by `max_new_tokens`), the renderer's fingerprint, and `logp` = sum_t log q(y_t | x,
y_<t) under the distribution it was drawn from (temperature, top_k and top_p applied), so `evaluate` can
estimate KL(sampler || reference) from the samples.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from wspo_lightning.commands import run_function
from wspo_lightning.errors import InputError
from wspo_lightning.hardware import resolve_device
from wspo_lightning.io import read_jsonl, write_jsonl
from wspo_lightning.logprobs import cut_at_stop, left_pad
from wspo_lightning.models import ModelSpec, check_model_path, load_model, load_tokenizer
from wspo_lightning.pipeline.stage import done, say
from wspo_lightning.render import Renderer


def sample(
    model: ModelSpec,
    prompts: str,
    out: str,
    num_samples: int = 1,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    batch_size: int = 32,
    seed: int = 0,
    limit: int | None = None,
    use_chat_template: bool = True,
    prompt_template: str = "{prompt}",
    device: str = "auto",
    force: bool = False,
) -> Path:
    """Sample `num_samples` responses per prompt and write them as JSONL.

    Args:
        model: the model to sample from.
        prompts: JSONL with a `prompt` field per record (text or messages; an optional `id`).
        out: output JSONL: id, prompt, sample, response, response_ids, finished, logp, num_tokens,
            tokenizer_fingerprint.
        num_samples: responses per prompt.
        max_new_tokens: response length cap in tokens.
        temperature: sampling temperature.
        top_k: keep the k most likely tokens (0: all).
        top_p: nucleus sampling mass (1: all).
        batch_size: sequences generated together.
        seed: base seed; batch i uses seed + i, so a rerun gives the same samples.
        limit: use only the first `limit` prompts.
        use_chat_template: render prompts with the tokenizer's chat template when it has one.
        prompt_template: plain template with a `{prompt}` field, used without a chat template.
        device: "auto" (a GPU when there is one), "cpu", "cuda", "cuda:1", ...
        force: redo even if `out` exists.
    """
    if done("sample", out, force):
        return Path(out)
    if num_samples < 1 or max_new_tokens < 1 or batch_size < 1:
        raise InputError("sample: num_samples, max_new_tokens and batch_size must be >= 1")
    records = read_jsonl(prompts, required=["prompt"])[:limit]
    check_model_path(model, "model")
    say("sample", f"{len(records)} prompts x {num_samples} from {model.path} -> {out}")
    renderer = Renderer(load_tokenizer(model), use_chat_template, prompt_template, name=model.path)
    lm = load_model(model, trainable=False, device=resolve_device(device))
    jobs = [(i, r, k) for i, r in enumerate(records) for k in range(num_samples)]
    rows, start, new_tokens = [], time.perf_counter(), 0
    bar = tqdm(total=len(jobs), desc=f"sample {Path(model.path).name}", unit="seq", dynamic_ncols=True)
    for b, first in enumerate(range(0, len(jobs), batch_size)):
        batch = jobs[first : first + batch_size]
        torch.manual_seed(seed + b)
        generated = generate(
            lm, renderer, [r["prompt"] for _, r, _ in batch], max_new_tokens, temperature, top_k, top_p
        )
        for (i, record, k), g in zip(batch, generated):
            rows.append({"id": str(record.get("id", i)), "prompt": record["prompt"], "sample": k, **g})
            new_tokens += g["num_tokens"]
        bar.update(len(batch))
        bar.set_postfix(tok_s=f"{new_tokens / (time.perf_counter() - start):.0f}")
    bar.close()
    write_jsonl(out, rows)
    finished = sum(r["finished"] for r in rows)
    say(
        "sample",
        f"wrote {len(rows)} samples ({finished} ended by a stop token, {len(rows) - finished} cut at "
        f"{max_new_tokens} tokens; {new_tokens / (time.perf_counter() - start):.0f} tokens/s) to {out}",
    )
    return Path(out)


@torch.no_grad()
def generate(
    lm,
    renderer: Renderer,
    prompts: list,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> list[dict]:
    """One sampled response per prompt: `{response, response_ids, logp, num_tokens, finished,
    tokenizer_fingerprint}` (see the module docstring)."""
    stop = renderer.stop_ids(lm)
    pad = renderer.pad_id
    input_ids, attention_mask = left_pad(renderer.prompt_ids(prompts), pad, lm.device)
    out = lm.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        do_sample=True,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad,
        eos_token_id=stop,
        output_scores=True,
        return_dict_in_generate=True,
    )
    tokens = out.sequences[:, input_ids.shape[1] :]  # [batch, new]
    scores = torch.stack(out.scores, dim=1).float()  # [batch, new, vocab]: what the draw was made from
    token_logps = torch.log_softmax(scores, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # [batch, new]
    keep, finished = cut_at_stop(tokens, stop)
    results = []
    for row in range(tokens.shape[0]):
        ids = tokens[row][keep[row]].tolist()
        results.append(
            {
                "response": renderer.decode(ids),
                "response_ids": ids,
                "logp": float(token_logps[row][keep[row]].sum()),
                "num_tokens": len(ids),
                "finished": bool(finished[row]),
                "tokenizer_fingerprint": renderer.fingerprint,
            }
        )
    return results


def main(argv: list[str] | None = None) -> int:
    return run_function(sample, argv, "wspo sample")
