"""Preference data: read and validate records, render prompts, tokenize with exact masks, batch.

`load_records` checks a file with no tokenizer (the CLI calls it before any model loads);
`PreferenceDataModule` adds prompt templates, tokenisation, the train/val split and the loaders,
whose training order resumes exactly mid-epoch (`ResumableDataLoader`).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from wspo_lightning.errors import InputError, located
from wspo_lightning.models import load_tokenizer

log = logging.getLogger(__name__)
_info = rank_zero_only(log.info)
_warn = rank_zero_only(log.warning)

IGNORE_INDEX = -100  # label of prompt and padding positions: no loss there
ACCEPTED_FORMATS = (
    "{prompt, chosen, rejected} strings; {prompt, response} or {prompt, completion} strings; "
    "{messages: [...]} ending with the assistant response; "
    "{prompt: [messages], chosen: [messages], rejected: [messages]}; {prompt: [messages], completion: [messages]}; "
    "{chosen: [conversation], rejected: [conversation]} sharing all but the last message"
)
_FIX = "Fix or remove the record."
_MISSING = object()


# ----------------------------------------------------------------------------- reading + validation

def load_records(path: str | Path, split: str | Sequence[str] | None = None) -> list[dict]:
    """Read and validate a data file into normalised records; no tokenizer needed.

    `path`: `.jsonl`, `.json` (a list or `{"data": [...]}`), `.parquet` or a `save_to_disk` directory;
    for a DatasetDict, `split` names the split (or candidates: the first present wins).
    A record: `{"id": str, "source": str, "prompt": str | list[{"role", "content"}], "chosen": str,
    "rejected": str | None}`; `prompt` is raw (not templated), `chosen` the response (the only one of
    prompt/response records), `source` is `file:line` (1-based) for JSON Lines, else `file:record i`
    (0-based). The first bad record raises `InputError` naming file, line or record, and field.
    """
    path = Path(path)
    if not path.exists():
        raise located(path, None, None, "file not found. Check data.train_path / val_path / test_path.")
    if path.is_file() and path.stat().st_size == 0:
        raise located(path, None, None, "the file is empty. Point to a file holding records.")
    rows = _read_rows(path, split)
    if not rows:
        raise located(path, None, None, "no records found. Point to a file holding records.")
    records: list[dict] = []
    seen: dict[str, str] = {}
    for where, default_id, raw in rows:
        record = normalise_record(raw, where, default_id)
        if record["id"] in seen:
            raise located(where, None, "id", f"duplicate id {record['id']!r} (first at {seen[record['id']]}). "
                          "Give every record a unique id, or remove the duplicate.")
        seen[record["id"]] = where
        records.append(record)
    return records


def _read_rows(path: Path, split: str | Sequence[str] | None) -> list[tuple[str, str, Any]]:
    """(where, default id, raw record) for every record of the file."""
    if path.is_dir():
        return _read_saved_dataset(path, split)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append((f"{path}:{n}", f"{path.name}:{n}", json.loads(line.rstrip("\r\n"))))
                except json.JSONDecodeError as err:
                    raise located(path, n, None, f"invalid JSON at column {err.colno}: {err.msg}. "
                                  "Fix the line or remove it.") from None
        return rows
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise located(path, err.lineno, None, f"invalid JSON at column {err.colno}: {err.msg}. "
                          "Fix the file.") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise located(path, None, None, f'expected a list of records or {{"data": [...]}}, got {_describe(data)}. '
                          "Fix the file, or write one record per line as .jsonl.")
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            data = pq.read_table(path).to_pylist()
        except Exception as err:  # pyarrow raises several types for a broken file
            raise located(path, None, None, f"cannot read as Parquet ({err}). Rewrite the file.") from None
    else:
        raise located(path, None, None, f"unsupported file type {suffix!r}: use .jsonl, .json, .parquet "
                      "or a directory written by datasets' save_to_disk.")
    return [(f"{path}:record {i}", f"{path.name}:{i}", raw) for i, raw in enumerate(data)]


def _read_saved_dataset(path: Path, split: str | Sequence[str] | None) -> list[tuple[str, str, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as err:  # not a saved dataset: datasets raises FileNotFoundError or others
        raise located(path, None, None, f"is a directory but not a dataset written by save_to_disk ({err}). "
                      "Give a .jsonl/.json/.parquet file or a save_to_disk directory.") from None
    name = None
    if isinstance(ds, datasets.DatasetDict):
        wanted = [split] if isinstance(split, str) else list(split or [])
        present = [s for s in wanted if s in ds] if wanted else list(ds)
        if not present or (not wanted and len(present) > 1):
            asked = f"none of them {wanted}" if wanted else "and no split was named"
            raise located(path, None, None, f"the saved DatasetDict has splits {sorted(ds)}, {asked}. "
                          "Save only the split you mean, or name it 'train' / 'validation'.")
        name = present[0]
        ds = ds[name]
    tag = f"[{name}]" if name else ""
    return [(f"{path}{tag}:record {i}", f"{path.name}{tag}:{i}", raw) for i, raw in enumerate(ds.to_list())]


def normalise_record(raw: Any, where: str, default_id: str) -> dict:
    """Validate one raw record (any accepted format) and return it normalised (see `load_records`)."""
    if not isinstance(raw, dict):
        raise located(where, None, None, f"expected a record (a JSON object), got {_describe(raw)}. {_FIX}")
    present = {key for key, value in raw.items() if value is not None}
    rejected = None
    if "chosen" in present and isinstance(raw["chosen"], list):
        prompt, chosen, rejected = _conversational_pair(raw, where)
    elif "chosen" in present:
        prompt, chosen, rejected = (_text(raw, key, where) for key in ("prompt", "chosen", "rejected"))
    elif "messages" in present:
        messages = _messages(raw, "messages", where, min_len=2)
        prompt, chosen = messages[:-1], _assistant(messages, "messages", where)
    elif present & {"response", "completion"}:
        key = "response" if "response" in present else "completion"
        if isinstance(raw.get("prompt"), list):  # conversational prompt-completion
            completion = _messages(raw, key, where)
            prompt = _messages(raw, "prompt", where) + completion[:-1]
            chosen = _assistant(completion, key, where)
        else:
            prompt, chosen = _text(raw, "prompt", where), _text(raw, key, where)
    else:
        raise located(where, None, None, f"unknown record format with fields {sorted(raw)}; "
                      f"accepted: {ACCEPTED_FORMATS}. {_FIX}")
    return {"id": _record_id(raw, where, default_id), "source": where,
            "prompt": prompt, "chosen": chosen, "rejected": rejected}


def _conversational_pair(raw: dict, where: str) -> tuple[list[dict], str, str]:
    # A string prompt beside conversational chosen/rejected is ignored, as TRL does: the conversations hold it.
    prefix = _messages(raw, "prompt", where) if isinstance(raw.get("prompt"), list) else []
    chosen, rejected = _messages(raw, "chosen", where), _messages(raw, "rejected", where)
    responses = _assistant(chosen, "chosen", where), _assistant(rejected, "rejected", where)
    prompt = prefix + chosen[:-1]
    if not prompt:
        raise _expected(where, "chosen", "a conversation of a prompt and the assistant response "
                        "(at least 2 messages, or a 'prompt' list beside it)", raw["chosen"])
    if prefix + rejected[:-1] != prompt:
        raise located(where, None, "rejected", "expected the same messages as 'chosen' before the last "
                      f"(assistant) message, but they differ. Make both share the prompt. {_FIX}")
    return prompt, *responses


def _text(raw: dict, field: str, where: str) -> str:
    value = raw.get(field, _MISSING)
    if not isinstance(value, str) or not value.strip():
        raise _expected(where, field, "a non-empty string", value)
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
        if not isinstance(role, str) or not role:
            raise _expected(where, f"{field}[{i}].role", "a role string such as 'user'", role)
        if not isinstance(content, str) or not content.strip():
            raise _expected(where, f"{field}[{i}].content", "a non-empty string", content)
        messages.append({"role": role, "content": content})
    return messages


def _assistant(messages: list[dict], field: str, where: str) -> str:
    """The last message, which must be the assistant's response; returns its text."""
    last = len(messages) - 1
    if messages[last]["role"] != "assistant":
        raise _expected(where, f"{field}[{last}].role", "'assistant' (the response is the last message)",
                        messages[last]["role"])
    return messages[last]["content"]


