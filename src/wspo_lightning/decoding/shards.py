"""Prompts split over the processes of a torchrun launch (`torchrun --nproc_per_node=8 -m wspo_lightning.cli
sample ...`): rank r decodes the prompts at positions r, r + world, ...; each rank writes its part, and rank 0
merges the parts in prompt order into the output. A response's draws depend only on (seed, prompt position,
sample index), so the merged file equals a one-process run's. (A faster engine, e.g. vLLM, would plug in where
a rank decodes its prompts: `generate_responses` / `DecodingMethod.decode`.)"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from wspo_lightning.io import write_jsonl

log = logging.getLogger(__name__)
POSITION = "_position"
"""The key of a row's prompt position in a part file (dropped from the merged output)."""


def launch_rank() -> tuple[int, int]:
    """(rank, world size) of this process under torchrun; (0, 1) alone. (Not SLURM's variables: a single
    `wspo sample` in an allocation of several tasks would wait for parts no one writes.)"""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def rank_device(device: str) -> str:
    """`auto` under a launch with GPUs: this rank's own GPU (LOCAL_RANK), not all on the first."""
    import torch

    if device == "auto" and launch_rank()[1] > 1 and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"
    return device


def my_positions(count: int) -> list[int]:
    """The prompt positions this rank decodes."""
    rank, world = launch_rank()
    return list(range(rank, count, world))


def _part(out: Path, rank: int, world: int) -> Path:
    run = os.environ.get("TORCHELASTIC_RUN_ID", "run")  # one id per launch: an older launch's parts never mix in
    return out.with_name(f".{out.name}.part-{run}-{rank}-of-{world}")


def write_rows(out: str | Path, rows: list[dict]) -> bool:
    """Write `rows` (each with its prompt's `_position`) as `out`, merged over the ranks of a launch: every rank
    writes its part; rank 0 waits for the others' and writes `out` in prompt order. True on the rank that wrote
    `out`."""
    out = Path(out)
    rank, world = launch_rank()
    if world == 1:
        write_jsonl(out, [{k: v for k, v in row.items() if k != POSITION} for row in rows])
        return True
    write_jsonl(_part(out, rank, world), rows)
    if rank != 0:
        return False
    parts, waited = [_part(out, r, world) for r in range(world)], 0.0
    while not all(p.exists() for p in parts):  # a rank that fails ends the launch (torchrun stops every rank)
        time.sleep(1.0)
        waited += 1.0
        if waited % 300 == 0:
            log.info("waiting for %d of %d parts of %s", sum(not p.exists() for p in parts), world, out)
    merged = [json.loads(line) for p in parts for line in p.read_text(encoding="utf-8").splitlines() if line]
    merged.sort(key=lambda row: row[POSITION])  # stable: a prompt's samples keep their order
    write_jsonl(out, [{k: v for k, v in row.items() if k != POSITION} for row in merged])
    for p in parts:
        p.unlink()
    return True
