"""Modes: ``both`` (explorer + trainer in one process), ``explore`` / ``train`` (two processes
sharing a SQLite buffer and the checkpoint dir), ``bench`` (evaluate checkpoints), ``serve`` (the
policy as an OpenAI-compatible service for external agents, beside a ``train`` process).

Everything a run needs is built here from the validated config (the backends in
``launcher/backends.py``); the explorer and trainer get their parts injected and never look at
the config or the backend kind.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trinity.algorithms import (
    adam_params_fn,
    build_loss_plan,
    explorer_hook,
    resolve_algorithm,
)
from trinity.buffer.experience import build_experience_buffer
from trinity.buffer.operators import build_pipeline
from trinity.buffer.sft import sft_dataset, sft_sequence
from trinity.buffer.strategies import build_strategy
from trinity.buffer.tasksets import TasksetReader, TasksetScheduler
from trinity.config import to_yaml
from trinity.config.validate import SAMPLE_STRATEGY_ARGS
from trinity.engine.process import apply_thread_budget, pin_threads, thread_budget
from trinity.explorer.explorer import Explorer
from trinity.jobdir import JobDir, atomic_write
from trinity.launcher.backends import (
    Backends,
    build_backends,
    build_critic,
    chat_template,
    check_credentials,
    critic_base,
    merged_start,
    rollout_settings,
)
from trinity.launcher.cluster import connect
from trinity.monitor import build_monitors
from trinity.monitor.base import RoleMonitor
from trinity.monitor.jsonl import forget_steps_after
from trinity.monitor.rollouts import RolloutStore
from trinity.synchronizer.synchronizer import Synchronizer
from trinity.trainer.trainer import Trainer

log = logging.getLogger("trinity")


def run(
    config: Any,
    *,
    init_ref: str | None = None,
    server_dir: Path | None = None,
    critic_from_init: bool = False,
) -> int:
    """Run the configured mode (or each of ``stages`` in turn) to the end; returns exit status.

    Each stage starts from the previous stage's last checkpoint (``init_ref``: its weights, with a
    fresh optimizer), as the original seeds a stage's ``model_path`` with the previous stage's
    weights; so does its critic unless ``model.critic_model_path`` is set (``critic_from_init``),
    as the original's critic path defaults to that seeded ``model_path``. With ``base_url: local``
    the stages share one server store (``server_dir``), where the previous stage's ``tinker://``
    state lives.
    """
    if config.stages:
        shared = JobDir(config.checkpoint_job_dir).server_dir
        for stage in config.stages:
            log.info("stage %s%s", stage.stage_name, f" from {init_ref}" if init_ref else "")
            run(
                stage.config,
                init_ref=init_ref,
                server_dir=shared,
                critic_from_init=not config.model.critic_model_path,
            )
            latest = JobDir(stage.config.checkpoint_job_dir).latest_checkpoint()
            init_ref = latest[1] if latest else init_ref
        return 0
    check_credentials(config)
    job_dir = JobDir(config.checkpoint_job_dir)
    job_dir.path.mkdir(parents=True, exist_ok=True)
    _setup_logging(job_dir.log_dir, os.environ.get("TRINITY_LOG_LEVEL") or config.log.level)
    mode = config.mode
    if mode == "bench":
        asyncio.run(run_bench(config))
    elif mode == "serve":
        asyncio.run(run_serve(config))
    else:
        explore, train = mode in ("both", "explore"), mode in ("both", "train")
        if config.trainer.trainer_type == "verl" and not config.model.tinker.enable:
            log.info("trainer.trainer_type 'verl': training runs on the local engine")
        asyncio.run(
            run_rl(
                config,
                explore=explore,
                train=train,
                init_ref=init_ref,
                server_dir=server_dir,
                critic_from_init=critic_from_init,
            )
        )
    return 0


async def run_rl(
    config: Any,
    *,
    explore: bool,
    train: bool,
    init_ref: str | None = None,
    server_dir: Path | None = None,
    critic_from_init: bool = False,
) -> None:
    """``init_ref``: the weights a stage starts from (a resumed checkpoint of its own wins); the
    critic's too with ``critic_from_init``."""
    job_dir = JobDir(config.checkpoint_job_dir)
    atomic_write(job_dir.config_file, to_yaml(config))  # what tools show as the run's config
    resume = job_dir.latest_checkpoint() if config.continue_from_checkpoint else None
    start_step, resume_ref = resume if resume else (0, None)
    if resume:
        log.info("resuming after step %d from %s", start_step, resume_ref)
        init_ref = None
    buffer_cfg = config.buffer
    algorithm = config.algorithm
    reader, eval_readers = None, {}
    if explore:  # every taskset is read and checked before any server or engine starts
        reader = _train_reader(config)
        reader.skip_batches(job_dir.taskset_batches_read(start_step))
        eval_readers = _eval_readers(config)
    settings = resolve_algorithm(algorithm)
    sft = train and not explore and settings.schema != "experience"  # a dataset: sft, cpt or dpo
    sft_data = expert_data = None
    if sft:
        sft_data = _sft_rows(config, buffer_cfg.trainer_input.experience_buffer, settings.schema)
    if train and settings.sample_strategy == "mix":  # read and checked before any engine starts
        args = {**SAMPLE_STRATEGY_ARGS["mix"], **algorithm.sample_strategy_args}
        expert_data = _sft_rows(
            config, buffer_cfg.trainer_input.auxiliary_buffers[args["sft_dataset_name"]]
        )
    total_steps = buffer_cfg.total_steps or config.trainer.total_steps
    if not total_steps:
        total_steps = (
            math.ceil(len(sft_data) * buffer_cfg.total_epochs / buffer_cfg.train_batch_size)
            if sft
            else reader.total_steps()
        )
    roles = [role for role, on in (("explorer", explore), ("trainer", train)) if on]
    if resume:  # the steps after the checkpoint are redone: each is logged once
        forget_steps_after(job_dir.metrics_file, start_step, roles)
    monitor = build_monitors(
        config.monitor.monitor_type,
        job_dir=job_dir.path,
        project=config.project,
        group=config.group,
        name=config.name,
        total_steps=total_steps,
        monitor_args=config.monitor.monitor_args,
    )
    async with _owned(monitor) as owned:
        cluster = owned.cluster = connect(config, explore=explore)
        budget = apply_thread_budget(
            thread_budget(compute_processes(config, cluster), slot=process_slot(config, cluster))
        )
        log.info("%d compute threads per process (%s)", budget.threads, budget.why)
        backends = owned.backends = await build_backends(
            config,
            explore=explore,
            train=train,
            resume_ref=resume_ref,
            cluster=cluster,
            server_dir=server_dir,
        )
        if init_ref:
            await _start_from(backends, init_ref, job_dir)
        synchronizer = _synchronizer(config)
        started = time.time()
        buffer = await _experience_buffer(
            config, shared=explore != train and not sft, reopen=explore
        )
        explored = job_dir.explorer_end()
        if train and not explore and not sft and explored is not None and explored < total_steps:
            # an explorer process that stopped short of this run's steps left its end marker;
            # this run's explorer, started beside us, has not cleared it yet
            buffer.ignore_end_markers_before(started)
        jobs = []
        if train:
            synchronizer.reset()
            start = None
            if resume and settings.use_critic:
                start = critic_base(job_dir.critic_dir(start_step))
            elif init_ref and critic_from_init and settings.use_critic:
                start = await asyncio.to_thread(
                    merged_start, config, init_ref, server_dir, job_dir.path / "stage_start/critic"
                )
            critic = build_critic(config, total_steps, backends.tokenizer, start)
            if critic is not None and resume:
                await critic.load(job_dir.critic_dir(start_step))
            trainer = Trainer(
                backend=backends.trainer,
                plan=build_loss_plan(algorithm, norm_length=config.model.max_response_tokens),
                buffer=buffer,
                synchronizer=synchronizer,
                monitor=RoleMonitor(monitor, "trainer"),
                job_dir=job_dir.path,
                train_batch_size=buffer_cfg.train_batch_size
                * (2 if settings.schema == "dpo" else 1),
                adam_params=adam_params_fn(
                    algorithm.optimizer, total_steps, config.trainer.grad_clip
                ),
                save_interval=config.trainer.save_interval,
                max_read_timeout=buffer_cfg.trainer_input.experience_buffer.max_read_timeout,
                ref_sampler=backends.ref_sampler,
                checkpoint_prefix=f"{config.project}-{config.group}-{config.name}".replace(
                    "/", "-"
                ),
                max_checkpoints_to_keep=config.trainer.max_checkpoints_to_keep,
                save_hf_checkpoint=config.trainer.save_hf_checkpoint,
                strategy=_strategy(
                    config, settings.sample_strategy, buffer, expert_data, start_step
                ),
                critic=critic,
                critic_warmup=config.trainer.critic_warmup,
            )
            if resume and explore:
                # the explorer continues from the trained weights, not from the base model
                await trainer.publish(start_step)
            jobs.append(trainer.run(start_step, total_steps))
        if sft:
            jobs.append(_feed_sft(sft_data, buffer, config, start_step, total_steps))
        if explore:
            explorer = _explorer(
                config,
                backends.sampler,
                reader,
                buffer,
                synchronizer,
                RoleMonitor(monitor, "explorer"),
                eval_readers,
                backends.runners,
                backends.auxiliary,
            )
            explorer.model_version = start_step
            if resume and not train:  # another process trains: go on from its newest weights
                published = synchronizer.latest()
                if published.ref is not None:
                    await backends.sampler.switch(published.ref)
                    log.info("explorer resumes from published weights v%d", published.version)
                explorer.model_version = published.version
            jobs.append(explorer.run(start_step, total_steps))
        # What set-up made (torch, transformers, the model's modules: ~500 thousand objects)
        # leaves the collector's generations for the loop: each full collection walked them
        # all (0.25 s with the demo model) and the loop's own survivors (a sampler's adapter,
        # experiences) brought one every few steps. Given back at the end, so that a finished
        # run's cyclic garbage stays collectable.
        gc.freeze()
        try:
            await asyncio.gather(*jobs)
        finally:
            gc.unfreeze()
        if train and config.trainer.save_hf_checkpoint != "never":
            out = job_dir.final_adapter_dir
            await backends.trainer.export_adapter(str(out))
            log.info("exported the trained adapter to %s", out)


