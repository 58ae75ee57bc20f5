"""Gold rewards: a reward model (any AutoModelForSequenceClassification) scored in padded batches equals its
own forward on each rendering alone; every way of naming a reward builds the same thing."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from helpers import LetterReward
from transformers import LlamaForSequenceClassification

from wspo_lightning.cli import main as wspo
from wspo_lightning.errors import InputError
from wspo_lightning.io import read_jsonl, write_jsonl
from wspo_lightning.rewards import RewardModel, load_reward
from wspo_lightning.tiny import build_tiny_model, build_tokenizer

PROMPTS = ["Write one line about the plot.", "Say it.", [{"role": "user", "content": "The ending?"}]] * 2
RESPONSES = ["The plot was wonderful from start to finish.", "Dull.", "It left me smiling", "ok", "The", "Fine."]


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    """A tiny random Llama reward model (one output) whose config's pad id is the last token of every ChatML
    rendering: the worst case for pooling at the last non-pad token."""
    tokenizer = build_tokenizer()
    last = tokenizer("\n", add_special_tokens=False).input_ids[-1]
    config = build_tiny_model("llama", tokenizer).config  # the tiny Llama's shape, with a one-output head
    config.num_labels, config.pad_token_id = 1, last
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config).eval()
    folder = tmp_path_factory.mktemp("rm")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model, tokenizer


def _by_hand(model, tokenizer, prompt, response) -> float:
    """The head on the backbone's last hidden state of the rendering, one sequence, no padding."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False).input_ids])
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state[0, -1]  # [H]
        return float(model.score(hidden)[0])


@pytest.mark.parametrize("batch_size", [1, 4, 6])
def test_reward_model_scores_equal_a_plain_forward_whatever_the_padding(reward_model, batch_size):
    folder, model, tokenizer = reward_model
    expected = [_by_hand(model, tokenizer, p, r) for p, r in zip(PROMPTS, RESPONSES)]
    got = RewardModel(str(folder), batch_size=batch_size, device="cpu")(PROMPTS, RESPONSES)
    assert got == pytest.approx(expected, abs=1e-5)
    assert len(set(round(v, 4) for v in got)) > 3  # the responses score differently


def test_naive_padded_pooling_would_pick_the_wrong_token(reward_model):
    # Why RewardModel pads with an id no row holds: HF pools at the rightmost token that is not the config's pad.
    folder, model, tokenizer = reward_model
    rows = [RewardModel(str(folder), device="cpu").render(p, r) for p, r in zip(PROMPTS[:2], RESPONSES[:2])]
    width = max(map(len, rows))
    pad = model.config.pad_token_id
    ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows])
    with torch.no_grad():
        naive = model(input_ids=ids, attention_mask=(torch.arange(width) < torch.tensor([[len(r)] for r in rows])))
    expected = [_by_hand(model, tokenizer, p, r) for p, r in zip(PROMPTS[:2], RESPONSES[:2])]
    assert naive.logits[:, 0].tolist() != pytest.approx(expected, abs=1e-3)


def test_every_way_of_naming_a_reward(reward_model):
    folder = str(reward_model[0])
    block = {"class_path": "wspo_lightning.rewards.RewardModel", "init_args": {"path": folder, "batch_size": 2}}
    for named in (block, json.dumps(block), yaml.safe_dump(block, default_flow_style=True)):
        built = load_reward(named)
        assert isinstance(built, RewardModel) and built.batch_size == 2
    assert isinstance(load_reward(f"rm:{folder}"), RewardModel)
    assert isinstance(load_reward("helpers.LetterReward"), LetterReward)
    assert isinstance(load_reward({"class_path": "helpers:LetterReward"}), LetterReward)
    with pytest.raises(InputError, match="wrong arguments for RewardModel"):
        load_reward({"class_path": "wspo_lightning.rewards.RewardModel", "init_args": {"pth": folder}})
    with pytest.raises(InputError, match="reward.path: .*does not exist"):
        load_reward("rm:/no/such/reward_model")


def test_wspo_score_takes_a_reward_model_by_flag_and_by_config_block(reward_model, tmp_path):
    folder, model, tokenizer = reward_model
    samples = write_jsonl(
        tmp_path / "samples.jsonl", [{"prompt": p, "response": r} for p, r in zip(PROMPTS[:2], RESPONSES[:2])]
    )
    expected = [_by_hand(model, tokenizer, p, r) for p, r in zip(PROMPTS[:2], RESPONSES[:2])]
    assert (
        wspo(["score", "--samples", str(samples), "--out", str(tmp_path / "a.jsonl"), "--reward", f"rm:{folder}"]) == 0
    )
    config = tmp_path / "score.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "samples": str(samples),
                "out": str(tmp_path / "b.jsonl"),
                "reward": {"class_path": "wspo_lightning.rewards.RewardModel", "init_args": {"path": str(folder)}},
            }
        )
    )
    assert wspo(["score", "--config", str(config)]) == 0
    for out in ("a.jsonl", "b.jsonl"):
        assert [r["reward"] for r in read_jsonl(tmp_path / out)] == pytest.approx(expected, abs=1e-5)


def test_demo_reward_option_reaches_the_stages(reward_model, monkeypatch):
    from wspo_lightning.demo import command

    seen = []
    monkeypatch.setattr(command, "run_demo", lambda *args: seen.append(args[5]))
    folder = str(reward_model[0])
    block = json.dumps({"class_path": "wspo_lightning.rewards.RewardModel", "init_args": {"path": folder}})
    for given in (f"rm:{folder}", block):
        assert command.main(["--reward", given]) == 0
        assert isinstance(load_reward(seen[-1]), RewardModel)
