"""Preference records: read a data file, validate every record, normalise it. No tokenizer needed,
so the CLI checks data before any model loads; the first bad record names its file, line and field."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from wspo_lightning.data.hub import is_hub_id, read_dataset_rows
from wspo_lightning.errors import located
from wspo_lightning.io import parse_json, read_text, read_text_lines, text_expected

ACCEPTED_FORMATS = (
    "{prompt, chosen, rejected} strings; {prompt, response} or {prompt, completion} strings; "
    "{messages: [...]} ending with the assistant response; "
    "{prompt: [messages], chosen: [messages], rejected: [messages]}; {prompt: [messages], completion: [messages]}; "
    "{chosen: [conversation], rejected: [conversation]} sharing all but the last message"
)
_FIX = "Fix or remove the record."
_MISSING = object()


def load_records(
    path: str | Path,
    split: str | Sequence[str] | None = None,
    config: str | None = None,
    revision: str | None = None,
) -> list[dict]:
    """Read and validate a data file into normalised records.

    `path`: `.jsonl`, `.json` (a list or `{"data": [...]}`), `.parquet`, a `save_to_disk` directory, a
    folder in the Hub's layout or a Hub id (`wspo_lightning.data.hub`); for a dataset with splits, `split`
    names the split (or candidates: the first present wins); `config` is the subset, `revision` a Hub
    revision.

    A normalised record: `id` (str), `source` (`file:line`, 1-based, for JSON Lines, else `file:record i`,
    0-based), `prompt` (str or messages; raw, not templated), `chosen` (the response; the only one of
    prompt/response records) and `rejected` (str or None), plus what a pipeline may have kept of sampling:
    `chosen_finished` / `rejected_finished` (False when a length limit cut the response: it then gets no
    end-of-turn; default True), `chosen_ids` / `rejected_ids` (the sampled token ids, or None) and
    `tokenizer_fingerprint` (of the renderer that sampled them, or None).
    The first bad record raises `InputError` naming file, line or record, and field.
    """
    if is_hub_id(path):
        rows = read_dataset_rows(path, split, config, revision)
    else:
        path = Path(path)
        if not path.exists():
            raise located(path, None, None, "file not found. Check data.train_path / val_path / test_path.")
        if path.is_file() and path.stat().st_size == 0:
            raise located(path, None, None, "the file is empty. Point to a file holding records.")
        rows = read_dataset_rows(path, split, config) if path.is_dir() else _read_rows(path)
    if not rows:
        raise located(path, None, None, "no records found. Point to a file holding records.")
    records: list[dict] = []
    seen: dict[str, str] = {}
    for where, default_id, raw in rows:
        record = normalise_record(raw, where, default_id)
        if record["id"] in seen:
            raise located(
                where,
                None,
                "id",
                f"duplicate id {record['id']!r} (first at {seen[record['id']]}). "
                "Give every record a unique id, or remove the duplicate.",
            )
        seen[record["id"]] = where
        records.append(record)
    return records


def _read_rows(path: Path) -> list[tuple[str, str, Any]]:
    """(where, default id, raw record) for every record of the file."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for n, line in read_text_lines(path):
            if not line.strip():
                continue
            rows.append((f"{path}:{n}", f"{path.name}:{n}", parse_json(line, path, n)))
        return rows
    if suffix == ".json":
        data = parse_json(read_text(path), path)
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise located(
                path,
                None,
                None,
                f'expected a list of records or {{"data": [...]}}, got {_describe(data)}. '
                "Fix the file, or write one record per line as .jsonl.",
            )
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            data = pq.read_table(path).to_pylist()
        except Exception as err:  # pyarrow raises several types for a broken file
            raise located(path, None, None, f"cannot read as Parquet ({err}). Rewrite the file.") from None
    else:
        raise located(
            path,
            None,
            None,
            f"unsupported file type {suffix!r}: use .jsonl, .json, .parquet, a directory written by "
            "datasets' save_to_disk, a folder in the Hub's layout or a Hub dataset id.",
        )
    return [(f"{path}:record {i}", f"{path.name}:{i}", raw) for i, raw in enumerate(data)]


