"""Every shipped config parses with the real CLI parser; recipes resolve to the classes they name."""

from __future__ import annotations

from pathlib import Path

import pytest

from wspo_lightning.lightning_cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if not {"demo", "generate"} & set(p.parts))
GENERATE_CONFIGS = sorted((ROOT / "configs" / "generate").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[str(p.relative_to(ROOT)) for p in CONFIGS])
def test_shipped_config_parses_and_prints(config, capsys):
    # Snippets (a logger or a strategy block) are layered over the tiny config, as their comments say.
    args = ["fit", "--config", str(ROOT / "configs" / "tiny_cpu.yaml"), "--config", str(config), "--print_config"]
    with pytest.raises(SystemExit) as done:
        run_cli(args)
    assert done.value.code in (0, None)
    assert "class_path: wspo_lightning.module." in capsys.readouterr().out


def test_fsdp_recipe_wraps_and_checkpoints_qwen2_decoder_layers():
    import yaml
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import FSDPStrategy
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    recipe = yaml.safe_load((ROOT / "configs" / "recipes" / "qwen2_1.5b_to_7b_fsdp.yaml").read_text())
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=FSDPStrategy)
    strategy = parser.instantiate(parser.parse_object({"strategy": recipe["trainer"]["strategy"]})).strategy
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {Qwen2DecoderLayer}
    assert strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == {Qwen2DecoderLayer}


@pytest.mark.parametrize("config", GENERATE_CONFIGS, ids=[p.name for p in GENERATE_CONFIGS])
def test_shipped_generate_config_parses_and_prints(config, capsys):
    from wspo_lightning.decoding.command import main

    with pytest.raises(SystemExit) as done:
        main(["--config", str(config), "--print_config"])
    assert done.value.code in (0, None)
    assert "beam_width:" in capsys.readouterr().out
