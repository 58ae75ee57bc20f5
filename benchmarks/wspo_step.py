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
machine barely disturb it.

Peak memory (d): each variant in a fresh subprocess: peak RSS (VmHWM) minus the RSS once the data is
ready, while loading its models and (reset after loading) over `--memory-steps` steps with the models
resident: bare fine-tune, cached WSPO, live WSPO; and the weak pair's frozen forwards in float32 vs
bitsandbytes 4-bit (NF4, CPU backend).

    .venv/bin/python benchmarks/wspo_step.py                                # ~2 minutes on 2 CPU cores
    .venv/bin/python benchmarks/wspo_step.py --hidden-size 512 --layers 8  # a point further on the curve

Ends with `name: value` lines; ratios are variant over bare (lower is better).
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from wspo_lightning.cache import LogpsCache
from wspo_lightning.lightning_cli import precompute, run_cli
from wspo_lightning.logprobs import response_logps
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
    p.add_argument("--skip-trl", action="store_true", help="leave out the TRL comparison")
    p.add_argument("--skip-memory", action="store_true", help="leave out the memory subprocesses")
    p.add_argument("--work", default=None, help="folder for models, data and cache (default: a temporary one)")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- the world


def write_model(out: Path, tokenizer, hidden: int, layers: int, vocab: int, seed: int) -> Path:
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
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
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
    tokenizer = build_tokenizer()
    write_model(work / "policy", tokenizer, args.hidden_size, args.layers, args.vocab, seed=0)
    write_model(work / "weak_base", tokenizer, args.weak_hidden_size, args.weak_layers, args.vocab, seed=1)
    write_model(work / "weak_aligned", tokenizer, args.weak_hidden_size, args.weak_layers, args.vocab, seed=2)
    write_jsonl(work / "train.jsonl", long_records(max(4 * args.batch, 16), args.length))
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False},
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
        ["--config", str(work / "config.yaml"), f"--model.init_args.cache_dir={work / 'cache'}"], batch_size=args.batch
    )
    return work / "config.yaml"


def setup(work: Path, variant: str):
    """(batch, policy, step function) of one variant; every module shares nothing with another."""
    cli = run_cli(["--config", str(work / "config.yaml")], run=False)
    data = cli.datamodule
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    policy = load_model(ModelSpec(path=str(work / "policy")), trainable=True)
    disable_dropout(policy)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)

    def finish(loss):
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if variant == "bare":

        def step():
            logps, mask = response_logps(policy, *sequences(batch, "chosen"))
            finish(-(logps * mask).sum() / mask.sum())

        return batch, policy, step
    module = cli.model
    module.policy = policy
    if variant == "wspo_cached":
        module.cache_dir = str(work / "cache")
        module.cache = LogpsCache.open(module.cache_dir, module, data)
    else:
        module.frozen = {
            "reference": freeze(copy.deepcopy(policy)),
            "weak_base": load_model(module.weak_base_spec),
            "weak_aligned": load_model(module.weak_aligned_spec),
        }

    def step():
        finish(module._loss_and_stats(module._step_logps(batch, "train", pairs=False))[0])

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


def time_steps(work: Path, args) -> dict[str, float]:
    steps = {}
    for variant in ("bare", "wspo_cached", "wspo_live"):
        batch, policy, steps[variant] = setup(work, variant)
    if not args.skip_trl:
        steps["trl_dpo"] = trl_setup(work, batch, policy, precomputed=False)
        steps["trl_dpo_precomputed"] = trl_setup(work, batch, policy, precomputed=True)
    clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
    best = {name: float("inf") for name in steps}
    for step in steps.values():  # warm-up
        step()
    for _ in range(args.repeats):
        for name, step in steps.items():
            start = clock()
            step()
            best[name] = min(best[name], clock() - start)
    return best


