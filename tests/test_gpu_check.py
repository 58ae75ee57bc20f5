"""`scripts/gpu_check.sh --dry-run`: every stage of the GPU check runs on CPU with tiny models and lands in the
table (FSDP1 excepted: torch runs it only on an accelerator, and the row says so), the README's "Run on a GPU
node" commands among them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT

from wspo_lightning.lightning_cli import run_cli
from wspo_lightning.models import ModelSpec, load_model


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def test_every_stage_ran_and_the_table_shows_its_figures(dry_run):
    out, results, table = dry_run
    assert list(results) == ["build", "gpu_path", "fit_fsdp1", "fit_fsdp2", "qlora_fsdp2", "step", "cbs", "packing"]
    assert results["fit_fsdp1"]["skipped"].startswith("FSDP1 runs only on an accelerator")
    assert not any("error" in r for r in results.values()), results
    assert "Device: **CPU (dry run)**" in table
    for stage in ("fit_fsdp2", "qlora_fsdp2"):
        fit = results[stage]
        assert fit["steps"] == 3 and fit["tokens_per_second"] > 0 and fit["peak_memory_gib"] > 0
        assert f"| | loss, first -> last step | {fit['first_loss']:.4f} -> {fit['last_loss']:.4f} |" in table
    step = results["step"]
    assert (
        f"| WSPO step from the logps cache | time over a bare policy step | {step['step_cached_over_bare']:.3g} |"
        in (table)
    )
    assert (
        f"| chunk-level beam search | time over plain sampling | {results['cbs']['cbs_over_sampling']:.3g} |" in table
    )
    packing = results["packing"]
    assert f"| | the same, frozen forward | {packing['packed_over_padded_frozen']:.3g} |" in table
    assert packing["computed_tokens_padded_over_packed"] > 1  # mixed lengths: packing computes fewer tokens
    # figures are printed to 3 decimals: the ratio of rounded values agrees to a few percent
    assert step["bare_mfu"] == pytest.approx(step["bare_tflops"] / results["build"]["matmul_tflops"], rel=0.05)
    # at the first step the policy is its reference (a copy, or the 4-bit base without adapters): both losses are
    # the weak pair's term gamma^2 * delta_weak^2 alone, on the same first batch
    assert results["qlora_fsdp2"]["first_loss"] == pytest.approx(results["fit_fsdp2"]["first_loss"], rel=1e-5)


def test_the_figures_agree_with_the_world_it_built(dry_run):
    """Recomputed from the models and data the dry run wrote: parameter counts, the bare step's tokens (its
    throughput times its time), and the 4-bit weak pair's stored bytes over float32."""
    out, results, _ = dry_run
    work = out / "work"
    hidden, layers, vocab = 64, 2, 512  # gpu_check.SIZES["dry"], in wspo_step.write_model's Llama shapes:
    intermediate, head_dim = int(2.75 * hidden) // 64 * 64, hidden // max(hidden // 64, 2)
    kv = max(hidden // 128, 1) * head_dim  # width of k and v
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * intermediate + 2 * hidden  # + 2 norms
    assert results["build"]["policy_params_b"] * 1e9 == layers * per_layer + 2 * vocab * hidden + hidden

    cli = run_cli(["--config", str(work / "config.yaml")], run=False)
    cli.datamodule.setup("fit")
    tokens = int(next(iter(cli.datamodule.train_dataloader()))["chosen_attention_mask"].sum())
    step = results["step"]
    assert step["bare_tokens_per_second"] * step["bare_ms_per_step"] / 1000 == pytest.approx(tokens, rel=1e-3)

    def stored(quantization: str) -> int:
        models = [
            load_model(ModelSpec(str(work / r), quantization=quantization)) for r in ("weak_base", "weak_aligned")
        ]
        return sum(t.numel() * t.element_size() for m in models for t in [*m.parameters(), *m.buffers()])

    ratio = stored("4bit") / stored("none")
    assert step["memory_weak_4bit_over_float32_weights"] == pytest.approx(ratio, abs=1e-3) and 0 < ratio < 1


def test_the_readme_gpu_path_ran_every_command_and_the_offline_push_failed_in_one_line(dry_run):
    """The `gpu_path` stage: each command of the README's block, in order, with its wall time in the table; the
    push, offline and without a login, ends in one `wspo: error:` line (exit 2), which is its pass."""
    sys.path.append(str(ROOT / "benchmarks"))
    from recipe_stand_ins import label, readme_gpu_commands

    _, results, table = dry_run
    path = results["gpu_path"]
    commands = path["commands"]
    assert [row["command"] for row in commands] == readme_gpu_commands()
    assert path["failed"] == 0 and all(row["ok"] for row in commands), commands
    assert [row["exit"] for row in commands] == [0] * (len(commands) - 1) + [2]
    (push_error,) = commands[-1]["errors"]
    assert push_error.startswith("wspo: error: HFExport.push_to_hub:") and "wspo push DIR --hub_repo_id" in push_error
    for row in commands:
        assert f"| `{row['label']}` | {row['seconds']:.1f} s, pass" in table
    labels = [label(row["command"]) for row in commands]
    assert (
        "torchrun wspo fit qwen2.5_0.5b_to_7b_fsdp2.yaml" in labels
        and "wspo plan qwen2.5_0.5b_to_7b_fsdp2.yaml" in labels
    )
    assert path["stand_ins"].startswith("64 x 2-layer stand-ins") and path["logger"] == "W&B offline"
