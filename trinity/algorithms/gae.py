"""PPO's critic side, pure: GAE advantages and returns, and the clipped value loss.

``algorithm_type: ppo`` (``advantage_fn: ppo``) is the only algorithm whose advantages need a
learned value per response token. The trainer's critic (``trinity/trainer/critic.py``) computes
the values before the policy update, runs ``gae_advantages`` over the training batch and trains
on ``clipped_value_loss``. Sequences are unpadded, one tensor per experience; response tokens
outside the loss mask (a multi-turn episode's environment turns) have value 0, as veRL's critic
masks them, and still carry the recursion.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from trinity.algorithms.advantages import sequence_token_rewards
from trinity.registry import BATCH_ADVANTAGE_FNS


def masked_whiten(
    values: Sequence[Tensor], masks: Sequence[Tensor], eps: float = 1e-8
) -> list[Tensor]:
    """veRL's ``masked_whiten`` over a whole batch: ``(x - mean) / sqrt(var + eps)`` with the
    mean and unbiased variance of the masked entries (mean shifted back out)."""
    flat = torch.cat([v.reshape(-1) for v in values]) if values else torch.zeros(0)
    flat_mask = torch.cat([m.reshape(-1) for m in masks]) if masks else flat
    n = float(flat_mask.sum())
    if n == 0:
        return [torch.zeros_like(v) for v in values]
    mean = (flat * flat_mask).sum() / n
    var = (((flat - mean) ** 2) * flat_mask).sum() / n
    if n > 1:
        var = var * n / (n - 1)
    return [(v - mean) * torch.rsqrt(var + eps) for v in values]


@BATCH_ADVANTAGE_FNS.register("ppo")
def gae_advantages(
    rewards: Sequence[float],
    masks: Sequence[Tensor | Sequence[float]],
    values: Sequence[Tensor | Sequence[float]] | None = None,
    kl: Sequence[Tensor] | None = None,
    kl_coef: float = 0.0,
    gamma: float = 1.0,
    lam: float = 1.0,
    eps: float = 1e-8,
) -> tuple[list[Tensor], list[Tensor]]:
    """Generalized advantage estimation (Schulman et al. 2016), as veRL's ``gae`` estimator.

    Per sequence with response values ``V_t`` (zeroed outside the mask): token rewards are
    ``-kl_coef * kl_t * m_t`` plus the scalar reward on the last response token;
    ``delta_t = r_t + gamma * V_{t+1} - V_t`` (``V_T = 0``), ``A_t = delta_t + gamma * lam *
    A_{t+1}``, returns ``R = A + V``; the advantages are then whitened over every masked token of
    the batch and multiplied by the mask. Returns ``(advantages, returns)``.
    """
    if values is None:
        raise ValueError(
            "advantage_fn 'ppo' (GAE) needs the critic's values: only algorithm_type 'ppo' "
            "trains a critic"
        )
    if len(values) != len(masks) or (kl is not None and len(kl) != len(masks)):
        raise ValueError("need one values (and KL) tensor per sequence")
    ms = [torch.as_tensor(m, dtype=torch.float32).reshape(-1) for m in masks]
    raw, returns = [], []
    for i, (reward, m) in enumerate(zip(rewards, ms, strict=True)):
        v = torch.as_tensor(values[i], dtype=torch.float32).reshape(-1) * m
        if v.numel() != m.numel():
            raise ValueError(f"sequence {i}: {v.numel()} values for {m.numel()} response tokens")
        token_rewards = sequence_token_rewards(reward, m, None if kl is None else kl[i], kl_coef)
        adv = torch.zeros_like(m)
        last, next_value = 0.0, 0.0
        for t in range(m.numel() - 1, -1, -1):
            delta = token_rewards[t] + gamma * next_value - v[t]
            last = delta + gamma * lam * last
            adv[t] = last
            next_value = v[t]
        raw.append(adv)
        returns.append(adv + v)
    advantages = [a * m for a, m in zip(masked_whiten(raw, ms, eps), ms, strict=True)]
    return advantages, returns


def clipped_value_loss(
    vpreds: Tensor, old_values: Tensor, returns: Tensor, scale: Tensor, cliprange_value: float
) -> tuple[Tensor, Tensor]:
    """veRL's value loss for one sequence's tokens: ``0.5 * sum(scale * max((V - R)^2,
    (clip(V, V_old - c, V_old + c) - R)^2))``; ``scale`` is ``loss_agg_mode``'s token scale
    (``aggregation.token_scales``), so the sum over a batch is the original's aggregate. Also
    returns the per-token indicator that the clipped term won (veRL's ``vf_clipfrac``).

    At a tie (``V == V_old``, as on the first pass over a batch) both terms have the unclipped
    gradient, so the loss's gradient is the plain squared error's."""
    clipped = torch.clamp(vpreds, old_values - cliprange_value, old_values + cliprange_value)
    loss1 = (vpreds - returns) ** 2
    loss2 = (clipped - returns) ** 2
    return 0.5 * (scale * torch.maximum(loss1, loss2)).sum(), (loss2 > loss1).float()
