"""The trainer: buffer -> datums -> learner calls -> published sampler weights and checkpoints.

It is algorithm-blind below the loss plan: the plan sets batch-level advantages (REINFORCE++; the
explorer computed the group-level ones), turns experiences into Tinker datums and names the
built-in loss; the trainer submits ``forward_backward`` and ``optim_step`` back to back and only
then awaits them, so a remote learner runs both in one clock cycle.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tinker import types

from trinity.buffer.strategies import DefaultStrategy
from trinity.jobdir import JobDir
from trinity.workflows.types import Experience

log = logging.getLogger(__name__)


class Trainer:
    def __init__(
        self,
        *,
        backend: Any,  # backends.base.TrainerBackend
        plan: Any,  # algorithms.LossPlan: batch_advantages(), to_datums(), loss_fn, custom_loss
        buffer: Any,
        synchronizer: Any,
        monitor: Any,
        job_dir: str | Path,
        train_batch_size: int,
        adam_params: Callable[[int], types.AdamParams],
        save_interval: int = 0,
        max_read_timeout: float = 1800.0,
        ref_sampler: Any | None = None,
        checkpoint_prefix: str = "trinity",
        max_checkpoints_to_keep: int = 0,
        save_hf_checkpoint: str = "last",
        strategy: Any | None = None,
        critic: Any | None = None,
        critic_warmup: int = 0,
    ):
        """``max_checkpoints_to_keep``: 0 keeps all; ``save_hf_checkpoint`` "always" also exports
        the weights as a peft adapter beside every checkpoint ("last" and "never" are the
        launcher's final export). ``strategy`` reads each batch from ``buffer``
        (``trinity.buffer.strategies``; default: the oldest ``train_batch_size``). ``critic``:
        PPO's ``trainer.critic.Critic``; the policy stays frozen for steps before
        ``critic_warmup``."""
        self.backend = backend
        self.plan = plan
        self.buffer = buffer
        self.strategy = strategy if strategy is not None else DefaultStrategy(buffer)
        self.synchronizer = synchronizer
        self.monitor = monitor
        self.job_dir = JobDir(job_dir)
        self.train_batch_size = train_batch_size
        self.adam_params = adam_params
        self.save_interval = save_interval
        self.max_read_timeout = max_read_timeout
        self.ref_sampler = ref_sampler
        self.prefix = checkpoint_prefix
        self.max_checkpoints_to_keep = max_checkpoints_to_keep
        self.save_hf_checkpoint = save_hf_checkpoint
        self.critic = critic
        self.critic_warmup = critic_warmup

    async def run(self, start_step: int, total_steps: int) -> int:
        step = start_step
        try:
            await self.synchronizer.consumed(start_step)  # the explorer resumes at the same step
            while step < total_steps:
                started, cpu = time.monotonic(), time.process_time()
                batch = await self.strategy.sample(
                    step + 1, self.train_batch_size, self.max_read_timeout
                )
                if not batch:
                    break
                read_time = time.monotonic() - started
                step += 1
                await self.synchronizer.consumed(step)
                metrics = await self.train_step(step, batch)
                metrics.update(self.strategy.metrics)
                metrics["time/read_experience"] = read_time
                if self.synchronizer.trainer_should_publish(step):
                    metrics["time/sync_weight"] = await self.publish(step)
                if self.save_interval and step % self.save_interval == 0:
                    metrics["time/save_checkpoint"] = await self.save_checkpoint(step)
                metrics["perf/time_per_step"] = time.monotonic() - started
                # CPU seconds of the whole process (all threads): against the wall time, the
                # share of its cores the trainer got (other processes on them take the rest)
                metrics["perf/cpu_time_per_step"] = time.process_time() - cpu
                self.monitor.log(metrics, step)
            if step > start_step and not (self.save_interval and step % self.save_interval == 0):
                await self.save_checkpoint(step)
        finally:
            await self.synchronizer.trainer_finished()
        return step

    async def train_step(self, step: int, batch: list[Experience]) -> dict[str, float]:
        started = time.monotonic()
        ref_logprobs = await self.reference_logprobs(batch) if self.plan.needs_reference else None
        critic_update = None
        if self.critic is not None:  # values with the critic's weights before this step's update
            values = await self.critic.values(batch)
            returns = self.critic.set_advantages(batch, values, ref_logprobs)
            critic_update = asyncio.ensure_future(self.critic.update(step, batch, values, returns))
        else:
            self.plan.batch_advantages(batch, ref_logprobs)  # before the datums, which read them
        datums = self.plan.to_datums(batch, ref_logprobs)
        metrics = batch_metrics(batch)
        if step >= self.critic_warmup:
            if self.plan.custom_loss is not None:
                fwd_bwd = self.backend.forward_backward_custom(datums, self.plan.custom_loss)
            else:
                fwd_bwd = self.backend.forward_backward(
                    datums, self.plan.loss_fn, self.plan.loss_fn_config
                )
            optim = self.backend.optim_step(self.adam_params(step))  # queued before awaiting
            output = await fwd_bwd
            metrics.update(self.plan.metrics(datums, output))
            metrics.update(_optim_metrics(await optim))
        if critic_update is not None:
            metrics.update(await critic_update)
        update_time = time.monotonic() - started

        n_tokens = sum(len(exp.tokens) for exp in batch)
        metrics.update(
            {
                "actor/lr": self.adam_params(step).learning_rate,
                "time/update_actor": update_time,
                "perf/total_num_tokens": float(n_tokens),
                "perf/throughput": n_tokens / max(update_time, 1e-9),
            }
        )
        return metrics

    async def reference_logprobs(self, batch: list[Experience]) -> list[list[float]]:
        """Base-model logprobs of each response token (for KL against the reference policy)."""
        full = await asyncio.gather(
            *(self.ref_sampler.compute_logprobs(exp.tokens) for exp in batch)
        )
        return [
            [float(x) for x in lp[exp.prompt_length :]] for lp, exp in zip(full, batch, strict=True)
        ]

    async def publish(self, step: int) -> float:
        started = time.monotonic()
        ref = await self.backend.publish_sampler(
            f"{self.prefix}-sampler-{step}", str(self.job_dir.sampler_dir(step))
        )
        await self.synchronizer.publish(step, ref)
        return time.monotonic() - started

    async def save_checkpoint(self, step: int) -> float:
        started = time.monotonic()
        step_dir = self.job_dir.step_dir(step)
        step_dir.mkdir(parents=True, exist_ok=True)
        ref = await self.backend.save_state(f"{self.prefix}-state-{step}", str(step_dir))
        if self.critic is not None:
            await self.critic.save(self.job_dir.critic_dir(step))
        self.job_dir.write_checkpoint(step, ref)
        if self.save_hf_checkpoint == "always":
            await self.backend.export_adapter(str(self.job_dir.hf_adapter_dir(step)))
        if self.max_checkpoints_to_keep:
            for old in self.job_dir.checkpointed_steps()[: -self.max_checkpoints_to_keep]:
                await self.backend.delete_state(self.job_dir.checkpoint_ref(old))
                self.job_dir.remove_step(old)
        log.info("saved checkpoint for step %d: %s", step, ref)
        return time.monotonic() - started


def batch_metrics(batch: list[Experience]) -> dict[str, float]:
    """Original metric names: critic/rewards, critic/advantages, response/prompt lengths."""
    rewards = [exp.reward for exp in batch]
    advantages = [
        a for exp in batch for a, m in zip(exp.advantages or [], exp.loss_mask, strict=False) if m
    ]
    response_lengths = [float(exp.response_length) for exp in batch]
    prompt_lengths = [float(exp.prompt_length) for exp in batch]
    metrics: dict[str, float] = {}
    for name, values in (
        ("critic/rewards", rewards),
        ("critic/score", rewards),
        ("critic/advantages", advantages),
        ("response_length", response_lengths),
        ("prompt_length", prompt_lengths),
    ):
        if values:
            metrics[f"{name}/mean"] = statistics.fmean(values)
            metrics[f"{name}/max"] = max(values)
            metrics[f"{name}/min"] = min(values)
    metrics["response_length/clip_ratio"] = statistics.fmean(float(exp.truncated) for exp in batch)
    metrics["sample/model_version/mean"] = statistics.fmean(exp.model_version for exp in batch)
    metrics["sample/task_count"] = float(len({exp.group_id for exp in batch}))
    return metrics


def _optim_metrics(result: Any) -> dict[str, float]:
    metrics = result if isinstance(result, dict) else (getattr(result, "metrics", None) or {})
    return {f"actor/{k.split(':')[0]}": float(v) for k, v in metrics.items()}
