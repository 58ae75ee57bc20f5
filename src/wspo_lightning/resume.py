"""Resuming with `--ckpt_path`: what the user wrote wins over the checkpoint's saved hyperparameters.

LightningCLI re-parses a checkpoint's `hyper_parameters` after the config, so a run moved to another machine
resumed with the old machine's model paths, and a value given at resume (a new `cache_dir`) was silently
replaced. Here the checkpoint only fills the model's keys that the config files and the command line leave
unset; a restored value is a default, never a choice of the user (`written_values` keeps what they wrote).
Each key whose value differs from the checkpoint's gets one warning line (`changed_hyperparameters`, from the
module's `on_load_checkpoint`, so `--ckpt_path last` and SLURM requeues are warned too), and a local model path
that exists neither in the config nor in the checkpoint is an error naming the key to set.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

from jsonargparse import Namespace

from wspo_lightning.errors import InputError
from wspo_lightning.models import local_folder

MODEL = "model.init_args"
log = logging.getLogger(__name__)


def written_values(parser, args: Any, subcommand: str | None) -> Namespace:
    """What the user wrote for `subcommand` (None: a parser without subcommands), in config files and on the
    command line: no defaults, nothing restored from a checkpoint (keys as `model.init_args.gamma`)."""
    if isinstance(args, (dict, Namespace)):
        written = parser.parse_object(args, defaults=False)
    else:
        written = parser.parse_args(sys.argv[1:] if args is None else list(args), defaults=False)
    return (written.get(subcommand) or Namespace()) if subcommand else written


def fill_from_checkpoint(parser, config: Namespace, subcommand: str, hparams: dict, written: Namespace) -> Namespace:
    """`config` with the model keys that `written` leaves unset taken from a checkpoint's `hparams`.

    The checkpoint's values go in first and the user's written values over them, both through the parser, so
    values are typed and links (data.tokenizer follows the policy's path) follow the values that win."""
    hparams = {k: v for k, v in hparams.items() if k != "_instantiator"}
    saved_class = hparams.pop("_class_path", None)
    model = config[subcommand].model
    if saved_class is not None and saved_class != model.class_path:
        return config  # another objective's hyperparameters say nothing about this one's (its state dict decides)
    known = {k: v for k, v in hparams.items() if k in model.init_args}  # a key this version removed is dropped
    if not known:
        return config
    filled = parser.parse_object({subcommand: {"model": {"class_path": model.class_path, "init_args": known}}}, config)
    if "model" in written:
        filled = parser.parse_object({subcommand: {"model": written.model.as_dict()}}, filled)
    return filled


def check_model_paths(config: Namespace, written: Namespace, ckpt_path: str) -> None:
    """Every local model folder of the resumed model exists: else one line naming the key to set."""
    for role, value in vars(config.model.init_args).items():
        path = value.get("path") if isinstance(value, Namespace) else None
        folder = local_folder(path) if isinstance(path, str) else None
        if folder is None or folder.is_dir():
            continue
        key = f"{MODEL}.{role}.path"
        origin = "given" if key in written else f"restored from the checkpoint {Path(ckpt_path).name}"
        raise InputError(
            f"{key}: {path} ({origin}) does not exist. Set {key} in the config or on the command line to "
            "where that model is now."
        )


def _plain(value: Any) -> Any:
    """A hyperparameter as plain data: specs (dataclasses) and namespaces as dicts."""
    if isinstance(value, Namespace):
        return value.as_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def _leaves(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict) and value:
        return {k: v for key, item in value.items() for k, v in _leaves(_plain(item), f"{prefix}.{key}").items()}
    return {prefix: value}


def changed_hyperparameters(saved: dict, current: dict) -> list[str]:
    """One line per model key whose value differs from the checkpoint's: per field where both are blocks of
    the same fields (`policy.path`), else the whole value. Keys the checkpoint lacks (arguments newer than
    it) have nothing to compare."""
    lines = []
    for name, saved_value in saved.items():
        if name.startswith("_") or name not in current:
            continue
        old, new = _leaves(_plain(saved_value), f"{MODEL}.{name}"), _leaves(_plain(current[name]), f"{MODEL}.{name}")
        if old == new:
            continue
        changed = [key for key in new if old.get(key) != new[key]] if old.keys() == new.keys() else [None]
        for key in changed:
            was, now = (old[key], new[key]) if key else (_plain(saved_value), _plain(current[name]))
            lines.append(f"resume: {key or f'{MODEL}.{name}'} = {now!r} as given, not the checkpoint's {was!r}")
    return lines


def checkpoint_to_resume(config: Namespace) -> Path | None:
    """The checkpoint file a fit of `config` (a subcommand's) resumes from, found as Lightning will find it:
    `ckpt_path` FILE; `last`, the newest last*.ckpt of the config's ModelCheckpoint folders; `hpc`, or no
    ckpt_path under SLURM, the newest hpc_ckpt_N.ckpt of the trainer's default_root_dir (a requeue)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    ckpt_path = config.get("ckpt_path")
    if ckpt_path is None and SLURMEnvironment.detect():
        ckpt_path = "hpc"
    if ckpt_path == "hpc":
        root = Path(config.get("trainer.default_root_dir") or os.getcwd())
        numbered = {
            int(m.group(1)): p for p in root.glob("hpc_ckpt_*.ckpt") if (m := re.match(r"hpc_ckpt_(\d+)$", p.stem))
        }
        return numbered[max(numbered)] if numbered else None
    if ckpt_path == "last":
        folders = [
            Path(c.init_args.dirpath)
            for c in config.get("trainer.callbacks") or []
            if isinstance(c, Namespace)
            and str(c.get("class_path", "")).endswith("ModelCheckpoint")
            and c.get("init_args.dirpath")
        ]
        found = [p for folder in folders for p in folder.glob("last*.ckpt") if re.match(r"^last(-\d+)?$", p.stem)]
        return max(found, key=lambda p: p.stat().st_mtime) if found else None
    return Path(ckpt_path) if ckpt_path and Path(ckpt_path).exists() else None


def checkpoint_metadata(path: str | Path) -> dict:
    """A checkpoint's dict without reading its weights: a file through mmap, a sharded (distributed) checkpoint
    folder through its `meta.pt`, which holds everything but the tensors. {} for a folder without one."""
    import torch

    path = Path(path)
    if path.is_dir():
        path = path / "meta.pt"
        if not path.is_file():
            return {}
    return torch.load(path, weights_only=True, map_location="cpu", mmap=True)


def _loggers_of(config: Namespace, kind: str) -> list[Namespace]:
    """The `trainer.logger` entries of `config` whose class is `kind` (a class name), in order."""
    loggers = config.get("trainer.logger")
    loggers = loggers if isinstance(loggers, list) else [loggers]
    return [lg for lg in loggers if isinstance(lg, Namespace) and str(lg.get("class_path", "")).endswith(kind)]


# What a resumed run continues, per logger class: the RunIdentity key of the checkpoint's values, the logger's
# arguments that name one (the first is set), and what the warning calls it and what a new value opens.
CONTINUED = (
    ("WandbLogger", "wandb_ids", ("id", "version"), "W&B run id", "W&B run"),
    ("CSVLogger", "csv_versions", ("version",), "CSV version", "version folder"),
)


def continue_runs(config: Namespace, written: Namespace, checkpoint: dict) -> list:
    """Each `WandbLogger` of `config` without an id of the user's continues the W&B run whose id `checkpoint`
    holds, and each `CSVLogger` without a version of the user's its version folder (`RunIdentity`); a written
    id or version that differs gets one warning line and wins. Returns the checkpoint's CSV versions, for
    `callbacks.runs.continue_csv_logs`."""
    saved = (checkpoint.get("callbacks") or {}).get("RunIdentity", {})
    for kind, key, names, what, new in CONTINUED:
        mine = _loggers_of(written, kind)
        for i, (logger, kept) in enumerate(zip(_loggers_of(config, kind), saved.get(key) or [])):
            given = mine[i] if i < len(mine) else Namespace()
            chosen = next((v for v in (given.get(f"init_args.{n}") for n in names) if v is not None), None)
            if chosen is None:
                logger.init_args[names[0]] = kept
            elif str(chosen) != str(kept):
                log.warning("resume: %s %r as given, not the checkpoint's %r: a new %s", what, chosen, kept, new)
    return list(saved.get("csv_versions") or [])
