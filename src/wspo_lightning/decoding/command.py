"""`wspo generate`: answer the prompts of a JSONL file by a decoding method (plain sampling, proxy / EFT
sampling, chunk-level beam search, best-of-N, or one of your own named by import path: `methods.py`), write
JSONL (prompt, response, score, settings), and optionally report a gold reward. Flags and `--config gen.yaml`
both work; `--print_config` shows the full config. `configs/generate/tiny_cbs.yaml` is an example with every key
commented; docs/decoding.md describes the options, their old names and the seeding rule."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch

from wspo_lightning.commands import parse
from wspo_lightning.data.records import load_prompts
from wspo_lightning.decoding.args import SamplingArgs, renamed
from wspo_lightning.decoding.methods import methods_help, resolve_method
from wspo_lightning.decoding.shards import POSITION, launch_rank, my_positions, rank_device, write_rows
from wspo_lightning.errors import InputError
from wspo_lightning.hardware import resolve_device
from wspo_lightning.io import read_jsonl
from wspo_lightning.models import ModelSpec
from wspo_lightning.rewards import load_reward


@dataclass(kw_only=True)
class GenerateConfig(SamplingArgs):
    """Decode prompts with the strong model, alone or steered by a weak pair."""

    where: ClassVar[str] = "generate"

    strong: ModelSpec
    """The frozen strong model that writes the responses."""
    prompts: str
    """Prompts: a .jsonl/.json/.parquet file, a dataset folder (`save_to_disk` or the Hub's layout) or a Hub
    dataset id, with a prompt per record (text or messages)."""
    prompt_column: str = "prompt"
    """The field holding the prompt: a string, or a conversation (e.g. `messages`, its final assistant turn
    dropped)."""
    split: str | None = None
    """The split of a dataset with several (e.g. test_prefs)."""
    out: str = "generations.jsonl"
    """Output JSONL per line: id (if the prompt has one), prompt, response, score (weak-pair reward), finished,
    response_ids and num_tokens (strong tokens), logp (log-likelihood under the sampler; null for cbs and bon),
    tokenizer_fingerprint (of the strong renderer), reward (if asked) and settings."""
    weak_base: ModelSpec | None = None
    """Weak model before alignment (needed by proxy, cbs and bon)."""
    weak_aligned: ModelSpec | None = None
    """Weak model after alignment (needed by proxy, cbs and bon)."""
    method: str = "cbs"
    """How to decode: a name registered in `wspo_lightning.decoding.methods.METHODS`, or the import path of a
    `DecodingMethod` subclass or instance (`my_pkg.decoding.MyMethod`, `my_pkg.decoding:mine`)."""
    beam_width: int = 4
    """CBS: W, beams kept per prompt."""
    num_continuations: int = 4
    """CBS: K, continuations sampled from every beam per round."""
    chunk_length: int = 10
    """CBS: L, tokens per continuation (1: token-level search)."""
    best_of: int = 16
    """bon: N, samples per prompt (the weak-to-strong search paper matches it to CBS's W*K)."""
    alpha: float = 1.0
    """Proxy: weight of log pi_weak_aligned - log pi_weak_base (0: plain sampling)."""
    use_chat_template: bool = True
    """Render each prompt as a user turn of each tokenizer's chat template (if it has one)."""
    prompt_template: str = "{prompt}"
    """Plain template with a `{prompt}` field, for a tokenizer without a chat template."""
    limit: int | None = None
    """Only the first `limit` prompts."""
    reward: str | dict | None = None
    """Gold reward reported per response and on average: null, `vader`, `rm:PATH` (a reward model), an import
    path of a reward class, or a class_path/init_args block (`wspo_lightning.rewards.load_reward`)."""
    device: str | None = "auto"
    """auto (a GPU when there is one; null reads the same), cpu, cuda, cuda:1, ..."""
    output: str | None = None
    """Deprecated name of `out` (still read, with a warning)."""
    chat_template: bool | None = None
    """Deprecated name of `use_chat_template` (still read, with a warning)."""

    def __post_init__(self) -> None:
        renamed(self, "output", "out", "generations.jsonl")
        renamed(self, "chat_template", "use_chat_template", True)
        super().__post_init__()
        positive = {"beam_width": " (W)", "num_continuations": " (K)", "chunk_length": " (L)", "best_of": " (N)"}
        for name, letter in positive.items():
            if getattr(self, name) < 1:
                raise InputError(f"generate: {name}{letter} must be >= 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise InputError(f"generate: limit must be >= 1 or null, got {self.limit}")
        if (self.weak_base is None) != (self.weak_aligned is None):
            raise InputError("generate: weak_base and weak_aligned go together: give both or neither")
        method = resolve_method(self.method)  # a mistyped name or a bad import path fails before any model loads
        unknown = sorted(set(method.options) - {f.name for f in fields(self)})
        if unknown:
            raise InputError(
                f"generate: method {self.method} declares options that generate does not have: {unknown} "
                "(`options` names GenerateConfig fields)"
            )
        if method.needs_weak_pair and self.weak_base is None:
            raise InputError(f"generate: method {self.method} needs weak_base and weak_aligned")

    def settings(self) -> dict:
        """The decoding settings written next to every output line."""
        out = {
            "method": self.method,
            "strong": self.strong.path,
            "weak_base": self.weak_base.path if self.weak_base else None,
            "weak_aligned": self.weak_aligned.path if self.weak_aligned else None,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "max_new_tokens": self.max_new_tokens,
            "stop": self.stop,
            "seed": self.seed,
            "use_chat_template": self.use_chat_template,
            "prompt_template": self.prompt_template,
        }
        out.update({name: getattr(self, name) for name in resolve_method(self.method).options})
        return out


def main(argv: list[str] | None = None) -> int:
    """`wspo generate [--config gen.yaml] [--flag value ...]`; returns the exit code."""
    generate(GenerateConfig(**parse(GenerateConfig, argv, "wspo generate", extra_help={"method": methods_help()})))
    return 0


def generate(config: GenerateConfig) -> list[dict]:
    """Run `config`: read prompts, load models, decode, score, write `config.out`; returns the records."""
    from tqdm.auto import tqdm

    from wspo_lightning.decoding.runner import Decoder
    from wspo_lightning.models import check_model_path

    # bad input fails before any model loads; under torchrun this rank takes its share of the prompts
    every = load_prompts(config.prompts, config.split, config.prompt_column, config.limit)
    positions = my_positions(len(every))
    records = [every[i] for i in positions]
    if launch_rank()[1] > 1 and config.seed is None:
        raise InputError("generate: give a seed to split the prompts over ranks (each rank would draw its own)")
    for role in ("strong", "weak_base", "weak_aligned"):
        if getattr(config, role) is not None:
            check_model_path(getattr(config, role), role)
    reward = load_reward(config.reward) if config.reward else None
    device = torch.device(resolve_device(rank_device(config.device)))
    method = resolve_method(config.method)
    decoder = Decoder(config, device, shared_vocabulary=method.needs_shared_vocabulary)
    settings = config.settings() | {"seed": decoder.seed}  # a fresh seed (seed: null) is recorded, to rerun
    out = []
    per_batch = max(1, config.batch_size // method.rows_per_prompt(config))
    with tqdm(total=len(records), desc=f"generate ({config.method})", unit="prompt", dynamic_ncols=True) as bar:
        for first in range(0, len(records), per_batch):
            batch = records[first : first + per_batch]
            prompts = [r["prompt"] for r in batch]
            decoder.indices = positions[first : first + len(batch)]  # positions in the file seed the draws
            generations = method.decode(decoder, prompts)
            rewards = reward(prompts, [g.response for g in generations]) if reward is not None else [None] * len(batch)
            for position, record, g, value in zip(decoder.indices, batch, generations, rewards):
                row = {POSITION: position, "id": record["id"]}
                row.update(
                    prompt=record["prompt"],
                    response=g.response,
                    score=g.score,
                    finished=g.finished,
                    response_ids=g.token_ids,
                    num_tokens=len(g.token_ids),
                    logp=g.logp,
                    tokenizer_fingerprint=decoder.renderer.fingerprint,
                )
                if reward is not None:
                    row["reward"] = float(value)
                row["settings"] = settings
                out.append(row)
            bar.update(len(batch))
    if write_rows(config.out, out):  # rank 0 (or the only process) writes the whole file and reports
        out = read_jsonl(config.out)
        _report(config, out)
    return out


def _report(config: GenerateConfig, rows: list[dict]) -> None:
    print(f"wrote {len(rows)} generations ({config.method}) to {config.out}")
    scores = [r["score"] for r in rows if r["score"] is not None]
    if scores:
        print(f"mean weak score: {sum(scores) / len(scores):.4f}")
    if config.reward:
        rewards = [r["reward"] for r in rows]
        print(f"mean reward ({config.reward}): {sum(rewards) / len(rewards):.4f}")
