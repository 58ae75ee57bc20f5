"""Test-time weak-to-strong decoding: plain and proxy / EFT sampling, chunk-level beam search (CBS), and best-of-N
by the weak log-ratio."""

from wspo_lightning.decoding.cbs import CBSResult, ChunkRecord, chunk_beam_search
from wspo_lightning.decoding.proxy import proxy_logits, proxy_sample, sample
from wspo_lightning.decoding.scorer import WeakPairScorer, WeakPairState

__all__ = [
    "CBSResult",
    "ChunkRecord",
    "WeakPairScorer",
    "WeakPairState",
    "chunk_beam_search",
    "proxy_logits",
    "proxy_sample",
    "sample",
]
