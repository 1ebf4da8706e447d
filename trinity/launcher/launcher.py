"""Modes: ``both`` (explorer + trainer in one process), ``explore`` / ``train`` (two processes
sharing a SQLite buffer and the checkpoint dir), ``bench`` (evaluate checkpoints).

Everything a run needs is built here from the validated config; the explorer and trainer get
their parts injected and never look at the config or the backend kind.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trinity.algorithms import (
    adam_params_fn,
    build_loss_plan,
    explorer_hook,
    resolve_algorithm,
)
from trinity.backends.local import LocalRuntime, LocalSampler, LocalTrainer
from trinity.backends.ray_actors import TinkerSamplers
from trinity.backends.tinker_sdk import TinkerSampler, TinkerSession, TinkerTrainer
from trinity.buffer.experience import build_experience_buffer
from trinity.buffer.sft import sft_dataset, sft_sequence
from trinity.buffer.tasksets import TasksetReader
from trinity.config import to_yaml
from trinity.explorer.explorer import Explorer
from trinity.explorer.sampler import RolloutSettings
from trinity.jobdir import JobDir, atomic_write
from trinity.launcher.cluster import RayCluster, connect, runner_env
from trinity.monitor import build_monitors
from trinity.monitor.base import RoleMonitor
from trinity.monitor.jsonl import forget_steps_after
from trinity.monitor.rollouts import RolloutStore
from trinity.synchronizer.synchronizer import Synchronizer
from trinity.trainer.trainer import Trainer

log = logging.getLogger("trinity")

LOCAL_SERVER = "local"  # model.tinker.base_url value: start `trinity server` for this run


def run(config: Any) -> int:
    """Run the configured mode (or each of ``stages`` in turn) to the end; returns exit status."""
    for stage in config.stages or []:
        log.info("stage %s", stage.stage_name)
        run(stage.config)
    if config.stages:
        return 0
    check_credentials(config)
    job_dir = JobDir(config.checkpoint_job_dir)
    job_dir.path.mkdir(parents=True, exist_ok=True)
    _setup_logging(job_dir.log_dir, os.environ.get("TRINITY_LOG_LEVEL") or config.log.level)
    mode = config.mode
    if mode == "bench":
        asyncio.run(run_bench(config))
    else:
        explore, train = mode in ("both", "explore"), mode in ("both", "train")
        if config.trainer.trainer_type == "verl" and not config.model.tinker.enable:
            log.info("trainer.trainer_type 'verl': training runs on the local engine")
        asyncio.run(run_rl(config, explore=explore, train=train))
    return 0


def check_credentials(config: Any) -> None:
    """The Tinker backend needs an API key unless this run starts its own server."""
    from trinity.config import ConfigError

    tinker_cfg = config.model.tinker
    if not tinker_cfg.enable or _base_url(config) == LOCAL_SERVER:
        return
    if not _api_key():
        raise ConfigError(
            "model.tinker.enable: set TRINITY_API_KEY or TINKER_API_KEY for the Tinker service "
            f"(or model.tinker.base_url: {LOCAL_SERVER} to serve the model on this machine)"
        )


def _base_url(config: Any) -> str | None:
    return config.model.tinker.base_url or os.environ.get("TINKER_BASE_URL")


def _api_key() -> str | None:
    return os.environ.get("TRINITY_API_KEY") or os.environ.get("TINKER_API_KEY")


@dataclass
class Backends:
    """What one process talks to: a trainer and/or a sampler, and how to close them."""

    trainer: Any = None
    sampler: Any = None
    ref_sampler: Any = None
    tokenizer: Any = None
    closers: list = field(default_factory=list)

    session: Any = None  # a TinkerSession, told at the end how the run went
    runners: Any = None  # Ray mode: the RunnerPool the explorer's workflows run on

    async def close(self, error: BaseException | None = None) -> None:
        if self.session is not None:  # first: an embedded server is among the closers
            status = "success" if error is None else "errored"
            if isinstance(error, KeyboardInterrupt | asyncio.CancelledError):
                status = "interrupted"
            await self.session.close(status, None if error is None else repr(error)[:500])
        for close in reversed(self.closers):
            result = close()
            if asyncio.iscoroutine(result):
                await result


def _lora_spec(config: Any) -> Any:
    from trinity.engine import LoraSpec

    tinker_cfg = config.model.tinker
    if tinker_cfg.enable or not config.model.lora_configs:
        return LoraSpec(
            rank=tinker_cfg.rank,
            seed=tinker_cfg.seed,
            train_mlp=tinker_cfg.train_mlp,
            train_attn=tinker_cfg.train_attn,
            train_unembed=tinker_cfg.train_unembed,
        )
    lora = config.model.lora_configs[0]
    return LoraSpec(rank=lora.lora_rank, alpha=lora.lora_alpha, seed=tinker_cfg.seed)


async def build_backends(
    config: Any,
    *,
    explore: bool,
    train: bool,
    resume_ref: str | None,
    cluster: RayCluster | None = None,
) -> Backends:
    """With ``cluster``, the explorer's sampling happens on Ray actors (``backends.runners``)."""
    from trinity.engine.demo_model import resolve_model_path

    backends = Backends()
    tinker_cfg = config.model.tinker
    needs_reference = build_loss_plan(config.algorithm).needs_reference
    remote = explore and cluster is not None
    if not tinker_cfg.enable:
        model_path = str(resolve_model_path(config.model.model_path))
        if train or not remote:
            runtime = LocalRuntime(model_path)
            backends.closers.append(runtime.close)
            backends.tokenizer = runtime.tokenizer
        if train:
            # rollout model actors load published weights from disk, as another process would
            backends.trainer = LocalTrainer(
                runtime, "policy", _lora_spec(config), persist_samplers=remote or not explore
            )
            if resume_ref:
                await backends.trainer.load_state(resume_ref)
            if needs_reference:
                backends.ref_sampler = LocalSampler(runtime)
        if remote:
            env = runner_env(config)
            backends.sampler = await cluster.rollout_models(model_path, env)
            backends.tokenizer = backends.sampler.tokenizer
            backends.runners = await cluster.runner_pool(
                backends.sampler, backends.sampler, _rollout_settings(config), env
            )
        elif explore:
            backends.sampler = LocalSampler(runtime)
        return backends

    base_url, api_key = _base_url(config), _api_key()
    base_model = tinker_cfg.base_model or config.model.model_path
    if base_url == LOCAL_SERVER:
        base_url, api_key, base_model = _start_local_server(config, backends)
    session = TinkerSession(base_url, api_key)
    backends.session = session
    await asyncio.to_thread(session.check_model, base_model)
    if train:
        if resume_ref:
            backends.trainer = await TinkerTrainer.from_state(session, resume_ref)
        else:
            backends.trainer = await TinkerTrainer.create(
                session,
                base_model,
                rank=tinker_cfg.rank,
                seed=tinker_cfg.seed,
                train_mlp=tinker_cfg.train_mlp,
                train_attn=tinker_cfg.train_attn,
                train_unembed=tinker_cfg.train_unembed,
            )
        backends.tokenizer = backends.trainer.tokenizer
        if needs_reference:
            backends.ref_sampler = await TinkerSampler.create(session, base_model)
    if explore:
        backends.sampler = await TinkerSampler.create(session, base_model)
        backends.tokenizer = backends.sampler.tokenizer
    if remote:  # each runner opens its own session, with this run's endpoint and key
        endpoint = {
            "TRINITY_API_KEY": api_key,
            **({"TINKER_BASE_URL": base_url} if base_url else {}),
        }
        backends.runners = await cluster.runner_pool(
            TinkerSamplers(base_model),
            backends.sampler,
            _rollout_settings(config),
            runner_env(config, endpoint),
        )
    return backends


