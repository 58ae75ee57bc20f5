"""Multi-process training on CPU (gloo): DDP and FSDP2 match one process; sharded checkpoints resume.

Two ranks x batch 8 see, at every optimizer step, the same 16 records as one process x batch 16:
the training set holds 16 records, so each step is a full pass (one step per epoch) and the order in
which Lightning's distributed sampler deals the records out does not matter. The loss is a mean over
records, DDP and FSDP average gradients: the per-step losses (logged as means over ranks) must match.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ROOT, metrics
from safetensors.torch import load_file

from wspo_lightning.cache import LogpsCache
from wspo_lightning.lightning_cli import precompute, run_cli
from wspo_lightning.tiny import write_tiny_world

STEPS = ["--trainer.max_steps=4", "--trainer.max_epochs=4", "--data.eval_batch_size=4", "--trainer.accelerator=cpu"]
COMPARED = ["train/loss", "train/wspo/delta_strong", "val/loss", "val/rewards/strong_margin"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_tiny_world(tmp_path_factory.mktemp("world16"), n_train=16, n_val=8)


def config(world: Path, out: Path, checkpoint_every: int | None = None, fsdp2: bool = False) -> Path:
    """configs/tiny_cpu.yaml on `world`, writing under `out`, with optional step checkpoints.

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


def launch(command: list[str], timeout: int = 180) -> str:
    """Run `command` in its own process group (killed whole on timeout); its stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT, start_new_session=True
    )
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
        pytest.fail(f"timed out after {timeout} s: {' '.join(command)}\n{stderr[-4000:]}")
    assert process.returncode == 0, stderr[-4000:]
    return stderr


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


def csv_metrics(out: Path) -> dict[str, list[float]]:
    """What rank 0's CSVLogger wrote under `out`, in its newest version folder."""
    return metrics(sorted((out / "logs" / "wspo").glob("version_*"))[-1] / "metrics.csv")


@pytest.fixture(scope="module")
def single(world, tmp_path_factory):
    """One process, batch 16: the reference curve and final weights."""
    out = tmp_path_factory.mktemp("single")
    cli = run_cli(["fit", "--config", str(config(world, out)), *STEPS, "--data.batch_size=16"])
    return metrics(cli), {n: p.detach().clone() for n, p in cli.model.policy.state_dict().items()}


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


@pytest.fixture(scope="module")
def ddp_cache(world, tmp_path_factory):
    """`wspo precompute` on two processes: (config, cache folder)."""
    out = tmp_path_factory.mktemp("ddp_cache")
    path, cache = config(world, out), out / "cache"
    launch(
        wspo(
            "precompute",
            "--config",
            str(path),
            f"--model.init_args.cache_dir={cache}",
            "--trainer.devices=2",
            "--trainer.accelerator=cpu",
        )
    )
    return path, cache


def test_ddp_on_two_processes_from_a_ddp_built_cache_gives_the_single_process_losses(
    world, tmp_path, single, ddp_cache
):
    """The single-process run computes every frozen role live; the DDP run loads only the policy."""
    out = tmp_path / "ddp"
    launch(
        wspo(
            "fit",
            "--config",
            str(config(world, out)),
            *STEPS,
            "--data.batch_size=8",
            "--trainer.devices=2",
            "--trainer.strategy=ddp",
            f"--model.init_args.cache_dir={ddp_cache[1]}",
        )
    )
    assert_curves_match(csv_metrics(out), single[0])
    exported = load_file(str(out / "export" / "model.safetensors"))
    for name, tensor in single[1].items():
        assert relative(exported[name], tensor) < 1e-3, name


def test_fsdp2_matches_one_process_and_resumes_from_a_sharded_checkpoint(world, tmp_path, single):
    """torchrun launch, FSDP2Strategy (ModelParallelStrategy + fully_shard per decoder layer), a
    distributed checkpoint at step 2, then a second run resumed from it redoes steps 3-4 exactly."""
    fsdp2 = [
        "--config",
        str(ROOT / "configs" / "strategies" / "fsdp2.yaml"),
        "--trainer.devices=2",
        "--data.batch_size=8",
        *STEPS,
    ]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    launch(torchrun("fit", "--config", str(config(world, full, checkpoint_every=2, fsdp2=True)), *fsdp2))
    checkpoint = full / "ckpt" / "step=2.ckpt"
    assert checkpoint.is_dir() and len(list(checkpoint.glob("*.distcp"))) == 2  # one shard per rank
    full_metrics = csv_metrics(full)
    assert_curves_match(full_metrics, single[0])

    launch(torchrun("fit", "--config", str(config(world, resumed, fsdp2=True)), *fsdp2, f"--ckpt_path={checkpoint}"))
    resumed_metrics = csv_metrics(resumed)
    assert resumed_metrics["step"][0] == 2  # it went on from step 2
    torch.testing.assert_close(
        torch.tensor(resumed_metrics["train/loss"]), torch.tensor(full_metrics["train/loss"][2:]), rtol=1e-6, atol=0
    )

    # HFExport gathers the DTensor shards into one plain Hugging Face checkpoint
    exported = load_file(str(full / "export" / "model.safetensors"))
    assert exported.keys() == single[1].keys()
    torch.testing.assert_close(load_file(str(resumed / "export" / "model.safetensors")), exported, rtol=1e-6, atol=1e-7)
    for name, tensor in single[1].items():
        assert relative(exported[name], tensor) < 1e-3, name


