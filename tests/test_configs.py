"""Every shipped config parses and builds its classes (their constructors' checks run) with the real CLI;
recipes resolve to the classes they name; a config printed by one command feeds every other."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers import tiny_config

from wspo_lightning.cli import main as wspo_main
from wspo_lightning.data import PreferenceDataModule
from wspo_lightning.lightning_cli import run_cli
from wspo_lightning.module import PreferenceModule

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if not {"demo", "generate"} & set(p.parts))
GENERATE_CONFIGS = sorted((ROOT / "configs" / "generate").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[str(p.relative_to(ROOT)) for p in CONFIGS])
def test_shipped_config_parses_prints_and_builds_its_classes(config, capsys):
    # Snippets (a logger or a strategy block) are layered over the tiny config, as their comments say.
    layered = ["--config", str(ROOT / "configs" / "tiny_cpu.yaml"), "--config", str(config)]
    with pytest.raises(SystemExit) as done:
        run_cli(["fit", *layered, "--print_config"])
    assert done.value.code in (0, None)
    assert "class_path: wspo_lightning.module." in capsys.readouterr().out
    # constructors run (no weights load before setup); GPU recipes are built on this CPU's single device
    on_cpu = [
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.num_nodes=1",
        "--trainer.strategy=auto",
        "--trainer.precision=32-true",
    ]
    cli = run_cli([*layered, *on_cpu], run=False)
    recipe = yaml.safe_load(config.read_text())
    assert isinstance(cli.model, PreferenceModule) and isinstance(cli.datamodule, PreferenceDataModule)
    for key, value in (recipe.get("model", {}).get("init_args") or {}).items():
        if isinstance(value, (int, float, str)) and hasattr(cli.model.hparams, key):
            assert cli.model.hparams[key] == value, key
    assert cli.datamodule.tokenizer_path == cli.model.policy_spec.path  # linked, never set on its own


def test_a_config_printed_by_one_command_feeds_every_other(tiny_world, tmp_path, capsys):
    config = tiny_config(tiny_world, tmp_path / "run", every_n_train_steps=None)
    cache = f"--model.init_args.cache_dir={tmp_path / 'cache'}"
    printed = {}
    for command in ("fit", "precompute"):
        with pytest.raises(SystemExit):
            wspo_main([command, "--config", str(config), cache, "--print_config"])
        printed[command] = tmp_path / f"{command}.yaml"
        printed[command].write_text(capsys.readouterr().out)
    assert wspo_main(["precompute", "--config", str(printed["fit"])]) == 0
    quick = ["--trainer.max_steps=1", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1"]
    for source in ("fit", "precompute"):
        for command in ("fit", "validate", "test"):
            assert wspo_main([command, "--config", str(printed[source]), *quick]) == 0, (source, command)


def test_fsdp_recipe_wraps_qwen2_decoder_layers_and_a_strategy_file_over_it_keeps_activation_checkpointing(capsys):
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import FSDPStrategy
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    path = ROOT / "configs" / "recipes" / "qwen2_1.5b_to_7b_fsdp.yaml"
    recipe = yaml.safe_load(path.read_text())
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=FSDPStrategy)
    strategy = parser.instantiate(parser.parse_object({"strategy": recipe["trainer"]["strategy"]})).strategy
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {Qwen2DecoderLayer}
    # activation checkpointing is the policy's, so it survives any strategy file put over the recipe
    for strategy_file in ("fsdp2.yaml", "ddp.yaml", "fsdp.yaml"):
        with pytest.raises(SystemExit):
            run_cli(
                [
                    "fit",
                    "--config",
                    str(path),
                    "--config",
                    str(ROOT / "configs" / "strategies" / strategy_file),
                    "--print_config",
                ]
            )
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["model"]["init_args"]["policy"]["gradient_checkpointing"] is True, strategy_file


@pytest.mark.parametrize("config", GENERATE_CONFIGS, ids=[p.name for p in GENERATE_CONFIGS])
def test_shipped_generate_config_parses_and_prints(config, capsys):
    from wspo_lightning.decoding.command import main

    with pytest.raises(SystemExit) as done:
        main(["--config", str(config), "--print_config"])
    assert done.value.code in (0, None)
    assert "beam_width:" in capsys.readouterr().out
