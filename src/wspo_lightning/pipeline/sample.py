"""Stage `sample`: responses of one model to prompts, with their log-likelihood under the sampler.

Drawn by the project's one generate path (`wspo_lightning.decoding.generation.generate_responses`): prompts
rendered and responses stopped as in training (`Renderer`: the chat template's end-of-turn is a stop id), each
response from its own generator seeded by (seed, prompt position, sample index). Each output record keeps the
response text, its token ids as drawn (the stop token included), whether a stop ended it (`finished`; False: cut by
`max_new_tokens`), the renderer's fingerprint, and `logp` = sum_t log q(y_t | x, y_<t) under the distribution it
was drawn from (temperature, top_k and top_p applied), so `evaluate` can estimate KL(sampler || reference).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from tqdm.auto import tqdm

from wspo_lightning.commands import parse
from wspo_lightning.data.records import load_prompts
from wspo_lightning.decoding.args import SamplingArgs
from wspo_lightning.decoding.generation import Response, generate_responses
from wspo_lightning.decoding.shards import POSITION, my_positions, rank_device, write_rows
from wspo_lightning.errors import InputError
from wspo_lightning.hardware import resolve_device
from wspo_lightning.io import read_jsonl
from wspo_lightning.models import ModelSpec, check_model_path, load_model, load_tokenizer
from wspo_lightning.pipeline.stage import done, say
from wspo_lightning.render import Renderer


@dataclass(kw_only=True)
class SampleConfig(SamplingArgs):
    """Sample responses of one model to the prompts of a JSONL file and write them as JSONL."""

    where: ClassVar[str] = "sample"

    model: ModelSpec
    """The model to sample from."""
    prompts: str
    """Prompts: a .jsonl/.json/.parquet file, a dataset folder (`save_to_disk` or the Hub's layout) or a Hub
    dataset id, with a prompt per record (text or messages; an optional `id`)."""
    prompt_column: str = "prompt"
    """The field holding the prompt: a string, or a conversation (e.g. `messages`, its final assistant turn
    dropped)."""
    split: str | None = None
    """The split of a dataset with several (e.g. test_prefs)."""
    out: str
    """Output JSONL: id, prompt, sample, response, response_ids, finished, logp, num_tokens, tokenizer_fingerprint."""
    num_samples: int = 1
    """Responses per prompt."""
    limit: int | None = None
    """Use only the first `limit` prompts."""
    use_chat_template: bool = True
    """Render prompts with the tokenizer's chat template when it has one."""
    prompt_template: str = "{prompt}"
    """Plain template with a `{prompt}` field, used without a chat template."""
    device: str = "auto"
    """auto (a GPU when there is one), cpu, cuda, cuda:1, ..."""
    force: bool = False
    """Redo even if `out` exists."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_samples < 1:
            raise InputError(f"sample: num_samples must be >= 1, got {self.num_samples}")
        if self.limit is not None and self.limit < 1:
            raise InputError(f"sample: limit must be >= 1 or null, got {self.limit}")


def sample(model: ModelSpec, prompts: str, out: str, **options: Any) -> Path:
    """Sample responses and write them as JSONL (`SampleConfig`: `options` are its other fields, such as
    num_samples, max_new_tokens, temperature, top_k, seed, batch_size, force)."""
    return run(SampleConfig(model=model, prompts=prompts, out=out, **options))


def run(config: SampleConfig) -> Path:
    """Run `config`; returns the output path."""
    out = config.out
    if done("sample", out, config.force):
        return Path(out)
    every = load_prompts(config.prompts, config.split, config.prompt_column, config.limit)
    positions = my_positions(len(every))  # all of them, or this rank's share under torchrun
    records = [every[i] for i in positions]
    check_model_path(config.model, "model")
    n = config.num_samples
    say("sample", f"{len(records)} of {len(every)} prompts x {n} from {config.model.path} -> {out}")
    renderer = Renderer(
        load_tokenizer(config.model), config.use_chat_template, config.prompt_template, name=config.model.path
    )
    lm = load_model(config.model, trainable=False, device=resolve_device(rank_device(config.device)))
    start, new_tokens = time.perf_counter(), 0
    bar = tqdm(total=len(records) * n, desc=f"sample {Path(config.model.path).name}", unit="seq", dynamic_ncols=True)

    def progress(batch: list[Response]) -> None:
        nonlocal new_tokens
        new_tokens += sum(len(r.token_ids) for r in batch)
        bar.update(len(batch))
        bar.set_postfix(tok_s=f"{new_tokens / (time.perf_counter() - start):.0f}")

    responses = generate_responses(
        lm,
        renderer,
        [r["prompt"] for r in records],
        config.sampling(),
        num_samples=n,
        indices=positions,
        progress=progress,
    )
    bar.close()
    rows = []
    for j, response in enumerate(responses):
        i, k = divmod(j, n)  # prompt-major: the prompt at position i, its sample k
        rows.append(
            {
                POSITION: positions[i],
                "id": str(records[i]["id"]),
                "prompt": records[i]["prompt"],
                "sample": k,
                "response": response.text,
                "response_ids": response.token_ids,
                "logp": response.logp,
                "num_tokens": len(response.token_ids),
                "finished": response.finished,
                "tokenizer_fingerprint": renderer.fingerprint,
            }
        )
    if not write_rows(out, rows):
        return Path(out)  # a rank's part; rank 0 writes the whole
    rows = read_jsonl(out)
    finished = sum(r["finished"] for r in rows)
    say(
        "sample",
        f"wrote {len(rows)} samples ({finished} ended by a stop, {len(rows) - finished} cut at "
        f"{config.max_new_tokens} tokens; {new_tokens / (time.perf_counter() - start):.0f} tokens/s) to {out}",
    )
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    run(SampleConfig(**parse(SampleConfig, argv, "wspo sample")))
    return 0
