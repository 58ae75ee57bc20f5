"""`wspo precompute` and `fit` from its cache: same losses, only the policy loads, stale caches refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import metrics, tiny_config
from safetensors.torch import load_file, save_file

from wspo_lightning import cli as wspo_cli
from wspo_lightning.cache import LogpsCache
from wspo_lightning.cache.swap import swap_weak_pair
from wspo_lightning.errors import InputError
from wspo_lightning.lightning_cli import precompute_main, run_cli
from wspo_lightning.logprobs import response_logps
from wspo_lightning.tiny import preference_records, write_jsonl

SHORT = ["--trainer.max_steps=4", "--trainer.val_check_interval=4", "--trainer.limit_val_batches=1"]


@pytest.fixture(scope="module")
def cached(tiny_world, tmp_path_factory):
    """A tiny config and its cache (weak pair and reference)."""
    out = tmp_path_factory.mktemp("cached")
    config = tiny_config(tiny_world, out)
    cache = out / "cache"
    assert precompute_main(["--config", str(config), f"--model.init_args.cache_dir={cache}"]) == 0
    return config, cache


def open_cache(config: Path, cache: Path, *overrides: str) -> LogpsCache:
    """Verify `cache` against the config's data and models, as fit's setup does (without training)."""
    cli = run_cli(["--config", str(config), f"--model.init_args.cache_dir={cache}", *overrides], run=False)
    cli.datamodule.setup("fit")
    return LogpsCache.open(cache, cli.model, cli.datamodule)


def test_cache_holds_each_records_response_values_independent_of_padding(cached, tiny_world):
    config, cache = cached
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["values"] == ["delta_weak", "reference"]
    assert (cache / "config.yaml").exists()  # the resolved config of the run that made it
    assert set(manifest["models"]) == {"reference", "weak_base", "weak_aligned"}
    assert manifest["splits"]["train"]["sides"] == ["chosen"]  # no rejected: WSPO trains on chosen only
    assert manifest["splits"]["val"]["sides"] == ["chosen", "rejected"]  # margins need both
    shard = load_file(str(cache / manifest["splits"]["val"]["shards"][0]))

    cli = run_cli(["--config", str(config)], run=False)
    cli.datamodule.setup("fit")
    cli.model.setup("fit")
    feature = cli.datamodule.features["val"][3]  # one record alone: no padding at all
    row = int((shard["index"] == feature["index"]).nonzero())
    start = int(shard["rejected.length"][:row].sum())
    ids = torch.tensor([feature["prompt_ids"] + feature["rejected_ids"]])
    labels = ids.clone()
    labels[0, : len(feature["prompt_ids"])] = -100
    aligned = response_logps(cli.model.frozen.models["weak_aligned"], ids, torch.ones_like(ids), labels)[0][0]
    base = response_logps(cli.model.frozen.models["weak_base"], ids, torch.ones_like(ids), labels)[0][0]
    n = len(feature["rejected_ids"])
    assert int(shard["rejected.length"][row]) == n
    torch.testing.assert_close(shard["rejected.delta_weak"][start : start + n], (aligned - base)[-n:])


VARIANTS = {  # extra fit arguments, compared metrics
    "wspo": (
        [],
        ["train/loss", "train/wspo/delta_weak", "val/loss", "val/rewards/weak_margin", "val/rewards/strong_margin"],
    ),
    "wspo_lora": (
        ["--model.policy.lora.r=4", "--model.learning_rate=0.01"],
        ["train/loss", "val/loss", "val/rewards/strong_margin"],
    ),
    "dpo": (
        ["--model=wspo_lightning.module.DPOModule", "--model.learning_rate=0.003", "--model.beta=0.5"],
        ["train/loss", "train/rewards/margins", "val/loss", "val/rewards/margins"],
    ),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fit_from_the_cache_gives_the_same_losses_and_loads_only_the_policy(cached, tiny_world, tmp_path, variant):
    config, cache = cached
    extra, compared = VARIANTS[variant]
    if variant == "dpo":
        extra = [*extra, f"--model.policy.path={tiny_world / 'policy'}"]
    if variant != "wspo":  # LoRA's reference is the adapter-free policy; DPO caches the reference alone
        cache = tmp_path / "own_cache"
        precompute_main(["--config", str(config), *extra, f"--model.init_args.cache_dir={cache}"])
    runs = {}
    for name, cache_args in (("live", []), ("cached", [f"--model.init_args.cache_dir={cache}"])):
        runs[name] = run_cli(
            ["fit", "--config", str(tiny_config(tiny_world, tmp_path / name)), *SHORT, *extra, *cache_args]
        )
    assert runs["cached"].model.frozen.models == {}  # no weak pair, no reference: the policy alone
    live, from_cache = metrics(runs["live"]), metrics(runs["cached"])
    for name in compared:
        assert len(live[name]) == len(from_cache[name]) > 0, name
        torch.testing.assert_close(
            torch.tensor(from_cache[name]),
            torch.tensor(live[name]),
            rtol=1e-4,
            atol=1e-6,
            msg=lambda m, name=name: f"{name}: {m}",
        )


def test_a_cache_is_refused_when_the_training_data_changes(cached, tmp_path, capsys):
    config, cache = cached
    records = preference_records(64, seed=0)
    records[5]["chosen"] = "The plot was a delight and I would say so again."
    train = write_jsonl(tmp_path / "train.jsonl", records)
    code = wspo_cli.main(
        ["fit", "--config", str(config), f"--model.init_args.cache_dir={cache}", f"--data.train_path={train}"]
    )
    message = capsys.readouterr().err
    assert code == 2
    assert "the train data changed since the cache was made" in message
    assert f"wspo precompute --config {config}" in message  # the command that rebuilds it


def test_a_cache_is_refused_when_truncation_changes_the_tokens(cached):
    config, cache = cached
    with pytest.raises(InputError, match=r"data changed .*data.max_length: 128 then, 12 now"):
        open_cache(config, cache, "--data.max_length=12")


def test_a_cache_follows_a_moved_weak_model_by_content_and_refuses_changed_weights(cached, tiny_world, tmp_path):
    config, cache = cached
    moved = Path(shutil.copytree(tiny_world / "weak_aligned", tmp_path / "weak_aligned"))  # new path and mtimes
    assert open_cache(config, cache, f"--model.weak_aligned.path={moved}").has("train")

    weights = load_file(str(moved / "model.safetensors"))
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1e-3  # same size, other numbers
    save_file(weights, str(moved / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(InputError, match=r"weak_aligned changed since the cache was made .*model\.safetensors"):
        open_cache(config, cache, f"--model.weak_aligned.path={moved}")


def test_a_cache_is_refused_when_a_loading_option_changes(cached):
    config, cache = cached
    with pytest.raises(InputError, match=r"weak_base\.quantization='none', now '8bit'"):
        open_cache(config, cache, "--model.weak_base.quantization=8bit")


def test_a_swapped_weak_pair_cache_equals_precompute_of_the_swapped_config(cached, tiny_world, tmp_path):
    """`swap_weak_pair` (the sign control's cache, no forward pass) against `wspo precompute` run with the
    weak pair swapped: the same values, and fit accepts it only for the swapped pair."""
    config, cache = cached
    swap = [
        f"--model.weak_base.path={tiny_world / 'weak_aligned'}",
        f"--model.weak_aligned.path={tiny_world / 'weak_base'}",
    ]
    computed = tmp_path / "computed"
    assert precompute_main(["--config", str(config), *swap, f"--model.init_args.cache_dir={computed}"]) == 0
    derived = swap_weak_pair(cache, tmp_path / "derived", command="wspo precompute ... (swapped)")

    manifests = [json.loads((c / "manifest.json").read_text()) for c in (computed, derived)]
    for key in ("values", "models", "data", "splits"):
        assert manifests[0][key] == manifests[1][key], key
    assert manifests[1]["command"] == "wspo precompute ... (swapped)"
    for split in manifests[0]["splits"].values():
        for name in split["shards"]:
            want, got = load_file(str(computed / name)), load_file(str(derived / name))
            assert want.keys() == got.keys()
            for key in want:
                torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
            assert not torch.equal(got["chosen.delta_weak"], load_file(str(cache / name))["chosen.delta_weak"])
    assert open_cache(config, derived, *swap).has("train")
    with pytest.raises(InputError, match="weak_base changed since the cache was made"):
        open_cache(config, derived)  # the pair in order: refused


def test_swapping_needs_a_cache_with_a_weak_pair(cached, tmp_path):
    config, cache = cached
    dpo = tmp_path / "dpo_cache"
    assert (
        precompute_main(
            ["--config", str(config), "--model=wspo_lightning.module.DPOModule", f"--model.init_args.cache_dir={dpo}"]
        )
        == 0
    )
    with pytest.raises(InputError, match="no weak pair to swap"):
        swap_weak_pair(dpo, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_fit_without_a_cache_at_cache_dir_says_how_to_build_one(tiny_world, tmp_path):
    config = tiny_config(tiny_world, tmp_path)
    with pytest.raises(InputError, match="Build it with: wspo precompute --config"):
        open_cache(config, tmp_path / "nothing_here")


def test_qlora_policy_trains_on_cpu(tiny_world, tmp_path):
    """4-bit NF4 base (bitsandbytes' CPU kernels) + LoRA adapters; the reference is the adapter-free base."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    cli = run_cli(
        [
            "fit",
            "--config",
            str(tiny_config(tiny_world, tmp_path)),
            "--model.policy.quantization=4bit",
            "--model.policy.lora.r=4",
            "--model.learning_rate=0.01",
            "--trainer.max_steps=3",
            "--trainer.limit_val_batches=0",
            "--data.batch_size=4",
        ]
    )
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in cli.model.policy.modules())
    assert "reference" not in cli.model.frozen
    losses = metrics(cli)["train/loss"]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
