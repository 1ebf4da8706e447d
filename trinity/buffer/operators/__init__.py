"""Experience operators: what happens to a step's experiences between the explorer and the buffer.

The original's ``data_processor.experience_pipeline.operators`` (a list of ``{name, args}``) with
its names and arguments. They run in the explorer on each step's experiences, in the listed order,
before the group advantages (as in the original), so a filtered group never skews a baseline.
Each operator is ``process(experiences) -> (kept experiences, metrics)``; the explorer logs the
metrics as ``experience_pipeline/<metric>``. Plugins add operators with
``@OPERATORS.register("name")`` on a class taking the operator's ``args``.

Groups are the explorer's: the ``repeat_times`` rollouts of one task in one step (``group_id``).
Filters only drop, as the original's do; refilling the step is the explorer's (dynamic sampling:
while a step holds fewer experiences than it rolled out for, it rolls out the taskset's next
batches, see ``Explorer.explore_step``). Without that a trainer in sync mode, waiting for
``train_batch_size`` experiences, would wait on an explorer that waits for its weights.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from trinity.registry import EXPERIENCE_OPERATORS as OPERATORS
from trinity.workflows.types import Experience

Metrics = dict[str, float]
SQLITE_URL = "sqlite:///"
DATA_JUICER = "data_juicer"  # the original's Data-Juicer operator, which needs its service


def groups(experiences: Iterable[Experience]) -> dict[str, list[Experience]]:
    """The step's task groups, in first-seen order."""
    by_group: dict[str, list[Experience]] = defaultdict(list)
    for exp in experiences:
        by_group[exp.group_id or exp.task_id].append(exp)
    return dict(by_group)


def _keep_groups(
    experiences: list[Experience], name: str, keep: Callable[[list[Experience]], bool]
) -> tuple[list[Experience], Metrics]:
    kept_groups = {key for key, group in groups(experiences).items() if keep(group)}
    kept = [exp for exp in experiences if (exp.group_id or exp.task_id) in kept_groups]
    total = len(groups(experiences))
    return kept, {
        f"{name}/filtered_count": float(len(experiences) - len(kept)),
        f"{name}/kept_group_count": float(len(kept_groups)),
        f"{name}/filtered_group_count": float(total - len(kept_groups)),
    }


@OPERATORS.register("reward_filter")
class RewardFilter:
    """Keep experiences whose reward is at least ``threshold`` (RAFT-style rejection sampling)."""

    def __init__(self, threshold: float = 0.0):
        self.threshold = float(threshold)

    def process(self, experiences: list[Experience]) -> tuple[list[Experience], Metrics]:
        kept = [exp for exp in experiences if exp.reward >= self.threshold]
        return kept, {"reward_filter/filtered_count": float(len(experiences) - len(kept))}


@OPERATORS.register("reward_std_filter")
class RewardStdFilter:
    """Drop task groups of fewer than two experiences or whose rewards' population standard
    deviation is at most ``threshold``: with GRPO they would all get advantage 0."""

    def __init__(self, threshold: float = 0.0):
        self.threshold = float(threshold)

    def process(self, experiences: list[Experience]) -> tuple[list[Experience], Metrics]:
        def varied(group: list[Experience]) -> bool:
            rewards = [exp.reward for exp in group]
            return len(rewards) > 1 and statistics.pstdev(rewards) > self.threshold

        return _keep_groups(experiences, "reward_std_filter", varied)


@OPERATORS.register("dapo_dynamic_sampling")
class DapoDynamicSampling:
    """DAPO's dynamic sampling: keep groups that are neither all correct nor all wrong, where an
    experience is correct when its ``metric_key`` (a reward component, else an ``info`` entry,
    else the reward) exceeds ``correct_threshold``."""

    def __init__(self, metric_key: str = "accuracy", correct_threshold: float = 0.0):
        self.metric_key = metric_key
        self.correct_threshold = float(correct_threshold)

    def correct(self, exp: Experience) -> bool:
        value = exp.reward_components.get(self.metric_key, exp.info.get(self.metric_key))
        return float(exp.reward if value is None else value) > self.correct_threshold

    def process(self, experiences: list[Experience]) -> tuple[list[Experience], Metrics]:
        def mixed(group: list[Experience]) -> bool:
            return 0 < sum(self.correct(exp) for exp in group) < len(group)

        return _keep_groups(experiences, "dapo_dynamic_sampling", mixed)


@OPERATORS.register("invalid_reward_filter")
class InvalidRewardFilter:
    """Drop experiences whose reward is missing or not a finite number."""

    def process(self, experiences: list[Experience]) -> tuple[list[Experience], Metrics]:
        kept = [
            exp
            for exp in experiences
            if isinstance(exp.reward, int | float) and math.isfinite(exp.reward)
        ]
        return kept, {"invalid_reward_filter/filtered_count": float(len(experiences) - len(kept))}


@OPERATORS.register("mask_response_truncated")
class MaskResponseTruncated:
    """Zero the loss mask of responses cut at ``max_response_tokens``: they still count in their
    group's baseline but teach nothing themselves (DAPO's overlong filtering)."""

    def process(self, experiences: list[Experience]) -> tuple[list[Experience], Metrics]:
        masked = 0
        for exp in experiences:
            if exp.truncated:
                exp.loss_mask = [0] * len(exp.loss_mask)
                masked += 1
        return experiences, {"mask_response_truncated/masked_count": float(masked)}


SHAPING_OPS: dict[str, Callable[[float, float], float]] = {
    "ADD": lambda reward, value: reward + value,
    "SUB": lambda reward, value: reward - value,
    "MUL": lambda reward, value: reward * value,
    "DIV": lambda reward, value: reward / value,
}


