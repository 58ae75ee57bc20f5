"""`wspo extrapolate` (ExPO): every written tensor is theta_R + (1 + alpha)(theta_M - theta_R), computed here
independently (float64, from the files), for single-file and sharded folders, tied weights, other dtypes and LoRA
adapters (checked through peft's own merge); user mistakes end as one line and exit code 2."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from wspo_lightning.cli import main
from wspo_lightning.tiny import build_tokenizer, write_tiny_model

# peft saves an adapted embedding's base layer too, and says so: that copy is what the tests check
pytestmark = pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`:UserWarning")


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in `folder`, whatever the sharding."""
    found: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        found.update(load_file(file))
    return found


def expected(reference: dict, model: dict, alpha: float) -> dict[str, torch.Tensor]:
    """R + (1 + alpha)(M - R) in float64, in M's dtype."""
    return {
        name: (reference[name].double() + (1 + alpha) * (m.double() - reference[name].double())).to(m.dtype)
        for name, m in model.items()
    }


def close(actual: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """Equal up to float32 rounding (tighter than assert_close's default atol of 1e-5, as large as a 1e-4 relative
    error in weights of size 0.02); bfloat16 keeps assert_close's tolerance of one rounding."""
    tight = dict(rtol=1e-6, atol=1e-7) if actual.dtype == torch.float32 else {}
    assert_close(actual, want, msg=name, **tight)


def run(reference: Path, model: Path, out: Path, alpha: float | str, *extra: str) -> int:
    return main(["extrapolate", "--reference.path", str(reference), "--model.path", str(model),
                 "--alpha", str(alpha), "--out", str(out), *extra])  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """R and M: one tiny Llama shape at two seeds (M as a single file and as 4 shards), R's tokenizer shared."""
    root = tmp_path_factory.mktemp("expo")
    tokenizer = build_tokenizer()
    reference = write_tiny_model(root / "reference", seed=0, tokenizer=tokenizer)
    model = write_tiny_model(root / "model", seed=1, tokenizer=tokenizer)
    from transformers import AutoModelForCausalLM

    sharded = root / "model_sharded"
    AutoModelForCausalLM.from_pretrained(model).save_pretrained(sharded, max_shard_size="50KB")
    tokenizer.save_pretrained(sharded)
    assert len(list(sharded.glob("*.safetensors"))) > 1
    return {"root": root, "tokenizer": tokenizer, "reference": reference, "model": model, "sharded": sharded}


@pytest.mark.parametrize("layout", ["single", "sharded input", "sharded output"])
def test_every_tensor_is_the_reference_plus_one_plus_alpha_times_the_models_shift(models, tmp_path, layout):
    model = models["sharded" if layout == "sharded input" else "model"]
    extra = ["--max_shard_size", "40KB"] if layout == "sharded output" else []
    assert run(models["reference"], model, tmp_path / "out", 0.5, *extra) == 0
    out = tmp_path / "out"
    written, want = weights(out), expected(weights(models["reference"]), weights(models["model"]), 0.5)
    assert written.keys() == want.keys()
    for name, tensor in want.items():
        assert written[name].dtype == tensor.dtype
        close(written[name], tensor, name)
    assert (len(list(out.glob("*.safetensors"))) > 1) == (layout == "sharded output")
    assert (out / "model.safetensors.index.json").exists() == (layout == "sharded output")
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (model / name).read_bytes()
    provenance = json.loads((out / "extrapolation.json").read_text())
    assert provenance["reference"] == str(models["reference"]) and provenance["model"] == str(model)
    assert provenance["alpha"] == 0.5
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()  # a folder transformers reads as it is
    assert all(torch.equal(loaded[name], tensor) for name, tensor in written.items())
    assert AutoTokenizer.from_pretrained(out).get_vocab() == models["tokenizer"].get_vocab()


def test_alpha_zero_returns_the_model_bit_for_bit_and_alpha_minus_one_the_reference(models, tmp_path):
    from wspo_lightning.models import ModelSpec
    from wspo_lightning.pipeline.extrapolate import extrapolate

    reference, model = ModelSpec(str(models["reference"])), ModelSpec(str(models["sharded"]))
    same = weights(extrapolate(reference, model, 0.0, str(tmp_path / "zero")))
    back = weights(extrapolate(reference, model, -1.0, str(tmp_path / "minus_one")))
    for name, tensor in weights(models["model"]).items():
        assert torch.equal(same[name], tensor), name
        close(back[name], weights(models["reference"])[name], name)


def test_bfloat16_models_are_written_in_bfloat16_unless_dtype_says_otherwise(models, tmp_path):
    from transformers import AutoModelForCausalLM

    for role in ("reference", "model"):
        AutoModelForCausalLM.from_pretrained(models[role], dtype=torch.bfloat16).save_pretrained(tmp_path / role)
    assert run(tmp_path / "reference", tmp_path / "model", tmp_path / "bf16", 0.3) == 0
    assert run(tmp_path / "reference", tmp_path / "model", tmp_path / "fp32", 0.3, "--dtype", "float32") == 0
    r, m = weights(tmp_path / "reference"), weights(tmp_path / "model")
    as_stored, as_asked = weights(tmp_path / "bf16"), weights(tmp_path / "fp32")
    for name, tensor in expected(r, m, 0.3).items():
        assert as_stored[name].dtype == torch.bfloat16 and as_asked[name].dtype == torch.float32
        close(as_stored[name], tensor, name)  # float32 arithmetic, one rounding to bfloat16
        close(as_asked[name], expected({name: r[name].float()}, {name: m[name].float()}, 0.3)[name], name)
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["dtype"] == "float32"


def test_tied_embeddings_stay_tied_as_the_files_store_them(models, tmp_path):
    reference = write_tiny_model(tmp_path / "r", arch="gpt2", seed=0, tokenizer=models["tokenizer"])
    model = write_tiny_model(tmp_path / "m", arch="gpt2", seed=1, tokenizer=models["tokenizer"])
    assert run(reference, model, tmp_path / "out", 0.5) == 0
    written = weights(tmp_path / "out")
    assert written.keys() == weights(model).keys() and "lm_head.weight" not in written  # stored once, as in M
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(loaded.lm_head.weight, written["transformer.wte.weight"])
    for name, tensor in expected(weights(reference), weights(model), 0.5).items():
        close(written[name], tensor, name)


def write_adapter(base: Path, out: Path, **lora) -> Path:
    """A LoRA adapter over `base` with random B (peft starts B at zero, an update of nothing)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, lora_alpha=8, **lora))
    torch.manual_seed(0)
    for name, parameter in policy.named_parameters():
        if "lora_B" in name or "lora_embedding_B" in name:
            parameter.data.normal_(std=0.1)
    policy.save_pretrained(out)
    return out


def merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """peft's own answer: the base with the adapter merged into its weights."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return (
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload().state_dict()
    )


