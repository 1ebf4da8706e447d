"""Finished runs for the tools that look at runs (``trinity plot``, ``trinity studio``), written in
a second through the real writers: the launcher's resolved config, the jsonl monitor with the
explorer's and trainer's metric names, and the rollout store with the explorer's experiences. The
reward climbs and answers get right, so curves and early-versus-late rollouts have a story."""

from __future__ import annotations

import random
from pathlib import Path

from trinity.config import load_config, to_yaml
from trinity.jobdir import JobDir
from trinity.monitor import JsonlMonitor
from trinity.monitor.rollouts import RolloutStore
from trinity.workflows.types import Experience

DEMO = Path(__file__).parent.parent / "examples" / "grpo_demo.yaml"
OPERANDS = [(3, 4), (2, 5), (6, 1), (8, 9)]  # a 4-task taskset: each task comes back each epoch
REPEAT = 4


def write_run(root: Path, name: str, *, steps: int = 12, seed: int = 0) -> Path:
    """``<root>/trinity-demo/grpo/<name>`` after ``steps`` GRPO steps; returns the job dir."""
    config = load_config(DEMO, overrides={"checkpoint_root_dir": str(root), "name": name})
    job = JobDir(config.checkpoint_job_dir)
    job.path.mkdir(parents=True)
    job.config_file.write_text(to_yaml(config))
    monitor, store, rng = (
        JsonlMonitor(job.metrics_file),
        RolloutStore(job.rollouts_db),
        random.Random(seed),
    )
    for step in range(1, steps + 1):
        skill = (step / steps) ** (1 + seed / 2)  # the share of right answers climbs to 1
        experiences = []
        for index in (2 * step % len(OPERANDS), (2 * step + 1) % len(OPERANDS)):
            a, b = OPERANDS[index]
            for i in range(REPEAT):
                right = i < round(REPEAT * skill - index % 2 / 2)
                wrong = a + b + rng.randint(1, 5)
                answer = f"{a} + {b} = {a + b}" if right else f"I think it is {wrong}"
                experiences.append(
                    _experience(step, index, f"What is {a} + {b}?", answer, float(right))
                )
        rewards = [e.reward for e in experiences]
        lengths = [e.response_length for e in experiences]
        store.write(step, experiences)
        monitor.log(
            {
                "rollout/reward/mean": sum(rewards) / len(rewards),
                "rollout/response_length/mean": sum(lengths) / len(lengths),
                "rollout/model_version": step - 1,
            },
            step,
        )
        monitor.log(
            {
                "critic/rewards/mean": sum(rewards) / len(rewards),
                "response_length/mean": sum(lengths) / len(lengths),
                "actor/pg_loss": rng.uniform(-0.1, 0.1),
                "actor/kl_loss": 0.001 * step,
                "actor/entropy": 2.0 - skill,
                "actor/grad_norm": rng.uniform(0.5, 1.5),
            },
            step,
        )
    monitor.close()
    return job.path


def _experience(step: int, index: int, prompt: str, response: str, reward: float) -> Experience:
    prompt_length, length = 30, len(response.split())
    return Experience(
        tokens=list(range(prompt_length + length)),
        prompt_length=prompt_length,
        logprobs=[-0.5] * length,
        loss_mask=[1] * length,
        reward=reward,
        reward_components={"accuracy": reward},
        task_id=f"arithmetic/{step // 2}/{index}",
        group_id=f"{step}/arithmetic/{step // 2}/{index}",
        model_version=step - 1,
        prompt_text=prompt,
        response_text=response,
        advantages=[reward - 0.5] * length,
    )
