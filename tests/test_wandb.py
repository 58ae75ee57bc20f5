"""W&B, offline: the logger config adds W&B beside the CSV logger, the run config holds the model's and the
data's settings, the sample table keeps every validation's rows, `wspo evaluate` logs its table and plot,
and `wspo workspace` builds its panels from the metric names a real fit wrote."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import ROOT, LetterReward, fit, tiny_config, wandb_run_records

from wspo_lightning.callbacks import SampleTable
from wspo_lightning.cli import main as wspo
from wspo_lightning.io import read_jsonl
from wspo_lightning.models import ModelSpec
from wspo_lightning.pipeline import workspace as dashboard
from wspo_lightning.pipeline.evaluate import PLOT_KEY, TABLE_KEY, EvalRow, evaluate
from wspo_lightning.pipeline.sample import sample
from wspo_lightning.pipeline.score import score
from wspo_lightning.tiny import write_jsonl


@pytest.fixture(scope="module")
def wandb_fit(tiny_world, tmp_path_factory):
    """A tiny WSPO fit logging to CSV and, offline, to W&B, with 2 validations. Returns (cli, run folder)."""
    import wandb

    tmp = tmp_path_factory.mktemp("wandb_fit")
    patch = pytest.MonkeyPatch()
    patch.setenv("WANDB_MODE", "offline")
    patch.setenv("WANDB_DIR", str(tmp))
    logger = tmp / "wandb.yaml"
    logger.write_text(
        (ROOT / "configs" / "wandb_logger.yaml").read_text().replace("save_dir: runs", f"save_dir: {tmp / 'w'}")
    )
    cli = fit(
        tiny_config(tiny_world, tmp / "run"),
        "--config",
        str(logger),
        "--trainer.max_steps=8",
        "--trainer.val_check_interval=4",
    )
    wandb.finish()
    patch.undo()
    (run,) = (tmp / "w" / "wandb").glob("offline-run-*")
    return cli, run


def test_wandb_config_adds_wandb_beside_the_csv_logger(wandb_fit):
    cli, _ = wandb_fit
    kinds = [type(logger).__name__ for logger in cli.trainer.loggers]
    assert kinds == ["CSVLogger", "WandbLogger"]
    assert (Path(cli.trainer.loggers[0].log_dir) / "metrics.csv").exists()


def test_run_config_holds_model_and_data_settings(wandb_fit, tiny_world):
    cli, run = wandb_fit
    # The run log is protobuf records; config keys and their JSON values are stored in them as plain UTF-8 bytes.
    record_log = wandb_run_records(run)
    for key, value in (
        ("train_path", str(tiny_world / "train.jsonl")),  # the data module's settings
        ("val_path", str(tiny_world / "val.jsonl")),
        ("train_split", "train"),
        ("weak_aligned", str(tiny_world / "weak_aligned")),  # the model's
        ("policy", str(tiny_world / "policy")),
    ):
        assert key.encode() in record_log, key
        assert json.dumps(value).encode() in record_log or json.dumps(value)[1:-1].encode() in record_log, value


def test_sample_table_keeps_the_rows_of_every_validation(wandb_fit):
    cli, run = wandb_fit
    tables = sorted((run / "files" / "media" / "table").rglob("samples_*.table.json"), key=lambda p: p.stat().st_mtime)
    assert len(tables) == 2  # one version per validation
    latest = json.loads(tables[-1].read_text())
    assert latest["columns"] == SampleTable.columns
    steps = [row[0] for row in latest["data"]]
    assert steps == [4, 4, 8, 8]  # both validations' rows (2 prompts each), in order
    first = json.loads(tables[0].read_text())
    assert latest["data"][:2] == first["data"]


def test_wspo_evaluate_logs_its_table_and_reward_vs_kl_plot(tiny_world, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"id": f"p{i}", "prompt": f"Film {i}?"} for i in range(3)])
    policy = ModelSpec(path=str(tiny_world / "policy"))
    rows = []
    for name, temperature in (("warm", 1.0), ("cool", 0.7)):
        sampled = sample(
            policy,
            str(prompts),
            str(tmp_path / f"{name}.jsonl"),
            num_samples=2,
            max_new_tokens=4,
            temperature=temperature,
        )
        scored = score(str(sampled), str(tmp_path / f"{name}.scored.jsonl"), reward=LetterReward())
        rows.append(EvalRow(name, str(scored)))
    out = evaluate(
        rows,
        policy,
        str(tmp_path / "results.json"),
        n_boot=50,
        wandb_project="wspo-test",
        wandb_dir=str(tmp_path / "w"),
    )
    results = json.loads(Path(out).read_text())
    import wandb

    wandb.teardown()  # the service writes the run log in the background: wait for it
    (run,) = (tmp_path / "w" / "wandb").glob("offline-run-*")
    table = json.loads(next((run / "files" / "media" / "table").rglob("results_*.table.json")).read_text())
    assert [row[0] for row in table["data"]] == ["warm", "cool"]
    for row, result in zip(table["data"], results):
        assert row[1] == pytest.approx(result["gold_reward_mean"]) and row[4] == pytest.approx(result["kl"])
        mean = sum(r["reward"] for r in read_jsonl(tmp_path / f"{row[0]}.scored.jsonl")) / 6
        assert row[1] == pytest.approx(mean)
    record_log = wandb_run_records(run)
    assert PLOT_KEY.encode() in record_log and TABLE_KEY.encode() in record_log


def test_workspace_panels_come_from_the_metric_names_a_fit_wrote(wandb_fit, capsys):
    pytest.importorskip("wandb_workspaces")  # the `dashboard` extra
    cli, _ = wandb_fit
    csv_path = Path(cli.trainer.loggers[0].log_dir) / "metrics.csv"
    names = dashboard.metric_names_from_csv(csv_path)
    built = dashboard.build_workspace("me", "wspo-test", names)
    built._to_model()  # the spec W&B would receive validates offline
    by_title = {section.name: section for section in built.sections}
    plotted = [y for section in built.sections for panel in section.panels for y in getattr(panel, "y", None) or []]
    assert sorted(plotted) == sorted(names)  # every metric the fit wrote, each once
    assert all(panel.x == dashboard.STEP for s in built.sections for panel in s.panels if hasattr(panel, "x"))
    for title in ("Loss", "Margins", "Accuracies", "Gamma", "Log-ratios", "Margin quantiles"):
        assert by_title[title].panels, title
    assert ["train/loss", "val/loss"] in [panel.y for panel in by_title["Loss"].panels]
    assert ["train/wspo/gamma", "val/wspo/gamma"] in [panel.y for panel in by_title["Gamma"].panels]
    assert all(re.search("q\\d\\d$", y) for p in by_title["Margin quantiles"].panels for y in p.y)
    panels = by_title[dashboard.TABLES].panels
    assert [panel.table_name for panel in panels[:2]] == [SampleTable.key, TABLE_KEY]
    assert panels[2].query == {"summaryTable": {"tableKey": PLOT_KEY + "_table"}}  # wandb.plot.scatter's table
    # the subcommand prints the same plan without a network
    assert wspo(["workspace", "--project", "wspo-test", "--metrics_csv", str(csv_path), "--save", "false"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["Loss"] == [p.y for p in by_title["Loss"].panels]


def test_a_resumed_run_logs_into_the_w_and_b_run_it_started(tiny_world, tmp_path, monkeypatch, caplog):
    """`--ckpt_path last` continues the W&B run of the checkpoint (its id kept by RunIdentity), unless the
    user names another id, which wins with one warning line."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = tmp_path / "wandb.yaml"
    logger.write_text(
        (ROOT / "configs" / "wandb_logger.yaml").read_text().replace("save_dir: runs", f"save_dir: {tmp_path / 'w'}")
    )
    config = tiny_config(tiny_world, tmp_path / "run", every_n_train_steps=2)
    first = fit(config, "--config", str(logger), "--trainer.max_steps=2", "--trainer.limit_val_batches=0")
    started = first.trainer.loggers[1].version
    wandb.finish()
    resumed = fit(
        config, "--config", str(logger), "--trainer.max_steps=4", "--trainer.limit_val_batches=0", "--ckpt_path=last"
    )
    assert resumed.trainer.global_step == 4 and resumed.trainer.loggers[1].version == started
    wandb.finish()
    runs = sorted((tmp_path / "w" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(run.name.endswith(f"-{started}") for run in runs)  # `wandb sync`: one run

    chosen = tmp_path / "chosen.yaml"
    chosen.write_text(
        logger.read_text().replace("project: wspo-lightning", "project: wspo-lightning\n        id: mine1234")
    )
    other = fit(
        config, "--config", str(chosen), "--trainer.max_steps=5", "--trainer.limit_val_batches=0", "--ckpt_path=last"
    )
    wandb.finish()
    assert other.trainer.loggers[1].version == "mine1234"
    assert f"resume: W&B run id 'mine1234' as given, not the checkpoint's {started!r}" in caplog.text
