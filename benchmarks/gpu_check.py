"""The GPU proof in one command: bf16 WSPO fits under FSDP and FSDP2, QLoRA under FSDP2, the 4-bit weak pair's
memory, the step benchmark and CBS, on models built on the spot from configs, and the README's "Run on a GPU
node" commands on one GPU, as one markdown table.

    scripts/gpu_check.sh --out OUT              # on a machine with a CUDA GPU: about 6 minutes on an H100/H200
    scripts/gpu_check.sh --dry-run --out OUT    # the same stages on CPU with tiny models (CI runs it)

Stages, each in a fresh process with its own time limit (a failed or timed-out stage is a row saying so, and
the rest still run), all inside `--budget` seconds:

  build        random Llamas written from configs (no downloads): a policy of `hidden x layers` (0.89B
               parameters on a GPU), a weak pair (0.16B each), mixed-length toy records, a fit config and its
               logps cache (`wspo precompute`); and the device's measured bf16 matmul rate
  gpu_path     the README's "Run on a GPU node" commands in order (weak DPO fit, precompute, WSPO fit under FSDP2,
               DPO fit, sample x3, score x3, evaluate, push) with the shipped recipes on one device, against
               random stand-ins of the recipes' Qwen2 models (benchmarks/recipe_stand_ins.py: 256 x 4 layers on a
               GPU, 4 steps, 256 tokens), one process for torchrun's eight: wall time and exit of each command;
               the push, offline, must fail in one line
  fit_fsdp1    `wspo fit` of that config on one device with configs/strategies/fsdp.yaml (FSDPStrategy), bf16-mixed,
               the reference copy and the weak pair live: tokens/s, peak memory, first and last loss
  fit_fsdp2    the same with configs/strategies/fsdp2.yaml (FSDP2Strategy)
  qlora_fsdp2  the same with a 4-bit NF4 policy (bnb_4bit_quant_storage = its dtype) and LoRA adapters, FSDP2
  step         benchmarks/wspo_step.py on that world: cached WSPO step over a bare policy step, the bare step's
               tokens/s and MFU, and the weak pair's peak memory in 4-bit over bf16
  cbs          benchmarks/cbs_speed.py: chunk-level beam search over plain sampling
  packing      benchmarks/packing.py: packed over padded tokens/s on records of mixed lengths (policy step, frozen
               forward)

On CPU (`--dry-run`) every stage runs the same code on tiny models in float32 (the README path: the recipes'
precisions), except FSDP1, which torch runs only on an accelerator: its row says so. The figures of a dry run
only show that the path works.
Writes OUT/gpu_check.md (the table) and OUT/gpu_check.json (every figure).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))  # wspo_step, as a sibling script

import torch  # noqa: E402

STAGES = ["build", "gpu_path", "fit_fsdp1", "fit_fsdp2", "qlora_fsdp2", "step", "cbs", "packing"]

# Model and run sizes: a ~0.9B policy and 0.16B weak pair over a 32k vocabulary on a GPU; tiny ones on CPU.
SIZES = {
    "gpu": dict(
        hidden_size=2048,
        layers=16,
        weak_hidden_size=1024,
        weak_layers=8,
        vocab=32000,
        batch=8,
        length=512,
        fit_steps=12,
        repeats=3,
        memory_steps=2,
        cbs=["--hidden-size", "1024", "--layers", "8", "--prompts", "4", "--repeats", "2"],
        packing=["--hidden-size", "2048", "--layers", "16", "--vocab", "32000", "--batch", "16", "--dtype", "bfloat16"],
        timeouts=dict(build=75, gpu_path=150, fit_fsdp1=70, fit_fsdp2=60, qlora_fsdp2=60, step=110, cbs=45, packing=50),
    ),
    "dry": dict(
        hidden_size=64,
        layers=2,
        weak_hidden_size=64,
        weak_layers=1,
        vocab=512,
        batch=4,
        length=32,
        fit_steps=3,
        repeats=1,
        memory_steps=1,
        cbs=["--hidden-size", "64", "--layers", "2", "--max-new-tokens", "8", "--repeats", "1", "-W", "2", "-K", "2"],
        packing=["--hidden-size", "64", "--layers", "2", "--vocab", "512", "--batches", "2", "--max-response", "64"],
        timeouts=dict(
            build=120, gpu_path=180, fit_fsdp1=60, fit_fsdp2=120, qlora_fsdp2=120, step=240, cbs=120, packing=120
        ),
    ),
}

# Dense bf16 tensor-core peaks from the vendors' datasheets (TFLOP/s), by a word of the device's name.
DATASHEET_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="every stage on CPU with tiny models")
    p.add_argument("--out", default="gpu_check_out", help="folder for gpu_check.md and gpu_check.json")
    p.add_argument("--work", default=None, help="folder for models, data and logs (default: OUT/work)")
    p.add_argument("--budget", type=float, default=450, help="seconds for all stages together")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of " + ", ".join(STAGES))
    p.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # run one stage (in a child process)
    return p.parse_args(argv)


def sizes(dry_run: bool) -> argparse.Namespace:
    size = SIZES["dry" if dry_run else "gpu"]
    return argparse.Namespace(
        **size,
        device="cpu" if dry_run else "cuda",
        precision="32-true" if dry_run else "bf16-mixed",
        threads=1 if dry_run else 0,
    )


# ----------------------------------------------------------------------------- stages (in child processes)


def matmul_tflops(device: str) -> float:
    """The device's measured matmul rate: bf16 8192^3 products on a GPU, float32 512^3 on CPU (dry run)."""
    n, dtype = (8192, torch.bfloat16) if device != "cpu" else (512, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    sync()
    start, reps = time.perf_counter(), 10
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def stage_build(work: Path, size: argparse.Namespace) -> dict:
    import wspo_step

    device_name = torch.cuda.get_device_name() if size.device != "cpu" else "CPU (dry run)"
    wspo_step.build_world(work, size)
    from wspo_lightning.models import ModelSpec, load_model

    params = {
        role: sum(p.numel() for p in load_model(ModelSpec(path=str(work / role))).parameters()) / 1e9
        for role in ("policy", "weak_base")
    }
    return {
        "device": device_name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "matmul_tflops": matmul_tflops(size.device),
        "policy_params_b": params["policy"],
        "weak_params_b": params["weak_base"],
    }


def csv_column(folder: Path, name: str) -> list[float]:
    """One metric's logged values, in order, from the CSVLogger files under `folder`."""
    values = []
    for path in sorted(folder.rglob("metrics.csv")):
        for row in csv.DictReader(path.open()):
            if row.get(name):
                values.append(float(row[name]))
    return values


def stage_fit(work: Path, size: argparse.Namespace, strategy: str, qlora: bool = False) -> dict:
    """`wspo fit` of the built config on one device with configs/strategies/STRATEGY.yaml."""
    import wspo_step

    from wspo_lightning.lightning_cli import run_cli

    logs = work / f"logs_{strategy}{'_qlora' if qlora else ''}"
    weak_dtype = "float32" if size.device == "cpu" else "bfloat16"
    args = [
        "fit",
        "--config",
        str(work / "config.yaml"),
        "--config",
        str(ROOT / "configs" / "strategies" / f"{strategy}.yaml"),
        f"--trainer.accelerator={'cpu' if size.device == 'cpu' else 'gpu'}",
        "--trainer.devices=1",
        f"--trainer.precision={size.precision}",
        f"--trainer.max_steps={size.fit_steps}",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_checkpointing=false",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={logs}",
        f"--model.init_args.weak_base.dtype={weak_dtype}",
        f"--model.init_args.weak_aligned.dtype={weak_dtype}",
    ]
    if qlora:  # the 4-bit weights are stored in the policy's dtype, which FSDP2 gathers as is under bf16-mixed
        args += [
            "--model.init_args.policy.quantization=4bit",
            f"--model.init_args.policy.dtype={weak_dtype}",
            "--model.init_args.policy.lora.r=16",
            "--model.init_args.learning_rate=0.0001",
        ]
    peak = wspo_step.Peak(size.device)
    start = time.perf_counter()
    run_cli(args)
    seconds = time.perf_counter() - start
    losses = csv_column(logs, "train/loss")
    rates = csv_column(logs, "train/tokens_per_second")[1:]  # the first includes the warm-up
    if len(losses) != size.fit_steps:
        raise RuntimeError(f"logged {len(losses)} losses for {size.fit_steps} steps")
    return {
        "tokens_per_second": statistics.median(rates) if rates else float("nan"),
        "peak_memory_gib": peak.growth() / 1024,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "steps": len(losses),
        "fit_seconds": seconds,
    }


def name_values(text: str) -> dict[str, float]:
    """The `name: value` lines a benchmark script ends with."""
    return {m[1]: float(m[2]) for m in re.finditer(r"^([a-z0-9_]+): ([-+0-9.eE]+|nan|inf)$", text, re.MULTILINE)}


def stage_step(work: Path, size: argparse.Namespace) -> dict:
    build = json.loads((work / "results" / "build.json").read_text())
    peak = datasheet_peak(build["device"]) or build["matmul_tflops"]
    args = [
        "--work",
        str(work),
        "--device",
        size.device,
        "--precision",
        size.precision,
        "--repeats",
        str(size.repeats),
        "--memory-steps",
        str(size.memory_steps),
        "--threads",
        str(size.threads),
        "--skip-trl",
        "--memory-variants=weak_float,weak_4bit",  # the table's memory figure; the others cost a process each
        "--peak-tflops",
        str(peak),
    ]
    for name in ("hidden_size", "layers", "weak_hidden_size", "weak_layers", "vocab", "batch", "length"):
        args += [f"--{name.replace('_', '-')}", str(getattr(size, name))]
    done = subprocess.run([sys.executable, str(HERE / "wspo_step.py"), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "wspo_step.py failed")
    return name_values(done.stdout)


def stage_script(script: str, args: list[str], size: argparse.Namespace) -> dict:
    """A benchmark script's `name: value` figures."""
    args = [*args, "--device", size.device, "--threads", str(size.threads or 0)]
    done = subprocess.run([sys.executable, str(HERE / script), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"{script} failed")
    return name_values(done.stdout)


def push_failed_in_one_line(row: dict) -> bool:
    """Offline, `wspo push` checks the login and the Hub before uploading: exit 2 and one `wspo: error:` line."""
    return row["exit"] == 2 and len(row["errors"]) == 1


def stage_gpu_path(work: Path, size: argparse.Namespace) -> dict:
    """The README's "Run on a GPU node" commands in order on one device, against stand-ins of the recipes'
    models and data (benchmarks/recipe_stand_ins.py), each command's row written as it ends."""
    import recipe_stand_ins

    missing = [name for name in ("pyarrow", "datasets") if importlib.util.find_spec(name) is None]
    if missing:
        raise RuntimeError(f"the path reads UltraFeedback's parquet layout: {', '.join(missing)} not installed here")
    wandb = importlib.util.find_spec("wandb") is not None  # else the recipes' W&B loggers become CSV loggers
    if size.device == "cpu":  # 16 new tokens per sample: a tiny model on a CPU samples 128 in seconds, not ms
        stand_ins, accelerator = dataclasses.replace(recipe_stand_ins.TINY, max_new_tokens=16), "cpu"
    else:
        stand_ins, accelerator = recipe_stand_ins.SMALL, "gpu"
    folder = work / "gpu_path"
    folder.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ["WANDB_DIR"] = str(folder)
    figures = {
        "device": torch.cuda.get_device_name() if size.device != "cpu" else "CPU (dry run)",
        "logger": "W&B offline" if wandb else "CSV (wandb is not installed here)",
        "stand_ins": f"{stand_ins.hidden_size} x {stand_ins.num_layers}-layer stand-ins, {stand_ins.max_steps} "
        f"steps, {stand_ins.max_length} tokens",
        "commands": [],
    }
    partial = work / "results" / "gpu_path.partial.json"
    partial.unlink(missing_ok=True)  # an earlier run's

    def report(row: dict) -> None:
        is_push = row["command"].startswith("wspo push")
        row["ok"] = row["exit"] == 0 or (is_push and push_failed_in_one_line(row))
        figures["commands"].append(row)
        partial.write_text(json.dumps(figures, indent=1))  # what a timed-out stage still shows
        print(f"gpu_path: {row['label']}: {row['seconds']} s, exit {row['exit']}", flush=True)

    recipe_stand_ins.run_readme_path(folder, stand_ins, accelerator, wandb=wandb, report=report)
    figures["failed"] = sum(not row["ok"] for row in figures["commands"])
    return figures


def run_stage(name: str, work: Path, size: argparse.Namespace) -> dict:
    if name == "build":
        return stage_build(work, size)
    if name == "gpu_path":
        return stage_gpu_path(work, size)
    if name == "fit_fsdp1":
        if size.device == "cpu":
            return {"skipped": "FSDP1 runs only on an accelerator (torch and Lightning refuse it on CPU)"}
        return stage_fit(work, size, "fsdp")
    if name == "fit_fsdp2":
        return stage_fit(work, size, "fsdp2")
    if name == "qlora_fsdp2":
        return stage_fit(work, size, "fsdp2", qlora=True)
    if name == "step":
        return stage_step(work, size)
    if name == "cbs":
        return stage_script("cbs_speed.py", size.cbs, size)
    if name == "packing":
        return stage_script("packing.py", size.packing, size)
    raise ValueError(f"unknown stage {name!r}: expected one of {STAGES}")


# ----------------------------------------------------------------------------- the table (parent process)


def datasheet_peak(device: str) -> float | None:
    return next((tflops for word, tflops in DATASHEET_BF16_TFLOPS.items() if word in device), None)


def cell(result: dict | None, key: str, fmt: str = "{:.3g}") -> str:
    if result is None:
        return "not run"
    if "error" in result or "skipped" in result:
        return result.get("error") or result["skipped"]
    value = result.get(key)
    return "n/a" if value is None else fmt.format(value)


def table(results: dict[str, dict], dry_run: bool) -> str:
    """The markdown table of `results` (stage -> figures, or {"error"|"skipped": why})."""
    build = results.get("build") or {}
    device = build.get("device") or (results.get("gpu_path") or {}).get("device", "unknown")
    step = results.get("step")
    float_name = "float32" if dry_run else "bf16"
    lines = [
        f"Device: **{device}** (torch {build.get('torch', '?')}, CUDA {build.get('cuda') or 'none'})"
        + (" - a dry run: tiny models on CPU, figures prove only that the path runs" if dry_run else ""),
        f"Policy {cell(build, 'policy_params_b', '{:.3g}')}B parameters, weak pair "
        f"{cell(build, 'weak_params_b', '{:.3g}')}B each; measured matmul rate "
        f"{cell(build, 'matmul_tflops', '{:.0f}')} TFLOP/s"
        + (f", datasheet {datasheet_peak(device):.0f}" if datasheet_peak(device) else ""),
        "",
        "| check | figure | value |",
        "|---|---|---|",
    ]
    for stage, label in (
        ("fit_fsdp1", "WSPO fit, FSDPStrategy (FSDP1), 1 device"),
        ("fit_fsdp2", "WSPO fit, FSDP2Strategy, 1 device"),
        ("qlora_fsdp2", "WSPO fit, 4-bit policy + LoRA (QLoRA), FSDP2Strategy"),
    ):
        result = results.get(stage)
        lines.append(f"| {label} | tokens/s (median step) | {cell(result, 'tokens_per_second', '{:.0f}')} |")
        if result is not None and "error" not in result and "skipped" not in result:
            lines.append(f"| | peak memory (GiB) | {result['peak_memory_gib']:.2f} |")
            lines.append(f"| | loss, first -> last step | {result['first_loss']:.4f} -> {result['last_loss']:.4f} |")
    lines += [
        f"| weak pair, 4-bit NF4 over {float_name} | peak memory of its forwards | "
        f"{cell(step, f'memory_weak_4bit_over_{float_name}')} |",
        f"| | weights as stored | {cell(step, f'memory_weak_4bit_over_{float_name}_weights')} |",
        f"| WSPO step from the logps cache | time over a bare policy step | {cell(step, 'step_cached_over_bare')} |",
        f"| WSPO step with live frozen forwards | time over a bare policy step | {cell(step, 'step_live_over_bare')} |",
        f"| bare policy step | tokens/s | {cell(step, 'bare_tokens_per_second', '{:.0f}')} |",
        f"| | model TFLOP/s | {cell(step, 'bare_tflops', '{:.3g}')} |",
        f"| | MFU | {cell(step, 'bare_mfu', '{:.1%}')} |",
        f"| chunk-level beam search | time over plain sampling | {cell(results.get('cbs'), 'cbs_over_sampling')} |",
        f"| packing (`data.packing`), mixed lengths, sdpa | tokens/s packed over padded, policy step | "
        f"{cell(results.get('packing'), 'packed_over_padded_step')} |",
        f"| | the same, frozen forward | {cell(results.get('packing'), 'packed_over_padded_frozen')} |",
        *gpu_path_rows(results.get("gpu_path")),
    ]
    return "\n".join(lines) + "\n"


def gpu_path_rows(result: dict | None) -> list[str]:
    """The README path's rows: each command's wall time and whether it passed."""
    head = 'README "Run on a GPU node", 1 device (torchrun\'s 8 processes as 1)'
    if result is None or not result.get("commands"):
        return [f"| {head} | every command | {cell(result, 'failed')} |"]
    lines = []
    for row in result["commands"]:
        if row["exit"] is None:
            value = "not run: an earlier command failed"
        elif row["ok"] and row["exit"] != 0:
            value = f"{row['seconds']:.1f} s, pass: offline, exit {row['exit']} in one line: {row['errors'][0][:110]}"
        else:
            value = f"{row['seconds']:.1f} s, " + ("pass" if row["ok"] else f"FAIL (exit {row['exit']})")
            value += f": {row['errors'][-1][:150]}" if row["errors"] and not row["ok"] else ""
        first = f"{head}, {result['stand_ins']}, {result['logger']}" if not lines else ""
        lines.append(f"| {first} | `{row['label']}` | {value} |".replace("|  |", "| |"))
    if "error" in result:
        lines.append(f"| | (stage) | {result['error']} |")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    size = sizes(args.dry_run)
    out = Path(args.out)
    work = Path(args.work) if args.work else out / "work"
    if size.threads:  # the dry run's timings: one thread, as the CPU benchmarks measure
        torch.set_num_threads(size.threads)
    if args.stage:  # a child: one stage, its figures to work/results/STAGE.json
        figures = run_stage(args.stage, work, size)
        (work / "results" / f"{args.stage}.json").write_text(json.dumps(figures, indent=1))
        return 0
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --dry-run for the CPU path", file=sys.stderr)
        return 2
    (work / "results").mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget
    results: dict[str, dict] = {}
    for stage in args.stages.split(","):
        left = deadline - time.monotonic()
        limit = min(size.timeouts[stage], left)
        if limit < 5:
            results[stage] = {"error": f"not run: the {args.budget:.0f} s budget was spent"}
            continue
        start = time.monotonic()
        command = [sys.executable, __file__, "--stage", stage, "--out", str(out), "--work", str(work)]
        command += ["--dry-run"] if args.dry_run else []
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=limit)
            (work / f"{stage}.log").write_text(done.stdout + done.stderr)
            path = work / "results" / f"{stage}.json"
            if done.returncode == 0 and path.exists():
                results[stage] = json.loads(path.read_text())
            else:
                last = [line for line in done.stderr.strip().splitlines() if line.strip()]
                results[stage] = {"error": "failed: " + (last[-1][:200] if last else f"exit {done.returncode}")}
        except subprocess.TimeoutExpired:
            partial = work / "results" / f"{stage}.partial.json"  # the rows a stage wrote as it went
            results[stage] = json.loads(partial.read_text()) if partial.exists() else {}
            results[stage]["error"] = f"timed out after {limit:.0f} s"
        results[stage]["seconds"] = round(time.monotonic() - start, 1)
        print(f"gpu_check: {stage}: {results[stage]}", flush=True)
        out.mkdir(parents=True, exist_ok=True)  # the table so far, so a cut-short run still leaves figures
        (out / "gpu_check.json").write_text(json.dumps(results, indent=1))
        (out / "gpu_check.md").write_text(table(results, args.dry_run))
    print(table(results, args.dry_run))
    return 0 if all("error" not in r and not r.get("failed") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
