"""The explorer: taskset batches -> workflows -> experiences with group advantages -> buffer.

One explore step rolls out ``buffer.batch_size`` tasks, each ``repeat_times`` times, with at most
``engine_num x runner_per_model`` workflows in flight; their sample requests meet in the
backend, which decodes them as one batch. Advantages are computed here, per task group, so the
trainer stays algorithm-blind and every algorithm runs on every backend.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import statistics
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from trinity.backends.base import SamplerBackend
from trinity.buffer.experience import ExperienceBuffer
from trinity.buffer.operators import ExperiencePipeline
from trinity.buffer.operators import groups as groups_of
from trinity.buffer.tasksets import TasksetReader
from trinity.explorer.sampler import AuxiliaryModel, PolicySampler, RolloutSettings, derive_seed
from trinity.jobdir import JobDir
from trinity.monitor.base import Monitor
from trinity.monitor.rollouts import RolloutStore
from trinity.synchronizer.synchronizer import Synchronizer
from trinity.workflows import WORKFLOWS
from trinity.workflows.types import Experience, Task

log = logging.getLogger(__name__)

# Training tasks in a row that may end with no experience before the run stops: a workflow that
# fails on every task would otherwise leave the trainer waiting for max_read_timeout.
MAX_FAILED_TASKS_IN_A_ROW = 8
# Taskset batches one step may add when experience filters leave its batch short (DAPO's
# dynamic sampling; its max_num_gen_batches).
MAX_EXTRA_BATCHES = 4


class Explorer:
    def __init__(
        self,
        *,
        sampler: SamplerBackend,
        settings: RolloutSettings,
        reader: TasksetReader | None,  # None: evaluation only (mode bench)
        buffer: ExperienceBuffer | None,
        synchronizer: Synchronizer | None,
        monitor: Monitor,
        advantage_fn: Callable[[list[Experience]], dict[str, float]],
        runners: int = 8,
        seed: int = 42,
        max_retry_times: int = 2,
        max_timeout: float = 1800.0,
        eval_readers: dict[str, TasksetReader] | None = None,
        eval_interval: int = 0,
        eval_on_startup: bool = False,
        remote_rollout: Callable[[Task, int], Awaitable[list[Experience]]] | None = None,
        rollouts: RolloutStore | None = None,
        pipeline: ExperiencePipeline | None = None,
        job_dir: JobDir | None = None,
        auxiliary: Sequence[AuxiliaryModel] = (),
        over_rollout: tuple[float, float, bool] = (0.0, 30.0, False),
        dynamic_timeout: tuple[int, float] | None = None,
        max_repeat_times_per_runner: int | None = None,
    ):
        """``remote_rollout(task, seed)``: run workflows elsewhere (Ray runner actors) instead of
        in this event loop; retries, timeouts and bookkeeping stay here either way.
        ``rollouts``: where each step's experiences are kept for looking at (``trinity studio``).
        ``pipeline``: the experience operators, run on each step's experiences before the group
        advantages (``data_processor.experience_pipeline``). ``job_dir``: where the taskset's
        position is recorded when a step reads extra batches, for resuming.
        ``auxiliary``: ``explorer.auxiliary_models``, handed to every workflow.
        ``over_rollout``: ``(ratio, wait_after_min, return_partial_tasks)``: a step moves on
        once ``ceil(tasks * (1 - ratio))`` of its tasks finished, waiting at most
        ``wait_after_min`` seconds more for the rest, which are then cancelled (keeping the runs
        that ended, with ``return_partial_tasks``). ``dynamic_timeout``:
        ``(warmup_min_steps, ratio)``: after that many steps a workflow run times out at ``ratio``
        times the mean duration of the successful training runs so far (at most ``max_timeout``).
        ``max_repeat_times_per_runner``: a task of more ``repeat_times`` runs as several parts of
        at most that many, each in its own runner slot with its own seed; their experiences form
        the one group (``info["run"]`` numbered across the parts)."""
        self.sampler = sampler
        self.settings = settings
        self.reader = reader
        self.buffer = buffer
        self.synchronizer = synchronizer
        self.monitor = monitor
        self.advantage_fn = advantage_fn
        self.runners = asyncio.Semaphore(max(1, runners))
        self.max_repeat_times_per_runner = max_repeat_times_per_runner
        self.seed = seed
        self.max_retry_times = max_retry_times
        self.max_timeout = max_timeout
        self.eval_readers = eval_readers or {}
        self.eval_interval = eval_interval
        self.eval_on_startup = eval_on_startup
        self.remote_rollout = remote_rollout
        self.rollouts = rollouts
        self.pipeline = pipeline or ExperiencePipeline([])
        self.job_dir = job_dir
        self.auxiliary = list(auxiliary)
        self.over_rollout_ratio, self.over_rollout_wait, self.keep_partial = over_rollout
        self.dynamic_timeout = dynamic_timeout
        self.run_durations: list[float] = []  # successful training workflow runs, seconds
        self.steps_explored = 0
        self.model_version = 0
        self.failed_in_a_row = 0
        self.last_failure = ""

    async def run(self, start_step: int, total_steps: int) -> int:
        """Explore steps ``start_step+1 .. total_steps``; returns the last step done."""
        step = start_step
        if self.eval_on_startup and self.eval_readers and start_step == 0:
            await self.evaluate(0)
        try:
            while step < total_steps:
                await self.synchronizer.wait_inflight(step)
                await self.maybe_sync(step)
                tasks = self.reader.read_batch()
                if not tasks:
                    break
                step += 1
                experiences, metrics = await self.explore_step(step, tasks)
                if self.job_dir is not None:
                    self.job_dir.record_taskset_position(step, self.reader.batches_read)
                if self.rollouts is not None:
                    self.rollouts.write(step, experiences)
                await self.buffer.put(experiences)
                self.monitor.log(metrics, step)
                if self.eval_interval and step % self.eval_interval == 0 and self.eval_readers:
                    await self.evaluate(step)
        finally:
            if self.job_dir is not None:
                self.job_dir.record_explorer_end(step)
            await self.buffer.close()
        return step

    async def maybe_sync(self, steps_done: int) -> None:
        if not self.synchronizer.explorer_should_sync(steps_done):
            return
        started = time.monotonic()
        wanted = self.synchronizer.required_version(steps_done, self.model_version)
        latest = await self.synchronizer.wait_for(wanted)
        metrics = {}
        if latest.version > self.model_version:
            loading = time.monotonic()
            await self.sampler.switch(latest.ref)
            metrics["explorer/time/load_weights"] = time.monotonic() - loading
            self.model_version = latest.version
            log.info(
                "explorer synced weights at step %d, model version = %d", steps_done, latest.version
            )
        metrics["explorer/time/wait_sync"] = time.monotonic() - started
        self.monitor.log(metrics, steps_done + 1)

    async def explore_step(
        self, step: int, tasks: list[Task]
    ) -> tuple[list[Experience], dict[str, float]]:
        """Roll out ``tasks``, run the experience pipeline, then the group advantages.

        Dynamic sampling: while the pipeline's filters leave fewer experiences than the batch
        was rolled out for, the step rolls out the taskset's next batches too (at most
        ``MAX_EXTRA_BATCHES``) and keeps whole groups up to that size, so the trainer's batch stays
        full and a trainer waiting for a full batch never waits on an explorer waiting for it.
        """
        started, cpu = time.monotonic(), time.process_time()
        target = sum(task.repeat_times for task in tasks)
        sampled: list[Experience] = []
        kept: list[Experience] = []
        rounds: list[dict[str, float]] = []
        finished = failed = extra_batches = 0
        cancelled = 0
        while True:
            groups, dropped = await self.run_tasks(tasks, step)
            cancelled += dropped
            self._count_failures(groups)
            finished += sum(1 for g in groups if g)
            failed += sum(1 for g in groups if not g)
            batch = [exp for group in groups for exp in group]
            sampled += batch
            batch, pipeline_metrics = self.pipeline.process(batch)
            kept += batch
            rounds.append(pipeline_metrics)
            pass_rates = self.pipeline.pass_rates()
            if pass_rates and self.reader is not None:
                self.reader.feedback(pass_rates)  # an adaptive selector picks the next batch
            if len(kept) >= target or len(kept) == len(sampled) or self.reader is None:
                break
            if extra_batches == MAX_EXTRA_BATCHES or not (tasks := self.reader.read_batch()):
                log.warning(
                    "step %d: the experience pipeline kept %d of the %d experiences a batch needs "
                    "after %d extra batches; the trainer waits for the rest",
                    step,
                    len(kept),
                    target,
                    extra_batches,
                )
                break
            extra_batches += 1
        if extra_batches:
            kept = whole_groups_up_to(kept, target)
        metrics = rollout_metrics(sampled, prefix="rollout")  # what was sampled
        metrics.update({f"experience_pipeline/{k}": v for k, v in merge_rounds(rounds).items()})
        advantage_metrics = self.advantage_fn(kept)
        metrics.update({f"experience_pipeline/{k}": v for k, v in advantage_metrics.items()})
        metrics.update(
            {
                "rollout/model_version": float(self.model_version),
                "rollout/finished_task_count": float(finished),
                "rollout/failed_task_count": float(failed),
                "experience_pipeline/experience_count": float(len(kept)),
                "experience_pipeline/extra_batch_count": float(extra_batches),
                "explorer/time/explore_step": time.monotonic() - started,
                "explorer/time/explore_step_cpu": time.process_time() - cpu,  # all threads
            }
        )
        if self.over_rollout_ratio:
            metrics["rollout/over_rollout_cancelled_task_count"] = float(cancelled)
        if self.dynamic_timeout is not None:
            metrics["rollout/timeout"] = self.task_timeout()
        self.steps_explored += 1
        return kept, metrics

    async def run_tasks(self, tasks: list[Task], step: int) -> tuple[list[list[Experience]], int]:
        """Each task's experiences, in order; with over-rollout only those of the tasks that
        finished in time (and how many were cancelled)."""
        partial: list[list[Experience]] = [[] for _ in tasks]
        jobs = [
            asyncio.ensure_future(
                self.run_task(t, step, i, finished_runs=partial[i] if self.keep_partial else None)
            )
            for i, t in enumerate(tasks)
        ]
        if not self.over_rollout_ratio:
            return list(await asyncio.gather(*jobs)), 0
        enough = math.ceil(len(jobs) * (1.0 - self.over_rollout_ratio))
        try:
            for finished, job in enumerate(asyncio.as_completed(jobs), start=1):
                await job
                if finished >= enough:
                    break
            running = [job for job in jobs if not job.done()]
            if running:
                await asyncio.wait(running, timeout=self.over_rollout_wait)
        finally:
            for job in jobs:
                job.cancel()
            await asyncio.gather(*jobs, return_exceptions=True)
        groups = [
            job.result() if not job.cancelled() else self._stamp(runs, task, step)
            for job, runs, task in zip(jobs, partial, tasks, strict=True)
            if not job.cancelled() or runs
        ]
        return groups, sum(job.cancelled() for job in jobs)

    def task_timeout(self, is_eval: bool = False) -> float:
        """``max_timeout``, or the dynamic one once its warm-up steps are explored."""
        if is_eval or self.dynamic_timeout is None or not self.run_durations:
            return self.max_timeout
        warmup_steps, ratio = self.dynamic_timeout
        if self.steps_explored < warmup_steps:
            return self.max_timeout
        return min(self.max_timeout, ratio * statistics.fmean(self.run_durations))

    def _count_failures(self, groups: list[list[Experience]]) -> None:
        for group in groups:
            self.failed_in_a_row = 0 if group else self.failed_in_a_row + 1
            if self.failed_in_a_row >= MAX_FAILED_TASKS_IN_A_ROW:
                raise RuntimeError(
                    f"{self.failed_in_a_row} tasks in a row produced no experience "
                    f"(last failure: {self.last_failure or 'the workflow returned none'}); "
                    "stopping instead of waiting for experiences that will not come"
                )

    async def run_task(
        self,
        task: Task,
        step: int,
        index: int,
        *,
        is_eval: bool = False,
        finished_runs: list[Experience] | None = None,
    ) -> list[Experience]:
        """One workflow run with retries and a timeout; a task that keeps failing yields nothing.
        ``finished_runs`` collects the runs of a non-repeatable workflow as each ends (in-process
        rollouts), for over-rollout's ``return_partial_tasks`` (not kept for a split task)."""
        limit = self.max_repeat_times_per_runner
        if not limit or task.repeat_times <= limit:
            return await self._run_part(task, step, is_eval, finished_runs)
        offsets = range(0, task.repeat_times, limit)
        parts = await asyncio.gather(
            *(
                self._run_part(
                    dataclasses.replace(task, repeat_times=min(limit, task.repeat_times - first)),
                    step,
                    is_eval,
                    None,
                    first_run=first,
                )
                for first in offsets
            )
        )
        return [exp for part in parts for exp in part]

    async def _run_part(
        self,
        task: Task,
        step: int,
        is_eval: bool,
        finished_runs: list[Experience] | None,
        first_run: int = 0,
    ) -> list[Experience]:
        """``task``'s runs ``first_run ...`` (all of them unless split)."""
        for attempt in range(self.max_retry_times + 1):
            seed = derive_seed(
                self.seed, "eval" if is_eval else "train", step, task.task_id, attempt
            )
            if first_run:
                seed = derive_seed(seed, "part", first_run)
            if finished_runs is not None:
                finished_runs.clear()  # runs of an earlier, failed attempt do not count
            try:
                async with self.runners:
                    started = time.monotonic()
                    experiences = await asyncio.wait_for(
                        self.remote_rollout(task, seed)
                        if self.remote_rollout
                        else rollout(
                            task, self.sampler, self.settings, seed, self.auxiliary, finished_runs
                        ),
                        self.task_timeout(is_eval),
                    )
                    if not is_eval:
                        self.run_durations.append(time.monotonic() - started)
            except Exception as exc:  # noqa: BLE001 - a workflow is user code; report and retry
                self.last_failure = f"task {task.task_id}: {type(exc).__name__}: {exc}"
                log.warning(
                    "task %s failed (attempt %d): %s: %s",
                    task.task_id,
                    attempt + 1,
                    type(exc).__name__,
                    exc,
                )
                continue
            if not experiences:
                log.warning("task %s: the workflow returned no experiences; skipped", task.task_id)
            if first_run:
                for exp in experiences:
                    exp.info["run"] = exp.info.get("run", 0) + first_run
            return self._stamp(experiences, task, step, is_eval)
        return []

    def _stamp(
        self, experiences: list[Experience], task: Task, step: int, is_eval: bool = False
    ) -> list[Experience]:
        """The task's group, the model version, and the original's ``task_index``."""
        group_id = f"{step}/{task.task_id}"
        for exp in experiences:
            exp.group_id = group_id
            exp.model_version = self.model_version
            exp.is_eval = is_eval
            if task.row is not None:  # the original's key, which pass_rate_calculator reads
                exp.info.setdefault("task_index", {"taskset_id": 0, "index": task.row})
        return experiences

    async def evaluate(self, step: int, prefix: str = "eval") -> None:
        """mean@k etc. over every eval taskset, logged as ``<prefix>/<taskset>/...``."""
        started = time.monotonic()
        metrics: dict[str, float] = {}
        for name, reader in self.eval_readers.items():
            tasks = reader.all_tasks()
            groups = await asyncio.gather(
                *(self.run_task(task, step, i, is_eval=True) for i, task in enumerate(tasks))
            )
            metrics.update(eval_metrics(groups, prefix=f"{prefix}/{name}"))
        metrics[f"time/{prefix}"] = time.monotonic() - started
        self.monitor.log(metrics, step)