def _record_id(raw: dict, where: str, default_id: str) -> str:
    value = raw.get("id")
    if value is None:
        return default_id
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise _expected(where, "id", "a non-empty string or an integer (or no id)", value)
    return str(value)


def _expected(where: str, field: str, expected: str, value: Any) -> InputError:
    return located(where, None, field, f"expected {expected}, got {_describe(value)}. {_FIX}")


def _describe(value: Any) -> str:
    if value is _MISSING:
        return "nothing (the field is missing)"
    if isinstance(value, str) and not value.strip():
        return f"an empty string ({value!r})"
    text = repr(value)
    return f"{type(value).__name__} ({text if len(text) <= 60 else text[:57] + '...'})"


# ----------------------------------------------------------------------------- templates + tokens

def render_prompt(prompt: str | list[dict], tokenizer: Any, chat: bool, prompt_template: str = "{prompt}") -> str:
    """The prompt text the model sees, ending where the response begins.

    `chat=True` applies the tokenizer's chat template with the generation prompt (a string prompt
    is one user message); otherwise `prompt_template.format(prompt=...)`, where a conversation
    becomes its single message's text or `role: content` lines.
    """
    if chat:
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if isinstance(prompt, list):
        prompt = (prompt[0]["content"] if len(prompt) == 1
                  else "\n".join(f"{m['role']}: {m['content']}" for m in prompt))
    return prompt_template.format(prompt=prompt)


