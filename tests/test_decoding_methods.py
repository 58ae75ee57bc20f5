"""The registry of decoding methods: `wspo generate --method` runs a method named by import path with no edit
of the package, its help lists every registered method, and settings and checks follow what a method declares."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
from helpers import generate_yaml

from wspo_lightning.cli import main
from wspo_lightning.decoding.command import GenerateConfig
from wspo_lightning.decoding.methods import METHODS, DecodingMethod
from wspo_lightning.errors import InputError
from wspo_lightning.models import ModelSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "wspo_lightning"


class LowestOfN(DecodingMethod):
    """Worst-of-N: the mirror of best-of-N, the draw with the lowest weak log-ratio kept."""

    needs_weak_pair = True
    options = ("best_of",)
    search = True

    def decode(self, decoder, prompts):
        n = decoder.config.best_of
        drawn = decoder.draw(prompts, n)
        return [min(drawn[i * n : (i + 1) * n], key=lambda g: g.score) for i in range(len(prompts))]


LOWEST = LowestOfN()


class ReadsAnUnknownOption(DecodingMethod):
    """Declares an option `GenerateConfig` does not have."""

    options = ("beams",)

    def decode(self, decoder, prompts):
        return decoder.draw(prompts, 1)


class NoDecode(DecodingMethod):
    """Declares what it needs but never says how to decode."""


def not_a_method(decoder, prompts):
    """A function with the right signature, but no `DecodingMethod`."""


@pytest.fixture
def gen_yaml(tiny_world, tmp_path):
    return generate_yaml(
        tiny_world,
        tmp_path / "gen.yaml",
        max_new_tokens=6,
        limit=4,
        batch_size=2,
        best_of=3,
    )


def generated(gen_yaml, out: Path, method: str) -> list[dict]:
    assert main(["generate", "--config", str(gen_yaml), "--method", method, "--out", str(out)]) == 0
    return [json.loads(line) for line in out.open()]


@pytest.mark.parametrize("path", [f"{__name__}.LowestOfN", f"{__name__}:LOWEST"])
def test_a_method_named_by_import_path_runs_through_wspo_generate(gen_yaml, tmp_path, path):
    """Same seed, same N draws per prompt: the custom method keeps the lowest weak score where best-of-N keeps the
    highest, and its lines carry its path and the option it declared."""
    lowest = generated(gen_yaml, tmp_path / "lowest.jsonl", path)
    best = generated(gen_yaml, tmp_path / "best.jsonl", "bon")
    assert [r["prompt"] for r in lowest] == [r["prompt"] for r in best] and len(lowest) == 4
    assert all(low["score"] <= high["score"] for low, high in zip(lowest, best))
    assert any(low["score"] < high["score"] for low, high in zip(lowest, best))
    for row in lowest:
        assert row["settings"]["method"] == path and row["settings"]["best_of"] == 3
        assert "beam_width" not in row["settings"] and "alpha" not in row["settings"]
        assert row["num_tokens"] == len(row["response_ids"]) and isinstance(row["logp"], float)  # a real draw's


@pytest.mark.parametrize(
    "method, message",
    [
        ("beam", "unknown method 'beam': expected one of sample, proxy, cbs, bon, or the import path"),
        (f"{__name__}.not_a_method", "not a decoding method: subclass wspo_lightning.decoding.methods.DecodingMethod"),
        (f"{__name__}.Missing", f"cannot import '{__name__}.Missing'"),
        (f"{__name__}.ReadsAnUnknownOption", r"declares options that generate does not have: \['beams'\]"),
        (f"{__name__}.NoDecode", r"has no decode\(decoder, prompts\)"),
    ],
)
def test_a_bad_method_is_one_error_line_before_any_model_loads(gen_yaml, tmp_path, capsys, method, message):
    out = tmp_path / "never.jsonl"
    assert main(["generate", "--config", str(gen_yaml), "--method", method, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("wspo: error: ") and err.count("\n") == 1
    assert re.search(message, err) and not out.exists()


def test_a_custom_method_that_needs_the_weak_pair_is_refused_without_it():
    with pytest.raises(InputError, match=f"method {__name__}.LowestOfN needs weak_base and weak_aligned"):
        GenerateConfig(strong=ModelSpec("strong"), prompts="p.jsonl", method=f"{__name__}.LowestOfN")


def test_generate_help_lists_every_registered_method_with_its_line(capsys):
    with pytest.raises(SystemExit) as done:
        main(["generate", "--help"])
    assert done.value.code == 0
    printed = " ".join(capsys.readouterr().out.split())  # help is wrapped at any space
    for name, method in METHODS.items():
        line = method.__doc__.splitlines()[0].rstrip(".")
        assert f"{name}: {line[0].lower()}{line[1:]}" in printed


@pytest.mark.parametrize("name", list(METHODS))
def test_settings_hold_the_shared_options_and_those_the_method_reads(name):
    weak = ModelSpec("weak")
    config = GenerateConfig(
        strong=ModelSpec("strong"), prompts="p.jsonl", method=name, weak_base=weak, weak_aligned=weak
    )
    shared = GenerateConfig(strong=ModelSpec("strong"), prompts="p.jsonl", method="sample").settings()
    settings = config.settings()
    assert list(settings) == list(shared) + list(METHODS[name].options)
    assert settings["method"] == name and all(settings[o] == getattr(config, o) for o in METHODS[name].options)


def test_no_method_name_is_compared_outside_the_registry():
    """A method's behaviour lives in its object: no `method == "cbs"` or `in ("bon", "cbs")` elsewhere."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "methods.py" and path.parent.name == "decoding":
            continue
        tree = ast.parse(path.read_text())
        # a key looked up (`record["sample"] == 0`) names a field, not a method
        keys = {id(n) for sub in ast.walk(tree) if isinstance(sub, ast.Subscript) for n in ast.walk(sub.slice)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                values = [
                    n.value
                    for side in sides
                    for n in ast.walk(side)
                    if isinstance(n, ast.Constant) and id(n) not in keys
                ]
                if set(values) & set(METHODS):
                    found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert found == []
