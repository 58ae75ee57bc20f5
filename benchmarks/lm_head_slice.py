"""A bfloat16 lm_head on a strided slice of the hidden states against a contiguous copy, on this CPU.

transformers slices the hidden states before the lm_head (`logits_to_keep`): at every generation
step (1 position) and in every response log-prob forward (the response positions). On CPU a
bfloat16 matmul with a strided input falls to a slow path; `models.contiguous_lm_head_input` copies
the slice first. Prints the time ratio strided / contiguous per case, measured side by side.

    python benchmarks/lm_head_slice.py [--hidden 576] [--vocab 49152] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.nn import functional as F


def seconds(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=576, help="hidden size (SmolLM2-135M: 576)")
    parser.add_argument("--vocab", type=int, default=49152, help="vocabulary size (SmolLM2: 49152)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    cases = {"generation_step": (32, 49, 1), "response_logps": (8, 107, 45)}  # (rows, positions, kept)
    for dtype in (torch.bfloat16, torch.float32):
        weight = torch.randn(args.vocab, args.hidden, dtype=dtype)
        for name, (rows, positions, kept) in cases.items():
            hidden = torch.randn(rows, positions, args.hidden, dtype=dtype)
            sliced = hidden[:, -kept:, :]
            strided = seconds(lambda s=sliced, w=weight: F.linear(s, w), args.repeats)
            copied = seconds(lambda s=sliced, w=weight: F.linear(s.contiguous(), w), args.repeats)
            print(f"{name}_{str(dtype).split('.')[-1]}_strided_over_contiguous: {strided / copied:.2f}")


if __name__ == "__main__":
    main()
