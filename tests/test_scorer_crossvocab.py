"""Decoding-time weak scores with a weak pair of another tokenizer equal training's weak side on the same response:
best-of-N's draws (`Decoder.draw`) and chunk-level beam search score a response by the weak pair's log-ratio on its
own rendering of the response text, as training renders a record of that response (docs/cross-tokenizer.md): the
text stripped of surrounding whitespace as `wspo generate` writes it, the weak end-of-turn when it ended."""

from __future__ import annotations

import pytest
import torch

from wspo_lightning.data import PreferenceDataModule
from wspo_lightning.decoding import chunk_beam_search
from wspo_lightning.decoding.command import GenerateConfig
from wspo_lightning.decoding.runner import Decoder
from wspo_lightning.frozen import FrozenRoles
from wspo_lightning.models import ModelSpec, load_tokenizer
from wspo_lightning.tiny import (
    build_tiny_model,
    build_tokenizer,
    preference_records,
    write_jsonl,
    write_tiny_model,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["Write one line about the film.", "Hi", "Tell me about the plot of this movie, please."]
# a byte-level BPE pair with ChatML (its template keeps the message as given), and a SentencePiece style Unigram
# pair without a template (Llama 2 base style): neither trims the text, so surrounding whitespace reaches them
WEAK_FAMILIES = {
    "chatml_bpe": ("gpt2", dict(vocab_size=400)),
    "sentencepiece": ("llama", dict(shape="plain", model="unigram")),
}


@pytest.fixture(scope="module")
def strong(tiny_world, tmp_path_factory):
    """A tiny GPT-2 on the tiny world's tokenizer whose every next-token distribution favours two tokens, the
    end-of-turn <|im_end|> and the space "Ġ" (logit 4 each, about 1/8 of the mass each, the rest spread over the
    vocabulary), whatever the input: responses that end and responses cut by the length limit, many of them with a
    space at an edge. `helpers.write_turn_ender` with a second favoured token."""
    tokenizer = load_tokenizer(str(tiny_world / "policy"))
    model = build_tiny_model("gpt2", tokenizer, seed=0, hidden_size=64)
    favoured = model.transformer.wte.weight.data[tokenizer.convert_tokens_to_ids(["<|im_end|>", "Ġ"])]  # [2, hidden]
    logits = torch.tensor([4.0, 4.0])
    with torch.no_grad():  # ln_f's output becomes a constant h with favoured @ h = logits; the tied lm_head reads it
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(torch.linalg.solve(favoured @ favoured.T, logits) @ favoured)
    out = tmp_path_factory.mktemp("strong")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=list(WEAK_FAMILIES))
def weak(request, tmp_path_factory):
    """A weak pair of another tokenizer family (folder with weak_base/ and weak_aligned/)."""
    folder = tmp_path_factory.mktemp(f"weak_{request.param}")
    arch, shape = WEAK_FAMILIES[request.param]
    tokenizer = build_tokenizer(**shape)
    for seed, role in ((1, "weak_base"), (2, "weak_aligned")):
        write_tiny_model(folder / role, arch, seed=seed, num_layers=1, hidden_size=32, tokenizer=tokenizer)
    return folder


def training_weak_rewards(strong, weak, tmp_path, prompts, responses, token_ids, finished) -> list[float]:
    """Training's weak reward of each response: the data module renders a record of it (its text, its strong ids
    as drawn) and the weak pair's own side of it (`batch_of`, as the sample table does); the weak log-ratios
    mapped onto the strong model's tokens (`FrozenRoles.step_delta_weak`) are summed over the response."""
    data = write_jsonl(tmp_path / "train.jsonl", preference_records(8, seed=5))
    datamodule = PreferenceDataModule(str(data), str(strong), val_fraction=0.25, batch_size=2)
    datamodule.setup("fit")
    datamodule.use_weak_tokenizer(load_tokenizer(str(weak / "weak_base")), name="weak pair")
    batch = datamodule.batch_of(list(prompts), list(responses), [list(ids) for ids in token_ids], list(finished))
    frozen = FrozenRoles()
    frozen.load({role: ModelSpec(str(weak / role)) for role in ("weak_base", "weak_aligned")})
    rows = batch["chosen_input_ids"], batch["chosen_attention_mask"], batch["chosen_labels"]
    return frozen.step_delta_weak(batch, ["chosen"], rows).sum(dim=1).tolist()


@pytest.fixture
def decoder(strong, weak):
    config = GenerateConfig(
        strong=ModelSpec(str(strong)),
        weak_base=ModelSpec(str(weak / "weak_base")),
        weak_aligned=ModelSpec(str(weak / "weak_aligned")),
        prompts="unused.jsonl",
        method="bon",
        max_new_tokens=10,
        seed=3,
    )
    return Decoder(config, torch.device("cpu"))


def covers_both_cases(tokenizer, token_ids, finished) -> None:
    """The responses exercise what the rendering must get right: text with surrounding whitespace as drawn,
    responses that ended (weak end-of-turn) and responses that were cut."""
    drawn = tokenizer.batch_decode(token_ids, skip_special_tokens=True)
    assert any(text != text.strip() for text in drawn), drawn
    assert any(finished) and not all(finished)


def test_best_of_n_scores_each_draw_as_training_scores_its_weak_side(strong, weak, decoder, tmp_path):
    generations = decoder.draw(PROMPTS, 4)  # rows prompt * 4 + i, each with its weak score
    assert not decoder.shared_vocab
    prompts = [p for p in PROMPTS for _ in range(4)]
    token_ids, finished = [g.token_ids for g in generations], [g.finished for g in generations]
    covers_both_cases(decoder.tokenizer, token_ids, finished)
    expected = training_weak_rewards(
        strong, weak, tmp_path, prompts, [g.response for g in generations], token_ids, finished
    )
    assert [g.score for g in generations] == pytest.approx(expected, abs=2e-4)


def test_chunk_beam_search_scores_its_result_as_training_scores_its_weak_side(strong, weak, decoder, tmp_path):
    scorer = decoder.scorer
    results = []
    for seed in range(6):  # a few searches, for responses that ended and responses that were cut
        results += chunk_beam_search(
            decoder.strong,
            decoder.renderer,
            scorer.weak_aligned,
            scorer.weak_base,
            scorer.renderer,
            PROMPTS,
            beam_width=2,
            num_continuations=2,
            chunk_length=3,
            max_new_tokens=9,
            seed=seed,
        )
    token_ids, finished = [r.token_ids for r in results], [r.finished for r in results]
    covers_both_cases(decoder.tokenizer, token_ids, finished)
    expected = training_weak_rewards(
        strong, weak, tmp_path, [r.prompt for r in results], [r.response for r in results], token_ids, finished
    )
    assert [r.score for r in results] == pytest.approx(expected, abs=2e-4)
