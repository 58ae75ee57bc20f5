"""`wspo study` end to end on tiny random models (the demo tests' stand-ins), once per module: every output and
field, four points per training method, prompt sets disjoint in titles, the test prompts read by the final
evaluation alone, and a rerun that skips every finished stage. The rules of `wspo_lightning.protocol` are checked on
worked numbers.

The real study (SmolLM2-135M-Instruct, VADER) is the same chain with bigger settings, run by hand (`make study`).
"""

from __future__ import annotations

import ast
import dataclasses
import doctest
import json
import math
from pathlib import Path

import pytest
from helpers import LetterReward

from wspo_lightning import protocol
from wspo_lightning.cli import main as wspo_main
from wspo_lightning.demo.prompts import split_by_title, title
from wspo_lightning.io import read_jsonl
from wspo_lightning.pipeline.stage import RUNS
from wspo_lightning.study import command, data, decode
from wspo_lightning.study.settings import PRESETS, TRAINED, StudySettings
from wspo_lightning.tiny import build_tokenizer, write_tiny_model

# the quick preset, smaller still: tiny models, a few prompts and tokens
TINY = dataclasses.replace(
    PRESETS["quick"], n_tuning_prompts=4, n_test_prompts=4, eval_samples=2, max_new_tokens=8, sample_batch_size=16,
    weak_layers=1, distill_epochs=1, val_fraction=0.2,
)  # fmt: skip
FIELDS = {
    "method",
    "knob",
    "value",
    "split",
    "seed",
    "gold_reward_mean",
    "gold_reward_ci",
    "kl",
    "kl_ci",
    "mean_length",
    "distinct_2",
    "top_word",
    "diff_vs_baseline",
    "diff_vs_baseline_ci",
    "extrapolates",
}
STUDY = Path(__file__).resolve().parents[1] / "src" / "wspo_lightning" / "study"


@pytest.fixture(scope="module")
def study_run(tmp_path_factory, one_torch_thread):
    root = tmp_path_factory.mktemp("study")
    strong = write_tiny_model(root / "strong", "llama", num_layers=2, hidden_size=64, tokenizer=build_tokenizer())
    out = root / "study_out"
    reads = data.READS["test"]
    results = command.run_study(str(out), strong=str(strong), reward=LetterReward(), settings=TINY)
    return out, strong, results, data.READS["test"] - reads


def test_study_writes_every_output_and_every_field(study_run):
    out, _, results, _ = study_run
    for path in [
        "data/prompts_train.jsonl",
        "data/prompts_tuning.jsonl",
        "data/prompts_test.jsonl",
        "results.json",
        "matched_kl.json",
        "frontier.png",
        "study.md",
        "seed0/data/pairs.jsonl",
        "seed0/models/weak_aligned/model.safetensors",
        "seed0/models/weak_aligned_own/model.safetensors",
        "seed0/protocol/learning_rate.json",
        "seed0/protocol/expo.json",
        "seed0/protocol/demo.json",
        "seed0/eval/test.json",
        "seed0/timings.json",
    ]:
        assert (out / path).exists(), path
    assert json.loads((out / "results.json").read_text()) == results
    for r in results:
        assert FIELDS <= set(r), r["name"]
        assert r["split"] in ("tuning", "test") and r["seed"] == 0
        assert r["gold_reward_ci"][0] <= r["gold_reward_mean"] <= r["gold_reward_ci"][1]
        assert (r["kl_ci"] is None) == (r["method"] in ("bon", "cbs"))
        assert (r["extrapolates"] is None) != r["method"].startswith("expo-")
    test = [r for r in results if r["split"] == "test"]
    for r in test:
        if r["method"] == "bon":  # KL: the analytic bound of best-of-N
            assert r["kl"] == pytest.approx(math.log(r["value"]) - (r["value"] - 1) / r["value"])
        if r["method"] == "cbs":  # no likelihood, no bound: compared at equal budget
            assert r["kl"] is None
    methods = {r["method"] for r in test}
    assert methods == {"base", *TRAINED, "expo-wspo", "expo-dpo", "wspo-own", "dpo-own", "proxy", "bon", "cbs"}
    # one fluent preference dataset: the strong base's own samples, best vs worst
    pairs = read_jsonl(out / "seed0/data/pairs.jsonl")
    strong_samples = read_jsonl(out / "seed0/data/strong_train.scored.jsonl")
    assert {p["chosen"] for p in pairs} <= {s["response"] for s in strong_samples}
    matched = json.loads((out / "matched_kl.json").read_text())["0"]
    assert matched["targets"] == TINY.matched_kls and "dpo" in matched["diff_vs_baseline"]
    assert list((out / "seed0" / "wandb").glob("offline-run-*"))
    report = (out / "study.md").read_text()
    assert "Gold reward at matched KL" in report and "CBS at N=2 is " in report
    # the trained strong models are removed once evaluated; the weak pairs stay
    assert sorted(p.name for p in (out / "seed0/models").iterdir()) == ["weak_aligned", "weak_aligned_own", "weak_base"]


