"""The demo pipeline end to end on tiny random models: every stage runs and writes its outputs.

The real demo (SmolLM2-135M-Instruct, VADER) is the same chain with bigger settings; it is
measured by hand (see the README), not in CI.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from helpers import LetterReward

from wspo_lightning.cli import main as wspo_main
from wspo_lightning.demo import command
from wspo_lightning.demo.prompts import split_by_title, title
from wspo_lightning.demo.settings import CHOSEN_FILE, PRESETS, DemoSettings
from wspo_lightning.io import read_jsonl
from wspo_lightning.pipeline.stage import RUNS
from wspo_lightning.tiny import build_tokenizer, write_tiny_model

ROWS = [
    "weak base",
    "weak aligned",
    "strong base",
    "strong + WSPO (gamma=1)",
    "strong + WSPO (gamma=2)",
    "strong + WSPO (gamma=1, sign control: weak pair swapped)",
    "strong + DPO",
    "strong + SFT (chosen responses)",
    "strong + proxy (alpha=1)",
    "strong base (search sampler)",
    "strong + best-of-4",
    "strong + CBS",
    "strong + WSPO (gamma=1) + CBS",
]
SEARCH_ROWS = ROWS[10:]
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
    "baseline",
}


TINY = DemoSettings(
    n_train_prompts=24,
    n_tuning_prompts=0,
    n_eval_prompts=4,
    eval_samples=2,
    max_new_tokens=8,
    sample_batch_size=16,
    distill_prompts=12,
    weak_layers=1,
    distill_epochs=1,
    weak_dpo_epochs=1,
    strong_epochs=1,
    gammas=[1.0, 2.0],
    strong_learning_rates={"wspo": 3e-5, "dpo": 2e-5, "sft": 4e-5},
    strong_dpo_beta=0.2,
    sft_epochs=0.5,
    batch_size=4,
    proxy_row=True,
    wspo_cbs=True,
    val_fraction=0.2,
    val_checks=1,
)


def tiny_strong(root: Path) -> Path:
    return write_tiny_model(root / "strong", "llama", num_layers=2, hidden_size=64, tokenizer=build_tokenizer())


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    strong = tiny_strong(root)
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
        "samples/strong_train.scored.jsonl",
        "samples/strong_train.distill.jsonl",
        "models/weak_base/config.json",
        "models/weak_aligned/model.safetensors",
        "models/wspo_gamma1/model.safetensors",
        "models/wspo_gamma2/model.safetensors",
        "models/wspo_gamma1_sign_control/model.safetensors",
        "models/dpo/model.safetensors",
        "models/sft/model.safetensors",
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
    fits = ["weak_dpo", "wspo_gamma1", "wspo_gamma2", "wspo_gamma1_sign_control", "dpo", "sft"]
    for run in fits:
        assert (out / "configs" / f"{run}.yaml").exists(), run  # resolved by LightningCLI
        assert "train/loss" in (out / "runs" / run / "logs" / "metrics.csv").read_text()
    assert len(list((out / "wandb").glob("offline-run-*"))) == len(fits)
    for gamma in ("1", "2"):  # both WSPO fits read the frozen roles from the one cache
        assert (
            f"cache_dir: {out / 'data' / 'wspo_frozen_cache'}\n"
            in (out / f"configs/wspo_gamma{gamma}.yaml").read_text()
        )
    # the sign control's weak pair is the same one, swapped
    control = (out / "configs/wspo_gamma1_sign_control.yaml").read_text()
    assert control.index(str(out / "models/weak_aligned")) < control.index(str(out / "models/weak_base"))
    # one rule for every strong fit (epochs, schedule, frozen embeddings), each method at its own rate and strength
    for run, method in (("wspo_gamma1", "wspo"), ("wspo_gamma1_sign_control", "wspo"), ("dpo", "dpo"), ("sft", "sft")):
        config = yaml.safe_load((out / "configs" / f"{run}.as_given.yaml").read_text())
        model = config["model"]["init_args"]
        assert model["learning_rate"] == TINY.strong_learning_rates[method] and model["freeze_embeddings"] is True
        assert model["warmup_ratio"] == 0.1 and config["trainer"]["max_epochs"] == TINY.strong_epochs
        assert config["trainer"].get("limit_train_batches") == (TINY.sft_epochs if method == "sft" else None)
    assert yaml.safe_load((out / "configs" / "dpo.as_given.yaml").read_text())["model"]["init_args"]["beta"] == 0.2
    assert "freeze_embeddings: false" in (out / "configs" / "weak_dpo.as_given.yaml").read_text()
    assert json.loads((out / "models/weak_base/config.json").read_text())["num_hidden_layers"] == 1

    assert [r["name"] for r in results] == ROWS
    assert json.loads((out / "results.json").read_text()) == results
    for row in results:
        assert RESULT_KEYS <= set(row)
        per_prompt = TINY.search_samples if row["name"] in SEARCH_ROWS else TINY.eval_samples
        assert row["n"] == TINY.n_eval_prompts * per_prompt
        low, high = row["gold_reward_ci"]
        assert low <= row["gold_reward_mean"] <= high
        assert row["baseline"] == ("strong base (search sampler)" if row["name"] in SEARCH_ROWS else "strong base")
        # a selection has no likelihood; the weak models' KL to the strong base is not estimated
        assert (row["kl"] is None) == (row["name"] in SEARCH_ROWS or row["name"].startswith("weak"))
    assert sorted(p.name for p in (out / "results_logps").glob("*.jsonl")) == [f"{i:02d}.jsonl" for i in range(2, 10)]
    strong_base = results[2]
    assert abs(strong_base["kl"]) < 1e-2 and strong_base["diff_vs_baseline"] == 0.0
    # a row's KL: its sampler's log-likelihoods minus the strong base's, averaged over its samples
    for index in (8, 9):  # proxy (untempered) and the strong base under the search sampler
        slug = next((out / "samples" / "eval").glob(f"{index:02d}_*.scored.jsonl"))
        sampled, reference = read_jsonl(slug), read_jsonl(out / "results_logps" / f"{index:02d}.jsonl")
        expected = sum(s["logp"] - r["ref_logp"] for s, r in zip(sampled, reference)) / len(sampled)
        assert results[index]["kl"] == pytest.approx(expected, abs=1e-6)
    assert results[9]["kl"] > 0  # temperature 0.7 and top-k 50 move the sampler away from the model
    report = (out / "report.md").read_text()
    assert "| strong + WSPO (gamma=2) |" in report and "amplif" in report and "sign control" in report
    assert "| strong + CBS |" in report and "n/a (selection)" in report and "| weak base |" in report
    assert report.count("n/a (other model)") == 2
    assert "Precision of every stage:" in report and "What one seed can show" in report


def test_demo_decoding_rows_are_what_their_method_writes(demo_run):
    """The best-of-N and CBS rows carry the weak-pair score of what they kept, recomputed here by the weak pair,
    and were drawn with the search's sampler."""
    from wspo_lightning.decoding.scorer import WeakPairScorer
    from wspo_lightning.models import ModelSpec, load_model, load_tokenizer

    out, strong, _ = demo_run
    weak = {
        role: load_model(ModelSpec(str(out / "models" / role), dtype="bfloat16"))
        for role in ("weak_aligned", "weak_base")
    }
    scorer = WeakPairScorer(weak["weak_aligned"], weak["weak_base"], load_tokenizer(ModelSpec(str(strong))))
    for method, index in (("bon", 10), ("cbs", 11)):
        rows = read_jsonl(next((out / "samples" / "eval").glob(f"{index:02d}_*.scored.jsonl")))
        assert len(rows) == TINY.n_eval_prompts * TINY.search_samples
        assert all(r["settings"]["method"] == method and r["logp"] is None for r in rows)
        assert all(r["settings"]["temperature"] == 0.7 and r["settings"]["top_k"] == 50 for r in rows)
        prompts = scorer.prompt_ids([r["prompt"] for r in rows])
        expected = scorer.score_ids(prompts, [r["response_ids"] for r in rows])
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
    assert printed.err.count("skip:") >= 25


