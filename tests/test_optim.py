"""Optimizer and schedule from YAML (OptimizerCallable / LRSchedulerCallable of the objectives): the default
is AdamW + warm-up-cosine by hand-worked formula, a schedule gets the run's step count, bitsandbytes'
8-bit and paged AdamW run on CPU, and a printed config with them feeds precompute."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import yaml
from helpers import fit, metrics, tiny_config

from wspo_lightning import optim
from wspo_lightning.lightning_cli import precompute_main, run_cli


def _lrs(config: dict, steps: int) -> list[float]:
    lrs = []
    schedule = config["lr_scheduler"]["scheduler"]
    for _ in range(steps):
        lrs.append(config["optimizer"].param_groups[0]["lr"])
        config["optimizer"].step()
        schedule.step()
    return lrs


def test_default_is_adamw_with_warmup_then_cosine_by_the_formula():
    params = [torch.nn.Parameter(torch.zeros(3))]
    config = optim.configure(params, 10, None, None, learning_rate=0.5, weight_decay=0.01, warmup_ratio=0.2)
    assert type(config["optimizer"]) is torch.optim.AdamW and config["optimizer"].defaults["weight_decay"] == 0.01
    # warm-up over int(0.2 * 10) = 2 steps: 0.5 * s / 2; then 0.5 * (1 + cos(pi * (s - 2) / 8)) / 2
    expected = [0.5 * s / 2 for s in range(2)] + [0.25 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 10)]
    assert _lrs(config, 10) == pytest.approx(expected, abs=1e-12)
    # TransformersSchedule("cosine") with the same ratio is the same schedule; its step count is filled in
    named = partial(optim.TransformersSchedule, name="cosine", warmup_ratio=0.2, num_training_steps=None)
    params = [torch.nn.Parameter(torch.zeros(3))]
    again = optim.configure(params, 10, None, named, learning_rate=0.5, weight_decay=0.01, warmup_ratio=0.9)
    assert _lrs(again, 10) == pytest.approx(expected, abs=1e-12)


def _block(class_path: str, **init_args) -> dict:
    return {"class_path": class_path, "init_args": init_args}


def test_yaml_optimizer_and_a_schedule_that_needs_the_step_count(tiny_world, tmp_path):
    config = tiny_config(
        tiny_world,
        tmp_path / "run",
        extra_callbacks=[
            {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor", "init_args": {"logging_interval": "step"}}
        ],
    )
    data = yaml.safe_load(config.read_text())
    data["model"]["init_args"]["optimizer"] = _block("torch.optim.SGD", lr=0.05, momentum=0.9)
    data["model"]["init_args"]["lr_scheduler"] = _block("torch.optim.lr_scheduler.OneCycleLR", max_lr=0.05)
    config.write_text(yaml.safe_dump(data))
    cli = fit(config, "--trainer.max_steps=6")
    optimizer = cli.trainer.optimizers[0]
    schedule = cli.trainer.lr_scheduler_configs[0].scheduler
    assert type(optimizer) is torch.optim.SGD and optimizer.defaults["momentum"] == 0.9
    assert isinstance(schedule, torch.optim.lr_scheduler.OneCycleLR) and schedule.total_steps == 6
    # the logged learning rates are OneCycleLR's own over 6 steps, computed apart
    reference = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.05, momentum=0.9)
    reference_schedule = torch.optim.lr_scheduler.OneCycleLR(reference, max_lr=0.05, total_steps=6)
    expected = []
    for _ in range(6):
        expected.append(reference.param_groups[0]["lr"])
        reference.step()
        reference_schedule.step()
    assert metrics(cli)["lr-SGD"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("name", ["AdamW8bit", "PagedAdamW", "PagedAdamW8bit"])
def test_bitsandbytes_optimizers_step_like_adamw_on_cpu(name):
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    start = torch.randn(64, 128)  # 8192 elements: above bitsandbytes' 4096 floor for 8-bit state
    grads = [torch.randn(64, 128) for _ in range(3)]
    weights = {}
    for label, cls in (("bnb", getattr(bnb.optim, name)), ("torch", torch.optim.AdamW)):
        param = torch.nn.Parameter(start.clone())
        optimizer = cls([param], lr=1e-2, weight_decay=0.0)
        for grad in grads:
            param.grad = grad.clone()
            optimizer.step()
        weights[label] = param.detach()
    moved = (weights["torch"] - start).abs().mean()
    # the same update up to the 8-bit state's quantization error (blockwise: about 1% of a step)
    assert (weights["bnb"] - weights["torch"]).abs().mean() < 0.05 * moved


def test_fit_with_an_8bit_optimizer_and_its_printed_config_feeds_precompute(tiny_world, tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    config = tiny_config(tiny_world, tmp_path / "run")
    data = yaml.safe_load(config.read_text())
    data["model"]["init_args"]["optimizer"] = _block("bitsandbytes.optim.PagedAdamW8bit", lr=0.003)
    data["model"]["init_args"]["lr_scheduler"] = _block(
        "wspo_lightning.optim.TransformersSchedule", name="linear", warmup_ratio=0.0
    )
    config.write_text(yaml.safe_dump(data))
    cli = fit(config, "--trainer.max_steps=2")
    assert type(cli.trainer.optimizers[0]).__name__ == "PagedAdamW8bit"
    assert cli.trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0] == pytest.approx(0.003 * (2 - 2) / 2)
    with pytest.raises(SystemExit):
        run_cli(["fit", "--config", str(config), "--print_config"])
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    assert "PagedAdamW8bit" in printed.read_text()
    assert precompute_main(["--config", str(printed), f"--model.init_args.cache_dir={tmp_path / 'cache'}"]) == 0
    assert (tmp_path / "cache" / "manifest.json").exists()


def test_step_counts_are_filled_only_where_the_schedule_takes_one_and_the_config_left_it_unset():
    one_cycle = torch.optim.lr_scheduler.OneCycleLR
    fill = optim.unset_step_counts
    assert fill(partial(one_cycle, max_lr=0.1), 7) == {"total_steps": 7}  # defaults left out of the partial
    assert fill(partial(one_cycle, max_lr=0.1, total_steps=None), 7) == {"total_steps": 7}
    assert fill(partial(one_cycle, max_lr=0.1, total_steps=3), 7) == {}  # the config's own count wins
    assert fill(partial(partial, one_cycle, max_lr=0.1), 7) == {"total_steps": 7}  # the class as an argument
    assert fill(partial(torch.optim.lr_scheduler.StepLR, step_size=2), 7) == {}  # takes no step count
    assert fill(optim.TransformersSchedule, 7) == {"num_training_steps": 7}