async def rollout(
    task: Task,
    backend: SamplerBackend,
    settings: RolloutSettings,
    seed: int,
    auxiliary: Sequence[AuxiliaryModel] = (),
    finished_runs: list[Experience] | None = None,
) -> list[Experience]:
    """One run of the task's workflow against a backend sampler (here or in a runner actor).

    A workflow that cannot repeat runs once per ``repeat_times``, concurrently, each episode with
    its own sampler; a failed episode is dropped (logged) unless all fail. Each episode's
    experiences also go to ``finished_runs`` as it ends (what survives a cancellation).
    """
    workflow = WORKFLOWS.get(task.workflow)
    concatenated = bool(task.format.get("enable_concatenated_multi_turn"))

    def instance(task: Task, episode_seed: int) -> Any:
        model = PolicySampler(backend, settings, seed=episode_seed, concatenated=concatenated)
        run = workflow(task, model)
        run.auxiliary_model_wrappers = [
            aux.model(derive_seed(episode_seed, "auxiliary", i)) for i, aux in enumerate(auxiliary)
        ]
        return run

    if workflow.can_repeat:
        return await instance(task, seed).run()
    single = dataclasses.replace(task, repeat_times=1)

    async def episode(run: int) -> list[Experience]:
        experiences = await instance(single, derive_seed(seed, "run", run)).run()
        for exp in experiences:
            exp.info["run"] = run
        if finished_runs is not None:
            finished_runs.extend(experiences)
        return experiences

    results = await asyncio.gather(
        *(episode(run) for run in range(task.repeat_times)), return_exceptions=True
    )
    failures = [r for r in results if isinstance(r, BaseException)]
    if len(failures) == len(results):
        raise failures[0]
    for failure in failures:
        log.warning(
            "task %s: an episode failed and is dropped: %s: %s",
            task.task_id,
            type(failure).__name__,
            failure,
        )
    return [exp for r in results if not isinstance(r, BaseException) for exp in r]