@OPERATORS.register("reward_shaping_mapper")
class RewardShapingMapper:
    """``reward <op>= weight * value`` for each ``{stats_key, op_type: ADD|SUB|MUL|DIV, weight}``,
    the value read from the experience's ``info`` (else its reward components); an experience
    without the key is left alone, and so is a division by zero."""

    def __init__(self, reward_shaping_configs: list[dict[str, Any]] | None = None):
        self.configs = []
        for index, raw in enumerate(reward_shaping_configs or []):
            where = f"reward_shaping_configs[{index}]"
            if not isinstance(raw, dict) or not raw.get("stats_key"):
                raise ValueError(f"{where} needs a stats_key, got {raw!r}")
            unknown = set(raw) - {"stats_key", "op_type", "weight"}
            if unknown:
                raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
            op = str(raw.get("op_type", "ADD")).upper()
            if op not in SHAPING_OPS:
                raise ValueError(f"{where}.op_type must be one of {', '.join(SHAPING_OPS)}")
            self.configs.append((str(raw["stats_key"]), op, float(raw.get("weight", 1.0))))

    def process(self, experiences: list[Experience]) -> tuple[list[Experience], Metrics]:
        shaped = 0
        for exp in experiences:
            before = exp.reward
            for key, op, weight in self.configs:
                value = exp.info.get(key, exp.reward_components.get(key))
                if not isinstance(value, int | float) or (op == "DIV" and weight * value == 0):
                    continue
                exp.reward = SHAPING_OPS[op](exp.reward, weight * value)
            shaped += exp.reward != before
        return experiences, {"reward_shaping_mapper/shaped_count": float(shaped)}


@OPERATORS.register("pass_rate_calculator")
class PassRateCalculator:
    """Each task's pass rate this step (its group's mean reward), for the ``difficulty_based``
    task selector (``pass_rates``, by the task's taskset row) and as metrics."""

    def __init__(self) -> None:
        self.pass_rates: dict[int, float] = {}

    def process(self, experiences: list[Experience]) -> tuple[list[Experience], Metrics]:
        rates = []
        for group in groups(experiences).values():
            rate = statistics.fmean(exp.reward for exp in group)
            rates.append(rate)
            row = group[0].info.get("task_index", {}).get("index")
            if row is not None:
                self.pass_rates[int(row)] = rate
        if not rates:
            return experiences, {}
        return experiences, {
            "pass_rate_calculator/pass_rate/mean": statistics.fmean(rates),
            "pass_rate_calculator/all_pass_ratio": statistics.fmean(r >= 1.0 for r in rates),
            "pass_rate_calculator/all_fail_ratio": statistics.fmean(r <= 0.0 for r in rates),
        }

    def take_pass_rates(self) -> dict[int, float]:
        """The rates gathered since the last call (the selector's feedback)."""
        rates, self.pass_rates = self.pass_rates, {}
        return rates


class ExperiencePipeline:
    """The configured operators, in order; ``output`` also gets what they keep."""

    def __init__(
        self,
        operators: list[Any],
        output: Callable[[list[Experience]], None] | None = None,
    ):
        self.operators = operators
        self.output = output

    def process(self, experiences: list[Experience]) -> tuple[list[Experience], Metrics]:
        metrics: Metrics = {}
        for operator in self.operators:
            experiences, more = operator.process(experiences)
            metrics.update(more)
        if self.output is not None and experiences:
            self.output(experiences)
        return experiences, metrics

    def pass_rates(self) -> dict[int, float]:
        """Per-row pass rates from ``pass_rate_calculator`` operators since the last call."""
        rates: dict[int, float] = {}
        for operator in self.operators:
            if isinstance(operator, PassRateCalculator):
                rates.update(operator.take_pass_rates())
        return rates


def build_operator(name: str, args: dict[str, Any] | None) -> Any:
    """The operator ``name`` with its ``args``; ValueError / TypeError name what is wrong."""
    cls = OPERATORS.get(name)
    return cls(**dict(args or {}))


def build_pipeline(data_processor: Any) -> ExperiencePipeline:
    """From the config's ``data_processor`` section (validated: see ``trinity.config.validate``)."""
    pipeline = (data_processor or {}).get("experience_pipeline") or {}
    output = pipeline.get("output")
    return ExperiencePipeline(
        [build_operator(op["name"], op.get("args")) for op in pipeline.get("operators") or []],
        output=output_writer(output) if output else None,
    )


def output_writer(output: dict[str, Any]) -> Callable[[list[Experience]], None]:
    """Where ``experience_pipeline.output`` sends the processed experiences, besides the
    trainer: ``file`` appends JSON lines (``Experience.to_dict``) to ``path``; ``sqlite`` (a
    SQLite file, or its URL ``sqlite:///x.db``) or ``sql`` (any SQLAlchemy URL, or a SQLite file)
    adds rows to the database's ``explorer_output`` table."""
    from trinity.buffer.experience import build_experience_buffer

    kind, path = str(output.get("storage_type") or "file").lower(), str(output["path"])
    if kind == "file":
        target = Path(path).expanduser()
        target.parent.mkdir(parents=True, exist_ok=True)

        def append(experiences: list[Experience]) -> None:
            with target.open("a") as file:
                file.writelines(json.dumps(exp.to_dict()) + "\n" for exp in experiences)

        return append
    if kind == "sql" and "://" in path:
        return build_experience_buffer("sql", path).archive
    return build_experience_buffer("sqlite", path.removeprefix(SQLITE_URL)).archive


# the original's import path: its plugins import these from here
from trinity.compat.operators import (  # noqa: E402
    EXPERIENCE_OPERATORS,
    ExperienceOperator,
    ExperienceOperatorV1,
)

__all__ = ["EXPERIENCE_OPERATORS", "ExperienceOperator", "ExperienceOperatorV1"]
