"""The model card (README.md) of an exported policy: what was trained from what, on what, how, to what end,
and the command that made it. Read from the run itself: the module's specs, hyperparameters and pair loss, the
GammaSchedule callback, the data module's settings, the trainer's last metrics and LightningCLI's config."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from wspo_lightning.callbacks.gamma import GammaSchedule
from wspo_lightning.data.hub import is_hub_id

CONFIG_NAME = "training_config.yaml"
"""The resolved LightningCLI config, written beside the card: `wspo fit --config` it to train again."""

_OBJECTIVES = {
    "WSPOModule": "WSPO (weak-to-strong preference optimisation, arXiv 2410.18640): the policy's per-token "
    "log-ratio to its reference tracks gamma times the weak pair's",
    "DPOModule": "DPO (direct preference optimisation) on preference pairs",
    "SFTModule": "supervised fine-tuning on the chosen responses",
}


def resolved_config(trainer: pl.Trainer) -> str | None:
    """The run's whole config as LightningCLI resolved it (None outside LightningCLI)."""
    from lightning.pytorch.cli import SaveConfigCallback

    for callback in trainer.callbacks:
        if isinstance(callback, SaveConfigCallback):
            return callback.parser.dump(callback.config, skip_none=False)
    return None


def launch_command() -> str | None:
    """This process's command line when it is the `wspo` command (None inside another program)."""
    if Path(sys.argv[0]).name not in ("wspo", "cli.py"):
        return None
    return shlex.join(["wspo", *sys.argv[1:]])


def gamma_text(trainer: pl.Trainer, pl_module: pl.LightningModule) -> str | None:
    schedules = [c for c in trainer.callbacks if isinstance(c, GammaSchedule)]
    if schedules:
        state = schedules[0].state_dict()
        if state["kind"] == "constant":
            return f"{state['value']:g} (constant)"
        kept = {k: v for k, v in state.items() if k != "kind" and v is not None}
        return f"{state['kind']} schedule: " + ", ".join(f"{k}={v}" for k, v in kept.items())
    gamma = getattr(pl_module, "gamma", None)
    return None if gamma is None else f"{gamma:g} (constant)"


def _data_rows(datamodule: Any) -> list[tuple[str, str]]:
    if datamodule is None or not hasattr(datamodule, "train_path"):
        return []
    rows = []
    for split in ("train", "val", "test"):
        path = getattr(datamodule, f"{split}_path", None)
        name = getattr(datamodule, "dataset_splits", {}).get(split)
        records = getattr(datamodule, f"{split}_records", None) or []
        if not (path or name or records):
            continue
        source = path or datamodule.train_path
        if name and (split != "train" or name != "train"):  # the default split of a plain file goes unsaid
            source = f"{source} [{name}]"
        elif split == "val" and not path:
            source = f"{datamodule.val_fraction:g} of the training data, held out"
        rows.append((f"{split} data", f"`{source}` ({len(records)} records)"))
    config = getattr(datamodule, "dataset_config", None)
    if config:
        rows.append(("dataset subset", f"`{config}`"))
    return rows


def model_card(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    lora_note: str | None,
    base_model: str | None = None,
    dtype: Any = None,
) -> str:
    """README.md text for the export of `pl_module.policy` after `trainer.fit`. `base_model`: the card's Hub id
    of the base (default: the policy's path when it is one); `dtype`: the exported weights' dtype."""
    objective = type(pl_module).__name__
    spec = getattr(pl_module, "policy_spec", None)
    base = spec.path if spec is not None else "unknown"
    rows = [("base model (policy)", f"`{base}`"), ("objective", f"{objective}: {_OBJECTIVES.get(objective, '')}")]
    frozen = pl_module.frozen_specs() if hasattr(pl_module, "frozen_specs") else {}
    for role in ("weak_base", "weak_aligned"):
        if role in frozen:
            rows.append((role.replace("_", " "), f"`{frozen[role].path}`"))
    gamma = gamma_text(trainer, pl_module) if "weak_base" in frozen else None
    if gamma:
        rows.append(("gamma", gamma))
    hparams = dict(pl_module.hparams) if hasattr(pl_module, "hparams") else {}
    pair_loss = getattr(pl_module, "pair_loss", None)  # DPOModule's: the shorthand's beta or a loss block
    if pair_loss is not None:
        rows.append(("loss", f"`{pair_loss}`"))
    for key in ("learning_rate", "warmup_ratio"):
        if key in hparams:
            rows.append((key.replace("_", " "), f"{hparams[key]:g}"))
    if hparams.get("optimizer"):
        rows.append(("optimizer", f"`{_class_path(hparams['optimizer'])}`"))
    if lora_note:
        rows.append(("LoRA", lora_note))
    rows += _data_rows(trainer.datamodule)
    rows.append(("trained", f"{trainer.global_step} optimizer steps"))
    if dtype is not None:
        rows.append(("weights", str(dtype).removeprefix("torch.")))
    hub_base = base_model or (base if spec is not None and is_hub_id(base) else None)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
    lines = [
        "---",
        "library_name: transformers",
        *([f"base_model: {hub_base}"] if hub_base else []),
        "tags: [wspo-lightning, weak-to-strong, " + objective.removesuffix("Module").lower() + "]",
        "---",
        "",
        f"# {Path(str(base)).name} + {objective.removesuffix('Module')}",
        "",
        "Trained with wspo-lightning (weak-to-strong alignment on PyTorch Lightning).",
        "",
        "| | |",
        "|---|---|",
        *(f"| {key} | {value} |" for key, value in rows),
        "",
        "## Final metrics",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| `{name}` | {value:.6g} |" for name, value in sorted(metrics.items())),
        "",
        "## How it was made",
        "",
    ]
    command = launch_command()
    if command:
        lines += ["```", command, "```", ""]
    if resolved_config(trainer) is not None:
        lines += [f"The whole resolved config is `{CONFIG_NAME}` beside this card; to train again:", ""]
        lines += ["```", f"wspo fit --config {CONFIG_NAME}", "```", ""]
    return "\n".join(lines)


def _class_path(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("class_path"))
    return getattr(getattr(value, "func", value), "__name__", str(value))
