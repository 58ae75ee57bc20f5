"""Faults and resume: `kill -9` mid-epoch then `--ckpt_path last` ends bit-identical to an
uninterrupted run; the training loader's position; atomic checkpoint writes under a kill; the
non-finite guard (stop with a message naming the step, or skip the batch)."""

from __future__ import annotations

import functools
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import by_step, metrics, tiny_config
from safetensors.torch import load_file

from wspo_lightning.callbacks import AtomicCheckpointIO, NonFiniteGuard
from wspo_lightning.cli import main as wspo_main
from wspo_lightning.data import LoaderPosition, ResumableDataLoader, SeededSampler
from wspo_lightning.lightning_cli import run_cli

TESTS = Path(__file__).resolve().parent


fit_config = functools.partial(tiny_config, every_n_train_steps=None)  # checkpoints only where asked


class HoldAt(pl.Callback):
    """Test helper: at the start of global step `step`, write `marker` and wait to be killed."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            Path(self.marker).write_text(str(batch_idx))
            time.sleep(600)


def _wspo(config: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`wspo fit --config config *args` in a subprocess, with `env` added to the environment; its stderr goes
    to `<config>.stderr`."""
    env = {**os.environ, **(env or {}), "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    with open(config.with_suffix(".stderr"), "w") as stderr:  # a file, not a pipe nobody reads while waiting
        return subprocess.Popen(
            [sys.executable, "-m", "wspo_lightning.cli", "fit", "--config", str(config), *args],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=env,
        )


# ----------------------------------------------------------------------------- kill -9 and resume


def test_kill_9_mid_epoch_then_ckpt_path_last_ends_bit_identical_to_an_uninterrupted_run(tiny_world, tmp_path):
    """64 records in batches of 8: 8 steps an epoch; 12 steps; a checkpoint every 3 steps; a linear
    gamma warm-up over 10 steps and a cosine LR schedule, so both schedules cross the resume point.

    Run B, a `wspo fit` subprocess, is killed with SIGKILL while it trains step 7 (epoch 0, batch 7):
    its last checkpoint is from step 6 and step 7's work is lost. `wspo fit --ckpt_path last` restores
    weights, AdamW state, LR schedule, global step (so the gamma schedule) and the loader position
    (epoch 0, 6 batches handed out), then runs steps 6..11 across the epoch boundary and validation.
    Run A goes uninterrupted. On CPU every operation is deterministic for a fixed thread count, so the
    final weights are equal bit for bit. (A and the resume run in this process, with the same CLI, to
    spare two interpreter start-ups; A runs while B trains.)
    """
    gamma = {"kind": "linear_warmup", "start": 0.5, "value": 2.0, "warmup_steps": 10}
    settings = dict(every_n_train_steps=3, gamma=gamma, max_steps=12, limit_val_batches=2)
    marker = tmp_path / "b_holding"
    hold = {"class_path": "test_resume.HoldAt", "init_args": {"step": 7, "marker": str(marker)}}
    config_a = fit_config(tiny_world, tmp_path / "a", **settings)
    config_b = fit_config(tiny_world, tmp_path / "b", **settings)
    config_b_hold = fit_config(tiny_world, tmp_path / "b", **settings, extra_callbacks=[hold], name="hold.yaml")

    run_b = _wspo(config_b_hold)
    try:
        run_a = run_cli(["fit", "--config", str(config_a)])
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert run_b.poll() is None, (tmp_path / "b" / "hold.stderr").read_text()[-3000:]
            assert time.monotonic() < deadline, "run B never reached step 7"
            time.sleep(0.1)
    finally:
        run_b.send_signal(signal.SIGKILL)
        run_b.wait()
    last = tmp_path / "b" / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True, map_location="cpu")
    assert (state["global_step"], state["PreferenceDataModule"]["train_position"]) == (6, {"epoch": 0, "batches": 6})
    assert not list((tmp_path / "b" / "checkpoints").glob(".*.partial"))

    run_b = run_cli(["fit", "--config", str(config_b), "--ckpt_path", "last"])
    assert run_b.trainer.global_step == run_a.trainer.global_step == 12
    final_a, final_b = (load_file(str(tmp_path / run / "export" / "model.safetensors")) for run in ("a", "b"))
    assert final_a.keys() == final_b.keys()
    different = [name for name in final_a if not torch.equal(final_a[name], final_b[name])]
    assert not different, different
    for metric in ("train/loss", "train/wspo/gamma"):
        a, b = by_step(tmp_path / "a", metric), by_step(tmp_path / "b", metric)
        assert sorted(a) == list(range(12)), metric
        assert {step: b[step] for step in range(6, 12)} == {step: a[step] for step in range(6, 12)}, metric
    assert by_step(tmp_path / "a", "train/wspo/gamma")[6] == pytest.approx(0.5 + 1.5 * 6 / 10)  # mid warm-up
    # one CSV version folder, each step once (the killed run's step 6 dropped, logged again by the resumed run)
    assert [p.name for p in (tmp_path / "b" / "logs" / "wspo").iterdir()] == ["version_0"]
    assert metrics(tmp_path / "b")["step"] == metrics(tmp_path / "a")["step"]


