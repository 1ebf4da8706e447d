"""The explorer's own logic against a fake sampler: no model, no HTTP.

Checked here: experiences of a step carry their group, model version and advantages; a sync point
waits for the required weights and switches the sampler; a failing workflow is retried, then
skipped without stopping the step; evaluation logs mean@k over every eval taskset.
"""

from __future__ import annotations

import asyncio

from loop_fakes import FakeSampler, explorer_for

from trinity.buffer.tasksets import TasksetReader
from trinity.registry import WORKFLOWS
from trinity.synchronizer.synchronizer import Synchronizer
from trinity.workflows import SimpleWorkflow

TASKSET = {
    "name": "arith",
    "path": "builtin:arithmetic",
    "builtin_args": {"size": 16, "max_operand": 3, "operators": ["+"]},
    "format": {"prompt_key": "question", "response_key": "answer"},
}
FAILURES: dict[str, int] = {}


@WORKFLOWS.register("test_flaky_workflow")
class FlakyWorkflow(SimpleWorkflow):
    """Fails the first ``workflow_args.fail_times`` runs of each task."""

    async def run(self):
        seen = FAILURES.get(self.task.task_id, 0)
        FAILURES[self.task.task_id] = seen + 1
        if seen < self.task.workflow_args.get("fail_times", 0):
            raise RuntimeError("flaky")
        return await super().run()


def reader(workflow: str = "simple_workflow", **taskset) -> TasksetReader:
    return TasksetReader(
        {**TASKSET, **taskset},
        repeat_times=4,
        batch_size=2,
        default_workflow=workflow,
        default_reward_fn="accuracy_reward",
    )


def test_a_step_puts_scored_grouped_experiences_with_advantages(tmp_path):
    sampler = FakeSampler(["2", "7"])  # the answers are sums of two operands <= 3
    explorer, buffer, monitor, _ = explorer_for(tmp_path, sampler, reader())
    assert asyncio.run(explorer.run(0, 1)) == 1
    (put,) = buffer.puts
    assert len(put) == 2 * 4 and buffer.closed
    assert {exp.group_id for exp in put} == {"1/arith/0/0", "1/arith/0/1"}
    assert all(exp.model_version == 0 and len(exp.advantages) == exp.response_length for exp in put)
    for group in {e.group_id for e in put}:
        rewards = [e.reward for e in put if e.group_id == group]
        advantages = [e.advantages[0] for e in put if e.group_id == group]
        assert abs(sum(advantages)) < 1e-5
        assert (max(rewards) == min(rewards)) == all(a == 0 for a in advantages)
    assert sampler.requests[0][1] == 4 and sampler.requests[0][2].max_tokens == 8
    step, metrics = monitor.records[-1]
    assert step == 1 and metrics["experience_pipeline/experience_count"] == 8.0


def test_sync_points_wait_for_weights_and_switch_the_sampler(tmp_path):
    sampler = FakeSampler(["2"])
    sync = Synchronizer(tmp_path, sync_interval=1, sync_offset=0, sync_timeout=5, poll_seconds=0.01)
    explorer, buffer, _, _ = explorer_for(tmp_path, sampler, reader(), synchronizer=sync)

    async def main():
        exploring = asyncio.create_task(explorer.run(0, 3))
        await asyncio.sleep(0.2)
        assert len(buffer.puts) == 1  # step 2 needs the weights trained on step 1
        await sync.publish(1, "w1")
        await asyncio.sleep(0.2)
        assert len(buffer.puts) == 2
        await sync.publish(2, "w2")
        return await exploring

    assert asyncio.run(main()) == 3
    assert sampler.switches == ["w1", "w2"]
    assert [exp.model_version for put in buffer.puts for exp in put[:1]] == [0, 1, 2]


def test_a_failing_workflow_is_retried_then_skipped_and_the_step_goes_on(tmp_path):
    FAILURES.clear()
    sampler = FakeSampler(["2"])
    flaky = reader("test_flaky_workflow", workflow_args={"fail_times": 1})
    explorer, buffer, _, _ = explorer_for(tmp_path, sampler, flaky, max_retry_times=1)
    asyncio.run(explorer.run(0, 1))
    assert len(buffer.puts[0]) == 8 and set(FAILURES.values()) == {2}  # failed once, then ran

    FAILURES.clear()
    hopeless = reader("test_flaky_workflow", workflow_args={"fail_times": 5})
    explorer, buffer, monitor, _ = explorer_for(
        tmp_path / "b", sampler, hopeless, max_retry_times=1
    )
    asyncio.run(explorer.run(0, 1))
    assert buffer.puts == [[]] and set(FAILURES.values()) == {2}
    assert monitor.records[-1][1]["rollout/finished_task_count"] == 0.0


def test_evaluation_reports_mean_at_k_per_taskset(tmp_path):
    eval_reader = TasksetReader(
        {
            **TASKSET,
            "name": "eval",
            "builtin_args": {"size": 3, "max_operand": 3, "operators": ["+"]},
        },
        repeat_times=2,
        batch_size=2,
        is_eval=True,
        default_workflow="simple_workflow",
        default_reward_fn="accuracy_reward",
    )
    explorer, _, monitor, _ = explorer_for(
        tmp_path, FakeSampler(["no"]), reader(), eval_readers={"eval": eval_reader}
    )
    asyncio.run(explorer.evaluate(0))
    step, metrics = monitor.records[-1]
    assert step == 0 and metrics["eval/eval/reward/mean@2"] == 0.0
    assert {"eval/eval/reward/best@2", "eval/eval/reward/worst@2", "time/eval"} <= set(metrics)


def test_dynamic_sync_keeps_at_most_max_inflight_batches_ahead_of_the_trainer(tmp_path):
    """fully_async: the explorer never waits for weights, but never runs more than
    ``max_inflight_batches`` steps ahead of the batches the trainer read; the trainer here is
    another process's, seen through the run directory only."""
    trainer_side = Synchronizer(tmp_path, sync_style="fully_async")
    sync = Synchronizer(
        tmp_path, sync_style="fully_async", max_inflight_batches=2, poll_seconds=0.01
    )
    explorer, buffer, _, _ = explorer_for(tmp_path, FakeSampler(["2"]), reader(), synchronizer=sync)

    async def main():
        exploring = asyncio.create_task(explorer.run(0, 6))
        await asyncio.sleep(0.3)
        ahead = [len(buffer.puts)]  # the trainer read nothing yet
        for consumed in range(1, 5):
            await trainer_side.consumed(consumed)
            await asyncio.sleep(0.3)
            ahead.append(len(buffer.puts) - consumed)
        await exploring
        return ahead

    assert asyncio.run(main()) == [2, 2, 2, 2, 2]
    assert len(buffer.puts) == 6
