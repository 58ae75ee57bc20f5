"""`wspo plan`: memory per rank on paper, from config.json files only (tiny configs here, no weights anywhere)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ROOT
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config

from wspo_lightning.cli import main as wspo
from wspo_lightning.models import ModelSpec
from wspo_lightning.plan import KEYS, NF4_BYTES, layer_bytes, model_arch, plan

RECIPES = sorted((ROOT / "configs" / "recipes").glob("*.yaml"))
V, H, INTER, LAYERS, HEADS, KV_HEADS = 1000, 64, 160, 3, 4, 2  # head_dim 16: q 64 wide, k and v 32 each


def write_config(folder: Path, kind: str = "qwen2", tied: bool = False) -> Path:
    cls = Qwen2Config if kind == "qwen2" else LlamaConfig
    cls(
        vocab_size=V, hidden_size=H, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, tie_word_embeddings=tied,
    ).save_pretrained(folder)  # fmt: skip
    return folder


def fit_config(tmp_path: Path, model: dict, strategy=None, devices: int = 1, objective: str = "WSPOModule") -> Path:
    policy = model.setdefault("policy", {})
    policy.setdefault("path", str(write_config(tmp_path / "policy")))
    if objective == "WSPOModule":
        for role in ("weak_base", "weak_aligned"):
            model.setdefault(role, {"path": str(write_config(tmp_path / role, "llama", tied=True))})
    trainer = {"accelerator": "cpu", "devices": devices, "precision": "32-true", "logger": False}
    if strategy:
        trainer["strategy"] = strategy
    config = {
        "trainer": trainer,
        "model": {"class_path": f"wspo_lightning.module.{objective}", "init_args": model},
        "data": {"train_path": "unread.jsonl", "max_length": 64, "batch_size": 2},
    }
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def per_rank(path: Path, *overrides: str) -> dict:
    return plan(["--config", str(path), *overrides])["per_rank_bytes"]


def test_parameter_counts_equal_the_hand_formula_with_gqa_biases_and_an_untied_or_tied_head(tmp_path):
    q, kv = HEADS * (H // HEADS), KV_HEADS * (H // HEADS)
    attention = H * q + 2 * H * kv + q * H  # q, k, v, o projections
    layer = attention + 3 * H * INTER + 2 * H  # gated MLP (gate, up, down), two RMSNorms
    qwen2, _ = model_arch(ModelSpec(path=str(write_config(tmp_path / "qwen2"))), "policy", [])
    assert qwen2.params == 2 * V * H + LAYERS * (layer + q + 2 * kv) + H  # Qwen2: q/k/v biases; untied lm_head
    llama, _ = model_arch(ModelSpec(path=str(write_config(tmp_path / "llama", "llama", tied=True))), "policy", [])
    assert llama.params == V * H + LAYERS * layer + H  # the tied lm_head is the embeddings, counted once
    assert (llama.layer, llama.root, llama.q, llama.kv) == (layer, V * H + H, q, kv)


def test_sharding_divides_the_policy_by_the_world_size_and_frozen_roles_only_when_sharded(tmp_path):
    fsdp2 = {"class_path": "wspo_lightning.strategies.FSDP2Strategy", "init_args": {"frozen_roles": "replicate"}}
    config = fit_config(tmp_path, {}, strategy=fsdp2)
    one, four = per_rank(config), per_rank(config, "--trainer.devices", "4")
    for key in ("parameters", "gradients", "optimizer"):
        assert four[key] == pytest.approx(one[key] / 4)
    assert four["frozen"] == one["frozen"] and four["activations"] == one["activations"]
    sharded = per_rank(config, "--trainer.devices", "4", "--trainer.strategy.init_args.frozen_roles", "shard")
    assert sharded["frozen"] == pytest.approx(one["frozen"] / 4)
    offloaded = per_rank(config, "--trainer.devices", "4", "--trainer.strategy.init_args.frozen_roles", "offload")
    assert offloaded["frozen"] == 0 and offloaded["host"] == pytest.approx(one["frozen"] / 4)
    plain = fit_config(tmp_path / "plain", {})  # no strategy: a strategy file composed over it, as with fit
    composed = plan(["--config", str(plain), "--config", str(ROOT / "configs/strategies/fsdp2.yaml")])
    assert composed["strategy"].startswith("FSDP2") and composed["per_rank_bytes"] == one
    ddp = per_rank(config, "--trainer.devices", "4", "--trainer.strategy", "ddp")
    assert ddp["parameters"] == one["parameters"] and ddp["gradients"] == 2 * one["gradients"]  # + DDP's buckets


def test_the_reference_copy_of_the_policy_is_frozen_memory_and_a_cached_one_is_not(tmp_path):
    config = fit_config(tmp_path, {})
    arch, _ = model_arch(ModelSpec(path=str(tmp_path / "policy")), "policy", [])
    weak, _ = model_arch(ModelSpec(path=str(tmp_path / "weak_base")), "weak_base", [])
    out = per_rank(config)
    assert out["parameters"] == out["gradients"] == out["optimizer"] / 2 == arch.params * 4  # float32 AdamW
    assert out["frozen"] == arch.params * 4 + 2 * weak.params * 4  # reference copy and the weak pair
    assert per_rank(config, "--model.init_args.cache_dir", str(tmp_path / "cache"))["frozen"] == 0


def test_lora_trains_only_the_adapters_and_needs_no_reference_copy(tmp_path):
    lora = {"r": 4, "target_modules": "all-linear"}
    config = fit_config(tmp_path, {"policy": {"dtype": "bfloat16", "lora": lora}})
    arch, _ = model_arch(ModelSpec(path=str(tmp_path / "policy")), "policy", [])
    q, kv = HEADS * (H // HEADS), KV_HEADS * (H // HEADS)
    per_layer = (H + q) + 2 * (H + kv) + (q + H) + 2 * (H + INTER) + (INTER + H)  # in + out of each linear
    adapters = LAYERS * 4 * per_layer  # r = 4
    out = per_rank(config)
    assert out["gradients"] == adapters * 4 and out["optimizer"] == adapters * 8  # float32 adapters, AdamW
    assert out["parameters"] == arch.params * 2 + adapters * 4  # the bf16 base and the adapters
    weak, _ = model_arch(ModelSpec(path=str(tmp_path / "weak_base")), "weak_base", [])
    assert out["frozen"] == 2 * weak.params * 4  # the weak pair only: the reference is the base, adapters off
    targeted = per_rank(config, "--model.init_args.policy.lora.target_modules", "[q_proj, v_proj]")
    assert targeted["gradients"] == LAYERS * 4 * ((H + q) + (H + kv)) * 4


def test_quantized_frozen_roles_count_at_their_byte_sizes_and_stay_whole_when_others_shard(tmp_path):
    model = {
        role: {"path": str(write_config(tmp_path / role, "llama", tied=True)), "dtype": "bfloat16", "quantization": q}
        for role, q in (("weak_base", "4bit"), ("weak_aligned", "8bit"))
    }
    fsdp2 = {"class_path": "wspo_lightning.strategies.FSDP2Strategy", "init_args": {"frozen_roles": "shard"}}
    config = fit_config(tmp_path, model, strategy=fsdp2, devices=2)
    arch, _ = model_arch(ModelSpec(path=str(tmp_path / "weak_base")), "weak_base", [])
    linear = LAYERS * (H * H + 2 * H * (KV_HEADS * H // HEADS) + H * H + 3 * H * INTER)  # every linear but the lm_head
    rows = LAYERS * (H + 2 * (KV_HEADS * H // HEADS) + H + 2 * INTER + H)  # their output rows: 8-bit scales
    nf4 = linear * NF4_BYTES + (arch.params - linear) * 2
    int8 = linear + 4 * rows + (arch.params - linear) * 2
    policy, _ = model_arch(ModelSpec(path=str(tmp_path / "policy")), "policy", [])
    assert per_rank(config)["frozen"] == pytest.approx(nf4 + int8 + policy.params * 4 / 2)  # reference copy sharded


def test_json_prints_the_per_rank_bytes_and_their_total(tmp_path, capsys):
    assert wspo(["plan", "--config", str(fit_config(tmp_path, {})), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)["per_rank_bytes"]
    assert set(KEYS) | {"total"} <= set(out) and out["total"] == pytest.approx(sum(out[k] for k in KEYS))
    assert wspo(["plan", "--config", str(tmp_path / "fit.yaml")]) == 0
    assert "total" in capsys.readouterr().out


def test_a_missing_model_path_is_one_line_naming_the_key(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    for path, says in ((str(tmp_path / "nowhere"), "does not exist"), ("someone/unknown-model", "hf download")):
        config = fit_config(tmp_path, {"policy": {"path": path}})
        assert wspo(["plan", "--config", str(config)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "model.init_args.policy.path" in err and says in err


def test_a_weak_aligned_model_not_trained_yet_is_planned_as_its_weak_base(tmp_path):
    config = fit_config(tmp_path, {"weak_aligned": {"path": str(tmp_path / "runs" / "not_yet")}})
    result = plan(["--config", str(config)])
    assert any("weak_aligned" in note for note in result["notes"])


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_every_shipped_recipe_plans_offline(recipe, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    out = per_rank(recipe, "--trainer.devices", "8")
    assert all(out[key] >= 0 for key in KEYS) and 1 * 2**30 < out["total"] < 80 * 2**30


def weight_copy(t: torch.Tensor) -> bool:
    """Whether `t` is a weight cast by autocast (counted as `working` memory, not activations)."""
    fn = t.grad_fn
    while fn is not None and type(fn).__name__ in ("TBackward0", "ToCopyBackward0"):
        fn = fn.next_functions[0][0]
    return t.grad_fn is not None and type(fn).__name__ == "AccumulateGrad"


@pytest.mark.parametrize(
    "dtype, autocast, attention, padded",
    [
        (torch.float32, False, "sdpa", False),
        (torch.float32, False, "sdpa", True),
        (torch.bfloat16, False, "sdpa", False),
        (torch.float32, True, "sdpa", True),
        (torch.float32, False, "eager", False),
    ],
)
def test_layer_bytes_are_what_autograd_saves_in_a_llama_decoder_layer(tmp_path, dtype, autocast, attention, padded):
    """The formula against the tensors autograd keeps for backward, counted by storage: a model of 2 decoder layers
    minus one of 1 (embeddings and the final norm cancel out), per token."""
    rows, T = 2, 32
    saved = []
    for layers in (1, 2):
        config = LlamaConfig(
            vocab_size=V, hidden_size=H, intermediate_size=INTER, num_hidden_layers=layers, num_attention_heads=HEADS,
            num_key_value_heads=KV_HEADS, attn_implementation=attention,
        )  # fmt: skip
        model = LlamaForCausalLM(config).to(dtype).train()
        ids, mask = torch.randint(0, V, (rows, T)), torch.ones(rows, T, dtype=torch.long)
        mask[0, T // 2 :] = 0 if padded else 1
        weights, storages = {p.untyped_storage().data_ptr() for p in model.parameters()}, {}

        def pack(t, weights=weights, storages=storages):
            if t.untyped_storage().data_ptr() not in weights and not weight_copy(t):
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                model.model(input_ids=ids, attention_mask=mask)
        saved.append(sum(storages.values()))
    write_config(tmp_path, "llama")
    arch, _ = model_arch(ModelSpec(path=str(tmp_path)), "policy", [])
    e, s = (2, 4) if autocast else (dtype.itemsize, dtype.itemsize)
    formula = layer_bytes(arch, e, s, T, attention == "eager", padded)
    measured = (saved[1] - saved[0]) / (rows * T)
    assert measured == pytest.approx(formula, rel=0.01)
