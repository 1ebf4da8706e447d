"""Policy losses: each ``policy_loss_fn``'s original per-token objective and its Tinker built-in.

The learner only knows Tinker's token-SUM built-ins (formulas in ``trinity/engine/losses.py``).
A ``PolicyLoss`` names the built-in that expresses the objective once the ``loss_agg_mode``
scale s is folded into the advantages / CE weights (``loss_plan.py`` folds it):

- ppo (GRPO, RLOO, REINFORCE++, DAPO) -> ``ppo``, thresholds 1 - clip_range_low, 1 + clip_range_high
- importance_sampling                 -> ``importance_sampling`` (-r A)
- cispo                               -> ``cispo``, same thresholds as ppo
- opmd (OPMD, AsymRE)                 -> ``cross_entropy``, w = s A / (1 + tau)
                                         (the original's -A log pi / (1 + tau))
- sft (SFT, RAFT, CPT)                -> ``cross_entropy``, w = s m
- gspo                                -> ``gspo``, thresholds 1 - clip_range_low, 1 + clip_range_high
                                         (the original's 3e-4 / 4e-4), sequence_ratio_mask = m
- rec (clip_mode none, weight none / advantage, no regularizer) -> ``cross_entropy``,
                                         w = s A (or s A exp(A / temp))
- sapo, topr, sppo, rec otherwise     -> custom: their weight or window reads the current ratio
- dpo                                 -> custom: a loss over (chosen, rejected) pairs

The per-token objectives live here too: the custom loss and the metrics evaluate them. Plugins add
losses with ``POLICY_LOSSES.register("name")(PolicyLoss(...))``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from trinity.algorithms.mix import CHORD_DEFAULTS, MIX_DEFAULTS, sft_expert_loss
from trinity.registry import POLICY_LOSSES

LOG_RATIO_CLAMP = 20.0  # the original clamps log(pi / pi_old) before exp; Tinker's built-ins do not


def _ratio(lp: Tensor, q: Tensor) -> Tensor:
    return torch.exp(torch.clamp(lp - q, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


def _ppo_bounds(args: dict[str, Any]) -> tuple[float, float]:
    low = args.get("clip_range_low", args.get("clip_range"))
    high = args.get("clip_range_high", args.get("clip_range"))
    if low is None or high is None:
        raise ValueError("the ppo/cispo policy loss needs clip_range or clip_range_low/high")
    return 1.0 - float(low), 1.0 + float(high)


@dataclass(frozen=True)
class PolicyLoss:
    """A policy loss: its defaults, Tinker built-in, and the original per-token objective.

    ``token_loss(lp, q, A, args)`` is the unaggregated original objective (positively homogeneous
    in A, so scaling A by the aggregation scale scales the loss). ``inputs`` builds the built-in's
    per-token inputs from the already-scaled advantages ``sA`` and scale ``s`` (mask included).
    ``custom_reason`` names an option no built-in expresses (the plan then needs a custom loss);
    ``clipped`` marks the tokens ``pg_clipfrac`` counts. ``builtin`` "custom" means no built-in
    ever expresses the loss. ``pair_loss`` (DPO) replaces the per-token loss by one over pairs of
    datums (even: chosen, odd: rejected), given each one's sum of log pi - log pi_ref.
    ``expert_token_loss(lp, args)`` is set by losses that train expert (SFT) rows of a mixed batch
    differently (MIX / CHORD: ``trinity/algorithms/mix.py``); their batch scales come from
    ``mix.mix_scales``.
    """

    builtin: str
    defaults: dict[str, Any]
    token_loss: Callable[[Tensor, Tensor, Tensor, dict[str, Any]], Tensor]
    inputs: Callable[[Tensor, Tensor, Tensor, dict[str, Any]], dict[str, Tensor]]
    loss_fn_config: Callable[[dict[str, Any]], dict[str, float] | None] = lambda args: None
    custom_reason: Callable[[dict[str, Any], frozenset[str]], str | None] = lambda a, e: None
    clipped: Callable[[Tensor, Tensor, Tensor, dict[str, Any]], Tensor] | None = None
    expert_token_loss: Callable[[Tensor, dict[str, Any]], Tensor] | None = None
    pair_loss: Callable[[Tensor, Tensor, dict[str, Any]], tuple[Tensor, dict]] | None = None
    check_args: Callable[[dict[str, Any]], Any] = lambda args: None  # ValueError: config check


def _rl_inputs(q: Tensor, sA: Tensor, s: Tensor, args: dict[str, Any]) -> dict[str, Tensor]:
    return {"logprobs": torch.where(s != 0, q, torch.zeros_like(q)), "advantages": sA}


def ppo_token_loss(lp: Tensor, q: Tensor, A: Tensor, args: dict[str, Any]) -> Tensor:
    """max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)), and min(., -A c) for A < 0 (dual clip)."""
    lo, hi = _ppo_bounds(args)
    r = _ratio(lp, q)
    loss = torch.maximum(-A * r, -A * torch.clamp(r, lo, hi))
    c = args.get("clip_ratio_c")
    if c is not None:
        loss = torch.where(A < 0, torch.minimum(loss, -A * float(c)), loss)
    return loss


def _ppo_clipped(lp: Tensor, q: Tensor, A: Tensor, args: dict[str, Any]) -> Tensor:
    lo, hi = _ppo_bounds(args)
    r = _ratio(lp, q)
    return (-A * torch.clamp(r, lo, hi)) > (-A * r)


def _ppo_config(args: dict[str, Any]) -> dict[str, float]:
    lo, hi = _ppo_bounds(args)
    return {"clip_low_threshold": lo, "clip_high_threshold": hi}


def _ppo_custom_reason(args: dict[str, Any], explicit: frozenset[str]) -> str | None:
    # clip_ratio_c is not among the defaults, so it is present only when the user set it
    return "dual clip (clip_ratio_c)" if args.get("clip_ratio_c") is not None else None


def cispo_token_loss(lp: Tensor, q: Tensor, A: Tensor, args: dict[str, Any]) -> Tensor:
    """-A sg(clip(r, lo, hi)) log pi, optionally zeroed where the ratio left the mask range."""
    lo, hi = _ppo_bounds(args)
    r = _ratio(lp, q)
    loss = -A * torch.clamp(r, lo, hi).detach() * lp
    if args.get("enable_mask_clip"):
        m_lo = 1.0 - float(args.get("mask_clip_range_low", 1.0))
        m_hi = 1.0 + float(args.get("mask_clip_range_high", 0.28))
        drop = ((r > m_hi) & (A > 0)) | ((r < m_lo) & (A < 0))
        loss = torch.where(drop.detach(), torch.zeros_like(loss), loss)
    return loss


def _cispo_clipped(lp: Tensor, q: Tensor, A: Tensor, args: dict[str, Any]) -> Tensor:
    lo, hi = _ppo_bounds(args)
    r = _ratio(lp, q)
    return (r < lo) | (r > hi)


def opmd_token_loss(lp: Tensor, q: Tensor, A: Tensor, args: dict[str, Any]) -> Tensor:
    """-A log pi / (1 + tau): no ratio, no clip; the (1 + tau) is the original's regularizer."""
    return -A * lp / (1.0 + float(args.get("tau", 1.0)))


