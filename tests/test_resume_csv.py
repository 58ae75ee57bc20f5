"""A resumed run's CSVLogger writes into the version folder the run started: `--ckpt_path last` (and a SLURM
requeue, tests/test_resume.py) continue its metrics.csv, whose rows after the checkpoint's step (the killed
run's, logged again by the resumed run) are dropped, so each step appears once, as in an uninterrupted run."""

from __future__ import annotations

import csv
import functools
import logging
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import tiny_config

from wspo_lightning.lightning_cli import run_cli

fit_config = functools.partial(tiny_config, every_n_train_steps=3)
TIMINGS = {"train/tokens_per_second"}  # the only columns that differ between two runs of the same config


class Killed(RuntimeError):
    pass


class CrashAt(pl.Callback):
    """Test helper: a run that dies at the start of global step `step` (what a kill leaves: the rows logged
    after the last checkpoint are on disk, the steps after it not trained)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise Killed(f"killed at step {self.step}")


def rows(out: Path) -> list[dict[str, str]]:
    """The rows of the one metrics.csv under `out/logs`, without the timing columns."""
    (path,) = (out / "logs").rglob("metrics.csv")
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in csv.DictReader(path.open())]


def test_a_resumed_run_continues_the_metrics_csv_of_its_version_each_step_once(tiny_world, tmp_path):
    """8 steps an epoch, a checkpoint every 3 steps and a validation every 4 batches; 10 steps. Run B dies at
    the start of step 8: its last checkpoint is from step 6, yet it logged steps 6 and 7 and the validation
    after step 7. `--ckpt_path last` writes into B's version_0: the rows of steps >= 6 go (the resumed run logs
    them again), the rest stay, and the file equals run A's uninterrupted metrics.csv row for row, validation
    rows included."""
    settings = dict(max_steps=10, val_check_interval=4, limit_val_batches=1)
    config_a = fit_config(tiny_world, tmp_path / "a", **settings)
    crash = {"class_path": "test_resume_csv.CrashAt", "init_args": {"step": 8}}
    config_b = fit_config(tiny_world, tmp_path / "b", **settings)
    config_b_crash = fit_config(tiny_world, tmp_path / "b", **settings, extra_callbacks=[crash], name="crash.yaml")
    run_cli(["fit", "--config", str(config_a)])
    with pytest.raises(Killed):
        run_cli(["fit", "--config", str(config_b_crash)])
    killed = rows(tmp_path / "b")
    assert torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    assert {r["step"] for r in killed if r.get("val/loss")} == {"3", "7"}  # the validation after step 7: stale

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = run_cli(["fit", "--config", str(config_b), "--ckpt_path", "last"])
    assert resumed.trainer.global_step == 10
    assert [p.name for p in (tmp_path / "b" / "logs" / "wspo").iterdir()] == ["version_0"]
    deleting = [w for w in caught if "Experiment logs directory" in str(w.message)]  # Lightning's, as it deletes
    assert not deleting, deleting
    got, want = rows(tmp_path / "b"), rows(tmp_path / "a")
    steps = [int(r["step"]) for r in got if r.get("train/loss")]
    assert steps == list(range(10)), steps
    assert [r["step"] for r in got] == [r["step"] for r in want]
    assert got == want


def test_a_version_the_user_sets_wins_over_the_checkpoints(tiny_world, tmp_path, caplog):
    """A `version` written in the logger's config is the folder the resumed run logs to (one warning line when
    it is not the checkpoint's); the checkpoint's folder is left as it was."""
    config = fit_config(tiny_world, tmp_path / "run", max_steps=3, limit_val_batches=0)
    run_cli(["fit", "--config", str(config)])
    first = rows(tmp_path / "run")
    text = config.read_text().replace("name: wspo", "name: wspo\n      version: mine")
    assert text != config.read_text()
    mine = tmp_path / "run" / "mine.yaml"
    mine.write_text(text)
    with caplog.at_level(logging.WARNING):
        run_cli(["fit", "--config", str(mine), "--trainer.max_steps=4", "--ckpt_path", "last"])
    assert "resume: CSV version 'mine' as given, not the checkpoint's 0: a new version folder" in caplog.text
    folders = sorted(p.name for p in (tmp_path / "run" / "logs" / "wspo").iterdir())
    assert folders == ["mine", "version_0"]
    (kept,) = (tmp_path / "run" / "logs" / "wspo" / "version_0").glob("metrics.csv")
    assert [{k: v for k, v in r.items() if k not in TIMINGS} for r in csv.DictReader(kept.open())] == first
    new = list(csv.DictReader((tmp_path / "run" / "logs" / "wspo" / "mine" / "metrics.csv").open()))
    assert [r["step"] for r in new if r.get("train/loss")] == ["3"]
