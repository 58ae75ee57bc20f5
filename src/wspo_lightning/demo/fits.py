"""The demo's LightningCLI configs: DPO of the weak model; WSPO, DPO and SFT of the strong model.

Each is the dict form of a `wspo fit --config` YAML; the fit stage saves it beside the run.
"""

from __future__ import annotations

from pathlib import Path

from wspo_lightning.demo.settings import DemoSettings


def _trainer(s: DemoSettings, precision: str, run_dir: Path, wandb_dir: Path, name: str, epochs: int) -> dict:
    return {
        "accelerator": "auto",
        "devices": 1,
        "precision": precision,  # from the CPU: bf16-mixed only where bfloat16 is native (hardware.py)
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


def fit_config(
    s: DemoSettings,
    precision: str,
    objective: str,
    model_args: dict,
    pairs: Path,
    run_dir: Path,
    wandb_dir: Path,
    name: str,
    epochs: int,
    batch_size: int,
) -> dict:
    """A fit of `objective` (WSPOModule, DPOModule, SFTModule) on the pairs, warm-up 10% then cosine decay."""
    return {
        "seed_everything": s.seed,
        "trainer": _trainer(s, precision, run_dir, wandb_dir, name, epochs),
        "model": {"class_path": f"wspo_lightning.module.{objective}", "init_args": {"warmup_ratio": 0.1, **model_args}},
        "data": {
            "train_path": str(pairs),
            "val_fraction": s.val_fraction,
            "batch_size": batch_size,
            "max_length": 256,
            "seed": s.seed,
        },
    }


def spec(path: Path) -> dict:
    """Trained or referenced in float32 (under bf16-mixed, autocast computes in bfloat16)."""
    return {"path": str(path), "dtype": "float32"}


def weak_dpo_config(
    s: DemoSettings, precision: str, weak_base: Path, pairs: Path, run_dir: Path, wandb_dir: Path
) -> dict:
    """DPO of every parameter of the weak model, tied embeddings and output layer included: they set the word
    probabilities the weak pair's signal lives in."""
    model = {
        "policy": spec(weak_base),
        "beta": s.dpo_beta,
        "learning_rate": s.weak_dpo_learning_rate,
        "freeze_embeddings": False,
    }
    return fit_config(
        s, precision, "DPOModule", model, pairs, run_dir, wandb_dir, "weak_dpo", s.weak_dpo_epochs, s.batch_size
    )


OBJECTIVE_KEYS = {"WSPOModule": "wspo", "DPOModule": "dpo", "SFTModule": "sft"}
"""A strong fit's objective -> its key in `DemoSettings.strong_learning_rates`."""


def strong_config(
    s: DemoSettings,
    precision: str,
    objective: str,
    strong: Path,
    pairs: Path,
    run_dir: Path,
    wandb_dir: Path,
    name: str,
    **model_args,
) -> dict:
    """A strong fit under the one rule of every strong fit: `strong_epochs` (SFT: `sft_epochs` times it),
    `strong_batch_size`, warm-up then cosine decay, embeddings frozen, at its method's learning rate
    (`strong_learning_rates`). WSPO trains on the chosen responses; DPO on both (beta `strong_dpo_beta`); SFT on the
    chosen."""
    lr = s.strong_learning_rates[OBJECTIVE_KEYS[objective]]
    model = {"policy": spec(strong), "learning_rate": lr, "freeze_embeddings": True, **model_args}
    if objective == "DPOModule":
        model["beta"] = s.strong_dpo_beta
    config = fit_config(
        s, precision, objective, model, pairs, run_dir, wandb_dir, name, s.strong_epochs, s.strong_batch_size
    )
    if objective == "SFTModule":
        set_length(config["trainer"], s.sft_epochs * s.strong_epochs)
    return config


def set_length(trainer: dict, epochs: float) -> None:
    """A fit of `epochs` passes over the data: below 1, that share of one epoch's batches (the learning-rate schedule
    spans the steps taken); above, a whole number of epochs."""
    trainer["max_epochs"] = max(int(epochs), 1)
    trainer.pop("limit_train_batches", None)
    if epochs < 1:
        trainer["limit_train_batches"] = epochs


def wspo_args(weak_base: Path, weak_aligned: Path, gamma: float, cache_dir: Path | None) -> dict:
    """WSPOModule's own arguments; with `cache_dir` (`wspo precompute`) the frozen roles' values come from there."""
    return {
        "weak_base": spec(weak_base),
        "weak_aligned": spec(weak_aligned),
        "gamma": gamma,
        "cache_dir": str(cache_dir) if cache_dir else None,
    }


def gamma_slug(gamma: float) -> str:
    return f"{gamma:g}".replace("-", "m").replace(".", "p")
