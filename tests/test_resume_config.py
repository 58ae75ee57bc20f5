"""On `--ckpt_path FILE`, what the user wrote wins: the config's and the command line's values over the
checkpoint's saved hyperparameters, which fill only what they leave unset. A run moved to another folder
resumes from the config's new paths with the losses of an uninterrupted run; a value given at resume is
the one used, with one warning line naming it; a model path found nowhere is an error naming the key."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from helpers import by_step, fit, tiny_config

from wspo_lightning.errors import InputError
from wspo_lightning.lightning_cli import precompute

EVERY_STEP_2 = {
    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
    "init_args": {"dirpath": "KEPT", "every_n_train_steps": 2, "save_top_k": -1, "filename": "{step}"},
}


def train_four_steps(tiny_world: Path, root: Path, *overrides: str) -> tuple[Path, Path]:
    """A run that owns its models and data under `root` (world/, run/): 4 steps, uninterrupted, a checkpoint
    kept at step 2. Returns (its config, the step-2 checkpoint)."""
    world = shutil.copytree(tiny_world, root / "world")
    keep = {**EVERY_STEP_2, "init_args": {**EVERY_STEP_2["init_args"], "dirpath": str(root / "run" / "kept")}}
    config = tiny_config(world, root / "run", every_n_train_steps=None, extra_callbacks=[keep], max_steps=4)
    fit(config, *overrides)
    return config, root / "run" / "kept" / "step=2.ckpt"


def moved_config(config: Path, old: Path, new: Path) -> Path:
    """The run's config with every path under `old` now under `new` (as a user edits it after a move)."""
    text = (new / config.relative_to(old)).read_text().replace(str(old), str(new))
    path = new / "run" / "resume.yaml"
    path.write_text(text)
    return path


def test_a_run_moved_to_another_folder_resumes_from_the_configs_paths_with_the_uninterrupted_losses(
    tiny_world, tmp_path, caplog
):
    old, new = tmp_path / "old", tmp_path / "new"
    config, checkpoint = train_four_steps(tiny_world, old, "--model.init_args.weight_decay=0.1")
    uninterrupted = by_step(old / "run" / "logs")
    shutil.move(old, new)  # the models, the data and the checkpoints: the old paths are gone
    checkpoint = new / checkpoint.relative_to(old)

    cli = fit(moved_config(config, old, new), f"--ckpt_path={checkpoint}", "--trainer.logger.init_args.version=resumed")

    assert cli.trainer.global_step == 4
    assert cli.model.policy_spec.path == str(new / "world" / "policy")
    resumed = by_step(new / "run" / "logs" / "wspo" / "resumed")
    assert sorted(resumed) == [2, 3]
    for step in (2, 3):  # same weights, AdamW moments, schedules and data order as the run that went on
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-5), step
    # weight_decay was given on the first run's command line only: the checkpoint fills it, as a default
    assert "model.init_args.weight_decay" not in cli.written
    assert cli.model.hparams.weight_decay == 0.1
    assert {group["weight_decay"] for group in cli.trainer.optimizers[0].param_groups} == {0.1}
    assert f"resume: model.init_args.policy.path = {str(new / 'world' / 'policy')!r} as given" in caplog.text
    assert "weight_decay" not in caplog.text


def test_values_given_at_resume_are_the_ones_used_and_each_is_warned_once(tiny_world, tmp_path, caplog):
    config, checkpoint = train_four_steps(tiny_world, tmp_path)
    cache = tmp_path / "cache"
    precompute(["--config", str(config), f"--model.init_args.cache_dir={cache}"])
    caplog.clear()

    cli = fit(
        config,
        f"--ckpt_path={checkpoint}",
        "--model.init_args.weight_decay=0.25",
        f"--model.init_args.cache_dir={cache}",
        "--trainer.max_steps=3",
    )

    assert cli.trainer.global_step == 3
    assert cli.model.cache_dir == str(cache) and cli.model.cache is not None
    assert "weak_base" not in cli.model.frozen  # the weak pair's values came from the cache
    # the optimizer state came back from the checkpoint, its weight decay from the command line
    assert {group["weight_decay"] for group in cli.trainer.optimizers[0].param_groups} == {0.25}
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resume:")]
    assert sorted(lines) == [
        f"resume: model.init_args.cache_dir = {str(cache)!r} as given, not the checkpoint's None",
        "resume: model.init_args.weight_decay = 0.25 as given, not the checkpoint's 0.0",
    ]


def test_a_changed_peak_learning_rate_at_resume_scales_the_schedule_from_where_it_was(tiny_world, tmp_path):
    """The cosine schedule's factor at step 2 is kept; only the peak changes: lr(step 2) = new peak * factor."""
    config, checkpoint = train_four_steps(tiny_world, tmp_path)
    old_peak = yaml.safe_load(config.read_text())["model"]["init_args"]["learning_rate"]
    cli = fit(config, f"--ckpt_path={checkpoint}", f"--model.init_args.learning_rate={old_peak / 3}")
    scheduler = cli.trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.base_lrs == [pytest.approx(old_peak / 3)] * len(scheduler.base_lrs)
    factor = scheduler.lr_lambdas[0](cli.trainer.global_step)
    for group in cli.trainer.optimizers[0].param_groups:
        assert group["lr"] == pytest.approx(old_peak / 3 * factor)


def test_a_model_path_found_neither_in_the_config_nor_in_the_checkpoint_names_the_key_to_set(tiny_world, tmp_path):
    reference = shutil.copytree(tiny_world / "policy", tmp_path / "reference")
    config, checkpoint = train_four_steps(tiny_world, tmp_path, f"--model.init_args.reference.path={reference}")
    shutil.rmtree(reference)  # the first run's reference, given on its command line only, is gone
    settings = yaml.safe_load(config.read_text())
    del settings["model"]["init_args"]["reference"]  # (a written `reference: null` would choose the policy's copy)
    config.write_text(yaml.safe_dump(settings, sort_keys=False))
    with pytest.raises(
        InputError,
        match=r"^model\.init_args\.reference\.path: .* \(restored from the checkpoint step=2\.ckpt\) does not "
        r"exist\. Set model\.init_args\.reference\.path",
    ):
        fit(config, f"--ckpt_path={checkpoint}")
