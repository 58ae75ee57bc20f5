"""Token log-probabilities of responses: padding, response masks and one forward per model.

A batch row is prompt ids then response ids; `labels` holds the response ids at response positions
and `IGNORE_INDEX` on prompt and padding, so a mask of the response is `labels != IGNORE_INDEX`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from wspo_lightning.errors import InputError

IGNORE_INDEX = -100
"""Label of prompt and padding positions: no loss, no log-prob there."""


def right_pad(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int, length: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Rows `prompt + response`, right-padded to `length` (default: the longest row).

    Returns `input_ids`, `attention_mask` (1 on real tokens) and `labels` (the response ids, IGNORE_INDEX
    elsewhere), each [rows, length] long."""
    length = length or max(len(p) + len(r) for p, r in zip(prompts, responses))
    input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    attention_mask = torch.zeros_like(input_ids)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        end = len(prompt) + len(response)
        input_ids[row, :end] = torch.tensor(list(prompt) + list(response), dtype=torch.long)
        labels[row, len(prompt) : end] = torch.tensor(list(response), dtype=torch.long)
        attention_mask[row, :end] = 1
    return input_ids, attention_mask, labels


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Left-pad token lists for generation: (input_ids [rows, width], attention_mask [rows, width], 0 on padding)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(list(row), dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def cut_at_stop(tokens: Tensor, stop: Sequence[int]) -> tuple[Tensor, Tensor]:
    """For generated tokens [rows, new]: `keep` [rows, new], True up to and including each row's first stop id
    (generate pads after it), and `finished` [rows], whether the row has one (False: cut by max_new_tokens)."""
    is_stop = torch.isin(tokens, torch.tensor(list(stop), dtype=tokens.dtype, device=tokens.device))
    keep = (is_stop.int().cumsum(dim=1) - is_stop.int()) == 0
    return keep, is_stop.any(dim=1)


def token_logps(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Per-token log-probabilities of the labels, in float32.

    Args:
        logits: [batch, tokens, vocab], any float dtype; ``logits[:, t]`` predicts ``labels[:, t]``
            (the caller has already shifted them).
        labels: [batch, tokens] token ids; ``ignore_index`` marks positions without a label.
        ignore_index: label value of ignored positions.

    Returns:
        float32 [batch, tokens]: ``log pi(label_t) = logit[label_t] - logsumexp(logit)``, 0.0 at ignored positions.

    Rows are upcast to float32 one at a time and the label logit is gathered, so under ``torch.no_grad``
    (the frozen models) the extra memory is one [tokens, vocab] float32 row, never a float32 copy of the
    batch or a full log_softmax. With grad, autograd keeps each float32 row for logsumexp's backward.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits [batch, tokens, vocab] and labels [batch, tokens], "
            f"got logits={tuple(logits.shape)}, labels={tuple(labels.shape)}"
        )
    keep = labels != ignore_index  # [batch, tokens]
    safe_labels = torch.where(keep, labels, 0).unsqueeze(-1)  # [batch, tokens, 1]
    rows = []
    for row_logits, row_labels in zip(logits, safe_labels):
        row_logits = row_logits.float()  # [tokens, vocab]; no copy when already float32
        picked = row_logits.gather(-1, row_labels).squeeze(-1)  # [tokens]
        rows.append(picked - torch.logsumexp(row_logits, dim=-1))
    logps = torch.stack(rows) if rows else logits.new_zeros(labels.shape, dtype=torch.float32)
    return torch.where(keep, logps, 0.0)


def response_start(labels: Tensor) -> int:
    """The batch's first response position (at least 1: the first token is never predicted)."""
    is_response = labels != IGNORE_INDEX  # [B, L]
    first = int(is_response.int().argmax(dim=1)[is_response.any(dim=1)].min()) if is_response.any() else 1
    return max(first, 1)


def response_mask(labels: Tensor) -> Tensor:
    """The [B, T'] mask of response tokens in the layout `response_logps` returns."""
    return labels[:, response_start(labels) :] != IGNORE_INDEX


def response_logps(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor
) -> tuple[Tensor, Tensor]:
    """Per-token log-probs of the response tokens: ([B, T'] float32, mask [B, T'] bool).

    The lm_head runs only from the batch's first response position on (`logits_to_keep`):
    with a large vocabulary that is most of the forward's cost. T' = L - first response position.
    A model marked by `use_packing` runs the rows packed (`packed_response_logps`), same result and layout.
    """
    if getattr(model, PACKING_FLAG, False):
        return packed_response_logps(model, input_ids, attention_mask, labels)
    first = response_start(labels)
    keep = input_ids.shape[1] - first + 1
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, use_cache=False).logits
    targets = labels[:, first:]  # [B, T']
    return token_logps(logits[:, :-1], targets), targets != IGNORE_INDEX


