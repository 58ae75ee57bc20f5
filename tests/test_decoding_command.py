"""`wspo generate` end to end on the tiny world: YAML and flags in, JSONL and a printed summary out."""

import json

import pytest
import yaml
from helpers import generate_yaml

from wspo_lightning.decoding.command import main
from wspo_lightning.errors import InputError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def gen_yaml(tiny_world, tmp_path):
    return generate_yaml(
        tiny_world,
        tmp_path / "gen.yaml",
        out=str(tmp_path / "out.jsonl"),
        method="cbs",
        beam_width=2,
        num_continuations=2,
        chunk_length=3,
        max_new_tokens=8,
        limit=3,
        batch_size=2,
        reward="vader",
    )


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


@pytest.mark.parametrize("method", ["cbs", "proxy", "sample"])
def test_generate_writes_prompt_response_score_and_settings_per_prompt(gen_yaml, tmp_path, capsys, method):
    assert main(["--config", str(gen_yaml), "--method", method]) == 0
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert len(rows) == 3
    for row in rows:
        assert {"id", "prompt", "response", "score", "finished", "reward", "settings"} <= set(row)
        assert "completion" not in row
        assert isinstance(row["score"], float) and -1 <= row["reward"] <= 1
        assert row["settings"]["method"] == method and row["settings"]["max_new_tokens"] == 8
    assert ("beam_width" in rows[0]["settings"]) == (method == "cbs")
    assert ("alpha" in rows[0]["settings"]) == (method == "proxy")
    out = capsys.readouterr().out
    assert "wrote 3 generations" in out and "mean weak score:" in out and "mean reward (vader):" in out


def test_generate_is_reproducible_for_a_seed(gen_yaml, tmp_path):
    main(["--config", str(gen_yaml), "--out", str(tmp_path / "a.jsonl")])
    main(["--config", str(gen_yaml), "--out", str(tmp_path / "b.jsonl")])
    assert read_jsonl(tmp_path / "a.jsonl") == read_jsonl(tmp_path / "b.jsonl")


def test_print_config_shows_flags_over_the_yaml(gen_yaml, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(gen_yaml), "--num_continuations", "3", "--print_config"])
    assert exit_.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["num_continuations"] == 3 and printed["beam_width"] == 2
    assert printed["weak_base"]["path"].endswith("weak_base")


@pytest.mark.parametrize(
    "line, problem", [('{"text": "no prompt here"}', "missing"), ('{"prompt": "  "}', "expected a non-empty string")]
)
def test_bad_prompts_line_is_reported_with_file_line_and_field(gen_yaml, tmp_path, line, problem):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n\n' + line + "\n")  # the blank line still counts
    with pytest.raises(InputError, match=rf"bad.jsonl:3: field 'prompt': {problem}"):
        main(["--config", str(gen_yaml), "--prompts", str(bad)])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num_continuations", "0"], r"num_continuations \(K\) must be >= 1"),
        (["--method", "proxy", "--weak_base", "null", "--weak_aligned", "null"], "method proxy needs weak_base"),
        (["--weak_aligned", "null"], "weak_base and weak_aligned go together"),
    ],
)
def test_bad_settings_fail_before_any_model_loads(gen_yaml, flags, message):
    with pytest.raises(InputError, match=message):
        main(["--config", str(gen_yaml), *flags])


def test_plain_sampling_needs_no_weak_pair_and_writes_a_null_score(gen_yaml, tmp_path, capsys):
    main(
        [
            "--config",
            str(gen_yaml),
            "--method",
            "sample",
            "--weak_base",
            "null",
            "--weak_aligned",
            "null",
            "--reward",
            "null",
            "--stop",
            '["e"]',
        ]
    )
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert all(row["score"] is None and "reward" not in row and "e" not in row["response"] for row in rows)
    assert "mean weak score" not in capsys.readouterr().out


def test_old_option_names_still_read_with_one_warning_line_each(gen_yaml, tmp_path, caplog):
    """A config of an older version (`output`, `chat_template`) runs as the new names would, saying so."""
    old = yaml.safe_load(gen_yaml.read_text())
    old["output"] = old.pop("out")
    old["chat_template"] = False
    old_yaml = tmp_path / "old.yaml"
    old_yaml.write_text(yaml.safe_dump(old))
    assert main(["--config", str(old_yaml), "--method", "sample"]) == 0
    assert (
        main(
            [
                "--config",
                str(gen_yaml),
                "--method",
                "sample",
                "--use_chat_template",
                "false",
                "--out",
                str(tmp_path / "new.jsonl"),
            ]
        )
        == 0
    )
    assert read_jsonl(tmp_path / "out.jsonl") == read_jsonl(tmp_path / "new.jsonl")
    assert read_jsonl(tmp_path / "out.jsonl")[0]["settings"]["use_chat_template"] is False
    warned = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert warned == [
        "generate: output is deprecated, use out (same meaning)",
        "generate: chat_template is deprecated, use use_chat_template (same meaning)",
    ]


def test_an_old_and_a_new_name_together_are_one_error(gen_yaml, tmp_path):
    with pytest.raises(InputError, match="^generate: output is the old name of out: give only out$"):
        main(["--config", str(gen_yaml), "--output", str(tmp_path / "old.jsonl")])