def sft_token_loss(lp: Tensor, q: Tensor, A: Tensor, args: dict[str, Any]) -> Tensor:
    return -lp


def is_token_loss(lp: Tensor, q: Tensor, A: Tensor, args: dict[str, Any]) -> Tensor:
    return -A * _ratio(lp, q)


POLICY_LOSSES.register("ppo")(
    PolicyLoss(
        "ppo",
        {"clip_range": 0.2},
        ppo_token_loss,
        _rl_inputs,
        _ppo_config,
        _ppo_custom_reason,
        _ppo_clipped,
    )
)
POLICY_LOSSES.register("cispo")(
    PolicyLoss(
        "cispo",
        {"clip_range_low": 1.0, "clip_range_high": 0.28, "enable_mask_clip": False},
        cispo_token_loss,
        _rl_inputs,
        _ppo_config,
        lambda args, explicit: "CISPO mask clip" if args.get("enable_mask_clip") else None,
        _cispo_clipped,
    )
)
POLICY_LOSSES.register("importance_sampling")(
    PolicyLoss("importance_sampling", {}, is_token_loss, _rl_inputs)
)
POLICY_LOSSES.register("opmd")(
    PolicyLoss(
        "cross_entropy",
        {"tau": 1.0},
        opmd_token_loss,
        lambda q, sA, s, args: {"weights": sA / (1.0 + float(args.get("tau", 1.0)))},
    )
)
POLICY_LOSSES.register("sft")(
    PolicyLoss("cross_entropy", {}, sft_token_loss, lambda q, sA, s, args: {"weights": s})
)
for _name, _defaults in (("mix", MIX_DEFAULTS), ("mix_chord", CHORD_DEFAULTS)):
    POLICY_LOSSES.register(_name)(
        PolicyLoss(
            "cross_entropy",  # the surrogate: no built-in mixes two losses
            _defaults,
            ppo_token_loss,
            _rl_inputs,
            custom_reason=lambda args, explicit: "MIX: an SFT loss on expert rows",
            clipped=_ppo_clipped,
            expert_token_loss=sft_expert_loss,
        )
    )


