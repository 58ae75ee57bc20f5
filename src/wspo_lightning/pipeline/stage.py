"""What every stage shares: skip-if-done, atomic outputs, JSONL files, chat prompts, `main` parsing."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from wspo_lightning.errors import InputError, located

log = logging.getLogger("wspo_lightning.pipeline")


def say(stage: str, message: str) -> None:
    """One status line per stage event, on stderr beside the progress bars."""
    print(f"[{stage}] {message}", file=sys.stderr, flush=True)


RUNS = {"ran": 0, "skipped": 0}  # stage calls in this process, for timers that tell skips from work


def done(stage: str, out: str | Path, force: bool) -> bool:
    """True (and say so) when `out` exists and is not to be redone; with `force`, remove it first."""
    out = Path(out)
    RUNS["skipped" if out.exists() and not force else "ran"] += 1
    if not out.exists():
        return False
    if not force:
        say(stage, f"skip: {out} exists (force to redo)")
        return True
    say(stage, f"redo: removing {out}")
    shutil.rmtree(out) if out.is_dir() else out.unlink()
    return False


@contextmanager
def atomic_path(out: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `out`; rename it to `out` only if the block succeeds.

    A stage killed half-way leaves no `out`, so the next run redoes it instead of skipping it.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    yield tmp
    if out.is_dir():  # a folder cannot be replaced in one rename: move the old one aside first
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


def read_jsonl(path: str | Path, required: Iterable[str | tuple[str, ...]] = (),
               texts: Iterable[str] = ()) -> list[dict]:
    """Records of a JSONL file; a bad line or a missing field raises InputError naming file and line.

    A `required` entry may be a tuple of alternative names (at least one must be present). Fields in
    `texts` must be non-empty strings."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    records = []
    with path.open() as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise located(path, number, None, f"not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise located(path, number, None, "expected a JSON object per line")
            for field in required:
                names = (field,) if isinstance(field, str) else field
                if not any(name in record for name in names):
                    raise located(path, number, " or ".join(names), "missing")
            for field in texts:
                if not isinstance(record.get(field), str) or not record[field].strip():
                    raise located(path, number, field, "expected a non-empty string")
            records.append(record)
    return records


def write_jsonl(path: str | Path, records: Iterable[dict]) -> Path:
    """Write records atomically (see `atomic_path`)."""
    path = Path(path)
    with atomic_path(path) as tmp, tmp.open("w") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def chat_text(tokenizer: Any, prompt: str) -> str:
    """The prompt as the model sees it before the response: its chat template with the
    generation prompt, or the bare text for a tokenizer without a template."""
    from wspo_lightning.decoding.sampling import format_prompts

    return format_prompts(tokenizer, [prompt])[0]


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when a GPU is visible, else "cpu"; anything else as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def import_object(path: str) -> Any:
    """`package.module.Name` or `package.module:Name` -> the object."""
    module_name, _, name = path.replace(":", ".").rpartition(".")
    if not module_name:
        raise InputError(f"{path!r}: expected a dotted path such as wspo_lightning.rewards.VaderReward")
    import importlib

    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise InputError(f"cannot import {path!r}: {err}") from err


def run_main(function: Callable, argv: list[str] | None, description: str | None = None) -> int:
    """Parse `argv` into `function`'s arguments (jsonargparse: flags, `--config` YAML) and call it."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    summary = (function.__doc__ or "").strip().split("\n\n")[0]
    parser = ArgumentParser(prog=f"wspo {function.__name__}", description=description or summary)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML with any of the options below")
    parser.add_function_arguments(function, as_positional=False)
    cfg = parser.parse_args(argv)
    cfg.pop("config", None)
    try:
        function(**parser.instantiate_classes(cfg).as_dict())
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
