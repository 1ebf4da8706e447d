"""Tinker's built-in losses as pure functions of per-token tensors (Tinker API docs, "Loss functions").

Every loss returns per-token terms; the engine sums them (Tinker's losses are token SUMS, with no
normalization by token or sequence count). Notation: ``lp`` learner logprobs of the targets,
``q`` sampler logprobs (``loss_fn_inputs["logprobs"]``), ``A`` advantages, ``r = exp(lp - q)``.

- cross_entropy:       -w * lp
- importance_sampling: -r * A
- ppo:                 -min(r * A, clip(r, lo, hi) * A)        (lo / hi are ratio bounds, not eps)
- cispo:               -sg(clip(r, lo, hi)) * lp * A
- dro:                 -(lp * A - beta / 2 * (lp - q)^2)

``clip_low_threshold`` / ``clip_high_threshold`` come from ``loss_fn_config`` or, per token, from
``loss_fn_inputs`` of the same name (the SDK knows both keys as float32 datum inputs); a datum
input wins. DRO's quadratic term has no advantage factor, so it also acts on positions whose
advantage is 0 (prompt tokens with ``logprobs`` 0): applied literally, as Tinker defines it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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


_RL_INPUTS = ("target_tokens", "logprobs", "advantages")
_CLIP = ("clip_low_threshold", "clip_high_threshold")

LOSSES: dict[str, LossFn] = {
    "cross_entropy": LossFn(("target_tokens", "weights"), {}, cross_entropy),
    "importance_sampling": LossFn(_RL_INPUTS, {}, importance_sampling),
    "ppo": LossFn(_RL_INPUTS, {_CLIP[0]: 0.8, _CLIP[1]: 1.2}, ppo, _CLIP),
    "cispo": LossFn(_RL_INPUTS, {_CLIP[0]: 0.0, _CLIP[1]: 4.0}, cispo, _CLIP),
    "dro": LossFn(_RL_INPUTS, {"beta": None}, dro),
}


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
