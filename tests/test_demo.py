"""The demo pipeline end to end on tiny random models: every stage runs and writes its outputs.

The real demo (SmolLM2-135M-Instruct, VADER) is the same chain with bigger settings; it is
measured by hand (see the README), not in CI.
"""

from __future__ import annotations

import json

import pytest
from helpers import LetterReward

from wspo_lightning.cli import main as wspo_main
from wspo_lightning.demo import command
from wspo_lightning.demo.prompts import split_prompts
from wspo_lightning.demo.settings import PRESETS, DemoSettings
from wspo_lightning.io import read_jsonl
from wspo_lightning.pipeline.stage import RUNS
from wspo_lightning.tiny import build_tokenizer, write_tiny_model

ROWS = [
    "weak base",
    "weak aligned",
    "strong base",
    "strong + WSPO (gamma=1)",
    "strong + WSPO (gamma=2)",
    "strong + DPO",
    "strong + proxy (alpha=1)",
    "strong + CBS",
    "strong + WSPO (gamma=1) + CBS",
]
RESULT_KEYS = {
    "name",
    "gold_reward_mean",
    "gold_reward_ci",
    "kl",
    "mean_length",
    "n",
    "distinct_2",
    "diff_vs_baseline",
    "diff_vs_baseline_ci",
}


TINY = DemoSettings(
    n_train_prompts=24,
    n_eval_prompts=4,
    eval_samples=2,
    max_new_tokens=8,
    sample_batch_size=16,
    distill_prompts=12,
    weak_layers=1,
    distill_epochs=1,
    weak_dpo_epochs=1,
    gammas=[1.0, 2.0],
    batch_size=4,
    val_fraction=0.2,
    val_checks=1,
)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    strong = write_tiny_model(root / "strong", "llama", num_layers=2, hidden_size=64, tokenizer=build_tokenizer())
    out = root / "out"
    results = command.run_demo(str(out), strong=str(strong), reward=LetterReward(), settings=TINY)
    return out, strong, results


def test_demo_writes_every_stage_output_and_the_report(demo_run, capsys):
    out, _, results = demo_run
    for path in [
        "data/prompts_train.jsonl",
        "data/prompts_heldout.jsonl",
        "data/pairs.jsonl",
        "data/wspo_frozen_cache/manifest.json",
        "samples/strong_train.jsonl",
        "samples/weak_train.scored.jsonl",
        "models/weak_base/config.json",
        "models/weak_aligned/model.safetensors",
        "models/wspo_gamma1/model.safetensors",
        "models/wspo_gamma2/model.safetensors",
        "models/strong_dpo/model.safetensors",
        "runs/distill/logs/metrics.csv",
        "plots/gold_reward.png",
        "plots/reward_vs_kl.png",
        "plots/training.png",
        "report.md",
        "results.json",
        "timings.json",
        "settings.json",
    ]:
        assert (out / path).exists(), path
    for run in ["weak_dpo", "wspo_gamma1", "wspo_gamma2", "strong_dpo"]:
        assert (out / "configs" / f"{run}.yaml").exists(), run  # resolved by LightningCLI
        assert "train/loss" in (out / "runs" / run / "logs" / "metrics.csv").read_text()
    assert len(list((out / "wandb").glob("offline-run-*"))) == 4
    for gamma in ("1", "2"):  # both WSPO fits read the frozen roles from the one cache
        assert (
            f"cache_dir: {out / 'data' / 'wspo_frozen_cache'}\n"
            in (out / f"configs/wspo_gamma{gamma}.yaml").read_text()
        )
    assert json.loads((out / "models/weak_base/config.json").read_text())["num_hidden_layers"] == 1

    assert [r["name"] for r in results] == ROWS
    assert json.loads((out / "results.json").read_text()) == results
    for row in results:
        assert RESULT_KEYS <= set(row)
        per_prompt = TINY.cbs_samples if row["name"].endswith("CBS") else TINY.eval_samples
        assert row["n"] == TINY.n_eval_prompts * per_prompt
        low, high = row["gold_reward_ci"]
        assert low <= row["gold_reward_mean"] <= high
    strong_base = results[2]
    assert abs(strong_base["kl"]) < 1e-2 and strong_base["diff_vs_baseline"] == 0.0
    proxy, cbs, wspo_cbs = results[6:]
    assert cbs["kl"] is None and wspo_cbs["kl"] is None  # a search has no likelihood
    # the proxy row's KL: its sampler's log-likelihoods minus the strong base's, averaged over its samples
    sampled = read_jsonl(out / "samples" / "eval" / "06_strong___proxy__alpha_1.scored.jsonl")
    reference = read_jsonl(out / "results_logps" / "06.jsonl")
    expected = sum(s["logp"] - r["ref_logp"] for s, r in zip(sampled, reference)) / len(sampled)
    assert proxy["kl"] == pytest.approx(expected, abs=1e-6)
    report = (out / "report.md").read_text()
    assert "| strong + WSPO (gamma=2) |" in report and "amplif" in report
    assert "| strong + CBS |" in report and "n/a (search)" in report


