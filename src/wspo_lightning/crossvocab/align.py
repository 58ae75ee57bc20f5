"""Which policy token each weak token's log-ratio lands on: the one whose character span holds the weak
token's last character (docs/cross-tokenizer.md), so a response's mapped deltas sum to the weak pair's
sequence log-ratio.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from wspo_lightning.crossvocab.spans import Span
from wspo_lightning.errors import InputError


def _split(spans: Sequence[Span | None], side: str) -> tuple[np.ndarray, bool]:
    """The spans of the tokens before the end-of-turn ([n, 2]) and whether there is one (the last token)."""
    end_of_turn = bool(spans) and spans[-1] is None
    body = spans[:-1] if end_of_turn else spans
    if any(span is None for span in body):
        raise ValueError(f"{side}: only the last token can be the end-of-turn")
    return np.asarray(body, dtype=np.int64).reshape(-1, 2), end_of_turn


def _ends(spans: np.ndarray, length: int) -> np.ndarray:
    """Each token's end, clamped to the text ([0, length]: a template's own text before or after the response
    counts as its first or last character) and never before an earlier token's end."""
    return np.maximum.accumulate(np.clip(spans[:, 1], 0, length)) if len(spans) else spans[:, 1]


def covered(spans: np.ndarray, text: str) -> str:
    """The part of `text` the tokens cover, from the first character one covers to the last."""
    inside = spans[(spans[:, 1] > 0) & (spans[:, 0] < len(text))]
    if not len(inside):
        return ""
    return text[max(int(inside[:, 0].min()), 0) : min(int(inside[:, 1].max()), len(text))]


def place(
    policy: Sequence[Span | None], weak: Sequence[Span | None], text: str, cut: bool, where: str = "a response"
) -> list[int]:
    """For each weak token, the index of the policy token its log-ratio lands on.

    Args:
        policy: spans of the policy's response tokens in `text` (`None`: its end-of-turn, the last token).
        weak: spans of the weak pair's tokens of the same response.
        text: the response text.
        cut: the length limit cut the policy's response (it has no end-of-turn then): weak tokens that end
            past its last token are dropped, and the returned list is shorter than `weak` (a prefix).
        where: how errors name the response.

    A weak token lands on the first policy token whose end is at or after its own end (ends clamped as
    `_ends` says); weak tokens ending at the same character land in turn on policy tokens ending there
    (the bytes of one character split alike map one to one). The weak end-of-turn lands on the policy's.

    The response "low tide": the policy reads "low" (characters 0-3), " tide" (3-8) and its end-of-turn
    (None); the weak pair reads "lo", "w t", "ide" and its own end-of-turn. "lo" ends at character 2, inside
    "low"; "w t" ends at 5 and "ide" at 8, both inside " tide"; the end-of-turn lands on the end-of-turn:

    >>> place([(0, 3), (3, 8), None], [(0, 2), (2, 5), (5, 8), None], "low tide", cut=False)
    [0, 1, 1, 2]

    Cut after "low", the policy keeps one token and no end-of-turn; only "lo" ends within it:

    >>> place([(0, 3)], [(0, 2), (2, 5), (5, 8), None], "low tide", cut=True)
    [0]
    """
    (policy_spans, policy_eot), (weak_spans, weak_eot) = _split(policy, "policy"), _split(weak, "weak")
    if not cut:
        mine, theirs = covered(policy_spans, text).strip(), covered(weak_spans, text).strip()
        if mine != theirs:
            raise InputError(
                f"{where}: the policy's tokens cover {mine[:60]!r} of the response text and the weak pair's "
                f"{theirs[:60]!r}: a chat template or normaliser changes the text for one of them, so the weak "
                "log-ratios cannot be placed on the policy's tokens. Render both the same way "
                "(data.use_chat_template, templates that write the message content as given)."
            )
    n = len(policy_spans)
    ends, weak_ends = _ends(policy_spans, len(text)), _ends(weak_spans, len(text))
    first = np.searchsorted(ends, weak_ends, side="left")
    last = np.searchsorted(ends, weak_ends, side="right")
    # position of each weak token among the run of weak tokens ending at the same character
    index = np.arange(len(weak_ends))
    starts = np.r_[True, weak_ends[1:] != weak_ends[:-1]] if len(weak_ends) else np.zeros(0, dtype=bool)
    run = index - np.maximum.accumulate(np.where(starts, index, 0)) if len(weak_ends) else index
    landing = np.where(last > first, np.minimum(first + run, last - 1), first)
    past = first == n  # ending after the policy's last token: a suffix, ends never decrease
    if cut:
        return landing[~past].tolist()  # and no end-of-turn: the cut response has none
    if weak_eot != policy_eot:
        raise RuntimeError(f"{where}: one side of an uncut response ends with an end-of-turn, the other not")
    if n == 0:  # the policy's response is its end-of-turn alone
        if len(landing) and not policy_eot:
            raise InputError(f"{where}: the policy's response has no tokens to place the weak pair's on")
        return [0] * (len(landing) + weak_eot)
    landing[past] = n - 1  # trailing whitespace only the weak tokens cover (checked above)
    return landing.tolist() + [n] * weak_eot
