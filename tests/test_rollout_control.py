"""over_rollout and dynamic_timeout change which tasks a step keeps: the step returns once the
first ceil(N * (1 - ratio)) tasks finished, and runs far slower than the observed ones time out."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest
from loop_fakes import FakeSampler
from test_explorer import TASKSET, explorer_for
from test_strategies import config_with

from trinity.buffer.tasksets import TasksetReader
from trinity.config import ConfigError
from trinity.registry import WORKFLOWS
from trinity.workflows import SimpleWorkflow

DELAYS: dict[int, float] = {}  # task row -> seconds its workflow sleeps first


def reader(batch_size: int) -> TasksetReader:
    return TasksetReader(
        TASKSET,
        repeat_times=2,
        batch_size=batch_size,
        default_workflow="test_slow_workflow",
        default_reward_fn="accuracy_reward",
    )


@WORKFLOWS.register("test_slow_workflow")
class SlowWorkflow(SimpleWorkflow):
    async def run(self):
        await asyncio.sleep(DELAYS.get(self.task.row, 0.0))
        return await super().run()


def test_over_rollout_returns_when_the_first_tasks_finish(tmp_path):
    DELAYS.clear()
    DELAYS.update({0: 0.0, 1: 0.05, 2: 0.1, 3: 30.0})
    explorer, *_ = explorer_for(
        tmp_path,
        FakeSampler(["2"]),
        reader(4),
        over_rollout=(0.25, 0.2, False),  # 3 of 4 tasks, then at most 0.2 s for the last
    )

    async def main():
        tasks = explorer.reader.read_batch()
        started = time.monotonic()
        kept, metrics = await explorer.explore_step(1, tasks)
        return kept, metrics, time.monotonic() - started

    kept, metrics, took = asyncio.run(main())
    assert took < 5
    assert sorted({e.group_id for e in kept}) == [f"1/arith/0/{i}" for i in range(3)]
    assert metrics["rollout/over_rollout_cancelled_task_count"] == 1.0
    assert metrics["rollout/failed_task_count"] == 0.0


RUN_DELAYS: dict[int, list[float]] = {}  # task row -> each run's delay, in call order


@WORKFLOWS.register("test_slow_runs_workflow")
class SlowRunsWorkflow(SimpleWorkflow):
    can_repeat = False  # one run per repeat, so a task can end partly done

    async def run(self):
        delays = RUN_DELAYS.get(self.task.row)
        await asyncio.sleep(delays.pop(0) if delays else 0.0)
        return await super().run()


@pytest.mark.parametrize("keep_partial", [True, False])
def test_return_partial_tasks_keeps_the_runs_a_cancelled_task_finished(tmp_path, keep_partial):
    RUN_DELAYS.clear()
    RUN_DELAYS.update({1: [0.0, 30.0]})  # task 1: its first run ends, its second hangs
    explorer, *_ = explorer_for(
        tmp_path,
        FakeSampler(["2"]),
        TasksetReader(
            TASKSET,
            repeat_times=2,
            batch_size=2,
            default_workflow="test_slow_runs_workflow",
            default_reward_fn="accuracy_reward",
        ),
        over_rollout=(0.5, 0.1, keep_partial),
    )
    kept, metrics = asyncio.run(explorer.explore_step(1, explorer.reader.read_batch()))
    groups = Counter(e.group_id for e in kept)
    expected = {"1/arith/0/0": 2, "1/arith/0/1": 1} if keep_partial else {"1/arith/0/0": 2}
    assert groups == expected
    assert metrics["rollout/over_rollout_cancelled_task_count"] == 1.0


def test_over_rollout_keeps_late_tasks_that_finish_within_wait_after_min(tmp_path):
    DELAYS.clear()
    DELAYS.update({3: 0.3})
    explorer, *_ = explorer_for(
        tmp_path,
        FakeSampler(["2"]),
        reader(4),
        over_rollout=(0.5, 5.0, False),
    )
    kept, metrics = asyncio.run(explorer.explore_step(1, explorer.reader.read_batch()))
    assert len({e.group_id for e in kept}) == 4
    assert metrics["rollout/over_rollout_cancelled_task_count"] == 0.0


def test_dynamic_timeout_drops_runs_far_slower_than_the_observed_ones(tmp_path):
    DELAYS.clear()
    explorer, *_ = explorer_for(
        tmp_path,
        FakeSampler(["2"]),
        reader(2),
        dynamic_timeout=(1, 3.0),
        max_retry_times=0,
    )

    async def main():
        first = await explorer.explore_step(1, explorer.reader.read_batch())
        DELAYS.update({2: 20.0})  # the next batch's first task hangs
        started = time.monotonic()
        second = await explorer.explore_step(2, explorer.reader.read_batch())
        return first, second, time.monotonic() - started

    (kept1, m1), (kept2, m2), took = asyncio.run(main())
    assert m1["rollout/timeout"] == 1800.0 and len({e.group_id for e in kept1}) == 2
    assert m2["rollout/timeout"] < 1.0 and took < 5  # not max_timeout (1800 s)
    assert {e.group_id for e in kept2} == {"2/arith/0/3"}
    assert m2["rollout/failed_task_count"] == 1.0


def test_rollout_control_config_is_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"over_rollout.ratio must be in \[0, 1\)"):
        config_with(
            tmp_path,
            **{"explorer.over_rollout.ratio": 1.0, "synchronizer.sync_style": "explorer_driven"},
        )
    with pytest.raises(ConfigError, match="dynamic_timeout.ratio must be > 0"):
        config_with(
            tmp_path,
            **{"explorer.dynamic_timeout.enable": True, "explorer.dynamic_timeout.ratio": 0},
        )