def test_fsdp2_trains_lora_adapters_and_exports_the_merged_policy(world, tmp_path):
    """LoRA under FSDP2 (frozen base and trainable adapters in one sharded unit); HFExport gathers the
    shards, merges the adapters on rank 0 and writes a plain model equal to a one-process run's."""
    lora = [
        "--model.policy.lora.r=4",
        "--model.learning_rate=0.01",
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=0",
        "--trainer.accelerator=cpu",
    ]
    single = run_cli(["fit", "--config", str(config(world, tmp_path / "one")), *lora, "--data.batch_size=16"])
    want = {n: p.detach() for n, p in single.model.policy.merge_and_unload().state_dict().items()}
    stderr = launch(
        torchrun(
            "fit",
            "--config",
            str(config(world, tmp_path / "fsdp2", fsdp2=True)),
            *lora,
            "--config",
            str(ROOT / "configs" / "strategies" / "fsdp2.yaml"),
            "--trainer.devices=2",
            "--data.batch_size=8",
        )
    )
    assert "FSDP2: sharded 2 decoder layers (LlamaDecoderLayer) over 2 ranks" in stderr
    exported = load_file(str(tmp_path / "fsdp2" / "export" / "model.safetensors"))
    start = load_file(str(world / "policy" / "model.safetensors"))
    assert exported.keys() == start.keys()  # a plain model: no adapter keys left
    assert not torch.equal(
        exported["model.layers.0.self_attn.q_proj.weight"], start["model.layers.0.self_attn.q_proj.weight"]
    )
    for name, tensor in want.items():
        assert relative(exported[name], tensor) < 1e-3, name


def test_precompute_under_ddp_writes_a_shard_per_rank_with_the_single_process_values(ddp_cache, tmp_path):
    path, two = ddp_cache
    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["splits"]["train"]["shards"] == [
        "train-00000-of-00002.safetensors",
        "train-00001-of-00002.safetensors",
    ]
    one = precompute(["--config", str(path), f"--model.init_args.cache_dir={tmp_path / 'cache_1'}"])
    cli = run_cli(["--config", str(path)], run=False)
    cli.datamodule.setup("fit")
    caches = [LogpsCache.open(folder, cli.model, cli.datamodule) for folder in (one, two)]
    for split in ("train", "val"):
        a, b = (c._splits[split] for c in caches)
        for side, lengths in a["lengths"].items():
            assert torch.equal(lengths, b["lengths"][side])  # each record once, its sides from either rank
            for value in ("delta_weak", "reference"):
                for row in range(len(lengths)):
                    n, i, j = int(lengths[row]), int(a["offsets"][side][row]), int(b["offsets"][side][row])
                    torch.testing.assert_close(
                        a["values"][side][value][i : i + n], b["values"][side][value][j : j + n], rtol=1e-5, atol=1e-6
                    )


@pytest.mark.parametrize(
    "name, strategy", [("ddp", "DDPStrategy"), ("fsdp", "FSDPStrategy"), ("fsdp2", "FSDP2Strategy")]
)
def test_strategy_yamls_build_lightnings_strategies(name, strategy):
    """Parsed and instantiated as LightningCLI does (FSDP1 needs a GPU Trainer: its strategy alone here)."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import Strategy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    parser = ArgumentParser()
    parser.add_argument("--trainer.strategy", type=Strategy | str)
    parser.add_argument("--trainer.accelerator", type=str | None, default=None)
    parser.add_argument("--trainer.devices", type=int | str | None, default=None)
    parser.add_argument("--trainer.num_nodes", type=int, default=1)
    for part in (name, "multi_node"):
        parsed = parser.parse_path(ROOT / "configs" / "strategies" / f"{part}.yaml", defaults=False)
        if part == "multi_node":
            assert parsed.trainer.num_nodes == 2 and parsed.trainer.devices == 8
            continue
        built = parser.instantiate_classes(parsed).trainer.strategy
        assert type(built).__name__ == strategy
    if name == "fsdp":
        assert built.kwargs["auto_wrap_policy"]._module_classes == {LlamaDecoderLayer}
