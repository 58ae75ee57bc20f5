"""The README's "Run on a GPU node" block, run command by command, in order, on CPU: tiny models of the same
architectures stand in for the Hub's, a tiny UltraFeedback-layout folder for the dataset, a tiny reward model
for `rm:models/reward_model`, one process for torchrun's eight, recipes with what a CPU needs changed
(`recipe_stand_ins.for_device`), and stand-ins for the Hub's login and upload. Every later step reads what the
earlier ones wrote (the weak aligned model, the cache, the exports, the samples). benchmarks/gpu_check.py runs
the same on one GPU (its `gpu_path` stage)."""

from __future__ import annotations

import json

import pytest
from recipe_world import TINY, own_environment, readme_gpu_commands, run_readme_path

own_environment = pytest.fixture(autouse=True)(own_environment)


def test_every_command_of_the_readme_gpu_section_runs_in_order(tmp_path, monkeypatch):
    import huggingface_hub

    import wspo_lightning.models

    commands = readme_gpu_commands()
    assert [c.split()[0] for c in commands].count("torchrun") >= 6 and commands[-1].startswith("wspo push")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    uploads = []
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    monkeypatch.setattr(wspo_lightning.models, "hub_unreachable", lambda: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda api, *a, **k: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda api, *a, **k: uploads.append(k))

    rows = run_readme_path(tmp_path, TINY, "cpu")
    assert [row["command"] for row in rows] == commands
    assert [(row["label"], row["exit"]) for row in rows] == [(row["label"], 0) for row in rows], rows

    results = {row["name"]: row for row in json.loads((tmp_path / "eval" / "results.json").read_text())}
    assert sorted(results) == ["base", "dpo", "wspo"] and all(r["n"] == 8 for r in results.values())
    assert uploads and uploads[0]["folder_path"] == "runs/qwen2.5_7b_wspo_fsdp2/hf_model"