# -- the losses the original adds for GSPO, SAPO, TOPR, SPPO, REC and DPO ------------------------


def _seq_log_ratio(lp: Tensor, q: Tensor) -> Tensor:
    """mean(lp - q) over one datum's masked tokens, detached (``objective`` passes one datum)."""
    return (lp - q).detach().mean() if lp.numel() else lp.new_zeros(())


def gspo_token_loss(lp: Tensor, q: Tensor, A: Tensor, args: dict[str, Any]) -> Tensor:
    """GSPO-token: r = exp(sg(s) + lp - sg(lp)), s the sequence's mean log-ratio; PPO's clip on r."""
    lo, hi = _ppo_bounds(args)
    r = torch.exp(_seq_log_ratio(lp, q) + lp - lp.detach())
    return torch.maximum(-A * r, -A * torch.clamp(r, lo, hi))


def _gspo_clipped(lp: Tensor, q: Tensor, A: Tensor, args: dict[str, Any]) -> Tensor:
    lo, hi = _ppo_bounds(args)
    r = torch.exp(_seq_log_ratio(lp, q)).expand_as(lp)
    return (-A * torch.clamp(r, lo, hi)) > (-A * r)


def _gspo_inputs(q: Tensor, sA: Tensor, s: Tensor, args: dict[str, Any]) -> dict[str, Tensor]:
    # the built-in's default mask (nonzero advantages) would drop a sequence's zero-A tokens from
    # its mean; the original averages over the response mask
    return {**_rl_inputs(q, sA, s, args), "sequence_ratio_mask": (s != 0).float()}


def sapo_token_loss(lp: Tensor, q: Tensor, A: Tensor, args: dict[str, Any]) -> Tensor:
    """-A sg(f) log pi, f = sigmoid(tau (r - 1)) * 4 / tau, tau = tau_pos for A > 0 else tau_neg."""
    r = _ratio(lp, q).detach()
    tau = torch.where(A > 0, float(args.get("tau_pos", 1.0)), float(args.get("tau_neg", 1.05)))
    return -A * (torch.sigmoid(tau * (r - 1.0)) * 4.0 / tau) * lp


def topr_token_loss(lp: Tensor, q: Tensor, A: Tensor, args: dict[str, Any]) -> Tensor:
    """-sg(alpha) A log pi, alpha = clip(r, 0, 1) where A <= advantage_threshold, else 1."""
    r = _ratio(lp, q).detach()
    negative = A <= float(args.get("advantage_threshold", 0.0))
    alpha = torch.where(negative, torch.clamp(r, 0.0, 1.0), torch.ones_like(r))
    return -alpha * A * lp


def _topr_clipped(lp: Tensor, q: Tensor, A: Tensor, args: dict[str, Any]) -> Tensor:
    return (A <= float(args.get("advantage_threshold", 0.0))) & (_ratio(lp, q) > 1.0)


def _sppo_in_range(lp: Tensor, q: Tensor, args: dict[str, Any]) -> Tensor:
    eps = float(args.get("epsilon", 0.3))
    r = _ratio(lp, q).detach()
    return (r >= 1.0 / (1.0 + eps)) & (r <= 1.0 + eps)


