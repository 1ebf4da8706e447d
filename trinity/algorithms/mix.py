"""MIX and CHORD: an SFT loss on expert rows mixed into the RL loss of the usual rows.

The batch comes from the ``mix`` sample strategy (``trinity/buffer/strategies.py``): expert (SFT)
rows carry ``info["expert_mask"]`` and every row ``info["step"]``. The objective is the original's

    L = (1 - mu) * agg_grpo(ppo(usual rows)) + mu * agg_sft(sft(expert rows))

with ``agg_grpo`` / ``agg_sft`` the ``grpo_loss_agg_mode`` / ``sft_loss_agg_mode`` aggregation of
each part over its own rows. The original weights each micro-batch's parts by its row counts
(``train_batch_size_usual`` / ``_expert``, ``ngpus_trainer``...) so that its gradient-accumulated
sum is this; here the whole batch is one learner call, so the weights are 1 and those args are
accepted and unused. ``mix`` has a constant ``mu``; ``mix_chord`` takes ``mu`` from the step:
linear warm-up to ``mu_peak`` over ``mu_warmup_steps``, cosine decay to ``mu_valley`` over
``mu_decay_steps``, and its SFT part is CHORD-phi, ``-sg(p (1 - p)) log p``, unless
``enable_phi_function: false``.

Both parts are folded into per-token scales (``(1 - mu) s_grpo`` on usual rows, ``mu s_sft`` on
expert rows), so the loss plan sums ``scale * token loss`` as for any other loss; no built-in
mixes two losses, so the plan always takes the custom-loss path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from trinity.algorithms.aggregation import token_scales

MIX_DEFAULTS = {
    "mu": 0.1,
    "clip_range": 0.2,
    "grpo_loss_agg_mode": "token-mean",
    "sft_loss_agg_mode": "token-mean",
}
CHORD_DEFAULTS = {
    "mu_warmup_steps": 0,
    "mu_decay_steps": 0,
    "mu_peak": 0.1,
    "mu_valley": 0.1,
    "enable_phi_function": True,
    "clip_range": 0.2,
    "grpo_loss_agg_mode": "token-mean",
    "sft_loss_agg_mode": "token-mean",
}


def chord_mu(step: int, args: dict[str, Any]) -> float:
    """CHORD's schedule: step/W * peak while warming up, then a half cosine from peak to valley
    over D steps, then the valley."""
    warmup, decay = int(args["mu_warmup_steps"]), int(args["mu_decay_steps"])
    peak, valley = float(args["mu_peak"]), float(args["mu_valley"])
    if step < warmup:
        return step / warmup * peak
    if step >= warmup + decay:
        return valley
    return valley + (peak - valley) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / decay))


def mu_at(step: int, args: dict[str, Any]) -> float:
    """``mu`` for ``mix`` (constant) or ``mix_chord`` (scheduled: it has ``mu_peak``)."""
    return chord_mu(step, args) if "mu_peak" in args else float(args["mu"])


def mix_scales(
    masks: Sequence[Tensor | Sequence[float]],
    experts: Sequence[bool],
    step: int,
    args: dict[str, Any],
    norm_length: int | None = None,
) -> list[Tensor]:
    """Per-token scales: ``(1 - mu)`` times the usual rows' own aggregation, ``mu`` times the
    expert rows' (a part with no rows contributes nothing, as in the original)."""
    mu = mu_at(step, args)
    scales: list[Tensor | None] = [None] * len(masks)
    for is_expert, weight, mode in (
        (False, 1.0 - mu, args["grpo_loss_agg_mode"]),
        (True, mu, args["sft_loss_agg_mode"]),
    ):
        rows = [i for i, e in enumerate(experts) if bool(e) == is_expert]
        part = token_scales([masks[i] for i in rows], mode, norm_length)
        for i, scale in zip(rows, part, strict=True):
            scales[i] = weight * scale
    return scales  # type: ignore[return-value]


def sft_expert_loss(lp: Tensor, args: dict[str, Any]) -> Tensor:
    """The expert rows' per-token loss: -log p, or CHORD-phi -sg(p (1 - p)) log p."""
    if args.get("enable_phi_function"):
        p = torch.exp(lp).detach()
        return -(p * (1 - p)) * lp
    return -lp