def test_demo_decoding_rows_are_what_their_method_writes(demo_run):
    """The CBS rows carry the best beam's weak-pair score, recomputed here from the text by the weak pair;
    the proxy row's likelihoods make its KL estimate (one per response) positive on average."""
    from wspo_lightning.decoding.scorer import WeakPairScorer
    from wspo_lightning.models import ModelSpec, load_model, load_tokenizer

    out, strong, _ = demo_run
    weak = {
        role: load_model(ModelSpec(str(out / "models" / role), dtype="bfloat16"))
        for role in ("weak_aligned", "weak_base")
    }
    scorer = WeakPairScorer(weak["weak_aligned"], weak["weak_base"], load_tokenizer(ModelSpec(str(strong))))
    rows = read_jsonl(out / "samples/eval/07_strong___CBS.scored.jsonl")
    assert len(rows) == TINY.n_eval_prompts * TINY.cbs_samples
    assert all(r["settings"]["method"] == "cbs" and r["logp"] is None for r in rows)
    expected = scorer.score_ids(scorer.prompt_ids([r["prompt"] for r in rows]), [r["response_ids"] for r in rows])
    assert [r["score"] for r in rows] == pytest.approx(expected, abs=0.05)  # bfloat16 scoring


def test_demo_rerun_skips_finished_stages_and_prints_the_table(demo_run, capsys):
    out, strong, _ = demo_run
    stamp = (out / "models/wspo_gamma1/model.safetensors").stat().st_mtime
    ran = RUNS["ran"]
    command.run_demo(str(out), strong=str(strong), reward=LetterReward(), settings=TINY)
    assert RUNS["ran"] == ran  # no stage did its work again
    assert (out / "models/wspo_gamma1/model.safetensors").stat().st_mtime == stamp
    printed = capsys.readouterr()
    assert "| strong + DPO |" in printed.out
    assert printed.err.count("skip:") >= 15


def test_heldout_prompts_are_never_training_prompts():
    train, held_out = split_prompts(256, 60)
    assert len({r["prompt"] for r in train} | {r["prompt"] for r in held_out}) == 316


def test_wspo_demo_command_passes_preset_and_overrides(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(command, "run_demo", lambda *args: seen.setdefault("args", args))
    assert wspo_main(["demo", "--quick", "--out", str(tmp_path), "--settings.gammas", "[1, 3]"]) == 0
    out, quick, force, cache_dir, strong, reward, settings = seen["args"]
    assert (out, quick, force) == (str(tmp_path), True, False)
    assert settings.gammas == [1, 3]
    assert settings.n_train_prompts == PRESETS["quick"].n_train_prompts


def _row(name: str, rewards: list[float]) -> list[dict]:
    return [{"id": f"p{i}", "prompt": "p", "response": "r", "reward": r} for i, r in enumerate(rewards)]


def test_report_states_gain_and_amplification_honestly_either_way(tmp_path):
    from wspo_lightning.demo.report import verdicts
    from wspo_lightning.io import write_jsonl
    from wspo_lightning.pipeline.evaluate import EvalRow, row_stats

    rewards = {
        "weak aligned": [0.6] * 8,
        "strong base": [0.1] * 8,
        "strong + WSPO (gamma=1)": [0.4, 0.5] * 4,
        "strong + WSPO (gamma=2)": [0.7, 0.8] * 4,
    }
    rows, results = [], []
    for name, values in rewards.items():
        records = [
            {**r, "response_ids": [1], "num_tokens": 1, "logp": -1.0, "ref_logp": -1.5} for r in _row(name, values)
        ]
        rows.append(EvalRow(name, str(write_jsonl(tmp_path / f"{len(rows)}.jsonl", records))))
        results.append(row_stats(name, records, [{**r} for r in _row("", rewards["strong base"])], 500, 0))
    text = "\n".join(verdicts(results, rows))
    assert "**strong + WSPO (gamma=1)** beats the strong base: +0.350" in text
    assert "does not amplify: it is below the weak aligned model (-0.150" in text
    assert "amplifies: it beats the weak aligned model (+0.150" in text
