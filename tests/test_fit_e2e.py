"""End to end through the real CLI: `wspo fit --config configs/tiny_cpu.yaml` on tiny random models."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import fit, metrics, tiny_config
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from wspo_lightning.lightning_cli import run_cli
from wspo_lightning.tiny import write_tiny_world

WSPO_METRICS = [
    "loss",
    "wspo/delta_strong",
    "wspo/delta_weak",
    "wspo/residual",
    "wspo/gamma",
    "logratio/policy_reference",
]
VAL_ONLY = ["rewards/weak_margin", "rewards/weak_accuracy", "rewards/strong_margin", "rewards/strong_accuracy"]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def assert_same(state: dict[str, torch.Tensor], module: torch.nn.Module) -> None:
    current = module.state_dict()
    for name, tensor in state.items():
        torch.testing.assert_close(current[name], tensor, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_wspo_fit_trains_only_the_policy_logs_design_metrics_and_exports(tmp_path, arch):
    world = write_tiny_world(tmp_path / "world", arch=arch)
    cli = fit(tiny_config(world, tmp_path / "run"))
    model = cli.model
    logged = metrics(cli)

    losses = logged["train/loss"]
    assert sum(losses[-4:]) / 4 < 0.5 * sum(losses[:4]) / 4, losses

    start = weights(world / "policy")
    changed = [n for n, p in model.policy.state_dict().items() if not torch.equal(p, start[n])]
    assert len(changed) > len(start) // 2
    assert_same(start, model.frozen["reference"])
    assert_same(weights(world / "weak_base"), model.frozen.models["weak_base"])
    assert_same(weights(world / "weak_aligned"), model.frozen.models["weak_aligned"])

    for name in WSPO_METRICS + ["tokens_per_second"]:
        assert f"train/{name}" in logged, name
    for name in WSPO_METRICS + VAL_ONLY:
        assert f"val/{name}" in logged, name
    # the strong margin of the untrained policy is 0; training moved it
    assert any(abs(m) > 0 for m in logged["val/rewards/strong_margin"])

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "export")
    for name, tensor in reloaded.state_dict().items():
        torch.testing.assert_close(tensor, model.policy.state_dict()[name])
    assert (Path(cli.trainer.logger.log_dir) / "samples").is_dir()


def test_two_fits_with_the_same_seed_give_the_same_loss_curve(tiny_world, tmp_path):
    curves = []
    for run in ("a", "b"):
        cli = fit(tiny_config(tiny_world, tmp_path / run), "--trainer.max_steps=6", "--trainer.limit_val_batches=0")
        curves.append(metrics(cli)["train/loss"])
    assert len(curves[0]) == 6
    assert curves[0] == curves[1]


class GradRecorder(pl.Callback):
    """Copies the accumulated gradient just before each optimizer step."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads.append({n: p.grad.clone() for n, p in pl_module.policy.named_parameters()})


def test_micro_batch_1_times_accumulation_4_equals_micro_batch_4(tiny_world, tmp_path):
    """Same data order, so the same accumulated gradient at every optimizer step.

    The first step's gradients agree to float rounding. Adam's early updates are ~lr*sign(g), so a
    rounding-level difference in a near-zero gradient moves that weight by up to 2*lr; later steps
    and the final weights are therefore compared by relative norm, not elementwise.
    """
    runs = []
    for run, batch, accumulate in (("mb1", 1, 4), ("mb4", 4, 1)):
        cli = run_cli(
            [
                "--config",
                str(tiny_config(tiny_world, tmp_path / run)),
                f"--data.batch_size={batch}",
                f"--trainer.accumulate_grad_batches={accumulate}",
                "--trainer.max_steps=3",
                "--trainer.limit_val_batches=0",
                "--trainer.gradient_clip_val=null",
            ],
            run=False,
        )
        recorder = GradRecorder()
        cli.trainer.callbacks.append(recorder)
        cli.trainer.fit(cli.model, cli.datamodule)
        runs.append((recorder.grads, cli.model.policy.state_dict()))
    (grads_1, policy_1), (grads_4, policy_4) = runs

    def relative(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm().clamp(min=1e-12))

    assert len(grads_1) == len(grads_4) == 3
    for step, (step_1, step_4) in enumerate(zip(grads_1, grads_4)):
        for name, grad in step_1.items():
            assert relative(grad, step_4[name]) < (1e-5 if step == 0 else 1e-3), (step, name)
    start = weights(tiny_world / "policy")
    for name, tensor in policy_1.items():
        assert relative(tensor - start[name], policy_4[name] - start[name]) < 1e-2, name


def test_dpo_fit_logs_trl_metric_names_and_learns_the_preference(tiny_world, tmp_path):
    config = tiny_config(tiny_world, tmp_path / "dpo")
    cli = fit(
        config,
        "--model=wspo_lightning.module.DPOModule",
        f"--model.policy.path={tiny_world / 'policy'}",
        "--model.learning_rate=0.003",
        "--model.beta=0.5",
    )
    logged = metrics(cli)
    for name in [
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
    ]:
        assert f"train/{name}" in logged and f"val/{name}" in logged, name
    assert logged["val/rewards/accuracies"][-1] > 0.9
    assert logged["train/loss"][-1] < logged["train/loss"][0]


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_wspo_runs_with_a_bitsandbytes_quantized_weak_pair(tiny_world, tmp_path, bits):
    pytest.importorskip("bitsandbytes")
    cli = fit(
        tiny_config(tiny_world, tmp_path / bits),
        f"--model.weak_base.quantization={bits}",
        f"--model.weak_aligned.quantization={bits}",
        "--trainer.max_steps=3",
    )
    import bitsandbytes as bnb

    layer = bnb.nn.Linear8bitLt if bits == "8bit" else bnb.nn.Linear4bit
    for role in ("weak_base", "weak_aligned"):
        assert any(isinstance(m, layer) for m in cli.model.frozen[role].modules())
    losses = metrics(cli)["train/loss"]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


def test_lora_policy_uses_the_adapter_free_base_as_reference(tiny_world, tmp_path):
    cli = fit(tiny_config(tiny_world, tmp_path / "lora"), "--model.policy.lora.r=4", "--model.learning_rate=0.01")
    model = cli.model
    assert "reference" not in model.frozen  # no second copy
    losses = metrics(cli)["train/loss"]
    assert losses[-1] < losses[0]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "lora" / "export")
    start = weights(tiny_world / "policy")
    assert any(not torch.equal(merged.state_dict()[n], start[n]) for n in start)


def test_print_config_output_feeds_back_into_fit(tiny_world, tmp_path):
    config = tiny_config(tiny_world, tmp_path / "printed")
    printed = subprocess.run(
        [sys.executable, "-m", "wspo_lightning.cli", "fit", "--config", str(config), "--print_config"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "class_path: wspo_lightning.module.WSPOModule" in printed
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(printed)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "wspo_lightning.cli",
            "fit",
            "--config",
            str(resolved),
            "--trainer.max_steps=1",
            "--trainer.limit_val_batches=0",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
