"""Workflow runners as Ray actors: the explorer's workflows run across the cluster.

``RunnerPool.run(task, seed)`` is what ``Explorer.run_task`` awaits in place of running the
workflow in its own event loop: it hands the task to an idle ``WorkflowRunner`` actor, which
runs the same ``rollout`` against a sampler built from a backend recipe
(``trinity.backends.ray_actors``), and returns its experiences. ``explorer.auxiliary_models`` come
as recipes too (with their ``RolloutSettings``): each runner builds their samplers for the base
weights once, so a workflow's ``self.auxiliary_models`` are OpenAI clients as in one process. Each finished task's experiences
are back in the driver at once, so the experience buffer stays there, next to the trainer that
reads it: a buffer actor would add a hop per batch and recover nothing a runner loses.

Failures. A workflow's own exception comes back as itself and its runner is reused. A runner
that died (``ray.kill``, out of memory, node lost) or was abandoned by ``explorer.max_timeout``
(it is still busy with that task) is killed and replaced by a fresh actor at once. Either way the
explorer's retry loop decides whether the task runs again (``explorer.max_retry_times``); tasks
other runners finished are untouched.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import ray
from ray.exceptions import RayTaskError

from trinity.explorer.explorer import rollout
from trinity.explorer.sampler import AuxiliaryModel, RolloutSettings
from trinity.plugins import load_plugins
from trinity.workflows.types import Experience, Task

log = logging.getLogger(__name__)


class WorkflowRunner:
    """Actor body: one workflow at a time, against the sampler for the weights it is told."""

    def __init__(
        self,
        index: int,
        backend: Any,
        settings: RolloutSettings,
        auxiliary: Sequence[tuple[Any, RolloutSettings]] = (),
    ):
        load_plugins()  # the driver's plugin dirs, through TRINITY_PLUGIN_DIRS in the runtime env
        self.index = index
        self.backend = backend
        self.settings = settings
        self.sampler: Any = None
        self.auxiliary_recipes = list(auxiliary)
        self.auxiliary: list[AuxiliaryModel] | None = None

    def ready(self) -> int:
        return self.index

    async def run(self, task: Task, seed: int, ref: str | None) -> list[Experience]:
        if self.sampler is None or self.sampler.ref != ref:
            self.sampler = await self.backend.sampler(self.index, ref)
        if self.auxiliary is None:  # frozen models: their base weights, built once
            self.auxiliary = [
                AuxiliaryModel(await recipe.sampler(self.index, None), settings)
                for recipe, settings in self.auxiliary_recipes
            ]
        return await rollout(task, self.sampler, self.settings, seed, self.auxiliary)


class RunnerPool:
    """``size`` runner actors; ``sampler.ref`` (the weights the explorer synced) goes with each task."""

    def __init__(
        self,
        size: int,
        backend: Any,
        sampler: Any,
        settings: RolloutSettings,
        options: dict[str, Any],
        auxiliary: Sequence[tuple[Any, RolloutSettings]] = (),
    ):
        self.backend = backend
        self.sampler = sampler
        self.settings = settings
        self.auxiliary = list(auxiliary)
        self.actor_cls = ray.remote(WorkflowRunner).options(**options)
        self.actors = {index: self._start(index) for index in range(size)}
        self.idle: asyncio.Queue[int] = asyncio.Queue()
        for index in self.actors:
            self.idle.put_nowait(index)
        self.replaced = 0

    def _start(self, index: int) -> Any:
        return self.actor_cls.remote(index, self.backend, self.settings, self.auxiliary)

    async def wait_ready(self) -> None:
        """Every runner constructed (plugins loaded): a broken setup fails here, once."""
        await asyncio.gather(*(actor.ready.remote() for actor in self.actors.values()))

    async def run(self, task: Task, seed: int) -> list[Experience]:
        index = await self.idle.get()
        actor = self.actors[index]
        try:
            experiences = await self._call(actor, task, seed)
        except RayTaskError as exc:  # the workflow raised; the runner itself is fine
            self.idle.put_nowait(index)
            cause = exc.cause if isinstance(exc.cause, Exception) else exc
            raise cause from exc
        except asyncio.CancelledError:  # max_timeout: the runner is still busy with this task
            self._replace(index, "timed out")
            raise
        except ray.exceptions.RayActorError as exc:
            self._replace(index, f"died ({type(exc).__name__})")
            raise RuntimeError(f"runner {index} died ({type(exc).__name__})") from exc
        self.idle.put_nowait(index)
        return experiences

    def _call(self, actor: Any, task: Task, seed: int) -> Any:
        return actor.run.remote(task, seed, self.sampler.ref)

    def _replace(self, index: int, why: str) -> None:
        ray.kill(self.actors[index], no_restart=True)
        self.actors[index] = self._start(index)
        self.replaced += 1
        self.idle.put_nowait(index)
        log.warning("runner %d %s; replaced it with a new actor", index, why)

    def close(self) -> None:
        for actor in self.actors.values():
            ray.kill(actor, no_restart=True)
