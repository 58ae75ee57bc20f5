"""Callbacks: gamma schedules, reward-margin logging, sample tables and Hugging Face export."""

from wspo_lightning.callbacks.export import HFExport
from wspo_lightning.callbacks.faults import AtomicCheckpointIO, NonFiniteGuard
from wspo_lightning.callbacks.gamma import GammaSchedule
from wspo_lightning.callbacks.logging import RewardMarginLogger, SampleTable

__all__ = ["AtomicCheckpointIO", "GammaSchedule", "HFExport", "NonFiniteGuard", "RewardMarginLogger", "SampleTable"]
