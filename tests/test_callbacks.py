"""Callbacks: gamma schedules (worked numbers, and through a real fit + resume), reward-margin
distributions (against a recomputation), sample tables and the W&B offline run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ROOT, fit, metrics, tiny_config, wandb_run_records

from wspo_lightning import losses
from wspo_lightning.callbacks import GammaSchedule
from wspo_lightning.errors import InputError
from wspo_lightning.logprobs import response_logps


@pytest.mark.parametrize(
    "schedule, expected",
    [
        # constant: value at every step
        (GammaSchedule("constant", value=3.0), [3.0, 3.0, 3.0, 3.0]),
        # linear_warmup 0 -> 2 over 4 steps: 2*s/4 for s < 4, then 2
        (GammaSchedule("linear_warmup", value=2.0, start=0.0, warmup_steps=4), [0.0, 0.5, 1.0, 1.5, 2.0, 2.0]),
        # cosine 0 -> 1 over 4 steps: 1 + (0-1)*(1+cos(pi*s/4))/2 = (1-cos(pi*s/4))/2
        (
            GammaSchedule("cosine", value=1.0, start=0.0, total_steps=4),
            [0.0, (1 - math.cos(math.pi / 4)) / 2, 0.5, (1 - math.cos(3 * math.pi / 4)) / 2, 1.0, 1.0],
        ),
        # step: 1 doubled every 2 steps, capped at 4
        (GammaSchedule("step", value=4.0, start=1.0, every=2, factor=2.0), [1, 1, 2, 2, 4, 4, 4, 4]),
    ],
    ids=["constant", "linear_warmup", "cosine", "step"],
)
def test_gamma_schedule_values_match_worked_numbers(schedule, expected):
    got = [schedule.gamma_at(step) for step in range(len(expected))]
    assert got == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "exponential"},
        {"value": float("nan")},
        {"every": 0},
        {"value": 0.0},  # a target of 0: a loss that trains nothing
        {"kind": "linear_warmup", "start": -1.0},
        {"kind": "step", "value": 4.0},  # no start: 0 * factor**k would stay 0 forever
        {"kind": "step", "value": 4.0, "start": 0.0},
    ],
    ids=[
        "unknown-kind",
        "nan-value",
        "zero-every",
        "zero-target",
        "negative-start",
        "step-no-start",
        "step-zero-start",
    ],
)
def test_gamma_schedule_rejects_bad_settings(kwargs):
    with pytest.raises(InputError, match="GammaSchedule"):
        GammaSchedule(**kwargs)


def test_gamma_has_one_source_the_models_unless_the_schedule_names_its_own_target(tiny_world, tmp_path):
    """The README's `--model.init_args.gamma 2` over the tiny config (a constant GammaSchedule without a value)
    trains at 2, and the card says 2; a schedule's own target is used when the model's gamma is not written;
    both written and different is one line."""
    config = tiny_config(tiny_world, tmp_path / "two")
    cli = fit(config, "--model.init_args.gamma", "2", "--trainer.max_steps=2", "--trainer.val_check_interval=1")
    assert metrics(cli)["train/wspo/gamma"] == [2.0, 2.0]
    assert metrics(cli)["val/wspo/gamma"] == [2.0, 2.0]
    assert "| gamma | 2 (constant) |" in (tmp_path / "two" / "export" / "README.md").read_text()

    own = with_schedule(tiny_config(tiny_world, tmp_path / "own"), {"kind": "constant", "value": 3.0})
    assert metrics(fit(own, "--trainer.max_steps=1", "--trainer.limit_val_batches=0"))["train/wspo/gamma"] == [3.0]

    with pytest.raises(
        InputError, match=r"^model\.init_args\.gamma is 2 but the GammaSchedule's value .* is 3: set one"
    ):
        fit(own, "--model.init_args.gamma=2")


def with_schedule(config: Path, schedule: dict) -> Path:
    """The tiny config with its GammaSchedule replaced by `schedule` (init_args; a `value` there is the target,
    so the model's gamma is left unwritten)."""
    data = yaml.safe_load(config.read_text())
    for callback in data["trainer"]["callbacks"]:
        if callback["class_path"].endswith("GammaSchedule"):
            callback["init_args"] = schedule
    if "value" in schedule:
        data["model"]["init_args"].pop("gamma", None)
    config.write_text(yaml.safe_dump(data))
    return config


def test_gamma_schedule_drives_the_loss_and_survives_resume(tiny_world, tmp_path):
    """gamma logged at step s is the schedule's value; a run resumed from a checkpoint at step 4
    continues the schedule where it stopped (it is a function of the restored global step)."""
    schedule = {"kind": "linear_warmup", "start": 0.0, "value": 2.0, "warmup_steps": 6}
    expected = [GammaSchedule(**schedule).gamma_at(s) for s in range(8)]

    full = fit(
        with_schedule(tiny_config(tiny_world, tmp_path / "full"), schedule),
        "--trainer.max_steps=8",
        "--trainer.limit_val_batches=0",
    )
    assert metrics(full)["train/wspo/gamma"] == pytest.approx(expected)
    # gamma = 0 at step 0 with policy == reference: the loss is exactly 0
    assert metrics(full)["train/loss"][0] == 0.0

    config = with_schedule(tiny_config(tiny_world, tmp_path / "resumed"), schedule)
    first = fit(config, "--trainer.max_steps=4", "--trainer.limit_val_batches=0")
    checkpoint = Path(first.trainer.checkpoint_callback.last_model_path)
    resumed = fit(config, "--trainer.max_steps=8", "--trainer.limit_val_batches=0", f"--ckpt_path={checkpoint}")
    assert metrics(resumed)["train/wspo/gamma"] == pytest.approx(expected)  # one CSV version: steps 1-8


def test_reward_margin_logger_matches_a_recomputation_on_the_validation_pairs(tiny_world, tmp_path):
    cli = fit(tiny_config(tiny_world, tmp_path / "run"), "--trainer.max_epochs=1")
    logged = metrics(cli)
    model, data = cli.model, cli.datamodule
    margins = {"weak": [], "strong": []}
    with torch.no_grad():
        for batch in data.val_dataloader():
            n = batch["chosen_input_ids"].shape[0]
            for part in ("chosen", "rejected"):
                rows = batch[f"{part}_input_ids"], batch[f"{part}_attention_mask"], batch[f"{part}_labels"]
                policy, mask = response_logps(model.policy, *rows)
                weak = losses.implicit_reward(
                    model.frozen.logps("weak_aligned", *rows), model.frozen.logps("weak_base", *rows), mask
                )
                strong = losses.implicit_reward(policy, model.frozen.logps("reference", *rows), mask)
                sign = 1 if part == "chosen" else -1
                for kind, reward in (("weak", weak), ("strong", strong)):
                    if part == "chosen":
                        margins[kind].append(reward.clone())
                    else:
                        margins[kind][-1] += sign * reward
            assert n == margins["weak"][-1].shape[0]
    for kind in ("weak", "strong"):
        margin = torch.cat(margins[kind])
        assert logged[f"val/rewards/{kind}_margin"][-1] == pytest.approx(float(margin.mean()), abs=1e-4)
        assert logged[f"val/rewards/{kind}_accuracy"][-1] == pytest.approx(float((margin > 0).float().mean()))
        assert logged[f"val/rewards/{kind}_margin_q50"][-1] == pytest.approx(float(margin.quantile(0.5)), abs=1e-4)


def test_wandb_offline_run_holds_metrics_reward_histograms_and_sample_table(tiny_world, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    wandb_config = tmp_path / "wandb.yaml"
    wandb_config.write_text(
        (ROOT / "configs" / "wandb_logger.yaml")
        .read_text()
        .replace("save_dir: runs", f"save_dir: {tmp_path / 'wandb_runs'}")
    )
    fit(tiny_config(tiny_world, tmp_path / "run"), "--config", str(wandb_config), "--trainer.max_epochs=1")
    import wandb

    wandb.finish()
    runs = list((tmp_path / "wandb_runs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # The run log is protobuf records; keys and JSON values are stored in them as plain UTF-8 bytes.
    record_log = wandb_run_records(runs[0])
    for key in (
        b"val/rewards/strong_margin",
        b"train/wspo/delta_weak",
        b"val/hist/strong_margin",
        b"val/rewards/weak_margin_q50",
        b'"histogram"',
    ):
        assert key in record_log, key
    tables = list((runs[0] / "files" / "media" / "table").rglob("*.table.json"))
    assert json.loads(tables[0].read_text())["columns"] == ["step", "prompt", "response", "finished", "weak_reward"]


def test_a_cached_runs_sample_table_has_no_weak_reward_column_rather_than_nan(tiny_world, tmp_path):
    """With cache_dir the weak pair never loads, so new text has no weak reward: the column is absent."""
    from wspo_lightning.lightning_cli import precompute

    config, cache = tiny_config(tiny_world, tmp_path / "run"), tmp_path / "cache"
    precompute(["--config", str(config), f"--model.init_args.cache_dir={cache}"])
    cli = fit(config, f"--model.init_args.cache_dir={cache}", "--trainer.max_steps=1", "--trainer.val_check_interval=1")
    assert "weak_base" not in cli.model.frozen
    (table,) = (Path(cli.trainer.logger.log_dir) / "samples").glob("step_*.jsonl")
    rows = [json.loads(line) for line in table.read_text().splitlines()]
    assert len(rows) == 2 and all(set(row) == {"step", "prompt", "response", "finished"} for row in rows)


def test_sample_table_scores_responses_with_the_weak_pair(tiny_world, tmp_path):
    cli = fit(tiny_config(tiny_world, tmp_path / "run"), "--trainer.max_epochs=1")
    sample_files = sorted((Path(cli.trainer.logger.log_dir) / "samples").glob("step_*.jsonl"))
    rows = [json.loads(line) for line in sample_files[-1].read_text().splitlines()]
    assert [r["prompt"] for r in rows] == cli.datamodule.prompts("val", 2)
    # recompute the weak reward of the first response from its text, with the weak pair's own forwards
    tokenizer, frozen = cli.datamodule.tokenizer, cli.model.frozen
    template = tokenizer.apply_chat_template(
        [{"role": "user", "content": rows[0]["prompt"]}], tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tokenizer(template, add_special_tokens=False, return_tensors="pt").input_ids
    ending = [tokenizer.convert_tokens_to_ids("<|im_end|>")] if rows[0]["finished"] else []
    response_ids = torch.tensor([tokenizer(rows[0]["response"], add_special_tokens=False).input_ids + ending])
    assert response_ids.shape[1] > 0
    ids = torch.cat([prompt_ids, response_ids], dim=1)
    with torch.no_grad():
        logps = {
            role: torch.log_softmax(frozen[role](ids).logits[0, :-1].float(), -1)
            for role in frozen
            if role.startswith("weak")
        }
    targets = ids[0, 1:]
    delta = (logps["weak_aligned"] - logps["weak_base"]).gather(-1, targets[:, None])[:, 0]
    expected = float(delta[prompt_ids.shape[1] - 1 :].sum())
    assert rows[0]["weak_reward"] == pytest.approx(expected, abs=1e-3)
