"""Seeded fuzzing of every data reader: cut files, bytes that are not UTF-8, wrong types, nulls, deep
nesting. Each reader either loads, or raises one InputError whose one-line message starts with the file."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from wspo_lightning.data import load_records
from wspo_lightning.errors import InputError
from wspo_lightning.io import read_jsonl
from wspo_lightning.tiny import preference_records

SEEDS = range(120)
_ODD_VALUES = [
    None,
    0,
    -3,
    True,
    1.5,
    float("nan"),
    "",
    "  ",
    "\ud800",  # a lone surrogate: valid JSON (as an escape), not encodable text
    [],
    {},
    [None],
    [{"role": "user"}],
    [{"role": 3, "content": "x"}],
    [{"role": "assistant", "content": ["nested"]}],
    {"role": "user", "content": "x"},
    [1, -1, 2],
    [[[[["deep"]]]]],
]
_BAD_BYTES = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00", b"\xef\xbb\xbf", b"\xfe\xff"]


def _records(rng: random.Random) -> list[dict]:
    """Valid records of several formats, then some fields replaced, dropped or nested deeper."""
    records = []
    for r in preference_records(4, seed=rng.randrange(1000)):
        user = [{"role": "user", "content": r["prompt"]}]
        records += [
            r,
            {"id": r["id"] + "-m", "messages": user + [{"role": "assistant", "content": r["chosen"]}]},
            {"id": r["id"] + "-r", "prompt": r["prompt"], "response": r["chosen"], "response_ids": [1, 2]},
        ]
    for _ in range(rng.randrange(4)):
        record = rng.choice(records)
        key = rng.choice(sorted(record) + ["chosen_ids", "tokenizer_fingerprint", "finished"])
        action = rng.random()
        if action < 0.2:
            record.pop(key, None)
        elif action < 0.3:
            record[key] = json.loads("[" * 200 + "]" * 200)
        else:
            record[key] = rng.choice(_ODD_VALUES)
    if rng.random() < 0.1:
        records.insert(rng.randrange(len(records)), rng.choice(_ODD_VALUES))
    return records


def _damage(rng: random.Random, data: bytes) -> bytes:
    """Cut the bytes, or splice bytes that are not UTF-8 (or a byte-order mark) into them, or both."""
    if rng.random() < 0.2:
        data = b"\xef\xbb\xbf" + data
    if rng.random() < 0.4:
        at = rng.randrange(len(data) + 1)
        data = data[:at] + rng.choice(_BAD_BYTES) + data[at:]
    if rng.random() < 0.4:
        data = data[: rng.randrange(len(data) + 1)]
    if rng.random() < 0.05:
        data += b"\n" + b"[" * 100_000  # nesting deeper than Python's recursion limit
    return data


def _jsonl(records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def _json(records) -> bytes:
    return json.dumps({"data": records} if len(records) % 2 else records).encode()


def _check(read, path):
    """`read(path)` loads, or raises one InputError naming `path` on one line; anything else fails the test.
    What loads is text a tokenizer can take: it encodes as UTF-8."""
    try:
        loaded = read(path)
    except InputError as err:
        message = str(err)
        assert message.startswith(str(path)), message
        assert "\n" not in message, message
    else:
        json.dumps(loaded, ensure_ascii=False).encode("utf-8")


READERS = {
    "load_records": lambda path: load_records(path),
    "read_jsonl": lambda path: read_jsonl(path, required=["prompt", "response"], texts=["prompt", "response"]),
}


@pytest.mark.parametrize("seed", SEEDS)
def test_text_readers_load_or_raise_one_input_error(tmp_path, seed):
    rng = random.Random(seed)
    records = _records(rng)
    for suffix, encode in ((".jsonl", _jsonl), (".json", _json)):
        path = tmp_path / f"data{suffix}"
        path.write_bytes(_damage(rng, encode(records)))
        for name, read in READERS.items():
            if name == "read_jsonl" and suffix == ".json":
                continue
            _check(read, path)


@pytest.mark.parametrize("seed", range(0, 120, 4))
def test_parquet_reader_loads_or_raises_one_input_error(tmp_path, seed):
    rng = random.Random(seed)
    try:  # pyarrow refuses some mixes of types: those files cannot exist
        table = pa.Table.from_pylist([r for r in _records(rng) if isinstance(r, dict)])
    except (pa.ArrowException, TypeError, ValueError):
        return
    path = tmp_path / "data.parquet"
    pq.write_table(table, path)
    if rng.random() < 0.5:
        data = path.read_bytes()
        path.write_bytes(data[: rng.randrange(len(data))])
    _check(load_records, path)
    folder = tmp_path / "hub" / "data"
    folder.mkdir(parents=True)
    (folder / "train-00000-of-00001.parquet").write_bytes(path.read_bytes())
    _check(load_records, tmp_path / "hub")
