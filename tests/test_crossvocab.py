"""Cross-tokenizer WSPO, the text side: where tokens sit in the response text, where each weak token's
log-ratio lands, the weak side of records, and the errors where the mapping cannot hold."""

from __future__ import annotations

import pytest
import torch
from tokenizers import normalizers

from wspo_lightning.crossvocab import decoded_spans, place, rendered_spans, to_policy_tokens
from wspo_lightning.data import PreferenceDataModule
from wspo_lightning.errors import InputError
from wspo_lightning.logprobs import right_pad
from wspo_lightning.models import load_tokenizer
from wspo_lightning.render import Renderer
from wspo_lightning.tiny import build_tokenizer, preference_records, write_jsonl

# "Unhappy cats." split two ways, each ending with its end-of-turn (None: no span)
TEXT = "Unhappy cats."
POLICY = [(0, 2), (2, 7), (7, 12), (12, 13), None]  # Un | happy | " cats" | . | <eot>
WEAK = [(0, 1), (1, 4), (4, 7), (7, 9), (9, 13), None]  # U | nha | ppy | " c" | ats. | <eot>


def test_worked_example_each_weak_token_lands_on_the_policy_token_holding_its_last_character():
    # U ends in "Un"; nha and ppy end in "happy"; " c" ends in " cats"; "ats." ends at "."; eot -> eot
    assert place(POLICY, WEAK, TEXT, cut=False) == [0, 1, 1, 2, 3, 4]
    # cut after " cats": "ats." ends past it and the end-of-turn is gone, so both are dropped
    assert place(POLICY[:3], WEAK, TEXT, cut=True) == [0, 1, 1, 2]
    # the bytes of one character: tokens ending at the same character map one to one, then onto the last
    assert place([(0, 1), (0, 1)], [(0, 1), (0, 1)], "é", cut=False) == [0, 1]
    assert place([(0, 1)], [(0, 1), (0, 1)], "é", cut=False) == [0, 0]
    # a template that trims whitespace for the policy only: the weak pair's extra spaces land inside
    assert place([(1, 3), None], [(0, 1), (1, 3), (3, 4), None], " Hi ", cut=False) == [0, 0, 0, 1]


def test_worked_example_mapped_into_padded_batch_rows():
    """Two rows with other prompt lengths and padding: each policy token gets the sum of its weak tokens."""
    second_policy, second_weak = [(0, 3), (3, 6), None], [(0, 6), None]  # "abcdef": two tokens vs one
    maps = [place(POLICY, WEAK, TEXT, cut=False), place(second_policy, second_weak, "abcdef", cut=False)]
    assert maps[1] == [1, 2]
    weak_values = [[1.0, 2.0, 4.0, 8.0, 16.0, 32.0], [64.0, 128.0]]
    _, _, policy_labels = right_pad([[7, 7, 7], [7, 7]], [[1, 2, 3, 4, 5], [1, 2, 3]], 0)
    _, _, weak_labels = right_pad([[9], [9, 9, 9, 9]], [[1] * 6, [1] * 2], 0)
    # response_logps layouts: policy from column 2 (the first response position), weak from column 1
    policy_mask = policy_labels[:, 2:] != -100  # [2, 6]
    weak_mask = weak_labels[:, 1:] != -100  # [2, 6]
    values = torch.full(weak_mask.shape, 1000.0)  # what sits off the response must never land anywhere
    for row, row_values in enumerate(weak_values):
        values[row, weak_mask[row]] = torch.tensor(row_values)
    weak_map = torch.tensor([maps[0], maps[1] + [-1] * 4])
    mapped = to_policy_tokens(values, weak_labels, weak_map, policy_mask)
    expected = torch.tensor(
        [
            [0.0, 1.0, 2.0 + 4.0, 8.0, 16.0, 32.0],  # row 0's response starts at column 3 - 2
            [0.0, 64.0, 128.0, 0.0, 0.0, 0.0],  # row 1's at column 2 - 2; its first token gets nothing
        ]
    )
    torch.testing.assert_close(mapped, expected, rtol=0, atol=0)


@pytest.mark.parametrize("model", ["bpe", "unigram"])
@pytest.mark.parametrize("shape", ["chatml", "llama3", "plain"])
def test_spans_put_each_rendered_token_on_its_characters(shape, model):
    tokenizer = build_tokenizer(shape=shape, model=model)
    renderer = Renderer(tokenizer)
    text, prompt = " The film was wonderful! ", "Write a line."
    for finished in (True, False):
        ids, spans = rendered_spans(renderer, [prompt], [text], [finished], renderer.prompt_ids([prompt]))
        ids, spans = ids[0], spans[0]
        assert ids == renderer.response_ids([prompt], [text], finished)[0]
        assert (spans[-1] is None) == finished  # the end-of-turn has no characters
        for token, span in zip(ids, spans[: len(spans) - finished]):
            piece = tokenizer.decode([token])  # ASCII text: every token decodes to its own characters
            assert piece.replace("▁", " ").strip() == text[span[0] : span[1]].strip(), (token, span)
        spanned = [s for s in spans if s is not None]
        trimmed = shape == "llama3"  # its template trims the message content
        assert spanned[0][0] == (1 if trimmed else 0) and spanned[-1][1] == len(text) - trimmed
        assert all(a[1] <= b[0] for a, b in zip(spanned, spanned[1:]))


