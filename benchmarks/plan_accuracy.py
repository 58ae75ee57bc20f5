"""`wspo plan` against measured memory: the plan's total per rank over the growth of each rank's peak resident set
during training, for short `wspo fit` runs on CPU with the same configs (float32, the same attention implementation).

A random Llama of ~125M parameters (768 x 12, grouped-query attention, an untied 32k vocabulary) is written to a
temporary folder as the policy, a 256 x 4 Llama as the weak pair, over one tokenizer (`wspo_lightning.tiny`); every
record's response is long enough to be cut at `data.max_length`, so each row is `max_length` tokens, as the plan
assumes. Each variant runs in a fresh process (`torchrun --standalone` for 2 gloo ranks), which records VmRSS after
its imports, resets the peak (VmHWM) when training starts and writes the peak's growth when it ends: steady-state
training memory (weights, gradients and optimizer state, frozen roles, activations), as the plan describes it for a
device. Every variant accumulates 2 micro-batches per step, as the recipes do (gradients persist through the
next micro-batch's activations). Each runs with glibc's malloc returning every freed block of 128 KiB or more to the
system (the resident set then follows the live tensors) and with glibc's defaults (`measure`).

    .venv/bin/python benchmarks/plan_accuracy.py                 # ~18 minutes on 2 CPU cores
    .venv/bin/python benchmarks/plan_accuracy.py --malloc fixed --only wspo_sdpa wspo_sdpa_ckpt

Ends with `plan_over_measured VARIANT: ratio` lines (goal: within 0.75-1.25), `plan_over_measured_default_malloc
VARIANT: ratio` lines, and `activations_plan_over_measured`: the plan's activations without minus with gradient
checkpointing, over the measured difference of the two runs.
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

MIB = 2**20
# name -> (objective, attention, gradient checkpointing, ranks, strategy)
VARIANTS = {
    "wspo_sdpa": ("WSPOModule", "sdpa", False, 1, None),
    "wspo_sdpa_ckpt": ("WSPOModule", "sdpa", True, 1, None),
    "dpo_eager": ("DPOModule", "eager", False, 1, None),
    "wspo_ddp2": ("WSPOModule", "sdpa", False, 2, "ddp"),
    "wspo_fsdp2_shard2": ("WSPOModule", "sdpa", True, 2, "fsdp2"),
}


class PeakDuringTraining(pl.Callback):
    """Resets the peak when training starts; writes this rank's growth over the post-import RSS when it ends."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = Peak.status_mib("VmRSS") - float(os.environ["WSPO_BENCH_RSS_BEFORE"])
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM = VmRSS: setup's own peak is not training's

    def on_train_end(self, trainer, pl_module) -> None:
        growth = Peak.status_mib("VmHWM") - float(os.environ["WSPO_BENCH_RSS_BEFORE"])
        Path(f"{self.out}.{trainer.global_rank}").write_text(
            json.dumps({"growth_mib": growth, "start_mib": self.start})
        )


