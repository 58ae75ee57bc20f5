"""The README's "Run on a GPU node" block, run command by command, in order, on CPU: tiny models of the same
architectures stand in for the Hub's, a tiny UltraFeedback-layout folder for the dataset, a tiny reward model
for `rm:models/reward_model`, one process for torchrun's eight, recipes with what a CPU needs changed
(`recipe_world.on_cpu`), and stand-ins for the Hub's login and upload. Every later step reads what the earlier
ones wrote (the weak aligned model, the cache, the exports, the samples)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from helpers import ROOT
from recipe_world import on_cpu, own_environment, run, write_stand_ins
from transformers import LlamaForSequenceClassification

from wspo_lightning.tiny import build_tiny_model

own_environment = pytest.fixture(autouse=True)(own_environment)
TORCHRUN = "torchrun --standalone --nproc_per_node=8 -m wspo_lightning.cli "


def readme_gpu_commands() -> list[str]:
    """The command lines of the README's "Run on a GPU node" code block."""
    section = (ROOT / "README.md").read_text().split("## Run on a GPU node", 1)[1].split("\n## ", 1)[0]
    block = [line[4:] for line in section.splitlines() if line.startswith("    ")]
    return [line for line in block if line and not line.startswith("#")]


def write_reward_model(folder: Path, tokenizer) -> None:
    config = build_tiny_model("qwen2", tokenizer, hidden_size=64).config
    config.num_labels = 1
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_every_command_of_the_readme_gpu_section_runs_in_order(tmp_path, monkeypatch):
    import huggingface_hub

    import wspo_lightning.models

    commands = readme_gpu_commands()
    assert [c.split()[0] for c in commands].count("torchrun") >= 6 and commands[-1].startswith("wspo push")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    models = write_stand_ins(tmp_path / "stand_ins")
    from transformers import AutoTokenizer

    write_reward_model(tmp_path / "models" / "reward_model", AutoTokenizer.from_pretrained(models["qwen"]))
    uploads = []
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    monkeypatch.setattr(wspo_lightning.models, "hub_unreachable", lambda: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda api, *a, **k: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda api, *a, **k: uploads.append(k))

    for command in commands:
        for recipe in re.findall(r"configs/recipes/\S+\.yaml", command):
            command = command.replace(recipe, str(on_cpu(ROOT / recipe, models, tmp_path, keep_runs=True)))
        command = command.replace("Qwen/Qwen2.5-7B-Instruct", str(models["qwen"]))
        command = command.replace("HuggingFaceH4/ultrafeedback_binarized", str(models["ultrafeedback"]))
        argv = shlex.split(command.removeprefix(TORCHRUN).removeprefix("wspo "))
        assert run(argv) == 0, command

    results = {row["name"]: row for row in json.loads(Path("eval/results.json").read_text())}
    assert sorted(results) == ["base", "dpo", "wspo"] and all(r["n"] == 8 for r in results.values())
    assert uploads and uploads[0]["folder_path"] == "runs/qwen2.5_7b_wspo_fsdp2/hf_model"
