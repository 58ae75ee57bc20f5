"""`shard_load`: an FSDP2 rank builds a model on the meta device and reads only its rows of each weight; the
sharded model equals the files, and what cannot load that way says why and loads whole."""

from __future__ import annotations

import logging
import os

import pytest
import torch
import torch.multiprocessing as mp
from helpers import free_port
from safetensors.torch import load_file, save_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from wspo_lightning.models import LoraSpec, ModelSpec, load_model
from wspo_lightning.shard_load import load_sharded


def _write(folder, tie: bool) -> str:
    # odd sizes: ranks own unequal numbers of rows (torch.chunk: 19 and 18 of 37)
    config = Qwen2Config(
        vocab_size=37, hidden_size=24, intermediate_size=45, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=tie,
    )  # fmt: skip
    torch.manual_seed(int(tie))
    Qwen2ForCausalLM(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def qwen_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("shard_load")
    return [_write(root / "tied", True), _write(root / "untied", False)]


def _each_rank(rank: int, port: int, folders: list[str], out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from wspo_lightning.strategies import shard_frozen, shard_policy

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    found = []
    for folder in folders:
        whole = load_model(ModelSpec(path=folder))
        for shard, trainable in ((lambda m: shard_policy(m, mesh), True), (lambda m: shard_frozen(m, mesh), False)):
            model = load_sharded(ModelSpec(path=folder), shard, "cpu", trainable=trainable)
            ids = torch.tensor([[1, 5, 7, 3, 36]])
            with torch.no_grad():
                logits = model(ids).logits
            found.append(
                {
                    "full": {k: v.full_tensor() for k, v in model.state_dict().items()},
                    "local": sum(p.to_local().numel() for p in model.parameters()),
                    "total": sum(p.numel() for p in whole.parameters()),  # a tied weight once
                    "buffers": dict(model.named_buffers()),
                    "tied": model.get_output_embeddings().weight is model.get_input_embeddings().weight,
                    "trainable": model.training and all(p.requires_grad for p in model.parameters()),
                    "logits": logits,
                    "whole_logits": whole(ids).logits.detach(),
                    "whole_buffers": dict(whole.named_buffers()),
                }
            )
    torch.save(found, f"{out}.{rank}")
    dist.destroy_process_group()


def test_each_rank_reads_its_rows_and_the_sharded_model_equals_the_files(qwen_folders, tmp_path):
    """2 gloo ranks, tied and untied Qwen2s of odd sizes, sharded as the policy and as a frozen role: the gathered
    weights are the files' tensors, the rotary buffers those from_pretrained builds, the logits the same; each rank
    holds part of the weights, the parts adding up to the model once; a tied head stays tied."""
    out = str(tmp_path / "found")
    mp.spawn(_each_rank, args=(free_port(), qwen_folders, out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{rank}", weights_only=False) for rank in range(2)]
    cases = [(folder, trainable) for folder in qwen_folders for trainable in (True, False)]
    for i, (folder, trainable) in enumerate(cases):
        files = load_file(f"{folder}/model.safetensors")
        mine, theirs = ranks[0][i], ranks[1][i]
        for name, tensor in mine["full"].items():
            stored = files.get(name, files.get("model.embed_tokens.weight"))  # a tied head is stored once
            assert torch.equal(tensor, stored), (folder, name)
            assert torch.equal(theirs["full"][name], stored)
        assert mine["buffers"].keys() == mine["whole_buffers"].keys()
        for name, buffer in mine["whole_buffers"].items():
            assert torch.equal(mine["buffers"][name], buffer), name
        torch.testing.assert_close(mine["logits"], mine["whole_logits"], rtol=1e-5, atol=1e-6)
        total = mine["total"]
        assert mine["local"] + theirs["local"] == total and 0 < mine["local"] < total
        assert mine["tied"] == folder.endswith("/tied")
        assert mine["trainable"] == trainable


def test_what_cannot_load_shard_by_shard_says_why_and_loads_whole(qwen_folders, tmp_path, caplog, monkeypatch):
    """load_sharded returns None (the caller loads the model whole) with the reason, before any sharding."""
    renamed = tmp_path / "renamed"
    _write(renamed, False)
    weights = load_file(renamed / "model.safetensors")
    weights["transformer.lm_head.weight"] = weights.pop("lm_head.weight")  # a layout transformers would convert
    save_file(weights, renamed / "model.safetensors", metadata={"format": "pt"})

    def never(model):
        raise AssertionError("sharded a model that cannot load shard by shard")

    cases = {
        "bitsandbytes quantizes": ModelSpec(path=qwen_folders[0], quantization="4bit"),
        "LoRA adapters": ModelSpec(path=qwen_folders[0], lora=LoraSpec(r=2)),
        "not in the local Hugging Face cache": ModelSpec(path="nobody/no-such-model"),
        "holds no weight named lm_head.weight": ModelSpec(path=str(renamed)),
    }
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for reason, spec in cases.items():
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="wspo_lightning.shard_load"):
            assert load_sharded(spec, never, "cpu") is None
        assert f"{spec.path} loads whole on every rank, then is sharded: " in caplog.text
        assert reason in caplog.text, caplog.text


def test_a_model_no_fsdp_unit_manages_loads_whole_with_its_ties(qwen_folders):
    """Built on the meta device and left unsharded (one process), in bfloat16: every tensor equals from_pretrained's
    and a tied head is the embeddings (to_empty alone would give it a tensor of its own, never read)."""
    for folder in qwen_folders:
        spec = ModelSpec(path=folder, dtype="bfloat16")
        model, whole = load_sharded(spec, lambda m: m, "cpu"), load_model(spec)
        assert model.state_dict().keys() == whole.state_dict().keys()
        for name, tensor in whole.state_dict().items():
            assert torch.equal(model.state_dict()[name], tensor), name
        tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        assert tied == folder.endswith("/tied")
