"""Losses and reward statistics on tensors (no Lightning, nothing of the project): the WSPO loss as functions,
the pair losses of the DPO family as `torch.nn.Module` classes that configs name by class path.

Papers:
- WSPO: Zhu et al., "Weak-to-Strong Preference Optimization: Stealing Reward from Weak Aligned Model",
  ICLR 2025, arXiv:2410.18640 (token-level loss as in the authors' code).
- Pair losses: each class's docstring (DPO, conservative DPO, robust DPO, SLiC's hinge, IPO).

Conventions (docs/design.md, section 2): every ``*_logps`` argument of shape [batch, tokens] holds
``l_M(t) = log pi_M(y_t | x, y_<t)`` per token (computed by `wspo_lightning.logprobs`), and ``loss_mask``
(``chosen_mask``, ``rejected_mask``) marks the response tokens; prompt and padding positions are masked and
never influence a result, whatever values they hold.
"""

from __future__ import annotations

import abc
import inspect
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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


# ---------------------------------------------------------------- pair losses (the DPO family)


def _sigmoid_terms(logits: Tensor) -> tuple[Tensor, Tensor]:
    """``(-log sigmoid(x), -log sigmoid(-x))``: the logistic loss of each pair as labelled, and as if flipped."""
    return -F.logsigmoid(logits), -F.logsigmoid(-logits)


def _check_label_smoothing(owner: str, label_smoothing: float) -> float:
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"{owner}.label_smoothing must lie in [0, 0.5), got {label_smoothing}")
    return float(label_smoothing)


def worked_batch() -> tuple[Tensor, ...]:
    """The pair losses' worked example (:class:`PairLoss`'s docstring): 2 pairs, chosen responses of 2 and 3
    tokens, rejected of 3 and 1, masked positions holding -9 that must not count; the reference at -1 per token."""
    policy_chosen = torch.tensor([[-0.5, -0.5, -9.0], [-1.0, -1.0, -2.0]])
    policy_rejected = torch.tensor([[-1.5, -1.5, -1.0], [0.0, -9.0, -9.0]])
    reference = torch.full((2, 3), -1.0)
    chosen_mask, rejected_mask = torch.tensor([[1, 1, 0], [1, 1, 1]]), torch.tensor([[1, 1, 1], [1, 0, 0]])
    return policy_chosen, policy_rejected, reference, reference, chosen_mask, rejected_mask


