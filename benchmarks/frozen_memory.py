"""Memory per rank of a frozen role under FSDP2: replicated on every rank, sharded (`frozen_roles: shard`), or
sharded in CPU memory (`offload`), measured side by side on CPU with `--ranks` gloo processes.

A random Llama of `--hidden-size` x `--layers` over `--vocab` tokens (float32) is written to a temporary folder;
for each placement, `torchrun --standalone --nproc_per_node RANKS` starts this script on every rank, which loads
the model as a frozen role (`models.load_model`, its weights copied out of the file's memory map as a move to
a device would), places it as `strategies.shard_frozen` does, and runs
`--batch` x `--length` tokens through it (`logprobs.response_logps`, no gradients). Each rank reports its
resident set (RSS) growth over the RSS before loading:

  resident   once placed (for shard and offload: after `fully_shard` freed the loaded copy)
  forward    the peak while running the forward (gathered units, activations, logits)
  loading    the peak while loading (every placement first loads the whole model on each rank's CPU)

On CPU the device is CPU memory, so offload holds what shard holds; on a GPU, offload moves the resident
shards to CPU memory and leaves the GPU only the unit being gathered (configs/strategies/README.md).

    .venv/bin/python benchmarks/frozen_memory.py                       # ~1 minute on 2 CPU cores

Ends with `name: value` lines: per-rank resident and forward-peak ratios, shard over replicate.
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

import torch  # noqa: E402

PLACEMENTS = ["replicate", "shard", "offload"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden-size", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # a placement, run on each rank
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def child(args) -> None:
    """One rank: load, place, forward; print this rank's figures as JSON."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from wspo_step import Peak

    from wspo_lightning.logprobs import response_logps, right_pad
    from wspo_lightning.models import ModelSpec, load_model
    from wspo_lightning.strategies import shard_frozen

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("data_parallel",))
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(10, 200, (args.batch, args.length // 4), generator=generator).tolist()
    responses = torch.randint(10, 200, (args.batch, args.length - args.length // 4), generator=generator).tolist()
    batch = right_pad(prompts, responses, pad_id=0)
    dist.barrier()
    peak = Peak("cpu")
    model = load_model(ModelSpec(path=args.model))
    with torch.no_grad():  # weights in this process's memory, as on a device (loading maps the file lazily)
        for param in model.parameters():
            param.data = param.data.clone()
    loading = peak.growth()
    if args.child != "replicate":
        shard_frozen(model, mesh, offload=args.child == "offload")
    resident = Peak.status_mib("VmRSS") - peak.before
    peak.reset_peak()
    with torch.no_grad():
        logps, _ = response_logps(model, *batch)
    forward = peak.growth()
    total = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    print(
        "FIGURES "
        + json.dumps(
            {
                "rank": dist.get_rank(),
                "placement": args.child,
                "weights_mib": total,
                "loading": loading,
                "resident": resident,
                "forward": forward,
                "logps_sum": float(logps.sum()),
            }
        ),
        flush=True,
    )
    dist.destroy_process_group()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    from wspo_step import write_model

    from wspo_lightning.tiny import build_tokenizer

    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = write_model(Path(tmp) / "model", build_tokenizer(), args.hidden_size, args.layers, args.vocab, seed=0)
        for placement in PLACEMENTS:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.ranks}"]
            command += [__file__, "--child", placement, "--model", str(model), "--batch", str(args.batch)]
            command += ["--length", str(args.length)]
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                raise RuntimeError(f"{placement} failed:\n{done.stderr[-3000:]}")
            lines = [line for line in (done.stdout + done.stderr).splitlines() if "FIGURES " in line]
            results[placement] = sorted(
                (json.loads(line.split("FIGURES ", 1)[1]) for line in lines), key=lambda r: r["rank"]
            )
    weights = results["replicate"][0]["weights_mib"]
    print(
        f"\nfrozen Llama {args.hidden_size}x{args.layers}, vocab {args.vocab}: {weights:.0f} MiB of float32 weights; "
        f"{args.ranks} ranks (gloo, CPU); forward of {args.batch} x {args.length} tokens; RSS growth per rank, MiB"
    )
    print(f"{'placement':<10}{'rank':>5}{'resident':>10}{'forward':>10}{'loading':>10}")
    for placement, ranks in results.items():
        for r in ranks:
            print(f"{placement:<10}{r['rank']:>5}{r['resident']:>10.0f}{r['forward']:>10.0f}{r['loading']:>10.0f}")
    sums = {p: [r["logps_sum"] for r in ranks] for p, ranks in results.items()}
    print(f"sum of the log-probs (equal across placements): {sums}")

    def worst(placement: str, key: str) -> float:
        return max(r[key] for r in results[placement])

    print()
    print(f"weights_mib: {weights:.1f}")
    for placement in ("shard", "offload"):
        for key in ("resident", "forward"):
            print(f"{key}_{placement}_over_replicate: {worst(placement, key) / worst('replicate', key):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
