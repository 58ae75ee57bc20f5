"""The weak side in batches: its maps padded for collate, its rows for a step, and the weak pair's
per-token log-ratios added onto the policy's response tokens."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from wspo_lightning.logprobs import response_mask

NO_TOKEN = -1
"""Map value of padding: no weak token there."""


def has_weak_rows(batch: dict) -> bool:
    """Whether the batch carries the weak pair's own rendering (a weak pair with its own tokenizer)."""
    return "weak_chosen_input_ids" in batch


def pad_maps(features: Sequence[dict], sides: Sequence[str]) -> dict[str, Tensor]:
    """`weak_{side}_map` [batch, most weak response tokens] of each side, NO_TOKEN-padded to one width."""
    width = max(len(f[f"weak_{side}_map"]) for f in features for side in sides)
    out = {}
    for side in sides:
        maps = torch.full((len(features), width), NO_TOKEN, dtype=torch.long)
        for row, f in enumerate(features):
            maps[row, : len(f[f"weak_{side}_map"])] = torch.tensor(f[f"weak_{side}_map"], dtype=torch.long)
        out[f"weak_{side}_map"] = maps
    return out


def weak_rows(batch: dict, sides: Sequence[str]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(input_ids, attention_mask, labels, map) of the weak rows of `sides`, side after side as the policy's
    rows of a step are (collate pads both sides of each to one length)."""
    keys = ("input_ids", "attention_mask", "labels", "map")
    return tuple(torch.cat([batch[f"weak_{side}_{key}"] for side in sides]) for key in keys)


def to_policy_tokens(weak_values: Tensor, weak_labels: Tensor, weak_map: Tensor, policy_mask: Tensor) -> Tensor:
    """Weak per-token values added onto the policy response tokens they land on.

    Args:
        weak_values: [rows, Tw'] float, in the layout `response_logps` gives for the weak rows.
        weak_labels: [rows, Lw] the weak rows' labels (their response tokens are the values' tokens).
        weak_map: [rows, Nw] for each weak response token, in order, the index of its policy response token
            (NO_TOKEN on padding).
        policy_mask: [rows, T'] the policy's response mask, in the layout of `response_logps`.

    Returns:
        [rows, T'] float: each policy response token holds the sum of the weak values landed on it, 0
        elsewhere; each row sums to its weak values' sum.

    Row 0 is "low tide" of `align.place`'s example: four weak tokens (after a one-token weak prompt) land
    on the policy tokens [0, 1, 1, 2], so " tide" gets -1.0 + 0.25 = -0.75. Row 1 is the same response cut
    after "low": one weak token, on the policy's one token.

    >>> import torch
    >>> weak_labels = torch.tensor([[-100, 21, 22, 23, 2], [-100, 21, -100, -100, -100]])  # [rows, Lw]
    >>> weak_values = torch.tensor([[0.5, -1.0, 0.25, 2.0], [0.5, 0.0, 0.0, 0.0]])  # [rows, Tw'] = [2, 4]
    >>> weak_map = torch.tensor([[0, 1, 1, 2], [0, NO_TOKEN, NO_TOKEN, NO_TOKEN]])
    >>> policy_mask = torch.tensor([[True, True, True], [True, False, False]])  # [rows, T'] = [2, 3]
    >>> mapped = to_policy_tokens(weak_values, weak_labels, weak_map, policy_mask)
    >>> mapped
    tensor([[ 0.5000, -0.7500,  2.0000],
            [ 0.5000,  0.0000,  0.0000]])
    >>> mapped.sum(dim=1), weak_values.sum(dim=1)  # per-response sums kept
    (tensor([1.7500, 0.5000]), tensor([1.7500, 0.5000]))
    """
    weak_mask = response_mask(weak_labels)  # [rows, Tw'], the weak response tokens in order
    landed = weak_map != NO_TOKEN  # [rows, Nw]
    if not torch.equal(weak_mask.sum(dim=1), landed.sum(dim=1)):
        raise RuntimeError("the weak rows' response tokens and their map disagree in length")
    rows = torch.arange(weak_map.shape[0], device=weak_map.device)[:, None].expand_as(weak_map)[landed]
    first = policy_mask.int().argmax(dim=1)  # [rows] the first response column of each policy row
    index = weak_map[landed]
    if bool((index >= policy_mask.sum(dim=1)[rows]).any()):
        raise RuntimeError("a weak token maps past its policy response")
    out = torch.zeros(policy_mask.shape, dtype=weak_values.dtype, device=weak_values.device)
    return out.index_put_((rows, first[rows] + index), weak_values[weak_mask], accumulate=True)