class PairLoss(nn.Module, abc.ABC):
    """Base of the pair losses: DPOModule's ``loss``, named in YAML by class path (``wspo_lightning.losses.X``).

    For each pair, ``r = S_pol - S_ref`` is a response's sequence log-ratio (``S = sum_t l(t)`` over its
    response tokens) and ``h = r(chosen) - r(rejected)``. A subclass owns its hyperparameters and defines
    :meth:`pair_losses`; the module only calls :meth:`forward`.

    Args:
        beta: inverse temperature, the strength of the implicit KL penalty (finite, > 0); the logged rewards
            are ``beta * r``.
        sft_weight: weight of an SFT term, ``sft_weight *`` the mean negative log-likelihood of all chosen
            tokens of the batch (TRL's ``sft`` loss type beside this loss: ``loss_type=[..., "sft"]``,
            ``loss_weights=[1.0, sft_weight]``); 0 turns it off. A batch mean, added to every pair's loss, so
            the mean over pairs is the objective.

    The worked batch of every example below: two pairs; per-token log-probs ``-9`` at masked positions
    (never read); a reference of ``-1`` on every token, so each token's log-ratio is ``policy + 1``:

    - chosen:   pair 0 ``[0.5, 0.5]`` (2 tokens), pair 1 ``[0, 0, -1]`` (3 tokens): ``r = [1, -1]``;
    - rejected: pair 0 ``[-0.5, -0.5, 0]`` (3 tokens), pair 1 ``[1]`` (1 token):   ``r = [-1, 1]``;
    - ``h = [2, -2]``; the chosen tokens' NLL is ``(0.5 + 0.5 + 1 + 1 + 2) / 5 = 1``.

    >>> import torch
    >>> policy_chosen = torch.tensor([[-0.5, -0.5, -9.0], [-1.0, -1.0, -2.0]])
    >>> policy_rejected = torch.tensor([[-1.5, -1.5, -1.0], [0.0, -9.0, -9.0]])
    >>> reference = torch.full((2, 3), -1.0)  # both sides
    >>> chosen_mask, rejected_mask = torch.tensor([[1, 1, 0], [1, 1, 1]]), torch.tensor([[1, 1, 1], [1, 0, 0]])
    >>> batch = (policy_chosen, policy_rejected, reference, reference, chosen_mask, rejected_mask)

    DPO at beta 0.5 (``x = beta * h = [1, -1]``, loss ``log(1 + e^-x) = [0.3133, 1.3133]``), plus 0.5 times
    the SFT term (0.5 * 1); the rewards ``0.5 * r`` whatever the loss:

    >>> losses, chosen_rewards, rejected_rewards = DPOLoss(beta=0.5, sft_weight=0.5)(*batch)
    >>> losses
    tensor([0.8133, 1.8133])
    >>> chosen_rewards, rejected_rewards
    (tensor([ 0.5000, -0.5000]), tensor([-0.5000,  0.5000]))
    """

    def __init__(self, beta: float = 0.1, sft_weight: float = 0.0) -> None:
        super().__init__()
        name = type(self).__name__
        if not (math.isfinite(beta) and beta > 0):
            raise ValueError(f"{name}.beta must be a finite positive number, got {beta}")
        if not (math.isfinite(sft_weight) and sft_weight >= 0):
            raise ValueError(f"{name}.sft_weight must be a finite number >= 0, got {sft_weight}")
        self.beta, self.sft_weight = float(beta), float(sft_weight)

    def forward(
        self,
        policy_chosen_logps: Tensor,
        policy_rejected_logps: Tensor,
        reference_chosen_logps: Tensor,
        reference_rejected_logps: Tensor,
        chosen_mask: Tensor,
        rejected_mask: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Per-pair losses and rewards.

        Args:
            policy_chosen_logps, reference_chosen_logps: [batch, tokens] per-token log-probs of the chosen
                responses under the trained policy (carries the gradient) and the frozen reference.
            policy_rejected_logps, reference_rejected_logps: [batch, tokens'] the same for the rejected ones.
            chosen_mask, rejected_mask: [batch, tokens] and [batch, tokens'], bool or 0/1, True on response tokens.

        Returns:
            ``(losses, chosen_rewards, rejected_rewards)``, each [batch]: the caller takes the mean of
            ``losses``; the rewards are ``beta * r``, detached, sequence sums for every loss (as TRL logs them).
        """
        chosen = implicit_reward(policy_chosen_logps, reference_chosen_logps, chosen_mask)  # [batch]
        rejected = implicit_reward(policy_rejected_logps, reference_rejected_logps, rejected_mask)  # [batch]
        _check_same_shape(chosen_logratios=chosen, rejected_logratios=rejected)
        losses = self.pair_losses(chosen, rejected, chosen_mask.sum(dim=-1), rejected_mask.sum(dim=-1))
        if self.sft_weight:
            chosen_tokens = chosen_mask.bool()
            nll = -sequence_logps(policy_chosen_logps, chosen_tokens).sum() / chosen_tokens.sum().clamp(min=1)
            losses = losses + self.sft_weight * nll
        return losses, self.beta * chosen.detach(), self.beta * rejected.detach()

    @abc.abstractmethod
    def pair_losses(
        self, chosen_logratios: Tensor, rejected_logratios: Tensor, chosen_tokens: Tensor, rejected_tokens: Tensor
    ) -> Tensor:
        """[batch] losses from the sequence log-ratios ``r`` and the response lengths, each [batch]."""

    def init_args(self) -> dict[str, float]:
        """The constructor's arguments as set: with the class path, the YAML block that rebuilds this loss."""
        names = [n for n in inspect.signature(type(self).__init__).parameters if n != "self"]
        return {n: getattr(self, n) for n in names}

    def extra_repr(self) -> str:
        return ", ".join(f"{n}={v!r}" for n, v in self.init_args().items())


class DPOLoss(PairLoss):
    """DPO, the sigmoid loss (Rafailov et al. 2023, arXiv:2305.18290), the default; label smoothing e gives
    conservative DPO (cDPO, Mitchell 2023):

        loss = -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)

    e = 0 is TRL's ``loss_type="sigmoid"`` (TRL 1.x has no smoothing in 'sigmoid').

    Args:
        beta, sft_weight: see :class:`PairLoss`.
        label_smoothing: the assumed probability e in [0, 0.5) that a preference label is flipped.

    On :class:`PairLoss`'s worked batch (``h = [2, -2]``) at beta 0.5, ``x = beta * h = [1, -1]``:
    ``log(1 + e^-x) = [0.3133, 1.3133]``; e = 0.1 adds ``e * x`` (as ``log(1 + e^x) = x + log(1 + e^-x)``):

    >>> batch = worked_batch()  # PairLoss's example
    >>> DPOLoss(beta=0.5)(*batch)[0]
    tensor([0.3133, 1.3133])
    >>> DPOLoss(beta=0.5, label_smoothing=0.1)(*batch)[0]
    tensor([0.4133, 1.2133])
    """

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0, sft_weight: float = 0.0) -> None:
        super().__init__(beta, sft_weight)
        self.label_smoothing = _check_label_smoothing(type(self).__name__, label_smoothing)

    def pair_losses(self, chosen_logratios, rejected_logratios, chosen_tokens, rejected_tokens) -> Tensor:
        kept, flipped = _sigmoid_terms(self.beta * (chosen_logratios - rejected_logratios))
        e = self.label_smoothing
        return (1 - e) * kept + e * flipped


class RobustDPOLoss(DPOLoss):
    """Robust DPO (Chowdhury et al. 2024, arXiv:2403.00409), unbiased under label noise e, TRL's ``robust``:

        loss = (-(1 - e) log sigmoid(beta h) + e log sigmoid(-beta h)) / (1 - 2e)

    Args:
        beta, sft_weight: see :class:`PairLoss`.
        label_smoothing: the assumed probability e in [0, 0.5) that a preference label is flipped.

    On :class:`PairLoss`'s worked batch (``h = [2, -2]``) at beta 0.5, ``x = [1, -1]``: with
    ``log(1 + e^x) = x + log(1 + e^-x)`` the loss is ``log(1 + e^-x) - e x / (1 - 2e)``; e = 0.1:
    ``[0.3133 - 0.125, 1.3133 + 0.125]``:

    >>> batch = worked_batch()  # PairLoss's example
    >>> RobustDPOLoss(beta=0.5, label_smoothing=0.1)(*batch)[0]
    tensor([0.1883, 1.4383])
    """

    def pair_losses(self, chosen_logratios, rejected_logratios, chosen_tokens, rejected_tokens) -> Tensor:
        kept, flipped = _sigmoid_terms(self.beta * (chosen_logratios - rejected_logratios))
        e = self.label_smoothing
        return ((1 - e) * kept - e * flipped) / (1 - 2 * e)


class HingeLoss(PairLoss):
    """Hinge loss of SLiC (Zhao et al. 2023, arXiv:2305.10425), TRL's ``hinge``: ``max(0, 1 - beta h)``.

    Args: see :class:`PairLoss`.

    On :class:`PairLoss`'s worked batch (``h = [2, -2]``) at beta 0.5: ``max(0, 1 - [1, -1]) = [0, 2]``:

    >>> batch = worked_batch()  # PairLoss's example
    >>> HingeLoss(beta=0.5)(*batch)[0]
    tensor([0., 2.])
    """

    def pair_losses(self, chosen_logratios, rejected_logratios, chosen_tokens, rejected_tokens) -> Tensor:
        return torch.relu(1 - self.beta * (chosen_logratios - rejected_logratios))


class IPOLoss(PairLoss):
    """IPO (Azar et al. 2023, arXiv:2310.12036, eq. 17), TRL's ``ipo``: ``(h_avg - 1 / (2 beta))^2``, where
    ``h_avg`` takes each response's log-ratio averaged over its tokens (``r / T``), as TRL computes it (the
    sum would make the square grow with the length). The logged rewards stay ``beta * r`` (sums), as TRL's.

    Args: see :class:`PairLoss`; here beta is IPO's tau, and ``1 / (2 beta)`` the target margin.

    On :class:`PairLoss`'s worked batch at beta 0.5 (target 1): per-token means, chosen ``[1/2, -1/3]``,
    rejected ``[-1/3, 1/1]``; ``h_avg = [5/6, -4/3]``; loss ``[(5/6 - 1)^2, (-4/3 - 1)^2] = [1/36, 49/9]``:

    >>> batch = worked_batch()  # PairLoss's example
    >>> losses, chosen_rewards, _ = IPOLoss(beta=0.5)(*batch)
    >>> losses, chosen_rewards
    (tensor([0.0278, 5.4444]), tensor([ 0.5000, -0.5000]))
    """

    def pair_losses(self, chosen_logratios, rejected_logratios, chosen_tokens, rejected_tokens) -> Tensor:
        # clamp: a response without tokens has r = 0, so its mean is 0 rather than nan (TRL clamps too)
        chosen_mean = chosen_logratios / chosen_tokens.clamp(min=1)
        rejected_mean = rejected_logratios / rejected_tokens.clamp(min=1)
        return (chosen_mean - rejected_mean - 1 / (2 * self.beta)).square()