KILLED_RUN = """
import sys
sys.path.insert(0, {tests!r})
from helpers import LetterReward
from test_demo import TINY
from wspo_lightning.demo.command import run_demo
run_demo({out!r}, strong={strong!r}, reward=LetterReward(), settings=TINY)
"""


def test_a_demo_killed_mid_stage_and_rerun_ends_as_an_uninterrupted_run(demo_run, tmp_path):
    """kill -9 while the first WSPO fit trains (its log exists, its model not yet), then rerun: every stage's
    output was whole or absent, so the rerun redoes what was cut and ends with the same results."""
    _, strong, uninterrupted = demo_run
    out = tmp_path / "out"
    code = KILLED_RUN.format(tests=str(Path(__file__).parent), out=str(out), strong=str(strong))
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = out / "runs" / "wspo_gamma1" / "logs" / "metrics.csv"
    while not marker.exists() and process.poll() is None:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL  # killed, not finished
    assert not (out / "models" / "wspo_gamma1").exists() and (out / "models" / "weak_aligned").exists()
    assert command.run_demo(str(out), strong=str(strong), reward=LetterReward(), settings=TINY) == uninterrupted


def test_the_pairs_are_the_strong_bases_own_samples_and_the_held_out_prompts_the_studys_test_set(demo_run):
    out, _, _ = demo_run
    drawn = read_jsonl(out / "samples" / "strong_train.scored.jsonl")
    by_prompt: dict[str, list[dict]] = {}
    for record in drawn:
        by_prompt.setdefault(record["prompt"], []).append(record)
    assert {len(v) for v in by_prompt.values()} == {TINY.preference_samples}
    pairs = read_jsonl(out / "data" / "pairs.jsonl")
    assert pairs
    for pair in pairs:  # best vs worst of the prompt's draws by the gold reward
        rewards = {r["response"]: r["reward"] for r in by_prompt[pair["prompt"]]}
        assert rewards[pair["chosen"]] == max(rewards.values()) > min(rewards.values()) == rewards[pair["rejected"]]
    # the weak base learned from each prompt's first draw, of the first distill_prompts prompts
    first = [(r["prompt"], r["response"]) for r in drawn if r["sample"] == 0][: TINY.distill_prompts]
    distilled = [(r["prompt"], r["response"]) for r in read_jsonl(out / "samples" / "strong_train.distill.jsonl")]
    assert distilled == first and len(first) == TINY.distill_prompts
    # the held-out prompts are the study's test prompts: no title of them is trained on
    _, _, test = split_by_title(TINY.n_train_prompts, TINY.n_tuning_prompts, TINY.n_eval_prompts)
    held_out = read_jsonl(out / "data" / "prompts_heldout.jsonl")
    assert held_out == test
    trained_titles = {title(r["prompt"]) for r in read_jsonl(out / "data" / "prompts_train.jsonl")}
    assert not trained_titles & {title(r["prompt"]) for r in held_out}


