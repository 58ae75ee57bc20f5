"""What a weak pair with its own tokenizer costs (cross-tokenizer WSPO), measured side by side in one run.

Data preparation, once per run (and per rank), on `--records` toy preference records of about `--length`
tokens, the fastest of `--repeats` (process CPU time):
  shared   `tokenize_records`: the policy's rendering, all a shared-vocabulary run does
  cross    the same plus `add_weak_features`: the policy's offsets, the weak renderer's prompt and
           response tokens, their offsets, and the map (one weak tokenizer, given by --weak)

Per training step without the cache, on one batch of `--batch` records (chosen responses), one thread:
  weak_forwards  the weak pair's two forwards on its own rows (what every live WSPO step runs)
  mapping        `to_policy_tokens`: the weak deltas added onto the policy's tokens
A run from `wspo precompute`'s cache costs the same with either tokenizer: the cache holds the mapped
values in the policy's layout.

    .venv/bin/python benchmarks/crossvocab_cost.py                       # ~1 minute on 2 CPU cores
    .venv/bin/python benchmarks/crossvocab_cost.py --weak sentencepiece

Ends with `name: value` lines (ratios: lower is better).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from wspo_step import long_records, write_model

from wspo_lightning.crossvocab import add_weak_features, to_policy_tokens, weak_rows
from wspo_lightning.data.tokenize import collate, tokenize_records
from wspo_lightning.frozen import FrozenRoles
from wspo_lightning.logprobs import response_mask
from wspo_lightning.models import ModelSpec
from wspo_lightning.module.base import step_rows
from wspo_lightning.render import Renderer
from wspo_lightning.tiny import build_tokenizer

WEAK = {"gpt2_bpe": dict(shape="llama3", vocab_size=400), "sentencepiece": dict(shape="plain", model="unigram")}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weak", choices=sorted(WEAK), default="gpt2_bpe", help="the weak pair's tokenizer family")
    p.add_argument("--records", type=int, default=1000)
    p.add_argument("--length", type=int, default=128, help="about this many policy tokens per record")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--weak-hidden-size", type=int, default=128)
    p.add_argument("--weak-layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=8192, help="the weak models' vocabulary (lm_head size)")
    p.add_argument("--repeats", type=int, default=3)
    return p.parse_args(argv)


def fastest(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return min(times)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    policy, weak = Renderer(build_tokenizer()), Renderer(build_tokenizer(**WEAK[args.weak]))
    records = [{**r, "source": "bench"} for r in long_records(args.records, args.length)]
    max_length = 4 * args.length

    def shared():
        return tokenize_records(records, policy, max_length)

    def cross():
        features = tokenize_records(records, policy, max_length)
        add_weak_features(records, features, policy, weak, max_length)
        return features

    t_shared, t_cross = fastest(shared, args.repeats), fastest(cross, args.repeats)
    features = cross()
    tokens = sum(len(f["chosen_ids"]) + len(f["rejected_ids"]) for f in features)
    weak_tokens = sum(len(f["weak_chosen_ids"]) + len(f["weak_rejected_ids"]) for f in features)

    with tempfile.TemporaryDirectory() as work:
        frozen = FrozenRoles()
        for seed, role in ((1, "weak_base"), (2, "weak_aligned")):
            path = write_model(
                Path(work) / role, weak.tokenizer, args.weak_hidden_size, args.weak_layers, args.vocab, seed
            )
            frozen.load({role: ModelSpec(path=str(path))})
        batch = collate(features[: args.batch], policy.tokenizer.pad_token_id, weak.end_of_turn)
        sides, rows = step_rows(batch, pairs=False)
        mask = response_mask(rows[2])
        *weak_batch, weak_map = weak_rows(batch, sides)
        delta = frozen.delta_weak(*weak_batch)
        t_forwards = fastest(lambda: frozen.delta_weak(*weak_batch), args.repeats)
        t_mapping = fastest(lambda: to_policy_tokens(delta, weak_batch[2], weak_map, mask), 20 * args.repeats)

    print(f"weak tokenizer: {args.weak}; {args.records} records, {tokens} policy / {weak_tokens} weak response tokens")
    print(f"data preparation: shared {t_shared:.2f} s, cross {t_cross:.2f} s")
    print(f"per step (batch {args.batch}): weak forwards {1e3 * t_forwards:.1f} ms, mapping {1e3 * t_mapping:.2f} ms")
    print(f"data_cross_over_shared: {t_cross / t_shared:.2f}")
    print(f"weak_tokens_over_policy_tokens: {weak_tokens / tokens:.2f}")
    print(f"mapping_over_weak_forwards: {t_mapping / t_forwards:.4f}")


if __name__ == "__main__":
    main()