def sppo_token_loss(lp: Tensor, q: Tensor, A: Tensor, args: dict[str, Any]) -> Tensor:
    """-A (log pi - log pi_old) on tokens whose ratio lies in [1 / (1 + eps), 1 + eps]."""
    return -A * (lp - q) * _sppo_in_range(lp, q, args)


REC_CLIP_MODES = ("none", "one-side", "gspo-one-side", "two-side", "ring")
REC_WEIGHTS = ("none", "importance_sampling", "gspo_importance_sampling", "advantage")
REC_REGULARIZERS = ("none", "k2", "forward-kl")


def _rec_args(args: dict[str, Any]) -> tuple[str, str, str]:
    modes = (args.get("clip_mode", "none"), args.get("weight", "none"), args.get("regularizer"))
    for key, value, allowed in zip(
        ("clip_mode", "weight", "regularizer"),
        (*modes[:2], modes[2] or "none"),
        (REC_CLIP_MODES, REC_WEIGHTS, REC_REGULARIZERS),
        strict=True,
    ):
        if value not in allowed:
            raise ValueError(
                f"algorithm.policy_loss_fn_args.{key} must be one of {', '.join(allowed)}, "
                f"got {value!r}"
            )
    return modes[0], modes[1], modes[2] or "none"


def _rec_kept(lp: Tensor, q: Tensor, A: Tensor, args: dict[str, Any]) -> Tensor:
    clip_mode, _, _ = _rec_args(args)
    lo, hi = float(args.get("epsilon_low", 0.2)), float(args.get("epsilon_high", 0.2))
    r = _ratio(lp, q).detach()
    if clip_mode == "none":
        return torch.ones_like(r, dtype=torch.bool)
    if clip_mode == "gspo-one-side":
        r = torch.exp(_seq_log_ratio(lp, q)).expand_as(r)
    two_side = (r >= 1 - lo) & (r <= 1 + hi)
    one_side = ((A >= 0) & (r <= 1 + hi)) | ((A <= 0) & (r >= 1 - lo))
    if clip_mode in ("one-side", "gspo-one-side"):
        return one_side
    if clip_mode == "two-side":
        return two_side
    lo_p = float(args.get("epsilon_low_prime", 0.6))
    hi_p = float(args.get("epsilon_high_prime", 2.0))
    return two_side | ((A >= 0) & (r <= 1 - lo_p)) | ((A <= 0) & (r >= 1 + hi_p))


def rec_token_loss(lp: Tensor, q: Tensor, A: Tensor, args: dict[str, Any]) -> Tensor:
    """REC: -w(A) log pi on the tokens ``clip_mode`` keeps, plus the regularizer.

    w: A (none), A r (importance_sampling), A s (gspo_importance_sampling, s the sequence
    ratio), A exp(A / temp) (advantage); r, s detached. Regularizers: forward-kl -c log pi,
    k2 +c (log pi - log pi_old)^2.
    """
    _, weight, regularizer = _rec_args(args)
    kept = _rec_kept(lp, q, A, args)
    if weight == "importance_sampling":
        A = A * _ratio(lp, q).detach()
    elif weight == "gspo_importance_sampling":
        A = A * torch.exp(_seq_log_ratio(lp, q))
    elif weight == "advantage":
        A = A * torch.exp(A / float(args.get("temp", 1.0)))
    loss = -A * lp * kept
    c = float(args.get("regularizer_coef", 0.0))
    if regularizer == "forward-kl":
        loss = loss - c * lp
    elif regularizer == "k2":
        loss = loss + c * (lp - q) ** 2
    return loss


def _rec_custom_reason(args: dict[str, Any], explicit: frozenset[str]) -> str | None:
    """REC is a weighted CE unless its clip or weight reads the current ratio, or it regularizes."""
    clip_mode, weight, regularizer = _rec_args(args)
    if clip_mode != "none" or weight not in ("none", "advantage"):
        return f"REC clip_mode={clip_mode}, weight={weight}"
    if regularizer != "none" and float(args.get("regularizer_coef", 0.0)):
        return f"REC regularizer {regularizer}"
    return None


