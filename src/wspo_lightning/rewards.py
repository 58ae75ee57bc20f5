"""Gold rewards: a scorer of (prompt, response) text that nobody in the loop was trained on.

`load_reward` turns what a user writes wherever a reward is named (`wspo score --reward`, `wspo generate`,
`wspo demo --reward`) into one: a short name (`vader`), `rm:PATH` (a reward model), an import path, or a
`class_path` / `init_args` block (a dict, or the same as JSON/YAML text).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from wspo_lightning.errors import InputError
from wspo_lightning.io import import_object

log = logging.getLogger(__name__)


class Reward(Protocol):
    """Anything that scores responses: a lexicon, a reward model, a unit test runner."""

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]: ...


class VaderReward:
    """VADER sentiment compound score of the response, in [-1, 1] (higher is more positive)."""

    def __init__(self) -> None:
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError as err:  # an optional extra: say how to get it
            raise ImportError("VaderReward needs vaderSentiment: pip install 'wspo-lightning[demo]'") from err
        self._analyzer = SentimentIntensityAnalyzer()

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return [self._analyzer.polarity_scores(text)["compound"] for text in responses]


class RewardModel:
    """A reward model: any `AutoModelForSequenceClassification` folder (or hub id), scoring in batches.

    Each (prompt, response) is rendered as a user turn and an assistant turn through the model's own
    tokenizer's chat template (without one: `prompt_template` then the response). The score is the
    classification head's output `label` at the last token of that rendering: exactly what a forward of
    the model on the rendering alone gives, whatever the batch's padding (rows are right-padded and the
    model is told a pad id that none of them holds, so its pooling finds each row's own last token).

    Args:
        path: model folder (save_pretrained) or hub id.
        batch_size: (prompt, response) pairs per forward.
        device: "auto" (a GPU when there is one), "cpu", "cuda", ...
        dtype: weights' dtype: float32, bfloat16, float16, or auto (the checkpoint's).
        label: which output of the head is the reward (0 for the usual single-logit reward model).
        max_length: keep at most this many tokens, dropping the start of the prompt first; None: all.
        use_chat_template: render with the tokenizer's chat template when it has one.
        prompt_template: plain template with a `{prompt}` field, used without a chat template.
        trust_remote_code: let the model run code from its repository.
    """

    def __init__(
        self,
        path: str,
        batch_size: int = 8,
        device: str = "auto",
        dtype: str = "float32",
        label: int = 0,
        max_length: int | None = None,
        use_chat_template: bool = True,
        prompt_template: str = "{prompt}\n",
        trust_remote_code: bool = False,
    ) -> None:
        from transformers import AutoModelForSequenceClassification

        from wspo_lightning.hardware import resolve_device
        from wspo_lightning.models import ModelSpec, check_model_path, load_tokenizer

        spec = ModelSpec(path=path, trust_remote_code=trust_remote_code)
        check_model_path(spec, "reward")
        self.tokenizer = load_tokenizer(spec, role="reward")
        self.batch_size, self.label, self.max_length = batch_size, label, max_length
        self.chat = use_chat_template and bool(getattr(self.tokenizer, "chat_template", None))
        self.prompt_template = prompt_template
        self.device = torch.device(resolve_device(device))
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path,
            dtype=dtype if dtype == "auto" else getattr(torch, dtype),
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
        ).to(self.device)
        self.model.eval().requires_grad_(False)
        if not 0 <= label < self.model.config.num_labels:
            raise InputError(f"reward: label={label} but {path} has {self.model.config.num_labels} outputs")

    def render(self, prompt: str | list[dict], response: str) -> list[int]:
        """The token ids the model scores for one pair."""
        if self.chat:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            text = self.tokenizer.apply_chat_template(
                messages + [{"role": "assistant", "content": response}], tokenize=False
            )
            ids = self.tokenizer(text, add_special_tokens=False).input_ids
        else:
            prompt_text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
            ids = self.tokenizer(self.prompt_template.format(prompt=prompt_text) + response).input_ids
        return ids[-self.max_length :] if self.max_length else ids

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str | list[dict]], responses: Sequence[str]) -> list[float]:
        rows = [self.render(p, r) for p, r in zip(prompts, responses)]
        scores: list[float] = []
        for first in range(0, len(rows), self.batch_size):
            scores += self._score(rows[first : first + self.batch_size])
        return scores

    def _score(self, rows: list[list[int]]) -> list[float]:
        width = max(map(len, rows))
        used = {token for row in rows for token in row}
        pad = next(i for i in range(len(used) + 1) if i not in used)  # an id no row holds
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)  # [B, T], right-padded
        attention_mask = torch.zeros_like(input_ids)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1
        config = self.model.config.get_text_config()
        saved, config.pad_token_id = config.pad_token_id, pad  # the head pools at the last non-pad token
        try:
            logits = self.model(
                input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device)
            ).logits  # [B, num_labels]
        finally:
            config.pad_token_id = saved
        return logits[:, self.label].float().tolist()


NAMES = {"vader": "wspo_lightning.rewards.VaderReward"}
"""Short names accepted wherever a reward is asked for; `rm:PATH` names a `RewardModel`."""


def load_reward(reward: str | dict | Any) -> Reward:
    """A reward from a short name (`vader`), `rm:PATH` (a `RewardModel` of that folder), an import path
    (`pkg.module.Class` or `pkg.module:Class`; a class is built with no arguments), a `class_path` /
    `init_args` block (a dict, or that dict as JSON/YAML text), or an instance (returned as given)."""
    if isinstance(reward, str) and reward.lstrip().startswith("{"):
        import yaml

        try:
            reward = yaml.safe_load(reward)
        except yaml.YAMLError as err:
            raise InputError(f"reward: cannot read {reward!r} as a class_path/init_args block ({err})") from None
    if isinstance(reward, dict):
        if not isinstance(reward.get("class_path"), str) or not set(reward) <= {"class_path", "init_args"}:
            raise InputError(f"reward: expected a block of class_path (a str) and init_args (a dict), got {reward}")
        return _build(import_object(NAMES.get(reward["class_path"], reward["class_path"])), reward.get("init_args"))
    if not isinstance(reward, str):
        return reward
    if reward.startswith("rm:"):
        return RewardModel(reward[3:])
    obj = import_object(NAMES.get(reward, reward))
    return obj() if isinstance(obj, type) else obj


def _build(cls: Any, init_args: Any) -> Reward:
    if init_args is not None and not isinstance(init_args, dict):
        raise InputError(f"reward: init_args must be a mapping of argument names to values, got {init_args!r}")
    import inspect

    try:  # check the names first, so a TypeError raised inside the class is not mistaken for the user's
        inspect.signature(cls).bind(**(init_args or {}))
    except TypeError as err:
        raise InputError(f"reward: wrong arguments for {getattr(cls, '__name__', cls)} ({err})") from None
    return cls(**(init_args or {}))


def describe(reward: str | dict | Any) -> str:
    """A short name of a reward as the user gave it, for messages and records."""
    if isinstance(reward, dict):
        return str(reward.get("class_path"))
    return reward if isinstance(reward, str) else type(reward).__name__
