"""Tinker's built-in losses as pure functions of per-token tensors (Tinker API docs, "Loss functions").

Every loss returns per-token terms; the engine sums them (Tinker's losses are token SUMS, with no
normalization by token or sequence count). Notation: ``lp`` learner logprobs of the targets,
``q`` sampler logprobs (``loss_fn_inputs["logprobs"]``), ``A`` advantages, ``r = exp(lp - q)``.

- cross_entropy:       -w * lp
- importance_sampling: -r * A
- ppo:                 -min(r * A, clip(r, lo, hi) * A)        (lo / hi are ratio bounds, not eps)
- cispo:               -sg(clip(r, lo, hi)) * lp * A
- dro:                 -(lp * A - beta / 2 * (lp - q)^2)
- gspo:                GSPO-token: s = exp(mean over the datum's ``sequence_ratio_mask`` of
                       sg(lp) - q), ratio = s * exp(lp - sg(lp)) (value s, gradient of lp),
                       -min(ratio * A, clip(ratio, lo, hi) * A)
- stable_reinforce:    -sg(r) * lp * A on tokens whose ratio lies in [lo, hi], 0 elsewhere
                       (masked importance weighting; see below)

GSPO's mask defaults to the datum's positions with a nonzero advantage (its sampled tokens, as the
cookbook masks them). Tinker does not publish ``stable_reinforce``'s objective (an alpha loss that
also reads what its sampler recorded); ours is a REINFORCE whose importance weight is detached
and zero where the sampler and learner disagree beyond [lo, hi], so stale async data cannot blow
up a step. It reads the sampler logprobs from the datum, so provenance
spans and ``record_stability_info`` are accepted and not needed.

``clip_low_threshold`` / ``clip_high_threshold`` come from ``loss_fn_config`` or, per token, from
``loss_fn_inputs`` of the same name (the SDK knows both keys as float32 datum inputs); a datum
input wins. DRO's quadratic term has no advantage factor, so it also acts on positions whose
advantage is 0 (prompt tokens with ``logprobs`` 0): applied literally, as Tinker defines it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

Inputs = dict[str, Tensor]


@dataclass(frozen=True)
class LossFn:
    """A built-in loss: its datum inputs, config defaults (None = required), per-token terms."""

    inputs: tuple[str, ...]
    defaults: dict[str, float | None]
    token_loss: Callable[[Tensor, Inputs, dict[str, Tensor | float]], Tensor]
    optional_inputs: tuple[str, ...] = ()
    # per-token inputs a datum may leave out, computed from its other inputs
    input_defaults: dict[str, Callable[[Inputs], Tensor]] = field(default_factory=dict)
    # per-token inputs that scale every term of a token's loss: where all are 0 on every token
    # of a datum, its loss is 0 whatever its logprobs (no gradient; ``inert``)
    gates: tuple[str, ...] = ()


ENTROPY_WEIGHTS = "entropy_weights"


def _zeros(inputs: Inputs) -> Tensor:
    return torch.zeros_like(inputs["weights"])


def _ratio(lp: Tensor, inputs: Inputs) -> Tensor:
    return torch.exp(lp - inputs["logprobs"])


def cross_entropy(lp: Tensor, inputs: Inputs, config: dict) -> Tensor:
    return -inputs["weights"] * lp


def importance_sampling(lp: Tensor, inputs: Inputs, config: dict) -> Tensor:
    return -_ratio(lp, inputs) * inputs["advantages"]


def ppo(lp: Tensor, inputs: Inputs, config: dict) -> Tensor:
    r, A = _ratio(lp, inputs), inputs["advantages"]
    clipped = torch.clamp(r, config["clip_low_threshold"], config["clip_high_threshold"])
    return -torch.minimum(r * A, clipped * A)


def cispo(lp: Tensor, inputs: Inputs, config: dict) -> Tensor:
    r = _ratio(lp, inputs)
    weight = torch.clamp(r, config["clip_low_threshold"], config["clip_high_threshold"]).detach()
    return -weight * lp * inputs["advantages"]


def dro(lp: Tensor, inputs: Inputs, config: dict) -> Tensor:
    A, q = inputs["advantages"], inputs["logprobs"]
    return -(lp * A - 0.5 * config["beta"] * (lp - q) ** 2)


def gspo(lp: Tensor, inputs: Inputs, config: dict) -> Tensor:
    """Needs ``inputs["datum"]``: the index of each token's datum (``packing.batch_inputs``)."""
    A, q, mask, datum = (
        inputs["advantages"],
        inputs["logprobs"],
        inputs["sequence_ratio_mask"],
        inputs["datum"],
    )
    n_datums = int(datum.max()) + 1 if datum.numel() else 0
    log_ratio_sum = torch.zeros(n_datums, dtype=lp.dtype, device=lp.device)
    log_ratio_sum.index_add_(0, datum, (lp.detach() - q) * mask)
    count = torch.zeros(n_datums, dtype=lp.dtype, device=lp.device).index_add_(0, datum, mask)
    log_s = (log_ratio_sum / count.clamp(min=1))[datum]
    ratio = torch.exp(log_s + lp - lp.detach())
    clipped = torch.clamp(ratio, config["clip_low_threshold"], config["clip_high_threshold"])
    return -torch.minimum(ratio * A, clipped * A)


