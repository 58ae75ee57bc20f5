"""Cross-tokenizer WSPO end to end: a weak pair of another tokenizer family against the tiny Llama policy.

Mapped deltas sum to the weak pair's own sequence log-ratio, the same tokenizer forced through the map
gives the shared path's deltas and losses, `wspo fit` trains live and from `wspo precompute` alike, and
the sample table scores completions as the decoding tools do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import fit, metrics, tiny_config

from wspo_lightning import cli as wspo_cli
from wspo_lightning.cache import LogpsCache
from wspo_lightning.decoding import WeakPairScorer
from wspo_lightning.errors import InputError
from wspo_lightning.lightning_cli import precompute_main, run_cli
from wspo_lightning.logprobs import response_mask
from wspo_lightning.module.base import step_rows
from wspo_lightning.tiny import build_tokenizer, write_tiny_model

SHORT = ["--trainer.max_steps=4", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1"]
LONGER = ["--trainer.max_steps=16", "--trainer.val_check_interval=8", "--trainer.limit_val_batches=1"]
# a byte-level BPE GPT-2 pair with a Llama 3 style template (it trims the message), and a SentencePiece
# style Unigram pair rendered without a template (Llama 2 base style)
WEAK_FAMILIES = {
    "gpt2_bpe": ("gpt2", dict(shape="llama3", vocab_size=400)),
    "sentencepiece": ("llama", dict(shape="plain", model="unigram")),
}


@pytest.fixture(scope="module", params=list(WEAK_FAMILIES))
def cross_world(request, tiny_world, tmp_path_factory):
    """The tiny world's policy and data with a weak pair of another tokenizer."""
    world = tmp_path_factory.mktemp(f"cross_{request.param}")
    for name in ("policy", "train.jsonl", "val.jsonl"):
        (world / name).symlink_to(tiny_world / name)
    arch, shape = WEAK_FAMILIES[request.param]
    tokenizer = build_tokenizer(**shape)
    for seed, role in ((1, "weak_base"), (2, "weak_aligned")):
        write_tiny_model(world / role, arch, seed=seed, num_layers=1, hidden_size=64, tokenizer=tokenizer)
    return world


def set_up(config: Path, *overrides: str):
    """A config's data module and objective, set up as `fit` sets them up (frozen roles loaded)."""
    cli = run_cli(["--config", str(config), *overrides], run=False)
    cli.datamodule.setup("fit")
    cli.model.check_tokenizers(cli.datamodule)
    cli.model.frozen.load(cli.model.frozen_specs())
    return cli.datamodule, cli.model


def test_mapped_deltas_sum_to_the_weak_pairs_sequence_log_ratio(cross_world, tmp_path):
    datamodule, model = set_up(tiny_config(cross_world, tmp_path))
    assert datamodule.weak_renderer is not None  # another vocabulary: the weak pair renders on its own
    scorer = WeakPairScorer(model.frozen["weak_aligned"], model.frozen["weak_base"], datamodule.weak_renderer)
    spread = []
    for batch in datamodule.val_dataloader():
        sides, rows = step_rows(batch, pairs=True)
        mapped = model.frozen.step_delta_weak(batch, sides, rows)  # [2B, T'] on the policy's tokens
        mask = response_mask(rows[2])
        records = [datamodule.val_records[i] for i in batch["index"].tolist()]
        expected = [
            score
            for side in sides
            for score in scorer.score(
                [r["prompt"] for r in records], [r[side] for r in records], [r[f"{side}_finished"] for r in records]
            )
        ]
        torch.testing.assert_close(mapped.sum(dim=1), torch.tensor(expected), rtol=0, atol=2e-4)
        assert not mapped[~mask].any()
        spread.append(((mapped != 0) & mask).sum() / mask.sum())
    # spread over the response (a policy token gets nothing only where no weak token ends inside it)
    assert float(torch.stack(spread).mean()) > 0.25


def test_the_same_tokenizer_forced_through_the_map_gives_the_shared_deltas_and_losses(tiny_world, tmp_path):
    datamodule, model = set_up(tiny_config(tiny_world, tmp_path / "setup"), "--model.weak_tokenization=own")
    batch = next(iter(datamodule.val_dataloader()))
    sides, rows = step_rows(batch, pairs=True)
    mapped = model.frozen.step_delta_weak(batch, sides, rows)
    shared = model.frozen.step_delta_weak({k: v for k, v in batch.items() if not k.startswith("weak_")}, sides, rows)
    torch.testing.assert_close(mapped, shared, rtol=0, atol=1e-6)

    runs = {}
    for name, extra in (("shared", []), ("own", ["--model.weak_tokenization=own"])):
        cli = fit(tiny_config(tiny_world, tmp_path / name), *SHORT, *extra)
        assert (cli.datamodule.weak_renderer is not None) == (name == "own")  # batches carry weak rows
        runs[name] = metrics(cli)
    for name in ("train/loss", "train/wspo/delta_weak", "val/loss", "val/rewards/weak_margin"):
        assert len(runs["own"][name]) == len(runs["shared"][name]) > 0, name
        torch.testing.assert_close(
            torch.tensor(runs["own"][name]), torch.tensor(runs["shared"][name]), rtol=1e-5, atol=1e-6
        )