def status_mib(field: str) -> float:
    """VmRSS (resident now) or VmHWM (its peak) of this process, in MiB (Linux)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_child(work: Path, variant: str, steps: int) -> None:
    """Runs in a fresh process: prints, as JSON, the peak RSS growth (MiB) of `variant` over the RSS once the
    data is ready: while loading its models ("load") and while stepping, models resident ("steps")."""
    cli = run_cli(["--config", str(work / "config.yaml")], run=False)
    cli.datamodule.setup("fit")
    batch = next(iter(cli.datamodule.train_dataloader()))
    clear_refs = Path("/proc/self/clear_refs")
    clear_refs.write_text("5")  # forget the peak so far (imports, parsing): VmHWM = VmRSS
    before = status_mib("VmRSS")
    if variant.startswith("weak"):
        quantization = "4bit" if variant == "weak_4bit" else "none"
        models = [
            load_model(ModelSpec(path=str(work / role), quantization=quantization))
            for role in ("weak_base", "weak_aligned")
        ]

        @torch.no_grad()
        def step():
            for model in models:
                response_logps(model, *sequences(batch, "chosen"))

        # what the weights take as stored (bitsandbytes: packed uint8), whatever its kernels add at run time
        weights = sum(t.numel() * t.element_size() for m in models for t in [*m.parameters(), *m.buffers()]) / 2**20
    else:
        step, weights = setup(work, variant)[2], None
    load = status_mib("VmHWM") - before
    clear_refs.write_text("5")
    for _ in range(steps):
        step()
    print(json.dumps({"variant": variant, "load": load, "steps": status_mib("VmHWM") - before, "weights": weights}))


def measure_memory(work: Path, args) -> dict[str, float]:
    out = {}
    variants = ["bare", "wspo_cached", "wspo_live", "weak_float32"]
    try:
        import bitsandbytes  # noqa: F401

        variants.append("weak_4bit")
    except ImportError:
        pass
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
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        out[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    args.weak_hidden_size = args.weak_hidden_size or max(args.hidden_size // 2, 64)
    args.weak_layers = args.weak_layers or max(args.layers // 2, 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(Path(args.work), args.memory_child, args.memory_steps)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        if not (work / "cache" / "manifest.json").exists():
            build_world(work, args)
        best = time_steps(work, args)
        memory = {} if args.skip_memory else measure_memory(work, args)
        params = sum(p.numel() for p in load_model(ModelSpec(path=str(work / "policy"))).parameters())
        weak_params = sum(p.numel() for p in load_model(ModelSpec(path=str(work / "weak_base"))).parameters())

    print(
        f"\npolicy {args.hidden_size}x{args.layers} ({params / 1e6:.1f}M params), weak pair "
        f"{args.weak_hidden_size}x{args.weak_layers} ({weak_params / 1e6:.1f}M each), vocab {args.vocab}, "
        f"batch {args.batch} x ~{args.length} tokens, {torch.get_num_threads()} thread(s), fastest of {args.repeats}"
    )
    for name, seconds in best.items():
        print(f"  {name:<22} {seconds * 1000:9.1f} ms/step  {seconds / args.batch * 1000:8.1f} ms/example")
    for name, mib in memory.items():
        stored = f", weights as stored {mib['weights']:7.1f} MiB" if mib["weights"] is not None else ""
        print(
            f"  peak memory growth {name:<12} {mib['steps']:8.1f} MiB stepping, {mib['load']:8.1f} MiB loading" + stored
        )
    figures = {
        "policy_params_m": params / 1e6,
        "weak_params_m": weak_params / 1e6,
        "step_cached_over_bare": best["wspo_cached"] / best["bare"],
        "step_live_over_bare": best["wspo_live"] / best["bare"],
    }
    if "trl_dpo" in best:  # per example: both steps hold `batch` records (TRL: as chosen + rejected pairs)
        figures["trl_dpo_over_wspo_cached_per_example"] = best["trl_dpo"] / best["wspo_cached"]
        figures["trl_dpo_precomputed_over_wspo_cached_per_example"] = best["trl_dpo_precomputed"] / best["wspo_cached"]
        figures["trl_dpo_over_wspo_live_per_example"] = best["trl_dpo"] / best["wspo_live"]
    if memory:  # peaks while stepping, models resident (the loading peaks are printed above)
        figures["memory_cached_over_bare"] = memory["wspo_cached"]["steps"] / memory["bare"]["steps"]
        figures["memory_live_over_bare"] = memory["wspo_live"]["steps"] / memory["bare"]["steps"]
        if "weak_4bit" in memory:
            figures["memory_weak_4bit_over_float32"] = memory["weak_4bit"]["steps"] / memory["weak_float32"]["steps"]
            figures["memory_weak_4bit_over_float32_weights"] = (
                memory["weak_4bit"]["weights"] / memory["weak_float32"]["weights"]
            )
    for name, value in figures.items():
        print(f"{name}: {value:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