# ----------------------------------------------------------------------------- preemption under SLURM


def test_a_slurm_preemption_saves_requeues_and_the_requeued_job_ends_as_an_uninterrupted_run(tiny_world, tmp_path):
    """Under SLURM (its environment variables, and a stand-in `scontrol` on PATH), run B gets SLURM's
    pre-emption signal (SIGUSR1) while it trains step 5: Lightning saves `hpc_ckpt_1.ckpt` in the run's folder
    and asks `scontrol requeue JOB_ID`, then SLURM kills it. The requeued job is the same command, no
    ckpt_path: it resumes from the hpc checkpoint and its steps 5..9 log run A's losses, step for step."""
    settings = dict(max_steps=10, limit_val_batches=0)
    config_a = fit_config(tiny_world, tmp_path / "a", **settings)
    marker = tmp_path / "b_holding"
    hold = {"class_path": "test_resume.HoldAt", "init_args": {"step": 5, "marker": str(marker)}}
    config_b_hold = fit_config(tiny_world, tmp_path / "b", **settings, extra_callbacks=[hold], name="hold.yaml")
    config_b = fit_config(tiny_world, tmp_path / "b", **settings)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    requeued = tmp_path / "scontrol_args"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" > {requeued}\n')
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_JOB_NAME": "wspo-fit",
        "SLURM_JOB_ID": "4242",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    }

    run_b = _wspo(config_b_hold, env=slurm)
    try:
        run_a = run_cli(["fit", "--config", str(config_a)])
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert run_b.poll() is None, (tmp_path / "b" / "hold.stderr").read_text()[-3000:]
            assert time.monotonic() < deadline, "run B never reached step 5"
            time.sleep(0.1)
        run_b.send_signal(signal.SIGUSR1)
        while not requeued.exists():
            assert run_b.poll() is None, (tmp_path / "b" / "hold.stderr").read_text()[-3000:]
            assert time.monotonic() < deadline, "run B never asked for a requeue"
            time.sleep(0.1)
    finally:
        run_b.send_signal(signal.SIGKILL)  # as SLURM does once the job is requeued
        run_b.wait()
    assert requeued.read_text().split() == ["requeue", "4242"]
    assert (tmp_path / "b" / "hpc_ckpt_1.ckpt").exists()

    with pytest.MonkeyPatch.context() as patch:
        for name, value in slurm.items():
            patch.setenv(name, value)
        run_b = run_cli(["fit", "--config", str(config_b)])
    assert run_b.trainer.global_step == run_a.trainer.global_step == 10
    a, b = by_step(tmp_path / "a"), by_step(tmp_path / "b")
    assert sorted(a) == list(range(10)) and 5 in b, b
    assert {step: b[step] for step in range(5, 10)} == pytest.approx({step: a[step] for step in range(5, 10)}, rel=1e-6)
    # the requeued job wrote into the job's CSV version folder, each step once
    assert [p.name for p in (tmp_path / "b" / "logs" / "wspo").iterdir()] == ["version_0"]
    assert metrics(tmp_path / "b")["step"] == metrics(tmp_path / "a")["step"]