def tokenize_records(records: Sequence[dict], tokenizer: Any, max_length: int, chat: bool,
                     chunk_size: int = 1024) -> list[dict]:
    """Tokenize records that hold `prompt_text` (see `tokenize_record`), in batched tokenizer calls."""
    eos = [tokenizer.eos_token_id]
    features = []
    for start in range(0, len(records), chunk_size):
        chunk = records[start:start + chunk_size]
        # a chat template already holds its special tokens (BOS and all); a plain prompt gets the usual ones
        prompts = tokenizer([r["prompt_text"] for r in chunk], add_special_tokens=not chat)["input_ids"]
        chosen = tokenizer([r["chosen"] for r in chunk], add_special_tokens=False)["input_ids"]
        texts = [r["rejected"] for r in chunk if r["rejected"] is not None]
        rejected = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
        for i, (record, prompt_ids, chosen_ids) in enumerate(zip(chunk, prompts, chosen)):
            rejected_ids = next(rejected) + eos if record["rejected"] is not None else None
            feature = _truncate(record, prompt_ids, chosen_ids + eos, rejected_ids, max_length)
            features.append({"index": start + i, "id": record["id"], **feature})
    return features


def tokenize_record(record: dict, tokenizer: Any, max_length: int, chat: bool) -> dict:
    """One record -> `{index: 0, id, prompt_ids, chosen_ids, rejected_ids | None, truncated}`.

    Prompt and responses are tokenized apart and each response ends with eos, so the boundary is
    exact. Over `max_length`, the prompt is cut from the left first (one token at least kept),
    by the longer response's need so chosen and rejected share it, then responses from the right.
    """
    return tokenize_records([record], tokenizer, max_length, chat)[0]


