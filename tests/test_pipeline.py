"""The reusable stages one by one: pairs, statistics, sampling log-probs, skip/force, distillation, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import LetterReward, write_turn_ender

from wspo_lightning.cli import main as wspo_main
from wspo_lightning.errors import InputError
from wspo_lightning.io import read_jsonl, write_jsonl
from wspo_lightning.models import ModelSpec, load_model, load_tokenizer
from wspo_lightning.pipeline.distill import distill, truncate
from wspo_lightning.pipeline.evaluate import bootstrap_ci, distinct_n, paired_difference, reference_logps, top_word
from wspo_lightning.pipeline.pairs import make_pairs, pairs
from wspo_lightning.pipeline.sample import sample
from wspo_lightning.pipeline.score import score
from wspo_lightning.render import Renderer
from wspo_lightning.tiny import build_tiny_model, build_tokenizer, write_tiny_model


@pytest.fixture(scope="module")
def tiny_strong(tmp_path_factory) -> Path:
    return write_tiny_model(
        tmp_path_factory.mktemp("strong") / "strong", "llama", num_layers=2, hidden_size=32, tokenizer=build_tokenizer()
    )


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    records = [{"id": f"p{i}", "prompt": f"Write one line about film number {i}."} for i in range(6)]
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", records)


def test_pairs_take_best_and_worst_response_per_prompt_and_drop_ties():
    records = [
        {"id": "a", "prompt": "pa", "response": "low", "reward": -0.5},
        {"id": "a", "prompt": "pa", "response": "high", "reward": 0.9},
        {"id": "a", "prompt": "pa", "response": "mid", "reward": 0.1},
        {"id": "b", "prompt": "pb", "response": "x", "reward": 0.3},
        {"id": "b", "prompt": "pb", "response": "y", "reward": 0.3},  # tie: no pair
    ]
    result = make_pairs(records)
    assert result == [
        {
            "id": "a",
            "prompt": "pa",
            "chosen": "high",
            "rejected": "low",
            "chosen_reward": 0.9,
            "rejected_reward": -0.5,
            "chosen_finished": True,
            "rejected_finished": True,
        }
    ]


def test_pairs_stage_explains_when_every_prompt_is_a_tie(tmp_path):
    scored = write_jsonl(tmp_path / "s.jsonl", [{"id": "a", "prompt": "p", "response": "r", "reward": 0.0}])
    with pytest.raises(InputError, match="num_samples >= 2"):
        pairs(str(scored), str(tmp_path / "pairs.jsonl"))


def test_bootstrap_ci_resamples_prompts_not_samples():
    # Two prompts, each answered identically twice: the prompt means are 0 and 1.
    by_prompt = [np.array([0.0, 0.0]), np.array([1.0, 1.0])]
    low, high = bootstrap_ci(by_prompt, n_boot=4000, seed=0)
    assert low == 0.0 and high == 1.0  # resamples of 2 prompts: means 0, 0.5 or 1
    assert bootstrap_ci([np.array([0.3, 0.3, 0.3])] * 5) == pytest.approx((0.3, 0.3))


def test_paired_difference_is_the_mean_per_prompt_gap():
    a = [{"id": "1", "reward": 0.5}, {"id": "1", "reward": 0.7}, {"id": "2", "reward": 0.0}]
    b = [{"id": "1", "reward": 0.1}, {"id": "2", "reward": -0.2}, {"id": "3", "reward": 9.0}]  # id 3 unpaired
    diff, (low, high) = paired_difference(a, b, n_boot=2000)
    # prompt 1: 0.6 - 0.1 = 0.5; prompt 2: 0.0 - (-0.2) = 0.2; mean 0.35
    assert diff == pytest.approx(0.35)
    assert 0.2 - 1e-9 <= low <= diff <= high <= 0.5 + 1e-9


def test_distinct_n_and_top_word_show_repetition():
    texts = ["great great movie", "great fun"]
    # unigrams: great x3, movie, fun -> 3 distinct of 5; bigrams: (great great), (great movie), (great fun) -> 3/3
    assert distinct_n(texts, 1) == pytest.approx(3 / 5)
    assert distinct_n(texts, 2) == pytest.approx(1.0)
    assert top_word(texts) == ("great", 1.0)


def test_sampled_logp_matches_a_forward_pass_so_kl_of_a_model_to_itself_is_zero(tiny_strong, prompts, tmp_path):
    out = sample(
        ModelSpec(str(tiny_strong)),
        str(prompts),
        str(tmp_path / "s.jsonl"),
        num_samples=2,
        max_new_tokens=6,
        batch_size=5,
    )
    records = read_jsonl(out)
    assert len(records) == 12 and {r["sample"] for r in records} == {0, 1}
    assert all(1 <= r["num_tokens"] <= 6 and len(r["response_ids"]) == r["num_tokens"] for r in records)
    model = load_model(ModelSpec(str(tiny_strong)))
    forward = reference_logps(model, Renderer(load_tokenizer(ModelSpec(str(tiny_strong)))), records)
    np.testing.assert_allclose([r["logp"] for r in records], forward, atol=1e-3)


def test_stages_skip_existing_outputs_and_force_redoes_them(tiny_strong, prompts, tmp_path):
    spec = ModelSpec(str(tiny_strong))
    out = sample(spec, str(prompts), str(tmp_path / "s.jsonl"), max_new_tokens=4, seed=0)
    first = out.read_text()
    sample(spec, str(prompts), str(out), max_new_tokens=4, seed=123)  # skipped: output exists
    assert out.read_text() == first
    sample(spec, str(prompts), str(out), max_new_tokens=4, seed=123, force=True)
    assert out.read_text() != first
    scored = score(str(out), str(tmp_path / "scored.jsonl"), reward=LetterReward())
    assert all("reward" in r for r in read_jsonl(scored))
    assert not list(tmp_path.glob(".*partial"))  # outputs are renamed into place only when complete


def test_atomic_path_replaces_a_folder_whole_or_not_at_all(tmp_path):
    from wspo_lightning.io import atomic_path

    out = tmp_path / "export"
    out.mkdir()
    (out / "old.safetensors").write_text("old")
    with pytest.raises(RuntimeError), atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "model.safetensors").write_text("half")
        raise RuntimeError("killed mid-write")
    assert [p.name for p in out.iterdir()] == ["old.safetensors"]  # the failed write left it alone
    with atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "model.safetensors").write_text("new")
    assert [p.name for p in out.iterdir()] == ["model.safetensors"]  # no file of the old folder survives
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # neither the partial nor the old folder is left


def test_distilled_student_keeps_the_first_layers_and_the_tokenizer(tiny_strong, prompts, tmp_path):
    samples = sample(ModelSpec(str(tiny_strong)), str(prompts), str(tmp_path / "s.jsonl"), max_new_tokens=6)
    student = distill(
        ModelSpec(str(tiny_strong)),
        str(samples),
        str(tmp_path / "student"),
        layers=1,
        top_k=8,
        epochs=1,
        batch_size=3,
        precision="32-true",
        log_dir=str(tmp_path / "log"),
    )
    config = json.loads((student / "config.json").read_text())
    assert config["num_hidden_layers"] == 1
    assert (student / "tokenizer.json").read_text() == (tiny_strong / "tokenizer.json").read_text()
    teacher = load_model(ModelSpec(str(tiny_strong)))
    small = load_model(ModelSpec(str(student)))
    torch.testing.assert_close(small.get_input_embeddings().weight, teacher.get_input_embeddings().weight)  # frozen
    assert "train/loss" in (tmp_path / "log" / "logs" / "metrics.csv").read_text()


def test_truncate_keeps_the_listed_layers_renumbered(tiny_strong):
    model = load_model(ModelSpec(str(tiny_strong)))
    last = model.model.layers[1]
    truncate(model, [1])
    assert list(model.model.layers) == [last] and last.self_attn.layer_idx == 0
    assert model.config.num_hidden_layers == 1
    with pytest.raises(InputError, match="layers must pick"):
        truncate(load_model(ModelSpec(str(tiny_strong))), 5)


def test_truncate_cuts_the_block_stack_wherever_the_architecture_keeps_it():
    from torch import nn
    from transformers import AutoModelForCausalLM, OPTConfig

    gpt2 = build_tiny_model("gpt2", build_tokenizer(), num_layers=3)
    opt = AutoModelForCausalLM.from_config(
        OPTConfig(vocab_size=64, hidden_size=16, ffn_dim=32, num_hidden_layers=3, num_attention_heads=2)
    )
    for model, stack in ((gpt2, gpt2.transformer.h), (opt, opt.model.decoder.layers)):
        last = stack[2]
        truncate(model, [0, 2])
        assert len(stack) == 2 and stack[1] is last and model.config.num_hidden_layers == 2
    with pytest.raises(InputError, match="cannot find the decoder layers of Sequential"):
        truncate(nn.Sequential(nn.Linear(2, 2)), 1)


def test_stage_commands_parse_flags_through_wspo(tiny_strong, prompts, tmp_path):
    out = tmp_path / "s.jsonl"
    assert (
        wspo_main(
            [
                "sample",
                "--model.path",
                str(tiny_strong),
                "--prompts",
                str(prompts),
                "--out",
                str(out),
                "--num_samples",
                "2",
                "--max_new_tokens",
                "3",
            ]
        )
        == 0
    )
    # a reward given by import path; VADER scores any text
    assert wspo_main(["score", "--samples", str(out), "--out", str(tmp_path / "sc.jsonl")]) == 0
    assert all(-1 <= r["reward"] <= 1 for r in read_jsonl(tmp_path / "sc.jsonl"))
    assert (
        wspo_main(
            [
                "sample",
                "--model.path",
                str(tmp_path / "missing"),
                "--prompts",
                str(prompts),
                "--out",
                str(tmp_path / "x.jsonl"),
            ]
        )
        == 2
    )


@torch.no_grad()
def test_loaded_models_feed_the_lm_head_a_contiguous_slice_with_unchanged_logits(tiny_strong):
    """`load_model` copies the kept hidden states before the lm_head (the strided slice is a slow path
    on CPU, see benchmarks/lm_head_slice.py); the logits equal those of a plain from_pretrained model."""
    from transformers import AutoModelForCausalLM

    ours = load_model(ModelSpec(str(tiny_strong), dtype="bfloat16"))
    plain = AutoModelForCausalLM.from_pretrained(str(tiny_strong), dtype=torch.bfloat16).eval()
    seen = []
    for model in (ours, plain):
        model.get_output_embeddings().register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    ids = torch.randint(3, 200, (3, 11), generator=torch.Generator().manual_seed(0))
    got, want = (m(input_ids=ids, logits_to_keep=4).logits for m in (ours, plain))
    assert seen == [True, False]  # without the copy, transformers hands the lm_head a strided slice
    assert torch.equal(got, want)


def test_turn_ends_travel_from_sampling_through_pairs_to_training_and_distillation(prompts, tmp_path):
    """With a Qwen2-base-shaped tokenizer (turns end with <|im_end|>, eos is <|endoftext|>): sampling stops at
    <|im_end|>; a finished sample keeps it, a sample cut by the length limit has none, and both arrive as drawn
    in the pairs, in what the data module trains on and in what distillation trains on."""
    from wspo_lightning.data import PreferenceDataModule
    from wspo_lightning.pipeline.distill import _examples

    tokenizer = build_tokenizer(shape="qwen2_base")
    ender = write_turn_ender(tmp_path / "ender", tokenizer, "<|im_end|>", logit=5.0)  # ends 1 step in 3
    end_of_turn, eos = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    samples = read_jsonl(
        sample(ModelSpec(str(ender)), str(prompts), str(tmp_path / "s.jsonl"), num_samples=4, max_new_tokens=4, seed=0)
    )
    finished = [r for r in samples if r["finished"]]
    cut = [r for r in samples if not r["finished"]]
    assert finished and cut  # both kinds, to test both
    assert all(r["response_ids"][-1] == end_of_turn and r["response_ids"].count(end_of_turn) == 1 for r in finished)
    assert all(len(r["response_ids"]) == 4 and {end_of_turn, eos}.isdisjoint(r["response_ids"]) for r in cut)

    scored = score(str(tmp_path / "s.jsonl"), str(tmp_path / "scored.jsonl"), reward=LetterReward())
    made = read_jsonl(pairs(str(scored), str(tmp_path / "pairs.jsonl")))
    drawn = {(r["id"], r["response"]): r for r in samples}
    for pair in made:
        for side in ("chosen", "rejected"):
            source = drawn[(pair["id"], pair[side])]
            assert pair[f"{side}_ids"] == source["response_ids"] and pair[f"{side}_finished"] == source["finished"]

    dm = PreferenceDataModule(str(tmp_path / "pairs.jsonl"), str(ender), val_fraction=0, batch_size=1)
    dm.setup("fit")
    for pair, feature in zip(made, dm.features["train"]):
        for side in ("chosen", "rejected"):
            assert feature[f"{side}_ids"] == pair[f"{side}_ids"]
            assert (feature[f"{side}_ids"][-1] == end_of_turn) == pair[f"{side}_finished"]

    trained = _examples(Renderer(tokenizer), samples, "s.jsonl", max_length=256)
    for record, example in zip(samples, trained):
        labels = example["labels"][example["labels"] != -100].tolist()
        assert labels == record["response_ids"]
