"""Where each response token sits in the response text: character spans from the fast tokenizers'
offset mappings, as the `Renderer` places the text (its chat template or its plain rendering).

A span `(start, end)` counts characters of the response text as given (the record's text, before a chat
template trims it); a template's own text before the response has spans that end at or before 0, after it
spans that start at or after the text's length. `None` marks the end-of-turn of a finished response: a
special token the template writes, which covers no character of the text.
"""

from __future__ import annotations

from collections.abc import Sequence

from wspo_lightning.errors import InputError
from wspo_lightning.render import Prompt, Renderer, as_messages

Span = tuple[int, int]


def check_offsets(renderer: Renderer, role: str) -> None:
    """Character offsets come from fast (Rust) tokenizers only."""
    if not getattr(renderer.tokenizer, "is_fast", False):
        raise InputError(
            f"{role} tokenizer {renderer.name} is a slow (Python) tokenizer, which gives no character offsets: "
            "cross-tokenizer WSPO places the weak pair's tokens on the policy's by the characters they cover. "
            "Give the model folder a fast tokenizer (tokenizer.json: "
            "AutoTokenizer.from_pretrained(path, use_fast=True).save_pretrained(path))."
        )


def rendered_spans(
    renderer: Renderer,
    prompts: Sequence[Prompt],
    responses: Sequence[str],
    finished: Sequence[bool],
    prompt_ids: Sequence[Sequence[int]],
    prompt_texts: Sequence[str] | None = None,
) -> tuple[list[list[int]], list[list[Span | None]]]:
    """The renderer's response ids of each (prompt, response text) and the span of each of those tokens in the
    response text (`None`: the end-of-turn of a finished response). `prompt_ids` and `prompt_texts` (with a
    chat template; default: rendered again): of `renderer.prompt_ids` and `renderer.prompt_text`.

    The ids are the `Renderer`'s own; the same text tokenized again with `return_offsets_mapping` gives
    the spans (the same tokenizer on the same text: the same tokens, checked)."""
    ids = renderer.response_ids(prompts, responses, finished, prompt_ids=prompt_ids)
    if not ids:
        return [], []
    tokenizer = renderer.tokenizer
    if renderer.chat:  # the whole conversation, as Renderer.response_ids renders it
        texts = [
            tokenizer.apply_chat_template(as_messages(p) + [{"role": "assistant", "content": r}], tokenize=False)
            for p, r in zip(prompts, responses)
        ]
        firsts = [len(p) for p in prompt_ids]
        prompt_texts = prompt_texts or [renderer.prompt_text(p) for p in prompts]
        shifts = [_response_start(renderer, t, p, r) for t, p, r in zip(texts, prompt_texts, responses)]
    else:  # the response text alone, then eos when finished
        texts, firsts, shifts = list(responses), [0] * len(responses), [0] * len(responses)
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    spans = []
    for row, first, shift, done in zip(range(len(ids)), firsts, shifts, finished):
        body = len(ids[row]) - bool(done)  # tokens before the end-of-turn
        if list(encoded["input_ids"][row][first : first + body]) != list(ids[row][:body]):
            raise RuntimeError(f"tokenizer {renderer.name}: offsets of another tokenization than the renderer's")
        offsets = encoded["offset_mapping"][row][first : first + body]
        spans.append([(int(s) - shift, int(e) - shift) for s, e in offsets] + [None] * bool(done))
    return ids, spans


def _response_start(renderer: Renderer, conversation: str, prompt_text: str, response: str) -> int:
    """Where the response text starts in the rendered conversation: after the prompt's rendering, the text
    as given, or trimmed of surrounding whitespace (Llama 3 style templates); the returned position is
    that of the text's first character, trimmed or not, so spans count characters of the text as given."""
    if not conversation.startswith(prompt_text):
        raise InputError(
            f"tokenizer {renderer.name}: its chat template renders a conversation that does not start with the "
            "prompt's rendering, so the response's characters cannot be found in it. Set data.use_chat_template: "
            "false, or fix the template."
        )
    turn = conversation[len(prompt_text) :]
    at = turn.find(response)
    if at >= 0:
        return len(prompt_text) + at
    core = response.strip()
    at = turn.find(core)
    if at < 0:
        raise InputError(
            f"tokenizer {renderer.name}: its chat template rewrites the response text (it is not in the rendered "
            f"assistant turn {turn[:80]!r}, trimmed or not), so the weak pair's tokens cannot be placed on the "
            "policy's by character. Set data.use_chat_template: false, or use a template that writes the "
            "message content as given."
        )
    return len(prompt_text) + at - (len(response) - len(response.lstrip()))


def decoded_spans(renderer: Renderer, ids: Sequence[int], text: str, finished: bool) -> list[Span | None]:
    """Spans of token ids kept from sampling, which need not be how the tokenizer would split `text`: each
    token ends where the decoding of the ids up to it stops agreeing with the decoding of all of them (a
    token that completes a character split over several tokens covers it; a special token dropped by the
    decoding covers nothing). `text` is the record's response, the decoding trimmed of whitespace
    (`Renderer.decode`); a finished response's last id is its end-of-turn."""
    tokenizer = renderer.tokenizer
    body = list(ids[:-1] if finished else ids)
    whole = tokenizer.decode(body, skip_special_tokens=True)
    lead = whole.find(text)
    if lead < 0:
        raise InputError(
            f"response ids kept from sampling decode to {whole[:80]!r} with {renderer.name}, which does not "
            f"hold the record's response text {text[:80]!r}: the weak pair would score other text than the "
            "policy trains on. Drop the ids (chosen_ids / rejected_ids) or fix the text."
        )
    spans: list[Span | None] = []
    end = 0
    for k in range(1, len(body) + 1):
        start, end = end, max(end, _common_prefix(tokenizer.decode(body[:k], skip_special_tokens=True), whole))
        spans.append((start - lead, end - lead))
    return spans + [None] * finished


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
