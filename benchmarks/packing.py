"""Padding-free packing (`data.packing: true`) against padded batches, measured side by side in one run.

A random Llama of `--hidden-size` x `--layers` over a `--vocab`-token vocabulary; `--batches` batches of
`--batch` records of mixed lengths (prompts of 8-32 tokens, responses of `--min-response` to `--max-response`,
uniformly drawn), right-padded as the data module pads them. Two workloads, each run padded
(`logprobs.response_logps`) and packed (`logprobs.packed_response_logps`) on the same batches, interleaved,
`--repeats` times (the fastest counts):

  step     a policy step: response log-probs, mean NLL, backward, AdamW step
  frozen   a frozen model's response log-probs without gradients (what a reference, the weak pair and
           `wspo precompute` run)

Throughput counts the records' real tokens, the same for both. On CPU the clock is this process's CPU time
with one thread (`--threads 1`); on a GPU (`--device cuda`) wall-clock time between synchronisations.

    .venv/bin/python benchmarks/packing.py                      # ~1-2 minutes on 2 CPU cores

Ends with `name: value` lines: `packed_over_padded_*` is packed tokens/s over padded tokens/s (higher is better).
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # wspo_step, as a sibling script

from wspo_lightning.logprobs import first_fit, packed_response_logps, response_logps, right_pad  # noqa: E402
from wspo_lightning.models import ModelSpec, disable_dropout, load_model  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--min-response", type=int, default=8)
    p.add_argument("--max-response", type=int, default=384)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="weight dtype (bfloat16 on a GPU)")
    p.add_argument("--attn-implementation", default="sdpa", help="sdpa, eager, flash_attention_2 (GPU)")
    return p.parse_args(argv)


def mixed_batches(args) -> list[tuple]:
    generator = torch.Generator().manual_seed(0)

    def draw(low: int, high: int) -> list[int]:
        n = int(torch.randint(low, high + 1, (1,), generator=generator))
        return torch.randint(10, args.vocab, (n,), generator=generator).tolist()

    out = []
    for _ in range(args.batches):
        prompts = [draw(8, 32) for _ in range(args.batch)]
        responses = [draw(args.min_response, args.max_response) for _ in range(args.batch)]
        out.append(tuple(t.to(args.device) for t in right_pad(prompts, responses, pad_id=0)))
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from wspo_step import fastest, write_model

    from wspo_lightning.tiny import build_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        folder, tokenizer = Path(tmp) / "model", build_tokenizer()
        path = write_model(
            folder, tokenizer, args.hidden_size, args.layers, args.vocab, 0, args.device, getattr(torch, args.dtype)
        )
        spec = ModelSpec(path=str(path), dtype=args.dtype, attn_implementation=args.attn_implementation)
        policy = load_model(spec, trainable=True, device=args.device)
        frozen = load_model(spec, device=args.device)
    disable_dropout(policy)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    batches = mixed_batches(args)

    def step(forward):
        for rows in batches:
            logps, mask = forward(policy, *rows)
            (-(logps * mask).sum() / mask.sum()).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def frozen_forward(forward):
        for rows in batches:
            forward(frozen, *rows)

    variants = {
        (work, name): functools.partial(runner, forward)
        for work, runner in (("step", step), ("frozen", frozen_forward))
        for name, forward in (("padded", response_logps), ("packed", packed_response_logps))
    }
    best = fastest(variants, args.repeats, args.device)

    tokens = sum(int(rows[1].sum()) for rows in batches)
    padded_tokens = sum(rows[1].numel() for rows in batches)
    packed_tokens = 0
    for rows in batches:
        lengths = rows[1].sum(dim=1).tolist()
        bins = first_fit(lengths, rows[1].shape[1])
        packed_tokens += len(bins) * max(sum(lengths[i] for i in b) for b in bins)
    print(
        f"\nLlama {args.hidden_size}x{args.layers}, vocab {args.vocab}, {args.attn_implementation}, {args.device}, "
        f"{torch.get_num_threads()} thread(s); {args.batches} batches of {args.batch} records, responses "
        f"{args.min_response}-{args.max_response} tokens; fastest of {args.repeats}"
    )
    print(
        f"tokens: {tokens} real, {padded_tokens} computed padded, {packed_tokens} computed packed "
        f"({padded_tokens / packed_tokens:.2f}x fewer)"
    )
    for (work, name), seconds in best.items():
        print(f"  {work:<7}{name:<8}{seconds:9.3f} s  {tokens / seconds:10.0f} tokens/s")
    print()
    print(f"computed_tokens_padded_over_packed: {padded_tokens / packed_tokens:.3f}")
    for work in ("step", "frozen"):
        print(f"packed_over_padded_{work}: {best[(work, 'padded')] / best[(work, 'packed')]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
