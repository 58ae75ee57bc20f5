"""WSPO step cost side by side: from the logps cache, with live frozen forwards, a bare policy step, TRL's DPO.

Random Llama models written to a temporary folder (no downloads): a policy of `--hidden-size` x
`--layers` and a weak pair of `--weak-hidden-size` x `--weak-layers`, all over a `--vocab`-token
vocabulary (the tiny BPE tokenizer uses the first few hundred ids; the lm_head costs what the full
vocabulary costs). Synthetic records of about `--length` tokens; one batch of `--batch` of them.

Timed steps, each forward + backward + AdamW step on that batch, run interleaved `--repeats` times
(the fastest run counts):
  bare         the policy's response log-probs, mean NLL: the least any objective on these tokens costs
  wspo_cached  WSPOModule's step with `cache_dir` (the frozen values re-padded from the cache)
  wspo_live    WSPOModule's step running reference, weak_base and weak_aligned forwards
  trl_dpo      TRL DPOTrainer.compute_loss on the same records as pairs (chosen + rejected, with its
               reference forward); trl_dpo_precomputed: its precompute_ref_log_probs mode
Module steps are called directly (no Lightning loop, no logging): the same for every variant.
On CPU the clock is this process's CPU time with one thread (`--threads 1`): other jobs on a shared
machine barely disturb it. With `--device cuda` it is wall-clock time between CUDA synchronisations, and
`--precision bf16-mixed` runs every step under bfloat16 autocast (float32 master weights, as Lightning's
bf16-mixed does); the bare step's throughput and model FLOP utilisation (`--peak-tflops`) are printed too.

Peak memory (d): each variant in a fresh subprocess: peak RSS (VmHWM) minus the RSS once the data is
ready, while loading its models and (reset after loading) over `--memory-steps` steps with the models
resident: bare fine-tune, cached WSPO, live WSPO; and the weak pair's frozen forwards in float32 vs
bitsandbytes 4-bit (NF4, CPU backend). On CUDA the same figures come from the allocator's peak
(`torch.cuda.max_memory_allocated`) over what is allocated once the data is ready.

    .venv/bin/python benchmarks/wspo_step.py                                # ~2 minutes on 2 CPU cores
    .venv/bin/python benchmarks/wspo_step.py --hidden-size 512 --layers 8  # a point further on the curve

Ends with `name: value` lines; ratios are variant over bare (lower is better).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from wspo_lightning.cache import LogpsCache
from wspo_lightning.frozen import FrozenRoles
from wspo_lightning.lightning_cli import precompute, run_cli
from wspo_lightning.logprobs import response_logps, response_start
from wspo_lightning.models import ModelSpec, disable_dropout, freeze, load_model
from wspo_lightning.module import sequences
from wspo_lightning.tiny import build_tokenizer, preference_records, write_jsonl


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden-size", type=int, default=256, help="policy width")
    p.add_argument("--layers", type=int, default=4, help="policy depth")
    p.add_argument("--weak-hidden-size", type=int, default=None, help="weak pair width (default: half the policy's)")
    p.add_argument("--weak-layers", type=int, default=None, help="weak pair depth (default: half the policy's)")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary of every model")
    p.add_argument("--batch", type=int, default=4, help="records per step")
    p.add_argument("--length", type=int, default=128, help="about this many tokens per record (prompt + response)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--memory-steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: CPU-time clock; 0: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"], help="as Lightning names it")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak rate, for the MFU figure")
    p.add_argument("--skip-trl", action="store_true", help="leave out the TRL comparison")
    p.add_argument("--skip-memory", action="store_true", help="leave out the memory subprocesses")
    p.add_argument(
        "--memory-variants",
        default="bare,wspo_cached,wspo_live,weak_float,weak_4bit",
        help="which memory subprocesses to run (comma-separated)",
    )
    p.add_argument("--work", default=None, help="folder for models, data and cache (default: a temporary one)")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- the world


def write_model(
    out: Path, tokenizer, hidden: int, layers: int, vocab: int, seed: int, device: str = "cpu", dtype=torch.float32
) -> Path:
    """A random Llama of `hidden` x `layers` over `vocab` tokens, initialised on `device`, saved in `dtype`."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    # intermediate size in whole blocks of 64: bitsandbytes' CPU 4-bit kernels need them
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(2.75 * hidden) // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=max(hidden // 64, 2),
        num_key_value_heads=max(hidden // 128, 1),
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    with torch.device(device):  # a 1B model initialises in seconds on a GPU, minutes on a CPU
        AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def long_records(n: int, length: int) -> list[dict]:
    """Toy preference records whose responses repeat toy sentences up to about `length` tokens."""
    records = []
    for r in preference_records(n, seed=0):
        times = max(1, length // 24)  # a toy sentence is ~10 tokens; the rendered prompt ~15
        records.append({**r, "chosen": " ".join([r["chosen"]] * times), "rejected": " ".join([r["rejected"]] * times)})
    return records


def build_world(work: Path, args) -> Path:
    """Models, records, a fit config and its logps cache (computed on `args.device`) under `work`."""
    tokenizer = build_tokenizer()
    dtype = torch.bfloat16 if args.device != "cpu" else torch.float32  # halves what a GPU run writes and reads
    for role, hidden, layers, seed in (
        ("policy", args.hidden_size, args.layers, 0),
        ("weak_base", args.weak_hidden_size, args.weak_layers, 1),
        ("weak_aligned", args.weak_hidden_size, args.weak_layers, 2),
    ):
        write_model(work / role, tokenizer, hidden, layers, args.vocab, seed=seed, device=args.device, dtype=dtype)
    write_jsonl(work / "train.jsonl", long_records(max(4 * args.batch, 16), args.length))
    accelerator = "cpu" if args.device == "cpu" else "gpu"
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": accelerator, "devices": 1, "logger": False, "enable_progress_bar": False},
        "model": {
            "class_path": "wspo_lightning.module.WSPOModule",
            "init_args": {
                "policy": {"path": str(work / "policy")},
                "weak_base": {"path": str(work / "weak_base")},
                "weak_aligned": {"path": str(work / "weak_aligned")},
                "learning_rate": 1e-6,
            },
        },
        "data": {
            "train_path": str(work / "train.jsonl"),
            "val_fraction": 0.0,
            "max_length": 4 * args.length,
            "batch_size": args.batch,
        },
    }
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    precompute(
        [
            "--config",
            str(work / "config.yaml"),
            f"--model.init_args.cache_dir={work / 'cache'}",
            f"--precompute.batch_size={args.batch}",
        ]
    )
    return work / "config.yaml"


def setup(work: Path, variant: str, device: str = "cpu", precision: str = "32-true"):
    """(batch, policy, step function) of one variant; every module shares nothing with another. The policy
    keeps float32 weights; under "bf16-mixed" each step runs in bfloat16 autocast."""
    cli = run_cli(["--config", str(work / "config.yaml"), "--trainer.accelerator=cpu"], run=False)
    data = cli.datamodule
    data.setup("fit")
    batch = {
        k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in next(iter(data.train_dataloader())).items()
    }
    policy = load_model(ModelSpec(path=str(work / "policy")), trainable=True, device=device)
    disable_dropout(policy)
    autocast = (
        (lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16))
        if precision == "bf16-mixed"
        else contextlib.nullcontext
    )
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)

    def finish(loss):
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if variant == "bare":

        def step():
            with autocast():
                logps, mask = response_logps(policy, *sequences(batch, "chosen"))
            finish(-(logps * mask).sum() / mask.sum())

        return batch, policy, step
    module = cli.model
    module.policy = policy
    if variant == "wspo_cached":
        module.cache_dir = str(work / "cache")
        module.cache = LogpsCache.open(module.cache_dir, module, data)
    else:
        module.frozen = FrozenRoles()
        module.frozen.add("reference", freeze(copy.deepcopy(policy)))
        module.frozen.load({"weak_base": module.weak_base_spec, "weak_aligned": module.weak_aligned_spec}, device)

    def step():
        with autocast():
            loss = module._loss_and_stats(module._step_logps(batch, "train", pairs=False))[0]
        finish(loss)

    return batch, policy, step


