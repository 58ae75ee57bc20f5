"""Files: atomic writes, JSON Lines read and write, and objects named by their import path.

Every reader here accepts a UTF-8 byte-order mark at the start of a file (as `datasets` and pandas
do) and turns bytes that are not UTF-8 into one `InputError` naming the file and line.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from wspo_lightning.errors import InputError, located


@contextmanager
def atomic_path(out: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `out`; rename it to `out` only if the block succeeds.

    A job killed half-way leaves the previous `out` (or none), never half of one.
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


def read_text_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) of a UTF-8 text file, without a leading byte-order mark.

    A line that is not valid UTF-8 raises `InputError` naming the file and line."""
    path = Path(path)
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise located(
                    path, number, None, f"not valid UTF-8 (byte {err.start + 1} of the line). Save the file as UTF-8."
                ) from None


def read_text(path: str | Path) -> str:
    """A whole UTF-8 text file (a leading byte-order mark dropped); bad bytes name their line."""
    return "".join(line for _, line in read_text_lines(path))


def parse_json(text: str, path: str | Path, line: int | None = None) -> Any:
    """`json.loads(text)`; a syntax error, or nesting deeper than Python can follow, raises InputError naming
    `path` and the line (`line` for one line of JSON Lines, else the document's own line)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        where = line if line is not None else err.lineno
        fix = "Fix the line or remove it." if line is not None else "Fix the file."
        raise located(path, where, None, f"invalid JSON at column {err.colno}: {err.msg}. {fix}") from None
    except RecursionError:
        raise located(path, line, None, "JSON nested too deeply to read. Flatten the record.") from None


def read_jsonl(
    path: str | Path, required: Iterable[str | tuple[str, ...]] = (), texts: Iterable[str] = ()
) -> list[dict]:
    """Records of a JSONL file; a bad line or a missing field raises InputError naming file and line.

    A `required` entry may be a tuple of alternative names (at least one must be present). Fields in
    `texts` must be non-empty strings."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    required, texts = list(required), list(texts)
    records = []
    for number, line in read_text_lines(path):
        if not line.strip():
            continue
        record = parse_json(line, path, number)
        if not isinstance(record, dict):
            raise located(path, number, None, "expected a JSON object per line")
        for field in required:
            names = (field,) if isinstance(field, str) else field
            if not any(name in record for name in names):
                raise located(path, number, " or ".join(names), "missing")
        for field in texts:
            expected = text_expected(record.get(field))
            if expected:
                raise located(path, number, field, f"expected {expected}")
        records.append(record)
    return records


def text_expected(value: Any) -> str | None:
    """None for a non-empty string UTF-8 can encode; else what was expected instead (JSON's `\\ud800`
    escapes decode to lone surrogates, which no file or tokenizer can take)."""
    if not isinstance(value, str) or not value.strip():
        return "a non-empty string"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "text without lone surrogates such as \\ud800 (UTF-8 cannot encode them)"
    return None


def write_jsonl(path: str | Path, records: Iterable[dict]) -> Path:
    """Write records atomically (see `atomic_path`), one JSON object per line, UTF-8."""
    path = Path(path)
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def import_object(path: str) -> Any:
    """`package.module.Name` or `package.module:Name` -> the object."""
    module_name, _, name = path.replace(":", ".").rpartition(".")
    if not module_name:
        raise InputError(f"{path!r}: expected a dotted path such as wspo_lightning.rewards.VaderReward")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise InputError(f"cannot import {path!r}: {err}") from err
