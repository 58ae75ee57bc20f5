"""Loss functions and reward statistics as pure tensor functions (no Lightning, nothing of the project).

Papers:
- WSPO: Zhu et al., "Weak-to-Strong Preference Optimization: Stealing Reward from Weak Aligned Model",
  ICLR 2025, arXiv:2410.18640 (token-level loss as in the authors' code).
- DPO: Rafailov et al., "Direct Preference Optimization", arXiv:2305.18290; conservative label smoothing
  (cDPO): Mitchell, "A note on DPO with noisy preferences" (2023).

Conventions (docs/design.md, section 2): every ``*_logps`` argument of shape [batch, tokens] holds
``l_M(t) = log pi_M(y_t | x, y_<t)`` per token (computed by `wspo_lightning.logprobs`), and ``loss_mask``
marks the response tokens; prompt and padding positions are masked and never influence a result,
whatever values they hold.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name}={shape}" for name, shape in shapes.items())
        raise ValueError(f"expected tensors of one shape, got {listed}")


def _wspo_residual(
    policy_logps: Tensor,
    reference_logps: Tensor,
    weak_aligned_logps: Tensor,
    weak_base_logps: Tensor,
    loss_mask: Tensor,
    gamma: float | Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Validated (delta_strong, delta_weak, residual, mask), each [batch, tokens], 0 at masked positions."""
    _check_same_shape(
        policy_logps=policy_logps,
        reference_logps=reference_logps,
        weak_aligned_logps=weak_aligned_logps,
        weak_base_logps=weak_base_logps,
        loss_mask=loss_mask,
    )
    if policy_logps.dim() != 2:
        raise ValueError(f"expected [batch, tokens] log-probs, got shape {tuple(policy_logps.shape)}")
    if isinstance(gamma, Tensor) and gamma.dim() != 0:
        raise ValueError(f"gamma must be a float or a 0-dim tensor, got shape {tuple(gamma.shape)}")
    mask = loss_mask.bool()
    # torch.where (not multiplication) so that huge values at masked positions cannot turn into inf * 0 = nan.
    delta_strong = torch.where(mask, policy_logps - reference_logps, 0.0)
    delta_weak = torch.where(mask, weak_aligned_logps - weak_base_logps, 0.0)
    residual = delta_strong - gamma * delta_weak
    return delta_strong, delta_weak, residual, mask


def wspo_loss(
    policy_logps: Tensor,
    reference_logps: Tensor,
    weak_aligned_logps: Tensor,
    weak_base_logps: Tensor,
    loss_mask: Tensor,
    gamma: float | Tensor,
) -> Tensor:
    """WSPO loss (docs/design.md section 2), a scalar:

        delta_strong(t) = l_policy(t) - l_reference(t)
        delta_weak(t)   = l_weak_aligned(t) - l_weak_base(t)
        loss = mean_i (1 / T_i) * sum_t (delta_strong(t) - gamma * delta_weak(t))^2

    over the response tokens of row i (T_i of them; clamped at 1 so an empty row adds 0, never nan).

    Args:
        policy_logps: [batch, tokens] token log-probs of the strong model being trained (carries the gradient).
        reference_logps: [batch, tokens] of the frozen copy of the strong model.
        weak_aligned_logps, weak_base_logps: [batch, tokens] of the frozen weak pair, after / before alignment.
        loss_mask: [batch, tokens] bool or 0/1, True on response tokens.
        gamma: alignment strength, a float or 0-dim tensor. gamma = 1 copies the weak model's shift, gamma > 1
            amplifies it. The authors' code minimises ``(b * delta_strong - delta_weak)^2`` with ``b = pref_beta``:
            the same optimum as gamma = 1 / b (their loss is b^2 times ours), so their b = 0.1 is gamma = 10.
    """
    _, _, residual, mask = _wspo_residual(
        policy_logps, reference_logps, weak_aligned_logps, weak_base_logps, loss_mask, gamma
    )
    num_tokens = mask.sum(dim=-1).clamp(min=1)  # [batch]
    return (residual.square().sum(dim=-1) / num_tokens).mean()


