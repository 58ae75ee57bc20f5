"""Stage `sample`: completions of prompts from one model, with their log-probs under that model.

Plain `transformers` generation, batched with left padding. Each output record keeps the
response text, its token ids and `logp` = sum_t log pi_model(y_t | x, y_<t) from the raw
logits (temperature 1), so `evaluate` can estimate KL(model || reference) from the samples.
That estimate is unbiased only when sampling is untempered (temperature 1, top_k 0, top_p 1),
which is the default.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from wspo_lightning.errors import InputError
from wspo_lightning.models import ModelSpec, check_model_path, load_model, load_tokenizer
from wspo_lightning.pipeline.stage import chat_text, done, read_jsonl, resolve_device, run_main, say, write_jsonl


def sample(model: ModelSpec, prompts: str, out: str, num_samples: int = 1, max_new_tokens: int = 48,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, batch_size: int = 32, seed: int = 0,
           limit: int | None = None, device: str = "auto", force: bool = False) -> Path:
    """Sample `num_samples` responses per prompt and write them as JSONL.

    Args:
        model: the model to sample from (use dtype bfloat16 on CPU: steadier and faster than float32).
        prompts: JSONL with a `prompt` field per record (and an optional `id`).
        out: output JSONL: id, prompt, sample, response, response_ids, logp, num_tokens, finished.
        num_samples: responses per prompt.
        max_new_tokens: response length cap in tokens.
        temperature: sampling temperature (1 keeps the KL estimate of `evaluate` unbiased).
        top_k: keep the k most likely tokens (0: all).
        top_p: nucleus sampling mass (1: all).
        batch_size: sequences generated together.
        seed: base seed; batch i uses seed + i, so a rerun gives the same samples.
        limit: use only the first `limit` prompts.
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
    tokenizer = load_tokenizer(model)
    tokenizer.padding_side = "left"
    lm = load_model(model, trainable=False, device=resolve_device(device))
    jobs = [(i, r, k) for i, r in enumerate(records) for k in range(num_samples)]
    rows, start, new_tokens = [], time.perf_counter(), 0
    bar = tqdm(total=len(jobs), desc=f"sample {Path(model.path).name}", unit="seq", dynamic_ncols=True)
    for b, first in enumerate(range(0, len(jobs), batch_size)):
        batch = jobs[first:first + batch_size]
        torch.manual_seed(seed + b)
        generated = _generate(lm, tokenizer, [r["prompt"] for _, r, _ in batch], max_new_tokens, temperature,
                              top_k, top_p)
        for (i, record, k), g in zip(batch, generated):
            rows.append({"id": str(record.get("id", i)), "prompt": record["prompt"], "sample": k, **g})
            new_tokens += g["num_tokens"]
        bar.update(len(batch))
        bar.set_postfix(tok_s=f"{new_tokens / (time.perf_counter() - start):.0f}")
    bar.close()
    write_jsonl(out, rows)
    say("sample", f"wrote {len(rows)} samples ({new_tokens} tokens, "
                  f"{new_tokens / (time.perf_counter() - start):.0f} tokens/s) to {out}")
    return Path(out)


@torch.no_grad()
def _generate(lm, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float, top_k: int,
              top_p: float) -> list[dict]:
    texts = [chat_text(tokenizer, p) for p in prompts]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(lm.device)
    out = lm.generate(**enc, do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p,
                      max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[:, enc["input_ids"].shape[1]:]  # [batch, new]
    logits = torch.stack(out.logits, dim=1).float()  # [batch, new, vocab], raw: temperature 1
    token_logps = torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # [batch, new]
    is_eos = tokens == tokenizer.eos_token_id
    # a response runs up to and including its first EOS; generate pads after it
    after_eos = (is_eos.cumsum(dim=1) - is_eos.int()) > 0
    keep = ~after_eos  # [batch, new]
    results = []
    for row in range(tokens.shape[0]):
        ids = tokens[row][keep[row]].tolist()
        results.append({
            "response": tokenizer.decode(ids, skip_special_tokens=True).strip(),
            "response_ids": ids,
            "logp": float(token_logps[row][keep[row]].sum()),
            "num_tokens": len(ids),
            "finished": bool(is_eos[row].any()),
        })
    return results


def main(argv: list[str] | None = None) -> int:
    return run_main(sample, argv)