def test_every_training_method_has_the_same_number_of_points_at_least_four(study_run):
    _, _, results, _ = study_run
    for split in ("tuning", "test"):
        counts = {m: sum(r["method"] == m and r["split"] == split for r in results) for m in TRAINED}
        assert min(counts.values()) >= 4, counts
    test_counts = {m: sum(r["method"] == m and r["split"] == "test" for r in results) for m in TRAINED}
    assert len(set(test_counts.values())) == 1
    chosen = json.loads((study_run[0] / "seed0/protocol/learning_rate.json").read_text())["chosen"]
    for r in results:  # every test point of a method at the rate its rule chose on the tuning prompts
        if r["split"] == "test" and r["method"] in TRAINED:
            assert r["learning_rate"] == chosen[r["method"]]


def test_the_demos_settings_record_gives_back_what_the_study_chose(study_run):
    protocol_dir = study_run[0] / "seed0/protocol"
    record = json.loads((protocol_dir / "demo_settings.json").read_text())
    chosen, chosen_by = protocol.demo_defaults(record)
    lr = json.loads((protocol_dir / "learning_rate.json").read_text())["chosen"]
    points = json.loads((protocol_dir / "demo.json").read_text())["chosen"]
    assert chosen == {m: {"value": points[m]["value"], "lr": lr[m]} for m in protocol.DEMO_METHODS}
    assert "seed 0" in chosen_by and "tuning prompts" in chosen_by


def test_no_title_or_premise_appears_in_two_prompt_sets(study_run):
    out = study_run[0]
    sets = {s: read_jsonl(out / "data" / f"prompts_{s}.jsonl") for s in ("train", "tuning", "test")}
    assert [len(v) for v in sets.values()] == [TINY.n_train_prompts, TINY.n_tuning_prompts, TINY.n_test_prompts]
    titles = {s: {title(r["prompt"]) for r in records} for s, records in sets.items()}
    assert not titles["train"] & titles["tuning"] and not titles["train"] & titles["test"]
    assert not titles["tuning"] & titles["test"]
    train, tuning, test = split_by_title(144, 40, 40)
    for a, b in ((train, tuning), (train, test), (tuning, test)):
        assert not {title(r["prompt"]) for r in a} & {title(r["prompt"]) for r in b}
        premises = [p for p in _premises() if any(p in r["prompt"] for r in a)]
        assert not any(p in r["prompt"] for p in premises for r in b)
    assert split_by_title(60, 40, 40)[1:] == (tuning, test)  # fewer training prompts move no other prompt


def _premises() -> list[str]:
    from wspo_lightning.demo import prompts

    return prompts._PREMISES


def test_the_test_prompts_are_read_once_by_the_final_evaluation_alone(study_run):
    assert study_run[3] == 1  # one read per seed
    with pytest.raises(ValueError, match="final evaluation"):
        data.prompts(study_run[0] / "data", "test")
    # in the study's code, one function calls the accessor and only the accessor names the test file
    callers, naming = set(), set()
    for path in STUDY.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.Attribute | ast.Name) and "test_prompts" in (
                        getattr(inner, "attr", None),
                        getattr(inner, "id", None),
                    ):
                        callers.add(node.name)
                    if isinstance(inner, ast.Constant) and "prompts_test" in str(inner.value):
                        naming.add(node.name)
    assert callers == {"final_evaluation"}
    assert naming == {"test_prompts"}


def test_a_rerun_skips_every_finished_stage(study_run):
    out, strong, results, _ = study_run
    ran, reads = RUNS["ran"], data.READS["test"]
    again = command.run_study(str(out), strong=str(strong), reward=LetterReward(), settings=TINY)
    assert RUNS["ran"] == ran  # no stage did its work again, though the trained models are gone
    assert again == results and data.READS["test"] == reads + 1


