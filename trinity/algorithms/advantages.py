"""Advantage functions, computed client-side (explorer or trainer), never by the learner.

Group functions map the scalar rewards of one task's samples, ``rewards_G``, to one advantage per
sample; the explorer broadcasts it over the sample's response tokens (``group_advantage_fn``).
``reinforce_plus_plus`` is batch-level (returns are whitened over every response token of the
batch), so the trainer runs it on the training batch before building datums
(``set_batch_advantages``), where reference logprobs for its KL penalty are also at hand.

Everything works on plain tensors / lists so the layer stays below ``trinity.workflows``; the
experience-level adapters only duck-type ``reward``, ``group_id``, ``loss_mask``, ``advantages``
(and ``logprobs`` for the KL penalty).
"""

from __future__ import annotations

import copy
import inspect
import math
import random
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from trinity.registry import ADVANTAGE_FNS, ALGORITHMS, BATCH_ADVANTAGE_FNS, KL_FNS


def _as_tensor(rewards_G: Sequence[float] | Tensor) -> Tensor:
    return torch.as_tensor(rewards_G, dtype=torch.float32).reshape(-1)


@ADVANTAGE_FNS.register("grpo")
def grpo_advantages(rewards_G: Sequence[float] | Tensor, epsilon: float = 1e-6) -> Tensor:
    """A = (r - mean) / (std + eps), torch's unbiased std; a lone sample keeps A = r (mean 0, std 1).

    A group whose rewards are all equal gets exactly 0: in float32 the rounding residue of
    ``r - mean`` (~1e-9) divided by ``std + eps`` (~1e-6) would otherwise be a constant ~0.007
    that pushes every response up.
    """
    r = _as_tensor(rewards_G)
    if r.numel() == 1:
        return r.clone()
    if bool((r == r[0]).all()):
        return torch.zeros_like(r)
    return (r - r.mean()) / (r.std() + epsilon)


@ADVANTAGE_FNS.register("opmd")
def opmd_advantages(
    rewards_G: Sequence[float] | Tensor, opmd_baseline: str = "mean", tau: float = 1.0
) -> Tensor:
    """A = r - b with b the group mean or tau * log(mean(exp(r / tau))); no std normalization.

    A lone sample uses b = 0, as the original does.
    """
    r = _as_tensor(rewards_G)
    if r.numel() == 1:
        return r.clone()
    if opmd_baseline == "mean":
        baseline = r.mean()
    elif opmd_baseline == "logavgexp":
        baseline = tau * (torch.logsumexp(r / tau, dim=0) - math.log(r.numel()))
    else:
        raise ValueError(f"opmd_baseline must be 'mean' or 'logavgexp', got {opmd_baseline!r}")
    return r - baseline


@ADVANTAGE_FNS.register("rloo")
def rloo_advantages(rewards_G: Sequence[float] | Tensor) -> Tensor:
    """A_i = r_i - mean of the other samples' rewards (leave-one-out); a lone sample keeps A = r."""
    r = _as_tensor(rewards_G)
    n = r.numel()
    if n == 1:
        return r.clone()
    return r - (r.sum() - r) / (n - 1)


@ADVANTAGE_FNS.register("asymre")
def asymre_advantages(rewards_G: Sequence[float] | Tensor, baseline_shift: float = -0.1) -> Tensor:
    """A = r - (mean + shift): a shifted baseline makes positive and negative samples asymmetric."""
    r = _as_tensor(rewards_G)
    if r.numel() == 1:
        return r.clone()
    return r - (r.mean() + baseline_shift)


@ADVANTAGE_FNS.register("reinforce")
def reinforce_advantages(rewards_G: Sequence[float] | Tensor) -> Tensor:
    """A = r: plain REINFORCE, no baseline."""
    return _as_tensor(rewards_G).clone()


@ADVANTAGE_FNS.register("grpo_verl")
def grpo_verl_advantages(rewards_G: Sequence[float] | Tensor, epsilon: float = 1e-6) -> Tensor:
    """The original's in-trainer GRPO: the same group statistics, so computed by the explorer."""
    return grpo_advantages(rewards_G, epsilon)


@ADVANTAGE_FNS.register("rec")
def rec_advantages(
    rewards_G: Sequence[float] | Tensor,
    epsilon: float = 1e-6,
    std_normalize: bool = False,
    drop: str | None = None,
    rng: random.Random | None = None,
) -> Tensor:
    """REC: A = r - mean (divided by population std + eps with ``std_normalize``).

    ``drop: balance`` first zeroes randomly chosen negatives (r < mean) beyond the number of
    positives; mean and std are then taken over the samples kept. A lone sample gets 0.
    """
    if drop not in (None, "none", "balance"):
        raise ValueError(f"advantage_fn_args.drop must be null or 'balance', got {drop!r}")
    r = _as_tensor(rewards_G)
    kept = torch.ones_like(r, dtype=torch.bool)
    if drop == "balance":
        negatives = (r < r.mean()).nonzero().flatten().tolist()
        surplus = len(negatives) - int((r >= r.mean()).sum())
        if surplus > 0:
            kept[(rng or random).sample(negatives, surplus)] = False
    mean = r[kept].mean()
    advantages = r - mean
    if std_normalize:
        advantages = advantages / (r[kept].std(unbiased=False) + epsilon)
    return torch.where(kept, advantages, torch.zeros_like(r))


