"""Host memory of a WSPO fit's start under FSDP2, per rank: how much the resident set grows from after the imports
to the end of setup (policy loaded and sharded, reference and weak pair placed with `frozen_roles: shard`),
divided by the policy's bytes, measured side by side at 1 and `--ranks` gloo processes on CPU.

A random Llama of ~`--params` parameters (float32) is written to a temporary folder as the policy, with a tiny
weak pair over the same tokenizer. For each rank count, `torchrun --standalone --nproc_per_node N` starts this
script, which records VmRSS after importing the project, then runs `wspo fit` until the first training batch
(`StopAtTrain`) and reports the peak (VmHWM) growth. A start that loads the whole policy on every rank and
copies it for the reference grows by about 2x the policy whatever the rank count; the meta-device start, where
each rank reads only its shard of the policy and of the reference, grows by about 2/ranks.

    .venv/bin/python benchmarks/fsdp2_setup_memory.py          # ~3 minutes on 2 CPU cores

Ends with `name: value` lines: `fsdp2_setup_rss_growth_over_policy_bytes` at 1 and at `--ranks` ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # wspo_step, as a sibling script

import lightning.pytorch as pl  # noqa: E402
import yaml  # noqa: E402
from wspo_step import Peak  # noqa: E402

import wspo_lightning.lightning_cli  # noqa: E402, F401  (the imports count as the baseline)


class StopAtTrain(pl.Callback):
    """Ends the fit at its first training batch, when setup is over, writing this rank's peak RSS growth."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_start(self, trainer, pl_module) -> None:
        growth = Peak.status_mib("VmHWM") - float(os.environ["WSPO_BENCH_RSS_BEFORE"])
        rank = trainer.global_rank
        Path(f"{self.out}.{rank}").write_text(json.dumps({"rank": rank, "growth_mib": growth}))
        raise SystemExit(0)


def write_world(root: Path, params: float) -> tuple[Path, int]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from wspo_lightning.tiny import build_tokenizer, preference_records, write_jsonl, write_tiny_model

    tokenizer = build_tokenizer()
    hidden, layers = 1024, max(1, round((params - 2 * 32000 * 1024) / (4 * 1024**2 + 3 * 1024 * 2816)))
    config = LlamaConfig(
        vocab_size=32000, hidden_size=hidden, intermediate_size=2816, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=16, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    policy = LlamaForCausalLM(config)
    policy.save_pretrained(root / "policy")
    tokenizer.save_pretrained(root / "policy")
    for role, seed in (("weak_base", 1), ("weak_aligned", 2)):
        write_tiny_model(root / role, "llama", seed, tokenizer=tokenizer)
    write_jsonl(root / "train.jsonl", preference_records(16))
    policy_bytes = sum(p.numel() * p.element_size() for p in policy.parameters())
    return root, policy_bytes


def fit_config(world: Path, out: Path) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "default_root_dir": str(out),  # the resolved config.yaml goes there, not into the working folder
            "max_steps": 1,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "strategy": {
                "class_path": "wspo_lightning.strategies.FSDP2Strategy",
                "init_args": {"frozen_roles": "shard"},
            },
            "callbacks": [{"class_path": "fsdp2_setup_memory.StopAtTrain", "init_args": {"out": str(out / "peak")}}],
        },
        "model": {
            "class_path": "wspo_lightning.module.WSPOModule",
            "init_args": {
                "policy": {"path": str(world / "policy")},
                "weak_base": {"path": str(world / "weak_base")},
                "weak_aligned": {"path": str(world / "weak_aligned")},
            },
        },  # fmt: skip
        "data": {"train_path": str(world / "train.jsonl"), "val_fraction": 0.25, "max_length": 64, "batch_size": 2},
    }
    path = out / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def child(config: str) -> None:
    os.environ["WSPO_BENCH_RSS_BEFORE"] = str(Peak.status_mib("VmRSS"))
    from wspo_lightning.cli import main

    main(["fit", "--config", config, f"--trainer.devices={os.environ.get('WORLD_SIZE', '1')}"])


def measure(config: Path, out: Path, ranks: int) -> list[float]:
    for old in out.glob("peak.*"):
        old.unlink()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    done = subprocess.run([*command, __file__, "--child", str(config)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{ranks} rank(s) failed:\n{done.stderr[-3000:]}")
    return [json.loads(p.read_text())["growth_mib"] for p in sorted(out.glob("peak.*"))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=220e6, help="policy parameters, about (>= 200M)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        world, policy_bytes = write_world(Path(tmp), args.params)
        config = fit_config(world, Path(tmp))
        print(f"policy: {policy_bytes / 2**20:.0f} MiB (float32); frozen_roles: shard; RSS growth per rank, MiB")
        for ranks in (1, args.ranks):
            growth = measure(config, Path(tmp), ranks)
            ratio = max(growth) * 2**20 / policy_bytes
            print(f"{ranks} rank(s): growth per rank {', '.join(f'{g:.0f}' for g in growth)}")
            print(f"fsdp2_setup_rss_growth_over_policy_bytes ranks={ranks}: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
