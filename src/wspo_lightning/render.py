"""The one renderer of prompts and responses to token ids: exactly the tokens a model sees at inference.

With a chat template (docs/design.md, section 2):
- a prompt is the template's rendering with the generation prompt;
- a finished response is what the template adds for the assistant turn, i.e. the tokens of
  render(prompt + answer) after those of render(prompt), up to and including the template's own
  end-of-turn token (`<|im_end|>`, `<|eot_id|>`, ...); what the template writes after it (ChatML's newline)
  is not part of the response, since a model stops generating there;
- a response cut by a length limit is the same without the end-of-turn.
Without a template: `prompt_template.format(prompt=...)` with the special tokens the tokenizer adds
(a BOS for Llama-style tokenizers), and responses that end with eos when finished.

Training, precompute, sampling, distillation, scoring, decoding and evaluation all go through
`Renderer`, so what is trained on is what is generated, token for token.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from wspo_lightning.errors import InputError

Prompt = str | list[dict]
"""A prompt: plain text (one user turn) or a list of messages `{role, content}`."""


def as_messages(prompt: Prompt) -> list[dict]:
    """A prompt as chat messages: a string is one user turn."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def plain_text(prompt: Prompt) -> str:
    """A prompt as plain text: a conversation becomes its single message or `role: content` lines."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1:
        return prompt[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of what decides a tokenizer's ids: its model, normaliser, pre-tokeniser, post-processor,
    added and special tokens, and chat template (not its padding or truncation settings)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
    else:  # a slow (Python) tokenizer
        state = {"class": type(tokenizer).__name__, "vocab": sorted(tokenizer.get_vocab().items())}
    state["special"] = {name: getattr(tokenizer, name, None) for name in ("bos_token", "eos_token", "pad_token")}
    state["chat_template"] = getattr(tokenizer, "chat_template", None)
    return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()


def _special_ids(tokenizer: Any) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for token_id, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(token, "special", False):
            ids.add(int(token_id))
    return ids


def _unique(ids: Sequence[int | None]) -> list[int]:
    seen: list[int] = []
    for i in ids:
        if i is not None and int(i) not in seen:
            seen.append(int(i))
    return seen


class Renderer:
    """Token ids of prompts and responses for one tokenizer (see the module docstring).

    Args:
        tokenizer: a Hugging Face tokenizer.
        use_chat_template: render with the tokenizer's chat template when it has one.
        prompt_template: plain template with a `{prompt}` field, used without a chat template.
        name: how errors name the tokenizer (default: its `name_or_path`).

    Attributes:
        chat: whether the chat template is used.
        end_of_turn: the id that ends a finished response (the template's end-of-turn, or eos).
        fingerprint: sha256 of the tokenizer (`tokenizer_fingerprint`) and of this rendering mode; response ids
            stored with an equal fingerprint are the ids this renderer would train on.
    """

    def __init__(
        self, tokenizer: Any, use_chat_template: bool = True, prompt_template: str = "{prompt}", name: str | None = None
    ) -> None:
        if "{prompt}" not in prompt_template:
            raise InputError(f"prompt_template={prompt_template!r}: expected a '{{prompt}}' field for the prompt text.")
        self.tokenizer = tokenizer
        self.name = name or getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
        self.chat = bool(use_chat_template and getattr(tokenizer, "chat_template", None))
        self.prompt_template = prompt_template
        self.end_of_turn = self._find_end_of_turn() if self.chat else tokenizer.eos_token_id
        if self.end_of_turn is None:
            raise InputError(
                f"tokenizer {self.name} has no eos token, so responses cannot end. "
                "Set eos_token in its tokenizer_config.json."
            )
        mode = "chat" if self.chat else f"plain:{prompt_template}"
        self.fingerprint = hashlib.sha256(f"{tokenizer_fingerprint(tokenizer)}|{mode}".encode()).hexdigest()

    # ---- prompts -----------------------------------------------------------------------------------
    def prompt_text(self, prompt: Prompt) -> str:
        """The prompt as the model sees it, ending where the response begins."""
        if self.chat:
            return self.tokenizer.apply_chat_template(as_messages(prompt), add_generation_prompt=True, tokenize=False)
        return self.prompt_template.format(prompt=plain_text(prompt))

    def prompt_ids(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        """Token ids of each prompt. A chat template writes its own special tokens (BOS and all);
        a plain prompt gets those the tokenizer adds."""
        if not prompts:
            return []
        texts = [self.prompt_text(p) for p in prompts]
        ids = self.tokenizer(texts, add_special_tokens=not self.chat)["input_ids"]
        for i, row in enumerate(ids):
            if not row:
                raise InputError(
                    f"prompt {i} is empty after tokenisation by {self.name}: a model needs at least one prompt token"
                )
        return [list(row) for row in ids]

    def fit_prompt(self, prompt: Prompt, budget: int) -> list[int]:
        """The prompt's ids in at most `budget` tokens, cut inside the last user message's content (its end
        kept, as it sits next to the response), so the template's header, the system turn and the generation
        prompt stay whole. When those alone exceed the budget, the ids are cut from the left (at least one kept)."""
        ids = self.prompt_ids([prompt])[0]
        if len(ids) <= budget:
            return ids
        messages = as_messages(prompt) if self.chat else [{"role": "user", "content": plain_text(prompt)}]
        users = [i for i, m in enumerate(messages) if m["role"] == "user" and isinstance(m.get("content"), str)]
        if users:
            last = users[-1]
            content = self.tokenizer(messages[last]["content"], add_special_tokens=False)["input_ids"]
            keep = len(content) - (len(ids) - budget)
            while keep > 0:  # re-tokenising the cut text can merge tokens differently: shrink until it fits
                cut = [*messages[:last], {**messages[last], "content": self.tokenizer.decode(content[-keep:])}]
                candidate = self.prompt_ids([cut if self.chat else cut[last]["content"]])[0]
                if len(candidate) <= budget:
                    return candidate
                keep -= len(candidate) - budget
        return ids[-max(1, budget) :]

    # ---- responses ---------------------------------------------------------------------------------
    def response_ids(
        self,
        prompts: Sequence[Prompt],
        responses: Sequence[str],
        finished: bool | Sequence[bool] = True,
        prompt_ids: Sequence[Sequence[int]] | None = None,
    ) -> list[list[int]]:
        """Token ids of each response after its prompt: ending with the end-of-turn when `finished`,
        without it when the response was cut. `prompt_ids` (of `prompt_ids(prompts)`) saves re-rendering."""
        if not responses:
            return []
        finished = [finished] * len(responses) if isinstance(finished, bool) else list(finished)
        if not self.chat:
            ids = self.tokenizer(list(responses), add_special_tokens=False)["input_ids"]
            return [list(row) + ([self.end_of_turn] if done else []) for row, done in zip(ids, finished)]
        prompt_ids = prompt_ids if prompt_ids is not None else self.prompt_ids(prompts)
        texts = [
            self.tokenizer.apply_chat_template(as_messages(p) + [{"role": "assistant", "content": r}], tokenize=False)
            for p, r in zip(prompts, responses)
        ]
        whole = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        out = []
        for prompt, conversation, done in zip(prompt_ids, whole, finished):
            self._check_prefix(prompt, conversation)
            turn = list(conversation[len(prompt) :])
            end = len(turn) - 1 - turn[::-1].index(self.end_of_turn) if self.end_of_turn in turn else None
            if end is None:
                raise InputError(
                    f"tokenizer {self.name}: the chat template rendered an assistant turn without its "
                    f"end-of-turn token {self.tokenizer.convert_ids_to_tokens(self.end_of_turn)!r}. "
                    "Set data.use_chat_template: false, or fix the template."
                )
            out.append(turn[: end + 1] if done else turn[:end])
        return out

    @property
    def pad_id(self) -> int:
        """The id prompts are left-padded with: the tokenizer's pad, else the end-of-turn (padding is masked,
        so any id of the vocabulary does)."""
        pad = self.tokenizer.pad_token_id
        return self.end_of_turn if pad is None else pad

    def stop_ids(self, model: Any = None) -> list[int]:
        """Ids that end a generated response: the end-of-turn, the model's generation-config eos ids
        (when a model is given) and the tokenizer's eos."""
        config = getattr(model, "generation_config", None)
        eos = getattr(config, "eos_token_id", None)
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        return _unique([self.end_of_turn, *eos, self.tokenizer.eos_token_id])

    def decode(self, ids: Sequence[int]) -> str:
        """The text of response ids, special tokens dropped and surrounding whitespace stripped."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    # ---- checks ------------------------------------------------------------------------------------
    def _check_prefix(self, prompt: Sequence[int], conversation: Sequence[int]) -> None:
        if list(conversation[: len(prompt)]) == list(prompt):
            return
        shared = next((i for i, (a, b) in enumerate(zip(prompt, conversation)) if a != b), len(prompt))
        tail = self.tokenizer.decode(list(prompt[shared : shared + 8]))
        there = self.tokenizer.decode(list(conversation[shared : shared + 8]))
        raise InputError(
            f"tokenizer {self.name}: its chat template renders the whole conversation without the prompt's "
            f"rendering as a prefix (at token {shared} the prompt has {tail!r}, the conversation {there!r}), so "
            "the response's tokens cannot be told apart. Set data.use_chat_template: false (with a "
            "prompt_template), or use a template whose generation prompt starts the assistant turn."
        )

    def _find_end_of_turn(self) -> int:
        """The template's end-of-turn: the first special token it writes after an assistant message's text."""
        probe, answer = [{"role": "user", "content": "Hi"}], "Fine"
        prompt = self.prompt_ids([probe])[0]
        text = self.tokenizer.apply_chat_template(probe + [{"role": "assistant", "content": answer}], tokenize=False)
        conversation = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        self._check_prefix(prompt, conversation)
        turn = conversation[len(prompt) :]
        after = next((i + 1 for i in range(len(turn)) if answer in self.tokenizer.decode(turn[: i + 1])), 0)
        special = _special_ids(self.tokenizer)
        ends = [i for i in turn[after:] if i in special]
        if not ends:
            suffix = self.tokenizer.decode(turn)
            raise InputError(
                f"tokenizer {self.name}: its chat template renders an assistant turn as {suffix!r}, with "
                "no special token to end it, so generation could never stop there. Add the end-of-turn "
                "token to the template, or set data.use_chat_template: false."
            )
        return ends[0]