def whole_groups_up_to(experiences: list[Experience], size: int) -> list[Experience]:
    """Groups in order until they hold at least ``size`` experiences; the rest are dropped."""
    out: list[Experience] = []
    for group in groups_of(experiences).values():
        if len(out) >= size:
            break
        out += group
    return out


def merge_rounds(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Pipeline metrics of several rounds: counts add up, other values are averaged."""
    merged: dict[str, list[float]] = defaultdict(list)
    for metrics in rounds:
        for key, value in metrics.items():
            merged[key].append(value)
    return {
        key: sum(values) if key.endswith("count") else statistics.fmean(values)
        for key, values in merged.items()
    }


def rollout_metrics(experiences: list[Experience], prefix: str) -> dict[str, float]:
    """``<prefix>/<component>/{mean,max,min}`` for each reward component, and the summed reward."""
    by_key: dict[str, list[float]] = defaultdict(list)
    for exp in experiences:
        by_key["reward"].append(exp.reward)
        for key, value in exp.reward_components.items():
            by_key[key].append(value)
        by_key["response_length"].append(float(exp.response_length))
    metrics = {}
    for key, values in by_key.items():
        metrics[f"{prefix}/{key}/mean"] = statistics.fmean(values)
        metrics[f"{prefix}/{key}/max"] = max(values)
        metrics[f"{prefix}/{key}/min"] = min(values)
    return metrics


def eval_metrics(groups: list[list[Experience]], prefix: str) -> dict[str, float]:
    """mean@k / std@k / best@k / worst@k over tasks, each task rolled out k times."""
    per_key: dict[str, list[list[float]]] = defaultdict(list)
    for group in groups:
        if not group:
            continue
        keys = {"reward", *group[0].reward_components}
        for key in keys:
            per_key[key].append(
                [
                    exp.reward if key == "reward" else exp.reward_components.get(key, 0.0)
                    for exp in group
                ]
            )
    metrics = {}
    for key, samples in per_key.items():
        k = max(len(s) for s in samples)
        metrics[f"{prefix}/{key}/mean@{k}"] = statistics.fmean(statistics.fmean(s) for s in samples)
        metrics[f"{prefix}/{key}/std@{k}"] = statistics.fmean(statistics.pstdev(s) for s in samples)
        metrics[f"{prefix}/{key}/best@{k}"] = statistics.fmean(max(s) for s in samples)
        metrics[f"{prefix}/{key}/worst@{k}"] = statistics.fmean(min(s) for s in samples)
    return metrics
