"""`PreferenceDataModule`: records -> rendered, tokenized, truncated features -> batches whose training
order resumes exactly mid-epoch."""

from __future__ import annotations

import logging
from functools import partial
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader, Sampler

from wspo_lightning.crossvocab import add_weak_features
from wspo_lightning.data.loading import LoaderPosition, ResumableDataLoader, SeededSampler
from wspo_lightning.data.records import held_out, load_records, split_records
from wspo_lightning.data.tokenize import collate, tokenize_records
from wspo_lightning.errors import InputError, located
from wspo_lightning.models import load_tokenizer
from wspo_lightning.render import Renderer

log = logging.getLogger(__name__)
_info = rank_zero_only(log.info)
_warn = rank_zero_only(log.warning)


class PreferenceDataModule(pl.LightningDataModule):
    """Preference or prompt/response data for WSPO, DPO and SFT, as padded token batches.

    Everything happens in `setup()`: read and validate records (errors name file, line, field),
    load the tokenizer, render and tokenize (`wspo_lightning.render.Renderer`: the chat template's own
    tokens, end-of-turn included), truncate. Batches are dicts (see `collate`).
    After setup: `tokenizer`, `renderer`, `train_records` / `val_records` / `test_records` (records of
    `load_records`), `features` (split -> tokenized records: `id`, `prompt_ids`, `chosen_ids`,
    `rejected_ids`: exactly what is trained on), `truncation_stats` and `prompts()`. A weak pair with its
    own tokenizer adds `weak_renderer` and the features' weak side (`use_weak_tokenizer`).
    The training loader's position is part of the checkpoint (`state_dict`), so `--ckpt_path`
    resumes mid-epoch with the very next batch.

    Args:
        train_path: training data: .jsonl, .json, .parquet, a save_to_disk folder, a folder in the Hub's
            layout (data/{split}-00000-of-00001.parquet) or a Hugging Face Hub dataset id. A path that
            exists locally is local; anything else is a Hub id (offline: an error saying what to download).
        tokenizer: tokenizer directory or hub id, loaded with AutoTokenizer.
        val_path: validation data, same formats; None: val_split of train_path when val_split is set,
            else val_fraction.
        val_fraction: share of training records held out for validation without val_path or val_split; 0: none.
        test_path: data for `wspo test`, same formats; None: test_split of train_path when test_split is set,
            else the validation data.
        train_split: split of train_path to train on (e.g. 'train_prefs' for UltraFeedback-binarized).
        val_split: split of the validation data; None: 'validation', else 'test'.
        test_split: split of the test data; None: 'test'.
        dataset_config: subset of a dataset with several (`name=` of `datasets.load_dataset`).
        dataset_revision: branch, tag or commit of a Hub dataset.
        max_length: most tokens of prompt plus response; a longer record's prompt is cut first, inside
            the user's content (the template's header and system turn kept), then responses from the right.
        max_prompt_length: most prompt tokens (None: only max_length limits them), cut the same way.
        prompt_truncation: "keep_header" cuts a long prompt inside the user's content; "left" cuts its first
            tokens, header and system turn included, as earlier versions did (to resume their runs exactly).
        batch_size: training records per batch (per device).
        eval_batch_size: validation and test records per batch; None uses `batch_size`.
        num_workers: DataLoader worker processes.
        use_chat_template: render with the tokenizer's chat template when it has one.
        prompt_template: plain template with a `{prompt}` field, used without a chat template.
        seed: seed of the train/val split and of the training order (reproducible on resume).
        trust_remote_code: let the tokenizer run code from its repository.
        group_by_length: batch records of similar length (sorted within groups of 50 batches).
        packing: run every forward on packed rows: a batch's records concatenated, position ids restarting in
            each, attention kept inside each record (`logprobs.packed_response_logps`). Batches and results
            are those of the padded path; the models skip the padding.
    """

    def __init__(
        self,
        train_path: str,
        tokenizer: str,
        val_path: str | None = None,
        val_fraction: float = 0.1,
        test_path: str | None = None,
        max_length: int = 512,
        max_prompt_length: int | None = None,
        prompt_truncation: Literal["keep_header", "left"] = "keep_header",
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        use_chat_template: bool = True,
        prompt_template: str = "{prompt}",
        seed: int = 0,
        trust_remote_code: bool = False,
        group_by_length: bool = False,
        train_split: str = "train",
        val_split: str | None = None,
        test_split: str | None = None,
        dataset_config: str | None = None,
        dataset_revision: str | None = None,
        packing: bool = False,
    ) -> None:
        super().__init__()
        if not 0 <= val_fraction < 1:
            raise InputError(f"data.val_fraction={val_fraction}: expected a number in [0, 1).")
        for name, value in (
            ("max_length", max_length),
            ("max_prompt_length", max_prompt_length or 1),
            ("batch_size", batch_size),
            ("eval_batch_size", eval_batch_size or 1),
        ):
            if value < 1:
                raise InputError(f"data.{name}={value}: expected a positive integer.")
        if prompt_truncation not in ("keep_header", "left"):
            raise InputError(f"data.prompt_truncation={prompt_truncation!r}: expected keep_header or left.")
        if "{prompt}" not in prompt_template:
            raise InputError(
                f"data.prompt_template={prompt_template!r}: expected a '{{prompt}}' field for the prompt text."
            )
        self.train_path, self.tokenizer_path, self.val_path, self.test_path = train_path, tokenizer, val_path, test_path
        self.val_fraction, self.max_length, self.seed = val_fraction, max_length, seed
        self.max_prompt_length, self.keep_header = max_prompt_length, prompt_truncation == "keep_header"
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size or batch_size, num_workers
        self.use_chat_template, self.prompt_template = use_chat_template, prompt_template
        self.trust_remote_code, self.group_by_length = trust_remote_code, group_by_length
        self.packing = packing  # read by the objectives and `wspo precompute`, which mark their models
        # split names within the data (not the "train" / "val" / "test" roles of `features`)
        self.dataset_splits = {"train": train_split, "val": val_split, "test": test_split}
        self.dataset_config, self.dataset_revision = dataset_config, dataset_revision
        # the settings, for loggers' run configs (W&B) and `hparams.yaml`
        self.save_hyperparameters()
        self.tokenizer: Any = None
        self.renderer: Renderer | None = None
        self.weak_renderer: Renderer | None = None  # a weak pair with its own tokenizer (use_weak_tokenizer)
        self.train_records: list[dict] | None = None
        self.val_records: list[dict] | None = None
        self.test_records: list[dict] | None = None
        self.truncation_stats: dict = {}
        self.features: dict[str, list[dict]] = {}
        self.train_position = LoaderPosition()  # shared with every training loader (see LoaderPosition)

    def setup(self, stage: str | None = None) -> None:
        if self.train_records is not None:  # once per process, whatever the stage
            return
        splits = self.dataset_splits
        train = self._load(self.train_path, splits["train"])
        if self.val_path or splits["val"]:
            val = self._load(self.val_path or self.train_path, splits["val"] or ["validation", "test"])
            val = held_out(val, train, "validation")
        else:
            train, val = split_records(train, self.val_fraction, self.seed)
            if not val:
                _info("no validation data (val_path unset, val_fraction=0): validation is skipped")
        test = []
        if self.test_path or splits["test"]:
            test = held_out(self._load(self.test_path or self.train_path, splits["test"] or "test"), train, "test")
        if len(train) < self.batch_size:
            raise located(
                self.train_path,
                None,
                None,
                f"the train split holds {len(train)} records, fewer than "
                f"one batch (batch_size={self.batch_size}). Add records or lower batch_size"
                + ("." if self.val_path or splits["val"] else " or val_fraction."),
            )
        tokenizer = load_tokenizer(self.tokenizer_path, self.trust_remote_code)
        renderer = Renderer(tokenizer, self.use_chat_template, self.prompt_template, name=self.tokenizer_path)
        if not renderer.chat and self.use_chat_template:
            _warn(
                "the tokenizer has no chat template (%s): prompts use the plain template %r instead "
                "(set data.prompt_template; use_chat_template: false silences this)",
                self.tokenizer_path,
                self.prompt_template,
            )
        elif not renderer.chat:
            _info("prompts use the plain template %r (use_chat_template is off)", self.prompt_template)
        splits = {"train": train, "val": val, "test": test}
        self.features = {
            split: tokenize_records(records, renderer, self.max_length, self.max_prompt_length, self.keep_header)
            for split, records in splits.items()
        }
        stats = {split: sum(f["truncated"] for f in feats) for split, feats in self.features.items()}
        stats.update(truncated=sum(stats.values()), total=sum(map(len, splits.values())), max_length=self.max_length)
        if stats["truncated"]:
            _warn("truncated %d of %d records to max_length=%d", stats["truncated"], stats["total"], self.max_length)
        self.truncation_stats = stats
        self.tokenizer, self.renderer = tokenizer, renderer
        self.train_records, self.val_records, self.test_records = train, val, test

    def use_weak_tokenizer(self, tokenizer: Any, name: str) -> None:
        """Render every split a second time for a weak pair with its own tokenizer: its prompt and response
        tokens of the same text, with the map of its response tokens onto the policy's
        (`crossvocab.add_weak_features`, docs/cross-tokenizer.md). Batches then carry the `weak_` rows.
        Needs `setup()` first; a second call with the same rendering does nothing."""
        if self.train_records is None:
            raise RuntimeError("PreferenceDataModule.use_weak_tokenizer() needs setup() first")
        renderer = Renderer(tokenizer, self.use_chat_template, self.prompt_template, name=name)
        if self.weak_renderer is not None and self.weak_renderer.fingerprint == renderer.fingerprint:
            return
        splits = {"train": self.train_records, "val": self.val_records, "test": self.test_records}
        for split, records in splits.items():
            add_weak_features(records, self.features[split], self.renderer, renderer, self.max_length)
        self.weak_renderer = renderer
        _info("the weak pair renders with its own tokenizer (%s), its log-ratios mapped onto the policy's tokens", name)

    def pad_ids(self) -> dict[str, int | None]:
        """`collate`'s padding ids: the policy's, and the weak pair's when it has its own tokenizer."""
        weak = None
        if self.weak_renderer is not None:  # padding is masked: any id of the weak vocabulary does
            weak = self.weak_renderer.pad_id
        return {"pad_token_id": self.tokenizer.pad_token_id, "weak_pad_token_id": weak}

    def batch_of(
        self, prompts: list, responses: list[str], response_ids: list[list[int]], finished: list[bool]
    ) -> dict:
        """A batch of new (prompt, response) pairs (generated by the policy: `response_ids` as drawn, `responses`
        their text), rendered as training renders records, the weak side included (see `collate`)."""
        records = [
            {
                "id": f"new-{i}",
                "source": "generated response",
                "prompt": prompt,
                "chosen": text,
                "rejected": None,
                "chosen_ids": ids,
                "chosen_finished": done,
                "tokenizer_fingerprint": self.renderer.fingerprint,
            }
            for i, (prompt, text, ids, done) in enumerate(zip(prompts, responses, response_ids, finished))
        ]
        features = tokenize_records(records, self.renderer, self.max_length, self.max_prompt_length, self.keep_header)
        if self.weak_renderer is not None:
            add_weak_features(records, features, self.renderer, self.weak_renderer, self.max_length)
        return collate(features, **self.pad_ids())

    def _load(self, path: str, split: str | list[str]) -> list[dict]:
        return load_records(path, split, self.dataset_config, self.dataset_revision)

    def train_dataloader(self) -> DataLoader:
        features = self.features["train"]
        lengths = [len(f["prompt_ids"]) + max(len(f["chosen_ids"]), len(f["rejected_ids"] or ())) for f in features]
        ranks = {}  # data-parallel ranks, from the strategy as Lightning's own samplers get them
        if self.trainer is not None and self.trainer.world_size > 1:
            ranks = {
                k: v
                for k, v in self.trainer.strategy.distributed_sampler_kwargs.items()
                if k in ("num_replicas", "rank")
            }
        sampler = SeededSampler(lengths, self.seed, 50 * self.batch_size if self.group_by_length else None, **ranks)
        return self._loader(features, self.batch_size, sampler, position=self.train_position)

    def val_dataloader(self) -> DataLoader | list:
        features = self.features["val"]
        # Lightning reads [] as "no validation" (and warns that its length is zero)
        return self._loader(features, self.eval_batch_size, None) if features else []

    @property
    def test_split(self) -> str:
        """The split `wspo test` reads: "test" with a test_path or test_split, else "val"."""
        return "test" if self.test_path or self.dataset_splits["test"] else "val"

    def test_dataloader(self) -> DataLoader | list:
        """The test data (`test_path`); without one, the validation data."""
        features = self.features[self.test_split]
        return self._loader(features, self.eval_batch_size, None) if features else []

    def _loader(
        self, features: list[dict], batch_size: int, sampler: Sampler | None, position: LoaderPosition | None = None
    ) -> DataLoader:
        kwargs = dict(
            batch_size=batch_size,
            sampler=sampler,
            shuffle=False,
            collate_fn=partial(collate, **self.pad_ids()),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )
        if position is None:
            return DataLoader(features, **kwargs)
        return ResumableDataLoader(features, position=position, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        position = self.train_position.state_dict()
        trainer = self.trainer
        if trainer is not None and trainer.training:
            # A checkpoint taken inside a step (SLURM's pre-emption signal) has handed out that step's batch
            # but not trained on it: resume with the batches the loop has processed, so none is skipped.
            position["batches"] = min(position["batches"], trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        return {"train_position": position}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "train_position" in state_dict:
            self.train_position.load_state_dict(state_dict["train_position"])

    def prompts(self, split: str = "val", n: int | None = None) -> list:
        """The raw prompts (text or messages) of `split` ('train', 'val' or 'test'), the first `n` (all with
        None); `renderer.prompt_ids` turns them into what the model sees."""
        records = {"train": self.train_records, "val": self.val_records, "test": self.test_records}[split]
        if records is None:
            raise RuntimeError("PreferenceDataModule.prompts() needs setup() first")
        return [r["prompt"] for r in records[:n]]
