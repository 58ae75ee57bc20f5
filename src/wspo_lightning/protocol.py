"""The study's rules: every choice, made on the tuning prompts, written here before any run.

Each rule reads tuning summaries (`{"value", "gold_reward_mean", "kl"}` per candidate) and nothing else, and the
same rule serves every method:

- learning rate (`choose_learning_rate`): each training method is fitted at its anchor strength with every
  candidate learning rate; the one with the highest tuning gold reward within `lr_kl_cap` nats of KL wins (none
  within: the smallest KL). One step count and one schedule for all; only the rate is chosen.
- ExPO (`choose_expo_alphas`): the alphas whose extrapolated model stays within `kl_cap` nats on the tuning
  prompts, the `expo_keep` of highest tuning reward (none within: the smallest alpha, so the axis is reported).
- the demo's points (`choose_demo_points`): per training method, its sweep's point with the highest tuning gold
  reward within `demo_kl_cap` nats (none within: the smallest KL). `demo_record` keeps the summaries both rules
  read, and `demo_defaults` applies the rules to them: the demo's defaults are derived, not copied.
"""

from __future__ import annotations

RULES = {
    "learning_rate": "per method, at its anchor strength: the candidate with the highest tuning gold reward "
    "within lr_kl_cap nats of KL (none within: the smallest KL)",
    "expo": "per extrapolated point: the alphas within kl_cap nats of KL on tuning prompts, the expo_keep of "
    "highest tuning gold reward (none within: the smallest alpha)",
    "demo": "per training method: the sweep's point with the highest tuning gold reward within demo_kl_cap nats "
    "of KL (none within: the smallest KL)",
}


def _kl(candidate: dict) -> float:
    return float("inf") if candidate.get("kl") is None else float(candidate["kl"])


def best_within(candidates: list[dict], cap: float) -> dict:
    """The candidate with the highest `gold_reward_mean` among those with `kl` <= `cap` (ties: the first); when none
    is within the cap, the one with the smallest KL.

    >>> c = [{"value": 1, "gold_reward_mean": 0.2, "kl": 1.0}, {"value": 2, "gold_reward_mean": 0.5, "kl": 9.0}]
    >>> best_within(c, 8.0)["value"], best_within(c, 10.0)["value"], best_within(c, 0.5)["value"]
    (1, 2, 1)
    """
    if not candidates:
        raise ValueError("best_within: no candidates")
    within = [c for c in candidates if _kl(c) <= cap]
    if not within:
        return min(candidates, key=_kl)
    return max(within, key=lambda c: c["gold_reward_mean"])


def choose_learning_rate(candidates: list[dict], cap: float) -> float:
    """The learning rate of one training method: `candidates` are its anchor's tuning summaries, `value` the rate."""
    return float(best_within(candidates, cap)["value"])


def choose_expo_alphas(candidates: list[dict], cap: float, keep: int) -> list[float]:
    """The ExPO alphas of one extrapolated point that go to the test split, in rising order.

    >>> c = [{"value": a, "gold_reward_mean": r, "kl": k} for a, r, k in ((0.5, 0.3, 2), (1, 0.4, 5), (2, 0.6, 12))]
    >>> choose_expo_alphas(c, 8.0, 1), choose_expo_alphas(c, 8.0, 2), choose_expo_alphas(c, 1.0, 2)
    ([1.0], [0.5, 1.0], [0.5])
    """
    within = sorted((c for c in candidates if _kl(c) <= cap), key=lambda c: -c["gold_reward_mean"])[:keep]
    if not within:
        within = [min(candidates, key=lambda c: c["value"])]
    return sorted(float(c["value"]) for c in within)


def choose_demo_points(summaries: dict[str, list[dict]], cap: float) -> dict[str, dict]:
    """Per training method, the sweep point the demo uses: `summaries` maps a method to its points' tuning
    summaries (with `value`); the chosen summary is returned whole."""
    return {method: best_within(points, cap) for method, points in summaries.items()}


DEMO_METHODS = ("wspo", "dpo", "sft")
"""The training methods the demo runs (its strong fits)."""


def demo_record(
    chosen_by: str, lr_kl_cap: float, lr_candidates: dict, demo_kl_cap: float, sweep_candidates: dict
) -> dict:
    """What the demo's defaults are chosen from: per demo method, its anchor's tuning summaries by learning rate
    (`lr_candidates`) and its sweep's at the chosen rate (`sweep_candidates`), with the rules' caps."""
    return {
        "chosen_by": chosen_by,
        "lr_kl_cap": lr_kl_cap,
        "learning_rate_candidates": {m: lr_candidates[m] for m in DEMO_METHODS},
        "demo_kl_cap": demo_kl_cap,
        "sweep_candidates": {m: sweep_candidates[m] for m in DEMO_METHODS},
    }


def demo_defaults(record: dict) -> tuple[dict[str, dict], str]:
    """The demo's strong fits from a `demo_record`, by the study's rules: per method, `{"value": its strength,
    "lr": its learning rate}`; and where the record comes from.

    >>> cands = lambda *rows: [{"value": v, "gold_reward_mean": r, "kl": k} for v, r, k in rows]
    >>> lr = {m: cands((1e-5, 0.1, 1.0), (3e-5, 0.3, 3.0), (1e-4, 0.9, 9.0)) for m in DEMO_METHODS}
    >>> sweep = {m: cands((0.5, 0.1, 1.0), (1.0, 0.2, 2.0), (2.0, 0.4, 6.0)) for m in DEMO_METHODS}
    >>> demo_defaults(demo_record("example", 4.0, lr, 5.0, sweep))[0]["wspo"]
    {'value': 1.0, 'lr': 3e-05}
    """
    lr = {m: choose_learning_rate(record["learning_rate_candidates"][m], record["lr_kl_cap"]) for m in DEMO_METHODS}
    points = choose_demo_points({m: record["sweep_candidates"][m] for m in DEMO_METHODS}, record["demo_kl_cap"])
    return {m: {"value": float(points[m]["value"]), "lr": lr[m]} for m in DEMO_METHODS}, record["chosen_by"]
