"""Training order that resumes exactly: a seeded, rank-aware sampler and a loader that skips the batches
already trained on after a resume."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler


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

    def __init__(
        self, lengths: Sequence[int], seed: int, group_size: int | None = None, num_replicas: int = 1, rank: int = 0
    ) -> None:
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
            groups = [order[i : i + self.group_size] for i in range(0, len(order), self.group_size)]
            order = [i for group in groups for i in sorted(group, key=lambda i: -self.lengths[i])]
        order += (order * math.ceil(self.total_size / max(len(order), 1)))[: self.total_size - len(order)]
        return iter(order[self.rank : self.total_size : self.num_replicas])


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
