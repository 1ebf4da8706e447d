"""Policy losses: each ``policy_loss_fn``'s original per-token objective and its Tinker built-in.

The learner only knows Tinker's token-SUM built-ins (formulas in ``trinity/engine/losses.py``).
A ``PolicyLoss`` names the built-in that expresses the objective once the ``loss_agg_mode``
scale s is folded into the advantages / CE weights (``loss_plan.py`` folds it):

- ppo (GRPO, RLOO, REINFORCE++, DAPO) -> ``ppo``, thresholds 1 - clip_range_low, 1 + clip_range_high
- importance_sampling                 -> ``importance_sampling`` (-r A)
- cispo                               -> ``cispo``, same thresholds as ppo
- opmd (OPMD, AsymRE)                 -> ``cross_entropy``, w = s A / (1 + tau)
                                         (the original's -A log pi / (1 + tau))
- sft (SFT, RAFT)                     -> ``cross_entropy``, w = s m

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
    ``clipped`` marks the tokens ``pg_clipfrac`` counts. ``expert_token_loss(lp, args)`` is set
    by losses that train expert (SFT) rows of a mixed batch differently (MIX / CHORD:
    ``trinity/algorithms/mix.py``); their batch scales come from ``mix.mix_scales``.
    """

    builtin: str
    defaults: dict[str, Any]
    token_loss: Callable[[Tensor, Tensor, Tensor, dict[str, Any]], Tensor]
    inputs: Callable[[Tensor, Tensor, Tensor, dict[str, Any]], dict[str, Tensor]]
    loss_fn_config: Callable[[dict[str, Any]], dict[str, float] | None] = lambda args: None
    custom_reason: Callable[[dict[str, Any], frozenset[str]], str | None] = lambda a, e: None
    clipped: Callable[[Tensor, Tensor, Tensor, dict[str, Any]], Tensor] | None = None
    expert_token_loss: Callable[[Tensor, dict[str, Any]], Tensor] | None = None


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
