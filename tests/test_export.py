"""HFExport: the model card and resolved config beside the weights, LoRA over a 4-bit base merged onto the
float base (checked against base + B @ A * alpha / r computed apart), and no Hub call unless asked."""

from __future__ import annotations

import re
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


def _with_export(config, **init_args):
    data = yaml.safe_load(config.read_text())
    for callback in data["trainer"]["callbacks"]:
        if callback["class_path"].endswith("HFExport"):
            callback["init_args"].update(init_args)
    config.write_text(yaml.safe_dump(data))
    return config


def _hub(monkeypatch, token="hf_test", unreachable=None, fail_upload=False):
    """Stand-ins for the Hub: a login token, reachability, and HfApi calls recorded (or an upload that fails)."""
    import huggingface_hub

    import wspo_lightning.models

    record = _Recorder()
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: token)
    monkeypatch.setattr(wspo_lightning.models, "hub_unreachable", lambda: unreachable)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", record("create_repo"))
    if fail_upload:

        def refuse(api, *args, **kwargs):
            raise OSError("503 Service Unavailable")

        monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", refuse)
    else:
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", record("upload_folder"))
    return record


def test_push_to_hub_is_off_by_default_and_calls_the_hub_only_when_asked(tiny_world, tmp_path, monkeypatch):
    record = _hub(monkeypatch)
    fit(tiny_config(tiny_world, tmp_path / "off"), "--trainer.max_steps=1")
    assert record.calls == []
    with pytest.raises(InputError, match="hub_repo_id"):
        HFExport(push_to_hub=True)
    config = _with_export(tiny_config(tiny_world, tmp_path / "on"), push_to_hub=True, hub_repo_id="me/tiny-wspo")
    fit(config, "--trainer.max_steps=1")
    assert [c[0] for c in record.calls] == ["create_repo", "upload_folder"]
    assert record.calls[1][2]["folder_path"] == str(tmp_path / "on" / "export")
    assert record.calls[1][2]["repo_id"] == "me/tiny-wspo" and record.calls[0][2]["private"] is True


@pytest.mark.parametrize(
    "token, unreachable, said",
    [
        (None, None, "no Hugging Face login to push me/tiny-wspo with: run `hf auth login`"),
        ("hf_test", "HF_HUB_OFFLINE is set", r"the Hub cannot be reached \(HF_HUB_OFFLINE is set\)"),
    ],
    ids=["no-login", "offline"],
)
def test_push_to_hub_without_login_or_hub_fails_in_one_line_before_training(
    tiny_world, tmp_path, monkeypatch, capsys, token, unreachable, said
):
    from wspo_lightning.cli import main

    record = _hub(monkeypatch, token=token, unreachable=unreachable)
    config = _with_export(tiny_config(tiny_world, tmp_path), push_to_hub=True, hub_repo_id="me/tiny-wspo")
    assert main(["fit", "--config", str(config), "--trainer.max_steps=1"]) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("wspo:")]
    assert re.search(said, line) and "wspo push DIR --hub_repo_id" in line
    assert record.calls == [] and not (tmp_path / "checkpoints").exists()  # no step was trained


def test_a_failed_upload_is_one_line_with_the_retry_command_which_then_pushes(
    tiny_world, tmp_path, monkeypatch, capsys
):
    from wspo_lightning.cli import main

    _hub(monkeypatch, fail_upload=True)
    config = _with_export(tiny_config(tiny_world, tmp_path), push_to_hub=True, hub_repo_id="me/tiny-wspo")
    assert main(["fit", "--config", str(config), "--trainer.max_steps=1"]) == 2
    export = tmp_path / "export"
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("wspo:")]
    assert "503 Service Unavailable" in line
    assert line.endswith(f"retry with: wspo push {export} --hub_repo_id me/tiny-wspo")
    assert (export / "model.safetensors").exists()  # the trained export is kept

    record = _hub(monkeypatch)
    assert main(["push", str(export), "--hub_repo_id", "me/tiny-wspo"]) == 0
    assert [c[0] for c in record.calls] == ["create_repo", "upload_folder"]
    assert record.calls[1][2]["folder_path"] == str(export)


def test_the_export_dtype_follows_the_training_precision_unless_given(tiny_world, tmp_path):
    from wspo_lightning.callbacks.export import export_dtype

    float_model = torch.nn.Linear(2, 2)
    assert export_dtype(None, "bf16-mixed", float_model) == torch.bfloat16  # not the float32 master weights
    assert export_dtype(None, "bf16-true", float_model) == torch.bfloat16
    assert export_dtype(None, "16-mixed", float_model) == torch.float16
    assert export_dtype(None, "32-true", float_model) == torch.float32
    assert export_dtype(None, "32-true", float_model.to(torch.bfloat16)) == torch.bfloat16
    assert export_dtype("float32", "bf16-mixed", float_model) == torch.float32

    config = _with_export(tiny_config(tiny_world, tmp_path), dtype="bfloat16", base_model="org/tiny-base")
    cli = fit(config, "--trainer.max_steps=1")
    export = tmp_path / "export"
    weights = load_file(str(export / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    trained = {name: p for name, p in cli.model.policy.state_dict().items()}
    assert all(p.dtype == torch.float32 for p in trained.values())  # the module itself was not cast
    for name, tensor in weights.items():
        assert torch.equal(tensor, trained[name].to(torch.bfloat16)), name
    assert '"dtype": "bfloat16"' in (export / "config.json").read_text()
    card = (export / "README.md").read_text()
    assert "base_model: org/tiny-base" in card and "| weights | bfloat16 |" in card
    with pytest.raises(InputError, match="HFExport.dtype must be one of float32, bfloat16, float16"):
        HFExport(dtype="int8")


def test_a_cast_export_of_tied_embeddings_writes_the_shared_weight_once(tmp_path):
    """A bf16 export of a float32 model whose lm_head shares the embeddings: one stored tensor (as an uncast
    save_pretrained writes), equal to the embeddings cast, and the reloaded model ties them again."""
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from wspo_lightning.callbacks.export import cast_state_dict

    config = Qwen2Config(
        vocab_size=37, hidden_size=24, intermediate_size=45, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(tmp_path / "float32")
    model.save_pretrained(tmp_path / "bf16", state_dict=cast_state_dict(model, torch.bfloat16))
    stored = load_file(tmp_path / "bf16" / "model.safetensors")
    assert stored.keys() == load_file(tmp_path / "float32" / "model.safetensors").keys()
    assert "lm_head.weight" not in stored
    for name, tensor in model.state_dict().items():
        if name in stored:
            assert torch.equal(stored[name], tensor.to(torch.bfloat16)), name
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
