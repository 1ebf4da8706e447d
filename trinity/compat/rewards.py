"""The original's ``RewardFn`` classes and ``REWARD_FUNCTIONS``, over our reward functions.

Ours are functions ``(response_text, truth, **kwargs) -> dict``; the original's are classes built
with the taskset's ``reward_fn_args`` and called with ``response=`` / ``truth=``. A registered
class becomes one of our functions (so ``simple_workflow`` and every workflow of ours can use
it), and each of ours is seen as a class (so a plugin's ``task.reward_fn(**args)`` works with
``math_reward`` and the other built-ins).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from trinity.compat.registry import Registry
from trinity.registry import REWARD_FUNCTIONS as OUR_REWARD_FUNCTIONS

Components = dict[str, float]


class RewardFn(ABC):
    """Built as ``cls(**reward_fn_args)``, called with keywords; the reward is the sum of the
    returned values, each of which is also logged (``rollout/<key>/mean``)."""

    @abstractmethod
    def __init__(self, **kwargs: Any) -> None: ...

    @abstractmethod
    def __call__(self, **kwargs: Any) -> Components: ...


def as_function(name: str, cls: type[RewardFn]) -> Callable[..., Components]:
    """Our shape of a plugin's ``RewardFn``: arguments build it, the response and truth call it."""

    def reward(response_text: str, truth: Any = None, **kwargs: Any) -> Components:
        return cls(**kwargs)(response=response_text, truth=truth)

    reward.original = cls  # type: ignore[attr-defined]
    reward.__name__ = name
    return reward


def as_class(name: str, fn: Callable[..., Components]) -> type[RewardFn]:
    """The original's shape of one of our reward functions (a plugin's class comes back as is)."""
    original = getattr(fn, "original", None)
    if original is not None:
        return original

    def init(self: RewardFn, **kwargs: Any) -> None:
        self.kwargs = kwargs

    def call(self: RewardFn, response: str, truth: Any = None, **kwargs: Any) -> Components:
        return fn(response, truth, **{**self.kwargs, **kwargs})

    attrs = {
        "__init__": init,
        "__call__": call,
        "_name": name,
        "__doc__": fn.__doc__,
        "__module__": fn.__module__,
    }
    return type(name, (RewardFn,), attrs)


REWARD_FUNCTIONS: Registry[type[RewardFn]] = Registry(OUR_REWARD_FUNCTIONS, as_function, as_class)