def compute_processes(config: Any, cluster: Any = None) -> int:
    """How many compute-heavy processes of this run share this machine.

    ``explore`` / ``train`` / ``serve`` run beside the other half of the pair; with Ray on the
    local backend, the rollout-model actors placed on a node share it with this driver.
    """
    processes = 2 if _in_a_pair(config) else 1
    if cluster is not None and not config.model.tinker.enable:
        processes += cluster.actors_per_node()
    return processes


def _in_a_pair(config: Any) -> bool:
    """An explore, serve or train process that runs beside the other half; training on a dataset
    (sft, cpt, dpo) has no explorer beside it."""
    if config.mode == "train":
        return resolve_algorithm(config.algorithm).schema == "experience"
    return config.mode in ("explore", "serve")


def process_slot(config: Any, cluster: Any = None) -> int | None:
    """This process's block of cores when the pair splits them: explore (or serve) the first,
    train the second. None (not pinned) for one process, on the Tinker backend (the compute is
    the service's, which need not split the cores like this pair) and beside Ray rollout models
    (they are not pinned, so a block would not be the driver's own)."""
    if not _in_a_pair(config) or config.model.tinker.enable:
        return None
    if cluster is not None and cluster.actors_per_node():
        return None
    return 1 if config.mode == "train" else 0


