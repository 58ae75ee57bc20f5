"""Tests for wspo_lightning.losses: hand-worked numbers (arithmetic in each docstring) plus reference checks.
The pair losses (DPO family) are tested against TRL in test_pair_losses.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from wspo_lightning.logprobs import IGNORE_INDEX, token_logps
from wspo_lightning.losses import (
    implicit_reward,
    reward_margin,
    sequence_logps,
    wspo_loss,
    wspo_token_stats,
)

LN2 = math.log(2.0)


def _worked_wspo_batch() -> dict[str, torch.Tensor]:
    """Two rows of 3 tokens. Row 0: prompt token then 2 response tokens; row 1: 3 response tokens.

    Response tokens only (row 0 position 0 is a prompt token holding garbage: policy 7, reference 0):
        delta_strong = policy - reference:       row 0 [1, 0]     row 1 [0.5, 0, -1]
        delta_weak   = weak_aligned - weak_base: row 0 [0, 1]     row 1 [0, 0.5, 0]
    with gamma = 2:
        residual = dS - 2 dW:                    row 0 [1, -2]    row 1 [0.5, -1, -1]
    """
    return dict(
        policy_logps=torch.tensor([[7.0, -1.0, -2.0], [-0.5, -2.0, -4.0]]),
        reference_logps=torch.tensor([[0.0, -2.0, -2.0], [-1.0, -2.0, -3.0]]),
        weak_aligned_logps=torch.tensor([[0.0, -1.0, -1.0], [-1.0, -0.5, -2.0]]),
        weak_base_logps=torch.tensor([[0.0, -1.0, -2.0], [-1.0, -1.0, -2.0]]),
        loss_mask=torch.tensor([[False, True, True], [True, True, True]]),
        gamma=2.0,
    )


def _random_wspo_batch(batch: int = 4, tokens: int = 9, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random log-probs; row i has a prompt of i+1 tokens, then a response, then right padding."""
    g = torch.Generator().manual_seed(seed)
    logps = {
        name: -torch.rand(batch, tokens, generator=g) * 5
        for name in ("policy_logps", "reference_logps", "weak_aligned_logps", "weak_base_logps")
    }
    mask = torch.zeros(batch, tokens, dtype=torch.bool)
    for i in range(batch):
        mask[i, i + 1 : tokens - i] = True
    return dict(**logps, loss_mask=mask)


# ---------------------------------------------------------------- token_logps


def test_token_logps_matches_hand_worked_example_and_zeroes_ignored_positions():
    """V = 3. Position 0: logits [0, 0, ln 2] -> probs [1/4, 1/4, 1/2], label 2 -> ln(1/2) = -0.6931.
    Position 1: logits [ln 2, 0, 0] -> probs [1/2, 1/4, 1/4], label 1 -> ln(1/4) = -1.3863.
    Position 2: label = IGNORE_INDEX -> 0.0 whatever the logits are."""
    logits = torch.tensor([[[0.0, 0.0, LN2], [LN2, 0.0, 0.0], [5.0, -5.0, 1e4]]])
    labels = torch.tensor([[2, 1, IGNORE_INDEX]])
    expected = torch.tensor([[-LN2, -2 * LN2, 0.0]])
    assert_close(token_logps(logits, labels), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logps_matches_log_softmax_gather_in_float32(dtype):
    """Random logits (bf16 too): equals float32 log_softmax + gather, returns float32, 0 where ignored."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 7, 50, generator=g) * 4).to(dtype)
    labels = torch.randint(0, 50, (3, 7), generator=g)
    labels[0, :2] = IGNORE_INDEX
    labels[2, -3:] = IGNORE_INDEX
    out = token_logps(logits, labels)
    reference = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    reference = reference.masked_fill(labels == IGNORE_INDEX, 0.0)
    assert out.dtype == torch.float32
    assert_close(out, reference)
    assert (out[labels == IGNORE_INDEX] == 0).all()


def test_token_logps_backpropagates_like_log_softmax_gather():
    """d/dlogits of sum(token_logps) = onehot(label) - softmax at labelled positions, 0 at ignored ones."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 6, generator=g, requires_grad=True)
    labels = torch.tensor([[1, 5, IGNORE_INDEX, 0], [IGNORE_INDEX, 2, 3, 4]])
    token_logps(logits, labels).sum().backward()
    keep = (labels != IGNORE_INDEX).unsqueeze(-1).float()
    expected = (F.one_hot(labels.clamp(min=0), 6).float() - logits.detach().softmax(-1)) * keep
    assert_close(logits.grad, expected)


def test_token_logps_rejects_mismatched_shapes_naming_them():
    with pytest.raises(ValueError, match=r"\(2, 3, 5\).*\(2, 4\)"):
        token_logps(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))


