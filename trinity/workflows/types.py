"""The data that flows from a taskset row to the trainer: `Task`, `Response`, `Experience`.

These are plain dataclasses so every layer (workflows, algorithms, buffer, trainer) can build and
read them without a model. Token lists are plain ``list[int]`` / ``list[float]``: they cross process
boundaries (buffer files, Ray) and are small next to the model work.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol


@dataclass
class Task:
    """One taskset row plus everything a workflow needs to roll it out."""

    task_id: str
    raw: dict[str, Any]
    workflow: str
    repeat_times: int = 1
    reward_fn: str | None = None
    format: dict[str, Any] = field(
        default_factory=dict
    )  # prompt_key, response_key, system_prompt, ...
    rollout_args: dict[str, Any] = field(
        default_factory=dict
    )  # temperature, top_p, top_k, max_tokens
    workflow_args: dict[str, Any] = field(default_factory=dict)
    reward_fn_args: dict[str, Any] = field(default_factory=dict)
    is_eval: bool = False
    batch_id: int = 0
    row: int | None = None  # the taskset row: selectors learn per row (pass_rate_calculator)


@dataclass
class Response:
    """One sampled continuation of a prompt, as a sampler returns it."""

    prompt_tokens: list[int]
    tokens: list[int]
    logprobs: list[float]
    text: str
    stop_reason: str = "stop"  # "stop" | "length"


class Sampler(Protocol):
    """What a workflow may call: the current policy, behind any backend."""

    tokenizer: Any

    async def generate(
        self, prompt_tokens: list[int], n: int, **sampling_args: Any
    ) -> list[Response]: ...

    async def chat(
        self, messages: list[dict[str, str]], n: int, **sampling_args: Any
    ) -> list[Response]: ...


@dataclass
class Experience:
    """One trajectory ready for training.

    ``tokens`` is prompt + response; ``logprobs``, ``loss_mask`` and ``advantages`` are indexed by
    response position (length ``len(tokens) - prompt_length``).
    """

    tokens: list[int]
    prompt_length: int
    logprobs: list[float]
    loss_mask: list[int]
    reward: float
    reward_components: dict[str, float] = field(default_factory=dict)
    task_id: str = ""
    group_id: str = ""
    model_version: int = 0
    prompt_text: str = ""
    response_text: str = ""
    truncated: bool = False
    is_eval: bool = False
    advantages: list[float] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    teacher_logprobs: list[float] | None = None  # per response token (on-policy distillation)

    @property
    def response_length(self) -> int:
        return len(self.tokens) - self.prompt_length

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Experience:
        return cls(**data)
