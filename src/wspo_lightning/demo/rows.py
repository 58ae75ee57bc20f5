"""The rows of the demo's results table: each sampled (or decoded) on the evaluation prompts and scored by
the gold reward as soon as its model exists, so a stopped run keeps every finished row."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from wspo_lightning.decoding.args import SamplingArgs
from wspo_lightning.demo.settings import DemoSettings
from wspo_lightning.io import read_jsonl, write_jsonl
from wspo_lightning.models import ModelSpec
from wspo_lightning.pipeline.evaluate import EvalRow
from wspo_lightning.pipeline.sample import sample
from wspo_lightning.pipeline.score import score
from wspo_lightning.pipeline.stage import done

STRONG_BASE = "strong base"


class Rows:
    """Evaluation rows, in table order.

    Args:
        s: the demo's settings.
        dtype: weights of every model that samples or scores ("bfloat16" or "float32", from the CPU).
        prompts: the evaluation prompts (JSONL).
        folder: where each row's samples and scored samples go.
        weak_pair: the weak_base and weak_aligned folders that steer the decoding rows.
        reward: the gold reward (import path or instance).
        timer: the demo's `Timer`.
        force: redo rows whose files exist.
    """

    def __init__(
        self,
        s: DemoSettings,
        dtype: str,
        prompts: Path,
        folder: Path,
        weak_pair: tuple[Path, Path],
        reward: Any,
        timer: Any,
        force: bool,
    ) -> None:
        self.s, self.dtype, self.prompts, self.folder = s, dtype, prompts, folder
        self.weak_base, self.weak_aligned = weak_pair
        self.reward, self.timer, self.force = reward, timer, force
        self.rows: list[EvalRow] = []

    def spec(self, path: Path) -> ModelSpec:
        return ModelSpec(str(path), dtype=self.dtype)

    def _files(self, name: str) -> tuple[Path, Path]:
        slug = f"{len(self.rows):02d}_" + "".join(c if c.isalnum() else "_" for c in name).strip("_")
        return self.folder / f"{slug}.jsonl", self.folder / f"{slug}.scored.jsonl"

    def sampled(self, name: str, model: Path, kl: bool = True) -> None:
        """Plain samples, untempered (temperature 1, all tokens): the sampler whose likelihood the KL uses
        (`kl=False`: no KL for this row, see `EvalRow.kl`)."""
        raw, scored = self._files(name)
        with self.timer(f"eval samples: {name}"):
            sampling = vars(self.s.eval_sampling())
            sample(
                self.spec(model),
                str(self.prompts),
                str(raw),
                num_samples=self.s.eval_samples,
                force=self.force,
                **sampling,
            )
            score(str(raw), str(scored), reward=self.reward, force=self.force)
        self.rows.append(EvalRow(name, str(scored), kl=kl))

    def decoded(self, name: str, method: str, strong: Path, baseline: str | None = None) -> None:
        """`wspo generate` with `method` steered by the weak pair; its paired difference is taken against
        `baseline` (default: the strong base). A method whose weak pair steers the sampler (proxy) samples
        untempered; the others (sample, bon, cbs) draw with the search's sampler, and a search keeps one of
        W * K draws, as CBS."""
        from wspo_lightning.decoding.methods import resolve_method

        s = self.s
        raw, scored = self._files(name)
        decoding = resolve_method(method)
        sampling = s.eval_sampling() if decoding.steers_sampler else s.search_sampling()
        repeats = s.search_samples if decoding.search else s.eval_samples
        weak_pair = (self.spec(self.weak_base), self.spec(self.weak_aligned))
        with self.timer(f"eval samples: {name}"):
            decode(
                self.spec(strong),
                weak_pair,
                self.prompts,
                raw,
                method,
                repeats,
                sampling,
                self.force,
                alpha=s.proxy_alpha,
                beam_width=s.cbs_beam_width,
                num_continuations=s.cbs_continuations,
                chunk_length=s.cbs_chunk_length,
                best_of=s.cbs_beam_width * s.cbs_continuations,  # best-of-N gets CBS's budget, N = W * K
            )
            score(str(raw), str(scored), reward=self.reward, force=self.force)
        self.rows.append(EvalRow(name, str(scored), baseline=baseline))


def decode(
    strong: ModelSpec,
    weak_pair: tuple[ModelSpec, ModelSpec],
    prompts: Path,
    out: Path,
    method: str,
    repeats: int,
    sampling: SamplingArgs,
    force: bool,
    **options: Any,
) -> Path:
    """`wspo generate` of `method` (steered by the weak pair: weak_base, weak_aligned) on every prompt of `prompts`,
    each `repeats` times in a row, into `out`, unless it exists. `options` are the method's `GenerateConfig` fields
    (alpha, beam_width, num_continuations, chunk_length, best_of); `sampling`'s batch_size counts sequences: a
    search's W * K draws share a batch."""
    from wspo_lightning.decoding.command import GenerateConfig, generate

    if done("generate", out, force):
        return out
    repeated = out.with_name(f"{out.stem}.prompts.jsonl")
    write_jsonl(repeated, [r for r in read_jsonl(prompts) for _ in range(repeats)])
    weak_base, weak_aligned = weak_pair
    generate(
        GenerateConfig(
            strong=strong,
            weak_base=weak_base,
            weak_aligned=weak_aligned,
            prompts=str(repeated),
            out=str(out),
            method=method,
            **options,
            **vars(sampling),
        )
    )
    repeated.unlink()
    return out