PACKING_FLAG = "wspo_packing"


def use_packing(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Make `response_logps` run `model` on packed rows (`data.packing: true`)."""
    if enabled:
        try:  # what keeps packed records apart in sdpa and eager attention
            from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
        except ImportError:
            raise InputError(
                "data.packing: this transformers builds no attention masks from packed position ids "
                "(masking_utils.find_packed_sequence_indices): upgrade transformers, or set data.packing: false"
            ) from None
    setattr(model, PACKING_FLAG, enabled)
    return model


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` in bins of at most `capacity` (first-fit, longest first): the packed rows."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= lengths[i]
    return rows


@functools.cache  # reads the transformers source: once per process, not once per forward
def _keeps_2d_bool() -> bool:
    """Whether this transformers slices hidden states by a 2D boolean `logits_to_keep` (5.x does)."""
    import inspect

    try:
        from transformers.modeling_utils import slice_logits_to_keep
    except ImportError:
        return False
    return "torch.bool" in inspect.getsource(slice_logits_to_keep)


def packed_response_logps(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor
) -> tuple[Tensor, Tensor]:
    """`response_logps` on packed rows: the records of the right-padded batch concatenated into as few rows as
    fit the batch's width (one row with flash attention, whose variable-length kernels need no block mask),
    position ids restarting at 0 in each record, and no attention mask, so transformers keeps attention inside
    each record (from the restarts of the position ids: a block-diagonal causal mask for sdpa and eager,
    variable-length sequences for flash attention). The lm_head runs only at the positions that predict a
    response token. Returns the padded path's layout: ([B, T'] float32, mask [B, T'] bool)."""
    rows, width = input_ids.shape
    first = response_start(labels)
    lengths = attention_mask.sum(dim=1).tolist()  # real tokens lead each right-padded row
    flash = str(getattr(getattr(model, "config", None), "_attn_implementation", "")).startswith("flash")
    bins = first_fit(lengths, sum(lengths) if flash else width)
    packed_width = max(sum(lengths[i] for i in b) for b in bins)
    device = input_ids.device
    source = torch.zeros((len(bins), packed_width), dtype=torch.long, device=device)  # into input_ids.flatten()
    positions = torch.zeros_like(source)
    destination = torch.full_like(source, -1)  # the predicted token's place in the flattened [B, T'] output
    steps = torch.arange(packed_width, device=device)
    is_response = labels != IGNORE_INDEX  # [B, L]
    for r, b in enumerate(bins):
        offset = 0
        for i in b:
            n = lengths[i]
            source[r, offset : offset + n] = i * width + steps[:n]
            positions[r, offset : offset + n] = steps[:n]
            # position t - 1 of the record predicts its token t
            predicted = is_response[i, 1:n].nonzero().squeeze(1) + 1  # [tokens]
            destination[r, offset + predicted - 1] = i * (width - first) + predicted - first
            offset += n
        positions[r, offset:] = steps[: packed_width - offset]  # trailing pad: a segment of its own
    keep = destination >= 0  # [R, W']
    packed_ids = input_ids.flatten()[source]
    if _keeps_2d_bool():
        logits = model(input_ids=packed_ids, position_ids=positions, logits_to_keep=keep, use_cache=False).logits
    else:  # one set of positions for all rows: their union, then the kept ones
        columns = keep.any(dim=0).nonzero().squeeze(1)
        out = model(input_ids=packed_ids, position_ids=positions, logits_to_keep=columns, use_cache=False).logits
        logits = out[keep[:, columns]]
    # logits: [K, V], K = response tokens of the batch, in the row-major order of `keep`
    kept, span = destination[keep], width - first  # [K]; T'
    targets = labels[kept // span, kept % span + first]  # [K]
    picked = torch.cat(  # float32 upcasts of one padded row's size at a time, as token_logps does
        [token_logps(part[None], target[None])[0] for part, target in zip(logits.split(span), targets.split(span))]
    )
    logps = torch.zeros(rows * span, dtype=torch.float32, device=device).index_put((kept,), picked)
    return logps.view(rows, span), labels[:, first:] != IGNORE_INDEX


def summed_logps(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int = 16,
) -> list[float]:
    """`sum_t log pi_model(y_t | x, y_<t)` of each (prompt ids, response ids), in batches of similar length."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
    out = [0.0] * len(prompts)
    device = next(model.parameters()).device
    with torch.no_grad():
        for first in range(0, len(order), batch_size):
            rows = order[first : first + batch_size]
            batch = right_pad([prompts[i] for i in rows], [responses[i] for i in rows], pad_id)
            logps, mask = response_logps(model, *(t.to(device) for t in batch))
            for i, total in zip(rows, torch.where(mask, logps, 0.0).sum(dim=1).tolist()):
                out[i] = total
    return out