def normalise_record(raw: Any, where: str, default_id: str) -> dict:
    """Validate one raw record (any accepted format) and return it normalised (see `load_records`)."""
    if not isinstance(raw, dict):
        raise located(where, None, None, f"expected a record (a JSON object), got {_describe(raw)}. {_FIX}")
    present = {key for key, value in raw.items() if value is not None}
    rejected = None
    sampled = {"chosen": "chosen", "rejected": "rejected"}  # side -> prefix of its `_finished` / `_ids` fields
    if "chosen" in present and isinstance(raw["chosen"], list):
        prompt, chosen, rejected = _conversational_pair(raw, where)
    elif "chosen" in present:
        prompt, chosen, rejected = (_text(raw, key, where) for key in ("prompt", "chosen", "rejected"))
    elif "messages" in present:
        messages = _messages(raw, "messages", where, min_len=2)
        prompt, chosen = messages[:-1], _assistant(messages, "messages", where)
        sampled = {"chosen": "response"}
    elif present & {"response", "completion"}:
        key = "response" if "response" in present else "completion"
        if isinstance(raw.get("prompt"), list):  # conversational prompt-completion
            completion = _messages(raw, key, where)
            prompt = _messages(raw, "prompt", where) + completion[:-1]
            chosen = _assistant(completion, key, where)
        else:
            prompt, chosen = _text(raw, "prompt", where), _text(raw, key, where)
        sampled = {"chosen": key}
    else:
        raise located(
            where, None, None, f"unknown record format with fields {sorted(raw)}; accepted: {ACCEPTED_FORMATS}. {_FIX}"
        )
    record = {
        "id": _record_id(raw, where, default_id),
        "source": where,
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
    }
    for side in ("chosen", "rejected"):
        prefix = sampled.get(side)
        flag = "finished" if prefix in ("response", "completion") else f"{prefix}_finished"
        record[f"{side}_finished"] = _flag(raw, flag, where) if prefix else True
        record[f"{side}_ids"] = _ids(raw, f"{prefix}_ids", where) if prefix else None
    fingerprint = raw.get("tokenizer_fingerprint")
    if fingerprint is not None and text_expected(fingerprint):
        raise _expected(where, "tokenizer_fingerprint", "a string (as `wspo sample` writes it) or nothing", fingerprint)
    record["tokenizer_fingerprint"] = fingerprint
    return record


def _flag(raw: dict, field: str, where: str) -> bool:
    value = raw.get(field)
    if value is None:
        return True  # user data is complete text
    if not isinstance(value, bool):
        raise _expected(where, field, "true or false (false: a length limit cut the response)", value)
    return value


def _ids(raw: dict, field: str, where: str) -> list[int] | None:
    value = raw.get(field)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
        raise _expected(where, field, "a list of token ids (non-negative integers)", value)
    return value


def _conversational_pair(raw: dict, where: str) -> tuple[list[dict], str, str]:
    # A string prompt beside conversational chosen/rejected is ignored, as TRL does: the conversations hold it.
    prefix = _messages(raw, "prompt", where) if isinstance(raw.get("prompt"), list) else []
    chosen, rejected = _messages(raw, "chosen", where), _messages(raw, "rejected", where)
    responses = _assistant(chosen, "chosen", where), _assistant(rejected, "rejected", where)
    prompt = prefix + chosen[:-1]
    if not prompt:
        raise _expected(
            where,
            "chosen",
            "a conversation of a prompt and the assistant response (at least 2 messages, or a 'prompt' list beside it)",
            raw["chosen"],
        )
    if prefix + rejected[:-1] != prompt:
        raise located(
            where,
            None,
            "rejected",
            "expected the same messages as 'chosen' before the last "
            f"(assistant) message, but they differ. Make both share the prompt. {_FIX}",
        )
    return prompt, *responses


def _text(raw: dict, field: str, where: str) -> str:
    value = raw.get(field, _MISSING)
    expected = text_expected(value)
    if expected:
        raise _expected(where, field, expected, value)
    return value


