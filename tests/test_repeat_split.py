"""explorer.max_repeat_times_per_runner: a task's repeat_times split across runner slots."""

from __future__ import annotations

import asyncio

import pytest
from loop_fakes import FakeSampler, RecordingMonitor

from trinity.explorer.explorer import Explorer
from trinity.explorer.sampler import RolloutSettings
from trinity.registry import WORKFLOWS
from trinity.workflows import types
from trinity.workflows.types import Task
from trinity.workflows.workflows import Workflow

CALLS: list[tuple[int, int]] = []  # (repeat_times seen, the sampler's seed)


@WORKFLOWS.register("split_probe_workflow")
class Probe(Workflow):
    async def run(self):
        CALLS.append((self.task.repeat_times, self.model.seed))
        return [
            types.Experience(
                tokens=[1, 2],
                prompt_length=1,
                logprobs=[-0.1],
                loss_mask=[1],
                reward=1.0,
                info={"run": run},
            )
            for run in range(self.task.repeat_times)
        ]


@pytest.mark.parametrize(("limit", "parts"), [(None, [5]), (5, [5]), (2, [2, 2, 1])])
def test_a_task_splits_into_parts_of_at_most_the_limit(limit, parts):
    CALLS.clear()
    explorer = Explorer(
        sampler=FakeSampler(["x"]),
        settings=RolloutSettings(),
        reader=None,
        buffer=None,
        synchronizer=None,
        monitor=RecordingMonitor(),
        advantage_fn=lambda e: {},
        max_repeat_times_per_runner=limit,
    )
    task = Task("t0", {}, "split_probe_workflow", repeat_times=5)
    group = asyncio.run(explorer.run_task(task, 3, 0))
    assert sorted(n for n, _ in CALLS) == sorted(parts)
    assert len({seed for _, seed in CALLS}) == len(parts)  # each part samples differently
    assert sorted(exp.info["run"] for exp in group) == [0, 1, 2, 3, 4]
    assert {exp.group_id for exp in group} == {"3/t0"}
