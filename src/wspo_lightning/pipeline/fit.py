"""Stage `fit`: `wspo fit` (LightningCLI) behind the stage rules: skipped when its model exists.

The stage adds an `HFExport` callback that writes the trained policy to `out`, runs the fit
in-process, and keeps the config it ran as `<run_dir>/fit.yaml` (LightningCLI also saves the
fully resolved config, every default filled in, as `config.yaml` in the trainer's log folder).
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path
from typing import Any

import yaml

from wspo_lightning.io import atomic_path
from wspo_lightning.pipeline.stage import done, say

EXPORT = "wspo_lightning.callbacks.HFExport"


def fit(
    config: Any, out: str, run_dir: str | None = None, force: bool = False, export_dtype: str | None = None
) -> Path:
    """Train with `wspo fit --config` unless the exported model folder `out` already exists.

    Args:
        config: a LightningCLI config (YAML path or dict) with model, data and trainer.
        out: folder the trained policy is exported to (save_pretrained layout, with tokenizer).
        run_dir: folder for logs and the config as run (default: the parent of `out`).
        force: redo even if `out` exists.
        export_dtype: dtype of the exported weights (float32 | bfloat16 | float16); None: HFExport's default,
            the training precision's.
    """
    if done("fit", out, force):
        return Path(out)
    from wspo_lightning.lightning_cli import run_cli

    if not isinstance(config, dict):
        config = yaml.safe_load(Path(config).read_text())
    run = Path(run_dir) if run_dir else Path(out).parent
    run.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        trainer = config.setdefault("trainer", {})
        callbacks = [c for c in trainer.get("callbacks") or [] if not str(c.get("class_path", "")).endswith("HFExport")]
        export = {"dirpath": str(tmp)} | ({"dtype": export_dtype} if export_dtype else {})
        trainer["callbacks"] = callbacks + [{"class_path": EXPORT, "init_args": export}]
        trainer.setdefault("default_root_dir", str(run))
        path = run / "fit.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        model = config.get("model", {}).get("class_path", "?").rsplit(".", 1)[-1]
        say("fit", f"{model} -> {out} (config {path})")
        argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when it also sees our own flags
        try:
            cli = run_cli(["fit", "--config", str(path)])
        finally:
            sys.argv = argv
        _finish_loggers(cli.trainer)
        if not Path(tmp).exists():
            raise RuntimeError(f"fit finished without exporting the policy to {tmp}")
        del cli
        gc.collect()
    return Path(out)


def _finish_loggers(trainer: Any) -> None:
    """Close W&B runs so the next fit in this process starts a new one."""
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger":
            import wandb

            wandb.finish()
