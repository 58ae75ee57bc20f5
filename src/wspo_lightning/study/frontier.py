"""Reward-vs-KL frontiers of the study: point summaries, upper frontiers, gold reward at matched KL with paired
bootstrap intervals over prompts, and the frontier plot. Pure functions over per-prompt arrays.

A *point* is one setting of one method, evaluated on one split::

    {"method": "wspo", "knob": "gamma", "value": 2.0,
     "reward": [...],     # mean gold reward per prompt; one fixed prompt order shared by every point of the split
     "kl": [...] | None,  # KL to the strong base per prompt (nats per response); None: the sampler has no likelihood
     "kl_bound": 2.31}    # optional: best-of-N's analytic log N - (N-1)/N, its KL where `kl` is None

A point's KL is the mean of `kl`, else its `kl_bound`, else it has none and stays off every frontier. Every mean
weighs prompts equally; every interval resamples prompts (percentile bootstrap).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from wspo_lightning.errors import InputError

Point = dict[str, Any]


def point_kl(point: Point) -> float | None:
    """The KL a point is placed at: the mean of its per-prompt `kl`, else its `kl_bound`, else None."""
    if point.get("kl") is not None:
        return float(np.mean(point["kl"]))
    bound = point.get("kl_bound")
    return None if bound is None else float(bound)


def _label(point: Point) -> str:
    return f"{point.get('method', '?')} {point.get('knob', '?')}={point.get('value', '?')}"


def _arrays(point: Point) -> tuple[np.ndarray, np.ndarray | None]:
    """The point's per-prompt rewards and KLs (None without a likelihood), checked: same length, finite."""
    reward = np.asarray(point["reward"], dtype=float)  # [prompts]
    kl = None if point.get("kl") is None else np.asarray(point["kl"], dtype=float)  # [prompts]
    if reward.ndim != 1 or reward.size == 0:
        raise ValueError(f"point {_label(point)}: 'reward' must be a non-empty list of per-prompt means")
    if kl is not None and kl.shape != reward.shape:
        raise ValueError(f"point {_label(point)}: 'kl' has {kl.size} prompts, 'reward' {reward.size}")
    if not np.isfinite(reward).all() or (kl is not None and not np.isfinite(kl).all()):
        raise ValueError(f"point {_label(point)}: a per-prompt reward or KL is not finite")
    return reward, kl


def _frontier_indices(kls: Sequence[float | None], rewards: Sequence[float]) -> list[int]:
    """Indices of the points no other point dominates (KL no higher, reward no lower), by rising KL. Of equal
    points the first is kept, so the frontier's KLs rise strictly and so do its rewards."""
    order = sorted((i for i, k in enumerate(kls) if k is not None), key=lambda i: (kls[i], -rewards[i], i))
    kept: list[int] = []
    for i in order:
        if not kept or rewards[i] > rewards[kept[-1]]:
            kept.append(i)
    return kept


def upper_frontier(points: list[Point]) -> list[Point]:
    """The points not dominated in (higher reward, lower KL), sorted by KL (mean KL and mean reward over prompts);
    points without any KL (no `kl`, no `kl_bound`) are left out."""
    kls = [point_kl(p) for p in points]
    rewards = [float(np.mean(_arrays(p)[0])) for p in points]
    return [points[i] for i in _frontier_indices(kls, rewards)]


def _interp(xs: Sequence[float], ys: Sequence[float], target: float) -> float | None:
    """Linear interpolation on a frontier (xs rising strictly); None outside [xs[0], xs[-1]]."""
    if len(xs) == 0 or target < xs[0] or target > xs[-1]:
        return None
    return float(np.interp(target, xs, ys))


def interpolate_at(frontier: list[Point], kl_target: float) -> float | None:
    """Gold reward at `kl_target`, linear between the neighbouring frontier points (mean KL, mean reward); None
    outside the KL range the frontier covers (an end point itself counts as inside). `frontier` is
    `upper_frontier`'s output."""
    xs = [point_kl(p) for p in frontier]
    if any(x is None for x in xs) or any(b <= a for a, b in zip(xs, xs[1:])):
        raise ValueError(
            "interpolate_at needs an upper frontier (every point with a KL, KL rising): pass upper_frontier(points)"
        )
    return _interp(xs, [float(np.mean(p["reward"])) for p in frontier], kl_target)


def _interval(draws: np.ndarray, level: float) -> list[float] | None:
    """Percentile interval of the finite draws; None when there are none."""
    kept = draws[np.isfinite(draws)]
    if kept.size == 0:
        return None
    tail = (1 - level) / 2
    return [float(np.quantile(kept, tail)), float(np.quantile(kept, 1 - tail))]


