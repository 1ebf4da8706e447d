"""Learning-rate schedules as pure functions of the step (the client sends the lr every optim_step).

Same shape as the original Tinker trainer: linear warmup from ``min_lr_ratio`` to 1 over the warmup
steps, then constant or a half-cosine from 1 down to ``min_lr_ratio`` at ``total_steps``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from tinker import types

LR_SCHEDULERS = ("constant", "cosine")


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
    scheduler: str = "constant",
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
    scheduler: str = "constant",
    total_steps: int | None = None,
    lr_warmup_steps: int = -1,
    lr_warmup_steps_ratio: float = 0.0,
    min_lr_ratio: float = 0.01,
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
    optimizer: Any, total_steps: int | None = None, grad_clip: float = 0.0
) -> Callable[[int], types.AdamParams]:
    """``step -> AdamParams`` from an ``algorithm.optimizer`` section (mapping or object).

    As the original Tinker trainer: lr times the schedule, ``betas``, ``weight_decay``, and
    ``trainer.grad_clip`` as ``grad_clip_norm``; eps stays Tinker's default. ``warmup_style`` is
    the deprecated name of ``lr_scheduler_type``.
    """

    def get(key: str, default: Any) -> Any:
        value = (
            optimizer.get(key) if isinstance(optimizer, Mapping) else getattr(optimizer, key, None)
        )
        return default if value is None else value

    lr = float(get("lr", 1e-6))
    scheduler = get("lr_scheduler_type", None) or get("warmup_style", None) or "constant"
    beta1, beta2 = (float(b) for b in get("betas", (0.9, 0.999)))
    weight_decay = float(get("weight_decay", 0.01))
    schedule = dict(
        scheduler=scheduler,
        total_steps=total_steps,
        lr_warmup_steps=int(get("lr_warmup_steps", -1)),
        lr_warmup_steps_ratio=float(get("lr_warmup_steps_ratio", 0.0)),
        min_lr_ratio=float(get("min_lr_ratio", 0.01)),
    )
    lr_at(1, lr, **schedule)  # validate the schedule now, not at the first step

    def params(step: int) -> types.AdamParams:
        return types.AdamParams(
            learning_rate=lr_at(step, lr, **schedule),
            beta1=beta1,
            beta2=beta2,
            weight_decay=weight_decay,
            grad_clip_norm=float(grad_clip or 0.0),
        )

    return params
