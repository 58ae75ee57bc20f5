"""HFExport: the model card and resolved config beside the weights, LoRA over a 4-bit base merged onto the
float base (checked against base + B @ A * alpha / r computed apart), and no Hub call unless asked."""

from __future__ import annotations

import sys

import pytest
import torch
import yaml
from helpers import fit, metrics, tiny_config
from safetensors.torch import load_file

from wspo_lightning.callbacks import HFExport
from wspo_lightning.errors import InputError
from wspo_lightning.lightning_cli import run_cli


def test_model_card_names_the_base_weak_pair_gamma_schedule_data_metrics_and_command(
    tiny_world, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(sys, "argv", ["/venv/bin/wspo", "fit", "--config", "my run.yaml"])
    gamma = {"kind": "linear_warmup", "start": 0.5, "value": 2.0, "warmup_steps": 3}
    cli = fit(
        tiny_config(tiny_world, tmp_path / "run", gamma=gamma),
        "--trainer.max_steps=4",
        "--trainer.val_check_interval=4",
    )
    export = tmp_path / "run" / "export"
    card = (export / "README.md").read_text()
    for expected in (
        f"| base model (policy) | `{tiny_world / 'policy'}` |",
        f"| weak base | `{tiny_world / 'weak_base'}` |",
        f"| weak aligned | `{tiny_world / 'weak_aligned'}` |",
        "| gamma | linear_warmup schedule: value=2.0, start=0.5, warmup_steps=3, every=100, factor=2.0 |",
        "| objective | WSPOModule: WSPO",
        f"| train data | `{tiny_world / 'train.jsonl'}` (64 records) |",
        f"| val data | `{tiny_world / 'val.jsonl'}` (16 records) |",
        "| trained | 4 optimizer steps |",
        "wspo fit --config 'my run.yaml'",
        "wspo fit --config training_config.yaml",
    ):
        assert expected in card, expected
    logged = metrics(cli)
    for name in ("train/loss", "val/rewards/strong_margin"):
        assert f"| `{name}` | {logged[name][-1]:.6g} |" in card
    # the resolved config beside the card is a config wspo fit reads, with the run's own schedule
    saved = yaml.safe_load((export / "training_config.yaml").read_text())
    assert any(
        c.get("init_args") == {**gamma, "total_steps": None, "every": 100, "factor": 2.0}
        for c in saved["trainer"]["callbacks"]
    )
    with pytest.raises(SystemExit):
        run_cli(["fit", "--config", str(export / "training_config.yaml"), "--print_config"])
    assert "WSPOModule" in capsys.readouterr().out


def _lora_delta(policy, prefix: str = "base_model.model.") -> dict[str, torch.Tensor]:
    """B @ A * alpha / r of every adapted linear layer, keyed by the plain model's weight name."""
    deltas = {}
    for name, module in policy.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            a, b = module.lora_A["default"].weight.float(), module.lora_B["default"].weight.float()
            deltas[name.removeprefix(prefix) + ".weight"] = b @ a * module.scaling["default"]
    return deltas


def test_lora_over_a_4bit_base_merges_onto_the_float_base(tiny_world, tmp_path):
    pytest.importorskip("bitsandbytes")
    cli = fit(
        tiny_config(tiny_world, tmp_path / "qlora"),
        "--model.policy.quantization=4bit",
        "--model.policy.lora.r=4",
        "--model.policy.lora.alpha=8",
        "--model.learning_rate=0.01",
        "--trainer.max_steps=3",
    )
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in cli.model.policy.modules())  # trained over 4-bit
    deltas = _lora_delta(cli.model.policy)
    assert deltas and all(d.abs().max() > 0 for d in deltas.values())  # the adapters learned something
    base = load_file(tiny_world / "policy" / "model.safetensors")
    merged = load_file(tmp_path / "qlora" / "export" / "model.safetensors")
    assert set(deltas) <= set(merged)
    for name, weight in base.items():
        expected = weight.float() + deltas.get(name, 0)
        assert torch.allclose(merged[name].float(), expected, atol=1e-6), name
    assert "merged onto the float32 base" in (tmp_path / "qlora" / "export" / "README.md").read_text()


class _Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, name):
        return lambda api, *args, **kwargs: self.calls.append((name, args, kwargs))


def test_push_to_hub_is_off_by_default_and_calls_the_hub_only_when_asked(tiny_world, tmp_path, monkeypatch):
    import huggingface_hub

    record = _Recorder()
    for name in ("create_repo", "upload_folder"):
        monkeypatch.setattr(huggingface_hub.HfApi, name, record(name))
    fit(tiny_config(tiny_world, tmp_path / "off"), "--trainer.max_steps=1")
    assert record.calls == []
    with pytest.raises(InputError, match="hub_repo_id"):
        HFExport(push_to_hub=True)
    config = tiny_config(tiny_world, tmp_path / "on")
    data = yaml.safe_load(config.read_text())
    for callback in data["trainer"]["callbacks"]:
        if callback["class_path"].endswith("HFExport"):
            callback["init_args"].update(push_to_hub=True, hub_repo_id="me/tiny-wspo")
    config.write_text(yaml.safe_dump(data))
    fit(config, "--trainer.max_steps=1")
    assert [c[0] for c in record.calls] == ["create_repo", "upload_folder"]
    assert record.calls[1][2]["folder_path"] == str(tmp_path / "on" / "export")
    assert record.calls[1][2]["repo_id"] == "me/tiny-wspo" and record.calls[0][2]["private"] is True
