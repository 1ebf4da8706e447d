"""PPO's critic settings: ``trainer.trainer_config.critic``, veRL's critic section.

The original reads its critic from ``trainer.trainer_config`` (an inline veRL config); these are
that section's keys and defaults (Trinity-RFT 0.6's ``verl_config.Critic``), so its configs load.
The keys that act here: ``optim`` (lr, betas, weight_decay, the lr schedule), ``ppo_epochs``,
``grad_clip`` (default ``trainer.grad_clip``), ``cliprange_value``, ``loss_agg_mode``, and veRL's
``model.lora_rank`` / ``model.lora_alpha`` (absent from Trinity-RFT's schema, whose critic is
always a full fine-tune; here an unset rank means the policy's LoRA, 0 a full fine-tune). The
weights come from ``model.critic_model_path``, as in the original; everything else is GPU-trainer
tuning, listed in ``inert.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from trinity.config.errors import ConfigError, did_you_mean

# veRL's top-level sections of an inline ``trainer_config`` (Trinity-RFT 0.6's ``veRLConfig``)
VERL_SECTIONS = (
    "data",
    "actor_rollout_ref",
    "critic",
    "reward_model",
    "custom_reward_function",
    "algorithm",
    "trainer",
    "global_profiler",
    "synchronizer",
    "enable_preview",
)


@dataclass
class CriticOptimConfig:
    optimizer: str = "adam"
    optimizer_impl: str = "torch.optim"
    lr: float = 1e-6
    lr_warmup_steps: int = -1
    lr_warmup_steps_ratio: float = 0.0
    min_lr_ratio: float | None = 0.0
    warmup_style: str | None = None
    lr_scheduler_type: str = "constant"
    total_training_steps: int = -1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    clip_grad: float = 1.0
    lr_warmup_init: float | None = None
    lr_decay_steps: int | None = None
    lr_decay_style: str | None = None
    min_lr: float | None = None
    weight_decay: float = 0.01
    weight_decay_incr_style: str = "constant"
    lr_wsd_decay_style: str = "exponential"
    lr_wsd_decay_steps: int | None = None
    use_checkpoint_opt_param_scheduler: bool = False
    override_optimizer_config: dict[str, Any] | None = None


@dataclass
class CriticModelConfig:
    path: str = ""  # overwritten by model.critic_model_path, as in the original
    tokenizer_path: str = ""
    override_config: dict[str, Any] = field(default_factory=dict)
    external_lib: str | None = None
    trust_remote_code: bool = False
    enable_gradient_checkpointing: bool = True
    use_remove_padding: bool = True
    fsdp_config: dict[str, Any] = field(default_factory=dict)
    rope_scaling: dict[str, Any] | None = None
    rope_theta: float | None = None
    lora_rank: int | None = None  # veRL's key; None: the policy's LoRA, 0: full fine-tuning
    lora_alpha: float | None = None


@dataclass
class CriticConfig:
    enable: bool = False  # set from the algorithm, as in the original
    strategy: str | None = None
    optim: CriticOptimConfig = field(default_factory=CriticOptimConfig)
    model: CriticModelConfig = field(default_factory=CriticModelConfig)
    ppo_mini_batch_size: int = 0
    ppo_micro_batch_size: int | None = None
    ppo_micro_batch_size_per_gpu: int = 1
    forward_micro_batch_size: int | None = None
    forward_micro_batch_size_per_gpu: int | None = None
    use_dynamic_bsz: bool | None = None
    ppo_max_token_len_per_gpu: int | None = None
    forward_max_token_len_per_gpu: int | None = None
    ulysses_sequence_parallel_size: int | None = None
    ppo_epochs: int = 1
    shuffle: bool = False
    grad_clip: float | None = None  # None: trainer.grad_clip
    cliprange_value: float = 0.5
    checkpoint: dict[str, Any] = field(default_factory=dict)
    rollout_n: int = 1
    loss_agg_mode: str = "token-mean"
    megatron: dict[str, Any] = field(default_factory=dict)
    profile: dict[str, Any] = field(default_factory=dict)
    data_loader_seed: int | None = None
    load_weight: bool = True
    nccl_timeout: float = 600
    ray_namespace: str = ""
    profiler: dict[str, Any] = field(default_factory=dict)


def critic_config(trainer_config: dict[str, Any] | None) -> CriticConfig:
    """The typed ``critic`` section of ``trainer.trainer_config`` (a ConfigError names a bad key;
    an unknown top-level section is one too, as in the original's closed veRL schema)."""
    from trinity.config.loader import load_section

    trainer_config = trainer_config or {}
    for key in trainer_config:
        if key not in VERL_SECTIONS:
            raise ConfigError(
                f"trainer.trainer_config.{key}: not a veRL config section (one of "
                f"{', '.join(VERL_SECTIONS)}){did_you_mean(str(key), VERL_SECTIONS)}"
            )
    section = trainer_config.get("critic") or {}
    try:
        critic = load_section(CriticConfig, section)
    except ConfigError as error:
        detail = str(error).split(": ", 1)[-1]
        raise ConfigError(f"trainer.trainer_config.critic: {detail}") from None
    where = "trainer.trainer_config.critic"
    if critic.optim.lr <= 0:
        raise ConfigError(f"{where}.optim.lr must be > 0, got {critic.optim.lr}")
    for key, value in (
        ("ppo_epochs", critic.ppo_epochs - 1),
        ("cliprange_value", critic.cliprange_value),
        ("optim.weight_decay", critic.optim.weight_decay),
    ):
        if value < 0:
            low = 1 if key == "ppo_epochs" else 0
            raise ConfigError(f"{where}.{key} must be >= {low}, got {value + low}")
    if critic.grad_clip is not None and critic.grad_clip < 0:
        raise ConfigError(f"{where}.grad_clip must be >= 0, got {critic.grad_clip}")
    if len(critic.optim.betas) != 2:
        raise ConfigError(f"{where}.optim.betas: expected two numbers [beta1, beta2]")
    if str(critic.optim.optimizer).lower() not in ("adam", "adamw"):
        raise ConfigError(
            f"{where}.optim.optimizer: only adam / adamw (AdamW), got {critic.optim.optimizer!r}"
        )
    if critic.model.lora_rank is not None and critic.model.lora_rank < 0:
        raise ConfigError(f"{where}.model.lora_rank must be >= 0 (0: full fine-tuning)")
    return critic


def optimizer_section(critic: CriticConfig) -> dict[str, Any]:
    """The critic's ``optim`` as an ``algorithm.optimizer`` mapping (``schedules.adam_params_fn``)."""
    keep = {"lr", "lr_warmup_steps", "lr_warmup_steps_ratio", "warmup_style", "lr_scheduler_type"}
    opt = critic.optim
    section = {f.name: getattr(opt, f.name) for f in fields(opt) if f.name in keep}
    section.update(
        betas=list(opt.betas), weight_decay=opt.weight_decay, min_lr_ratio=opt.min_lr_ratio or 0.0
    )
    return section