def _messages(raw: dict, field: str, where: str, min_len: int = 1) -> list[dict]:
    value = raw.get(field, _MISSING)
    if not isinstance(value, list) or len(value) < min_len:
        raise _expected(where, field, f"a list of at least {min_len} messages {{role, content}}", value)
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise _expected(where, f"{field}[{i}]", "a message {role, content}", message)
        role, content = message.get("role", _MISSING), message.get("content", _MISSING)
        if text_expected(role):
            raise _expected(where, f"{field}[{i}].role", "a role string such as 'user'", role)
        expected = text_expected(content)
        if expected:
            raise _expected(where, f"{field}[{i}].content", expected, content)
        messages.append({"role": role, "content": content})
    return messages


def _assistant(messages: list[dict], field: str, where: str) -> str:
    """The last message, which must be the assistant's response; returns its text."""
    last = len(messages) - 1
    if messages[last]["role"] != "assistant":
        raise _expected(
            where, f"{field}[{last}].role", "'assistant' (the response is the last message)", messages[last]["role"]
        )
    return messages[last]["content"]


def _record_id(raw: dict, where: str, default_id: str) -> str:
    value = raw.get("id")
    if value is None:
        return default_id
    if (
        isinstance(value, bool)
        or not isinstance(value, (str, int))
        or (isinstance(value, str) and text_expected(value))
    ):
        raise _expected(where, "id", "a non-empty string or an integer (or no id)", value)
    return str(value)


def _expected(where: str, field: str, expected: str, value: Any):
    return located(where, None, field, f"expected {expected}, got {_describe(value)}. {_FIX}")


def _describe(value: Any) -> str:
    if value is _MISSING:
        return "nothing (the field is missing)"
    if isinstance(value, str) and not value.strip():
        return f"an empty string ({value!r})"
    text = repr(value)
    return f"{type(value).__name__} ({text if len(text) <= 60 else text[:57] + '...'})"


def split_records(records: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out `val_fraction` of records (at least one when > 0) chosen by `seed`; both keep file order."""
    n_val = max(1, round(len(records) * val_fraction)) if val_fraction > 0 else 0
    held_out = set(random.Random(seed).sample(range(len(records)), n_val))
    return (
        [r for i, r in enumerate(records) if i not in held_out],
        [r for i, r in enumerate(records) if i in held_out],
    )


def held_out(records: list[dict], train: list[dict], kind: str) -> list[dict]:
    """`records` after checking that none shares an id with the training data."""
    train_ids = {r["id"]: r["source"] for r in train}
    for record in records:
        if record["id"] in train_ids:
            raise located(
                record["source"],
                None,
                "id",
                f"id {record['id']!r} is also in the training data "
                f"({train_ids[record['id']]}). Keep {kind} records out of training.",
            )
    return records


def load_prompts(
    path: str | Path, split: str | Sequence[str] | None = None, column: str = "prompt", limit: int | None = None
) -> list[dict]:
    """The prompts of any file or dataset `load_records` reads: each record with `prompt` taken from `column`,
    a string or a conversation (a trailing assistant turn, as in a `messages` column, is dropped: the prompt is
    what comes before the response), and an `id` (the record's, its `prompt_id`, else its place); other fields
    kept. The first bad record raises `InputError` naming it and the column."""
    if is_hub_id(path) or Path(path).is_dir():
        rows = read_dataset_rows(path, split)
    else:
        if not Path(path).is_file():
            raise located(
                path, None, None, "file not found. Give a .jsonl/.json/.parquet file, a dataset folder or id."
            )
        rows = _read_rows(Path(path))
    prompts = []
    for where, default_id, raw in rows[:limit]:
        if not isinstance(raw, dict) or column not in raw:
            raise located(where, None, column, "missing. Name the field holding the prompt with prompt_column")
        value = raw[column]
        if isinstance(value, list):
            value = _messages(raw, column, where)
            value = value[:-1] if len(value) > 1 and value[-1].get("role") == "assistant" else value
        elif not (isinstance(value, str) and value.strip()):
            raise _expected(where, column, "a non-empty string (the prompt) or a list of messages", value)
        prompts.append({**raw, "prompt": value, "id": str(raw.get("id", raw.get("prompt_id", default_id)))})
    if not prompts:
        raise located(path, None, None, "no prompts found. Point to a file holding records.")
    return prompts
