"""Golden trajectory (TRL's tests/invariant style): a short fixed-seed WSPO run on the tiny world whose
training losses are pinned, so a change that silently alters the maths (loss, masks, log-probs, data
order, optimiser, schedules) fails here even when every unit test still passes.

The run: `wspo fit` on configs/tiny_cpu.yaml over `write_tiny_world(arch="llama")` (conftest's
`tiny_world`: 64 training records, seed 42), gamma constant 2.0 (so a gamma slip shows), 6 steps,
no validation. Step 0 has policy == reference, so its loss is gamma^2 * mean(delta_weak^2): the weak
pair, masks and data alone; later steps add gradients, AdamW and the LR schedule.

Tolerance: rtol 1e-4. Float noise does far less (perturbing every policy weight by 1e-7 relative moves
these values by ~1e-6 relative; 1 or 2 CPU threads give identical values); any change to the maths
moves them by far more.

To regenerate, deliberately (a change meant to alter the numbers, or a torch / transformers upgrade whose
random init or kernels differ):
    GOLDEN_PRINT=1 .venv/bin/pytest tests/test_golden.py -s
prints the new values instead of checking them. Paste them into GOLDEN_LOSSES and say in the commit
why the numbers changed.
"""

from __future__ import annotations

import os

import pytest
from helpers import by_step
from test_resume import fit_config

from wspo_lightning.lightning_cli import run_cli

GOLDEN_LOSSES = [  # train/loss at global steps 0..5 (torch 2.13 CPU, transformers 5.23)
    0.19351746141910553,
    0.10197100043296814,
    0.053155090659856796,
    0.02486812323331833,
    0.029882384464144707,
    0.041017211973667145,
]


def test_wspo_golden_loss_trajectory_on_the_tiny_world_is_unchanged(tiny_world, tmp_path):
    config = fit_config(
        tiny_world, tmp_path, gamma={"kind": "constant", "value": 2.0}, max_steps=6, limit_val_batches=0
    )
    run_cli(["fit", "--config", str(config)])
    losses = by_step(tmp_path)
    got = [losses[step] for step in range(6)]
    if os.environ.get("GOLDEN_PRINT"):
        print("GOLDEN_LOSSES = [\n" + "".join(f"    {value!r},\n" for value in got) + "]")
        return
    assert got == pytest.approx(GOLDEN_LOSSES, rel=1e-4, abs=0)
