"""The algorithm registry and the resolution of an ``algorithm:`` config section.

Each ``AlgorithmSpec`` names the functions an ``algorithm_type`` uses by default, with the
original's defaults, so configs written for it resolve the same. Plugins add algorithms with
``ALGORITHMS.register("name")(AlgorithmSpec(...))``.

The section is the schema's ``AlgorithmConfig`` (``trinity/config/schema.py``, the one source of
its defaults); a function name left ``None`` there means "the algorithm's default". ``*_args``
dicts are merged over the function's defaults, and the keys the user set explicitly are kept
(``explicit_policy_args``) because a few options (PPO's dual clip) are only switched on when asked.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from trinity.algorithms.advantages import group_advantage_fn
from trinity.algorithms.distill import DISTILL_DEFAULTS, TOKEN_ADVANTAGE_FNS, token_advantage_fn
from trinity.algorithms.gigpo import GIGPO_DEFAULTS, gigpo_hook
from trinity.config import load_section
from trinity.config.schema import AlgorithmConfig
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
    schema: str = "experience"  # rollouts; or a train-only dataset: sft chats, cpt text, dpo pairs
    sample_strategy: str = "warmup"
    use_critic: bool = False  # trains a value model beside the policy (trinity/trainer/critic.py)
    advantage_fn_args: Mapping[str, Any] = field(default_factory=dict)
    policy_loss_fn_args: Mapping[str, Any] = field(default_factory=dict)


def _cross_entropy_spec(schema: str) -> AlgorithmSpec:
    """SFT-like algorithms: cross-entropy on the given rows, no KL, entropy, reference or repeats
    (sft and cpt on a dataset, raft on the explorer's experiences)."""
    return AlgorithmSpec(
        None,
        "sft",
        kl_loss_fn="none",
        entropy_loss_fn="none",
        repeat_times=1,
        use_reference=False,
        schema=schema,
        sample_strategy="default",
    )


for _name, _spec in {
    "sft": _cross_entropy_spec("sft"),
    "grpo": AlgorithmSpec("grpo", "ppo"),
    "ppo": AlgorithmSpec("ppo", "ppo", repeat_times=1, use_critic=True),
    "dapo": AlgorithmSpec("grpo", "ppo", kl_loss_fn="none", repeat_times=16, use_reference=False),
    "opmd": AlgorithmSpec("opmd", "opmd"),
    "rloo": AlgorithmSpec("rloo", "ppo"),
    "reinforceplusplus": AlgorithmSpec("reinforceplusplus", "ppo"),
    "cispo": AlgorithmSpec("grpo", "cispo"),
    "asymre": AlgorithmSpec(
        "asymre", "opmd", kl_loss_fn="none", entropy_loss_fn="none", use_reference=False
    ),
    "mix": AlgorithmSpec(
        "grpo", "mix", entropy_loss_fn="mix", repeat_times=8, sample_strategy="mix"
    ),
    "mix_chord": AlgorithmSpec(
        "grpo", "mix_chord", entropy_loss_fn="mix", repeat_times=8, sample_strategy="mix"
    ),
    "grpo_verl": AlgorithmSpec("grpo_verl", "ppo"),
    "gspo": AlgorithmSpec("grpo", "gspo"),
    "sapo": AlgorithmSpec("grpo", "sapo"),
    "topr": AlgorithmSpec("reinforce", "topr"),
    "sppo": AlgorithmSpec(
        "opmd", "sppo", kl_loss_fn="none", entropy_loss_fn="none", use_reference=False
    ),
    "rec": AlgorithmSpec("rec", "rec"),
    "cpt": _cross_entropy_spec("cpt"),
    "dpo": AlgorithmSpec(None, "dpo", schema="dpo", sample_strategy="default"),
    "raft": _cross_entropy_spec("experience"),
    "gigpo": AlgorithmSpec(
        "gigpo",
        "ppo",
        repeat_times=8,
        policy_loss_fn_args={"clip_range_low": 0.2, "clip_range_high": 0.2},
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
    "ppo": {"gamma": 1.0, "lam": 1.0},
    "grpo_verl": {"epsilon": 1e-6},
    "rec": {"epsilon": 1e-6, "std_normalize": False, "drop": None},
    "gigpo": GIGPO_DEFAULTS,
}
# on-policy distillation: per-token advantages from the teacher's logprobs (algorithms/distill.py)
for _name in ("on_policy_distill", "jsd"):
    ALGORITHMS.register(_name)(
        AlgorithmSpec(
            _name,
            "ppo",
            kl_loss_fn="none",
            entropy_loss_fn="none",
            repeat_times=8,
            use_reference=False,
        )
    )
ADVANTAGE_DEFAULTS.update(DISTILL_DEFAULTS)
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
    use_critic: bool = False

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


def resolve_algorithm(config: AlgorithmConfig | AlgorithmSettings | Any) -> AlgorithmSettings:
    """Fill an ``algorithm:`` section with the algorithm's defaults.

    ``config`` is an ``AlgorithmConfig``, or anything ``load_section`` turns into one (a mapping,
    namespace, OmegaConf node); resolved ``AlgorithmSettings`` are returned as they are. An unknown
    ``algorithm_type`` or ``policy_loss_fn`` raises the registry's KeyError.
    """
    if isinstance(config, AlgorithmSettings):
        return config
    algo = load_section(AlgorithmConfig, config)
    spec = ALGORITHMS.get(algo.algorithm_type)
    advantage_fn = algo.advantage_fn or spec.advantage_fn
    policy_loss_fn = algo.policy_loss_fn or spec.policy_loss_fn
    policy_defaults = {**POLICY_LOSSES.get(policy_loss_fn).defaults, **spec.policy_loss_fn_args}
    if "clip_range" in algo.policy_loss_fn_args:  # it sets both sides, as in the original
        for side in ("clip_range_low", "clip_range_high"):
            policy_defaults.pop(side, None)
    policy_args = {**policy_defaults, **algo.policy_loss_fn_args}
    advantage_args = {
        **ADVANTAGE_DEFAULTS.get(advantage_fn or "", {}),
        **spec.advantage_fn_args,
        **algo.advantage_fn_args,
    }
    kl_args = {**KL_DEFAULTS, **algo.kl_loss_fn_args}
    kl_penalty_args = {**KL_DEFAULTS, **algo.kl_penalty_fn_args}
    for section, args in (("kl_loss_fn_args", kl_args), ("kl_penalty_fn_args", kl_penalty_args)):
        if args.get("adaptive"):
            raise ValueError(f"algorithm.{section}.adaptive is not supported; use a fixed kl_coef")
    return AlgorithmSettings(
        algorithm_type=algo.algorithm_type,
        repeat_times=spec.repeat_times if algo.repeat_times is None else algo.repeat_times,
        advantage_fn=advantage_fn,
        advantage_fn_args=advantage_args,
        policy_loss_fn=policy_loss_fn,
        policy_loss_fn_args=policy_args,
        explicit_policy_args=frozenset(algo.policy_loss_fn_args)
        | frozenset(spec.policy_loss_fn_args),
        kl_loss_fn=algo.kl_loss_fn or spec.kl_loss_fn,
        kl_loss_fn_args=kl_args,
        kl_penalty_fn=algo.kl_penalty_fn or spec.kl_penalty_fn,
        kl_penalty_fn_args=kl_penalty_args,
        entropy_loss_fn=algo.entropy_loss_fn or spec.entropy_loss_fn,
        entropy_loss_fn_args={**ENTROPY_DEFAULTS, **algo.entropy_loss_fn_args},
        loss_agg_mode=algo.loss_agg_mode,
        use_reference=spec.use_reference,
        schema=spec.schema,
        sample_strategy=algo.sample_strategy or spec.sample_strategy,
        use_critic=spec.use_critic,
    )


def explorer_advantage_fn(
    config: AlgorithmConfig | AlgorithmSettings | Any, seed: int | None = None
) -> Callable[[list[Any]], dict]:
    """The explorer's per-step hook for an ``algorithm:`` section (a no-op for SFT/RAFT and for
    batch-level advantages, the trainer's step: ``LossPlan.batch_advantages``)."""
    settings = resolve_algorithm(config)
    if settings.advantage_fn is None:
        return lambda experiences: {}
    if settings.advantage_fn in TOKEN_ADVANTAGE_FNS:
        return token_advantage_fn(settings.advantage_fn, settings.advantage_fn_args)
    if settings.advantage_fn == "gigpo":  # reads the turns' info, not only rewards
        return gigpo_hook(settings.advantage_fn_args)
    return group_advantage_fn(settings.advantage_fn, settings.advantage_fn_args, seed=seed)