def point_summary(point: Point, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """One point's numbers for results.json and the plot::

        {"gold_reward_mean": float, "gold_reward_ci": [lo, hi],
         "kl": float | None, "kl_ci": [lo, hi] | None,   # kl_ci only for a KL estimated from samples
         "kl_source": "samples" | "bound" | None,        # "bound": `kl` is the point's `kl_bound`
         "n_prompts": int}

    Intervals: percentile bootstrap over prompts, the same draws for reward and KL."""
    reward, kl = _arrays(point)
    picks = np.random.default_rng(seed).integers(0, reward.size, size=(n_boot, reward.size))  # [n_boot, prompts]
    bound = point.get("kl_bound")
    return {
        "gold_reward_mean": float(reward.mean()),
        "gold_reward_ci": _interval(reward[picks].mean(axis=1), level),
        "kl": float(kl.mean()) if kl is not None else (None if bound is None else float(bound)),
        "kl_ci": None if kl is None else _interval(kl[picks].mean(axis=1), level),
        "kl_source": "samples" if kl is not None else (None if bound is None else "bound"),
        "n_prompts": int(reward.size),
    }


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _method_draws(points: list[Point], picks: np.ndarray, targets: list[float]) -> tuple[list, np.ndarray, list]:
    """A method's interpolated rewards: at the point estimate ([targets], None outside) and per bootstrap draw
    ([n_boot, targets], NaN outside); and its frontier at the point estimate."""
    rewards, kls = [], []
    for p in points:
        reward, kl = _arrays(p)
        rewards.append((reward.mean(), reward[picks].mean(axis=1)))  # (mean, [n_boot])
        if kl is not None:
            kls.append((kl.mean(), kl[picks].mean(axis=1)))
        else:
            bound = p.get("kl_bound")
            kls.append(None if bound is None else (float(bound), np.full(len(picks), float(bound))))
    mean_kl = [None if k is None else float(k[0]) for k in kls]
    mean_r = [float(r[0]) for r in rewards]
    front = _frontier_indices(mean_kl, mean_r)
    estimate = [_interp([mean_kl[i] for i in front], [mean_r[i] for i in front], t) for t in targets]
    boot_kl = [None if k is None else k[1] for k in kls]
    boot_r = np.stack([r[1] for r in rewards]) if rewards else np.zeros((0, len(picks)))  # [points, n_boot]
    draws = np.full((len(picks), len(targets)), np.nan)
    for b in range(len(picks)):
        kl_b = [None if k is None else float(k[b]) for k in boot_kl]
        r_b = boot_r[:, b].tolist()
        idx = _frontier_indices(kl_b, r_b)
        xs, ys = [kl_b[i] for i in idx], [r_b[i] for i in idx]
        for j, t in enumerate(targets):
            value = _interp(xs, ys, t)
            draws[b, j] = np.nan if value is None else value
    frontier = [
        {
            "knob": _plain(points[i].get("knob")),
            "value": _plain(points[i].get("value")),
            "kl": mean_kl[i],
            "gold_reward_mean": mean_r[i],
        }
        for i in front
    ]
    return estimate, draws, frontier


def matched_kl(
    points_by_method: dict[str, list[Point]],
    targets: Sequence[float] = (1, 2, 4, 8),
    baseline: str | None = "wspo",
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """Each method's gold reward at each KL target, interpolated on its upper frontier, and `baseline` minus every
    other method there, with percentile bootstrap intervals over prompts.

    Every point of every method must be evaluated on the same prompts in the same order. One set of draws
    resamples prompt indices; each draw applies the same indices to every point of every method, recomputes
    the point means, each frontier and each interpolation (so the differences are paired). A draw whose
    interpolation falls outside its frontier's KL range is dropped for that cell; `kept_draws` counts the
    rest (an interval from far fewer than `n_boot` draws is conditional on staying inside the range: read it
    with that count). JSON-ready; null where undefined::

        {"targets": [1.0, 2.0, 4.0, 8.0], "baseline": "wspo" | None, "level": 0.95, "n_boot": 1000,
         "seed": 0, "n_prompts": 40,
         "methods": {"wspo": {
             "n_points": 5,
             "no_kl": ["cbs N=4", ...],                  # points off every frontier: neither kl nor kl_bound
             "kl_range": [0.4, 9.1] | None,              # the KL span of its frontier (point estimate)
             "frontier": [{"knob", "value", "kl", "gold_reward_mean"}, ...],  # by rising KL
             "at": [{"kl_target": 1.0, "gold_reward": 0.31 | None, "ci": [lo, hi] | None,
                     "kept_draws": 987}, ...]}, ...},     # one row per target, in `targets` order
         "diff_vs_baseline": {"dpo": [{"kl_target": 1.0, "diff": 0.05 | None, "ci": [lo, hi] | None,
                                       "kept_draws": 960}, ...], ...}}   # {} when baseline is None

    `gold_reward` / `diff` is null where the point estimate lies outside the range (then `ci` is null too,
    whatever `kept_draws` says); `ci` is null where no draw was kept."""
    if baseline is not None and baseline not in points_by_method:
        raise ValueError(
            f"baseline {baseline!r} is not among the methods {sorted(points_by_method)}: "
            "name one of them, or pass baseline=None"
        )
    targets = [float(t) for t in targets]
    sizes = {_arrays(p)[0].size for points in points_by_method.values() for p in points}
    if len(sizes) > 1:
        raise ValueError(f"points are evaluated on different numbers of prompts {sorted(sizes)}: use one split")
    n_prompts = sizes.pop() if sizes else 0
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, max(n_prompts, 1), size=(n_boot, n_prompts))  # [n_boot, prompts], shared by all
    methods, draws, estimates = {}, {}, {}
    for method, points in points_by_method.items():
        estimate, method_draws, frontier = _method_draws(points, picks, targets)
        estimates[method], draws[method] = estimate, method_draws
        kept = np.isfinite(method_draws).sum(axis=0)
        methods[method] = {
            "n_points": len(points),
            "no_kl": [_label(p) for p in points if point_kl(p) is None],
            "kl_range": [frontier[0]["kl"], frontier[-1]["kl"]] if frontier else None,
            "frontier": frontier,
            "at": [
                {
                    "kl_target": t,
                    "gold_reward": estimate[j],
                    "ci": None if estimate[j] is None else _interval(method_draws[:, j], level),
                    "kept_draws": int(kept[j]),
                }
                for j, t in enumerate(targets)
            ],
        }
    diffs = {}
    for method in points_by_method:
        if baseline is None or method == baseline:
            continue
        paired = draws[baseline] - draws[method]  # NaN where either is outside its range: dropped  [n_boot, targets]
        rows = []
        for j, t in enumerate(targets):
            mine, theirs = estimates[baseline][j], estimates[method][j]
            diff = None if mine is None or theirs is None else mine - theirs
            rows.append(
                {
                    "kl_target": t,
                    "diff": diff,
                    "ci": None if diff is None else _interval(paired[:, j], level),
                    "kept_draws": int(np.isfinite(paired[:, j]).sum()),
                }
            )
        diffs[method] = rows
    return {
        "targets": targets,
        "baseline": baseline,
        "level": level,
        "n_boot": n_boot,
        "seed": seed,
        "n_prompts": n_prompts,
        "methods": methods,
        "diff_vs_baseline": diffs,
    }


def plot_frontier(
    points_by_method: dict[str, list[Point]],
    path: str | Path,
    title: str,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> Path:
    """Write a PNG: gold reward against KL to the strong base, one line per method along its upper frontier,
    every point with its reward interval (vertical) and KL interval (horizontal, where estimated from samples).
    Filled markers lie on the frontier, hollow ones are dominated; diamonds and a dashed line mark KLs that are
    `kl_bound`s (best-of-N's analytic bound; a CBS point given its budget-matched best-of-N bound). Points with
    no KL at all are listed in a note under the plot. Needs matplotlib (the `demo` extra)."""
    try:
        from matplotlib import colormaps
        from matplotlib.figure import Figure
    except ImportError as err:
        raise InputError(
            "plot_frontier needs matplotlib: pip install matplotlib (or pip install 'wspo-lightning[demo]')"
        ) from err

    fig = Figure(figsize=(8, 5.5))
    ax = fig.add_subplot()
    palette = colormaps["tab20"]
    unplaced = []
    for k, (method, points) in enumerate(points_by_method.items()):
        color = palette((2 * k) % 20 + (k // 10) % 2)  # tab20's dark shades, then its light ones: 20 apart
        placed = [p for p in points if point_kl(p) is not None]
        unplaced += [_label({**p, "method": method}) for p in points if point_kl(p) is None]
        if not placed:
            continue
        front = upper_frontier(placed)
        on_front = {id(p) for p in front}
        dashed = all(p.get("kl") is None for p in front)
        ax.plot(
            [point_kl(p) for p in front],
            [float(np.mean(p["reward"])) for p in front],
            color=color,
            ls="--" if dashed else "-",
            label=method,
        )
        for p in placed:
            s = point_summary(p, n_boot, seed, level)
            x, y = s["kl"], s["gold_reward_mean"]
            lo, hi = s["gold_reward_ci"]
            xerr = None if s["kl_ci"] is None else [[max(x - s["kl_ci"][0], 0.0)], [max(s["kl_ci"][1] - x, 0.0)]]
            ax.errorbar(
                x,
                y,
                xerr=xerr,
                yerr=[[max(y - lo, 0.0)], [max(hi - y, 0.0)]],
                fmt="o" if s["kl_source"] == "samples" else "D",
                color=color,
                mfc=color if id(p) in on_front else "white",
                capsize=2,
                lw=0.8,
            )
            ax.annotate(str(p.get("value", "")), (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_xscale("symlog", linthresh=1.0)
    top = max([point_kl(p) or 0.0 for points in points_by_method.values() for p in points] or [1.0])
    ticks = [t for t in (0, 0.5, 1, 2, 4, 8, 16, 32, 64, 128) if t <= max(top, 1.0) * 1.5]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.set_xlabel("KL to the strong base (nats per response; symlog axis)")
    ax.set_ylabel("mean gold reward")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    note = (
        f"Bars: {level:.0%} bootstrap intervals over prompts. Filled: on the upper frontier; hollow: dominated; "
        "diamonds / dashed: KL is a bound (log N - (N-1)/N), not an estimate."
    )
    if unplaced:
        note += "\nNo KL, not drawn: " + "; ".join(unplaced)
    fig.text(0.01, 0.01, note, fontsize=7, va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.07 + 0.03 * bool(unplaced), 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
