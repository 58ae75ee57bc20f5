"""What version 0.1 wrote still works (tests/fixtures/legacy_v0_1): its checkpoint resumes with the very
losses that version logged, and its logps cache is refused with the command that rebuilds it.

The checkpoint is kept as that version wrote it, with the absolute model paths of the machine that trained it
(/tmp/fx/legacy/...): exactly a checkpoint from another machine. Its world is copied under the test's temp
folder, and the config's paths, not the checkpoint's, say where the models are now."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers import by_step

from wspo_lightning.errors import InputError
from wspo_lightning.lightning_cli import run_cli

LEGACY = Path(__file__).resolve().parent / "fixtures" / "legacy_v0_1"


def legacy_config(out: Path, world: Path = LEGACY) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "fit.yaml"
    path.write_text((LEGACY / "fit.yaml").read_text().replace("WORLD", str(world)).replace("RUN", str(out / "run")))
    return path


def test_a_checkpoint_of_version_0_1_resumes_with_the_losses_that_version_logged(tmp_path, caplog):
    world = shutil.copytree(LEGACY, tmp_path / "world")
    saved = torch.load(world / "step2.ckpt", weights_only=True)["hyper_parameters"]["policy"]["path"]
    assert saved != str(world / "policy")  # the checkpoint names another machine's folder
    old = by_step(LEGACY / "metrics.csv")  # the uninterrupted 4-step run of version 0.1
    config = legacy_config(tmp_path, world)
    # 0.1 cut long prompts from the left (17 of its 20 records are cut): the option that keeps that data
    cli = run_cli(
        ["fit", "--config", str(config), f"--ckpt_path={world / 'step2.ckpt'}", "--data.prompt_truncation=left"]
    )
    assert cli.trainer.global_step == 4
    assert cli.model.policy_spec.path == str(world / "policy")
    assert (
        f"resume: model.init_args.policy.path = {str(world / 'policy')!r} as given, not the checkpoint's {saved!r}"
        in caplog.text
    )
    new = by_step(tmp_path / "run")
    assert sorted(new) == [2, 3] and sorted(old) == [0, 1, 2, 3]
    for step in (2, 3):  # the resumed steps: same data order, gamma schedule, optimizer state and weights
        assert new[step] == pytest.approx(old[step], rel=1e-5), step


def test_a_version_1_cache_is_refused_with_its_rebuild_command(tmp_path):
    config = legacy_config(tmp_path)
    with pytest.raises(
        InputError,
        match=r"v1, expected 'wspo-logps-cache' v2 .*Rebuild it: wspo precompute "
        r"--config fit.yaml --model.init_args.cache_dir=cache_v1",
    ):
        run_cli(["fit", "--config", str(config), f"--model.init_args.cache_dir={LEGACY / 'cache_v1'}"])
