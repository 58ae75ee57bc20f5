"""Sampling at scale: `wspo sample` and `wspo generate` read the prompts of any format the data module reads (a
dataset folder in the Hub's layout with a split, a conversation column), and under torchrun each rank decodes
its share of the prompts and rank 0 merges the parts in prompt order: the same file as one process."""

from __future__ import annotations

import json

import pytest
from helpers import launch, torchrun

from wspo_lightning.cli import main as wspo
from wspo_lightning.data.records import load_prompts
from wspo_lightning.errors import InputError
from wspo_lightning.tiny import ultrafeedback_rows, write_hub_layout


@pytest.fixture(scope="module")
def hub_prompts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prompts") / "uf"
    return write_hub_layout(folder, {"train_prefs": ultrafeedback_rows(3), "test_prefs": ultrafeedback_rows(7, 1)})


def rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_prompts_come_from_a_split_and_a_conversation_column_without_its_answer(hub_prompts):
    source = ultrafeedback_rows(7, 1)
    prompts = load_prompts(hub_prompts, "test_prefs", "messages")
    assert [p["prompt"] for p in prompts] == [r["messages"][:-1] for r in source]  # the assistant turn dropped
    assert [p["id"] for p in prompts] == [r["prompt_id"] for r in source]
    assert [p["prompt"] for p in load_prompts(hub_prompts, "test_prefs")] == [r["prompt"] for r in source]
    with pytest.raises(InputError, match=r"\[test_prefs\]:record 0: field 'question': missing"):
        load_prompts(hub_prompts, "test_prefs", "question")


def test_two_torchrun_ranks_write_what_one_process_writes(tiny_world, hub_prompts, tmp_path):
    common = ["--model.path", str(tiny_world / "policy"), "--prompts", str(hub_prompts), "--split", "test_prefs"]
    common += ["--prompt_column", "messages", "--num_samples", "2", "--max_new_tokens", "6", "--batch_size", "3"]
    common += ["--seed", "5", "--device", "cpu"]
    assert wspo(["sample", *common, "--out", str(tmp_path / "one.jsonl")]) == 0
    said = launch(torchrun("sample", *common, "--out", str(tmp_path / "two.jsonl")))
    assert "4 of 7 prompts" in said and "3 of 7 prompts" in said  # each rank decoded its share
    one, two = rows(tmp_path / "one.jsonl"), rows(tmp_path / "two.jsonl")
    assert len(one) == 14 and [r["id"] for r in one] == [r["id"] for r in two]
    for a, b in zip(one, two):
        assert (a["prompt"], a["sample"], a["response_ids"], a["finished"]) == (
            b["prompt"],
            b["sample"],
            b["response_ids"],
            b["finished"],
        )
        assert a["logp"] == pytest.approx(b["logp"], abs=1e-5)  # kernels round batches of other shapes apart
    assert not list(tmp_path.glob(".two.jsonl.part-*"))  # the parts are merged away