# ---------------------------------------------------------------- wspo_loss


def test_wspo_loss_matches_hand_worked_two_row_batch_with_different_lengths():
    """Residuals from _worked_wspo_batch (gamma = 2):
    row 0: [1, -2]     -> squares [1, 4]       sum 5    / T_0 = 2 -> 2.5
    row 1: [0.5, -1, -1] -> squares [0.25, 1, 1] sum 2.25 / T_1 = 3 -> 0.75
    loss = (2.5 + 0.75) / 2 = 1.625."""
    assert_close(wspo_loss(**_worked_wspo_batch()), torch.tensor(1.625))


def test_wspo_loss_accepts_gamma_as_0_dim_tensor():
    """Same batch as the hand-worked test, gamma = tensor(2.0) -> 1.625."""
    batch = _worked_wspo_batch() | {"gamma": torch.tensor(2.0)}
    assert_close(wspo_loss(**batch), torch.tensor(1.625))


def test_wspo_loss_is_zero_when_policy_shift_equals_gamma_times_weak_shift():
    """policy = reference + gamma * (weak_aligned - weak_base) -> every residual is 0 -> loss 0."""
    batch = _random_wspo_batch()
    gamma = 3.0
    batch["policy_logps"] = batch["reference_logps"] + gamma * (batch["weak_aligned_logps"] - batch["weak_base_logps"])
    assert_close(wspo_loss(**batch, gamma=gamma), torch.tensor(0.0), atol=1e-10, rtol=0)


def test_wspo_loss_with_gamma_one_over_b_is_authors_form_divided_by_b_squared():
    """Authors' code: mean_i sum_t (b*dS - dW)^2 / T_i with b = pref_beta.
    (dS - dW/b)^2 = (b*dS - dW)^2 / b^2, so ours with gamma = 1/b equals theirs / b^2."""
    batch = _random_wspo_batch(seed=3)
    b = 0.1

    def authors_loss(policy_logps, reference_logps, weak_aligned_logps, weak_base_logps, loss_mask):
        per_row = []
        for i in range(policy_logps.shape[0]):
            m = loss_mask[i]
            d_strong = policy_logps[i][m] - reference_logps[i][m]
            d_weak = weak_aligned_logps[i][m] - weak_base_logps[i][m]
            per_row.append(((b * d_strong - d_weak) ** 2).sum() / m.sum())
        return torch.stack(per_row).mean()

    assert_close(wspo_loss(**batch, gamma=1 / b), authors_loss(**batch) / b**2)


def test_wspo_loss_ignores_prompt_and_padding_values():
    """Masked positions hold values of size ~1e30 (their square overflows float32). The loss must equal
    the mean over rows of the loss of each row's response alone (a 1-row batch with an all-True mask)."""
    batch = _random_wspo_batch(seed=4)
    mask = batch.pop("loss_mask")
    g = torch.Generator().manual_seed(5)
    noisy = {k: torch.where(mask, v, torch.randn(v.shape, generator=g) * 1e30) for k, v in batch.items()}
    gamma = 1.5
    per_row = [
        wspo_loss(
            **{k: v[i][mask[i]].unsqueeze(0) for k, v in batch.items()},
            loss_mask=torch.ones(1, int(mask[i].sum()), dtype=torch.bool),
            gamma=gamma,
        )
        for i in range(mask.shape[0])
    ]
    loss = wspo_loss(**noisy, loss_mask=mask, gamma=gamma)
    assert torch.isfinite(loss)
    assert_close(loss, torch.stack(per_row).mean())