# ----------------------------------------------------------------------------- the loader's position


def _batches(loader, epoch: int, stop: int | None = None) -> list[list[int]]:
    iterator = iter(loader)
    loader.sampler.set_epoch(epoch)  # as Lightning does: after iter(), before the first batch
    return [batch.tolist() for _, batch in zip(range(stop if stop is not None else 10**9), iterator)]


@pytest.mark.parametrize("num_workers", [0, 2], ids=["in-process", "2-workers"])
def test_resumable_loader_continues_the_saved_epoch_with_its_next_batch(num_workers):
    def loader(position=None):
        return ResumableDataLoader(
            list(range(23)),
            batch_size=4,
            sampler=SeededSampler([1] * 23, seed=5),
            num_workers=num_workers,
            position=position,
        )

    full = {epoch: _batches(loader(), epoch) for epoch in (0, 1)}
    assert full[0] != full[1] and len(full[1]) == 6

    killed = loader()
    assert _batches(killed, 1, stop=4) == full[1][:4]
    state = killed.state_dict()
    assert state == {"epoch": 1, "batches": 4}
    resumed = loader()
    resumed.load_state_dict(state)
    assert len(resumed) == 6  # Lightning counts from the epoch's start
    assert _batches(resumed, 1) == full[1][4:]
    assert resumed.state_dict() == {"epoch": 1, "batches": 6}
    # a checkpoint taken when epoch 0 had ended resumes with epoch 1 from its start
    at_end = loader()
    at_end.load_state_dict({"epoch": 0, "batches": 6})
    assert _batches(at_end, 1) == full[1]


def test_loader_position_survives_lightning_rebuilding_the_loader_for_ddp():
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import DataLoader

    position = LoaderPosition()
    with _replace_dunder_methods(DataLoader, "dataset"):  # how Lightning records the loader's arguments
        original = ResumableDataLoader(
            list(range(20)), batch_size=3, sampler=SeededSampler([1] * 20, 0), position=position
        )
    rank_1 = DistributedSamplerWrapper(original.sampler, num_replicas=2, rank=1, shuffle=False)
    rebuilt = _update_dataloader(original, rank_1)
    assert type(rebuilt) is ResumableDataLoader and rebuilt.position is position
    full = _batches(rebuilt, 0)
    position.load_state_dict({"epoch": 0, "batches": 2})  # what the data module restores
    assert _batches(rebuilt, 0) == full[2:]  # this rank's own batches are skipped, after sharding


# ----------------------------------------------------------------------------- atomic checkpoints