@pytest.mark.parametrize(
    "lora",
    [
        {"target_modules": "all-linear"},
        {"target_modules": ["q_proj", "v_proj", "embed_tokens"], "use_rslora": True},  # lora_embedding_B, alpha/sqrt(r)
    ],
)
def test_a_lora_adapters_merged_update_is_scaled_by_one_plus_alpha(models, tmp_path, lora, caplog):
    reference = models["reference"]
    adapter = write_adapter(reference, tmp_path / "adapter", **lora)
    with caplog.at_level(logging.WARNING):
        assert run(reference, adapter, tmp_path / "out", 0.5) == 0
    assert "was trained on" not in caplog.text  # the adapter names this reference as its base
    assert (tmp_path / "out" / "adapter_config.json").read_bytes() == (adapter / "adapter_config.json").read_bytes()
    r, m, out = weights(reference), merged(reference, adapter), merged(reference, tmp_path / "out")
    assert out.keys() == m.keys()
    for name, tensor in expected(r, m, 0.5).items():
        close(out[name], tensor, name)
    changed = [name for name in r if not torch.equal(r[name], m[name])]
    assert changed and all(not torch.equal(out[name], m[name]) for name in changed)


def test_an_adapter_over_another_base_folder_gets_a_warning_and_the_same_adapter(models, tmp_path, caplog):
    adapter = write_adapter(models["reference"], tmp_path / "adapter", target_modules="all-linear")
    copy = shutil.copytree(models["reference"], tmp_path / "copy_of_base")
    with caplog.at_level(logging.WARNING):
        assert run(copy, adapter, tmp_path / "out", 0.5) == 0
    assert f"trained on {models['reference']}, not on the reference {copy}" in caplog.text
    assert json.loads((tmp_path / "out" / "extrapolation.json").read_text())["adapter_base"] == str(models["reference"])


