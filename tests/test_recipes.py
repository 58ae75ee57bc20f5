"""Every shipped recipe runs, as a user runs it, with only what a CPU needs changed: model paths (tiny models
of the recipe's architectures, tokenizers built locally), device counts, lengths, step counts and, for FSDP1
(Lightning refuses it without a GPU), the strategy (FSDP2, its CPU stand-in). The data is a tiny dataset in
the Hub's UltraFeedback layout, read through the splits the recipe names. Each recipe goes through
`wspo precompute`, `wspo fit`, a resume with `--ckpt_path last` and its export, so a wrong split, key or
class in a recipe fails here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, ultrafeedback_rows, write_hub_layout

from wspo_lightning.cli import main as wspo
from wspo_lightning.io import write_jsonl
from wspo_lightning.resume import checkpoint_metadata
from wspo_lightning.tiny import build_tokenizer, preference_records, write_tiny_model

RECIPES = sorted((ROOT / "configs" / "recipes").glob("*.yaml"))
ROLES = ("policy", "reference", "weak_base", "weak_aligned")


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> dict[str, Path]:
    """Tiny models per family (the base, and another seed for the aligned one) and the data files."""
    root = tmp_path_factory.mktemp("recipe_world")
    tokenizers = {
        "qwen": ("qwen2", build_tokenizer(shape="chatml")),
        "llama": ("llama", build_tokenizer(shape="llama3")),  # another family's vocabulary and template
        "gpt2": ("gpt2", build_tokenizer(chat_template=False)),
    }
    out = {}
    for seed, (family, (arch, tokenizer)) in enumerate(tokenizers.items()):
        for kind, offset in (("", 0), ("_aligned", 10)):
            out[family + kind] = write_tiny_model(
                root / (family + kind), arch, seed + offset, hidden_size=64, tokenizer=tokenizer
            )  # 64: bitsandbytes quantizes in blocks of 64
    train, test = ultrafeedback_rows(12), ultrafeedback_rows(4, seed=1)
    out["ultrafeedback"] = write_hub_layout(root / "ultrafeedback", {"train_prefs": train, "test_prefs": test})
    out["jsonl"] = root / "preferences.jsonl"
    write_jsonl(out["jsonl"], preference_records(16))
    return out


def stand_in(path: str, models: dict[str, Path]) -> str:
    """The tiny model standing in for a recipe's model path: same family; an export of an earlier recipe
    (`runs/...`) is the family's aligned model."""
    name = path.lower()
    family = "llama" if "llama" in name else "gpt2" if "gpt2" in name else "qwen"
    return str(models[family + ("_aligned" if name.startswith("runs/") else "")])


def on_cpu(recipe: Path, models: dict[str, Path], out: Path) -> Path:
    """The recipe with only model paths, device counts, lengths, step counts and FSDP1 changed; written to
    `out`, which is also the working folder (the recipe's relative `runs/...` paths land there)."""
    config = yaml.safe_load(recipe.read_text())
    trainer, model, data = config["trainer"], config["model"]["init_args"], config["data"]
    trainer.update(accelerator="cpu", devices=1, num_nodes=1, max_epochs=None, max_steps=2)
    trainer.update(val_check_interval=1.0, limit_val_batches=2, num_sanity_val_steps=0)
    strategy = trainer.get("strategy")
    if isinstance(strategy, dict) and strategy["class_path"].endswith(".FSDPStrategy"):
        trainer["strategy"] = {"class_path": "wspo_lightning.strategies.FSDP2Strategy"}
    for callback in trainer.get("callbacks", []):
        args = callback.setdefault("init_args", {}) or {}
        callback["init_args"] = args
        if callback["class_path"].endswith("ModelCheckpoint"):
            args["every_n_train_steps"] = 1
        if callback["class_path"].endswith("SampleTable"):
            args.update(num_prompts=2, sampling={**(args.get("sampling") or {}), "max_new_tokens": 4})
    for role in ROLES:
        if isinstance(model.get(role), dict):
            model[role]["path"] = stand_in(model[role]["path"], models)
    is_hub_layout = "train_split" in data
    data["train_path"] = str(models["ultrafeedback"] if is_hub_layout else models["jsonl"])
    data.update(max_length=96, num_workers=0)
    path = out / recipe.name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run(argv: list[str]) -> int:
    """`wspo ARGV` as its own process would run it: its W&B run ends with it."""
    import wandb

    try:
        return wspo(argv)
    finally:
        wandb.finish()


@pytest.fixture(autouse=True)
def own_environment():
    """What in-process DDP/FSDP2 runs and W&B put in the environment (MASTER_PORT, WANDB_SERVICE, ...) goes
    with each test: later tests launch processes that would inherit it."""
    saved = dict(os.environ)
    yield
    for name in set(os.environ) - set(saved):
        del os.environ[name]
    os.environ.update(saved)


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_precomputes_fits_resumes_and_exports_on_cpu(recipe, stand_ins, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    config = on_cpu(recipe, stand_ins, tmp_path)
    settings = yaml.safe_load(config.read_text())
    cache = [f"--model.init_args.cache_dir={tmp_path / 'cache'}"]

    assert run(["precompute", "--config", str(config), *cache]) == 0
    assert (tmp_path / "cache" / "manifest.json").exists()
    assert run(["fit", "--config", str(config), *cache, "--trainer.max_steps=1"]) == 0
    assert run(["fit", "--config", str(config), *cache, "--ckpt_path=last"]) == 0

    callbacks = {cb["class_path"].rsplit(".", 1)[1]: cb["init_args"] for cb in settings["trainer"]["callbacks"]}
    last = checkpoint_metadata(Path(callbacks["ModelCheckpoint"]["dirpath"]) / "last.ckpt")  # FSDP2: a folder
    assert last["global_step"] == 2  # resumed at step 1, trained the second
    export = Path(callbacks["HFExport"]["dirpath"])
    assert (export / "README.md").exists() and any(export.glob("*.safetensors"))
    # offline-run-DATE_TIME-ID, with -N added when a run of that id started in the same second
    ids = {run.name.split("-")[3] for run in (tmp_path / "wandb").glob("offline-run-*")}
    assert ids == set(last["callbacks"]["RunIdentity"]["wandb_ids"])  # the resume continued the one W&B run