class _BlockWhilePickled:
    """Pickling this writes `marker` and sleeps: a save in progress, to be killed."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        Path(self.marker).write_text("saving")
        time.sleep(600)
        return (str, ("never",))


def _save_forever(path: str, marker: str) -> None:
    AtomicCheckpointIO().save_checkpoint({"weights": torch.zeros(1000), "blocker": _BlockWhilePickled(marker)}, path)


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_checkpoint_intact(tmp_path):
    target = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 3, "weights": torch.arange(1000.0)}, target)
    marker = tmp_path / "saving"
    writer = multiprocessing.get_context("fork").Process(target=_save_forever, args=(str(target), str(marker)))
    writer.start()
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert time.monotonic() < deadline and writer.is_alive()
        time.sleep(0.05)
    os.kill(writer.pid, signal.SIGKILL)
    writer.join()

    partial = tmp_path / ".last.ckpt.partial"
    assert partial.exists()  # the killed write went here, never over the checkpoint
    kept = io.load_checkpoint(target, weights_only=True)
    assert kept["global_step"] == 3 and torch.equal(kept["weights"], torch.arange(1000.0))
    io.save_checkpoint({"global_step": 6}, target)  # the next save of the name replaces the leftover
    assert io.load_checkpoint(target, weights_only=True) == {"global_step": 6} and not partial.exists()


def test_wspo_fit_writes_checkpoints_atomically_and_guards_non_finite_values_by_default(tiny_world, tmp_path):
    cli = run_cli(["--config", str(fit_config(tiny_world, tmp_path)), "--trainer.max_steps=1"], run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert [type(c) for c in cli.trainer.callbacks].count(NonFiniteGuard) == 1


# ----------------------------------------------------------------------------- non-finite guard


class PoisonAt(pl.Callback):
    """Test helper: make the loss of the given global steps nan (gamma = nan) or their gradients inf."""

    def __init__(self, loss_steps: list[int] = (), gradient_steps: list[int] = ()) -> None:
        self.loss_steps, self.gradient_steps = list(loss_steps), list(gradient_steps)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step in self.loss_steps:
            pl_module.gamma = float("nan")  # runs after GammaSchedule, which sets gamma afresh each batch

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step in self.gradient_steps:
            next(p for p in pl_module.parameters() if p.grad is not None).grad[0].fill_(float("inf"))


class WeightsAround(pl.Callback):
    """Copies of the policy weights before and after every optimizer step."""

    def __init__(self) -> None:
        self.before: dict[int, dict] = {}
        self.after: dict[int, dict] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before[trainer.global_step] = {n: p.detach().clone() for n, p in pl_module.policy.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after[trainer.global_step - 1] = {n: p.detach().clone() for n, p in pl_module.policy.named_parameters()}


def test_a_nan_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(
    tiny_world, tmp_path, capsys, monkeypatch
):
    monkeypatch.syspath_prepend(str(TESTS))
    poison = {"class_path": "test_resume.PoisonAt", "init_args": {"loss_steps": [5]}}
    config = fit_config(
        tiny_world, tmp_path, every_n_train_steps=2, max_steps=8, limit_val_batches=0, extra_callbacks=[poison]
    )
    assert wspo_main(["fit", "--config", str(config)]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("wspo:")]
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert len(lines) == 1 and lines[0].startswith(
        "wspo: error: training stopped at global step 5 (epoch 0, batch 5, record ids toy-0-"
    ), lines
    assert "non-finite loss (nan)" in lines[0] and f"the last checkpoint is {last} (step 4)" in lines[0]
    state = torch.load(last, weights_only=True)
    assert state["global_step"] == 4 and all(torch.isfinite(t).all() for t in state["state_dict"].values())
    assert {p.name for p in (tmp_path / "checkpoints").glob("*.ckpt")} == {"last.ckpt", "epoch=0-step=4.ckpt"}


def test_skip_batch_drops_non_finite_steps_without_touching_weights_or_optimizer_state(tiny_world, tmp_path):
    guard = {"class_path": "wspo_lightning.callbacks.NonFiniteGuard", "init_args": {"action": "skip_batch"}}
    config = fit_config(tiny_world, tmp_path, max_steps=6, limit_val_batches=0, extra_callbacks=[guard])
    cli = run_cli(["--config", str(config)], run=False)
    watch = WeightsAround()
    cli.trainer.callbacks += [PoisonAt(loss_steps=[2], gradient_steps=[4]), watch]
    cli.trainer.fit(cli.model, cli.datamodule)

    (used,) = [c for c in cli.trainer.callbacks if isinstance(c, NonFiniteGuard)]
    assert used.skipped_steps == [2, 4] and cli.trainer.global_step == 6
    for step in (2, 4):
        for name, before in watch.before[step].items():
            assert torch.equal(watch.after[step][name], before), (step, name)
    assert any(not torch.equal(watch.after[3][n], w) for n, w in watch.before[3].items())  # others still train
    optimizer = cli.trainer.optimizers[0]
    assert {int(optimizer.state[p]["step"]) for p in cli.model.policy.parameters()} == {4}
    assert all(torch.isfinite(p).all() for p in cli.model.policy.parameters())
