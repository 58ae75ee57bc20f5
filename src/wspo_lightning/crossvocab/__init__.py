"""Cross-tokenizer WSPO: a weak pair with its own tokenizer (docs/cross-tokenizer.md).

The weak pair scores its own rendering of each record's prompt and response text; each weak token's
log-ratio lands on the policy response token whose character span holds the weak token's last character,
so a response's mapped `delta_weak` sums to the weak pair's sequence log-ratio. `spans` finds where tokens
sit in the text, `align` places weak tokens on policy tokens, `features` builds the weak side of records
(tokenizers only), `batch` carries it through batches and maps the log-ratios.
"""

from wspo_lightning.crossvocab.align import place
from wspo_lightning.crossvocab.batch import has_weak_rows, pad_maps, to_policy_tokens, weak_rows
from wspo_lightning.crossvocab.features import add_weak_features
from wspo_lightning.crossvocab.spans import check_offsets, decoded_spans, rendered_spans

__all__ = [
    "add_weak_features",
    "check_offsets",
    "decoded_spans",
    "has_weak_rows",
    "pad_maps",
    "place",
    "rendered_spans",
    "to_policy_tokens",
    "weak_rows",
]
