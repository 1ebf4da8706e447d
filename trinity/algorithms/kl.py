"""Per-token KL estimators between the policy and the reference, and entropy helpers.

KL functions take per-token ``logprobs`` (policy, differentiable) and ``ref_logprobs`` and return
a per-token tensor; aggregation is the caller's (``aggregation.token_scales``). Names follow the
original's ``kl_loss_fn`` / ``kl_penalty_fn`` values.
"""

from __future__ import annotations

import torch
from torch import Tensor

from trinity.registry import KL_FNS


@KL_FNS.register("none")
def kl_none(logprobs: Tensor, ref_logprobs: Tensor, old_logprobs: Tensor | None = None) -> Tensor:
    return torch.zeros_like(logprobs)


@KL_FNS.register("k1")
def kl_k1(logprobs: Tensor, ref_logprobs: Tensor, old_logprobs: Tensor | None = None) -> Tensor:
    """log pi - log pi_ref: unbiased for KL(pi || ref) on samples of pi, but signed per token."""
    return logprobs - ref_logprobs


@KL_FNS.register("k2")
def kl_k2(logprobs: Tensor, ref_logprobs: Tensor, old_logprobs: Tensor | None = None) -> Tensor:
    """1/2 (log pi - log pi_ref)^2: its gradient is the KL gradient's on-policy estimate."""
    return 0.5 * (logprobs - ref_logprobs).square()


@KL_FNS.register("k3")
def kl_k3(logprobs: Tensor, ref_logprobs: Tensor, old_logprobs: Tensor | None = None) -> Tensor:
    """exp(ref - lp) - 1 - (ref - lp): unbiased and non-negative (Schulman's k3)."""
    log_ratio = ref_logprobs - logprobs
    return log_ratio.exp() - 1 - log_ratio


@KL_FNS.register("low_var_kl")
def kl_low_var(
    logprobs: Tensor, ref_logprobs: Tensor, old_logprobs: Tensor | None = None
) -> Tensor:
    """k3 with veRL's clamps (log ratio to [-20, 20], value to [-10, 10]) for stability."""
    log_ratio = torch.clamp(ref_logprobs - logprobs, -20.0, 20.0)
    return torch.clamp(log_ratio.exp() - 1 - log_ratio, -10.0, 10.0)


@KL_FNS.register("abs")
def kl_abs(logprobs: Tensor, ref_logprobs: Tensor, old_logprobs: Tensor | None = None) -> Tensor:
    return (logprobs - ref_logprobs).abs()


@KL_FNS.register("corrected_k3")
def kl_corrected_k3(
    logprobs: Tensor, ref_logprobs: Tensor, old_logprobs: Tensor | None = None
) -> Tensor:
    """k3 importance-weighted by pi / pi_old: unbiased when tokens were sampled from pi_old."""
    if old_logprobs is None:
        raise ValueError("corrected_k3 needs the sampler (old) logprobs")
    return torch.exp(logprobs - old_logprobs) * kl_k3(logprobs, ref_logprobs)


def kl(
    name: str, logprobs: Tensor, ref_logprobs: Tensor, old_logprobs: Tensor | None = None
) -> Tensor:
    return KL_FNS.get(name)(logprobs, ref_logprobs, old_logprobs)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Exact per-position entropy -sum p log p over the vocabulary (last dim)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def sampled_entropy(logprobs: Tensor) -> Tensor:
    """Entropy from sampled-token logprobs only (all a custom Tinker loss sees).

    Value: -log pi(y), an unbiased estimate of H when y ~ pi. Gradient: -log pi(y) * grad log pi(y),
    the score-function estimate of grad H (E[grad log pi] = 0 removes the +1 term). The original
    used -p log p of the sampled token, which is neither; exact entropy needs full-vocab logits
    (the engine's ``return_entropy`` extension reports it, see ``entropy_from_logits``).
    """
    detached = logprobs.detach()
    return -detached - detached * (logprobs - detached)


def original_entropy_estimate(logprobs: Tensor) -> Tensor:
    """The original Tinker trainer's estimate, -p log p of the sampled token (kept for comparison)."""
    return -(logprobs.exp() * logprobs)
