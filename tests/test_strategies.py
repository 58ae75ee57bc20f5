"""Multi-process training on CPU (gloo): DDP and FSDP2 match one process; sharded checkpoints resume.

Two ranks x batch 8 see, at every optimizer step, the same 16 records as one process x batch 16:
the training set holds 16 records, so each step is a full pass (one step per epoch) and the order in
which Lightning's distributed sampler deals the records out does not matter. The loss is a mean over
records, DDP and FSDP average gradients: the per-step losses (logged as means over ranks) must match.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import (
    ROOT,
    STEPS,
    assert_curves_match,
    assert_frozen_roles_sharded,
    csv_metrics,
    launch,
    metrics,
    relative,
    strategy_config,
    torchrun,
    wspo,
)
from safetensors.torch import load_file

from wspo_lightning.cache import LogpsCache
from wspo_lightning.lightning_cli import precompute, run_cli


@pytest.fixture(scope="module")
def ddp_cache(world16, tmp_path_factory):
    """`wspo precompute` on two processes, its forwards packed (`data.packing`): (config, cache folder)."""
    out = tmp_path_factory.mktemp("ddp_cache")
    path, cache = strategy_config(world16, out), out / "cache"
    launch(
        wspo(
            "precompute",
            "--config",
            str(path),
            f"--model.init_args.cache_dir={cache}",
            "--trainer.devices=2",
            "--trainer.accelerator=cpu",
            "--data.packing=true",
        )
    )
    return path, cache


def test_ddp_on_two_processes_from_a_ddp_built_cache_gives_the_single_process_losses(
    world16, tmp_path, single16, ddp_cache
):
    """The single-process run computes every frozen role live on padded rows; the DDP run loads only the policy,
    runs it on packed rows (`data.packing`) and looks the frozen values up in the cache (made packed too)."""
    out = tmp_path / "ddp"
    launch(
        wspo(
            "fit",
            "--config",
            str(strategy_config(world16, out)),
            *STEPS,
            "--data.batch_size=8",
            "--trainer.devices=2",
            "--trainer.strategy=ddp",
            f"--model.init_args.cache_dir={ddp_cache[1]}",
            "--data.packing=true",
        )
    )
    assert_curves_match(csv_metrics(out), single16[0])
    exported = load_file(str(out / "export" / "model.safetensors"))
    for name, tensor in single16[1].items():
        assert relative(exported[name], tensor) < 1e-3, name


def test_fsdp2_matches_one_process_and_resumes_from_a_sharded_checkpoint(world16, tmp_path, single16):
    """torchrun launch, FSDP2Strategy (ModelParallelStrategy + fully_shard per decoder layer), a
    distributed checkpoint at step 2, then a second run resumed from it redoes steps 3-4 exactly, with its
    frozen roles sharded too (`frozen_roles: shard`) instead of a copy per rank."""
    fsdp2 = [
        "--config",
        str(ROOT / "configs" / "strategies" / "fsdp2.yaml"),
        "--trainer.devices=2",
        "--data.batch_size=8",
        *STEPS,
    ]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    stderr = launch(
        torchrun("fit", "--config", str(strategy_config(world16, full, checkpoint_every=2, fsdp2=True)), *fsdp2)
    )
    assert stderr.count("loaded only this rank's shard of each weight") == 2  # the policy, on each rank (meta start)
    checkpoint = full / "ckpt" / "step=2.ckpt"
    assert checkpoint.is_dir() and len(list(checkpoint.glob("*.distcp"))) == 2  # one shard per rank
    full_metrics = csv_metrics(full)
    assert_curves_match(full_metrics, single16[0])

    config = strategy_config(world16, resumed, fsdp2=True)
    shard = "--trainer.strategy.frozen_roles=shard"
    stderr = launch(torchrun("fit", "--config", str(config), *fsdp2, shard, f"--ckpt_path={checkpoint}"))
    assert_frozen_roles_sharded(stderr)
    # policy, reference (read from the policy's files) and weak pair: each rank read only its rows of each
    assert stderr.count("loaded only this rank's shard of each weight") == 4 * 2
    resumed_metrics = csv_metrics(resumed)
    assert resumed_metrics["step"][0] == 2  # it went on from step 2
    torch.testing.assert_close(
        torch.tensor(resumed_metrics["train/loss"]), torch.tensor(full_metrics["train/loss"][2:]), rtol=1e-6, atol=0
    )

    # HFExport gathers the DTensor shards into one plain Hugging Face checkpoint
    exported = load_file(str(full / "export" / "model.safetensors"))
    assert exported.keys() == single16[1].keys()
    torch.testing.assert_close(load_file(str(resumed / "export" / "model.safetensors")), exported, rtol=1e-6, atol=1e-7)
    for name, tensor in single16[1].items():
        assert relative(exported[name], tensor) < 1e-3, name


def merged_by_hand(start: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor], scale: float) -> dict:
    """`start` (a float checkpoint) with every LoRA update folded in: W + scale * B @ A."""
    merged = dict(start)
    for name, a in adapters.items():
        if ".lora_A." in name:
            b = adapters[name.replace(".lora_A.", ".lora_B.")]
            target = name.split("base_model.model.", 1)[1].split(".lora_A.")[0] + ".weight"
            merged[target] = start[target] + scale * (b @ a)
    return merged


@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_fsdp2_trains_lora_adapters_like_one_process_and_exports_the_merged_policy(world16, tmp_path, quantization):
    """LoRA under FSDP2 (frozen base and trainable adapters in one sharded unit), over a float base or a 4-bit
    NF4 one (QLoRA: the packed weights stored as float32, `bnb_4bit_quant_storage`, so FSDP2 shards them too),
    the weak pair sharded too (`frozen_roles: shard`): the losses of one process, and HFExport gathers the
    shards and writes a plain float model, the start's weights with the trained adapters folded in by hand
    (W + alpha/r * B @ A)."""
    if quantization == "4bit":
        pytest.importorskip("bitsandbytes")
    lora = [
        "--model.policy.lora.r=4",
        f"--model.policy.quantization={quantization}",
        "--model.learning_rate=0.01",
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=0",
        "--trainer.accelerator=cpu",
    ]
    one = strategy_config(world16, tmp_path / "one", checkpoint_every=2)
    single = run_cli(["fit", "--config", str(one), *lora, "--data.batch_size=16"])
    # the trained adapters, from the checkpoint of the last step (the export merges them away in place)
    state = torch.load(tmp_path / "one" / "ckpt" / "step=2.ckpt", weights_only=True)["state_dict"]
    adapters = {n.removeprefix("policy."): t for n, t in state.items() if ".lora_" in n}
    assert len(adapters) == 2 * 2 * 7  # A and B, 2 layers x 7 linear layers
    stderr = launch(
        torchrun(
            "fit",
            "--config",
            str(strategy_config(world16, tmp_path / "fsdp2", fsdp2=True)),
            *lora,
            "--config",
            str(ROOT / "configs" / "strategies" / "fsdp2.yaml"),
            "--trainer.devices=2",
            "--data.batch_size=8",
            "--trainer.strategy.frozen_roles=shard",
        )
    )
    assert_frozen_roles_sharded(stderr, roles=2)  # the weak pair; the reference is the adapter-free policy
    assert "FSDP2: sharded 2 decoder layers (LlamaDecoderLayer) over 2 ranks" in stderr
    assert ("over 2 ranks, 14 of their weights in 4-bit (bitsandbytes)" in stderr) == (quantization == "4bit")  # 2 x 7
    assert_curves_match(csv_metrics(tmp_path / "fsdp2"), metrics(single), ["train/loss", "train/wspo/delta_strong"])
    exported = load_file(str(tmp_path / "fsdp2" / "export" / "model.safetensors"))
    start = load_file(str(world16 / "policy" / "model.safetensors"))
    assert exported.keys() == start.keys()  # a plain model: no adapter keys left
    assert not torch.equal(
        exported["model.layers.0.self_attn.q_proj.weight"], start["model.layers.0.self_attn.q_proj.weight"]
    )
    for name, tensor in merged_by_hand(start, adapters, scale=32 / 4).items():  # LoraSpec's alpha 32, r 4
        assert relative(exported[name], tensor) < 1e-3, name


def test_precompute_under_ddp_writes_a_shard_per_rank_with_the_single_process_values(ddp_cache, tmp_path):
    """Packed forwards on two ranks, padded ones in one process: the same value per record and token."""
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


def test_decoder_layers_are_the_blocks_transformers_keeps_whole_also_inside_peft():
    from peft import LoraConfig, get_peft_model
    from torch import nn

    from wspo_lightning.strategies import decoder_layers
    from wspo_lightning.tiny import build_tiny_model, build_tokenizer

    llama = build_tiny_model("llama", build_tokenizer(), num_layers=3)
    blocks = list(llama.model.layers)
    assert decoder_layers(llama) == blocks
    wrapped = get_peft_model(llama, LoraConfig(r=2, target_modules=["q_proj"]))
    assert decoder_layers(wrapped) == blocks
    gpt2 = build_tiny_model("gpt2", build_tokenizer(), num_layers=2)
    assert decoder_layers(gpt2) == list(gpt2.transformer.h)
    assert decoder_layers(nn.Sequential(nn.Linear(2, 2))) == []
