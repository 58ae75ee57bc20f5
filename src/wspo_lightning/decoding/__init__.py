"""Test-time weak-to-strong decoding: plain and proxy / EFT sampling, chunk-level beam search (CBS), and best-of-N
by the weak log-ratio; `methods.py` registers them for `wspo generate --method`."""

from wspo_lightning.decoding.cbs import CBSResult, ChunkRecord, chunk_beam_search
from wspo_lightning.decoding.methods import METHODS, DecodingMethod, resolve_method
from wspo_lightning.decoding.proxy import proxy_logits, proxy_sample, sample
from wspo_lightning.decoding.runner import Decoder, Generation
from wspo_lightning.decoding.scorer import WeakPairScorer, WeakPairState

__all__ = [
    "METHODS",
    "CBSResult",
    "ChunkRecord",
    "Decoder",
    "DecodingMethod",
    "Generation",
    "WeakPairScorer",
    "WeakPairState",
    "chunk_beam_search",
    "proxy_logits",
    "proxy_sample",
    "resolve_method",
    "sample",
]
