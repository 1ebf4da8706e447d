"""``step_wise_grpo``: multi-turn episodes scored as episodes, trained turn by turn.

A step-wise workflow gives one experience per turn, every turn of an episode (``info["run"]``)
carrying the episode's reward. GRPO over the turns would weigh a long episode as many samples;
here each episode counts once: its last turn stands for it in the group (the task's episodes),
and the advantage it gets is broadcast over every turn of the episode (times each loss mask).
Any group advantage function can be lifted this way (``per_episode``); ``step_wise_grpo`` is
GRPO's, and the original's ``multi_step_grpo`` algorithm uses it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from trinity.algorithms.advantages import episodes_of, grpo_advantages
from trinity.algorithms.spec import AlgorithmSpec, explorer_advantage_fn, resolve_algorithm
from trinity.registry import ADVANTAGE_FNS, ALGORITHMS

EPISODE_LEVEL = {"step_wise_grpo"}


@ADVANTAGE_FNS.register("step_wise_grpo")
def step_wise_grpo_advantages(rewards_G: Sequence[float] | Tensor, epsilon: float = 1e-6) -> Tensor:
    """GRPO over one reward per episode (``per_episode`` hands it the episodes' last turns)."""
    return grpo_advantages(rewards_G, epsilon)


ALGORITHMS.register("multi_step_grpo")(AlgorithmSpec("step_wise_grpo", "ppo", repeat_times=8))


def per_episode(hook: Callable[[list[Any]], dict[str, float]]) -> Callable[[list[Any]], dict]:
    """Lift an explorer advantage hook from experiences to episodes (see the module doc)."""

    def apply(experiences: list[Any]) -> dict[str, float]:
        episodes = episodes_of(experiences)
        last_turns = [turns[-1] for turns in episodes.values()]
        metrics = hook(last_turns)  # may drop groups (std_threshold) from the list in place
        kept = {id(exp) for exp in last_turns}
        experiences[:] = []
        for turns in episodes.values():
            last = turns[-1]
            if id(last) not in kept:
                continue
            masked = sum(last.loss_mask)
            advantage = sum(last.advantages) / masked if masked else 0.0
            for exp in turns:
                exp.advantages = [advantage * float(m) for m in exp.loss_mask]
            experiences.extend(turns)
        return metrics

    return apply


def explorer_hook(algorithm: Any, seed: int | None = None) -> Callable[[list[Any]], dict]:
    """``explorer_advantage_fn``, lifted to episodes for the episode-level advantage functions."""
    settings = resolve_algorithm(algorithm)
    hook = explorer_advantage_fn(settings, seed=seed)
    return per_episode(hook) if settings.advantage_fn in EPISODE_LEVEL else hook