def trl_setup(work: Path, batch: dict, policy, precomputed: bool):
    """A TRL DPOTrainer on a copy of the policy and exactly the records of `batch`, as conversational pairs."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    records = {json.loads(line)["id"]: json.loads(line) for line in open(work / "train.jsonl")}
    rows = [
        {
            "prompt": [{"role": "user", "content": records[i]["prompt"]}],
            "chosen": [{"role": "assistant", "content": records[i]["chosen"]}],
            "rejected": [{"role": "assistant", "content": records[i]["rejected"]}],
        }
        for i in batch["ids"]
    ]
    model = copy.deepcopy(policy)
    args = DPOConfig(
        output_dir=str(work / "trl"),
        per_device_train_batch_size=len(rows),
        report_to=[],
        use_cpu=True,
        max_length=None,
        precompute_ref_log_probs=precomputed,
        beta=0.1,
        logging_strategy="no",
        save_strategy="no",
        dataloader_num_workers=0,
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(work / "policy"),
    )
    inputs = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    optimizer = torch.optim.AdamW(trainer.model.parameters(), lr=1e-6)

    def step():
        trainer.compute_loss(trainer.model, inputs).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


# ----------------------------------------------------------------------------- timing


def time_steps(work: Path, args) -> tuple[dict[str, float], dict]:
    """Fastest seconds per step of each variant, and the batch they stepped on."""
    steps = {}
    for variant in ("bare", "wspo_cached", "wspo_live"):
        batch, policy, steps[variant] = setup(work, variant, args.device, args.precision)
    if not args.skip_trl:
        steps["trl_dpo"] = trl_setup(work, batch, policy, precomputed=False)
        steps["trl_dpo_precomputed"] = trl_setup(work, batch, policy, precomputed=True)
    return fastest(steps, args.repeats, args.device), batch


def fastest(variants: dict, repeats: int, device: str = "cpu") -> dict:
    """Fastest seconds of each variant (a function of no arguments) after a warm-up, run interleaved `repeats`
    times: CPU time with one CPU thread, else wall-clock time (on a GPU between synchronisations)."""
    cuda = device != "cpu"
    clock = time.process_time if torch.get_num_threads() == 1 and not cuda else time.perf_counter
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    best = dict.fromkeys(variants, float("inf"))
    for run in variants.values():
        run()
    for _ in range(repeats):
        for name, run in variants.items():
            sync()
            start = clock()
            run()
            sync()
            best[name] = min(best[name], clock() - start)
    return best


class Peak:
    """Peak memory growth (MiB) of this process over what it held when made: on CPU the resident set (VmHWM
    over VmRSS; /proc/self/clear_refs resets the peak), on CUDA the caching allocator's peak over what was
    allocated."""

    def __init__(self, device: str) -> None:
        self.cuda = device != "cpu"
        self.reset_peak()
        self.before = torch.cuda.memory_allocated() / 2**20 if self.cuda else self.status_mib("VmRSS")

    @staticmethod
    def status_mib(field: str) -> float:
        """VmRSS (resident now) or VmHWM (its peak) of this process, in MiB (Linux)."""
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        raise RuntimeError(f"no {field} in /proc/self/status")

    def reset_peak(self) -> None:
        """Forget the peak so far (the baseline stays): the next `growth` is the peak from here on."""
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM = VmRSS

    def growth(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20 - self.before
        return self.status_mib("VmHWM") - self.before


def weak_pair(work: Path, quantization: str, device: str):
    """The weak pair loaded for frozen forwards: float32 on CPU, bfloat16 on a GPU (the 4-bit layers compute
    in that dtype)."""
    dtype = "float32" if device == "cpu" else "bfloat16"
    spec = {"quantization": quantization, "dtype": dtype}
    return [
        load_model(ModelSpec(path=str(work / role), **spec), device=device) for role in ("weak_base", "weak_aligned")
    ]


def memory_child(work: Path, variant: str, steps: int, device: str = "cpu", precision: str = "32-true") -> dict:
    """Runs in a fresh process: the peak memory growth (MiB) of `variant` over the memory in use once the data is
    ready: while loading its models ("load") and while stepping, models resident ("steps"). Printed as JSON."""
    cli = run_cli(["--config", str(work / "config.yaml"), "--trainer.accelerator=cpu"], run=False)
    cli.datamodule.setup("fit")
    batch = {
        k: v.to(device) if isinstance(v, torch.Tensor) else v
        for k, v in next(iter(cli.datamodule.train_dataloader())).items()
    }
    peak = Peak(device)
    if variant.startswith("weak"):
        models = weak_pair(work, "4bit" if variant == "weak_4bit" else "none", device)

        @torch.no_grad()
        def step():
            for model in models:
                response_logps(model, *sequences(batch, "chosen"))

        # what the weights take as stored (bitsandbytes: packed uint8), whatever its kernels add at run time
        weights = sum(t.numel() * t.element_size() for m in models for t in [*m.parameters(), *m.buffers()]) / 2**20
    else:
        step, weights = setup(work, variant, device, precision)[2], None
    load = peak.growth()
    peak.reset_peak()
    for _ in range(steps):
        step()
    result = {"variant": variant, "load": load, "steps": peak.growth(), "weights": weights}
    print(json.dumps(result))
    return result


def measure_memory(work: Path, args) -> dict[str, dict]:
    out = {}
    variants = args.memory_variants.split(",")
    if "weak_4bit" in variants and importlib.util.find_spec("bitsandbytes") is None:
        variants.remove("weak_4bit")
    for variant in variants:
        done = subprocess.run(
            [
                sys.executable,
                __file__,
                "--work",
                str(work),
                "--memory-child",
                variant,
                "--memory-steps",
                str(args.memory_steps),
                "--threads",
                str(args.threads),
                "--device",
                args.device,
                "--precision",
                args.precision,
            ],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise RuntimeError(f"memory child {variant} failed:\n{done.stderr[-3000:]}")
        out[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def policy_step_flops(config, rows: int, length: int, kept: int) -> float:
    """Model FLOPs of one bare policy step (forward + backward = 3 forwards) on `rows` x `length` tokens whose
    logits are computed at `kept` positions per row: 2 FLOPs per weight of the decoder layers per token,
    attention scores and values 4 * length * hidden per token and layer (not halved for causality), the lm_head
    at the kept positions only."""
    hidden, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = hidden // heads
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2  # q, o; k, v
    mlp = 3 * hidden * config.intermediate_size
    tokens = rows * length
    forward = (
        2 * layers * (attention + mlp) * tokens
        + 4 * layers * length * hidden * tokens
        + 2 * hidden * vocab * rows * kept
    )
    return 3.0 * forward


def main(argv=None) -> int:
    args = parse_args(argv)
    args.weak_hidden_size = args.weak_hidden_size or max(args.hidden_size // 2, 64)
    args.weak_layers = args.weak_layers or max(args.layers // 2, 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(Path(args.work), args.memory_child, args.memory_steps, args.device, args.precision)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        if not (work / "cache" / "manifest.json").exists():
            build_world(work, args)
        best, batch = time_steps(work, args)
        memory = {} if args.skip_memory else measure_memory(work, args)
        policy = load_model(ModelSpec(path=str(work / "policy")))
        params = sum(p.numel() for p in policy.parameters())
        weak_params = sum(p.numel() for p in load_model(ModelSpec(path=str(work / "weak_base"))).parameters())

    print(
        f"\npolicy {args.hidden_size}x{args.layers} ({params / 1e6:.1f}M params), weak pair "
        f"{args.weak_hidden_size}x{args.weak_layers} ({weak_params / 1e6:.1f}M each), vocab {args.vocab}, "
        f"batch {args.batch} x ~{args.length} tokens, {args.device} {args.precision}, "
        f"{torch.get_num_threads()} thread(s), fastest of {args.repeats}"
    )
    for name, seconds in best.items():
        print(f"  {name:<22} {seconds * 1000:9.1f} ms/step  {seconds / args.batch * 1000:8.1f} ms/example")
    for name, mib in memory.items():
        stored = f", weights as stored {mib['weights']:7.1f} MiB" if mib["weights"] is not None else ""
        print(
            f"  peak memory growth {name:<12} {mib['steps']:8.1f} MiB stepping, {mib['load']:8.1f} MiB loading" + stored
        )
    input_ids, attention_mask, labels = sequences(batch, "chosen")
    rows, length = input_ids.shape
    kept = length - response_start(labels)  # positions whose logits response_logps computes
    flops = policy_step_flops(policy.config, rows, length, kept)
    figures = {
        "policy_params_m": params / 1e6,
        "weak_params_m": weak_params / 1e6,
        "bare_ms_per_step": best["bare"] * 1000,
        "bare_tokens_per_second": int(attention_mask.sum()) / best["bare"],
        "bare_tflops": flops / best["bare"] / 1e12,
        "step_cached_over_bare": best["wspo_cached"] / best["bare"],
        "step_live_over_bare": best["wspo_live"] / best["bare"],
    }
    if args.peak_tflops:
        figures["bare_mfu"] = figures["bare_tflops"] / args.peak_tflops
    if "trl_dpo" in best:  # per example: both steps hold `batch` records (TRL: as chosen + rejected pairs)
        figures["trl_dpo_over_wspo_cached_per_example"] = best["trl_dpo"] / best["wspo_cached"]
        figures["trl_dpo_precomputed_over_wspo_cached_per_example"] = best["trl_dpo_precomputed"] / best["wspo_cached"]
        figures["trl_dpo_over_wspo_live_per_example"] = best["trl_dpo"] / best["wspo_live"]
    # peaks while stepping, models resident (the loading peaks are printed above)
    for variant in ("wspo_cached", "wspo_live"):
        if variant in memory and "bare" in memory:
            figures[f"memory_{variant[5:]}_over_bare"] = memory[variant]["steps"] / memory["bare"]["steps"]
    if "weak_4bit" in memory and "weak_float" in memory:
        float_name = "float32" if args.device == "cpu" else "bf16"
        figures[f"memory_weak_4bit_over_{float_name}"] = memory["weak_4bit"]["steps"] / memory["weak_float"]["steps"]
        figures[f"memory_weak_4bit_over_{float_name}_weights"] = (
            memory["weak_4bit"]["weights"] / memory["weak_float"]["weights"]
        )
    for name, value in figures.items():
        print(f"{name}: {value:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
