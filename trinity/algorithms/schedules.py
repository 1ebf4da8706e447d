"""Learning-rate schedules as pure functions of the step (the client sends the lr every optim_step).

Same shape as the original Tinker trainer: linear warmup from ``min_lr_ratio`` to 1 over the warmup
steps, then constant or a half-cosine from 1 down to ``min_lr_ratio`` at ``total_steps``. The
``algorithm.optimizer`` defaults are the schema's (``OptimizerConfig``), the only place they live.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from tinker import types

from trinity.config import load_section
from trinity.config.schema import OptimizerConfig
from trinity.config.validate import LR_SCHEDULERS


def warmup_steps(
    lr_warmup_steps: int, lr_warmup_steps_ratio: float, total_steps: int | None
) -> int:
    """``lr_warmup_steps`` if >= 0, else ``ratio * total_steps`` (0 when the total is unknown)."""
    if lr_warmup_steps >= 0:
        return lr_warmup_steps
    return int(lr_warmup_steps_ratio * total_steps) if total_steps else 0


def lr_factor(
    step: int,
    *,
    scheduler: str = OptimizerConfig.lr_scheduler_type,
    total_steps: int | None = None,
    num_warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
) -> float:
    """Multiplier on the base lr at ``step`` (the trainer's 1-based step counter)."""
    if scheduler not in LR_SCHEDULERS:
        raise ValueError(f"lr_scheduler_type must be one of {LR_SCHEDULERS}, got {scheduler!r}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if step < num_warmup_steps:
        return min_lr_ratio + (1.0 - min_lr_ratio) * step / max(1, num_warmup_steps)
    if scheduler == "constant":
        return 1.0
    if total_steps is None or step >= total_steps:
        progress = 1.0 if total_steps is not None else 0.0
    else:
        progress = (step - num_warmup_steps) / max(1, total_steps - num_warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(min_lr_ratio, min_lr_ratio + (1.0 - min_lr_ratio) * cosine)


def lr_at(
    step: int,
    lr: float,
    *,
    scheduler: str = OptimizerConfig.lr_scheduler_type,
    total_steps: int | None = None,
    lr_warmup_steps: int = OptimizerConfig.lr_warmup_steps,
    lr_warmup_steps_ratio: float = OptimizerConfig.lr_warmup_steps_ratio,
    min_lr_ratio: float = OptimizerConfig.min_lr_ratio,
) -> float:
    """The learning rate at ``step`` from the original's ``algorithm.optimizer`` keys."""
    warmup = warmup_steps(lr_warmup_steps, lr_warmup_steps_ratio, total_steps)
    return lr * lr_factor(
        step,
        scheduler=scheduler,
        total_steps=total_steps,
        num_warmup_steps=warmup,
        min_lr_ratio=min_lr_ratio,
    )


def adam_params_fn(
    optimizer: OptimizerConfig | Any, total_steps: int | None = None, grad_clip: float = 0.0
) -> Callable[[int], types.AdamParams]:
    """``step -> AdamParams`` from an ``algorithm.optimizer`` section.

    ``optimizer`` is an ``OptimizerConfig`` or anything ``load_section`` turns into one (a mapping,
    namespace, OmegaConf node). As the original Tinker trainer: lr times the schedule, ``betas``,
    ``weight_decay``, and ``trainer.grad_clip`` as ``grad_clip_norm``; eps stays Tinker's default.
    ``warmup_style``, the deprecated name of ``lr_scheduler_type``, wins when set, as in
    ``trinity/config/validate.py``.
    """
    opt = load_section(OptimizerConfig, optimizer)
    lr, (beta1, beta2) = opt.lr, opt.betas
    schedule = dict(
        scheduler=opt.lr_scheduler_type if opt.warmup_style is None else opt.warmup_style,
        total_steps=total_steps,
        lr_warmup_steps=opt.lr_warmup_steps,
        lr_warmup_steps_ratio=opt.lr_warmup_steps_ratio,
        min_lr_ratio=opt.min_lr_ratio,
    )
    lr_at(1, lr, **schedule)  # validate the schedule now, not at the first step

    def params(step: int) -> types.AdamParams:
        return types.AdamParams(
            learning_rate=lr_at(step, lr, **schedule),
            beta1=beta1,
            beta2=beta2,
            weight_decay=opt.weight_decay,
            grad_clip_norm=float(grad_clip or 0.0),
        )

    return params
