"""PreferenceDataModule: formats, validation errors, masks, truncation, templates, split and order."""

from __future__ import annotations

import json
import logging

import lightning.pytorch as pl
import pytest
import torch

from wspo_lightning.data import PreferenceDataModule, SeededSampler, collate, load_records, tokenize_record
from wspo_lightning.errors import InputError
from wspo_lightning.logprobs import IGNORE_INDEX
from wspo_lightning.render import Renderer
from wspo_lightning.tiny import build_tokenizer, preference_records, write_jsonl


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, str]:
    """Saved tiny tokenizers: 'chat' (ChatML, eos <|im_end|>), 'plain' (no template), 'nopad'."""
    root = tmp_path_factory.mktemp("tokenizers")
    build_tokenizer().save_pretrained(root / "chat")
    build_tokenizer(chat_template=False).save_pretrained(root / "plain")
    nopad = build_tokenizer(chat_template=False)
    nopad.pad_token = None
    nopad.save_pretrained(root / "nopad")
    return {name: str(root / name) for name in ("chat", "plain", "nopad")}


def make_dm(path, tokenizer, **kwargs) -> PreferenceDataModule:
    dm = PreferenceDataModule(str(path), tokenizer, **{"batch_size": 4, **kwargs})
    dm.setup("fit")
    return dm