def stable_reinforce(lp: Tensor, inputs: Inputs, config: dict) -> Tensor:
    r = _ratio(lp, inputs).detach()
    low, high = config["clip_low_threshold"], config["clip_high_threshold"]
    weight = torch.where((r >= low) & (r <= high), r, 0.0)
    return -weight * lp * inputs["advantages"]


def _nonzero_advantages(inputs: Inputs) -> Tensor:
    return (inputs["advantages"] != 0).float()


_RL_INPUTS = ("target_tokens", "logprobs", "advantages")
_ADVANTAGES = ("advantages",)
_CLIP = ("clip_low_threshold", "clip_high_threshold")

LOSSES: dict[str, LossFn] = {
    # our extension: optional per-token "entropy_weights" e add sum(e * H), H the token's entropy
    # over the full vocabulary (an exact entropy term in a linearized custom loss)
    "cross_entropy": LossFn(
        ("target_tokens", "weights"),
        {},
        cross_entropy,
        input_defaults={ENTROPY_WEIGHTS: _zeros},
        gates=("weights", ENTROPY_WEIGHTS),
    ),
    "importance_sampling": LossFn(_RL_INPUTS, {}, importance_sampling, gates=_ADVANTAGES),
    "ppo": LossFn(_RL_INPUTS, {_CLIP[0]: 0.8, _CLIP[1]: 1.2}, ppo, _CLIP, gates=_ADVANTAGES),
    "cispo": LossFn(_RL_INPUTS, {_CLIP[0]: 0.0, _CLIP[1]: 4.0}, cispo, _CLIP, gates=_ADVANTAGES),
    "dro": LossFn(_RL_INPUTS, {"beta": None}, dro),  # its penalty has a gradient at A = 0
    "gspo": LossFn(
        _RL_INPUTS,
        {_CLIP[0]: 1 - 3e-4, _CLIP[1]: 1 + 4e-4},  # the GSPO paper's sequence-ratio band
        gspo,
        _CLIP,
        {"sequence_ratio_mask": _nonzero_advantages},
        gates=_ADVANTAGES,
    ),
    "stable_reinforce": LossFn(
        _RL_INPUTS, {_CLIP[0]: 0.5, _CLIP[1]: 2.0}, stable_reinforce, _CLIP, gates=_ADVANTAGES
    ),
}


def inert(loss: LossFn, inputs: Inputs) -> bool:
    """Whether a datum's loss is 0 whatever its logprobs: every gate input 0 on every token (a
    GRPO group whose rewards were all equal: zero advantages)."""
    return bool(loss.gates) and not any(bool(inputs[key].any()) for key in loss.gates)


def get_loss(name: str) -> LossFn:
    if name not in LOSSES:
        raise ValueError(f"unknown loss_fn {name!r}; supported: {', '.join(LOSSES)}")
    return LOSSES[name]


def resolve_config(name: str, config: dict | None) -> dict[str, float]:
    """Defaults filled in; unknown or missing keys raise ValueError naming them."""
    loss = get_loss(name)
    config = dict(config or {})
    unknown = set(config) - set(loss.defaults)
    if unknown:
        allowed = ", ".join(loss.defaults) or "none"
        raise ValueError(
            f"loss_fn {name!r} got unknown loss_fn_config keys {sorted(unknown)} "
            f"(allowed: {allowed})"
        )
    resolved = {}
    for key, default in loss.defaults.items():
        value = config.get(key, default)
        if value is None:
            raise ValueError(f"loss_fn {name!r} needs loss_fn_config[{key!r}]")
        resolved[key] = float(value)
    return resolved


def token_losses(name: str, lp: Tensor, inputs: Inputs, config: dict[str, float]) -> Tensor:
    """Per-token loss terms; per-token clip thresholds in ``inputs`` override the config."""
    loss = get_loss(name)
    merged: dict[str, Tensor | float] = dict(config)
    merged.update({key: inputs[key] for key in loss.optional_inputs if key in inputs})
    return loss.token_loss(lp, inputs, merged)