def _truncate(record: dict, prompt: list[int], chosen: list[int], rejected: list[int] | None,
              max_length: int) -> dict:
    longest = max(len(chosen), len(rejected or ()))
    truncated = len(prompt) + longest > max_length
    if truncated:
        prompt = prompt[-max(1, max_length - longest):]
        room = max_length - len(prompt)
        if room < 1:
            raise located(record["source"], None, "chosen", f"the response is empty after truncation to "
                          f"max_length={max_length}. Raise max_length.")
        chosen, rejected = chosen[:room], None if rejected is None else rejected[:room]
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected, "truncated": truncated}


def collate(features: Sequence[dict], pad_token_id: int) -> dict:
    """Right-padded batch: `{side}_input_ids`, `{side}_attention_mask`, `{side}_labels` [batch, tokens]
    for side chosen (and rejected when every feature has one, padded to the same length), `index`
    [batch] and `ids` (list of str). Labels are the input ids with -100 on prompt and padding."""
    sides = ["chosen", "rejected"] if all(f["rejected_ids"] is not None for f in features) else ["chosen"]
    length = max(len(f["prompt_ids"]) + len(f[f"{side}_ids"]) for f in features for side in sides)
    batch: dict[str, Any] = {}
    for side in sides:
        input_ids = torch.full((len(features), length), pad_token_id, dtype=torch.long)  # [batch, tokens]
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        attention_mask = torch.zeros_like(input_ids)
        for row, f in enumerate(features):
            n_prompt, response = len(f["prompt_ids"]), f[f"{side}_ids"]
            end = n_prompt + len(response)
            input_ids[row, :end] = torch.tensor(f["prompt_ids"] + response)
            labels[row, n_prompt:end] = torch.tensor(response)
            attention_mask[row, :end] = 1
        batch.update({f"{side}_input_ids": input_ids, f"{side}_attention_mask": attention_mask,
                      f"{side}_labels": labels})
    batch["index"] = torch.tensor([f["index"] for f in features], dtype=torch.long)
    batch["ids"] = [f["id"] for f in features]
    return batch


