"""The original's ``Task`` and ``Workflow``, and the adapter that makes its workflows ours.

``WORKFLOWS.register_module`` registers, in our registry, a subclass of our ``Workflow``
(``OriginalWorkflow``) that holds the plugin's class. The explorer runs it like any workflow of
ours; per run it builds the original's views (``Task``, ``ModelWrapper``), runs the plugin's
workflow the way the original's runner does, and converts its experiences to ours. Flags:

- ``can_repeat``: one run returns every repeat (``set_repeat_times(repeat_times, 0)``);
  otherwise our explorer runs ``repeat_times`` episodes and numbers them (``info["run"]``).
- ``can_reset``: a finished instance is kept and ``reset(task)`` reused for a later task
  (one instance per concurrent task; each gets the task's own model).
- ``is_async``: ``run_async()`` is awaited; otherwise ``run()`` runs in a worker thread, its
  blocking model calls handed back to the explorer's loop (see ``trinity.compat.model``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

from trinity.compat.experience import Experience
from trinity.compat.model import ModelWrapper
from trinity.compat.registry import Registry
from trinity.compat.rewards import REWARD_FUNCTIONS, RewardFn
from trinity.config.schema import FormatConfig, GenerationConfig
from trinity.registry import WORKFLOWS as OUR_WORKFLOWS
from trinity.workflows import types
from trinity.workflows import workflows as ours


@dataclass
class Task:
    """One taskset row as the original's workflows read it. ``task_id`` and ``batch_id`` are
    ours (the task's id string, the explore step); the GRPO group is formed by the explorer."""

    workflow: type[Workflow] | None = None
    repeat_times: int = 1
    format_args: FormatConfig = field(default_factory=FormatConfig)
    rollout_args: GenerationConfig = field(default_factory=GenerationConfig)
    workflow_args: dict[str, Any] = field(default_factory=dict)
    reward_fn_args: dict[str, Any] = field(default_factory=dict)
    is_eval: bool = False
    reward_fn: type[RewardFn] | None = None
    raw_task: dict[str, Any] | None = None
    batch_id: int | str = ""
    task_id: int | str = 0

    @property
    def task_desc(self) -> str | None:
        return (self.raw_task or {}).get(self.format_args.prompt_key)

    @property
    def truth(self) -> Any:
        return (self.raw_task or {}).get(self.format_args.response_key)

    def to_workflow(self, model: ModelWrapper, auxiliary_models: list[Any] | None = None) -> Any:
        return self.workflow(task=self, model=model, auxiliary_models=auxiliary_models)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.raw_task or {})

    @classmethod
    def view(cls, task: types.Task, workflow: type[Workflow], settings: Any) -> Task:
        """Ours as the original's; ``rollout_args`` filled from ``model.*`` (``settings``: the
        sampler's ``RolloutSettings``) where the taskset leaves them unset, as its validator."""
        defaults = {}
        if settings is not None:
            defaults = {
                "temperature": settings.temperature,
                "top_p": settings.top_p,
                "top_k": settings.top_k,
                "max_tokens": settings.max_response_tokens,
            }
        rollout = {
            **defaults,
            "n": 1,
            **{k: v for k, v in task.rollout_args.items() if v is not None},
        }
        return cls(
            workflow=workflow,
            repeat_times=task.repeat_times,
            format_args=_section(FormatConfig, task.format or {}),
            rollout_args=_section(GenerationConfig, rollout),
            workflow_args=dict(task.workflow_args),
            reward_fn_args=dict(task.reward_fn_args),
            is_eval=task.is_eval,
            reward_fn=REWARD_FUNCTIONS.get(task.reward_fn),
            raw_task=task.raw,
            batch_id=task.batch_id,
            task_id=task.task_id,
        )


def _section(cls: type[Any], values: dict[str, Any]) -> Any:
    """A schema dataclass from a task's dict (already validated; ``load_section``'s OmegaConf
    merge would cost ~10 ms per run)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


class Workflow:
    """Base of the original's workflows: ``run`` (or ``run_async`` with ``is_async``) returns
    the experiences of one run of ``self.task`` sampled from ``self.model``."""

    can_reset: ClassVar[bool] = False
    can_repeat: ClassVar[bool] = False
    is_async: ClassVar[bool] = False

    def __init__(
        self, *, task: Task, model: ModelWrapper, auxiliary_models: list[Any] | None = None
    ):
        self.task = task
        self.model = model
        self.auxiliary_model_wrappers = list(auxiliary_models or [])
        self.auxiliary_models = [  # their OpenAI clients
            m.get_openai_async_client() if self.is_async else m.get_openai_client()
            for m in self.auxiliary_model_wrappers
        ]
        self.repeat_times = task.repeat_times
        self.run_id_base = 0
        self.logger = logging.getLogger(type(self).__module__)

    def reset(self, task: Task) -> None:
        raise NotImplementedError(f"{type(self).__name__} sets can_reset but has no reset(task)")

    def set_repeat_times(self, repeat_times: int, run_id_base: int) -> None:
        self.repeat_times = repeat_times
        self.run_id_base = run_id_base

    def run(self) -> list[Experience]:
        raise NotImplementedError(f"{type(self).__name__}.run")

    async def run_async(self) -> list[Experience]:
        raise NotImplementedError(f"{type(self).__name__}.run_async (it sets is_async)")


class OriginalWorkflow(ours.Workflow):
    """Our workflow running one of the original's (``original``); see the module doc."""

    original: ClassVar[type[Workflow]]
    idle: ClassVar[list[Workflow]]  # finished instances of a can_reset workflow, per class

    async def run(self) -> list[types.Experience]:
        task = Task.view(self.task, self.original, getattr(self.sampler, "settings", None))
        loop = asyncio.get_running_loop()
        model = ModelWrapper(self.sampler, loop)
        auxiliary = [ModelWrapper(m, loop) for m in self.auxiliary_model_wrappers]
        workflow = self._instance(task, model, auxiliary)
        if workflow.can_repeat:
            workflow.set_repeat_times(task.repeat_times, 0)
        if workflow.is_async:
            experiences = await workflow.run_async()
        else:
            experiences = await asyncio.to_thread(workflow.run)
        if workflow.can_reset:
            self.idle.append(workflow)
        return [exp.to_ours(self.task) for exp in experiences]

    def _instance(self, task: Task, model: ModelWrapper, auxiliary: list[ModelWrapper]) -> Workflow:
        if self.original.can_reset and self.idle:
            workflow = self.idle.pop()
            workflow.model = model
            workflow.reset(task)
            return workflow
        return self.original(task=task, model=model, auxiliary_models=auxiliary)


def adapt(name: str, cls: type[Workflow]) -> type[OriginalWorkflow]:
    attrs = {
        "original": cls,
        "idle": [],
        "can_repeat": cls.can_repeat,
        "__doc__": cls.__doc__,
        "__module__": cls.__module__,
    }
    return type(cls.__name__, (OriginalWorkflow,), attrs)


def view(name: str, entry: type) -> type:
    """The plugin's class for an adapted entry; our own classes as they are."""
    return getattr(entry, "original", entry)


WORKFLOWS: Registry[type[Workflow]] = Registry(OUR_WORKFLOWS, adapt, view)