def test_wspo_loss_row_without_response_tokens_gives_finite_loss():
    """Row 0: one response token with residual 2 - 0 = 2 -> 4 / 1 = 4. Row 1: no response token (all
    garbage) -> 0 / clamp(0, min=1) = 0, not nan. loss = (4 + 0) / 2 = 2. An all-empty batch gives 0."""
    policy = torch.tensor([[2.0, 9.0], [5.0, -3.0]])
    zeros = torch.zeros(2, 2)
    mask = torch.tensor([[True, False], [False, False]])
    loss = wspo_loss(policy, zeros, zeros, zeros, mask, gamma=1.0)
    assert_close(loss, torch.tensor(2.0))
    empty = wspo_loss(policy, zeros, zeros, zeros, torch.zeros(2, 2, dtype=torch.bool), gamma=1.0)
    assert_close(empty, torch.tensor(0.0))


def test_wspo_loss_gradient_wrt_policy_is_two_residual_over_length_and_batch():
    """d loss / d policy[i, t] = 2 * r[i, t] * mask[i, t] / T_i / B, with B = 2 and the worked residuals:
    row 0 (T = 2): 2 * [_, 1, -2] / 2 / 2 = [0, 0.5, -1]   (position 0 is a prompt token -> 0)
    row 1 (T = 3): 2 * [0.5, -1, -1] / 3 / 2 = [1/6, -1/3, -1/3]."""
    batch = _worked_wspo_batch()
    batch["policy_logps"].requires_grad_(True)
    wspo_loss(**batch).backward()
    expected = torch.tensor([[0.0, 0.5, -1.0], [1 / 6, -1 / 3, -1 / 3]])
    assert_close(batch["policy_logps"].grad, expected)


def test_wspo_loss_rejects_mismatched_shapes_naming_them():
    batch = _worked_wspo_batch()
    batch["weak_base_logps"] = torch.zeros(2, 4)
    with pytest.raises(ValueError, match=r"weak_base_logps=\(2, 4\)"):
        wspo_loss(**batch)


def test_wspo_token_stats_are_token_means_over_response_tokens():
    """The five response tokens of _worked_wspo_batch (gamma = 2):
    delta_strong [1, 0, 0.5, 0, -1] -> 0.5 / 5 = 0.1
    delta_weak   [0, 1, 0, 0.5, 0]  -> 1.5 / 5 = 0.3
    residual     [1, -2, 0.5, -1, -1] -> -2.5 / 5 = -0.5   (= 0.1 - 2 * 0.3)."""
    stats = wspo_token_stats(**_worked_wspo_batch())
    assert set(stats) == {"delta_strong", "delta_weak", "residual"}
    assert_close(stats["delta_strong"], torch.tensor(0.1))
    assert_close(stats["delta_weak"], torch.tensor(0.3))
    assert_close(stats["residual"], torch.tensor(-0.5))


# ---------------------------------------------------------------- rewards and margins


def test_sequence_logps_sums_response_tokens_only():
    """[[-1, -2, -3], [-4, -5, -6]] with mask [[0, 1, 1], [1, 0, 0]] -> [-2 - 3, -4] = [-5, -4]."""
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    mask = torch.tensor([[0, 1, 1], [1, 0, 0]])
    assert_close(sequence_logps(logps, mask), torch.tensor([-5.0, -4.0]))


def test_implicit_rewards_sum_log_ratios_over_response_tokens():
    """From _worked_wspo_batch (row 0's prompt token holds garbage 7 - 0, ignored):
    reward_strong = sum dS: row 0 1 + 0 = 1, row 1 0.5 + 0 - 1 = -0.5
    reward_weak   = sum dW: row 0 0 + 1 = 1, row 1 0 + 0.5 + 0 = 0.5."""
    b = _worked_wspo_batch()
    strong = implicit_reward(b["policy_logps"], b["reference_logps"], b["loss_mask"])
    weak = implicit_reward(b["weak_aligned_logps"], b["weak_base_logps"], b["loss_mask"])
    assert_close(strong, torch.tensor([1.0, -0.5]))
    assert_close(weak, torch.tensor([1.0, 0.5]))


def test_reward_margin_and_accuracy_count_ties_as_wrong():
    """chosen [1, -0.5, 2] - rejected [0, 0.5, 2] = margin [1, -1, 0]; correct = margin > 0 = [1, 0, 0];
    accuracy = mean = 1/3."""
    margin, correct = reward_margin(torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.0, 0.5, 2.0]))
    assert_close(margin, torch.tensor([1.0, -1.0, 0.0]))
    assert_close(correct, torch.tensor([1.0, 0.0, 0.0]))
    assert_close(correct.mean(), torch.tensor(1 / 3))