def split_records(records: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out `val_fraction` of records (at least one when > 0) chosen by `seed`; both keep file order."""
    n_val = max(1, round(len(records) * val_fraction)) if val_fraction > 0 else 0
    held_out = set(random.Random(seed).sample(range(len(records)), n_val))
    return ([r for i, r in enumerate(records) if i not in held_out],
            [r for i, r in enumerate(records) if i in held_out])


class SeededSampler(DistributedSampler):
    """A permutation drawn from `seed + epoch`: epoch e has the same order in every run, resumed or not.

    With `group_size`, indices are sorted by length (longest first) within consecutive groups of
    the permutation, so batches hold similar lengths and need less padding. Under data parallelism
    (`num_replicas` > 1) rank r takes every num_replicas-th index of that order from position r, so
    each rank's stream stays sorted within groups; the order is padded by repeating its start to a
    multiple of num_replicas, as torch's DistributedSampler does. Being a DistributedSampler, Lightning
    uses it as is instead of wrapping it in a shuffling one that would undo the grouping; it calls
    `set_epoch` each epoch, and `ResumableDataLoader` continues the order mid-epoch after a resume.
    """

    def __init__(self, lengths: Sequence[int], seed: int, group_size: int | None = None, num_replicas: int = 1,
                 rank: int = 0) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, num_replicas={num_replicas})")
        # DistributedSampler.__init__ would query torch.distributed: set its attributes directly.
        self.lengths, self.seed, self.group_size, self.epoch = list(lengths), seed, group_size, 0
        self.num_replicas, self.rank, self.shuffle, self.drop_last = num_replicas, rank, True, False
        self.num_samples = math.ceil(len(self.lengths) / num_replicas)
        self.total_size = self.num_samples * num_replicas

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        if self.group_size:
            groups = [order[i:i + self.group_size] for i in range(0, len(order), self.group_size)]
            order = [i for group in groups for i in sorted(group, key=lambda i: -self.lengths[i])]
        order += (order * math.ceil(self.total_size / max(len(order), 1)))[:self.total_size - len(order)]
        return iter(order[self.rank:self.total_size:self.num_replicas])


@dataclass
class LoaderPosition:
    """Where the training loader is: the sampler's `epoch` and the `batches` of it handed out so far.

    Shared by the data module and its training loaders: Lightning may rebuild a loader (to add a
    distributed sampler), and when `configure_optimizers` reads `trainer.estimated_stepping_batches`
    it never hands the loader its checkpointed state (Lightning issue #20550), so the data module's
    own `state_dict` carries the position too. Loading the same state twice is harmless.
    """

    epoch: int | None = None
    batches: int = 0
    resume: tuple[int | None, int] | None = None  # (epoch, batches) the next iteration continues from

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.batches = state["epoch"], int(state["batches"])
        self.resume = (self.epoch, self.batches)


class ResumableDataLoader(DataLoader):
    """A DataLoader that resumes exactly mid-epoch: after `load_state_dict`, the iteration of the
    saved epoch skips the batches already trained on, before any is fetched or collated.

    It counts the batches it hands out (not those its workers prefetch). Its iterator starts lazily,
    on the first `next()`, so the sampler's epoch is the one Lightning set for this epoch even with
    workers that prefetch. The state is `{epoch, batches}`; skipping applies only when the resumed
    iteration has the saved epoch (a checkpoint taken at an epoch's end resumes with the next one),
    and after sharding, so under DDP each rank skips its own batches. `len()` stays the whole epoch,
    as Lightning counts batches from the epoch's start.
    """

    def __init__(self, *args: Any, position: LoaderPosition | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.position = position if position is not None else LoaderPosition()
        self._skip = 0

    def state_dict(self) -> dict[str, Any]:
        return self.position.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position.load_state_dict(state)

    @property
    def _index_sampler(self):  # read by DataLoader iterators when they start or reset
        return _SkipFirst(super()._index_sampler, self)

    def __iter__(self):
        return _LazyCountingIterator(self)

    def _start_epoch(self):
        position = self.position
        sampler = getattr(self.batch_sampler, "sampler", self.sampler)  # under DDP: Lightning's wrapper
        epoch = getattr(sampler, "epoch", None)
        skip = 0
        if position.resume is not None:
            resume_epoch, resume_batches = position.resume
            position.resume = None
            skip = resume_batches if resume_epoch == epoch else 0
        position.epoch, position.batches = epoch, skip
        self._skip = skip
        try:
            return super().__iter__()
        finally:
            self._skip = 0


class _SkipFirst:
    """The loader's batch sampler without the first `loader._skip` batches (read when iterated)."""

    def __init__(self, batches: Any, loader: ResumableDataLoader) -> None:
        self.batches, self.loader = batches, loader

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return itertools.islice(iter(self.batches), self.loader._skip, None)


class _LazyCountingIterator:
    """Starts the loader's epoch on the first `next()` and counts the batches it hands out."""

    def __init__(self, loader: ResumableDataLoader) -> None:
        self.loader, self.iterator = loader, None

    def __iter__(self):
        return self

    def __len__(self) -> int:
        return len(self.loader)

    def __next__(self) -> Any:
        if self.iterator is None:
            self.iterator = self.loader._start_epoch()
        batch = next(self.iterator)
        self.loader.position.batches += 1
        return batch


# ----------------------------------------------------------------------------- the DataModule

class PreferenceDataModule(pl.LightningDataModule):
    """Preference or prompt/response data for WSPO and DPO, as padded token batches.

    Everything happens in `setup()`: read and validate records (errors name file, line, field),
    load the tokenizer, render prompts, tokenize, truncate. Batches are dicts (see `collate`).
    After setup: `tokenizer`, `train_records` / `val_records` / `test_records` (records of
    `load_records` plus `prompt_text`, the rendered prompt), `features` (split -> the tokenized
    records, see `tokenize_record`), `truncation_stats` and `prompts()`.
    The training loader's position is part of the checkpoint (`state_dict`), so `--ckpt_path`
    resumes mid-epoch with the very next batch.

    Args:
        train_path: training data: .jsonl, .json, .parquet or a save_to_disk directory ('train' split).
        tokenizer: tokenizer directory or hub id, loaded with AutoTokenizer.
        val_path: validation data, same formats ('validation', else 'test' split); None: use val_fraction.
        val_fraction: share of training records held out for validation without val_path; 0: none.
        test_path: data for `wspo test`, same formats ('test' split); None: test on the validation data.
        max_length: most tokens of prompt plus response; longer records lose prompt tokens from the
            left first, then response tokens from the right.
        batch_size: training records per batch (per device).
        eval_batch_size: validation and test records per batch; None uses `batch_size`.
        num_workers: DataLoader worker processes.
        use_chat_template: render prompts with the tokenizer's chat template when it has one.
        prompt_template: plain template with a `{prompt}` field, used without a chat template.
        seed: seed of the train/val split and of the training order (reproducible on resume).
        trust_remote_code: let the tokenizer run code from its repository.
        group_by_length: batch records of similar length (sorted within groups of 50 batches).
    """

    def __init__(self, train_path: str, tokenizer: str, val_path: str | None = None, val_fraction: float = 0.1,
                 test_path: str | None = None, max_length: int = 512, batch_size: int = 8,
                 eval_batch_size: int | None = None, num_workers: int = 0, use_chat_template: bool = True,
                 prompt_template: str = "{prompt}", seed: int = 0, trust_remote_code: bool = False,
                 group_by_length: bool = False) -> None:
        super().__init__()
        if not 0 <= val_fraction < 1:
            raise InputError(f"val_fraction={val_fraction}: expected a number in [0, 1).")
        for name, value in (("max_length", max_length), ("batch_size", batch_size),
                            ("eval_batch_size", eval_batch_size or 1)):
            if value < 1:
                raise InputError(f"{name}={value}: expected a positive integer.")
        if "{prompt}" not in prompt_template:
            raise InputError(f"prompt_template={prompt_template!r}: expected a '{{prompt}}' field for the prompt text.")
        self.train_path, self.tokenizer_path, self.val_path, self.test_path = train_path, tokenizer, val_path, test_path
        self.val_fraction, self.max_length, self.seed = val_fraction, max_length, seed
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size or batch_size, num_workers
        self.use_chat_template, self.prompt_template = use_chat_template, prompt_template
        self.trust_remote_code, self.group_by_length = trust_remote_code, group_by_length
        self.tokenizer: Any = None
        self.train_records: list[dict] | None = None
        self.val_records: list[dict] | None = None
        self.test_records: list[dict] | None = None
        self.truncation_stats: dict = {}
        self.features: dict[str, list[dict]] = {}
        self.train_position = LoaderPosition()  # shared with every training loader (see LoaderPosition)

    def setup(self, stage: str | None = None) -> None:
        if self.train_records is not None:  # once per process, whatever the stage
            return
        train = load_records(self.train_path, split="train")
        if self.val_path:
            val = _held_out(load_records(self.val_path, split=["validation", "test"]), train, "validation")
        else:
            train, val = split_records(train, self.val_fraction, self.seed)
            if not val:
                _info("no validation data (val_path unset, val_fraction=0): validation is skipped")
        test = _held_out(load_records(self.test_path, split="test"), train, "test") if self.test_path else []
        if len(train) < self.batch_size:
            raise located(self.train_path, None, None, f"the train split holds {len(train)} records, fewer than "
                          f"one batch (batch_size={self.batch_size}). Add records or lower batch_size"
                          + ("." if self.val_path else " or val_fraction."))
        tokenizer = load_tokenizer(self.tokenizer_path, self.trust_remote_code)
        if tokenizer.eos_token_id is None:
            raise InputError(f"tokenizer: {self.tokenizer_path} has no eos token, so responses cannot end. "
                             "Set eos_token in its tokenizer_config.json.")
        chat = self.use_chat_template and bool(getattr(tokenizer, "chat_template", None))
        if not chat and self.use_chat_template:
            _warn("the tokenizer has no chat template (%s): prompts use the plain template %r instead "
                  "(set data.prompt_template; use_chat_template: false silences this)",
                  self.tokenizer_path, self.prompt_template)
        elif not chat:
            _info("prompts use the plain template %r (use_chat_template is off)", self.prompt_template)
        splits = {"train": train, "val": val, "test": test}
        for record in train + val + test:
            record["prompt_text"] = render_prompt(record["prompt"], tokenizer, chat, self.prompt_template)
        self.features = {split: tokenize_records(records, tokenizer, self.max_length, chat)
                          for split, records in splits.items()}
        stats = {split: sum(f["truncated"] for f in feats) for split, feats in self.features.items()}
        stats.update(truncated=sum(stats.values()), total=sum(map(len, splits.values())), max_length=self.max_length)
        if stats["truncated"]:
            _warn("truncated %d of %d records to max_length=%d", stats["truncated"], stats["total"], self.max_length)
        self.truncation_stats = stats
        self.tokenizer, self.train_records, self.val_records, self.test_records = tokenizer, train, val, test

    def train_dataloader(self) -> DataLoader:
        features = self.features["train"]
        lengths = [len(f["prompt_ids"]) + max(len(f["chosen_ids"]), len(f["rejected_ids"] or ())) for f in features]
        ranks = {}  # data-parallel ranks, from the strategy as Lightning's own samplers get them
        if self.trainer is not None and self.trainer.world_size > 1:
            ranks = {k: v for k, v in self.trainer.strategy.distributed_sampler_kwargs.items()
                     if k in ("num_replicas", "rank")}
        sampler = SeededSampler(lengths, self.seed, 50 * self.batch_size if self.group_by_length else None, **ranks)
        return self._loader(features, self.batch_size, sampler, position=self.train_position)

    def val_dataloader(self) -> DataLoader | list:
        features = self.features["val"]
        # Lightning reads [] as "no validation" (and warns that its length is zero)
        return self._loader(features, self.eval_batch_size, None) if features else []

    def test_dataloader(self) -> DataLoader | list:
        """The test data (`test_path`); without one, the validation data."""
        features = self.features["test"] if self.test_path else self.features["val"]
        return self._loader(features, self.eval_batch_size, None) if features else []

    def _loader(self, features: list[dict], batch_size: int, sampler: Sampler | None,
                position: LoaderPosition | None = None) -> DataLoader:
        kwargs = dict(batch_size=batch_size, sampler=sampler, shuffle=False,
                      collate_fn=partial(collate, pad_token_id=self.tokenizer.pad_token_id),
                      num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                      pin_memory=torch.cuda.is_available())
        if position is None:
            return DataLoader(features, **kwargs)
        return ResumableDataLoader(features, position=position, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        return {"train_position": self.train_position.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "train_position" in state_dict:
            self.train_position.load_state_dict(state_dict["train_position"])

    def prompts(self, split: str = "val", n: int | None = None) -> list[str]:
        """The rendered prompts of `split` ('train', 'val' or 'test'), the first `n` (all with None)."""
        records = {"train": self.train_records, "val": self.val_records, "test": self.test_records}[split]
        if records is None:
            raise RuntimeError("PreferenceDataModule.prompts() needs setup() first")
        return [r["prompt_text"] for r in records[:n]]


def _held_out(records: list[dict], train: list[dict], kind: str) -> list[dict]:
    """`records` after checking that none shares an id with the training data."""
    train_ids = {r["id"]: r["source"] for r in train}
    for record in records:
        if record["id"] in train_ids:
            raise located(record["source"], None, "id", f"id {record['id']!r} is also in the training data "
                          f"({train_ids[record['id']]}). Keep {kind} records out of training.")
    return records
