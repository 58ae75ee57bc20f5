"""The logps cache pins the precision its frozen values were computed in: a cache of float32 values is refused by a
run whose frozen roles compute in bfloat16 (under bf16-mixed's autocast, roles loaded in bfloat16, or a LoRA
policy's base, the reference, converted by bf16-true), and the reverse, with one line naming both and the command
that rebuilds it; manifests that predate the field still open."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import tiny_config
from safetensors.torch import load_file

from wspo_lightning import cli as wspo_cli
from wspo_lightning.cache import LogpsCache
from wspo_lightning.cache.fingerprint import compute_dtype
from wspo_lightning.errors import InputError
from wspo_lightning.lightning_cli import precompute_main, run_cli

ROLES = ("reference", "weak_base", "weak_aligned")


@pytest.fixture(scope="module")
def float32_cache(tiny_world, tmp_path_factory):
    """The tiny config (trainer.precision unset: Lightning's 32-true; every role float32) and its cache."""
    out = tmp_path_factory.mktemp("float32_cache")
    config = tiny_config(tiny_world, out)
    cache = out / "cache"
    assert precompute_main(["--config", str(config), f"--model.init_args.cache_dir={cache}"]) == 0
    return config, cache


def open_at(config: Path, cache: Path, precision: str, *overrides: str) -> LogpsCache:
    """Verify `cache` as fit's setup does, for a run at `precision` (without training)."""
    cli = run_cli(["--config", str(config), *overrides], run=False)
    cli.datamodule.setup("fit")
    return LogpsCache.open(cache, cli.model, cli.datamodule, precision=precision)


def refused_fit(config: Path, cache: Path, capsys, *overrides: str) -> str:
    """`wspo fit` of `config` on `cache` with `overrides`: it must stop with a user error; returns its message."""
    code = wspo_cli.main(["fit", "--config", str(config), f"--model.init_args.cache_dir={cache}", *overrides])
    message = capsys.readouterr().err
    assert code == 2, message
    return message.strip()


def test_a_role_computes_in_its_dtype_unless_the_trainer_precision_casts_it():
    # (ModelSpec dtype, trainer.precision, computed by the LightningModule's own weights) -> the dtype of the frozen
    # forward, worked out by hand: bf16-mixed autocasts every forward whatever the weights; bf16-true converts the
    # module's own weights only (a LoRA policy's base, the reference), not the frozen roles kept outside it; 32-true
    # keeps the weights' dtype
    table = {
        ("float32", "32-true", False): "float32",
        ("float32", None, False): "float32",  # Lightning's default precision is 32-true
        ("float32", "64-true", False): "float32",
        ("float32", "bf16-mixed", False): "bfloat16",
        ("float32", "bf16-mixed", True): "bfloat16",
        ("float32", "bf16", False): "bfloat16",  # the short name of bf16-mixed
        ("float32", "16-mixed", False): "float16",
        ("float32", "bf16-true", False): "float32",
        ("float32", "bf16-true", True): "bfloat16",
        ("float32", "16-true", True): "float16",
        ("bfloat16", "32-true", False): "bfloat16",
        ("bfloat16", "bf16-true", False): "bfloat16",
        ("float16", "32-true", False): "float16",
        ("float16", "bf16-mixed", False): "bfloat16",
    }
    assert {key: compute_dtype(*key) for key in table} == table


def test_the_manifest_records_each_roles_compute_dtype(float32_cache):
    manifest = json.loads((float32_cache[1] / "manifest.json").read_text())
    assert manifest["precision"] == "32-true"
    assert {role: manifest["models"][role]["compute_dtype"] for role in ROLES} == dict.fromkeys(ROLES, "float32")


@pytest.mark.parametrize(
    "overrides, roles, settings",
    [
        (["--trainer.precision=bf16-mixed"], ", ".join(ROLES), "reference.dtype=float32, trainer.precision=bf16-mixed"),
        (
            ["--model.weak_base.dtype=bfloat16", "--model.weak_aligned.dtype=bfloat16"],
            "weak_base, weak_aligned",
            "weak_base.dtype=bfloat16, trainer.precision=32-true",
        ),
    ],
    ids=["bf16-mixed", "roles_in_bfloat16"],
)
def test_a_float32_cache_is_refused_by_a_bf16_fit_with_the_rebuild_command(
    float32_cache, capsys, overrides, roles, settings
):
    config, cache = float32_cache
    message = refused_fit(config, cache, capsys, *overrides)
    assert "\n" not in message
    first = roles.split(", ")[0]
    assert f"holds the values of {roles} computed in float32 ({first}.dtype=float32, trainer.precision=32-true)" in (
        message
    )
    assert f"this run computes them in bfloat16 ({settings})" in message
    assert f"Rebuild it: wspo precompute --config {config}" in message


def test_a_bf16_cache_is_refused_by_a_float32_fit_and_opens_at_its_own_precision(tiny_world, tmp_path, capsys):
    config, cache = tiny_config(tiny_world, tmp_path), tmp_path / "cache"
    assert (
        precompute_main(
            ["--config", str(config), "--trainer.precision=bf16-mixed", f"--model.init_args.cache_dir={cache}"]
        )
        == 0
    )
    manifest = json.loads((cache / "manifest.json").read_text())
    assert {role: manifest["models"][role]["compute_dtype"] for role in ROLES} == dict.fromkeys(ROLES, "bfloat16")

    message = refused_fit(config, cache, capsys)  # the config's own precision: 32-true
    assert "\n" not in message
    assert "computed in bfloat16 (reference.dtype=float32, trainer.precision=bf16-mixed)" in message
    assert "this run computes them in float32 (reference.dtype=float32, trainer.precision=32-true)" in message
    assert f"Rebuild it: wspo precompute --config {config}" in message
    assert open_at(config, cache, "bf16-mixed").has("train")
    assert open_at(config, cache, "bf16").has("train")  # bf16-mixed by its short name
    with pytest.raises(InputError, match=r"computed in bfloat16 .* computes them in float32 .*bf16-true"):
        open_at(config, cache, "bf16-true")  # the frozen roles keep their float32 weights


def test_a_manifest_without_compute_dtype_takes_it_from_its_precision_and_role_dtypes(float32_cache, tmp_path):
    config, cache = float32_cache
    old = Path(shutil.copytree(cache, tmp_path / "old"))
    manifest = json.loads((old / "manifest.json").read_text())
    for role in ROLES:
        del manifest["models"][role]["compute_dtype"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    # recorded: trainer.precision 32-true and float32 roles, so float32
    assert open_at(config, old, "32-true").has("train")
    with pytest.raises(InputError, match=r"computed in float32 .* this run computes them in bfloat16"):
        open_at(config, old, "bf16-mixed")

    manifest["precision"] = "bf16-mixed"  # a cache made at bf16-mixed: bfloat16
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert open_at(config, old, "bf16-mixed").has("train")
    with pytest.raises(InputError, match=r"computed in bfloat16 .*trainer\.precision=bf16-mixed.* in float32"):
        open_at(config, old, "32-true")

    del manifest["precision"]  # no precision recorded either: Lightning's default, 32-true
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert open_at(config, old, "32-true").has("train")
    assert open_at(config, old, "bf16-true").has("train")
    with pytest.raises(InputError, match=r"computed in float32 .* this run computes them in bfloat16"):
        open_at(config, old, "bf16-mixed")


def test_bf16_true_refuses_a_float32_cache_only_for_a_reference_on_the_modules_own_weights(
    float32_cache, tiny_world, tmp_path, capsys
):
    """bf16-true converts the LightningModule's weights, not the frozen roles kept outside it: the float32 cache
    (its reference a frozen copy of the policy) holds the values such a run computes, bit for bit, and opens. A LoRA
    policy's reference is its own base, converted to bfloat16: its float32 cache is refused."""
    config, cache = float32_cache
    assert open_at(config, cache, "bf16-true").has("train")
    at_bf16_true = tmp_path / "bf16_true_cache"
    argv = ["--config", str(config), "--trainer.precision=bf16-true", f"--model.init_args.cache_dir={at_bf16_true}"]
    assert precompute_main(argv) == 0
    manifest = json.loads((at_bf16_true / "manifest.json").read_text())
    assert {role: manifest["models"][role]["compute_dtype"] for role in ROLES} == dict.fromkeys(ROLES, "float32")
    for name in manifest["splits"]["train"]["shards"]:
        want, got = load_file(str(cache / name)), load_file(str(at_bf16_true / name))
        assert want.keys() == got.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), key

    lora, lora_cache = ["--model.policy.lora.r=4"], tmp_path / "lora_cache"
    assert precompute_main(["--config", str(config), *lora, f"--model.init_args.cache_dir={lora_cache}"]) == 0
    assert open_at(config, lora_cache, "32-true", *lora).has("train")
    message = refused_fit(config, lora_cache, capsys, *lora, "--trainer.precision=bf16-true")
    assert "\n" not in message
    assert "holds the values of reference computed in float32 (reference.dtype=float32, trainer.precision=32-true)" in (
        message
    )
    assert "this run computes them in bfloat16 (reference.dtype=float32, trainer.precision=bf16-true)" in message
    assert f"Rebuild it: wspo precompute --config {config}" in message
