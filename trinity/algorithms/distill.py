"""On-policy distillation and JSD: per-token advantages from a teacher's logprobs.

The workflow (``on_policy_distill_workflow``) stores the teacher's logprob of every sampled
response token (``Experience.teacher_logprobs``; the teacher is ``explorer.auxiliary_models[0]``).
The explorer's hook (``token_advantage_fn``) turns them into one advantage per token; the policy
loss (``ppo`` by default, or ``importance_sampling``) is a Tinker built-in over those advantages,
so a step is one ``forward_backward`` pass on either backend.

With s, t the student's (sampler's) and the teacher's logprobs of the sampled token and m the
loss mask, as the original defines them:

- ``on_policy_distill`` (``kl_coef=1``): A = kl_coef * (t - s) * m, the negated per-token
  reverse-KL estimate (its expectation over the student's samples is -KL(student || teacher)).
- ``jsd`` (``kl_coef=1, lambda_coef=0.5, temperature=1``), with s, t divided by ``temperature``
  and beta = ``lambda_coef``: beta = 0 gives j = s - t, beta = 1 gives j = t - s, otherwise
  log M = logsumexp(s + log(1 - beta), t + log beta) and j = beta (t - log M) + (1 - beta)(s - log M);
  A = -kl_coef * j * m. ``chunk_size`` (the original's memory knob) changes nothing here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from trinity.registry import ADVANTAGE_FNS

# advantage_fns of this module: one advantage per response token, from the teacher's logprobs
TOKEN_ADVANTAGE_FNS = frozenset({"on_policy_distill", "jsd"})
DISTILL_DEFAULTS: dict[str, dict[str, Any]] = {
    "on_policy_distill": {"kl_coef": 1.0},
    "jsd": {"kl_coef": 1.0, "lambda_coef": 0.5, "temperature": 1.0, "chunk_size": None},
}


def _mask(mask_T: Sequence[float] | Tensor | None, like: Tensor) -> Tensor:
    if mask_T is None:
        return torch.ones_like(like)
    return torch.as_tensor(mask_T, dtype=torch.float32).reshape(-1)


@ADVANTAGE_FNS.register("on_policy_distill")
def on_policy_distill_advantages(
    logprobs_T: Sequence[float] | Tensor,
    teacher_logprobs_T: Sequence[float] | Tensor,
    mask_T: Sequence[float] | Tensor | None = None,
    kl_coef: float = 1.0,
) -> Tensor:
    """A_t = kl_coef * (teacher_t - student_t) * m_t."""
    s = torch.as_tensor(logprobs_T, dtype=torch.float32).reshape(-1)
    t = torch.as_tensor(teacher_logprobs_T, dtype=torch.float32).reshape(-1)
    return kl_coef * (t - s) * _mask(mask_T, s)


@ADVANTAGE_FNS.register("jsd")
def jsd_advantages(
    logprobs_T: Sequence[float] | Tensor,
    teacher_logprobs_T: Sequence[float] | Tensor,
    mask_T: Sequence[float] | Tensor | None = None,
    kl_coef: float = 1.0,
    lambda_coef: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> Tensor:
    """A_t = -kl_coef * j_t * m_t with j the per-token generalized JSD term (module docstring)."""
    del chunk_size  # the original's memory knob: these are per-token scalars
    if not 0.0 <= lambda_coef <= 1.0:
        raise ValueError(f"advantage_fn_args.lambda_coef must be in [0, 1], got {lambda_coef}")
    if temperature <= 0:
        raise ValueError(f"advantage_fn_args.temperature must be > 0, got {temperature}")
    s = torch.as_tensor(logprobs_T, dtype=torch.float32).reshape(-1) / temperature
    t = torch.as_tensor(teacher_logprobs_T, dtype=torch.float32).reshape(-1) / temperature
    beta = float(lambda_coef)
    if beta == 0.0:
        j = s - t
    elif beta == 1.0:
        j = t - s
    else:
        log_m = torch.logaddexp(s + math.log(1.0 - beta), t + math.log(beta))
        j = beta * (t - log_m) + (1.0 - beta) * (s - log_m)
    return -kl_coef * j * _mask(mask_T, s)


def token_advantage_fn(
    advantage_fn: str, advantage_fn_args: Mapping[str, Any] | None = None
) -> Callable[[list[Any]], dict[str, float]]:
    """The explorer's hook for a teacher-based ``advantage_fn``: set every ``exp.advantages``.

    Also reports ``distill/reverse_kl``: the mean over trained tokens of student - teacher
    logprob, the sampled estimate of KL(student || teacher) on this step's responses.
    """
    fn = ADVANTAGE_FNS.get(advantage_fn)
    args = dict(advantage_fn_args or {})

    def apply(experiences: list[Any]) -> dict[str, float]:
        gap_sum = tokens = 0.0
        for exp in experiences:
            teacher = getattr(exp, "teacher_logprobs", None)
            if teacher is None or len(teacher) != len(exp.logprobs):
                raise ValueError(
                    f"algorithm.advantage_fn '{advantage_fn}' needs the teacher's logprob of "
                    "every response token on each experience: use on_policy_distill_workflow "
                    "(or on_policy_distill_math_workflow) with the teacher as "
                    "explorer.auxiliary_models[0]"
                )
            s = torch.as_tensor(exp.logprobs, dtype=torch.float32)
            t = torch.as_tensor(teacher, dtype=torch.float32)
            m = torch.as_tensor(exp.loss_mask, dtype=torch.float32)
            exp.advantages = fn(s, t, m, **args).tolist()
            gap_sum += float(((s - t) * m).sum())
            tokens += float(m.sum())
        return {"distill/reverse_kl": gap_sum / tokens} if tokens else {}

    return apply