@torch.no_grad()
def wspo_token_stats(
    policy_logps: Tensor,
    reference_logps: Tensor,
    weak_aligned_logps: Tensor,
    weak_base_logps: Tensor,
    loss_mask: Tensor,
    gamma: float | Tensor,
) -> dict[str, Tensor]:
    """Detached scalar means over all response tokens of the batch, for logging (``wspo/...`` metrics).

    Same arguments as :func:`wspo_loss`. Returns ``delta_strong``, ``delta_weak`` and ``residual``
    (= delta_strong - gamma * delta_weak, signed). A batch without response tokens gives zeros.
    """
    delta_strong, delta_weak, residual, mask = _wspo_residual(
        policy_logps, reference_logps, weak_aligned_logps, weak_base_logps, loss_mask, gamma
    )
    num_tokens = mask.sum().clamp(min=1)
    return {
        "delta_strong": delta_strong.sum() / num_tokens,
        "delta_weak": delta_weak.sum() / num_tokens,
        "residual": residual.sum() / num_tokens,
    }


def sequence_logps(token_logps: Tensor, loss_mask: Tensor) -> Tensor:
    """Sequence log-prob ``S = sum_t l(t)`` over response tokens: [batch, tokens] -> [batch]."""
    _check_same_shape(token_logps=token_logps, loss_mask=loss_mask)
    return torch.where(loss_mask.bool(), token_logps, 0.0).sum(dim=-1)


def implicit_reward(logps_a: Tensor, logps_b: Tensor, loss_mask: Tensor) -> Tensor:
    """Implicit reward ``sum_t (l_a(t) - l_b(t))`` over response tokens, [batch] (docs/design.md section 2).

    ``reward_weak = implicit_reward(weak_aligned, weak_base, mask)``,
    ``reward_strong = implicit_reward(policy, reference, mask)``. Logged only, never part of the WSPO loss.
    """
    _check_same_shape(logps_a=logps_a, logps_b=logps_b, loss_mask=loss_mask)
    return torch.where(loss_mask.bool(), logps_a - logps_b, 0.0).sum(dim=-1)


def reward_margin(chosen_rewards: Tensor, rejected_rewards: Tensor) -> tuple[Tensor, Tensor]:
    """``margin = reward(chosen) - reward(rejected)`` and ``correct = float(margin > 0)``, both [batch].

    The batch accuracy is ``correct.mean()``; a tie counts as wrong.
    """
    _check_same_shape(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    margin = chosen_rewards - rejected_rewards
    return margin, (margin > 0).float()


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sigmoid DPO loss with conservative label smoothing (cDPO), per example (docs/design.md section 2):

        logits = (S_pol(y_w) - S_pol(y_l)) - (S_ref(y_w) - S_ref(y_l))
        losses = -log sigmoid(beta * logits) * (1 - ls) - log sigmoid(-beta * logits) * ls

    With ``label_smoothing = 0`` this is TRL's ``loss_type="sigmoid"`` (TRL 1.x ignores label smoothing for
    'sigmoid'; the smoothed form is cDPO, TRL 0.x's 'sigmoid', which TRL 1.x keeps in its 'aot' losses).

    Args:
        policy_chosen_logps, policy_rejected_logps: [batch] sequence-summed log-probs of the trained policy.
        reference_chosen_logps, reference_rejected_logps: [batch] the same under the frozen reference.
        beta: inverse temperature; larger keeps the policy closer to the reference.
        label_smoothing: assumed probability in [0, 0.5) that a preference label is flipped.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each [batch]: losses per example (the caller takes the
        mean); rewards ``beta * (S_pol - S_ref)``, detached.
    """
    _check_same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps,
        reference_rejected_logps=reference_rejected_logps,
    )
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    logits = chosen_logratios - rejected_logratios
    losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()
