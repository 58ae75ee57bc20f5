"""The one renderer, against each tokenizer's own chat template: what is trained on is the template's
rendering of the whole conversation, token for token, up to the template's end-of-turn; cut responses have
none; stop ids hold the end-of-turn; templates that cannot work are refused naming the tokenizer."""

from __future__ import annotations

import pytest

from wspo_lightning.data import PreferenceDataModule
from wspo_lightning.errors import InputError
from wspo_lightning.render import Renderer
from wspo_lightning.tiny import build_tokenizer, write_jsonl

END_OF_TURN = {"chatml": "<|im_end|>", "qwen2_base": "<|im_end|>", "llama3": "<|eot_id|>"}
EOS = {"chatml": "<|im_end|>", "qwen2_base": "<|endoftext|>", "llama3": "<|end_of_text|>", "plain": "</s>"}
CONVERSATION = [
    {"role": "system", "content": "You review films."},
    {"role": "user", "content": "What about the plot?"},
    {"role": "assistant", "content": "It was dull."},
    {"role": "user", "content": "And the ending?"},
]
# whitespace around the answer: a trimming template (llama3) drops it, ChatML keeps it
RECORDS = [
    {
        "id": "plain",
        "prompt": "Write one line about the film.",
        "chosen": "  The film was wonderful. ",
        "rejected": "The film was dull.",
    },
    {
        "id": "chat",
        "prompt": CONVERSATION,
        "chosen": [{"role": "assistant", "content": "The ending left me smiling."}],
        "rejected": [{"role": "assistant", "content": "It was awful."}],
        "rejected_finished": False,
    },
]


def answer(record: dict, side: str) -> str:
    value = record[side]
    return value if isinstance(value, str) else value[-1]["content"]


