"""Verdict sentences come from intervals, never from the sign of a mean: the rule itself, and the demo report
that prints it (a sign control below zero whose interval spans zero is not a direction)."""

from __future__ import annotations

import doctest
import json
from types import SimpleNamespace

import pytest

from wspo_lightning import verdicts as verdicts_module
from wspo_lightning.verdicts import direction, verdict

OLD_SIGN_CONTROL = "below zero: the effect follows the weak pair's signal"


def test_a_mean_below_zero_whose_interval_spans_zero_is_not_distinguishable_from_the_base():
    # seed 2 of the demo: -0.058 [-0.179, +0.071]
    sentence = verdict(-0.058, (-0.179, 0.071))
    assert sentence == "The effect is not distinguishable from the base: -0.058 (95% CI [-0.179, +0.071])."
    assert "below" not in sentence


def test_the_interval_alone_decides_whatever_the_sign_of_the_mean():
    assert "is above the base" in verdict(0.292, (0.178, 0.412))
    assert "is below the base" in verdict(-0.2, (-0.3, -0.1))
    assert "not distinguishable from the base" in verdict(0.05, (-0.01, 0.11))
    # an interval that touches zero does not exclude it
    assert direction((0.0, 0.4)) == "not distinguishable"
    assert direction((-0.4, 0.0)) == "not distinguishable"
    # the verdict follows the interval even where a mean sits outside it (e.g. a skewed bootstrap)
    assert direction((0.01, 0.2)) == "above" and "is above" in verdict(-0.001, (0.01, 0.2))


def test_verdict_names_the_target_the_subject_the_note_and_the_level():
    sentence = verdict(-0.25, (-0.4, -0.1), what="the sign control", against="the strong base", note="at KL 2.00 nats")
    assert sentence == ("The sign control is below the strong base: -0.250 (95% CI [-0.400, -0.100]), at KL 2.00 nats.")
    assert "(90% CI" in verdict(0.1, (0.05, 0.15), level=0.9)


def test_a_reversed_interval_is_refused():
    with pytest.raises(ValueError, match="lower end above its upper end"):
        direction((0.3, -0.1))


def test_the_module_examples_hold():
    assert doctest.testmod(verdicts_module).failed == 0


def _result(name: str, mean: float, ci: list[float], diff: float | None = None, diff_ci=None, kl=0.5) -> dict:
    row = {
        "name": name,
        "gold_reward_mean": mean,
        "gold_reward_ci": ci,
        "kl": kl,
        "kl_ci": None if kl is None else [kl - 0.1, kl + 0.1],
        "mean_length": 20.0,
        "distinct_2": 0.9,
        "top_word": ["film", 0.5],
        "n": 80,
    }
    if diff is not None:
        row |= {"baseline": "strong base", "diff_vs_baseline": diff, "diff_vs_baseline_ci": diff_ci}
    return row


HAND_MADE = [
    _result("strong base", 0.10, [0.0, 0.2], kl=0.0),
    _result("strong + WSPO (gamma=1)", 0.39, [0.3, 0.5], 0.292, [0.178, 0.412], kl=3.5),
    _result("strong + WSPO (gamma=1, sign control: weak pair swapped)", 0.04, [-0.1, 0.2], -0.058, [-0.179, 0.071]),
]


def test_the_demo_verdicts_call_a_sign_control_spanning_zero_not_distinguishable():
    from wspo_lightning.demo.report import verdicts

    text = "\n".join(verdicts(HAND_MADE, rows=[]))
    assert "The sign control is not distinguishable from the strong base: -0.058 (95% CI [-0.179, +0.071])." in text
    assert OLD_SIGN_CONTROL not in text and "follows the weak pair's signal" not in text
    assert "**strong + WSPO (gamma=1)** is above the strong base: +0.292 (95% CI [+0.178, +0.412]), at KL 3.50" in text

    below = [*HAND_MADE[:2], _result(HAND_MADE[2]["name"], -0.1, [-0.2, 0.0], -0.2, [-0.3, -0.1])]
    text = "\n".join(verdicts(below, rows=[]))
    assert "The sign control is below the strong base: -0.200" in text
    assert "The effect follows the weak pair's signal, not the training text." in text


@pytest.mark.filterwarnings("ignore:No artists with labels")  # no training runs to plot in a hand-made report
def test_the_demo_report_file_prints_the_interval_verdict_and_not_the_old_sentence(tmp_path):
    pytest.importorskip("matplotlib", reason="the demo report draws its plots with matplotlib (the demo extra)")
    from wspo_lightning.demo.report import write_report

    (tmp_path / "results.json").write_text(json.dumps(HAND_MADE))
    settings = {
        "eval_on": "heldout",
        "n_eval_prompts": 40,
        "eval_samples": 2,
        "search_samples": 1,
        "max_new_tokens": 48,
        "strong_learning_rates": {"wspo": 5e-5, "dpo": 3e-5, "sft": 1e-5},
        "gammas": [1.0],
        "strong_dpo_beta": 0.1,
        "sft_epochs": 1.0,
        "chosen_by": "a test",
        "strong_epochs": 1,
        "strong_batch_size": 4,
        "batch_size": 8,
        "weak_layers": "0-3, 29",
        "data_design": "fluent",
        "preference_samples": 4,
        "train_top_k": 50,
    }
    (tmp_path / "settings.json").write_text(json.dumps(settings))
    (tmp_path / "runs").mkdir()
    precision = SimpleNamespace(dtype="bfloat16", trainer_precision="bf16-true", reason="native bf16")
    write_report(tmp_path, rows=[], timings={"sample": 1.0}, precision=precision)
    report = (tmp_path / "report.md").read_text()
    assert "The sign control is not distinguishable from the strong base: -0.058" in report
    assert OLD_SIGN_CONTROL not in report
    assert "Best WSPO row" not in report
