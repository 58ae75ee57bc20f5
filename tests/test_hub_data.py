"""Data through the `datasets` library: folders in the Hub's layout (UltraFeedback-binarized's splits and
columns, subsets), Hub ids offline, and a short `wspo fit` on a Hub-layout folder."""

from __future__ import annotations

import pytest
from helpers import fit, metrics, tiny_config

from wspo_lightning.cli import main as wspo
from wspo_lightning.data import PreferenceDataModule, load_records
from wspo_lightning.data.hub import is_hub_id
from wspo_lightning.errors import InputError
from wspo_lightning.tiny import preference_records, ultrafeedback_rows, write_hub_layout


def _write_subsets_readme(folder, subsets: dict[str, list[str]]):
    lines = ["---", "configs:"]
    for subset, splits in subsets.items():
        lines += [f"- config_name: {subset}", "  data_files:"]
        lines += [f"  - split: {s}\n    path: data/{subset}/{s}-*.parquet" for s in splits]
    (folder / "README.md").write_text("\n".join(lines + ["---", "# toy"]) + "\n")


def test_ultrafeedback_layout_reads_its_named_splits_as_conversations(tmp_path):
    rows = ultrafeedback_rows(5)
    folder = write_hub_layout(tmp_path / "uf", {"train_prefs": rows, "test_prefs": ultrafeedback_rows(2, seed=1)})
    records = load_records(folder, "train_prefs")
    # TRL reads the prompt from the conversation: every message but the last, and the last as the response
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in records] == [
        (r["chosen"][:-1], r["chosen"][-1]["content"], r["rejected"][-1]["content"]) for r in rows
    ]
    assert records[0]["source"] == f"{folder}[train_prefs]:record 0"
    assert [r["chosen_ids"] for r in records] == [None] * 5 and all(r["chosen_finished"] for r in records)
    with pytest.raises(InputError, match=r"splits \['test_prefs', 'train_prefs'\], none of them \['train'\]"):
        load_records(folder, "train")


def test_data_module_takes_splits_of_one_folder(tmp_path, tiny_world):
    folder = write_hub_layout(
        tmp_path / "uf",
        {
            "train_prefs": ultrafeedback_rows(8),
            "test_prefs": ultrafeedback_rows(3, 1),
            "eval": ultrafeedback_rows(2, 2),
        },
    )
    dm = PreferenceDataModule(
        str(folder),
        str(tiny_world / "policy"),
        batch_size=4,
        train_split="train_prefs",
        val_split="test_prefs",
        test_split="eval",
    )
    dm.setup("fit")
    assert len(dm.train_records) == 8 and len(dm.val_records) == 3 and len(dm.test_records) == 2
    assert dm.val_records[0]["source"].endswith("[test_prefs]:record 0")
    assert [i for b in dm.test_dataloader() for i in b["ids"]] == ["uf[eval]:0", "uf[eval]:1"]


def test_dataset_config_picks_the_subset(tmp_path, tiny_world):
    folder = tmp_path / "subsets"
    write_hub_layout(folder, {"train": ultrafeedback_rows(4)}, subset="small")
    write_hub_layout(folder, {"train": ultrafeedback_rows(6, 3)}, subset="large")
    _write_subsets_readme(folder, {"small": ["train"], "large": ["train"]})
    assert len(load_records(folder, "train", config="large")) == 6
    assert len(load_records(folder, "train", config="small")) == 4
    with pytest.raises(
        InputError, match=r"field 'dataset_config': .*'medium' not found. Available: \['small', 'large'\]"
    ):
        load_records(folder, "train", config="medium")


def test_paths_that_are_not_local_are_hub_ids():
    assert is_hub_id("HuggingFaceH4/ultrafeedback_binarized") and is_hub_id("imdb")
    for local in ("data/missing.jsonl", "./runs/x", "/abs/folder", "~/d", "a/b/c"):
        assert not is_hub_id(local), local
    with pytest.raises(InputError, match="file not found"):
        load_records("data/missing.jsonl")


def test_a_hub_id_offline_says_what_to_download(monkeypatch):
    with pytest.raises(InputError) as err:
        load_records("HuggingFaceH4/ultrafeedback_binarized", "train_prefs")
    message = str(err.value)
    assert message.startswith("HuggingFaceH4/ultrafeedback_binarized:")
    assert "hf download HuggingFaceH4/ultrafeedback_binarized --repo-type dataset" in message
    assert "\n" not in message


def test_wspo_fit_offline_on_a_hub_id_prints_one_line_and_exits_2(tiny_world, tmp_path, capsys):
    config = tiny_config(tiny_world, tmp_path / "run")
    code = wspo(["fit", "--config", str(config), "--data.train_path", "HuggingFaceH4/ultrafeedback_binarized"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("wspo: error: HuggingFaceH4/ultrafeedback_binarized:")


def test_two_step_fit_on_an_ultrafeedback_style_folder(tiny_world, tmp_path, one_torch_thread):
    folder = write_hub_layout(
        tmp_path / "uf", {"train_prefs": ultrafeedback_rows(16), "test_prefs": ultrafeedback_rows(4, seed=1)}
    )
    config = tiny_config(tiny_world, tmp_path / "run")
    cli = fit(
        config,
        f"--data.train_path={folder}",
        "--data.train_split=train_prefs",
        "--data.val_path=null",
        "--data.val_split=test_prefs",
        "--trainer.max_steps=2",
        "--trainer.val_check_interval=2",
    )
    logged = metrics(cli)
    assert len(logged["train/loss"]) == 2 and len(logged["val/rewards/weak_margin"]) >= 1
    assert cli.datamodule.train_records[0]["prompt"] == [
        {"role": "user", "content": preference_records(1)[0]["prompt"]}
    ]
    assert (tmp_path / "run" / "export" / "config.json").exists()
