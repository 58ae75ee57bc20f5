"""Bad inputs through the real `wspo fit` CLI: each ends in one `wspo: error:` line naming where (file,
line, field or config key), what was expected and what to do, exit code 2, no traceback, and before
any model weights load. 34 cases, each checks:

Data (PreferenceDataModule.setup, before any model loads):
 1 empty-file: an empty training file.
 2 invalid-json-line: line 3 is not JSON: file:line and column.
 3 missing-prompt: a record without 'prompt': file:line and field.
 4 missing-rejected: {prompt, chosen} without 'rejected': the field named as missing.
 5 wrong-type: 'chosen' is a number: the type and value shown.
 6 wrong-type-in-messages: a message's content is a number: the nested field messages[0].content.
 7 empty-response: a blank 'response'.
 8 empty-after-truncation: max_length=1 leaves no response token: field and max_length.
 9 duplicate-id: two records share an id: both places named.
10 unknown-format: fields that match no format: the fields found and the formats accepted.
11 smaller-than-a-batch: 5 records, batch_size 8.
12 val-id-in-train: a validation record also in the training data.
13 test-id-in-train: a test_path record also in the training data.
14 missing-file: train_path does not exist.
15 unsupported-extension: a .csv file.
Config (LightningCLI / jsonargparse, or a class's own check):
16 unknown-flag: --data.batchsize: the unrecognised argument.
17 unknown-key-in-yaml: a YAML key 'data.batchsize': the key.
18 wrong-type-flag: gamma=abc: the key path model.gamma and the expected type.
19 wrong-choice: policy.dtype=float64: the key path and the accepted values.
20 gamma-zero: gamma 0.
21 gamma-infinite: gamma .inf (YAML's infinity; "inf" is a type error, as case 18).
22 gamma-negative: gamma -1.
23 beta-zero: DPO beta 0.
24 beta-nan: DPO beta .nan.
25 learning-rate-zero: learning_rate 0.
26 val-fraction-out-of-range: a DataModule argument checked in its __init__.
27 bad-callback-setting: NonFiniteGuard(max_consecutive_skips=0): a callback's own check.
Models and checkpoints (checked before any weights load):
28 policy-missing: policy.path does not exist (found first as the data's tokenizer, which it names).
29 weak-base-missing: weak_base.path does not exist.
30 no-config-json: weak_aligned.path holds tokenizer files but no config.json.
31 pickle-weights-only: a folder with pytorch_model.bin and no safetensors (never unpickled).
32 vocabulary-mismatch: weak_base has another tokenizer than weak_aligned: both roles and sizes named (a weak
   pair of another vocabulary than the policy's is allowed: docs/cross-tokenizer.md).
33 quantization-without-bitsandbytes: 4bit asked for, bitsandbytes missing (in-process only: simulated).
34 ckpt-path-missing: --ckpt_path to a file that does not exist.
(And `--ckpt_path last` where no earlier run can have saved: a test of its own below.)

Every case runs in-process through `wspo_lightning.cli.main` (stderr captured), with model loading
replaced by a trap that fails the test if reached. Cases 2, 17 and 20 (one per way an error travels:
raised inside Trainer.fit, by the parser, inside jsonargparse's instantiation) also run as
`python -m wspo_lightning.cli` subprocesses, side by side.

Handled, not errors: a tokenizer without a pad token pads with eos and says so once; one without a chat
template falls back to the plain template and says so once; trust_remote_code is off unless turned on,
and then logged; checkpoints load with weights_only.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from helpers import tiny_config

from wspo_lightning.cli import main as wspo_main
from wspo_lightning.errors import InputError
from wspo_lightning.tiny import build_tokenizer, preference_records, write_jsonl, write_tiny_model

OK = {"prompt": "p", "chosen": "c", "rejected": "r"}


@dataclass
class Case:
    """`args(world, tmp)` returns the flags added to `wspo fit --config tiny`, writing any file it needs."""

    args: Callable[[Path, Path], list[str]]
    fragments: list[str]
    subprocess: bool = False
    marks: list = field(default_factory=list)


def _train(*lines: str) -> Callable[[Path, Path], list[str]]:
    def args(world: Path, tmp: Path) -> list[str]:
        (tmp / "train.jsonl").write_text("".join(line + "\n" for line in lines))
        return [f"--data.train_path={tmp / 'train.jsonl'}"]

    return args


def _records(*records: dict) -> Callable[[Path, Path], list[str]]:
    return _train(*(json.dumps(r) for r in records))


def _flags(*flags: str) -> Callable[[Path, Path], list[str]]:
    return lambda world, tmp: [flag.format(world=world, tmp=tmp) for flag in flags]


def _dpo(*flags: str) -> Callable[[Path, Path], list[str]]:
    return lambda world, tmp: [
        "--model=wspo_lightning.module.DPOModule",
        f"--model.policy.path={world / 'policy'}",
        *flags,
    ]


def _csv(world: Path, tmp: Path) -> list[str]:
    (tmp / "train.csv").write_text("prompt,chosen,rejected\np,c,r\n")
    return [f"--data.train_path={tmp / 'train.csv'}"]


def _yaml_unknown_key(world: Path, tmp: Path) -> list[str]:
    (tmp / "extra.yaml").write_text("data:\n  batchsize: 8\n")
    return ["--config", str(tmp / "extra.yaml")]


def _test_id_in_train(world: Path, tmp: Path) -> list[str]:
    write_jsonl(tmp / "test.jsonl", [dict(OK, id="fresh"), dict(OK, id="toy-0-3")])
    return [f"--data.test_path={tmp / 'test.jsonl'}"]


def _val_id_in_train(world: Path, tmp: Path) -> list[str]:
    write_jsonl(tmp / "val.jsonl", [dict(OK, id="toy-0-5")])
    return [f"--data.val_path={tmp / 'val.jsonl'}"]


def _tokenizer_only(world: Path, tmp: Path) -> list[str]:
    build_tokenizer().save_pretrained(tmp / "tokenizer_only")
    return [f"--model.init_args.weak_aligned.path={tmp / 'tokenizer_only'}"]


def _pickle_only(world: Path, tmp: Path) -> list[str]:
    folder = tmp / "pickled"
    shutil.copytree(world / "weak_base", folder, ignore=shutil.ignore_patterns("*.safetensors"))
    (folder / "pytorch_model.bin").write_bytes(b"not loaded: the check comes first")
    return [f"--model.init_args.weak_base.path={folder}"]


def _other_vocabulary(world: Path, tmp: Path) -> list[str]:
    write_tiny_model(tmp / "other", "llama", num_layers=1, hidden_size=64, tokenizer=build_tokenizer(vocab_size=280))
    return [f"--model.init_args.weak_base.path={tmp / 'other'}"]


def _without_bitsandbytes(world: Path, tmp: Path) -> list[str]:
    return ["--model.init_args.weak_base.quantization=4bit"]


CASES = {
    # data
    "empty-file": Case(_train(), ["train.jsonl: the file is empty"]),
    "invalid-json-line": Case(
        _train(json.dumps(OK), json.dumps(dict(OK, id=2)), '{"prompt": "p",'),
        ["train.jsonl:3: invalid JSON at column", "Fix the line"],
        subprocess=True,
    ),
    "missing-prompt": Case(
        _records(OK, {"chosen": "c", "rejected": "r"}),
        ["train.jsonl:2: field 'prompt': expected a non-empty string, got nothing"],
    ),
    "missing-rejected": Case(
        _records({"prompt": "p", "chosen": "c"}), ["train.jsonl:1: field 'rejected':", "the field is missing"]
    ),
    "wrong-type": Case(
        _records(dict(OK, chosen=42)),
        ["train.jsonl:1: field 'chosen': expected a non-empty string, got int (42). Fix or remove"],
    ),
    "wrong-type-in-messages": Case(
        _records({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}),
        ["train.jsonl:1: field 'messages[0].content':", "int (3)"],
    ),
    "empty-response": Case(
        _records({"prompt": "p", "response": "  "}), ["train.jsonl:1: field 'response':", "an empty string"]
    ),
    "empty-after-truncation": Case(
        _flags("--data.max_length=1"),
        ["train.jsonl:1: field 'chosen': the response is empty after truncation to max_length=1. Raise max_length."],
    ),
    "duplicate-id": Case(
        _records(dict(OK, id=7), dict(OK, id="7")),
        ["train.jsonl:2: field 'id': duplicate id '7' (first at", "train.jsonl:1)"],
    ),
    "unknown-format": Case(
        _records({"question": "q", "answer": "a"}),
        ["train.jsonl:1:", "unknown record format with fields ['answer', 'question']", "accepted:"],
    ),
    "smaller-than-a-batch": Case(
        _records(*[dict(OK, id=i) for i in range(5)]),
        ["train.jsonl", "holds 5 records, fewer than one batch (batch_size=8)"],
    ),
    "val-id-in-train": Case(
        _val_id_in_train,
        ["val.jsonl:1: field 'id': id 'toy-0-5' is also in the training data", "Keep validation records out"],
    ),
    "test-id-in-train": Case(
        _test_id_in_train, ["test.jsonl:2: field 'id': id 'toy-0-3' is also in the training", "Keep test records out"]
    ),
    "missing-file": Case(_flags("--data.train_path={tmp}/nope.jsonl"), ["nope.jsonl: file not found"]),
    "unsupported-extension": Case(_csv, ["train.csv: unsupported file type '.csv'"]),
    # config
    "unknown-flag": Case(
        _flags("--data.batchsize=8"), ["config: unrecognized arguments: --data.batchsize=8", "wspo fit --help"]
    ),
    "unknown-key-in-yaml": Case(_yaml_unknown_key, ["config:", "'data.batchsize'"], subprocess=True),
    "wrong-type-flag": Case(
        _flags("--model.init_args.gamma=abc"), ["config: model.gamma: Expected a <class 'float'>. Got value: abc"]
    ),
    "wrong-choice": Case(
        _flags("--model.init_args.policy.dtype=float64"),
        ["config: model.policy.dtype: Expected a typing.Literal['float32', 'bfloat16', 'float16']"],
    ),
    "gamma-zero": Case(_flags("--model.init_args.gamma=0"), ["model.gamma must be", "got 0.0"], subprocess=True),
    "gamma-infinite": Case(_flags("--model.init_args.gamma=.inf"), ["model.gamma must be", "got inf"]),
    "gamma-negative": Case(_flags("--model.init_args.gamma=-1"), ["model.gamma must be", "got -1.0"]),
    "beta-zero": Case(_dpo("--model.beta=0"), ["model.beta must be a finite positive number, got 0.0"]),
    "beta-nan": Case(_dpo("--model.beta=.nan"), ["model.beta must be a finite positive number, got nan"]),
    "learning-rate-zero": Case(_flags("--model.init_args.learning_rate=0"), ["model.learning_rate must be > 0"]),
    "val-fraction-out-of-range": Case(_flags("--data.val_fraction=1.5"), ["val_fraction=1.5: expected a number"]),
    "bad-callback-setting": Case(
        _flags(
            "--trainer.callbacks+=wspo_lightning.callbacks.NonFiniteGuard",
            "--trainer.callbacks.max_consecutive_skips=0",
        ),
        ["NonFiniteGuard.max_consecutive_skips must be >= 1, got 0"],
    ),
    # models and checkpoints
    "policy-missing": Case(
        _flags("--model.init_args.policy.path={tmp}/no_policy"),
        ["tokenizer: ", "no_policy does not exist", "model.policy.path"],
    ),
    "weak-base-missing": Case(
        _flags("--model.init_args.weak_base.path={tmp}/no_model"),
        ["weak_base.path:", "no_model does not exist", "wspo tiny"],
    ),
    "no-config-json": Case(_tokenizer_only, ["weak_aligned.path:", "tokenizer_only holds no config.json"]),
    "pickle-weights-only": Case(
        _pickle_only, ["weak_base.path:", "pickled holds pickle weights (*.bin) but no *.safetensors"]
    ),
    "vocabulary-mismatch": Case(
        _other_vocabulary,
        ["the tokenizers of weak_base and weak_aligned differ (280 vs 300 tokens", "so they need one vocabulary"],
    ),
    "quantization-without-bitsandbytes": Case(
        _without_bitsandbytes, ["weak_base.quantization=4bit needs bitsandbytes", "pip install bitsandbytes"]
    ),
    "ckpt-path-missing": Case(_flags("--ckpt_path={tmp}/gone.ckpt"), ["ckpt_path:", "gone.ckpt does not exist"]),
}


def _argv(tiny_world: Path, tmp: Path, case: Case) -> list[str]:
    config = tiny_config(tiny_world, tmp / "run")
    return [
        "fit",
        "--config",
        str(config),
        "--trainer.max_steps=1",
        "--trainer.limit_val_batches=0",
        *case.args(tiny_world, tmp),
    ]


def _check(stderr: str, fragments: list[str]) -> None:
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("wspo:")]
    assert len(lines) == 1 and lines[0].startswith("wspo: error: "), stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


class _NoWeightsLoad(Exception):
    pass


@pytest.mark.parametrize("name", [pytest.param(n, marks=c.marks) for n, c in CASES.items()])
def test_bad_input_prints_one_clear_line_and_exits_2_before_any_model_loads(
    name, tiny_world, tmp_path, capsys, monkeypatch
):
    case = CASES[name]
    argv = _argv(tiny_world, tmp_path, case)
    if name == "quantization-without-bitsandbytes":
        find_spec = importlib.util.find_spec
        monkeypatch.setattr(
            importlib.util, "find_spec", lambda mod, *a: None if mod == "bitsandbytes" else find_spec(mod, *a)
        )

    def no_weights(*args, **kwargs):
        raise _NoWeightsLoad("a model loaded before the bad input was reported")

    for target in ("wspo_lightning.module.base.load_model", "wspo_lightning.frozen.load_model"):
        monkeypatch.setattr(target, no_weights)
    assert wspo_main(argv) == 2
    _check(capsys.readouterr().err, case.fragments)


def test_the_cli_subprocess_prints_one_line_and_exits_2(tiny_world, tmp_path):
    """One case per kind of check, through `python -m wspo_lightning.cli`, side by side."""
    names = [name for name, case in CASES.items() if case.subprocess]
    assert len(names) == 3
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    runs = {}
    for name in names:
        argv = _argv(tiny_world, tmp_path / name, CASES[name])
        runs[name] = subprocess.Popen(
            [sys.executable, "-m", "wspo_lightning.cli", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
    for name, run in runs.items():
        _, stderr = run.communicate(timeout=300)
        assert run.returncode == 2, (name, stderr[-3000:])
        _check(stderr, CASES[name].fragments)
        assert stderr.rstrip().splitlines()[-1].startswith("wspo: error:"), name  # the last word


def test_the_docstring_lists_every_case():
    listed = re.findall(r"^ ?(\d+) ([a-z0-9-]+):", __doc__, flags=re.MULTILINE)
    assert [name for _, name in listed] == list(CASES) and [int(n) for n, _ in listed] == list(range(1, len(CASES) + 1))
    assert f"{len(CASES)} cases" in __doc__


def test_ckpt_path_last_without_a_fixed_checkpoint_folder_is_an_input_error(tiny_world, tmp_path, capsys):
    config = tiny_config(tiny_world, tmp_path)
    settings = yaml.safe_load(config.read_text())
    for callback in settings["trainer"]["callbacks"]:
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"] = {"save_last": True}  # no dirpath: each run saves under a new logger version
    config.write_text(yaml.safe_dump(settings))
    assert wspo_main(["fit", "--config", str(config), "--ckpt_path", "last"]) == 2
    _check(
        capsys.readouterr().err,
        ["ckpt_path=last cannot find the checkpoints of an earlier run", "Set dirpath on the ModelCheckpoint"],
    )


# ----------------------------------------------------------------------------- handled, not errors


def test_no_pad_token_and_no_chat_template_are_handled_and_said_once(tmp_path, caplog):
    from wspo_lightning.data import PreferenceDataModule

    bare = build_tokenizer(chat_template=False)
    bare.pad_token = None
    bare.save_pretrained(tmp_path / "bare")
    data = write_jsonl(tmp_path / "train.jsonl", preference_records(8))
    with caplog.at_level(logging.INFO):
        for stage in ("fit", "validate"):
            dm = PreferenceDataModule(str(data), str(tmp_path / "bare"), val_fraction=0.25, batch_size=2)
            dm.setup(stage)
    assert caplog.text.count("has no pad token: padding with eos") == 1  # once per tokenizer, not per setup
    assert caplog.text.count("the tokenizer has no chat template") == 2  # once per data module
    assert dm.tokenizer.pad_token_id == dm.tokenizer.eos_token_id
    assert all(dm.renderer.prompt_text(r["prompt"]) == r["prompt"] for r in dm.train_records)  # plain "{prompt}"


def test_trust_remote_code_is_off_by_default_and_logged_when_on(tiny_world, caplog):
    from wspo_lightning.models import ModelSpec, load_tokenizer

    assert ModelSpec(path="x").trust_remote_code is False
    with caplog.at_level(logging.WARNING):
        load_tokenizer(ModelSpec(path=str(tiny_world / "weak_base")))
        assert "trust_remote_code" not in caplog.text
        load_tokenizer(ModelSpec(path=str(tiny_world / "weak_base"), trust_remote_code=True))
    assert f"trust_remote_code is on for {tiny_world / 'weak_base'}" in caplog.text


def test_fit_loads_checkpoints_with_weights_only(tiny_world, tmp_path, monkeypatch):
    import lightning.pytorch as pl

    seen = {}

    @functools.wraps(pl.Trainer.fit)  # LightningCLI reads fit's signature for its flags
    def record(self, *args, **kwargs):
        seen.update(kwargs)

    monkeypatch.setattr(pl.Trainer, "fit", record)
    checkpoint = tmp_path / "some.ckpt"
    torch.save({"state_dict": {}}, checkpoint)
    assert wspo_main(["fit", "--config", str(tiny_config(tiny_world, tmp_path)), f"--ckpt_path={checkpoint}"]) == 0
    assert seen["weights_only"] is True and seen["ckpt_path"] == str(checkpoint)


def test_a_hub_id_that_cannot_be_fetched_fails_at_once_with_the_download_command(monkeypatch):
    """Offline (HF_HUB_OFFLINE), or online with the Hub unreachable (an endpoint on a closed local port), an
    uncached Hub id is one line naming `hf download`, before transformers' retries."""
    from huggingface_hub import constants

    from wspo_lightning.models import ModelSpec, check_model_path, load_tokenizer

    spec = ModelSpec(path="wspo-tests/not-a-cached-model")
    download = r"Download it where the Hub is reachable: `hf download wspo-tests/not-a-cached-model --local-dir DIR`"
    with pytest.raises(InputError, match=r"^policy\.path: .* HF_HUB_OFFLINE is set\. " + download):
        check_model_path(spec, "policy")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as closed:  # a port nobody listens on: the connection is refused at once
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(InputError, match=r"^tokenizer\.path: .* 127\.0\.0\.1 cannot be reached: .*" + download):
        load_tokenizer(spec)


def test_a_reference_with_another_vocabulary_than_the_policy_gets_advice_that_knows_cross_tokenizer_wspo():
    from wspo_lightning.models import check_same_vocabulary

    with pytest.raises(InputError) as refused:
        check_same_vocabulary({"policy": build_tokenizer(300), "reference": build_tokenizer(280)})
    said = str(refused.value)
    assert said.startswith("the tokenizers of policy and reference differ (300 vs 280 tokens")
    assert "the reference is the policy's starting model" in said and "weak_tokenization: auto" in said
    assert "family" not in said  # the old advice (a weak pair of the strong model's family) is stale
