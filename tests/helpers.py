"""What several test files share: the tiny config rewriters, the CSV metrics reader, launchers of training
processes, a stand-in gold reward and a tiny model that ends its turns on purpose."""

from __future__ import annotations

import csv
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
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
    `out/export`; `gamma` replaces the GammaSchedule's arguments (with a `value`, the model's gamma goes),
    `extra_callbacks` are added (a NonFiniteGuard among them replaces the config's), `trainer` overrides
    trainer keys. Saved as `out/name`."""
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
            if "value" in gamma:  # the schedule names its own target: the model's gamma is left unwritten
                model.pop("gamma", None)
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


# ---- several processes (DDP, FSDP2, several nodes) on this machine, gloo over loopback

STEPS = ["--trainer.max_steps=4", "--trainer.max_epochs=4", "--data.eval_batch_size=4", "--trainer.accelerator=cpu"]
COMPARED = ["train/loss", "train/wspo/delta_strong", "val/loss", "val/rewards/strong_margin"]


def strategy_config(world: Path, out: Path, checkpoint_every: int | None = None, fsdp2: bool = False) -> Path:
    """configs/tiny_cpu.yaml on `world`, writing under `out`, with optional step checkpoints (`out/ckpt/step=N.ckpt`).

    SampleTable is left out to keep these runs short (tests/test_sample_table_ddp.py runs it on 2 ranks), and
    under FSDP2 NonFiniteGuard's gradient check until callbacks/faults.py handles DTensor gradients
    (`.tolist()` fails); the guard still checks the loss."""
    data = yaml.safe_load(
        (ROOT / "configs" / "tiny_cpu.yaml")
        .read_text()
        .replace("runs/tiny/logs", str(out / "logs"))
        .replace("runs/tiny/wspo_policy", str(out / "export"))
        .replace("runs/tiny", str(world))
    )
    callbacks = [c for c in data["trainer"]["callbacks"] if not c["class_path"].endswith("SampleTable")]
    if checkpoint_every:
        for c in callbacks:
            if c["class_path"].endswith("ModelCheckpoint"):
                c["init_args"] = {
                    "dirpath": str(out / "ckpt"),
                    "filename": "{step}",
                    "save_top_k": -1,
                    "every_n_train_steps": checkpoint_every,
                }
    if fsdp2:
        callbacks.append(
            {"class_path": "wspo_lightning.callbacks.faults.NonFiniteGuard", "init_args": {"check_gradients": False}}
        )
    data["trainer"]["callbacks"] = callbacks
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def launch_all(commands: list[tuple[list[str], dict[str, str]]], timeout: int = 180) -> list[str]:
    """Run (command, extra environment) pairs at once, each in its own process group, all killed on timeout;
    their stderr (through files: a full pipe would stall a rank and with it its peers)."""
    base = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    logs = [tempfile.TemporaryFile("w+") for _ in commands]
    processes = [
        subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=log, env={**base, **env}, cwd=ROOT, start_new_session=True
        )
        for (command, env), log in zip(commands, logs)
    ]
    deadline = time.monotonic() + timeout
    try:
        for process in processes:
            process.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        pass
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    errors = []
    for log in logs:
        log.seek(0)
        errors.append(log.read())
        log.close()
    codes = [p.returncode for p in processes]
    if codes != [0] * len(processes):
        commands_run = "\n".join(" ".join(c) for c, _ in commands)
        pytest.fail(
            f"exit codes {codes} (-9: killed after {timeout} s) of\n{commands_run}\n"
            + "\n".join(e[-3000:] for e in errors)
        )
    return errors


def launch(command: list[str], timeout: int = 180) -> str:
    """Run `command` in its own process group (killed whole on timeout); its stderr."""
    return launch_all([(command, {})], timeout)[0]


def wspo(*args: str) -> list[str]:
    return [sys.executable, "-m", "wspo_lightning.cli", *args]


def torchrun(*args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "wspo_lightning.cli",
        *args,
    ]


def free_port(low: int = 20000, high: int = 30000) -> int:
    """A TCP port in [low, high) that nothing listens on at 127.0.0.1 now."""
    for port in range(low + os.getpid() % 997, high):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError(f"no free port in [{low}, {high})")


def csv_metrics(out: Path) -> dict[str, list[float]]:
    """What rank 0's CSVLogger wrote under `out`, in its newest version folder."""
    return metrics(sorted((out / "logs" / "wspo").glob("version_*"))[-1] / "metrics.csv")


def assert_curves_match(got: dict, want: dict, names=COMPARED, rtol: float = 1e-4) -> None:
    for name in names:
        assert len(got[name]) == len(want[name]) > 0, (name, got.get(name), want.get(name))
        torch.testing.assert_close(
            torch.tensor(got[name]),
            torch.tensor(want[name]),
            rtol=rtol,
            atol=1e-6,
            msg=lambda m, name=name: f"{name}: {m}\n got {got[name]}\n want {want[name]}",
        )


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def assert_frozen_roles_sharded(stderr: str, ranks: int = 2, roles: int = 3) -> None:
    """Each frozen role (reference, weak_base, weak_aligned; no reference with LoRA) logged, on each rank, the
    part of its weights that rank holds: the parts add up to each model once."""
    found = [tuple(map(int, m)) for m in re.findall(r"sharded over \d ranks.*?: (\d+) of its (\d+) weights", stderr)]
    assert len(found) == roles * ranks, stderr[-3000:]
    assert sum(local for local, _ in found) * ranks == sum(total for _, total in found)
    assert all(local < total for local, total in found)


def generate_yaml(world: Path, path: Path, **settings) -> Path:
    """A `wspo generate` config over the tiny world's models and validation prompts, plus `settings`."""
    config = {
        "strong": {"path": str(world / "policy")},
        "weak_base": {"path": str(world / "weak_base")},
        "weak_aligned": {"path": str(world / "weak_aligned")},
        "prompts": str(world / "val.jsonl"),
        **settings,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def wandb_run_records(run_dir: Path) -> bytes:
    """The protobuf records of an offline W&B run (`run-*.wandb`), joined.

    The file is a LevelDB-style log: a 7-byte header, then 32 KiB blocks of chunks (4-byte checksum, 2-byte
    little-endian length, 1-byte type: 1 a whole record, 2/3/4 its first/middle/last part; a block's tail
    shorter than a chunk header is zero padding). A record that crosses a block boundary is split by a chunk
    header, so searching the raw file for a key misses it whenever it straddles one; these bytes do not."""
    data, pos, block, records, part = next(Path(run_dir).glob("run-*.wandb")).read_bytes(), 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7 or data[pos + 6] == 0:  # padding to the block's end
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        part += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(part)
            part = b""
    return b"\n".join(records)