def compute_advantages(
    advantage_fn: str,
    rewards_by_group: Mapping[Hashable, Sequence[float]],
    std_threshold: float | None = None,
    rng: random.Random | None = None,
    **fn_args: Any,
) -> tuple[dict[Hashable, Tensor], dict[str, float]]:
    """Run a group advantage function over every group.

    ``std_threshold`` (GRPO's option, honoured for any group function) drops groups whose reward
    std is at or below it, and lone samples, as the original does: their advantages would carry no
    signal. Dropped groups are absent from the returned dict. Metrics use the original names.
    ``rng`` goes to functions that draw (``rec``'s ``drop: balance``).
    ``advantage_fn`` may also name an algorithm (``dapo`` -> its ``grpo``).
    """
    if advantage_fn not in ADVANTAGE_FNS:
        if advantage_fn in ALGORITHMS and ALGORITHMS.get(advantage_fn).advantage_fn:
            advantage_fn = ALGORITHMS.get(advantage_fn).advantage_fn
    fn = ADVANTAGE_FNS.get(advantage_fn)
    if rng is not None and "rng" in inspect.signature(fn).parameters:  # REC's random drop
        fn_args = {**fn_args, "rng": rng}
    advantages: dict[Hashable, Tensor] = {}
    means, stds, dropped = [], [], 0
    for key, rewards in rewards_by_group.items():
        r = _as_tensor(rewards)
        std = r.std() if r.numel() > 1 else torch.tensor(0.0)
        means.append(float(r.mean()))
        stds.append(float(std))
        if std_threshold is not None and (r.numel() == 1 or float(std) <= std_threshold):
            dropped += r.numel()
            continue
        advantages[key] = fn(r, **fn_args)
    metrics: dict[str, float] = {}
    if means:
        metrics["group_advantages/reward_mean"] = sum(means) / len(means)
        metrics["group_advantages/reward_std"] = sum(stds) / len(stds)
    if std_threshold is not None:
        metrics["group_advantages/filtered_count"] = float(dropped)
    return advantages, metrics


def sequence_token_rewards(reward: float, m: Tensor, kl: Tensor | None, kl_coef: float) -> Tensor:
    """Per-token rewards of one response (mask ``m``): ``-kl_coef * kl * m``, plus the sequence
    reward on the last response token (REINFORCE++ and PPO's GAE, as veRL)."""
    token_rewards = torch.zeros_like(m)
    if kl is not None and kl_coef:
        token_rewards = token_rewards - kl_coef * torch.as_tensor(kl, dtype=torch.float32) * m
    if m.numel():
        token_rewards[-1] += float(reward)
    return token_rewards


@BATCH_ADVANTAGE_FNS.register("reinforceplusplus")
def reinforce_plus_plus_advantages(
    rewards: Sequence[float],
    masks: Sequence[Tensor],
    kl: Sequence[Tensor] | None = None,
    kl_coef: float = 0.0,
    gamma: float = 1.0,
    eps: float = 1e-8,
) -> tuple[list[Tensor], list[Tensor]]:
    """REINFORCE++ (arXiv 2501.03262, as in veRL): token rewards, returns, batch whitening.

    Per sequence i with response mask m_i: the token reward is ``-kl_coef * kl_i * m_i`` plus the
    scalar reward on the last response token; the return is the discounted reverse cumulative sum
    (gamma = 1 by default); advantages are the returns whitened over every masked token of the
    batch (mean, unbiased variance, ``(x - mean) / sqrt(var + eps)``) and multiplied by the mask.
    Sequences are unpadded here, so veRL's reset-after-EOS has nothing to do. Returns
    ``(advantages, returns)``, one tensor per sequence.
    """
    if kl is not None and len(kl) != len(masks):
        raise ValueError("need one KL tensor per sequence")
    returns: list[Tensor] = []
    for i, (reward, mask) in enumerate(zip(rewards, masks, strict=True)):
        m = torch.as_tensor(mask, dtype=torch.float32)
        token_rewards = sequence_token_rewards(reward, m, None if kl is None else kl[i], kl_coef)
        ret = torch.zeros_like(m)
        running = 0.0
        for t in range(m.numel() - 1, -1, -1):
            running = token_rewards[t] + gamma * running
            ret[t] = running
        returns.append(ret)
    flat_ret = torch.cat(returns) if returns else torch.zeros(0)
    flat_mask = (
        torch.cat([torch.as_tensor(m, dtype=torch.float32) for m in masks]) if masks else flat_ret
    )
    n = float(flat_mask.sum())
    if n == 0:
        return [torch.zeros_like(r) for r in returns], returns
    mean = (flat_ret * flat_mask).sum() / n
    var = (((flat_ret - mean) ** 2) * flat_mask).sum() / n
    if n > 1:
        var = var * n / (n - 1)  # unbiased, like veRL's masked_whiten
    advantages = [
        (r - mean) * torch.rsqrt(var + eps) * torch.as_tensor(m, dtype=torch.float32)
        for r, m in zip(returns, masks, strict=True)
    ]
    return advantages, returns


