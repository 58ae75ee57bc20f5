"""Test-time weak-to-strong decoding: the one generate path (`generation.py`) and its sampling arguments
(`args.py`), plain and proxy / EFT sampling, chunk-level beam search (CBS), and best-of-N by the weak log-ratio;
`methods.py` registers them for `wspo generate --method`."""

from wspo_lightning.decoding.args import SamplingArgs
from wspo_lightning.decoding.cbs import CBSResult, ChunkRecord, chunk_beam_search
from wspo_lightning.decoding.generation import Response, generate_responses
from wspo_lightning.decoding.methods import METHODS, DecodingMethod, resolve_method
from wspo_lightning.decoding.proxy import proxy_logits, proxy_sample, sample
from wspo_lightning.decoding.runner import Decoder, Generation
from wspo_lightning.decoding.sampling import row_seed
from wspo_lightning.decoding.scorer import WeakPairScorer, WeakPairState

__all__ = [
    "METHODS",
    "CBSResult",
    "ChunkRecord",
    "Decoder",
    "DecodingMethod",
    "Generation",
    "Response",
    "SamplingArgs",
    "WeakPairScorer",
    "WeakPairState",
    "chunk_beam_search",
    "generate_responses",
    "proxy_logits",
    "proxy_sample",
    "resolve_method",
    "row_seed",
    "sample",
]
