"""The original's experience operators: ``ExperienceOperator`` (sync), ``ExperienceOperatorV1``
(async, with ``prepare`` / ``close``) and ``EXPERIENCE_OPERATORS.register_module``.

A plugin's operator is stored in our registry behind an adapter (``adapt``), so configs name it
like a built-in. The adapter hands the plugin the original's ``Experience`` (``eid.tid`` is our
task group, ``reward``, ``info``, ``metrics``, ``action_mask`` as there) and carries the edits
back onto our experiences. It can drop, reorder or edit them; an experience it did not receive
has no task of ours to belong to and is refused. An async ``process`` runs to completion in a
worker thread (the explorer's pipeline is synchronous).
"""

from __future__ import annotations

import asyncio
import inspect
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from trinity.compat.experience import Experience
from trinity.compat.registry import Registry
from trinity.registry import EXPERIENCE_OPERATORS as OURS
from trinity.workflows import types


class ExperienceOperator(ABC):
    """``process(exps) -> (exps, metrics)``, synchronous."""

    @abstractmethod
    def process(self, exps: list[Experience]) -> tuple[list[Experience], dict]: ...

    def close(self) -> None:
        return None


class ExperienceOperatorV1(ABC):
    """``async process(exps) -> (exps, metrics)``; ``prepare`` runs once before the first."""

    auxiliary_models: list[Any] | None = None

    async def prepare(self) -> None:
        return None

    @abstractmethod
    async def process(self, exps: list[Experience]) -> tuple[list[Experience], dict]: ...

    async def close(self) -> None:
        return None


def _run(awaitable: Any) -> Any:
    if not inspect.isawaitable(awaitable):
        return awaitable
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, awaitable).result()


def _theirs(exp: types.Experience) -> Experience:
    theirs = Experience.from_ours(exp)
    theirs.eid.task = exp.group_id or exp.task_id
    theirs.reward = exp.reward
    return theirs


def _back(name: str, theirs: Experience, ours: types.Experience) -> types.Experience:
    if theirs.reward is None:
        raise ValueError(f"experience operator {name}: an experience lost its reward")
    ours.reward = float(theirs.reward)
    ours.reward_components = {k: float(v) for k, v in theirs.metrics.items()}
    ours.loss_mask = theirs.action_mask.int().tolist()
    ours.info = {k: v for k, v in theirs.info.items() if k not in ("run", "step")} | {
        k: ours.info[k] for k in ("run", "step") if k in ours.info
    }
    return ours


def adapt(name: str, cls: type) -> type:
    """Our operator class around the plugin's ``cls`` (constructed with the config's args)."""

    class Adapted:
        original = cls

        def __init__(self, **args: Any):
            self.operator = cls(**args)
            self.prepared = False

        def process(
            self, experiences: list[types.Experience]
        ) -> tuple[list[types.Experience], dict[str, float]]:
            if not self.prepared:
                _run(getattr(self.operator, "prepare", lambda: None)())
                self.prepared = True
            pairs = {}
            theirs = []
            for exp in experiences:
                converted = _theirs(exp)
                pairs[id(converted)] = exp
                theirs.append(converted)
            kept, metrics = _run(self.operator.process(theirs))
            unknown = [exp for exp in kept if id(exp) not in pairs]
            if unknown:
                raise ValueError(
                    f"experience operator {name} returned {len(unknown)} experience(s) it did "
                    "not receive; operators here may drop, reorder or edit, not add"
                )
            return [_back(name, exp, pairs[id(exp)]) for exp in kept], {
                k: float(v) for k, v in (metrics or {}).items()
            }

    Adapted.__name__ = Adapted.__qualname__ = f"Original{cls.__name__}"
    return Adapted


def view(name: str, entry: Any) -> type:
    return getattr(entry, "original", entry)


class _OperatorRegistry(Registry[type]):
    """The original's ``register_module`` / ``get``, and ours ``register`` (the built-ins and
    our plugins use it) under the one name ``EXPERIENCE_OPERATORS``."""

    def register(self, *names: str) -> Any:
        return self.ours.register(*names)


EXPERIENCE_OPERATORS = _OperatorRegistry(OURS, adapt, view)