async def _start_from(backends: Backends, ref: str, job_dir: JobDir) -> None:
    """A stage's start: the trainer loads the previous stage's weights (not its optimizer), and
    the explorer and the reference model sample from them, as from a new ``model_path``."""
    if backends.trainer is None:
        raise ValueError("a stage that does not train cannot start from the previous stage")
    await backends.trainer.load_state(ref, optimizer=False)
    log.info("starting from the previous stage's weights %s", ref)
    for role, sampler in (("explorer", backends.sampler), ("reference", backends.ref_sampler)):
        if sampler is not None:  # each its own copy: a sampler lets go of the one it leaves
            directory = job_dir.path / "stage_start" / role
            await sampler.switch(
                await backends.trainer.publish_sampler(f"stage-{role}", str(directory))
            )


@dataclass
class _Owned:
    """What a run must release at the end, whichever way it ends."""

    monitor: Any
    backends: Backends | None = None
    cluster: Any = None


@contextlib.asynccontextmanager
async def _owned(monitor: Any):
    """Close the monitor, the backends (telling a remote session how the run ended), the cluster;
    give back the CPUs a pinned run took from its process (a notebook or test process goes on)."""
    owned, error = _Owned(monitor), None
    cpus = os.sched_getaffinity(0)
    try:
        yield owned
    except BaseException as exc:
        error = exc
        raise
    finally:
        monitor.close()
        if owned.backends is not None:
            await owned.backends.close(error)
        if owned.cluster is not None:
            owned.cluster.close()
        if os.sched_getaffinity(0) != cpus:
            pin_threads(cpus)