def test_the_demos_strong_fits_default_to_what_the_studys_rules_pick_from_its_tuning_summaries():
    record = json.loads(CHOSEN_FILE.read_text())

    def best(candidates: list[dict], cap: float) -> dict:  # the rule, written out again
        within = [c for c in candidates if c["kl"] is not None and c["kl"] <= cap]
        if within:
            return sorted(within, key=lambda c: c["gold_reward_mean"], reverse=True)[0]
        return sorted(candidates, key=lambda c: float("inf") if c["kl"] is None else c["kl"])[0]

    lr = {m: best(record["learning_rate_candidates"][m], record["lr_kl_cap"])["value"] for m in ("wspo", "dpo", "sft")}
    value = {m: best(record["sweep_candidates"][m], record["demo_kl_cap"])["value"] for m in ("wspo", "dpo", "sft")}
    s = DemoSettings()
    assert s.strong_learning_rates == lr
    assert (s.gammas[0], s.strong_dpo_beta, s.sft_epochs) == (value["wspo"], value["dpo"], value["sft"])
    assert s.chosen_by == record["chosen_by"] and s.data_design == "fluent"


def test_the_former_design_pairs_the_weak_bases_own_samples(tmp_path):
    strong = tiny_strong(tmp_path)
    settings = replace(TINY, data_design="weak_samples", baselines=False, decoding_rows=False, gammas=[1.0])
    results = command.run_demo(str(tmp_path / "out"), strong=str(strong), reward=LetterReward(), settings=settings)
    assert [r["name"] for r in results] == ROWS[:4]
    samples = tmp_path / "out" / "samples"
    weak = {(r["prompt"], r["response"]) for r in read_jsonl(samples / "weak_train.scored.jsonl")}
    pairs = read_jsonl(tmp_path / "out" / "data" / "pairs.jsonl")
    assert pairs and all({(p["prompt"], p["chosen"]), (p["prompt"], p["rejected"])} <= weak for p in pairs)
    # the strong model answered once per distilled prompt
    assert len(read_jsonl(samples / "strong_train.jsonl")) == TINY.distill_prompts