def test_an_existing_out_is_kept_when_it_is_the_same_extrapolation_and_replaced_only_with_force(
    models, tmp_path, capsys
):
    r, m, out = models["reference"], models["model"], tmp_path / "out"
    assert run(r, m, out, 0.5) == 0
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert run(r, m, out, 0.5) == 0 and (out / "model.safetensors").stat().st_mtime_ns == stamp
    assert "skip" in capsys.readouterr().err
    assert run(r, m, out, 0.7) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "records another extrapolation" in err and "--force" in err
    assert run(r, m, out, 0.7, "--force") == 0
    assert json.loads((out / "extrapolation.json").read_text())["alpha"] == 0.7


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("wspo: error: ") and err.count("\n") == 1, err  # one line, no traceback
    return err


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("other shape", "lm_head.weight has shape [300, 32] in the reference and [300, 64] in the model"),
        ("more layers", "model.layers.2.input_layernorm.weight is in the model but not in the reference"),
        ("alpha nan", "alpha must be a finite number, got nan"),
        ("alpha inf", "alpha must be a finite number, got inf"),
        ("out is the model", "would replace the model"),
        ("out holds the model", "would replace the model"),
        ("out not empty", "is not empty; pass --force to replace it"),
        ("reference is an adapter", "is an adapter; give the full weights of its base model"),
        ("model dtype", "model.dtype: extrapolation always computes in float32"),
        ("dora", "is a DoRA adapter; only plain LoRA extrapolates by scaling lora_B"),
        ("adapter on another shape", "but the adapter's update of it has"),
        ("adapter on other values", "carries its base's model.embed_tokens.weight, which differs from the reference"),
    ],
)
def test_mistakes_end_as_one_line_and_exit_code_2(models, tmp_path, capsys, case, message):
    r, m, out, extra, alpha = models["reference"], models["model"], tmp_path / "out", [], 0.5
    tokenizer = models["tokenizer"]
    if case == "other shape":
        m = write_tiny_model(tmp_path / "wide", hidden_size=64, tokenizer=tokenizer)
    elif case == "more layers":
        m = write_tiny_model(tmp_path / "deep", num_layers=3, tokenizer=tokenizer)
    elif case.startswith("alpha"):
        alpha = ".nan" if case == "alpha nan" else ".inf"  # YAML's spelling: jsonargparse refuses a bare nan itself
    elif case == "out is the model":
        out = m
    elif case == "out holds the model":
        m = shutil.copytree(m, tmp_path / "inside" / "model")
        out = tmp_path / "inside"
    elif case == "out not empty":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case == "reference is an adapter":
        r = write_adapter(r, tmp_path / "adapter", target_modules="all-linear")
    elif case == "model dtype":
        extra = ["--model.dtype", "bfloat16"]
    elif case == "dora":
        m = write_adapter(r, tmp_path / "adapter", target_modules=["q_proj"], use_dora=True)
    elif case == "adapter on another shape":
        m = write_adapter(r, tmp_path / "adapter", target_modules="all-linear")
        r = write_tiny_model(tmp_path / "wide", hidden_size=64, tokenizer=tokenizer)
    elif case == "adapter on other values":  # peft saves an adapted embedding's base layer: it must be R's
        m, r = write_adapter(r, tmp_path / "adapter", target_modules=["embed_tokens"]), models["model"]
    assert run(r, m, out, alpha, *extra) == 2
    assert message in error_line(capsys)
    assert case == "out not empty" or not (tmp_path / "out").exists()