def test_the_rules_pick_on_tuning_summaries_as_their_docstrings_say():
    assert doctest.testmod(protocol).failed == 0
    lrs = [
        {"value": 1e-5, "gold_reward_mean": 0.10, "kl": 0.5},
        {"value": 3e-5, "gold_reward_mean": 0.30, "kl": 3.0},
        {"value": 1e-4, "gold_reward_mean": 0.60, "kl": 12.0},  # the best reward, past the cap
    ]
    assert protocol.choose_learning_rate(lrs, cap=8.0) == 3e-5
    assert protocol.choose_learning_rate([dict(c, kl=20.0) for c in lrs], cap=8.0) == 1e-5  # none within: least KL
    demo = protocol.choose_demo_points({"wspo": [dict(c) for c in lrs]}, cap=5.0)
    assert demo["wspo"]["value"] == 3e-5
    assert decode.cbs_shape(2) == (1, 2) and decode.cbs_shape(8) == (2, 4) and decode.cbs_shape(16) == (4, 4)


def test_matched_kl_verdicts_come_from_intervals_and_say_where_a_frontier_does_not_reach():
    from wspo_lightning.study.report import matched_verdicts

    rows = [
        {"kl_target": 2.0, "diff": -0.05, "ci": [-0.2, 0.1], "kept_draws": 950},  # below zero, interval spans it
        {"kl_target": 4.0, "diff": 0.12, "ci": [0.02, 0.2], "kept_draws": 990},
        {"kl_target": 8.0, "diff": None, "ci": None, "kept_draws": 0},
    ]
    text = matched_verdicts({"n_boot": 1000, "diff_vs_baseline": {"dpo": rows}})
    assert text[0].startswith("- WSPO at 2 nats is not distinguishable from DPO at the same KL: -0.050")
    assert text[1].startswith("- WSPO at 4 nats is above DPO at the same KL: +0.120")
    assert text[2].endswith("does not reach the KL: DPO at 8")


def test_every_method_gets_a_grid_of_the_same_length():
    with pytest.raises(Exception, match="same number of points"):
        StudySettings(dpo_betas=[0.1, 0.05, 0.025])


def test_wspo_study_command_passes_preset_seed_and_overrides(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(command, "run_study", lambda *args: seen.append(args))
    assert wspo_main(["study", "--quick", "--out", str(tmp_path), "--settings.seed", "2"]) == 0
    out, quick, force, _, _, _, settings = seen[0]
    assert (out, quick, force, settings.seed) == (str(tmp_path), True, False, 2)
    assert settings.n_train_prompts == PRESETS["quick"].n_train_prompts


def test_the_summary_over_seeds_tabulates_each_point_and_each_matched_kl_per_seed(tmp_path):
    from wspo_lightning.study.report import summary

    for seed, (lift, gap) in enumerate([(0.30, 0.10), (0.10, -0.02)]):
        folder = tmp_path / f"seed{seed}"
        folder.mkdir()
        rows = [
            {"method": "base", "knob": "strength", "value": 0.0, "diff": 0.0, "lr": None},
            {"method": "wspo", "knob": "gamma", "value": 1.0, "diff": lift, "lr": 1e-5 * (seed + 1)},
        ]
        results = [
            {
                "name": f"{r['method']} (lr {r['lr']})",  # the rate chosen differs by seed: matched by setting
                "method": r["method"],
                "knob": r["knob"],
                "value": r["value"],
                "split": "test",
                "seed": seed,
                "diff_vs_baseline": r["diff"],
                "diff_vs_baseline_ci": [r["diff"] - 0.1, r["diff"] + 0.1],
                "baseline": "strong base",
                "kl": 2.0,
            }
            for r in rows
        ]
        (folder / "results.json").write_text(json.dumps(results))
        diffs = {"dpo": [{"kl_target": 2.0, "diff": gap, "ci": [gap - 0.05, gap + 0.05], "kept_draws": 900}]}
        (folder / "matched_kl.json").write_text(json.dumps({"diff_vs_baseline": diffs}))
        (folder / "study.md").write_text(f"## Seed {seed}\n")
        (folder / "frontier.png").write_bytes(b"png")
    summary(tmp_path)
    text = (tmp_path / "study.md").read_text()
    assert "| WSPO gamma=1 (vs strong base) | +0.300 [+0.200, +0.400] | +0.100 [+0.000, +0.200] | +0.200 |" in text
    assert "| DPO, 2 | +0.100 [+0.050, +0.150] | -0.020 [-0.070, +0.030] | +0.040 | -0.020 .. +0.100 |" in text
    assert text.index("## Seed 0") < text.index("## Seed 1")
    assert set(json.loads((tmp_path / "matched_kl.json").read_text())) == {"0", "1"}
    assert len(json.loads((tmp_path / "results.json").read_text())) == 4
