"""Algorithms: advantages, KL / entropy terms, loss aggregation, policy losses, datums, the loss
plan, lr schedules.

Pure functions over tensors and plain lists (no model, no backend, no ``trinity.workflows``).
The explorer calls ``explorer_advantage_fn(config)``; the trainer uses ``build_loss_plan(config)``
(its ``batch_advantages``, ``to_datums``, ``metrics``) and ``adam_params_fn(config.optimizer)``.
"""

from trinity.algorithms.advantages import (
    ADVANTAGE_FNS,
    asymre_advantages,
    compute_advantages,
    episodes_of,
    group_advantage_fn,
    grpo_advantages,
    opmd_advantages,
    rec_advantages,
    reinforce_advantages,
    reinforce_plus_plus_advantages,
    rloo_advantages,
    set_batch_advantages,
)
from trinity.algorithms.aggregation import LOSS_AGG_MODES, aggregate, token_scales
from trinity.algorithms.datums import DatumBatch, DatumLayout, TokenInfo, info_from_datum
from trinity.algorithms.gae import clipped_value_loss, gae_advantages
from trinity.algorithms.gigpo import gigpo_advantages, gigpo_hook
from trinity.algorithms.kl import (
    KL_FNS,
    entropy_from_logits,
    kl,
    original_entropy_estimate,
    sampled_entropy,
)
from trinity.algorithms.loss_plan import LossPlan, build_loss_plan
from trinity.algorithms.policy_losses import POLICY_LOSSES, PolicyLoss
from trinity.algorithms.schedules import adam_params_fn, lr_at, lr_factor, warmup_steps
from trinity.algorithms.spec import (
    ALGORITHMS,
    AlgorithmSettings,
    AlgorithmSpec,
    explorer_advantage_fn,
    resolve_algorithm,
)
from trinity.algorithms.step_wise import explorer_hook, per_episode

__all__ = [
    "ADVANTAGE_FNS",
    "ALGORITHMS",
    "KL_FNS",
    "LOSS_AGG_MODES",
    "POLICY_LOSSES",
    "AlgorithmSettings",
    "AlgorithmSpec",
    "DatumBatch",
    "DatumLayout",
    "LossPlan",
    "PolicyLoss",
    "TokenInfo",
    "adam_params_fn",
    "aggregate",
    "asymre_advantages",
    "build_loss_plan",
    "clipped_value_loss",
    "compute_advantages",
    "entropy_from_logits",
    "episodes_of",
    "explorer_advantage_fn",
    "explorer_hook",
    "gae_advantages",
    "gigpo_advantages",
    "gigpo_hook",
    "group_advantage_fn",
    "grpo_advantages",
    "info_from_datum",
    "kl",
    "lr_at",
    "lr_factor",
    "opmd_advantages",
    "per_episode",
    "original_entropy_estimate",
    "rec_advantages",
    "reinforce_advantages",
    "reinforce_plus_plus_advantages",
    "resolve_algorithm",
    "rloo_advantages",
    "sampled_entropy",
    "set_batch_advantages",
    "token_scales",
    "warmup_steps",
]