async def _feed_sft(
    data: list[Any], buffer: Any, config: Any, start_step: int, total_steps: int
) -> None:
    """Put the dataset batches of steps ``start_step+1 .. total_steps`` in order, then close
    (``train_batch_size`` rows a step; a DPO row is two experiences)."""
    batch_size = config.buffer.train_batch_size
    seed = config.explorer.rollout_model.seed
    stream = itertools.islice(
        sft_sequence(data, seed), start_step * batch_size, total_steps * batch_size
    )
    while units := list(itertools.islice(stream, batch_size)):
        await buffer.put([exp for unit in units for exp in unit])
    await buffer.close()


def _sft_rows(config: Any, dataset: Any, schema: str = "sft") -> list[list[Any]]:
    """A dataset (an experience or auxiliary buffer's path, split, format) tokenized, one unit
    of experiences per row (``schema``: sft, cpt or dpo; see ``trinity.buffer.sft``)."""
    from transformers import AutoTokenizer

    from trinity.engine.demo_model import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_path(config.model.model_path)))
    return sft_dataset(
        dataset,
        tokenizer,
        chat_template=chat_template(config),
        max_len=config.model.max_model_len,
        schema=schema,
    )


def _strategy(
    config: Any, name: str, buffer: Any, expert_data: list[Any] | None, start_step: int
) -> Any:
    """``algorithm.sample_strategy``; mix's SFT rows continue where a resumed run stopped."""
    args = config.algorithm.sample_strategy_args
    tbs = config.buffer.train_batch_size
    rows = None
    if expert_data is not None:
        ratio = {**SAMPLE_STRATEGY_ARGS["mix"], **args}["expert_data_ratio"]
        skip = start_step * math.ceil(ratio * tbs)
        units = sft_sequence(expert_data, config.explorer.rollout_model.seed)
        rows = itertools.islice((exp for unit in units for exp in unit), skip, None)
    return build_strategy(name, args, buffer, train_batch_size=tbs, expert_rows=rows)


def _train_reader(config: Any) -> TasksetReader | TasksetScheduler:
    """The training taskset, or several of them on the original's schedule."""
    tasksets = config.buffer.explorer_input.tasksets
    if len(tasksets) == 1:
        return _reader(config, tasksets[0])
    return TasksetScheduler(
        [_reader(config, taskset) for taskset in tasksets],
        batch_size=config.buffer.batch_size,
        total_epochs=config.buffer.total_epochs,
        total_steps=config.buffer.total_steps,
        seed=tasksets[0].data_selector.seed,
    )


def _reader(config: Any, taskset: Any, *, is_eval: bool = False) -> TasksetReader:
    inputs = config.buffer.explorer_input
    workflow = inputs.default_workflow_type
    if is_eval:
        workflow = inputs.default_eval_workflow_type or workflow
    return TasksetReader(
        taskset,
        repeat_times=(taskset.repeat_times or 1) if is_eval else config.algorithm.repeat_times,
        batch_size=config.buffer.batch_size,
        total_epochs=config.buffer.total_epochs,
        total_steps=None if is_eval else config.buffer.total_steps,
        is_eval=is_eval,
        default_workflow=workflow,
        default_reward_fn=inputs.default_reward_fn_type,
        task_pipeline=None if is_eval else config.data_processor.get("task_pipeline"),
    )