def template_ids(tokenizer, messages, **kwargs) -> list[int]:
    """The template's own rendering as token ids (transformers' apply_chat_template)."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def expected_response(tokenizer, prompt, answer: str, finished: bool) -> list[int]:
    """render(prompt + answer) after render(prompt, generation prompt), cut after (or, when not finished,
    before) the template's end-of-turn: computed from apply_chat_template alone."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    before = template_ids(tokenizer, messages, add_generation_prompt=True)
    whole = template_ids(tokenizer, messages + [{"role": "assistant", "content": answer}])
    assert whole[: len(before)] == before
    turn = whole[len(before) :]
    end = turn.index(tokenizer.convert_tokens_to_ids(END_OF_TURN[tokenizer.shape]))
    return turn[: end + 1] if finished else turn[:end]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each shape's tokenizer saved to a folder (as a user's model folder holds it)."""
    root = tmp_path_factory.mktemp("shapes")
    for shape in ("chatml", "qwen2_base", "llama3", "plain"):
        build_tokenizer(shape=shape).save_pretrained(root / shape)
    return root


def features(saved, tmp_path, shape: str, **kwargs) -> tuple[list[dict], object]:
    data = write_jsonl(tmp_path / "data.jsonl", RECORDS)
    dm = PreferenceDataModule(str(data), str(saved / shape), val_fraction=0, batch_size=1, **kwargs)
    dm.setup("fit")
    tokenizer = dm.tokenizer
    tokenizer.shape = shape
    return dm.features["train"], tokenizer


@pytest.mark.parametrize("shape", ["chatml", "qwen2_base", "llama3"])
def test_trained_ids_are_the_templates_rendering_of_the_whole_conversation(saved, tmp_path, shape):
    trained, tokenizer = features(saved, tmp_path, shape)
    for record, feature in zip(RECORDS, trained):
        messages = [{"role": "user", "content": record["prompt"]}] if isinstance(record["prompt"], str) else None
        prompt = template_ids(tokenizer, messages or record["prompt"], add_generation_prompt=True)
        assert feature["prompt_ids"] == prompt
        for side in ("chosen", "rejected"):
            finished = record.get(f"{side}_finished", True)
            expected = expected_response(tokenizer, record["prompt"], answer(record, side), finished)
            assert feature[f"{side}_ids"] == expected
    eot = tokenizer.convert_tokens_to_ids(END_OF_TURN[shape])
    assert trained[0]["chosen_ids"][-1] == eot and eot not in trained[1]["rejected_ids"]  # cut: no end-of-turn
    if EOS[shape] != END_OF_TURN[shape]:  # the bug this guards against: eos where the template ends a turn
        assert tokenizer.convert_tokens_to_ids(EOS[shape]) not in trained[0]["chosen_ids"]


def test_a_trimming_template_trains_on_the_trimmed_text(saved, tmp_path):
    trained, tokenizer = features(saved, tmp_path, "llama3")
    text = tokenizer.decode(trained[0]["chosen_ids"], skip_special_tokens=True)
    assert text == RECORDS[0]["chosen"].strip()


def test_without_a_template_prompts_get_the_tokenizers_bos_and_responses_end_with_eos(saved, tmp_path):
    trained, tokenizer = features(saved, tmp_path, "plain", prompt_template="Q: {prompt}\nA:")
    first = trained[0]
    assert first["prompt_ids"] == tokenizer("Q: Write one line about the film.\nA:")["input_ids"]
    assert first["prompt_ids"][0] == tokenizer.bos_token_id
    finished = tokenizer(RECORDS[0]["chosen"], add_special_tokens=False)["input_ids"]
    assert first["chosen_ids"] == finished + [tokenizer.eos_token_id]
    cut = tokenizer(answer(RECORDS[1], "rejected"), add_special_tokens=False)["input_ids"]
    assert trained[1]["rejected_ids"] == cut  # a cut response: no eos


@pytest.mark.parametrize("shape", ["chatml", "qwen2_base", "llama3", "plain"])
def test_stop_ids_are_the_end_of_turn_the_generation_configs_eos_and_the_tokenizers_eos(shape):
    tokenizer = build_tokenizer(shape=shape)
    renderer = Renderer(tokenizer)
    ids = tokenizer.convert_tokens_to_ids
    assert renderer.end_of_turn == ids(END_OF_TURN.get(shape, EOS[shape]))

    class Model:  # a generation config naming another eos id, as some checkpoints do
        class generation_config:
            eos_token_id = [7, ids(EOS[shape])]

    expected = list(dict.fromkeys([renderer.end_of_turn, 7, ids(EOS[shape])]))
    assert renderer.stop_ids(Model()) == expected
    assert renderer.stop_ids() == list(dict.fromkeys([renderer.end_of_turn, ids(EOS[shape])]))


def test_sampled_ids_are_used_as_drawn_only_when_the_renderer_matches(saved, tmp_path):
    tokenizer = build_tokenizer(shape="qwen2_base")
    renderer = Renderer(tokenizer)
    drawn = tokenizer("The film", add_special_tokens=False)["input_ids"] + [renderer.end_of_turn]
    records = [
        {
            "id": "same",
            "prompt": "Hi",
            "response": "ignored text",
            "response_ids": drawn,
            "tokenizer_fingerprint": renderer.fingerprint,
        },
        {
            "id": "other",
            "prompt": "Hi",
            "response": "The film",
            "response_ids": [1, 2, 3],
            "tokenizer_fingerprint": "another tokenizer",
            "finished": False,
        },
    ]
    data = write_jsonl(tmp_path / "sampled.jsonl", records)
    dm = PreferenceDataModule(str(data), str(saved / "qwen2_base"), val_fraction=0, batch_size=1)
    dm.setup("fit")
    same, other = dm.features["train"]
    assert same["chosen_ids"] == drawn  # as drawn: the text is not re-encoded
    assert other["chosen_ids"] == renderer.response_ids(["Hi"], ["The film"], [False])[0]  # rendered from text


def test_a_template_whose_conversation_does_not_extend_the_prompt_is_refused_naming_the_tokenizer():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + (m['role'] if m['role'] != 'assistant' else 'bot') + '\\n' "
        "+ m['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    with pytest.raises(
        InputError,
        match=r"tokenizer odd-template: its chat template renders the whole "
        r"conversation without the prompt's rendering as a prefix",
    ):
        Renderer(tokenizer, name="odd-template")


def test_a_template_that_never_ends_a_turn_with_a_special_token_is_refused():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    with pytest.raises(InputError, match="no special token to end it"):
        Renderer(tokenizer, name="plain-turns")


@pytest.mark.parametrize("method", ["sample", "proxy", "cbs", "bon"])
def test_every_decoder_stops_at_the_templates_end_of_turn(tmp_path, method):
    """Qwen2-base shape: turns end with <|im_end|>, eos is <|endoftext|>. A model that ends its turns often is
    decoded by each method: every finished response ends with <|im_end|> (included), a cut one has none."""
    from helpers import write_turn_ender

    from wspo_lightning.decoding.command import GenerateConfig, generate
    from wspo_lightning.models import ModelSpec

    tokenizer = build_tokenizer(shape="qwen2_base")
    ender = str(write_turn_ender(tmp_path / "ender", tokenizer, "<|im_end|>", logit=5.0))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Review film {i}."} for i in range(6)])
    rows = generate(
        GenerateConfig(
            strong=ModelSpec(ender),
            weak_base=ModelSpec(ender),
            weak_aligned=ModelSpec(ender),
            prompts=str(prompts),
            out=str(tmp_path / "out.jsonl"),
            method=method,
            max_new_tokens=4,
            beam_width=2,
            num_continuations=2,
            chunk_length=2,
            best_of=2,
            batch_size=3,
            seed=0,
        )
    )
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert any(r["finished"] for r in rows)
    for row in rows:
        ids = row["response_ids"]
        assert (ids[-1] == end_of_turn) == row["finished"] and ids.count(end_of_turn) == int(row["finished"])
