"""A long prompt is cut inside the user's content: the chat template's header, the system turn and the
generation prompt stay whole (ChatML and Llama-3 shapes, and a plain template), whether `data.max_prompt_length`
or `max_length` (the response's need) sets the budget."""

from __future__ import annotations

import pytest

from wspo_lightning.data.tokenize import tokenize_records
from wspo_lightning.render import Renderer
from wspo_lightning.tiny import build_tokenizer

SYSTEM = {"role": "system", "content": "You are a film critic who answers in one line."}
CONTENT = " ".join(f"Scene {i} was filmed at night and the crowd was loud." for i in range(30))
PROMPT = [SYSTEM, {"role": "user", "content": CONTENT}]


def renderer_of(shape: str) -> Renderer:
    if shape == "plain":
        return Renderer(build_tokenizer(chat_template=False), False, "Review: {prompt}\nVerdict:")
    return Renderer(build_tokenizer(shape=shape), True, "{prompt}")


def parts(renderer: Renderer, prompt) -> tuple[str, str]:
    """The rendered text before and after the user's content: what must stay whole."""
    text = renderer.prompt_text(prompt)
    start = text.index(CONTENT)
    return text[:start], text[start + len(CONTENT) :]


@pytest.mark.parametrize("shape", ["chatml", "llama3", "plain"])
def test_fit_prompt_cuts_inside_the_users_content_and_keeps_header_system_turn_and_generation_prompt(shape):
    renderer = renderer_of(shape)
    prompt = PROMPT if renderer.chat else CONTENT
    full = renderer.prompt_ids([prompt])[0]
    budget = len(full) // 3
    got = renderer.fit_prompt(prompt, budget)
    assert 0 < len(got) <= budget
    text = renderer.tokenizer.decode(got)
    head, tail = parts(renderer, prompt)
    assert text.startswith(head) and text.endswith(tail)
    kept = text[len(head) : len(text) - len(tail)]
    assert kept and CONTENT.endswith(kept)  # the end of the user's text, next to the response
    assert renderer.fit_prompt(prompt, len(full)) == full  # within budget: untouched


@pytest.mark.parametrize("limit", ["max_prompt_length", "max_length"])
def test_data_features_keep_the_system_turn_when_a_long_prompt_is_cut(limit):
    renderer = renderer_of("chatml")
    record = {"id": "r0", "source": "t.jsonl:1", "prompt": PROMPT, "chosen": "A calm, fine film.", "rejected": "No."}
    full = renderer.prompt_ids([PROMPT])[0]
    budget = len(full) // 2
    chosen = renderer.response_ids([PROMPT], [record["chosen"]], prompt_ids=[full])[0]
    settings = {"max_length": 4096, "max_prompt_length": budget}
    if limit == "max_length":  # no prompt limit: the prompt gives way to the longer response
        settings = {"max_length": budget + len(chosen)}
    (feature,) = tokenize_records([record], renderer, **settings)
    assert feature["truncated"] and len(feature["prompt_ids"]) <= budget
    assert feature["chosen_ids"] == chosen  # the response is whole
    text = renderer.tokenizer.decode(feature["prompt_ids"])
    head, tail = parts(renderer, PROMPT)
    assert text.startswith(head) and SYSTEM["content"] in head and text.endswith(tail)


def test_left_truncation_keeps_what_earlier_versions_kept():
    """`data.prompt_truncation: left` cuts the first tokens, header included: the data of earlier versions' runs."""
    renderer = renderer_of("chatml")
    record = {"id": "r0", "source": "t.jsonl:1", "prompt": PROMPT, "chosen": "Fine.", "rejected": None}
    full = renderer.prompt_ids([PROMPT])[0]
    (feature,) = tokenize_records([record], renderer, 4096, max_prompt_length=20, keep_header=False)
    assert feature["prompt_ids"] == full[-20:] and feature["truncated"]