def _rec_inputs(q: Tensor, sA: Tensor, s: Tensor, args: dict[str, Any]) -> dict[str, Tensor]:
    if args.get("weight", "none") == "advantage":  # A exp(A / temp), with A = sA / s
        A = torch.where(s != 0, sA / torch.where(s != 0, s, 1.0), 0.0)
        sA = sA * torch.exp(A / float(args.get("temp", 1.0)))
    return {"weights": sA}


def dpo_pair_loss(
    chosen_B: Tensor, rejected_B: Tensor, args: dict[str, Any]
) -> tuple[Tensor, dict[str, float]]:
    """DPO over pairs: chosen / rejected are sum(log pi - log pi_ref) over each response.

    L = mean over pairs of -(1 - ls) log sigmoid(beta D) - ls log sigmoid(-beta D), D = chosen -
    rejected; metrics: the implicit rewards beta * (.) and their margin and accuracy.
    """
    beta, ls = float(args.get("beta", 0.1)), float(args.get("label_smoothing", 0.0))
    logits = beta * (chosen_B - rejected_B)
    loss_B = -(1 - ls) * torch.nn.functional.logsigmoid(logits) - ls * (
        torch.nn.functional.logsigmoid(-logits)
    )
    with torch.no_grad():
        metrics = {
            "chosen_reward": float((beta * chosen_B).mean()),
            "rejected_reward": float((beta * rejected_B).mean()),
            "reward_margin": float(logits.mean()),
            "reward_accuracy": float((logits > 0).float().mean()),
        }
    return loss_B.mean(), metrics


def _no_token_loss(lp: Tensor, q: Tensor, A: Tensor, args: dict[str, Any]) -> Tensor:
    raise TypeError("DPO's loss is over pairs of sequences (dpo_pair_loss), not per token")


def _always(reason: str) -> Callable[[dict[str, Any], frozenset[str]], str]:
    return lambda args, explicit: reason


POLICY_LOSSES.register("gspo")(
    PolicyLoss(
        "gspo",
        {"clip_range_low": 3e-4, "clip_range_high": 4e-4},
        gspo_token_loss,
        _gspo_inputs,
        _ppo_config,
        clipped=_gspo_clipped,
    )
)
POLICY_LOSSES.register("sapo")(
    PolicyLoss(
        "custom",
        {"tau_pos": 1.0, "tau_neg": 1.05},
        sapo_token_loss,
        _rl_inputs,
        custom_reason=_always("SAPO's soft gate reads the current ratio"),
    )
)
POLICY_LOSSES.register("topr")(
    PolicyLoss(
        "custom",
        {"advantage_threshold": 0.0},
        topr_token_loss,
        _rl_inputs,
        custom_reason=_always("TOPR's truncated weight reads the current ratio"),
        clipped=_topr_clipped,
    )
)
POLICY_LOSSES.register("sppo")(
    PolicyLoss(
        "custom",
        {"epsilon": 0.3},
        sppo_token_loss,
        _rl_inputs,
        custom_reason=_always("SPPO's ratio window reads the current ratio"),
        clipped=lambda lp, q, A, args: ~_sppo_in_range(lp, q, args),
    )
)
POLICY_LOSSES.register("rec")(
    PolicyLoss(
        "cross_entropy",
        {
            "epsilon_low": 0.2,
            "epsilon_high": 0.2,
            "epsilon_low_prime": 0.6,
            "epsilon_high_prime": 2.0,
            "clip_mode": "none",
            "weight": "none",
            "regularizer": "none",
            "regularizer_coef": 0.0,
            "temp": 1.0,
        },
        rec_token_loss,
        _rec_inputs,
        custom_reason=_rec_custom_reason,
        clipped=lambda lp, q, A, args: ~_rec_kept(lp, q, A, args),
        check_args=_rec_args,
    )
)
POLICY_LOSSES.register("dpo")(
    PolicyLoss(
        "custom",
        {"beta": 0.1, "label_smoothing": 0.0},
        _no_token_loss,
        _rl_inputs,
        custom_reason=_always("DPO compares pairs of sequences"),
        pair_loss=dpo_pair_loss,
    )
)
