"""CBS time per prompt over plain sampling of the same W*K candidates, measured side by side in one run.

Random Llama models built in memory (no downloads): a strong model of `--hidden-size` x `--layers`
and a weak pair a quarter of its width. EOS is disabled so every method decodes exactly
`--max-new-tokens` tokens per row. Methods run interleaved, `--repeats` times; the fastest run counts.
On CPU the clock is this process's CPU time with one thread (`--threads 1`, the default), which other
jobs on a shared machine barely disturb; on GPU, or with more threads, it is wall-clock time.

    .venv/bin/python benchmarks/cbs_speed.py                     # ~1-2 minutes on 2 CPU cores
    .venv/bin/python benchmarks/cbs_speed.py --hidden-size 512 --layers 8 --device cuda

Ends with `name: value` lines (ratios: lower is better; the goal for cbs_over_sampling is <= 1.3).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from wspo_lightning.decoding import chunk_beam_search, sample
from wspo_lightning.logprobs import left_pad
from wspo_lightning.render import Renderer
from wspo_lightning.tiny import build_tiny_model, build_tokenizer, preference_records


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden-size", type=int, default=384, help="strong model width")
    p.add_argument("--layers", type=int, default=6, help="strong model depth")
    p.add_argument("--weak-hidden-size", type=int, default=None, help="weak pair width (default: hidden/4, >= 32)")
    p.add_argument("--weak-layers", type=int, default=2)
    p.add_argument("--prompts", type=int, default=2, help="prompts decoded together (one batch)")
    p.add_argument("-W", "--beam-width", type=int, default=4)
    p.add_argument("-K", "--num-continuations", type=int, default=4)
    p.add_argument("-L", "--chunk-length", type=int, default=10)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: steadier timings on small shared machines; 0: torch's choice)",
    )
    return p.parse_args(argv)


def timed(fn, clock) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = clock()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return clock() - start


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu_clock = args.device == "cpu" and torch.get_num_threads() == 1
    clock, clock_name = (time.process_time, "CPU seconds") if cpu_clock else (time.perf_counter, "wall seconds")
    tok = build_tokenizer()
    weak_hidden = args.weak_hidden_size or max(32, args.hidden_size // 4)
    strong = build_tiny_model("llama", tok, seed=0, num_layers=args.layers, hidden_size=args.hidden_size)
    weak_aligned = build_tiny_model("llama", tok, seed=1, num_layers=args.weak_layers, hidden_size=weak_hidden)
    weak_base = build_tiny_model("llama", tok, seed=2, num_layers=args.weak_layers, hidden_size=weak_hidden)
    for model in (strong, weak_aligned, weak_base):
        model.to(args.device).eval()
    prompts = [r["prompt"] for r in preference_records(args.prompts, seed=0)]
    W, K, L, T = args.beam_width, args.num_continuations, args.chunk_length, args.max_new_tokens
    ids, mask = left_pad(Renderer(tok).prompt_ids(prompts), tok.pad_token_id, args.device)
    common = dict(max_new_tokens=T, eos_token_id=[], seed=0)

    methods = {
        # the baseline: W*K samples per prompt, each prompt encoded once (as CBS does)
        "sampling": lambda: sample(strong, ids, mask, num_samples=W * K, **common),
        # for reference: generate() encodes each prompt W*K times
        "hf_generate": lambda: strong.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            top_k=0,
            max_new_tokens=T,
            min_new_tokens=T,
            num_return_sequences=W * K,
        ),
        "cbs": lambda: chunk_beam_search(
            strong,
            tok,
            weak_aligned,
            weak_base,
            tok,
            prompts,
            beam_width=W,
            num_continuations=K,
            chunk_length=L,
            **common,
        ),
        "cbs_no_cache_reuse": lambda: chunk_beam_search(
            strong,
            tok,
            weak_aligned,
            weak_base,
            tok,
            prompts,
            beam_width=W,
            num_continuations=K,
            chunk_length=L,
            reuse_cache=False,
            **common,
        ),
    }
    print(
        f"strong {args.hidden_size}x{args.layers} ({sum(p.numel() for p in strong.parameters()) / 1e6:.2f}M), "
        f"weak pair {weak_hidden}x{args.weak_layers} ({sum(p.numel() for p in weak_base.parameters()) / 1e6:.2f}M "
        f"each), vocab {len(tok)}, device {args.device}, threads {torch.get_num_threads()}"
    )
    print(f"{args.prompts} prompts, W={W} K={K} L={L}, {T} new tokens; sampling draws W*K={W * K} per prompt")
    with torch.no_grad():
        for fn in methods.values():  # warm-up
            fn()
        seconds = {name: [] for name in methods}
        for _ in range(args.repeats):
            for name, fn in methods.items():
                seconds[name].append(timed(fn, clock))
    per_prompt = {name: min(s) / args.prompts for name, s in seconds.items()}
    spread = {name: statistics.median(s) / min(s) for name, s in seconds.items()}
    base = per_prompt["sampling"]
    print(f"\n{clock_name}, fastest of {args.repeats} (median/fastest in the last column)")
    print(f"{'method':<22}{'s/prompt':>10}{'x sampling':>12}{'spread':>8}")
    for name, value in per_prompt.items():
        print(f"{name:<22}{value:>10.4f}{value / base:>12.2f}{spread[name]:>8.2f}")
    print()
    print(f"clock: {clock_name.split()[0].lower()}")
    for name, value in per_prompt.items():
        print(f"{name}_seconds_per_prompt: {value:.4f}")
    print(f"cbs_over_sampling: {per_prompt['cbs'] / base:.3f}")
    print(f"cbs_no_cache_reuse_over_sampling: {per_prompt['cbs_no_cache_reuse'] / base:.3f}")
    print(f"cache_reuse_speedup: {per_prompt['cbs_no_cache_reuse'] / per_prompt['cbs']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
