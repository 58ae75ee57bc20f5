"""Verdict sentences decided by an interval alone: above, below, or not distinguishable from a comparison target.

A mean below zero whose interval spans zero is noise, not a direction; every report sentence that says "above"
or "below" comes from here, so the rule is stated once. Imports nothing of the project.

>>> verdict(-0.058, (-0.179, 0.071), what="the sign control")
'The sign control is not distinguishable from the base: -0.058 (95% CI [-0.179, +0.071]).'
>>> verdict(0.292, (0.178, 0.412), what="WSPO", against="the strong base", note="at KL 3.50 nats")
'WSPO is above the strong base: +0.292 (95% CI [+0.178, +0.412]), at KL 3.50 nats.'
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

Direction = Literal["above", "below", "not distinguishable"]

PHRASES: dict[str, str] = {
    "above": "is above",
    "below": "is below",
    "not distinguishable": "is not distinguishable from",
}


def direction(ci: Sequence[float]) -> Direction:
    """ "above" when the whole interval is above zero, "below" when it is wholly below, else "not distinguishable"
    (an end point at exactly zero counts as touching zero: not distinguishable)."""
    lo, hi = float(ci[0]), float(ci[1])
    if lo > hi:
        raise ValueError(f"interval [{lo}, {hi}] has its lower end above its upper end: pass (low, high)")
    if lo > 0:
        return "above"
    if hi < 0:
        return "below"
    return "not distinguishable"


def fmt_ci(ci: Sequence[float]) -> str:
    """`[+0.178, +0.412]`: signed, three decimals."""
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def verdict(
    diff: float,
    ci: tuple[float, float],
    what: str = "the effect",
    against: str = "the base",
    note: str = "",
    level: float = 0.95,
) -> str:
    """One sentence: `what` (first letter capitalised) is above / below / not distinguishable from `against`,
    decided by `ci` only (never by the sign of `diff`), then the difference and its interval, then `note`
    (e.g. "at KL 3.50 nats") after a comma. `level` only labels the interval."""
    opening = what[:1].upper() + what[1:]
    tail = f", {note}" if note else ""
    return f"{opening} {PHRASES[direction(ci)]} {against}: {diff:+.3f} ({level:.0%} CI {fmt_ci(ci)}){tail}."