def varied_records(n: int, seed: int = 0) -> list[dict]:
    """Records whose lengths vary a lot, so padding depends on how batches are formed."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 30, (n, 2), generator=gen).tolist()
    return [
        {"id": f"v{i}", "prompt": "The plot " * a, "chosen": "was wonderful " * b, "rejected": "was dull"}
        for i, (a, b) in enumerate(lengths)
    ]


# ----------------------------------------------------------------------------- formats


def _write_json(path, records):
    path.write_text(json.dumps(records))


def _write_json_data(path, records):
    path.write_text(json.dumps({"data": records}))


def _write_parquet(path, records):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path)


def _write_dataset(path, records):
    import datasets

    datasets.Dataset.from_list(records).save_to_disk(str(path))


def _write_dataset_dict(path, records):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(records)}).save_to_disk(str(path))


WRITERS = {
    "jsonl": ("d.jsonl", write_jsonl),
    "json-list": ("d.json", _write_json),
    "json-data": ("d.json", _write_json_data),
    "parquet": ("d.parquet", _write_parquet),
    "save_to_disk": ("d_ds", _write_dataset),
    "save_to_disk-dict": ("d_dsdict", _write_dataset_dict),
}


def _core(records):
    return [{k: r[k] for k in ("id", "prompt", "chosen", "rejected")} for r in records]


@pytest.mark.parametrize("kind", list(WRITERS))
def test_every_file_type_yields_the_same_normalised_records(tmp_path, kind):
    raw = preference_records(5)
    name, write = WRITERS[kind]
    write(tmp_path / name, raw)
    records = load_records(tmp_path / name, split="train")
    assert _core(records) == [{**r, "rejected": r["rejected"]} for r in raw]
    assert all(isinstance(r["source"], str) and name in r["source"] for r in records)


def test_default_ids_name_the_file_and_line_and_are_unique(tmp_path):
    raw = [{k: v for k, v in r.items() if k != "id"} for r in preference_records(3)]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in raw[:2]) + "\n\n" + json.dumps(raw[2]) + "\n")
    assert [r["id"] for r in load_records(path)] == ["train.jsonl:1", "train.jsonl:2", "train.jsonl:4"]


def test_record_formats_normalise_alike(tmp_path):
    user = [{"role": "user", "content": "Write one line."}]
    chosen, rejected = {"role": "assistant", "content": "Lovely."}, {"role": "assistant", "content": "Dull."}
    pair = {"prompt": user, "chosen": "Lovely.", "rejected": "Dull."}
    single = {"prompt": user, "chosen": "Lovely.", "rejected": None}
    cases = [
        ({"prompt": user, "chosen": [chosen], "rejected": [rejected]}, pair),
        ({"chosen": user + [chosen], "rejected": user + [rejected]}, pair),
        # UltraFeedback: a string prompt beside full conversations
        ({"prompt": "Write one line.", "chosen": user + [chosen], "rejected": user + [rejected]}, pair),
        ({"messages": user + [chosen]}, single),
        ({"prompt": user, "completion": [chosen]}, single),
        (
            {"prompt": "Write one line.", "chosen": "Lovely.", "rejected": "Dull."},
            {**pair, "prompt": "Write one line."},
        ),
        ({"prompt": "Write one line.", "response": "Lovely."}, {**single, "prompt": "Write one line."}),
        ({"prompt": "Write one line.", "completion": "Lovely."}, {**single, "prompt": "Write one line."}),
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", [dict(raw, id=i) for i, (raw, _) in enumerate(cases)])
    for record, (_, expected) in zip(load_records(path), cases):
        assert {k: record[k] for k in expected} == expected


# ----------------------------------------------------------------------------- masks and padding


def test_labels_mask_exactly_the_prompt_and_padding(tmp_path, tokenizers):
    dm = make_dm(write_jsonl(tmp_path / "t.jsonl", varied_records(8)), tokenizers["chat"], val_fraction=0)
    tok = dm.tokenizer
    batch = next(iter(dm.train_dataloader()))
    for side in ("chosen", "rejected"):
        ids, mask, labels = (batch[f"{side}_{k}"] for k in ("input_ids", "attention_mask", "labels"))
        for row, index in enumerate(batch["index"].tolist()):
            record = dm.train_records[index]
            response = labels[row][labels[row] != IGNORE_INDEX].tolist()
            assert tok.decode(response) == record[side] + tok.eos_token
            n = int(mask[row].sum())
            assert mask[row, :n].all() and not mask[row, n:].any()  # right padding
            assert (ids[row, n:] == tok.pad_token_id).all()
            assert tok.decode(ids[row, : n - len(response)].tolist()) == dm.renderer.prompt_text(record["prompt"])
            assert (labels[row, n - len(response) : n] == ids[row, n - len(response) : n]).all()


def test_chosen_and_rejected_share_the_padded_length_of_the_batch():
    features = [
        {"index": 0, "id": "a", "prompt_ids": [5, 6], "chosen_ids": [7], "rejected_ids": [8, 9, 10, 11]},
        {"index": 1, "id": "b", "prompt_ids": [5], "chosen_ids": [7, 7], "rejected_ids": [8]},
    ]
    batch = collate(features, pad_token_id=0)
    assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape == (2, 6)  # longest: 2 + 4
    assert batch["chosen_labels"].tolist() == [[-100, -100, 7, -100, -100, -100], [-100, 7, 7, -100, -100, -100]]
    assert batch["ids"] == ["a", "b"] and batch["index"].tolist() == [0, 1]
    features[1]["rejected_ids"] = None  # one record without rejected: the batch has none
    batch = collate(features, pad_token_id=0)
    assert "rejected_input_ids" not in batch and batch["chosen_input_ids"].shape == (2, 3)


# ----------------------------------------------------------------------------- truncation


def test_truncation_cuts_the_prompt_from_the_left_first_then_the_response(tmp_path, tokenizers, caplog):
    renderer = Renderer(build_tokenizer())
    record = {"id": "r", "source": "x:1", "prompt": "The plot " * 10, "chosen": "was dull.", "rejected": None}
    full = tokenize_record(record, renderer, 10_000)
    n_response = len(full["chosen_ids"])
    cut = tokenize_record(record, renderer, n_response + 3)
    assert cut["truncated"] and cut["prompt_ids"] == full["prompt_ids"][-3:] and cut["chosen_ids"] == full["chosen_ids"]
    tight = tokenize_record(record, renderer, 3)  # one prompt token kept, the response cut from the right
    assert tight["prompt_ids"] == full["prompt_ids"][-1:] and tight["chosen_ids"] == full["chosen_ids"][:2]

    records = varied_records(10)
    with caplog.at_level(logging.WARNING, logger="wspo_lightning.data"):
        dm = make_dm(write_jsonl(tmp_path / "t.jsonl", records), tokenizers["chat"], val_fraction=0, max_length=40)
    n_long = sum(len(f["prompt_ids"]) + len(f["chosen_ids"]) >= 40 for f in dm.features["train"])
    stats = dm.truncation_stats
    assert 0 < stats["truncated"] == stats["train"] <= n_long and stats["total"] == 10
    assert f"truncated {stats['truncated']} of 10 records to max_length=40" in caplog.text


# ----------------------------------------------------------------------------- templates and tokenizers


def test_chat_template_and_plain_template_render_prompts(tmp_path, tokenizers, caplog):
    path = write_jsonl(tmp_path / "t.jsonl", preference_records(8))
    first = preference_records(8)[0]["prompt"]
    chat = make_dm(path, tokenizers["chat"], val_fraction=0)
    assert chat.prompts("train", n=1) == [first]
    rendered = chat.renderer.prompt_text(first)
    assert rendered == f"<|im_start|>user\n{first}<|im_end|>\n<|im_start|>assistant\n"
    assert chat.renderer.prompt_text([{"role": "user", "content": first}]) == rendered
    with caplog.at_level(logging.INFO, logger="wspo_lightning.data"):
        plain = make_dm(path, tokenizers["plain"], val_fraction=0, prompt_template="Q: {prompt}\nA:")
        forced = make_dm(path, tokenizers["chat"], val_fraction=0, use_chat_template=False)
    assert plain.renderer.prompt_text(first) == f"Q: {first}\nA:"
    assert forced.renderer.prompt_text(first) == first
    assert "the tokenizer has no chat template" in caplog.text and "use_chat_template is off" in caplog.text


def test_tokenizer_without_pad_token_pads_with_eos_and_still_learns_eos(tmp_path, tokenizers, caplog):
    with caplog.at_level(logging.WARNING, logger="wspo_lightning.data"):
        dm = make_dm(write_jsonl(tmp_path / "t.jsonl", varied_records(8)), tokenizers["nopad"], val_fraction=0)
    tok = dm.tokenizer
    assert tok.pad_token_id == tok.eos_token_id and caplog.text.count("no pad token") == 1
    batch = next(iter(dm.train_dataloader()))
    ends = batch["chosen_attention_mask"].sum(1) - 1
    assert (batch["chosen_labels"][torch.arange(4), ends] == tok.eos_token_id).all()


# ----------------------------------------------------------------------------- split and order


def test_train_val_split_is_deterministic_and_disjoint(tmp_path, tokenizers):
    path = write_jsonl(tmp_path / "t.jsonl", preference_records(40))
    a, b, c = (make_dm(path, tokenizers["chat"], val_fraction=0.25, seed=s) for s in (0, 0, 1))
    ids = lambda records: [r["id"] for r in records]  # noqa: E731
    assert ids(a.val_records) == ids(b.val_records) and ids(a.val_records) != ids(c.val_records)
    assert len(a.val_records) == 10 and not set(ids(a.train_records)) & set(ids(a.val_records))
    assert sorted(ids(a.train_records) + ids(a.val_records)) == sorted(r["id"] for r in preference_records(40))
    assert [r["id"] for r in load_records(path) if r["id"] in set(ids(a.val_records))] == ids(a.val_records)
    val = [i for batch in a.val_dataloader() for i in batch["index"].tolist()]
    assert val == list(range(10))  # unshuffled, index = position in the split


def test_val_path_replaces_the_split_and_no_validation_gives_an_empty_loader(tmp_path, tokenizers):
    train = write_jsonl(tmp_path / "train.jsonl", preference_records(8))
    val = write_jsonl(tmp_path / "val.jsonl", preference_records(5, seed=1))
    dm = make_dm(train, tokenizers["chat"], val_path=str(val), eval_batch_size=2)
    assert len(dm.train_records) == 8 and [len(b["ids"]) for b in dm.val_dataloader()] == [2, 2, 1]
    assert make_dm(train, tokenizers["chat"], val_fraction=0).val_dataloader() == []


def test_test_loader_reads_test_path_or_else_the_validation_data(tmp_path, tokenizers):
    train = write_jsonl(tmp_path / "train.jsonl", preference_records(8))
    test = write_jsonl(tmp_path / "test.jsonl", preference_records(3, seed=2))
    dm = make_dm(train, tokenizers["chat"], val_fraction=0.25, test_path=str(test), eval_batch_size=2)
    assert [b["ids"] for b in dm.test_dataloader()] == [["toy-2-0", "toy-2-1"], ["toy-2-2"]]
    assert dm.prompts("test", 1) == [preference_records(1, seed=2)[0]["prompt"]]
    fallback = make_dm(train, tokenizers["chat"], val_fraction=0.25)
    assert [i for b in fallback.test_dataloader() for i in b["ids"]] == [r["id"] for r in fallback.val_records]


def test_saved_dataset_dict_gives_train_and_validation_splits(tmp_path, tokenizers):
    import datasets

    splits = {"train": preference_records(8), "test": preference_records(3, seed=1)}
    saved = datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()})
    saved.save_to_disk(str(tmp_path / "ds"))
    dm = make_dm(tmp_path / "ds", tokenizers["chat"], val_path=str(tmp_path / "ds"))
    assert _core(dm.train_records) == splits["train"] and _core(dm.val_records) == splits["test"]
    assert dm.val_records[0]["source"] == f"{tmp_path / 'ds'}[test]:record 0"


@pytest.mark.filterwarnings("ignore:Total length of `list` across ranks is zero")  # Lightning on an empty val loader
@pytest.mark.parametrize("val_fraction", [0.0, 0.25], ids=["no-validation", "validation"])
def test_lightning_trainer_runs_on_the_batches(tmp_path, tokenizers, val_fraction):
    import lightning.pytorch as pl

    class Probe(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.embedding, self.seen = torch.nn.Embedding(512, 1), {"train": 0, "val": 0}

        def training_step(self, batch, batch_idx):
            self.seen["train"] += len(batch["ids"])
            return self.embedding(batch["chosen_input_ids"]).mean()

        def validation_step(self, batch, batch_idx):
            self.seen["val"] += len(batch["ids"])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = PreferenceDataModule(
        str(write_jsonl(tmp_path / "t.jsonl", preference_records(16))),
        tokenizers["chat"],
        val_fraction=val_fraction,
        batch_size=4,
    )
    probe = Probe()
    pl.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    ).fit(probe, datamodule=dm)
    assert probe.seen == {"train": 16 - len(dm.val_records), "val": len(dm.val_records)}


def _epoch(dm, epoch=0):
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return [i for batch in loader for i in batch["index"].tolist()]


def test_training_order_is_deterministic_under_seed_and_changes_each_epoch(tmp_path, tokenizers):
    path = write_jsonl(tmp_path / "t.jsonl", preference_records(24))
    a, b, c = (make_dm(path, tokenizers["chat"], val_fraction=0, seed=s) for s in (3, 3, 4))
    assert _epoch(a) == _epoch(b) and sorted(_epoch(a)) == list(range(24))
    assert _epoch(a) != _epoch(c) and _epoch(a, 1) != _epoch(a, 0) and _epoch(a, 1) == _epoch(b, 1)


def test_group_by_length_reduces_padding(tmp_path, tokenizers):
    path = write_jsonl(tmp_path / "t.jsonl", varied_records(160))

    def padding(dm):
        return sum(int((1 - b["chosen_attention_mask"]).sum()) for b in dm.train_dataloader())

    plain, grouped = (make_dm(path, tokenizers["chat"], val_fraction=0, group_by_length=g) for g in (False, True))
    assert padding(grouped) < padding(plain) / 3
    assert sorted(_epoch(grouped)) == list(range(160)) and _epoch(grouped) == _epoch(grouped)


def test_sampler_ranks_deal_out_one_grouped_order():
    """Two ranks together hold the single-process order of the epoch (padded to an even count by
    repeating its start), and each rank's stream is still longest-first within every group."""
    lengths = [int(x) for x in torch.randint(1, 500, (101,), generator=torch.Generator().manual_seed(0))]

    def order(epoch: int, **ranks: int) -> list[int]:
        sampler = SeededSampler(lengths, seed=7, group_size=20, **ranks)
        sampler.set_epoch(epoch)
        assert len(sampler) == len(list(sampler))
        return list(sampler)

    single = order(1)
    streams = [order(1, num_replicas=2, rank=r) for r in (0, 1)]
    assert [len(s) for s in streams] == [51, 51] and order(0) != single
    assert [i for pair in zip(*streams) for i in pair] == single + single[:1]
    for rank, stream in enumerate(streams):
        for g in range(0, 100, 20):  # rank r holds positions r, r + 2, ... of each group of 20
            group = [lengths[i] for i in stream[g // 2 : (g + 20) // 2]]
            assert group == sorted(group, reverse=True), (rank, g)


def test_lightning_keeps_the_grouped_sampler_under_ddp(tmp_path, tokenizers):
    """Lightning wraps a plain sampler in a shuffling DistributedSampler for DDP, which would undo the
    grouping: the data module hands it a rank-aware SeededSampler instead, and Lightning keeps it."""
    from lightning.pytorch.trainer.states import RunningStage

    path = write_jsonl(tmp_path / "t.jsonl", varied_records(40))
    dm = make_dm(path, tokenizers["chat"], val_fraction=0, group_by_length=True)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)  # never launched
    dm.trainer = trainer
    prepared = trainer._data_connector._prepare_dataloader(
        dm.train_dataloader(), shuffle=True, mode=RunningStage.TRAINING
    )
    sampler = prepared.sampler
    assert type(sampler) is SeededSampler and (sampler.num_replicas, sampler.rank) == (2, 0)
    assert len(prepared) == 40 // 2 // dm.batch_size + (40 // 2 % dm.batch_size > 0)


# ----------------------------------------------------------------------------- bad inputs


def _lines(*lines):
    return lambda path: path.write_text("".join(line + "\n" for line in lines))


def _records(*records):
    return lambda path: write_jsonl(path, list(records))


OK = {"prompt": "p", "chosen": "c", "rejected": "r"}
USER, BOT = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}
# (file name, writer or None for no file, DataModule kwargs or None for load_records only, fragments)
BAD_INPUTS = {
    "missing-file": ("train.jsonl", None, None, ["train.jsonl", "not found"]),
    "empty-file": ("train.jsonl", _lines(), None, ["train.jsonl", "empty"]),
    "blank-lines-only": ("train.jsonl", _lines("", "  "), None, ["train.jsonl", "no records"]),
    "invalid-json-line": (
        "train.jsonl",
        _lines(json.dumps(OK), '{"prompt": "p",'),
        None,
        ["train.jsonl:2:", "invalid JSON at column"],
    ),
    "not-an-object": ("train.jsonl", _lines("[1, 2]"), None, ["train.jsonl:1:", "expected a record", "list"]),
    "unknown-format": (
        "train.jsonl",
        _records({"question": "q", "answer": "a"}),
        None,
        ["train.jsonl:1:", "unknown record format", "['answer', 'question']", "{messages: [...]}"],
    ),
    "missing-prompt": (
        "train.jsonl",
        _records({"chosen": "c", "rejected": "r"}),
        None,
        ["train.jsonl:1:", "field 'prompt'", "missing"],
    ),
    "missing-rejected": (
        "train.jsonl",
        _records(OK, {"prompt": "p", "chosen": "c"}),
        None,
        ["train.jsonl:2:", "field 'rejected'", "missing"],
    ),
    "wrong-type": (
        "train.jsonl",
        _records({**OK, "chosen": 42}),
        None,
        ["train.jsonl:1: field 'chosen': expected a non-empty string, got int (42). Fix or remove"],
    ),
    "empty-prompt": (
        "train.jsonl",
        _records({**OK, "prompt": ""}),
        None,
        ["train.jsonl:1:", "field 'prompt'", "empty"],
    ),
    "empty-response": (
        "train.jsonl",
        _records({"prompt": "p", "response": "  "}),
        None,
        ["train.jsonl:1:", "field 'response'", "empty"],
    ),
    "messages-too-short": (
        "train.jsonl",
        _records({"messages": [BOT]}),
        None,
        ["train.jsonl:1:", "field 'messages'", "at least 2"],
    ),
    "messages-last-not-assistant": (
        "train.jsonl",
        _records({"messages": [BOT, USER]}),
        None,
        ["train.jsonl:1:", "field 'messages[1].role'", "'assistant'"],
    ),
    "message-content-wrong-type": (
        "train.jsonl",
        _records({"messages": [{"role": "user", "content": 3}, BOT]}),
        None,
        ["train.jsonl:1:", "field 'messages[0].content'", "int (3)"],
    ),
    "conversations-differ-before-response": (
        "train.jsonl",
        _records({"chosen": [USER, BOT], "rejected": [{"role": "user", "content": "yo"}, BOT]}),
        None,
        ["train.jsonl:1:", "field 'rejected'", "share the prompt"],
    ),
    "conversation-without-prompt": (
        "train.jsonl",
        _records({"chosen": [BOT], "rejected": [BOT]}),
        None,
        ["train.jsonl:1:", "field 'chosen'", "at least 2 messages"],
    ),
    "chosen-list-rejected-string": (
        "train.jsonl",
        _records({"prompt": [USER], "chosen": [BOT], "rejected": "r"}),
        None,
        ["train.jsonl:1:", "field 'rejected'", "list of at least 1 messages", "str"],
    ),
    "bad-id-type": ("train.jsonl", _records({**OK, "id": [1]}), None, ["train.jsonl:1:", "field 'id'", "list"]),
    "duplicate-id": (
        "train.jsonl",
        _records({**OK, "id": 7}, {**OK, "id": "7"}),
        None,
        ["train.jsonl:2:", "field 'id'", "duplicate id '7'", "train.jsonl:1"],
    ),
    "json-record-index": (
        "train.json",
        lambda p: _write_json(p, [OK, {**OK, "rejected": 1.5}]),
        None,
        ["train.json:record 1:", "field 'rejected'", "float (1.5)"],
    ),
    "json-syntax": ("train.json", lambda p: p.write_text('[\n{"prompt": }]'), None, ["train.json:2:", "invalid JSON"]),
    "json-not-a-list": (
        "train.json",
        lambda p: p.write_text('{"rows": []}'),
        None,
        ["train.json", "expected a list of records"],
    ),
    "parquet-record-index": (
        "train.parquet",
        lambda p: _write_parquet(p, [OK, {**OK, "prompt": " "}]),
        None,
        ["train.parquet:record 1:", "field 'prompt'", "empty"],
    ),
    "dataset-dict-without-split": (
        "ds",
        lambda p: (
            __import__("datasets")
            .DatasetDict({"extra": __import__("datasets").Dataset.from_list([OK])})
            .save_to_disk(str(p))
        ),
        {},
        ["ds", "splits ['extra']", "'train'"],
    ),
    "unsupported-extension": (
        "train.csv",
        _lines("prompt,chosen"),
        None,
        ["train.csv", "unsupported file type '.csv'"],
    ),
    "train-smaller-than-a-batch": (
        "train.jsonl",
        _records(*[{**OK, "id": i} for i in range(5)]),
        {"batch_size": 8},
        ["train.jsonl", "holds 4 records", "batch_size=8", "val_fraction"],
    ),
    "response-empty-after-truncation": (
        "train.jsonl",
        _records(*[{**OK, "id": i} for i in range(4)]),
        {"max_length": 1, "val_fraction": 0},
        ["train.jsonl:1:", "field 'chosen'", "empty after truncation to max_length=1"],
    ),
    "val-id-also-in-train": (
        "train.jsonl",
        _records(*[{**OK, "id": i} for i in range(4)]),
        {"val_path": "val.jsonl"},
        ["val.jsonl:1:", "field 'id'", "also in the training data"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_names_file_line_and_field(tmp_path, tokenizers, case):
    name, write, dm_kwargs, fragments = BAD_INPUTS[case]
    path = tmp_path / name
    if write is not None:
        write(path)
    write_jsonl(tmp_path / "val.jsonl", [{**OK, "id": 2}])
    with pytest.raises(InputError) as err:
        if dm_kwargs is None:
            load_records(path)
        else:
            kwargs = dict(dm_kwargs)
            if "val_path" in kwargs:
                kwargs["val_path"] = str(tmp_path / kwargs["val_path"])
            make_dm(path, tokenizers["chat"], **kwargs)
    message = str(err.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert str(tmp_path) in message  # the full path, so the user finds the file


@pytest.mark.parametrize(
    "kwargs",
    [{"val_fraction": 1.0}, {"batch_size": 0}, {"prompt_template": "Q: {question}"}],
    ids=["val-fraction", "batch-size", "template-field"],
)
def test_bad_arguments_fail_before_reading(kwargs):
    with pytest.raises(InputError, match=next(iter(kwargs))):
        PreferenceDataModule("missing.jsonl", "missing-tokenizer", **kwargs)