def test_fit_trains_live_and_from_precompute_with_the_same_losses(cross_world, tmp_path):
    cache = tmp_path / "cache"
    assert (
        precompute_main(
            ["--config", str(tiny_config(cross_world, tmp_path / "pre")), f"--model.init_args.cache_dir={cache}"]
        )
        == 0
    )
    manifest = json.loads((cache / "manifest.json").read_text())
    weak_base_files = manifest["models"]["weak_base"]["files"]
    assert "tokenizer.json" in weak_base_files and "tokenizer_config.json" in weak_base_files
    assert manifest["data"]["weak_renderer"] is not None

    live = fit(tiny_config(cross_world, tmp_path / "live"), *LONGER)
    cached = fit(tiny_config(cross_world, tmp_path / "cached"), *LONGER, f"--model.init_args.cache_dir={cache}")
    assert manifest["data"]["weak_renderer"] == live.datamodule.weak_renderer.fingerprint
    assert cached.model.frozen.models == {}  # the policy alone
    got, want = metrics(cached), metrics(live)
    losses = want["train/loss"]  # the policy learns to track the mapped weak log-ratios
    assert len(losses) == 16 and sum(losses[-4:]) < 0.5 * sum(losses[:4]), losses
    names = ["train/loss", "train/wspo/delta_weak", "val/loss", "val/rewards/weak_margin", "val/rewards/strong_margin"]
    for name in names:
        assert len(got[name]) == len(want[name]) > 0, name
        torch.testing.assert_close(torch.tensor(got[name]), torch.tensor(want[name]), rtol=1e-4, atol=1e-6)

    # the sample table scores completions as the decoding tools do: the weak pair on its rendering of the text
    rows = [json.loads(line) for line in latest_samples(live).read_text().splitlines()]
    prompts = live.datamodule.prompts("val", len(rows))
    frozen = live.model.frozen
    scorer = WeakPairScorer(frozen["weak_aligned"], frozen["weak_base"], live.datamodule.weak_renderer)
    expected = scorer.score(prompts, [r["response"] for r in rows], [r["finished"] for r in rows])
    assert [r["weak_reward"] for r in rows] == pytest.approx(expected, abs=2e-4)


def latest_samples(cli) -> Path:
    return sorted((Path(cli.trainer.logger.log_dir) / "samples").glob("step_*.jsonl"))[-1]


def test_a_cache_of_the_shared_path_is_refused_by_a_run_that_maps(tiny_world, tmp_path):
    config, cache = tiny_config(tiny_world, tmp_path), tmp_path / "cache"
    precompute_main(["--config", str(config), f"--model.init_args.cache_dir={cache}", "--precompute.reference=false"])
    datamodule, model = set_up(config, "--model.weak_tokenization=own")
    with pytest.raises(InputError, match=r"train data changed .*data.weak_renderer: None then, '[0-9a-f]+' now"):
        LogpsCache.open(cache, model, datamodule)


def test_shared_tokenization_of_a_weak_pair_with_another_vocabulary_is_refused(tiny_world, tmp_path, capsys):
    world = tmp_path / "world"
    world.mkdir()
    for name in ("policy", "train.jsonl", "val.jsonl"):
        (world / name).symlink_to(tiny_world / name)
    tokenizer = build_tokenizer(shape="llama3", vocab_size=400)
    for role in ("weak_base", "weak_aligned"):
        write_tiny_model(world / role, "gpt2", num_layers=1, hidden_size=32, tokenizer=tokenizer)
    code = wspo_cli.main(["fit", "--config", str(tiny_config(world, tmp_path)), "--model.weak_tokenization=shared"])
    assert code == 2
    assert (
        "model.weak_tokenization=shared, but the tokenizers of policy and weak_base differ" in capsys.readouterr().err
    )


@pytest.mark.parametrize("cross_world", ["gpt2_bpe"], indirect=True)
def test_ddp_on_two_processes_gives_the_single_process_losses(cross_world, tmp_path):
    """Two ranks x batch 8 take, at every step, the 16 records one process x batch 16 takes (the seeded
    sampler deals one permutation out), so the mean losses match; each rank builds its own weak side."""
    from helpers import STEPS, assert_curves_match, csv_metrics, launch, wspo
    from helpers import strategy_config as config

    single = run_cli(["fit", "--config", str(config(cross_world, tmp_path / "single")), *STEPS, "--data.batch_size=16"])
    assert single.datamodule.weak_renderer is not None
    ddp = tmp_path / "ddp"
    args = ["--data.batch_size=8", "--trainer.devices=2", "--trainer.strategy=ddp"]
    launch(wspo("fit", "--config", str(config(cross_world, ddp)), *STEPS, *args))
    names = ["train/loss", "train/wspo/delta_weak", "val/loss", "val/rewards/weak_margin", "val/rewards/strong_margin"]
    assert_curves_match(csv_metrics(ddp), metrics(single), names)
