"""Test-time points at rising budgets, steered by the study's weak pair, no training: proxy / EFT sampling at a few
alphas, best-of-N by the weak log-ratio (N draws per prompt: the prefixes of one set of draws) and chunk-level beam
search at the same numbers of strong samples (W * K = N).

Every draw is untempered (temperature 1, all tokens), as the trained points' samples: best-of-N's KL to the
strong base is then bounded by log N - (N-1)/N (`kl_bound`), and proxy sampling has a likelihood to estimate it
from. CBS has neither: it is compared with best-of-N at equal budget.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from wspo_lightning.demo.rows import decode
from wspo_lightning.io import read_jsonl, write_jsonl
from wspo_lightning.models import ModelSpec
from wspo_lightning.pipeline.score import score
from wspo_lightning.study.points import Point

if TYPE_CHECKING:
    from wspo_lightning.study.seedrun import StudyRun


def cbs_shape(n: int) -> tuple[int, int]:
    """CBS's (W, K) for a budget of n strong samples: the most square factorisation, W <= K (2 -> 1x2, 8 -> 2x4)."""
    width = max(w for w in range(1, math.isqrt(n) + 1) if n % w == 0)
    return width, n // width


def points(run: StudyRun) -> list[Point]:
    """The decoding points, in report order."""
    s = run.s
    out = [Point("proxy", "alpha", a) for a in s.proxy_alphas]
    out += [Point("bon", "N", n) for n in s.budgets]
    return out + [Point("cbs", "N", n) for n in s.budgets]


def decode_points(run: StudyRun, prompts: Path) -> dict[Point, Path]:
    """Every decoding point's scored responses on `prompts` (the test prompts, given by the final evaluation)."""
    s, d = run.s, run.d
    strong = ModelSpec(str(run.strong), dtype=run.precision.dtype)
    weak = tuple(ModelSpec(str(m), dtype=run.precision.dtype) for m in run.weak_pair)
    folder = run.samples / "test"
    files: dict[Point, Path] = {}
    for point in points(run):
        if point.method in SELECTIONS:  # a selection among shared draws: no decoding of its own
            files[point] = SELECTIONS[point.method](run, prompts, strong, weak, point)
            continue
        raw, scored = folder / f"{point.name}.jsonl", folder / f"{point.name}.scored.jsonl"
        with run.timer(f"test samples: {point.name}"):
            samples, options = SETTINGS[point.method](s, point.value)
            decode(strong, weak, prompts, raw, point.method, samples, d.eval_sampling(), run.force, **options)
            score(str(raw), str(scored), reward=run.reward, force=run.force)
        files[point] = scored
    return files


def _proxy_settings(s, alpha: float) -> tuple[int, dict]:
    """Proxy sampling at `alpha`: the evaluation's samples per prompt."""
    return s.eval_samples, dict(alpha=alpha)


def _cbs_settings(s, budget: float) -> tuple[int, dict]:
    """CBS at `budget` strong samples per response (W x K): one response per prompt."""
    width, continuations = cbs_shape(int(budget))
    return 1, dict(beam_width=width, num_continuations=continuations, chunk_length=s.cbs_chunk_length)


def _best_of(run: StudyRun, prompts: Path, strong: ModelSpec, weak: tuple, point: Point) -> Path:
    """Best-of-N: the first N of the prompt's max(budgets) draws (the strong model alone, each scored by the weak
    pair), the one of highest weak log-ratio kept (ties: the first). A selection has no likelihood: logp is null."""
    folder = run.samples / "test"
    draws, scored = folder / "bon_draws.jsonl", folder / "bon_draws.scored.jsonl"
    out = folder / f"{point.name}.scored.jsonl"
    if out.exists() and not run.force:
        return out
    with run.timer("test samples: best-of-N draws"):
        most = max(run.s.budgets)
        decode(strong, weak, prompts, draws, "sample", most, run.d.eval_sampling(), run.force)
        score(str(draws), str(scored), reward=run.reward, force=run.force)
    by_prompt: dict[str, list[dict]] = {}
    for record in read_jsonl(scored):
        by_prompt.setdefault(str(record["id"]), []).append(record)
    n = int(point.value)
    kept = [max(group[:n], key=lambda r: r["score"]) for group in by_prompt.values()]
    write_jsonl(out, [{**r, "logp": None, "settings": {**r["settings"], "method": "bon", "best_of": n}} for r in kept])
    return out


SELECTIONS = {"bon": _best_of}
"""Decoding points chosen among the shared draws, by method name."""
SETTINGS = {"proxy": _proxy_settings, "cbs": _cbs_settings}
"""Decoding points run through `wspo generate`'s path: (samples per prompt, the method's options) at a point's value."""
EQUAL_BUDGET = {"cbs": "bon"}
"""A method without a likelihood (so no KL) -> the one it is compared with at the same number of strong samples."""
