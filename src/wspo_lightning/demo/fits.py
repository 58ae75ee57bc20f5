"""The demo's LightningCLI configs: DPO for the weak model and the strong baseline, WSPO for the strong model.

Each is the dict form of a `wspo fit --config` YAML; the fit stage saves it beside the run.
"""

from __future__ import annotations

from pathlib import Path

from wspo_lightning.demo.settings import DemoSettings


def _trainer(s: DemoSettings, run_dir: Path, wandb_dir: Path, name: str, epochs: int) -> dict:
    return {
        "accelerator": "auto",
        "devices": 1,
        "precision": "bf16-mixed",  # autocast: ~2.5x the float32 speed on CPU (and fast on GPUs), weights stay float32
        "max_epochs": epochs,
        "log_every_n_steps": 1,
        "gradient_clip_val": 1.0,
        "num_sanity_val_steps": 0,
        "val_check_interval": 1.0 / max(s.val_checks, 1),
        "enable_checkpointing": False,  # a demo fit is minutes long: a killed one is redone
        "default_root_dir": str(run_dir),
        "logger": [
            {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(run_dir), "name": "logs", "version": ""},
            },
            {
                "class_path": "lightning.pytorch.loggers.WandbLogger",
                "init_args": {"save_dir": str(wandb_dir), "project": "wspo-demo", "name": name, "offline": True},
            },
        ],
    }


def _data(s: DemoSettings, pairs: Path) -> dict:
    return {
        "train_path": str(pairs),
        "val_fraction": s.val_fraction,
        "batch_size": s.batch_size,
        "max_length": 256,
        "seed": s.seed,
    }


def _spec(path: Path) -> dict:
    return {"path": str(path), "dtype": "float32"}


def dpo_config(
    s: DemoSettings,
    policy: Path,
    pairs: Path,
    run_dir: Path,
    wandb_dir: Path,
    name: str,
    epochs: int,
    learning_rate: float,
) -> dict:
    """DPO (frozen copy of the policy as reference), embeddings frozen."""
    return {
        "seed_everything": s.seed,
        "trainer": _trainer(s, run_dir, wandb_dir, name, epochs),
        "model": {
            "class_path": "wspo_lightning.module.DPOModule",
            "init_args": {
                "policy": _spec(policy),
                "beta": s.dpo_beta,
                "learning_rate": learning_rate,
                "warmup_ratio": 0.1,
                "freeze_embeddings": True,
            },
        },
        "data": _data(s, pairs),
    }


def wspo_config(
    s: DemoSettings,
    policy: Path,
    weak_base: Path,
    weak_aligned: Path,
    pairs: Path,
    run_dir: Path,
    wandb_dir: Path,
    name: str,
    gamma: float,
    cache_dir: Path | None = None,
) -> dict:
    """WSPO on the chosen responses of the pairs (the rejected ones only feed the validation margins);
    with `cache_dir` (`wspo precompute`), the frozen roles' values come from there."""
    return {
        "seed_everything": s.seed,
        "trainer": _trainer(s, run_dir, wandb_dir, name, s.wspo_epochs),
        "model": {
            "class_path": "wspo_lightning.module.WSPOModule",
            "init_args": {
                "policy": _spec(policy),
                "weak_base": _spec(weak_base),
                "weak_aligned": _spec(weak_aligned),
                "gamma": gamma,
                "learning_rate": s.wspo_learning_rate,
                "warmup_ratio": 0.1,
                "freeze_embeddings": True,
                "cache_dir": str(cache_dir) if cache_dir else None,
            },
        },
        "data": _data(s, pairs),
    }


def gamma_slug(gamma: float) -> str:
    return f"{gamma:g}".replace("-", "m").replace(".", "p")