def _synchronizer(config: Any) -> Synchronizer:
    sync = config.synchronizer
    return Synchronizer(
        Path(config.checkpoint_job_dir),
        sync_interval=sync.sync_interval,
        sync_offset=sync.sync_offset,
        sync_style=sync.sync_style,
        sync_timeout=sync.sync_timeout,
        explorer_sync_interval=sync.explorer_sync_interval,
        trainer_sync_interval=sync.trainer_sync_interval,
        max_inflight_batches=config.explorer.max_inflight_batches,
        # another process's new weights are a file: a stat every 0.1 s while waiting keeps the
        # hand-over off a step's time (at 1 s it added up to a second per step)
        poll_seconds=0.1,
    )


async def _experience_buffer(config: Any, *, shared: bool, reopen: bool) -> Any:
    """SQLite when explorer and trainer are two processes; otherwise an in-memory queue; a
    database URL in ``path`` with ``storage_type: sql`` (SQLAlchemy)."""
    exp_cfg = config.buffer.trainer_input.experience_buffer
    default_path = JobDir(config.checkpoint_job_dir).buffer_db(exp_cfg.name)
    if exp_cfg.storage_type == "sql" and exp_cfg.path and "://" in exp_cfg.path:
        buffer = build_experience_buffer(
            "sql",
            path=exp_cfg.path,
            capacity=exp_cfg.capacity,
            max_read_timeout=exp_cfg.max_read_timeout,
            name=exp_cfg.name,
        )
        if reopen:
            await buffer.reopen()
        return buffer
    storage = "sqlite" if shared or exp_cfg.storage_type in ("sqlite", "sql") else "queue"
    buffer = build_experience_buffer(
        storage,
        path=str(
            exp_cfg.path
            if storage == "sqlite" and exp_cfg.path and exp_cfg.storage_type != "file"
            else default_path
        ),
        capacity=exp_cfg.capacity,
        max_read_timeout=exp_cfg.max_read_timeout,
        replay=exp_cfg.replay_buffer,
    )
    if reopen and hasattr(buffer, "reopen"):
        await buffer.reopen()  # a previous explorer run closed it; this one writes again
    return buffer


def _rollout_store(config: Any) -> RolloutStore | None:
    """``monitor.max_rollouts`` > 0: keep the newest rollouts in the run dir for looking at."""
    keep = config.monitor.max_rollouts
    return RolloutStore(JobDir(config.checkpoint_job_dir).rollouts_db, keep) if keep else None


def _explorer(
    config,
    sampler,
    reader,
    buffer,
    synchronizer,
    monitor,
    eval_readers,
    runners=None,
    auxiliary=(),
) -> Explorer:
    rollout = config.explorer.rollout_model
    over, timeout = config.explorer.over_rollout, config.explorer.dynamic_timeout
    return Explorer(
        sampler=sampler,
        settings=rollout_settings(config),
        reader=reader,
        buffer=buffer,
        synchronizer=synchronizer,
        monitor=monitor,
        advantage_fn=explorer_hook(config.algorithm, seed=rollout.seed),
        runners=explorer_concurrency(config),
        seed=rollout.seed,
        max_retry_times=config.explorer.max_retry_times,
        max_timeout=config.explorer.max_timeout,
        eval_readers=eval_readers,
        eval_interval=config.explorer.eval_interval,
        eval_on_startup=config.explorer.eval_on_startup,
        remote_rollout=runners.run if runners else None,
        rollouts=_rollout_store(config) if reader is not None else None,  # bench: evals only
        pipeline=build_pipeline(config.data_processor),
        job_dir=JobDir(config.checkpoint_job_dir),
        auxiliary=auxiliary,
        over_rollout=(over.ratio, over.wait_after_min, over.return_partial_tasks),
        max_repeat_times_per_runner=config.explorer.max_repeat_times_per_runner,
        dynamic_timeout=(timeout.warmup_min_steps, timeout.ratio) if timeout.enable else None,
    )


def explorer_concurrency(config: Any) -> int:
    """Workflows in flight: ``engine_num x runner_per_model``; on the Tinker backend at least a
    step's tasks, so every sample request of a step is in flight at once (a far service's round
    trip is then paid once per step, not once per ``runner_per_model`` tasks)."""
    concurrency = config.explorer.rollout_model.engine_num * config.explorer.runner_per_model
    if config.model.tinker.enable:
        concurrency = max(concurrency, config.buffer.batch_size)
    return concurrency


