"""The study's frontier arithmetic, checked by hand: which points make the upper frontier, the gold reward
interpolated at a KL, the bootstrap over prompts (collapsing when prompts are identical, paired across
methods), the JSON the runner writes, and the plot."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

from wspo_lightning.errors import InputError
from wspo_lightning.study.frontier import (
    interpolate_at,
    matched_kl,
    plot_frontier,
    point_kl,
    point_summary,
    upper_frontier,
)
from wspo_lightning.verdicts import verdict


def point(value, reward, kl, method="wspo", **extra) -> dict:
    return {"method": method, "knob": "gamma", "value": value, "reward": reward, "kl": kl, **extra}


# Two prompts each; (mean KL, mean reward):
#   A (1, 0.2)   B (3, 0.4)   C (4, 0.2): B has less KL and more reward   D (5, 0.6)
#   E (3.5, 0.4): B has the same reward at less KL   F: no KL at all (reward 10, still off the frontier)
A = point("A", [0.1, 0.3], [0.5, 1.5])
B = point("B", [0.3, 0.5], [2.0, 4.0])
C = point("C", [0.2, 0.2], [4.0, 4.0])
D = point("D", [0.5, 0.7], [4.0, 6.0])
E = point("E", [0.4, 0.4], [3.0, 4.0])
F = point("F", [10.0, 10.0], None)


def test_the_upper_frontier_keeps_undominated_points_by_rising_kl():
    frontier = upper_frontier([D, C, F, B, E, A])
    assert [p["value"] for p in frontier] == ["A", "B", "D"]  # C and E dominated by B, F has no KL


def test_interpolation_is_linear_between_neighbouring_frontier_points():
    frontier = upper_frontier([A, B, C, D, E, F])
    # KL 2 lies halfway between A (1, 0.2) and B (3, 0.4): 0.2 + (2 - 1) / (3 - 1) * (0.4 - 0.2) = 0.3
    assert interpolate_at(frontier, 2.0) == pytest.approx(0.3)
    # KL 4 lies halfway between B (3, 0.4) and D (5, 0.6): 0.4 + (4 - 3) / (5 - 3) * (0.6 - 0.4) = 0.5
    assert interpolate_at(frontier, 4.0) == pytest.approx(0.5)
    # KL 4.5: 0.4 + 1.5 / 2 * 0.2 = 0.55
    assert interpolate_at(frontier, 4.5) == pytest.approx(0.55)
    # the end points count as inside
    assert interpolate_at(frontier, 1.0) == pytest.approx(0.2)
    assert interpolate_at(frontier, 5.0) == pytest.approx(0.6)


def test_interpolation_is_none_outside_the_kl_range_the_frontier_covers():
    frontier = upper_frontier([A, B, D])
    assert interpolate_at(frontier, 0.99) is None
    assert interpolate_at(frontier, 8.0) is None
    assert interpolate_at([], 1.0) is None
    assert interpolate_at(upper_frontier([F]), 1.0) is None  # no KL, no frontier


def test_a_best_of_n_point_stands_at_its_kl_bound():
    # best-of-4: log 4 - 3/4 = 1.3863 - 0.75 = 0.6363
    bon = point(4, [0.3, 0.3], None, method="best-of-n", knob="n", kl_bound=math.log(4) - 3 / 4)
    assert point_kl(bon) == pytest.approx(0.6363, abs=1e-4)
    assert [p["value"] for p in upper_frontier([A, bon])] == [4]  # less KL and more reward than A
    summary = point_summary(bon, n_boot=50)
    assert summary["kl"] == pytest.approx(0.6363, abs=1e-4)
    assert (summary["kl_ci"], summary["kl_source"]) == (None, "bound")


def test_point_summary_intervals_collapse_when_every_prompt_is_the_same():
    summary = point_summary(point(1, [0.25] * 10, [2.0] * 10), n_boot=200)
    assert summary["gold_reward_mean"] == 0.25 and summary["gold_reward_ci"] == [0.25, 0.25]
    assert summary["kl"] == 2.0 and summary["kl_ci"] == [2.0, 2.0]
    assert (summary["kl_source"], summary["n_prompts"]) == ("samples", 10)


def test_the_matched_kl_bootstrap_collapses_to_the_point_when_every_prompt_is_the_same():
    # (1, 0.25) and (3, 0.75): at KL 2, 0.25 + (2 - 1) / 2 * 0.5 = 0.5 in every draw
    flat = [point(1, [0.25] * 10, [1.0] * 10), point(2, [0.75] * 10, [3.0] * 10)]
    out = matched_kl({"wspo": flat}, targets=(1, 2, 4), n_boot=200)
    at = {row["kl_target"]: row for row in out["methods"]["wspo"]["at"]}
    assert at[2.0] == {"kl_target": 2.0, "gold_reward": 0.5, "ci": [0.5, 0.5], "kept_draws": 200}
    assert at[1.0]["gold_reward"] == 0.25 and at[1.0]["ci"] == [0.25, 0.25]
    assert at[4.0] == {"kl_target": 4.0, "gold_reward": None, "ci": None, "kept_draws": 0}  # outside [1, 3]
    assert out["methods"]["wspo"]["kl_range"] == [1.0, 3.0]
    assert out["diff_vs_baseline"] == {}


def _noisy_sweep(rng: np.random.Generator, shift: float, method: str) -> list[dict]:
    """Four points at KL about 1, 3, 6, 10 on 30 prompts, rewards noisy across prompts (sd 1)."""
    prompt_reward = rng.normal(0.0, 1.0, size=30)
    prompt_kl = rng.uniform(0.8, 1.2, size=30)
    return [
        point(v, (prompt_reward + 0.1 * v + shift).tolist(), (prompt_kl * v).tolist(), method=method)
        for v in (1.0, 3.0, 6.0, 10.0)
    ]


def test_a_method_better_by_a_constant_on_every_prompt_wins_by_a_paired_interval_excluding_zero():
    noise = np.random.default_rng(7)
    dpo = _noisy_sweep(noise, 0.0, "dpo")
    wspo = [{**p, "method": "wspo", "reward": [r + 0.1 for r in p["reward"]]} for p in dpo]
    out = matched_kl({"wspo": wspo, "dpo": dpo}, targets=(2, 4, 8), n_boot=300)
    for row in out["diff_vs_baseline"]["dpo"]:
        assert row["diff"] == pytest.approx(0.1)
        assert row["ci"] == pytest.approx([0.1, 0.1]) and row["ci"][0] > 0
        assert 0 < row["kept_draws"] <= 300
        assert "is above" in verdict(row["diff"], row["ci"], "WSPO", "DPO")
    # unpaired, the two methods' intervals overlap: only the pairing shows the difference
    wspo_ci = out["methods"]["wspo"]["at"][0]["ci"]
    dpo_ci = out["methods"]["dpo"]["at"][0]["ci"]
    assert wspo_ci[0] < dpo_ci[1]


def test_matched_kl_is_json_ready_with_nulls_where_undefined():
    noise = np.random.default_rng(3)
    cbs = [point(n, [0.5] * 30, None, method="cbs", knob="n") for n in (2, 4)]
    points = {"wspo": _noisy_sweep(noise, 0.2, "wspo"), "dpo": _noisy_sweep(noise, 0.0, "dpo"), "cbs": cbs}
    out = matched_kl(points, n_boot=100)
    text = json.dumps(out, allow_nan=False)
    assert json.loads(text) == out
    assert out["targets"] == [1.0, 2.0, 4.0, 8.0] and out["n_prompts"] == 30 and out["baseline"] == "wspo"
    assert out["methods"]["cbs"]["kl_range"] is None and out["methods"]["cbs"]["no_kl"] == ["cbs n=2", "cbs n=4"]
    assert all(row["gold_reward"] is None and row["ci"] is None for row in out["methods"]["cbs"]["at"])
    assert all(row["diff"] is None and row["ci"] is None for row in out["diff_vs_baseline"]["cbs"])
    assert [f["value"] for f in out["methods"]["wspo"]["frontier"]] == [1.0, 3.0, 6.0, 10.0]


def test_matched_kl_refuses_points_on_different_prompts_and_an_unknown_baseline():
    with pytest.raises(ValueError, match="different numbers of prompts"):
        matched_kl({"wspo": [A, point("x", [0.1] * 3, [1.0] * 3)]}, n_boot=10)
    with pytest.raises(ValueError, match="baseline 'wspo' is not among the methods"):
        matched_kl({"dpo": [A]}, n_boot=10)


def test_plot_frontier_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib", reason="plot_frontier draws with matplotlib (the demo extra)")
    noise = np.random.default_rng(0)
    bon = [
        point(n, [0.3 + 0.05 * n] * 30, None, method="best-of-n", knob="n", kl_bound=math.log(n) - (n - 1) / n)
        for n in (2, 4)
    ]
    cbs = [point(2, [0.4] * 30, None, method="cbs", knob="n")]
    points = {
        "wspo": _noisy_sweep(noise, 0.2, "wspo"),
        "dpo": _noisy_sweep(noise, 0.0, "dpo"),
        "best-of-n": bon,
        "cbs": cbs,
    }
    path = plot_frontier(points, tmp_path / "out" / "frontier.png", "test frontier", n_boot=50)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_frontier_without_matplotlib_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # `import` of it now raises ImportError
    with pytest.raises(InputError, match="pip install matplotlib"):
        plot_frontier({"wspo": [A]}, tmp_path / "frontier.png", "t")
