"""Stand-ins for what the shipped recipes name, and the README's "Run on a GPU node" path run against them.

Random models of the recipes' families built from configs (Qwen2 with a ChatML tokenizer, Llama with a Llama 3
one, GPT-2; nothing is downloaded), a folder in the Hub layout of UltraFeedback, a reward model, each recipe
rewritten for one device with only model paths, device counts, lengths and step counts changed (`for_device`),
and the README's commands run in order, in this process, against them (`run_readme_path`).

Shared by tests/recipe_world.py (the recipe tests and tests/test_gpu_path.py: `TINY` on CPU) and
benchmarks/gpu_check.py (its `gpu_path` stage: `SMALL` on one GPU).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs" / "recipes").glob("*.yaml"))
ROLES = ("policy", "reference", "weak_base", "weak_aligned")
# family -> (architecture, tokenizer shape or None for a template-free tokenizer)
FAMILIES = {"qwen": ("qwen2", "chatml"), "llama": ("llama", "llama3"), "gpt2": ("gpt2", None)}
LAUNCHER = re.compile(r"^(torchrun( --\S+)* -m wspo_lightning\.cli|wspo) ")  # what starts a README command
HUB_STAND_INS = {"Qwen/Qwen2.5-7B-Instruct": "qwen", "HuggingFaceH4/ultrafeedback_binarized": "ultrafeedback"}


@dataclass(frozen=True)
class Size:
    """How big the stand-ins are, and how far each command runs."""

    hidden_size: int = 64  # bitsandbytes quantizes in blocks of 64
    num_layers: int = 2
    n_train: int = 12  # UltraFeedback rows in train_prefs and test_prefs
    n_test: int = 4
    max_steps: int = 2
    max_length: int = 96
    max_new_tokens: int | None = None  # `wspo sample`'s, when set (None: the command's own)


TINY = Size()  # on a CPU, in CI
SMALL = Size(hidden_size=256, num_layers=4, n_train=32, n_test=8, max_steps=4, max_length=256)  # on one GPU


def write_stand_ins(root: Path, size: Size = TINY, families: tuple[str, ...] = tuple(FAMILIES)) -> dict[str, Path]:
    """Models per family (the base, and another seed for the aligned one) and the data: UltraFeedback's layout
    (`ultrafeedback`) and a JSONL of preference records (`jsonl`)."""
    from wspo_lightning.io import write_jsonl
    from wspo_lightning.tiny import (
        build_tokenizer,
        preference_records,
        ultrafeedback_rows,
        write_hub_layout,
        write_tiny_model,
    )

    out = {}
    for family in families:
        seed = list(FAMILIES).index(family)
        arch, shape = FAMILIES[family]
        tokenizer = build_tokenizer(shape=shape) if shape else build_tokenizer(chat_template=False)
        for kind, offset in (("", 0), ("_aligned", 10)):
            out[family + kind] = write_tiny_model(
                root / (family + kind), arch, seed + offset, size.num_layers, size.hidden_size, tokenizer
            )
    splits = {"train_prefs": ultrafeedback_rows(size.n_train), "test_prefs": ultrafeedback_rows(size.n_test, seed=1)}
    out["ultrafeedback"] = write_hub_layout(root / "ultrafeedback", splits)
    out["jsonl"] = root / "preferences.jsonl"
    write_jsonl(out["jsonl"], preference_records(16))
    return out


def write_reward_model(folder: Path, tokenizer, size: Size = TINY) -> Path:
    """A random sequence-classification model with one label, for `rm:FOLDER`."""
    import torch
    from transformers import LlamaForSequenceClassification

    from wspo_lightning.tiny import build_tiny_model

    config = build_tiny_model("qwen2", tokenizer, num_layers=size.num_layers, hidden_size=size.hidden_size).config
    config.num_labels = 1
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def stand_in(path: str, models: dict[str, Path], keep_runs: bool = False) -> str:
    """The stand-in model for a recipe's model path: same family; an export of an earlier recipe (`runs/...`)
    is the family's aligned model, or itself with `keep_runs` (the earlier recipe ran)."""
    if keep_runs and path.startswith("runs/"):
        return path
    name = path.lower()
    family = "llama" if "llama" in name else "gpt2" if "gpt2" in name else "qwen"
    return str(models[family + ("_aligned" if name.startswith("runs/") else "")])