def _eval_readers(config: Any) -> dict[str, TasksetReader]:
    return {
        ts.name: _reader(config, ts, is_eval=True)
        for ts in config.buffer.explorer_input.eval_tasksets
    }


async def run_bench(config: Any) -> None:
    """Evaluate the base model, then every saved ``global_step_N`` checkpoint, on eval_tasksets."""
    job_dir = JobDir(config.checkpoint_job_dir)
    steps = job_dir.checkpointed_steps()
    if config.explorer.bench_on_latest_checkpoint:
        steps = steps[-1:]
    eval_readers = _eval_readers(config)
    monitor = build_monitors(
        config.monitor.monitor_type,
        job_dir=job_dir.path,
        project=config.project,
        group=config.group,
        name=f"{config.name}-bench",
        total_steps=len(steps) + 1,
        monitor_args=config.monitor.monitor_args,
    )
    async with _owned(monitor) as owned:
        backends = owned.backends = await build_backends(
            config, explore=True, train=bool(steps), resume_ref=None
        )
        explorer = _explorer(
            config,
            backends.sampler,
            None,
            None,
            None,
            monitor,
            eval_readers,
            auxiliary=backends.auxiliary,
        )
        for step in [0, *steps]:
            if step:
                await backends.trainer.load_state(job_dir.checkpoint_ref(step))
                bench_dir = job_dir.bench_dir(step)
                await explorer.sampler.switch(
                    await backends.trainer.publish_sampler(f"bench-{step}", str(bench_dir))
                )
            explorer.model_version = step
            await explorer.evaluate(step, prefix="bench")
            log.info("evaluated %s", f"checkpoint global_step_{step}" if step else "the base model")


async def run_serve(config: Any) -> None:
    """``mode: serve``: the policy behind an OpenAI-compatible proxy (``trinity.explorer.proxy``)
    until Ctrl-C or the run's trainer finishes; rated completions go to the buffer that a
    ``mode: train`` process of the same run trains on, its published weights come back."""
    from trinity.explorer.proxy import Proxy, serve

    job_dir = JobDir(config.checkpoint_job_dir)
    atomic_write(job_dir.config_file, to_yaml(config))
    explorer = config.explorer
    monitor = build_monitors(
        config.monitor.monitor_type,
        job_dir=job_dir.path,
        project=config.project,
        group=config.group,
        name=config.name,
        total_steps=config.buffer.total_steps or config.trainer.total_steps,
        monitor_args=config.monitor.monitor_args,
    )
    async with _owned(monitor) as owned:
        budget = apply_thread_budget(
            thread_budget(compute_processes(config), slot=process_slot(config))
        )
        log.info("%d compute threads per process (%s)", budget.threads, budget.why)
        backends = owned.backends = await build_backends(
            config, explore=True, train=False, resume_ref=None
        )
        buffer = await _experience_buffer(config, shared=True, reopen=True)
        proxy = Proxy(
            backend=backends.sampler,
            settings=rollout_settings(config),
            buffer=buffer,
            synchronizer=_synchronizer(config),
            advantage_fn=explorer_hook(config.algorithm, seed=explorer.rollout_model.seed),
            monitor=RoleMonitor(monitor, "explorer"),
            check_interval=explorer.service_status_check_interval,
        )
        await proxy.sync()  # a restarted proxy serves the newest published weights at once
        url_file = job_dir.path / f"{explorer.name}_server_url.txt"

        def ready(url: str) -> None:
            atomic_write(url_file, url)
            log.info("serving the policy (OpenAI-compatible) at %s", url)

        try:
            await serve(proxy, explorer.listen_address, explorer.proxy_port, on_ready=ready)
        finally:
            await buffer.close()  # a trainer still reading takes what was committed, then ends


def _setup_logging(log_dir: Path, level: str) -> None:
    """Root level ``log.level`` (``TRINITY_LOG_LEVEL`` overrides it), and a copy of
    every record in ``log/trinity.log``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    level = level.upper()
    root = logging.getLogger()
    root.setLevel(level)
    with contextlib.suppress(Exception):
        handler = logging.FileHandler(log_dir / "trinity.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
