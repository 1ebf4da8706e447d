"""The algorithm registry and the resolution of an ``algorithm:`` config section.

Each ``AlgorithmSpec`` names the functions an ``algorithm_type`` uses by default, with the
original's defaults (notes/trinity-reference.md §4), so configs written for it resolve the same.
Plugins add algorithms with ``ALGORITHMS.register("name")(AlgorithmSpec(...))``.

The config may be a plain mapping or any object with attributes (dataclass, OmegaConf node);
``None`` means "use the algorithm's default". ``*_args`` dicts are merged over the function's
defaults, and the keys the user set explicitly are kept (``explicit_policy_args``) because a few
options (PPO's dual clip) are only switched on when asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from trinity.algorithms.advantages import group_advantage_fn
from trinity.registry import ALGORITHMS, POLICY_LOSSES


@dataclass(frozen=True)
class AlgorithmSpec:
    advantage_fn: str | None
    policy_loss_fn: str
    kl_loss_fn: str = "k2"
    kl_penalty_fn: str = "none"
    entropy_loss_fn: str = "default"
    repeat_times: int = 2
    use_reference: bool = True  # the original's flag; we fetch reference logprobs only when used
    schema: str = "experience"
    sample_strategy: str = "warmup"
    advantage_fn_args: Mapping[str, Any] = field(default_factory=dict)
    policy_loss_fn_args: Mapping[str, Any] = field(default_factory=dict)


for _name, _spec in {
    "sft": AlgorithmSpec(
        None,
        "sft",
        kl_loss_fn="none",
        entropy_loss_fn="none",
        repeat_times=1,
        use_reference=False,
        schema="sft",
        sample_strategy="default",
    ),
    "grpo": AlgorithmSpec("grpo", "ppo"),
    "dapo": AlgorithmSpec("grpo", "ppo", kl_loss_fn="none", repeat_times=16, use_reference=False),
    "opmd": AlgorithmSpec("opmd", "opmd"),
    "rloo": AlgorithmSpec("rloo", "ppo"),
    "reinforceplusplus": AlgorithmSpec("reinforceplusplus", "ppo"),
    "cispo": AlgorithmSpec("grpo", "cispo"),
    "asymre": AlgorithmSpec(
        "asymre", "opmd", kl_loss_fn="none", entropy_loss_fn="none", use_reference=False
    ),
    "raft": AlgorithmSpec(
        None,
        "sft",
        kl_loss_fn="none",
        entropy_loss_fn="none",
        repeat_times=1,
        use_reference=False,
        sample_strategy="default",
    ),
}.items():
    ALGORITHMS.register(_name)(_spec)

ADVANTAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "grpo": {"epsilon": 1e-6},
    "opmd": {"opmd_baseline": "mean", "tau": 1.0},
    "rloo": {},
    "asymre": {"baseline_shift": -0.1},
    "reinforce": {},
    "reinforceplusplus": {"gamma": 1.0},
}
KL_DEFAULTS = {"kl_coef": 0.001, "adaptive": False}
ENTROPY_DEFAULTS = {"entropy_coef": 0.0}


@dataclass
class AlgorithmSettings:
    """Everything the algorithm layer needs from ``algorithm:``, defaults filled in."""

    algorithm_type: str
    repeat_times: int
    advantage_fn: str | None
    advantage_fn_args: dict[str, Any]
    policy_loss_fn: str
    policy_loss_fn_args: dict[str, Any]
    explicit_policy_args: frozenset[str]
    kl_loss_fn: str
    kl_loss_fn_args: dict[str, Any]
    kl_penalty_fn: str
    kl_penalty_fn_args: dict[str, Any]
    entropy_loss_fn: str
    entropy_loss_fn_args: dict[str, Any]
    loss_agg_mode: str
    use_reference: bool
    schema: str
    sample_strategy: str

    @property
    def kl_coef(self) -> float:
        return 0.0 if self.kl_loss_fn == "none" else float(self.kl_loss_fn_args.get("kl_coef", 0.0))

    @property
    def kl_penalty_coef(self) -> float:
        if self.kl_penalty_fn == "none":
            return 0.0
        return float(self.kl_penalty_fn_args.get("kl_coef", 0.0))

    @property
    def entropy_coef(self) -> float:
        if self.entropy_loss_fn == "none":
            return 0.0
        return float(self.entropy_loss_fn_args.get("entropy_coef", 0.0))


def _get(config: Any, key: str, default: Any = None) -> Any:
    if config is None:
        return default
    value = config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)
    return default if value is None else value


def _args(config: Any, key: str) -> dict[str, Any]:
    value = _get(config, key, {})
    return dict(value.items()) if hasattr(value, "items") else dict(value)


def resolve_algorithm(config: Any) -> AlgorithmSettings:
    """Fill an ``algorithm:`` section (mapping or object) with the algorithm's defaults."""
    name = _get(config, "algorithm_type", "grpo")
    spec = ALGORITHMS.get(name)
    advantage_fn = _get(config, "advantage_fn", spec.advantage_fn)
    policy_loss_fn = _get(config, "policy_loss_fn", spec.policy_loss_fn)
    user_policy_args = _args(config, "policy_loss_fn_args")
    policy_args = {
        **POLICY_LOSSES.get(policy_loss_fn).defaults,
        **spec.policy_loss_fn_args,
        **user_policy_args,
    }
    advantage_args = {
        **ADVANTAGE_DEFAULTS.get(advantage_fn or "", {}),
        **spec.advantage_fn_args,
        **_args(config, "advantage_fn_args"),
    }
    kl_args = {**KL_DEFAULTS, **_args(config, "kl_loss_fn_args")}
    kl_penalty_args = {**KL_DEFAULTS, **_args(config, "kl_penalty_fn_args")}
    for section, args in (("kl_loss_fn_args", kl_args), ("kl_penalty_fn_args", kl_penalty_args)):
        if args.get("adaptive"):
            raise ValueError(f"algorithm.{section}.adaptive is not supported; use a fixed kl_coef")
    return AlgorithmSettings(
        algorithm_type=name,
        repeat_times=int(_get(config, "repeat_times", spec.repeat_times)),
        advantage_fn=advantage_fn,
        advantage_fn_args=advantage_args,
        policy_loss_fn=policy_loss_fn,
        policy_loss_fn_args=policy_args,
        explicit_policy_args=frozenset(user_policy_args) | frozenset(spec.policy_loss_fn_args),
        kl_loss_fn=_get(config, "kl_loss_fn", spec.kl_loss_fn),
        kl_loss_fn_args=kl_args,
        kl_penalty_fn=_get(config, "kl_penalty_fn", spec.kl_penalty_fn),
        kl_penalty_fn_args=kl_penalty_args,
        entropy_loss_fn=_get(config, "entropy_loss_fn", spec.entropy_loss_fn),
        entropy_loss_fn_args={**ENTROPY_DEFAULTS, **_args(config, "entropy_loss_fn_args")},
        loss_agg_mode=_get(config, "loss_agg_mode", "token-mean"),
        use_reference=spec.use_reference,
        schema=spec.schema,
        sample_strategy=_get(config, "sample_strategy", spec.sample_strategy),
    )


def explorer_advantage_fn(config: Any, seed: int | None = None) -> Callable[[list[Any]], dict]:
    """The explorer's per-step hook for an ``algorithm:`` section (a no-op for SFT/RAFT and for
    batch-level advantages, which the loss plan computes)."""
    settings = config if isinstance(config, AlgorithmSettings) else resolve_algorithm(config)
    if settings.advantage_fn is None:
        return lambda experiences: {}
    return group_advantage_fn(settings.advantage_fn, settings.advantage_fn_args, seed=seed)
