"""Name -> object registries shared by every layer (workflows, rewards, algorithms, monitors).

This leaf module owns the registry objects; the layers fill them (``@WORKFLOWS.register(...)``)
and plugins (``--plugin-dir`` / ``TRINITY_PLUGIN_DIRS``) add entries simply by being imported, the
same way the original's registries work, so configs written for it keep naming things the same
way. Each registry names the module that registers its built-in entries and imports it on the
first lookup: the config layer checks names through this leaf without importing the layers above
it, and still sees every built-in.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, builtins: str | None = None):
        """``builtins``: the module whose import registers the built-in entries."""
        self.kind = kind
        self._builtins = builtins
        self._entries: dict[str, T] = {}

    def register(self, *names: str) -> Callable[[T], T]:
        """Decorator: ``@WORKFLOWS.register("math_workflow", "async_math_workflow")``.

        The built-ins are loaded first, so a plugin's entry replaces a built-in of the same name.
        """

        def add(obj: T) -> T:
            entries = self._entries_loaded()
            for name in names:
                entries[name] = obj
            return obj

        return add

    def _entries_loaded(self) -> dict[str, T]:
        if self._builtins is not None:
            module, self._builtins = self._builtins, None  # once, even while it is importing
            try:
                importlib.import_module(module)
            except BaseException:
                self._builtins = module
                raise
        return self._entries

    def get(self, name: str) -> T:
        try:
            return self._entries_loaded()[name]
        except KeyError:
            raise KeyError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(name, self._entries_loaded(), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"unknown {self.kind} '{name}'{hint} (known: {', '.join(self.names())})"

    def __contains__(self, name: object) -> bool:
        return name in self._entries_loaded()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def names(self) -> list[str]:
        return sorted(self._entries_loaded())


_ALGORITHMS = "trinity.algorithms"
_WORKFLOWS = "trinity.workflows"

# algorithm_type -> algorithms.spec.AlgorithmSpec (its default functions, repeat_times, schema)
ALGORITHMS: Registry[Any] = Registry("algorithm", _ALGORITHMS)
# rewards of one task's samples -> one advantage per sample (the explorer's step)
ADVANTAGE_FNS: Registry[Callable[..., Any]] = Registry("advantage_fn", _ALGORITHMS)
# advantages computed over the whole training batch (the trainer's step)
BATCH_ADVANTAGE_FNS: Registry[Callable[..., Any]] = Registry("batch advantage_fn", _ALGORITHMS)
POLICY_LOSSES: Registry[Any] = Registry("policy_loss_fn", _ALGORITHMS)
KL_FNS: Registry[Callable[..., Any]] = Registry("kl_fn", _ALGORITHMS)
# loss_agg_mode -> per-token scales that make a token-sum loss aggregate that way
LOSS_AGG_MODES: Registry[Callable[..., Any]] = Registry("loss_agg_mode", _ALGORITHMS)
WORKFLOWS: Registry[Any] = Registry("workflow", _WORKFLOWS)
REWARD_FUNCTIONS: Registry[Callable[..., dict[str, float]]] = Registry(
    "reward function", _WORKFLOWS
)
# monitor_type -> a class with ``from_run(run) -> Monitor``
MONITORS: Registry[Any] = Registry("monitor", "trinity.monitor")
# data_processor.experience_pipeline.operators[*].name -> a class taking the operator's args
EXPERIENCE_OPERATORS: Registry[Any] = Registry("experience operator", "trinity.buffer.operators")
# data_processor.task_pipeline.operators[*].name -> a factory taking the operator's args, giving
# ``op(rows, target_fields) -> rows``
TASK_OPERATORS: Registry[Any] = Registry("task operator", "trinity.buffer.task_pipeline")
BUILTIN_TASKSETS: Registry[Callable[..., list[dict[str, Any]]]] = Registry(
    "builtin taskset", "trinity.buffer.procedural"
)
