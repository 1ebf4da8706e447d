"""``gigpo``: Group-in-Group Policy Optimization (Feng et al., arXiv 2505.10978), as the original.

Multi-turn episodes, one experience per turn (a step-wise workflow). Two advantages, summed:

- episode level, A_E: each episode's return sum_t r_t, normalized across the task's episodes;
- step level, A_S: each turn's discounted return R_t = sum_{k>=t} gamma^(k-t) r_k, normalized
  within an anchor group: the turns of the whole batch taken in the same environment state
  (equal ``str(info["env_state_hash"])``). A turn without a hash, or alone in its group, has 0.

A = (A_E + omega * A_S) on every trained token of the turn. Normalization is (x - mean) /
(d + epsilon), d = the unbiased std with ``fnorm: std``, else 1; a lone episode has mean 0 and
d = 1 (the original's choice); values all equal give exactly 0. r_t is ``info["step_reward"]``
(0 where an episode's other turns have one and this one has not); an episode whose turns carry
none has its reward on its last turn. Turns are ordered by ``info["step"]``.

A single-turn workflow records neither key: each sample is an episode of one turn, so the
advantage is A_E alone, the task's rewards centred (and scaled with ``fnorm: std``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

from trinity.algorithms.advantages import episodes_of
from trinity.registry import ADVANTAGE_FNS

GIGPO_DEFAULTS: dict[str, Any] = {
    "omega": 1.0,
    "gamma": 1.0,
    "fnorm": "none",
    "epsilon": 1e-6,
    "step_reward_key": "step_reward",
    "env_state_hash_key": "env_state_hash",
}
FNORMS = ("none", "std")
# the same knobs under verl-agent's names, for a hint when a config uses them
VERL_AGENT_NAMES = {"step_advantage_w": "omega", "mode": "fnorm"}

Turn = tuple[float, Hashable | None]  # (r_t, the anchor state's hash or None)


def check_gigpo_args(args: Mapping[str, Any]) -> None:
    """ValueError naming the argument for anything ``gigpo`` cannot read (config check)."""
    for key in args:
        if key not in GIGPO_DEFAULTS:
            alias = VERL_AGENT_NAMES.get(key)
            hint = f" (verl-agent's {key} is {alias})" if alias else ""
            raise ValueError(
                f"advantage_fn_args.{key}: gigpo takes {', '.join(GIGPO_DEFAULTS)}{hint}"
            )
    fnorm = args.get("fnorm", "none")
    if fnorm not in FNORMS:
        raise ValueError(f"advantage_fn_args.fnorm must be 'std' or 'none', got {fnorm!r}")


def _normalized(values: Sequence[float], fnorm: str, epsilon: float) -> list[float]:
    if len(values) == 1:
        return [values[0] / (1.0 + epsilon)]
    if all(v == values[0] for v in values):
        return [0.0] * len(values)
    mean = sum(values) / len(values)
    d = 1.0
    if fnorm == "std":
        d = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return [(v - mean) / (d + epsilon) for v in values]


def _discounted(rewards: Sequence[float], gamma: float) -> list[float]:
    returns, running = [0.0] * len(rewards), 0.0
    for t in range(len(rewards) - 1, -1, -1):
        running = rewards[t] + gamma * running
        returns[t] = running
    return returns


@ADVANTAGE_FNS.register("gigpo")
def gigpo_advantages(
    tasks: Sequence[Sequence[Sequence[Turn]]],
    omega: float = 1.0,
    gamma: float = 1.0,
    fnorm: str = "none",
    epsilon: float = 1e-6,
) -> tuple[list[list[list[float]]], dict[str, float]]:
    """``tasks[i][j][t]``: turn t of episode j of task i as (r_t, state hash or None).

    Returns the advantage of every turn in the same nesting, and the original's metrics.
    """
    check_gigpo_args({"fnorm": fnorm})
    a_e: list[list[float]] = []  # per task, per episode
    returns: list[list[list[float]]] = []
    episode_means = []
    for episodes in tasks:
        totals = [sum(r for r, _ in turns) for turns in episodes]
        a_e.append(_normalized(totals, fnorm, epsilon))
        episode_means.append(sum(totals) / len(totals) if totals else 0.0)
        returns.append([_discounted([r for r, _ in turns], gamma) for turns in episodes])

    anchors: dict[str, list[tuple[int, int, int]]] = {}
    for i, episodes in enumerate(tasks):
        for j, turns in enumerate(episodes):
            for t, (_, state) in enumerate(turns):
                if state is not None:
                    anchors.setdefault(str(state), []).append((i, j, t))
    a_s = {}
    for members in anchors.values():
        if len(members) > 1:
            values = [returns[i][j][t] for i, j, t in members]
            a_s.update(zip(members, _normalized(values, fnorm, epsilon), strict=True))

    advantages = [
        [
            [a_e[i][j] + omega * a_s.get((i, j, t), 0.0) for t in range(len(turns))]
            for j, turns in enumerate(episodes)
        ]
        for i, episodes in enumerate(tasks)
    ]
    turn_a_e = [
        a_e[i][j] for i, eps in enumerate(tasks) for j, turns in enumerate(eps) for _ in turns
    ]
    shared = sum(1 for members in anchors.values() if len(members) > 1)
    metrics = {
        "gigpo/episode_reward_mean": sum(episode_means) / len(episode_means) if tasks else 0.0,
        "gigpo/anchor_groups_total": float(len(anchors)),
        "gigpo/anchor_groups_size_gt1": float(shared),
        "gigpo/anchor_group_hit_ratio": shared / len(anchors) if anchors else 0.0,
    }
    if turn_a_e:  # per turn, as the original
        metrics["gigpo/mean_abs_A_E"] = sum(abs(v) for v in turn_a_e) / len(turn_a_e)
        metrics["gigpo/mean_abs_A_S"] = sum(abs(v) for v in a_s.values()) / len(turn_a_e)
    return advantages, metrics


gigpo_advantages.check_args = check_gigpo_args  # the config check reads it (as PolicyLoss's)


def gigpo_hook(advantage_fn_args: Mapping[str, Any] | None = None) -> Callable[[list], dict]:
    """The explorer's hook: set every experience's ``advantages`` (see the module doc)."""
    args = {**GIGPO_DEFAULTS, **(advantage_fn_args or {})}
    check_gigpo_args(args)
    reward_key = args.pop("step_reward_key")
    hash_key = args.pop("env_state_hash_key")

    def turns_of(episode: list[Any]) -> list[Turn]:
        if any(reward_key in exp.info for exp in episode):
            rewards = [float(exp.info.get(reward_key, 0.0)) for exp in episode]
        else:
            rewards = [0.0] * (len(episode) - 1) + [float(episode[-1].reward)]
        return [(r, exp.info.get(hash_key)) for r, exp in zip(rewards, episode, strict=True)]

    def apply(experiences: list[Any]) -> dict[str, float]:
        by_task: dict[Hashable, list[list[Any]]] = {}
        for (task, _), episode in episodes_of(experiences).items():
            episode.sort(key=lambda exp: exp.info.get("step", 0))
            by_task.setdefault(task, []).append(episode)
        tasks = list(by_task.values())
        advantages, metrics = gigpo_advantages(
            [[turns_of(episode) for episode in episodes] for episodes in tasks], **args
        )
        for episodes, task_advantages in zip(tasks, advantages, strict=True):
            for episode, episode_advantages in zip(episodes, task_advantages, strict=True):
                for exp, a in zip(episode, episode_advantages, strict=True):
                    exp.advantages = [a * float(m) for m in exp.loss_mask]
        return metrics

    return apply