def test_sampled_ids_split_otherwise_are_placed_by_decoding():
    tokenizer = build_tokenizer()
    renderer = Renderer(tokenizer)
    text = "The café was fine."
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    canonical, offsets = encoded["input_ids"], encoded["offset_mapping"]
    first = canonical[0]
    assert tokenizer.convert_ids_to_tokens(first) == "The"
    split_the = tokenizer.convert_tokens_to_ids(["T", "h", "e"])  # another way to write "The"
    ids = split_the + canonical[1:] + [renderer.end_of_turn]
    spans = decoded_spans(renderer, ids, text, finished=True)
    expected = [(0, 1), (1, 2), (2, 3)] + [tuple(o) for o in offsets[1:]] + [None]
    # "é" is two byte tokens: the first alone decodes to no character yet, the second completes it
    accent = text.index("é")
    bytes_of_e = [i for i, o in enumerate(expected) if o == (accent, accent + 1)]
    assert len(bytes_of_e) == 2
    expected[bytes_of_e[0]] = (accent, accent)
    assert spans == expected

    with pytest.raises(InputError, match="does not hold the record's response text"):
        decoded_spans(renderer, ids, "Another text.", finished=True)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    records = preference_records(12, seed=3)
    records[4]["chosen"] = "What a film, I loved it!"
    return write_jsonl(tmp_path_factory.mktemp("crossdata") / "train.jsonl", records)


def datamodule(data_file, tiny_world, **kwargs) -> PreferenceDataModule:
    dm = PreferenceDataModule(
        str(data_file), str(tiny_world / "policy"), **{"val_fraction": 0.25, "batch_size": 2, **kwargs}
    )
    dm.setup("fit")
    return dm


def test_the_same_tokenizer_through_the_map_is_the_identity_even_when_truncated(data_file, tiny_world):
    dm = datamodule(data_file, tiny_world, max_length=24)
    dm.use_weak_tokenizer(load_tokenizer(str(tiny_world / "policy")), name="same")
    features = [f for split in ("train", "val") for f in dm.features[split]]
    assert any(f["truncated"] for f in features) and any(
        f["chosen_ids"][-1] != dm.renderer.end_of_turn for f in features
    )
    for f in features:
        assert f["weak_prompt_ids"] == f["prompt_ids"]
        for side in ("chosen", "rejected"):
            assert f[f"weak_{side}_ids"] == f[f"{side}_ids"]
            assert f[f"weak_{side}_map"] == list(range(len(f[f"{side}_ids"])))


def test_a_finished_response_maps_end_of_turn_to_end_of_turn(data_file, tiny_world):
    dm = datamodule(data_file, tiny_world)
    dm.use_weak_tokenizer(build_tokenizer(shape="llama3", vocab_size=400), name="llama3")
    for f in dm.features["train"]:
        assert f["chosen_ids"][-1] == dm.renderer.end_of_turn
        assert f["weak_chosen_ids"][-1] == dm.weak_renderer.end_of_turn
        assert f["weak_chosen_map"][-1] == len(f["chosen_ids"]) - 1
        assert sorted(f["weak_chosen_map"][:-1]) == f["weak_chosen_map"][:-1]
        assert max(f["weak_chosen_map"][:-1]) == len(f["chosen_ids"]) - 2  # the text's last token gets some


def test_a_tokenizer_without_offsets_is_refused(data_file, tiny_world):
    from transformers import CanineTokenizer  # a Python tokenizer, built without files

    dm = datamodule(data_file, tiny_world)
    with pytest.raises(InputError, match=r"slow \(Python\) tokenizer, which gives no character offsets"):
        dm.use_weak_tokenizer(CanineTokenizer(eos_token=chr(0xE001)), name="canine")


def test_text_the_two_tokenizations_cover_differently_is_refused_with_its_record(data_file, tiny_world):
    weak = build_tokenizer(shape="llama3", vocab_size=400)
    weak.backend_tokenizer.normalizer = normalizers.Replace("!", "")  # it never sees the final "!"
    dm = datamodule(data_file, tiny_world, val_fraction=0)
    with pytest.raises(InputError, match=rf"{data_file}:5: field 'chosen': the policy's tokens cover .*I loved it!'"):
        dm.use_weak_tokenizer(weak, name="no-bang")


def test_a_template_that_rewrites_the_response_is_refused(data_file, tiny_world):
    weak = build_tokenizer(shape="llama3", vocab_size=400)
    weak.chat_template = weak.chat_template.replace("message['content'] | trim", "message['content'] | upper")
    dm = datamodule(data_file, tiny_world)
    with pytest.raises(InputError, match="its chat template rewrites the response text"):
        dm.use_weak_tokenizer(weak, name="shouting")
