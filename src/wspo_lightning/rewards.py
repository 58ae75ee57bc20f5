"""Gold rewards: a scorer of (prompt, response) text that nobody in the loop was trained on."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from wspo_lightning.io import import_object


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


NAMES = {"vader": "wspo_lightning.rewards.VaderReward"}
"""Short names accepted wherever a reward is asked for."""


def load_reward(reward: str | Any) -> Reward:
    """A reward from a short name (`vader`), an import path (`pkg.module.Class` or `pkg.module:Class`;
    a class is built with no arguments), or an instance (returned as given)."""
    if not isinstance(reward, str):
        return reward
    obj = import_object(NAMES.get(reward, reward))
    return obj() if isinstance(obj, type) else obj