def write_world(root: Path, length: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from wspo_lightning.tiny import build_tokenizer, preference_records, write_jsonl

    tokenizer = build_tokenizer()
    shapes = {"policy": (768, 12, 2048, 12, 4), "weak_base": (256, 4, 704, 4, 4), "weak_aligned": (256, 4, 704, 4, 4)}
    params = {}
    for seed, (role, (hidden, layers, inter, heads, kv)) in enumerate(shapes.items()):
        config = LlamaConfig(
            vocab_size=32000, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=False,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )  # fmt: skip
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        model.save_pretrained(root / role)
        params[role] = sum(p.numel() for p in model.parameters())
        tokenizer.save_pretrained(root / role)
    records = preference_records(24)
    repeat = length // 8  # ~10 tokens a sentence: responses longer than max_length, cut there
    for r in records:
        r["chosen"], r["rejected"] = " ".join([r["chosen"]] * repeat), " ".join([r["rejected"]] * repeat)
    write_jsonl(root / "train.jsonl", records)
    return params


def fit_config(world: Path, out: Path, name: str, length: int, batch: int) -> Path:
    objective, attention, checkpointing, ranks, strategy = VARIANTS[name]
    model = {
        "policy": {"path": str(world / "policy"), "attn_implementation": attention,
                   "gradient_checkpointing": checkpointing},
    }  # fmt: skip
    if objective == "WSPOModule":
        for role in ("weak_base", "weak_aligned"):
            model[role] = {"path": str(world / role), "attn_implementation": attention}
    trainer = {
        "accelerator": "cpu", "devices": ranks, "precision": "32-true", "default_root_dir": str(out / name),
        "max_steps": 2, "accumulate_grad_batches": 2, "limit_val_batches": 0, "num_sanity_val_steps": 0,
        "logger": False, "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
        "callbacks": [{"class_path": "plan_accuracy.PeakDuringTraining", "init_args": {"out": str(out / "peak")}}],
    }  # fmt: skip
    if strategy == "fsdp2":
        trainer["strategy"] = {
            "class_path": "wspo_lightning.strategies.FSDP2Strategy",
            "init_args": {"frozen_roles": "shard"},
        }
    elif strategy == "ddp":
        trainer["strategy"] = "ddp"
    config = {
        "seed_everything": 0,
        "trainer": trainer,
        "model": {"class_path": f"wspo_lightning.module.{objective}", "init_args": model},
        "data": {"train_path": str(world / "train.jsonl"), "val_fraction": 0.0, "max_length": length,
                 "batch_size": batch, "num_workers": 0},
    }  # fmt: skip
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def child(config: str) -> None:
    os.environ["WSPO_BENCH_RSS_BEFORE"] = str(Peak.status_mib("VmRSS"))
    from wspo_lightning.cli import main

    sys.exit(main(["fit", "--config", config]))


def measure(config: Path, out: Path, ranks: int, fixed_mmap: bool) -> list[dict]:
    """Each rank's record (growth_mib, start_mib) of one fit. `fixed_mmap`: glibc's malloc maps every block of 128 KiB
    or more on its own and unmaps it when freed (MALLOC_MMAP_THRESHOLD_), so the resident set follows the live
    tensors; by default glibc raises that threshold to 32 MiB as blocks are freed and keeps freed heap memory."""
    for old in out.glob("peak.*"):
        old.unlink()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // ranks))
    if fixed_mmap:
        env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    done = subprocess.run([*command, __file__, "--child", str(config)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{config.name} failed:\n{done.stderr[-3000:]}")
    return [json.loads(p.read_text()) for p in sorted(out.glob("peak.*"))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=512, help="data.max_length: tokens per row")
    parser.add_argument("--batch", type=int, default=2, help="data.batch_size")
    parser.add_argument("--only", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--malloc", choices=["fixed", "default", "both"], default="both", help="see `measure`")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child)
        return 0
    from wspo_lightning.plan import KEYS, plan

    modes = {"fixed": [True], "default": [False], "both": [True, False]}[args.malloc]
    ratios: dict[tuple[str, bool], float] = {}
    found = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        world = write_world(root / "world", args.length)
        shape = f"rows of {args.length} tokens, batch {args.batch}"
        print(f"policy: {world['policy'] / 1e6:.1f}M parameters (float32); {shape}")
        print("MiB per rank; measured: peak RSS growth (held when training started); malloc: fixed mmap | default")
        for name in args.only:
            config = fit_config(root / "world", root, name, args.length, args.batch)
            planned = plan(["--config", str(config)])["per_rank_bytes"]
            parts = ", ".join(f"{k[0].upper()} {planned[k] / MIB:.0f}" for k in KEYS)
            print(f"{name}: plan {planned['total'] / MIB:.0f} ({parts})", flush=True)
            for fixed in modes:
                records = measure(config, root, VARIANTS[name][3], fixed)
                peak = max(r["growth_mib"] for r in records)
                ratios[name, fixed] = planned["total"] / MIB / peak
                found[name, fixed] = (planned["activations"], peak)
                measured = ", ".join(f"{r['growth_mib']:.0f} ({r['start_mib']:.0f})" for r in records)
                mode = "fixed mmap" if fixed else "default"
                print(f"  {mode:>10}: measured {measured}; plan / measured {ratios[name, fixed]:.3f}", flush=True)
    for (name, fixed), ratio in ratios.items():
        print(f"plan_over_measured{'' if fixed else '_default_malloc'} {name}: {ratio:.3f}")
    if ("wspo_sdpa", True) in found and ("wspo_sdpa_ckpt", True) in found:
        (without, peak_without), (with_, peak_with) = found["wspo_sdpa", True], found["wspo_sdpa_ckpt", True]
        ratio = (without - with_) / ((peak_without - peak_with) * MIB)
        print(f"activations_plan_over_measured (without - with checkpointing): {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
