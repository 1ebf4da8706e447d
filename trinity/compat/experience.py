"""The original's ``Experience`` and ``EID``, converting to and from ``trinity.workflows.types``.

A plugin builds and edits these (tensors, ``action_mask``, ``eid.run`` / ``eid.step``,
``metrics``); the adapter in ``trinity.compat.workflow`` turns each into our ``Experience`` when
the run returns, so nothing below the workflow layer knows the original's shape. Fields of the
original that our trainer does not consume (DPO pairs, ``token_level_reward``, ``advantages``,
``returns``, ``teacher_logprobs``, ``custom_fields``) are not accepted: a plugin relying on them
fails at construction instead of training on something else.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import torch

from trinity.workflows import types


@dataclass
class EID:
    """Which batch, task, run (repeat) and step (turn) an experience belongs to."""

    batch: int | str = ""
    task: int | str = ""
    run: int = 0
    step: int = 0
    suffix: str = field(default_factory=lambda: uuid.uuid4().hex[:6])

    @property
    def tid(self) -> str:
        """The GRPO group: every run of one task."""
        return f"{self.batch}/{self.task}"

    @property
    def rid(self) -> str:
        return f"{self.tid}/{self.run}"

    @property
    def sid(self) -> str:
        return f"{self.tid}/{self.step}"

    @property
    def uid(self) -> str:
        return f"{self.rid}/{self.step}/{self.suffix}"


def _tensor(values: Any, dtype: torch.dtype) -> torch.Tensor | None:
    if values is None:
        return None
    if isinstance(values, torch.Tensor):
        return values.detach().to(dtype)
    return torch.tensor(list(values), dtype=dtype)


class Experience:
    """One trajectory, as the original builds it (keyword-only; ``tokens`` required).

    ``logprobs`` and ``action_mask`` are indexed by response position, like ours. Without an
    ``action_mask`` it is single-turn: every response token is trained on (none if
    ``truncate_status`` is ``prompt_truncated``) and ``0 < prompt_length < len(tokens)``.
    """

    def __init__(
        self,
        *,
        tokens: Any,
        prompt_length: int = 1,
        logprobs: Any = None,
        reward: float | None = None,
        action_mask: Any = None,
        eid: EID | None = None,
        truncate_status: str | None = None,
        info: dict[str, Any] | None = None,
        metrics: dict[str, float] | None = None,
        prompt_text: str | None = None,
        response_text: str | None = None,
        messages: list[dict[str, Any]] | None = None,
        tools: list[dict[str, Any]] | None = None,
    ):
        self.tokens = _tensor(tokens, torch.int64)
        self.prompt_length = int(prompt_length)
        response_length = len(self.tokens) - self.prompt_length
        if action_mask is None:
            if not 0 < self.prompt_length < len(self.tokens):
                raise ValueError(
                    f"Experience: prompt_length {self.prompt_length} must be in (0, "
                    f"{len(self.tokens)}) (the number of tokens); pass action_mask for multi-turn"
                )
            trained = truncate_status != "prompt_truncated"
            action_mask = [trained] * response_length
        self.action_mask = _tensor(action_mask, torch.bool)
        if len(self.action_mask) != response_length:
            raise ValueError(
                f"Experience: action_mask has {len(self.action_mask)} entries, the response "
                f"{response_length} tokens (len(tokens) - prompt_length)"
            )
        self.logprobs = _tensor(logprobs, torch.float32)
        self.reward = reward
        self.eid = eid or EID()
        self.truncate_status = truncate_status
        self.info = dict(info or {})
        self.metrics = dict(metrics or {})
        self.prompt_text = prompt_text
        self.response_text = response_text
        self.messages = messages
        self.tools = tools

    def __repr__(self) -> str:
        return (
            f"Experience(eid={self.eid}, tokens={len(self.tokens)}, "
            f"prompt_length={self.prompt_length}, reward={self.reward})"
        )

    def to_ours(self, task: types.Task) -> types.Experience:
        """Our ``Experience`` for ``task``: ``metrics`` become the logged reward components,
        ``eid.run`` / ``eid.step`` go to ``info`` (``trinity.algorithms.step_wise`` reads them)."""
        where = f"task {task.task_id}: the workflow returned an experience"
        if self.reward is None:
            raise ValueError(f"{where} without a reward")
        if self.logprobs is None:
            raise ValueError(
                f"{where} without logprobs (the sampler's, which training needs); build it with "
                "model.chat / generate / convert_messages_to_experience"
            )
        return types.Experience(
            tokens=self.tokens.tolist(),
            prompt_length=self.prompt_length,
            logprobs=self.logprobs.tolist(),
            loss_mask=self.action_mask.int().tolist(),
            reward=float(self.reward),
            reward_components={k: float(v) for k, v in self.metrics.items()},
            task_id=task.task_id,
            prompt_text=self.prompt_text or "",
            response_text=self.response_text or "",
            truncated=self.truncate_status == "response_truncated",
            is_eval=task.is_eval,
            info={**self.info, "run": self.eid.run, "step": self.eid.step},
        )

    @classmethod
    def from_ours(cls, exp: types.Experience) -> Experience:
        """A recorded trajectory (``extract_experience_from_history``): no reward yet, as there."""
        return cls(
            tokens=exp.tokens,
            prompt_length=exp.prompt_length,
            logprobs=exp.logprobs,
            action_mask=exp.loss_mask,
            eid=EID(task=exp.task_id, run=exp.info.get("run", 0), step=exp.info.get("step", 0)),
            truncate_status="response_truncated" if exp.truncated else None,
            info=exp.info,
            metrics=exp.reward_components,
            prompt_text=exp.prompt_text,
            response_text=exp.response_text,
        )
