"""What several test files share: the tiny config rewriter, the CSV metrics reader, a stand-in gold reward
and a tiny model that ends its turns on purpose."""

from __future__ import annotations

import csv
from pathlib import Path

import torch
import yaml

from wspo_lightning.lightning_cli import run_cli
from wspo_lightning.tiny import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(
    world: Path,
    out: Path,
    *,
    every_n_train_steps: int | None = 4,
    gamma: dict | None = None,
    extra_callbacks: list[dict] = (),
    name: str = "config.yaml",
    **trainer,
) -> Path:
    """configs/tiny_cpu.yaml pointed at `world` (from `write_tiny_world`), writing under `out`: logs in
    `out/logs`, checkpoints in `out/checkpoints` (every N steps, None: at epoch ends), the export in
    `out/export`; `gamma` replaces the GammaSchedule's arguments, `extra_callbacks` are added (a NonFiniteGuard
    among them replaces the config's), `trainer` overrides trainer keys. Saved as `out/name`."""
    config = yaml.safe_load((ROOT / "configs" / "tiny_cpu.yaml").read_text())
    model = config["model"]["init_args"]
    model["policy"]["path"] = str(world / "policy")
    for role in ("weak_base", "weak_aligned"):
        model[role]["path"] = str(world / role)
    config["data"].update(train_path=str(world / "train.jsonl"), val_path=str(world / "val.jsonl"))
    config["trainer"].update(
        default_root_dir=str(out), enable_progress_bar=False, enable_model_summary=False, **trainer
    )
    config["trainer"]["logger"][0]["init_args"]["save_dir"] = str(out / "logs")
    for callback in config["trainer"]["callbacks"]:
        kind, args = callback["class_path"].rsplit(".", 1)[-1], callback.setdefault("init_args", {})
        if kind == "ModelCheckpoint":
            args.update(dirpath=str(out / "checkpoints"), every_n_train_steps=every_n_train_steps)
        elif kind == "HFExport":
            args["dirpath"] = str(out / "export")
        elif kind == "GammaSchedule" and gamma is not None:
            callback["init_args"] = gamma
    if any(c["class_path"].endswith("NonFiniteGuard") for c in extra_callbacks):
        config["trainer"]["callbacks"] = [
            c for c in config["trainer"]["callbacks"] if not c["class_path"].endswith("NonFiniteGuard")
        ]
    config["trainer"]["callbacks"] += list(extra_callbacks)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def fit(config: Path, *overrides: str):
    """`wspo fit --config CONFIG OVERRIDES...` in-process; returns the LightningCLI."""
    return run_cli(["fit", "--config", str(config), *overrides])


def _csv_files(source) -> list[Path]:
    if hasattr(source, "trainer"):  # a LightningCLI: its logger's file
        return [Path(source.trainer.logger.log_dir) / "metrics.csv"]
    source = Path(source)
    return [source] if source.is_file() else sorted(source.rglob("metrics.csv"))


def metrics(source) -> dict[str, list[float]]:
    """Logged values per metric name, in order, from a CSVLogger: of a LightningCLI, a metrics.csv, or every
    metrics.csv under a folder (a resumed run adds a version)."""
    out: dict[str, list[float]] = {}
    for path in _csv_files(source):
        for row in csv.DictReader(path.open()):
            for key, value in row.items():
                if value not in ("", None):
                    out.setdefault(key, []).append(float(value))
    return out


def by_step(source, name: str = "train/loss") -> dict[int, float]:
    """One metric per global step (the last value logged at that step), read as `metrics` reads."""
    values = {}
    for path in _csv_files(source):
        for row in csv.DictReader(path.open()):
            if row.get(name):
                values[int(row["step"])] = float(row[name])
    return values


class LetterReward:
    """A deterministic stand-in gold reward: share of 'e' minus share of 'a'."""

    def __call__(self, prompts, responses):
        return [(r.count("e") - r.count("a")) / (1 + len(r)) for r in responses]


def write_turn_ender(out: Path, tokenizer, token: str, logit: float = 6.0) -> Path:
    """A tiny GPT-2 whose every next-token distribution puts logit `logit` on `token` (about one half with
    logit 6 over 300 tokens) and little on anything else, whatever the input: its samples end at `token`
    often, and are cut by a length limit otherwise. Saved with `tokenizer` to `out`."""
    model = build_tiny_model("gpt2", tokenizer, seed=0, hidden_size=64)
    target = model.transformer.wte.weight.data[tokenizer.convert_tokens_to_ids(token)]
    with torch.no_grad():  # ln_f's output becomes a constant; the tied lm_head turns it into the logits
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(logit * target / target.norm() ** 2)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