def set_batch_advantages(
    experiences: Sequence[Any],
    advantage_fn: str,
    advantage_fn_args: Mapping[str, Any] | None = None,
    ref_logprobs: Sequence[Sequence[float]] | None = None,
    kl_penalty_fn: str = "none",
    kl_coef: float = 0.0,
) -> list[Tensor]:
    """The trainer's step for a batch-level ``advantage_fn``: set every ``exp.advantages``.

    Runs the function over the whole training batch (rewards and loss masks) and returns the
    per-experience advantages it wrote. With ``kl_coef`` and ``ref_logprobs`` (one list of response
    logprobs per experience) the per-token ``kl_penalty_fn`` between the sampler's and the
    reference's logprobs is the function's KL penalty in the token rewards.
    """
    masks = [_as_tensor(exp.loss_mask) for exp in experiences]
    kl = None
    if kl_coef and ref_logprobs is not None:
        kl_fn = KL_FNS.get(kl_penalty_fn)
        kl = [
            kl_fn(_as_tensor(exp.logprobs), _as_tensor(ref))
            for exp, ref in zip(experiences, ref_logprobs, strict=True)
        ]
    advantages, _ = BATCH_ADVANTAGE_FNS.get(advantage_fn)(
        [float(exp.reward) for exp in experiences],
        masks,
        kl=kl,
        kl_coef=kl_coef,
        **(advantage_fn_args or {}),
    )
    for exp, adv in zip(experiences, advantages, strict=True):
        exp.advantages = adv.tolist()
    return advantages


def episodes_of(experiences: Sequence[Any]) -> dict[tuple[Hashable, Hashable], list[Any]]:
    """Experiences by episode, in order: (group, ``info["run"]``) -> its turns. The group is
    ``group_id`` (falling back to ``task_id``); an experience without a run is its own episode
    (a single-turn workflow's sample)."""
    episodes: dict[tuple[Hashable, Hashable], list[Any]] = {}
    for exp in experiences:
        key = (exp.group_id or exp.task_id, exp.info.get("run", id(exp)))
        episodes.setdefault(key, []).append(exp)
    return episodes


def group_advantage_fn(
    advantage_fn: str,
    advantage_fn_args: Mapping[str, Any] | None = None,
    seed: int | None = None,
) -> Callable[[list[Any]], dict[str, float]]:
    """The explorer's hook: set ``exp.advantages`` for a list of experiences, in place.

    Groups by ``group_id`` (falling back to ``task_id``). Dropped groups (``std_threshold``) are
    removed from the list in place; with ``duplicate_experiences`` random surviving groups are
    deep-copied to keep the batch size (Polaris). Batch-level functions (REINFORCE++) are the
    trainer's step (``set_batch_advantages``), so the hook does nothing for them.
    """
    args = dict(advantage_fn_args or {})
    std_threshold = args.pop("std_threshold", None)
    duplicate = bool(args.pop("duplicate_experiences", False))
    for unsupported in ("rank_penalty", "std_cal_level"):
        if args.pop(unsupported, None) not in (None, "group"):
            raise ValueError(f"advantage_fn_args.{unsupported} is not supported")
    rng = random.Random(seed)

    def apply(experiences: list[Any]) -> dict[str, float]:
        if advantage_fn in BATCH_ADVANTAGE_FNS:
            return {}
        groups: dict[Hashable, list[Any]] = {}
        for exp in experiences:
            groups.setdefault(exp.group_id or exp.task_id, []).append(exp)
        rewards = {key: [float(e.reward) for e in group] for key, group in groups.items()}
        advantages, metrics = compute_advantages(
            advantage_fn, rewards, std_threshold=std_threshold, rng=rng, **args
        )
        kept: list[Any] = []
        for key, group in groups.items():
            if key not in advantages:
                continue
            for exp, a in zip(group, advantages[key].tolist(), strict=True):
                exp.advantages = [a * float(m) for m in exp.loss_mask]
            kept.extend(group)
        if duplicate and std_threshold is not None and advantages and len(advantages) < len(groups):
            survivors = [groups[key] for key in advantages]
            for _ in range(len(groups) - len(advantages)):
                kept.extend(copy.deepcopy(rng.choice(survivors)))
        experiences[:] = kept
        return metrics

    return apply