def _start_local_server(config: Any, backends: Backends) -> tuple[str, str, str]:
    """``base_url: local``: serve the model with ``trinity server`` on a loopback port."""
    from trinity.engine.demo_model import resolve_model_path
    from trinity.server import build_service
    from trinity.server.runner import ServerThread

    model_path = str(resolve_model_path(config.model.tinker.base_model or config.model.model_path))
    api_key = f"tml-{secrets.token_hex(16)}"
    service = build_service(
        [model_path], JobDir(config.checkpoint_job_dir).server_dir, f"{api_key}=local"
    )
    server = ServerThread(service).start()
    backends.closers.append(server.stop)
    log.info("started trinity server for this run at %s (model %s)", server.url, model_path)
    return server.url, api_key, str(Path(model_path).resolve())


async def run_rl(config: Any, *, explore: bool, train: bool) -> None:
    job_dir = JobDir(config.checkpoint_job_dir)
    atomic_write(job_dir.config_file, to_yaml(config))  # what tools show as the run's config
    resume = job_dir.latest_checkpoint() if config.continue_from_checkpoint else None
    start_step, resume_ref = resume if resume else (0, None)
    if resume:
        log.info("resuming after step %d from %s", start_step, resume_ref)
    buffer_cfg = config.buffer
    algorithm = config.algorithm
    reader, eval_readers = None, {}
    if explore:  # every taskset is read and checked before any server or engine starts
        reader = _reader(config, buffer_cfg.explorer_input.tasksets[0])
        reader.skip_batches(start_step)
        eval_readers = _eval_readers(config)
    sft = train and not explore and resolve_algorithm(algorithm).schema == "sft"
    sft_data = None
    if sft:
        from transformers import AutoTokenizer

        from trinity.engine.demo_model import resolve_model_path

        tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_path(config.model.model_path)))
        sft_data = sft_dataset(
            buffer_cfg.trainer_input.experience_buffer,
            tokenizer,
            chat_template=_chat_template(config),
            max_len=config.model.max_model_len,
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
        backends = owned.backends = await build_backends(
            config, explore=explore, train=train, resume_ref=resume_ref, cluster=cluster
        )
        synchronizer = _synchronizer(config)
        buffer = await _experience_buffer(
            config, shared=explore != train and not sft, reopen=explore
        )
        jobs = []
        if train:
            synchronizer.reset()
            trainer = Trainer(
                backend=backends.trainer,
                plan=build_loss_plan(algorithm, norm_length=config.model.max_response_tokens),
                buffer=buffer,
                synchronizer=synchronizer,
                monitor=RoleMonitor(monitor, "trainer"),
                job_dir=job_dir.path,
                train_batch_size=buffer_cfg.train_batch_size,
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
            )
            explorer.model_version = start_step
            jobs.append(explorer.run(start_step, total_steps))
        await asyncio.gather(*jobs)
        if train and config.trainer.save_hf_checkpoint != "never":
            out = job_dir.final_adapter_dir
            await backends.trainer.export_adapter(str(out))
            log.info("exported the trained adapter to %s", out)


@dataclass
class _Owned:
    """What a run must release at the end, whichever way it ends."""

    monitor: Any
    backends: Backends | None = None
    cluster: Any = None


@contextlib.asynccontextmanager
async def _owned(monitor: Any):
    """Close the monitor, the backends (telling a remote session how the run ended), the cluster."""
    owned, error = _Owned(monitor), None
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


async def _feed_sft(
    data: list[Any], buffer: Any, config: Any, start_step: int, total_steps: int
) -> None:
    """Put the SFT batches of steps ``start_step+1 .. total_steps`` in order, then close."""
    batch_size = config.buffer.train_batch_size
    seed = config.explorer.rollout_model.seed
    stream = itertools.islice(
        sft_sequence(data, seed), start_step * batch_size, total_steps * batch_size
    )
    while batch := list(itertools.islice(stream, batch_size)):
        await buffer.put(batch)
    await buffer.close()


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
    )


