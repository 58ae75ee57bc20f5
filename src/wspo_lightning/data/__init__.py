"""Preference data: records and their validation (`records`), rendering to token ids and batching
(`tokenize`), the resumable training order (`loading`) and the `PreferenceDataModule` (`module`)."""

from wspo_lightning.data.loading import LoaderPosition, ResumableDataLoader, SeededSampler
from wspo_lightning.data.module import PreferenceDataModule
from wspo_lightning.data.records import ACCEPTED_FORMATS, load_records, normalise_record, split_records
from wspo_lightning.data.tokenize import collate, tokenize_record, tokenize_records

__all__ = [
    "ACCEPTED_FORMATS",
    "LoaderPosition",
    "PreferenceDataModule",
    "ResumableDataLoader",
    "SeededSampler",
    "collate",
    "load_records",
    "normalise_record",
    "split_records",
    "tokenize_record",
    "tokenize_records",
]
