"""Every shipped recipe runs, as a user runs it, with only what a CPU needs changed: model paths (tiny models
of the recipe's architectures, tokenizers built locally), device counts, lengths, step counts and, for FSDP1
(Lightning refuses it without a GPU), the strategy (FSDP2, its CPU stand-in). The data is a tiny dataset in
the Hub's UltraFeedback layout, read through the splits the recipe names. Each recipe goes through
`wspo precompute`, `wspo fit`, a resume with `--ckpt_path last` and its export, so a wrong split, key or
class in a recipe fails here."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from recipe_world import RECIPES, on_cpu, own_environment, run, write_stand_ins

from wspo_lightning.resume import checkpoint_metadata

own_environment = pytest.fixture(autouse=True)(own_environment)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> dict[str, Path]:
    return write_stand_ins(tmp_path_factory.mktemp("recipe_world"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_precomputes_fits_resumes_and_exports_on_cpu(recipe, stand_ins, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    config = on_cpu(recipe, stand_ins, tmp_path)
    settings = yaml.safe_load(config.read_text())
    cache = [f"--model.init_args.cache_dir={tmp_path / 'cache'}"]

    assert run(["precompute", "--config", str(config), *cache]) == 0
    assert (tmp_path / "cache" / "manifest.json").exists()
    assert run(["fit", "--config", str(config), *cache, "--trainer.max_steps=1"]) == 0
    assert run(["fit", "--config", str(config), *cache, "--ckpt_path=last"]) == 0

    callbacks = {cb["class_path"].rsplit(".", 1)[1]: cb["init_args"] for cb in settings["trainer"]["callbacks"]}
    last = checkpoint_metadata(Path(callbacks["ModelCheckpoint"]["dirpath"]) / "last.ckpt")  # FSDP2: a folder
    assert last["global_step"] == 2  # resumed at step 1, trained the second
    export = Path(callbacks["HFExport"]["dirpath"])
    assert (export / "README.md").exists() and any(export.glob("*.safetensors"))
    # offline-run-DATE_TIME-ID, with -N added when a run of that id started in the same second
    ids = {run.name.split("-")[3] for run in (tmp_path / "wandb").glob("offline-run-*")}
    assert ids == set(last["callbacks"]["RunIdentity"]["wandb_ids"])  # the resume continued the one W&B run