async def _experience_buffer(config: Any, *, shared: bool, reopen: bool) -> Any:
    """SQLite when explorer and trainer are two processes; otherwise an in-memory queue."""
    exp_cfg = config.buffer.trainer_input.experience_buffer
    default_path = JobDir(config.checkpoint_job_dir).buffer_db(exp_cfg.name)
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
    )
    if reopen and hasattr(buffer, "reopen"):
        await buffer.reopen()  # a previous explorer run closed it; this one writes again
    return buffer


def _rollout_store(config: Any) -> RolloutStore | None:
    """``monitor.max_rollouts`` > 0: keep the newest rollouts in the run dir for looking at."""
    keep = config.monitor.max_rollouts
    return RolloutStore(JobDir(config.checkpoint_job_dir).rollouts_db, keep) if keep else None


def _explorer(
    config, sampler, reader, buffer, synchronizer, monitor, eval_readers, runners=None
) -> Explorer:
    rollout = config.explorer.rollout_model
    return Explorer(
        sampler=sampler,
        settings=_rollout_settings(config),
        reader=reader,
        buffer=buffer,
        synchronizer=synchronizer,
        monitor=monitor,
        advantage_fn=explorer_hook(config.algorithm, seed=rollout.seed),
        runners=rollout.engine_num * config.explorer.runner_per_model,
        seed=rollout.seed,
        max_retry_times=config.explorer.max_retry_times,
        max_timeout=config.explorer.max_timeout,
        eval_readers=eval_readers,
        eval_interval=config.explorer.eval_interval,
        eval_on_startup=config.explorer.eval_on_startup,
        remote_rollout=runners.run if runners else None,
        rollouts=_rollout_store(config) if reader is not None else None,  # bench: evals only
    )


def _chat_template(config: Any) -> str | None:
    model = config.model
    if model.custom_chat_template is None and model.chat_template_path:
        return Path(model.chat_template_path).read_text()
    return model.custom_chat_template


def _rollout_settings(config: Any) -> RolloutSettings:
    model, rollout = config.model, config.explorer.rollout_model
    template = _chat_template(config)
    return RolloutSettings(
        max_prompt_tokens=model.max_prompt_tokens,
        max_response_tokens=model.max_response_tokens,
        temperature=model.temperature,
        top_p=model.top_p,
        top_k=model.top_k,
        enable_prompt_truncation=model.enable_prompt_truncation,
        chat_template=template,
        max_model_len=model.max_model_len,
        enable_history=rollout.enable_history,
        enable_openai_api=rollout.enable_openai_api,
        enable_auto_tool_choice=rollout.enable_auto_tool_choice,
        tool_call_parser=rollout.tool_call_parser,
    )


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
        explorer = _explorer(config, backends.sampler, None, None, None, monitor, eval_readers)
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
