"""What the recipe tests share: tiny stand-ins of the recipes' model families and data, a recipe rewritten for a
CPU, `wspo` run as its own process would (its W&B run ends with it), and an environment restored after each
test (in-process DDP/FSDP2 runs and W&B set variables that later launches would inherit)."""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from helpers import ROOT, ultrafeedback_rows, write_hub_layout

from wspo_lightning.cli import main as wspo
from wspo_lightning.io import write_jsonl
from wspo_lightning.tiny import build_tokenizer, preference_records, write_tiny_model

RECIPES = sorted((ROOT / "configs" / "recipes").glob("*.yaml"))
ROLES = ("policy", "reference", "weak_base", "weak_aligned")


def write_stand_ins(root: Path) -> dict[str, Path]:
    """Tiny models per family (the base, and another seed for the aligned one) and the data files."""
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


def stand_in(path: str, models: dict[str, Path], keep_runs: bool = False) -> str:
    """The tiny model standing in for a recipe's model path: same family; an export of an earlier recipe
    (`runs/...`) is the family's aligned model, or itself with `keep_runs` (the earlier recipe ran)."""
    if keep_runs and path.startswith("runs/"):
        return path
    name = path.lower()
    family = "llama" if "llama" in name else "gpt2" if "gpt2" in name else "qwen"
    return str(models[family + ("_aligned" if name.startswith("runs/") else "")])


def on_cpu(recipe: Path, models: dict[str, Path], out: Path, keep_runs: bool = False) -> Path:
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
            model[role]["path"] = stand_in(model[role]["path"], models, keep_runs)
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


def own_environment():
    """What in-process DDP/FSDP2 runs and W&B put in the environment (MASTER_PORT, WANDB_SERVICE, ...) goes
    with each test: later tests launch processes that would inherit it."""
    saved = dict(os.environ)
    yield
    for name in set(os.environ) - set(saved):
        del os.environ[name]
    os.environ.update(saved)
