"""SampleTable under DDP with 2 CPU processes (gloo): every rank takes part in the collectives (the log
folder is a broadcast), nothing deadlocks, rank 0 alone writes the tables, and they hold the completions
a single process writes at the same steps (2 ranks x batch 8 = 1 process x batch 16, greedy decoding)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, fit, tiny_config

from wspo_lightning.tiny import write_tiny_world

RUN = ["--trainer.max_epochs=2", "--data.eval_batch_size=4", "--trainer.accelerator=cpu", "--data.val_fraction=0"]


def _samples(out: Path) -> dict[str, list[dict]]:
    folders = sorted((out / "logs" / "wspo").glob("version_*"))
    files = sorted((folders[-1] / "samples").glob("step_*.jsonl"))
    return {f.name: [json.loads(line) for line in f.read_text().splitlines()] for f in files}


def test_sample_table_under_ddp_on_two_processes(tmp_path):
    world = write_tiny_world(tmp_path / "world", n_train=16, n_val=4)
    single = tmp_path / "single"
    fit(tiny_config(world, single, every_n_train_steps=None), *RUN, "--data.batch_size=16")
    ddp = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "wspo_lightning.cli",
        "fit",
        "--config",
        str(tiny_config(world, ddp, every_n_train_steps=None)),
        *RUN,
        "--data.batch_size=8",
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT, start_new_session=True
    )
    try:
        _, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:  # a deadlock: both ranks wait in a collective forever
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"DDP with SampleTable did not finish: {process.communicate()[1][-3000:]}")
    assert process.returncode == 0, stderr[-3000:]
    got, want = _samples(ddp), _samples(single)
    assert sorted(got) == ["step_1.jsonl", "step_2.jsonl"] == sorted(want)
    assert len(list((ddp / "logs" / "wspo").glob("version_*"))) == 1  # one writer: rank 0
    for name in want:
        assert [(r["prompt"], r["response"], r["finished"]) for r in got[name]] == [
            (r["prompt"], r["response"], r["finished"]) for r in want[name]
        ]
        assert [r["weak_reward"] for r in got[name]] == pytest.approx([r["weak_reward"] for r in want[name]], abs=1e-4)