def for_device(
    recipe: Path,
    models: dict[str, Path],
    out: Path,
    keep_runs: bool = False,
    size: Size = TINY,
    accelerator: str = "cpu",
    wandb: bool = True,
) -> Path:
    """The recipe on one device of `accelerator` with only model paths, device counts, lengths and step counts
    changed (on a CPU FSDP1 too, which torch runs only on an accelerator: FSDP2 instead; without `wandb`, W&B
    loggers become CSV loggers); written to `out`, also the working folder (the recipe's `runs/...` land there)."""
    config = yaml.safe_load(recipe.read_text())
    trainer, model, data = config["trainer"], config["model"]["init_args"], config["data"]
    trainer.update(accelerator=accelerator, devices=1, num_nodes=1, max_epochs=None, max_steps=size.max_steps)
    trainer.update(val_check_interval=1.0, limit_val_batches=2, num_sanity_val_steps=0)
    strategy = trainer.get("strategy")
    if accelerator == "cpu" and isinstance(strategy, dict) and strategy["class_path"].endswith(".FSDPStrategy"):
        trainer["strategy"] = {"class_path": "wspo_lightning.strategies.FSDP2Strategy"}
    if not wandb and trainer.get("logger"):
        loggers = trainer["logger"] if isinstance(trainer["logger"], list) else [trainer["logger"]]
        trainer["logger"] = [
            {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(out / "logs")}}
            if isinstance(lg, dict) and lg["class_path"].endswith("WandbLogger")
            else lg
            for lg in loggers
        ]
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
    data.update(max_length=size.max_length, num_workers=0)
    path = out / recipe.name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def readme_gpu_commands() -> list[str]:
    """The command lines of the README's "Run on a GPU node" code block."""
    section = (ROOT / "README.md").read_text().split("## Run on a GPU node", 1)[1].split("\n## ", 1)[0]
    block = [line[4:] for line in section.splitlines() if line.startswith("    ")]
    return [line for line in block if line and not line.startswith("#")]


def label(command: str) -> str:
    """A README command in a few words: `wspo SUBCOMMAND` and what it reads or writes."""
    words = shlex.split(LAUNCHER.sub("", command))
    recipe = next((Path(w).name for w in words if w.startswith("configs/recipes/")), None)
    out = words[words.index("--out") + 1] if "--out" in words else None
    what = recipe or out or (words[1] if len(words) > 1 and not words[1].startswith("-") else "")
    return f"{'torchrun ' if command.startswith('torchrun') else ''}wspo {words[0]} {what}".strip()


def device_argv(command: str, models: dict[str, Path], out: Path, size: Size, accelerator: str, wandb: bool):
    """A README command's arguments on the stand-ins: its recipes rewritten (`for_device`), Hub ids replaced,
    one process for torchrun's, and `wspo sample` cut at `size.max_new_tokens` when set."""
    for recipe in re.findall(r"configs/recipes/\S+\.yaml", command):
        rewritten = for_device(ROOT / recipe, models, out, True, size, accelerator, wandb)
        command = command.replace(recipe, str(rewritten))
    for hub_id, name in HUB_STAND_INS.items():
        command = command.replace(hub_id, str(models[name]))
    argv = shlex.split(LAUNCHER.sub("", command))
    if argv[0] == "sample" and size.max_new_tokens:
        argv.append(f"--max_new_tokens={size.max_new_tokens}")
    return argv


def run(argv: list[str]) -> int:
    """`wspo ARGV` as its own process would run it: its exit code, and its W&B run ends with it."""
    from wspo_lightning.cli import main as wspo

    try:
        return wspo(argv)
    except SystemExit as stop:  # a parser's --help or usage error
        return stop.code if isinstance(stop.code, int) else 1
    finally:
        if "wandb" in sys.modules:
            sys.modules["wandb"].finish()


class _Tee(io.TextIOBase):
    def __init__(self, stream) -> None:
        self.stream, self.text = stream, io.StringIO()

    def write(self, text: str) -> int:
        self.text.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


def run_readme_path(
    work: Path, size: Size = TINY, accelerator: str = "cpu", wandb: bool = True, report=None
) -> list[dict]:
    """Every command of the README's "Run on a GPU node" block, in order, in `work` (its `runs/`, `eval/` and
    `models/` land there), on stand-ins written under `work/stand_ins`. One row per command: `command`, `label`,
    `seconds`, `exit` (its exit code) and `errors` (its `wspo: error:` lines); `report(row)` after each. After a
    command fails, the later ones (which read what it writes) are rows with `exit` None."""
    from transformers import AutoTokenizer

    work = Path(work).resolve()
    models = write_stand_ins(work / "stand_ins", size, families=("qwen",))
    write_reward_model(work / "models" / "reward_model", AutoTokenizer.from_pretrained(models["qwen"]), size)
    rows, failed, here = [], False, Path.cwd()
    os.chdir(work)
    try:
        for command in readme_gpu_commands():
            row = {"command": command, "label": label(command), "seconds": 0.0, "exit": None, "errors": []}
            if not failed:
                argv = device_argv(command, models, work, size, accelerator, wandb)
                tee, start = _Tee(sys.stderr), time.perf_counter()
                with contextlib.redirect_stderr(tee):
                    try:
                        row["exit"] = run(argv)
                    except Exception as err:  # noqa: BLE001 - a crash is this command's row; the table goes on
                        row["exit"], row["errors"] = 1, [f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"]
                row["seconds"] = round(time.perf_counter() - start, 1)
                row["errors"] += [line for line in tee.text.getvalue().splitlines() if line.startswith("wspo: error:")]
                release_memory()
                failed = row["exit"] != 0
            rows.append(row)
            if report is not None:
                report(row)
    finally:
        os.chdir(here)
    return rows


def release_memory() -> None:
    """What a finished command held on an accelerator, back before the next loads its models."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
