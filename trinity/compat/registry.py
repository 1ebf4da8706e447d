"""The original's registry surface (``register_module`` / ``get``) over our registries.

There is one registry per kind, ours (``trinity/registry.py``): ``register_module`` stores an
adapter of the plugin's class there, so configs, the config check's did-you-mean and the
explorer find it by name like any built-in, and ``get`` reads back from there. The adapter keeps
the plugin's class as ``original``, which is how a name registered this way is told apart.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from trinity.registry import Registry as OurRegistry

C = TypeVar("C", bound=type)


class Registry(Generic[C]):
    """``adapt(name, cls)``: our entry for a plugin's class; ``view(entry)``: the class the
    original's API returns for one of our entries (the plugin's own class when it has one)."""

    def __init__(
        self,
        ours: OurRegistry[Any],
        adapt: Callable[[str, C], Any],
        view: Callable[[str, Any], C | type],
    ):
        self.ours = ours
        self.adapt = adapt
        self.view = view

    def register_module(
        self, module_name: str, module_cls: C | None = None, force: bool = False, lazy: bool = False
    ) -> Any:
        """Register ``module_cls`` (a decorator without it). A name a plugin already registered
        raises ``KeyError`` unless ``force``; a built-in name is replaced, as with ours.
        ``lazy`` is accepted and ignored: registration is cheap here."""
        if module_cls is None:
            return lambda cls: self.register_module(module_name, cls, force)
        if not force and module_name in self.ours:
            previous = getattr(self.ours.get(module_name), "original", None)
            if previous is not None and previous is not module_cls:
                raise KeyError(f"{module_name} is already registered in {self.ours.kind}s")
        module_cls._name = module_name
        self.ours.register(module_name)(self.adapt(module_name, module_cls))
        return module_cls

    def get(self, key: str | None) -> C | type | None:
        """The class registered as ``key``; ``None`` for ``None``; unknown names raise
        ``ValueError`` with our did-you-mean line."""
        if key is None:
            return None
        if key not in self.ours:
            raise ValueError(self.ours.unknown_message(key))
        return self.view(key, self.ours.get(key))

    def __contains__(self, key: object) -> bool:
        return key in self.ours