def test_wspo_demo_command_passes_preset_and_overrides(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(command, "run_demo", lambda *args: seen.setdefault("args", args))
    assert wspo_main(["demo", "--quick", "--out", str(tmp_path), "--settings.gammas", "[1, 3]"]) == 0
    out, quick, force, cache_dir, strong, reward, settings = seen["args"]
    assert (out, quick, force) == (str(tmp_path), True, False)
    assert settings.gammas == [1, 3]
    assert settings.n_train_prompts == PRESETS["quick"].n_train_prompts


@pytest.mark.parametrize(
    "flags, preset",
    [
        ([], "full"),
        (["--quick"], "quick"),
        (["--quick", "true"], "quick"),
        (["--quick=true"], "quick"),
        (["--quick", "false"], "full"),
        (["--quick", "--quick=false"], "full"),
    ],
)
def test_wspo_demo_quick_flag_picks_the_preset_under_the_settings_flags(monkeypatch, flags, preset):
    seen = []
    monkeypatch.setattr(command, "run_demo", lambda *args: seen.append(args))
    assert command.main([*flags, "--force", "--settings.proxy_row", "--settings.seed", "3"]) == 0
    (_, quick, force, _, _, _, settings), expected = seen[0], PRESETS[preset]
    assert (quick, force) == (preset == "quick", True)
    assert (settings.n_train_prompts, settings.proxy_row, settings.seed) == (expected.n_train_prompts, True, 3)


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
    assert "**strong + WSPO (gamma=1)** is above the strong base: +0.350" in text
    assert "**strong + WSPO (gamma=1)** is below the weak aligned model: -0.150" in text
    assert "it does not amplify." in text
    assert "**strong + WSPO (gamma=2)** is above the weak aligned model: +0.150" in text
    assert "it amplifies." in text
    # no row is picked as the best on the evaluation prompts: every row within the bound is named
    assert "Best WSPO row" not in text
    assert "within 5 nats of KL: **strong + WSPO (gamma=1)**, **strong + WSPO (gamma=2)** (2 of 2)" in text

    # every WSPO row past the KL bound: said so, naming the closest
    for r in results:
        r["kl"] = {"strong + WSPO (gamma=1)": 5.5, "strong + WSPO (gamma=2)": 7.0}.get(r["name"], r["kl"])
    text = "\n".join(verdicts(results, rows))
    assert "Best WSPO row" not in text
    assert "No WSPO row stays within 5 nats of KL: the closest, **strong + WSPO (gamma=1)**, is at 5.50" in text
    assert "outside the KL / diversity bounds, so no amplification is claimed" in text
