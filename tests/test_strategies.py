"""Sample strategies change what the trainer receives: staleness control drops old experiences,
mix puts SFT rows into the batch at the configured ratio, default / warmup read oldest first."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from loop_fakes import FakeLearner, RecordingMonitor

from trinity.algorithms import adam_params_fn, build_loss_plan
from trinity.buffer.experience import ExperienceQueue
from trinity.buffer.strategies import build_strategy
from trinity.config import ConfigError, load_config
from trinity.synchronizer.synchronizer import Synchronizer
from trinity.trainer.trainer import Trainer
from trinity.workflows.types import Experience


def rl(i: int, version: int = 0) -> Experience:
    return Experience(
        tokens=[1, 2, 3, 10 + i, 11],
        prompt_length=3,
        logprobs=[-0.5, -0.7],
        loss_mask=[1, 1],
        reward=float(i % 2),
        advantages=[float(i % 2) - 0.5] * 2,
        group_id=f"g{i}",
        model_version=version,
    )


def sft(i: int) -> Experience:
    return Experience(
        tokens=[1, 2, 50 + i, 51, 52],
        prompt_length=2,
        logprobs=[-1.0] * 3,
        loss_mask=[1, 1, 1],
        reward=1.0,
        response_text=f"expert {i}",
    )


async def filled(experiences: list[Experience], close: bool = True) -> ExperienceQueue:
    queue = ExperienceQueue(capacity=100, max_read_timeout=1.0)
    await queue.put(experiences)
    if close:
        await queue.close()
    return queue


@pytest.mark.parametrize("name", ["default", "warmup"])
def test_default_and_warmup_read_the_oldest_batch(name):
    async def main():
        queue = await filled([rl(i) for i in range(5)])
        strategy = build_strategy(name, {}, queue, train_batch_size=2)
        first = await strategy.sample(1, 2, 1.0)
        second = await strategy.sample(2, 2, 1.0)
        return [e.group_id for e in first], [e.group_id for e in second]

    assert asyncio.run(main()) == (["g0", "g1"], ["g2", "g3"])


def test_staleness_control_drops_a_version_0_experience_at_version_2():
    async def main():
        versions = [0, 1, 0, 2, 2]
        queue = await filled([rl(i, v) for i, v in enumerate(versions)])
        strategy = build_strategy(
            "staleness_control", {"max_staleness": 1}, queue, train_batch_size=2
        )
        batch = await strategy.sample(3, 3, 1.0)  # step 3: the trainer holds version 2
        return batch, strategy.metrics

    batch, metrics = asyncio.run(main())
    assert [(e.group_id, e.model_version) for e in batch] == [("g1", 1), ("g3", 2), ("g4", 2)]
    assert metrics == {"sample/dropped_stale": 2.0}


def test_staleness_control_keeps_everything_within_the_bound():
    async def main():
        queue = await filled([rl(i, 0) for i in range(2)])
        strategy = build_strategy(
            "staleness_control", {"max_staleness": 1}, queue, train_batch_size=2
        )
        return await strategy.sample(2, 2, 1.0)  # version 1: one version behind is allowed

    assert [e.model_version for e in asyncio.run(main())] == [0, 0]


def test_the_trainer_trains_on_what_staleness_control_keeps(tmp_path):
    async def main():
        queue = await filled([rl(0, 0), rl(1, 0), rl(2, 3), rl(3, 3)])
        strategy = build_strategy(
            "staleness_control", {"max_staleness": 0}, queue, train_batch_size=2
        )
        learner, monitor = FakeLearner(), RecordingMonitor()
        trainer = Trainer(
            backend=learner,
            plan=build_loss_plan({"algorithm_type": "grpo", "kl_loss_fn": "none"}),
            buffer=queue,
            synchronizer=Synchronizer(tmp_path),
            monitor=monitor,
            job_dir=tmp_path,
            train_batch_size=2,
            adam_params=adam_params_fn({"lr": 1e-3}, total_steps=1),
            strategy=strategy,
        )
        await trainer.run(3, 4)  # resumed at version 3: the version-0 pair is stale
        return learner, monitor

    learner, monitor = asyncio.run(main())
    (_, datums), *_ = learner.submitted
    assert [d.model_input.to_ints()[3] for d in datums] == [12, 13]  # rl(2), rl(3)
    step, metrics = monitor.records[-1]
    assert metrics["sample/dropped_stale"] == 2.0
    assert metrics["sample/model_version/mean"] == 3.0


def test_mix_puts_sft_rows_into_the_batch_at_the_configured_ratio():
    async def main():
        queue = await filled([rl(i) for i in range(6)])
        rows = itertools.cycle([sft(0), sft(1), sft(2)])
        strategy = build_strategy(
            "mix", {"expert_data_ratio": 0.25}, queue, train_batch_size=8, expert_rows=rows
        )
        return await strategy.sample(4, 8, 1.0), strategy

    batch, strategy = asyncio.run(main())
    assert (strategy.usual_batch_size, strategy.expert_batch_size) == (6, 2)
    experts = [e for e in batch if e.info["expert_mask"]]
    assert [e.response_text for e in experts] == ["expert 0", "expert 1"]
    assert all(e.reward == 0 and e.advantages == [0.0] * 3 for e in experts)
    assert all(e.logprobs == [0.0] * 3 for e in experts)
    assert [e.group_id for e in batch if not e.info["expert_mask"]] == [f"g{i}" for i in range(6)]
    assert {e.info["step"] for e in batch} == {4}
    assert strategy.metrics == {"sample/expert_count": 2.0}


def test_mix_ends_with_the_experience_buffer():
    async def main():
        strategy = build_strategy(
            "mix", {}, await filled([]), train_batch_size=4, expert_rows=iter([sft(0)] * 9)
        )
        return await strategy.sample(1, 4, 1.0)

    assert asyncio.run(main()) == []


def write_sft(path):
    path.write_text('{"prompt": "1+1?", "response": "2"}\n')
    return path


def config_with(tmp_path, **overrides):
    path = tmp_path / "config.yaml"
    path.write_text("mode: both\n")
    base = [
        "model.model_path=demo",
        "model.max_prompt_tokens=32",
        "model.max_response_tokens=8",
        "buffer.total_steps=1",
        "buffer.explorer_input.taskset.path=builtin:arithmetic",
        "buffer.explorer_input.default_workflow_type=math_workflow",
        f"checkpoint_root_dir={tmp_path}",
    ]
    return load_config(path, base + [f"{k}={v}" for k, v in overrides.items()])


def test_mix_config_needs_its_auxiliary_buffer_and_checks_args(tmp_path):
    with pytest.raises(ConfigError, match="auxiliary_buffers.sft_dataset: sample_strategy 'mix'"):
        config_with(tmp_path, **{"algorithm.sample_strategy": "mix"})
    with pytest.raises(ConfigError, match="sample_strategy_args.max_stalenes: unknown key"):
        config_with(
            tmp_path,
            **{
                "algorithm.sample_strategy": "staleness_control",
                "algorithm.sample_strategy_args.max_stalenes": 1,
            },
        )
    path = write_sft(tmp_path / "sft.jsonl")
    config = config_with(
        tmp_path,
        **{
            "algorithm.sample_strategy": "mix",
            "buffer.trainer_input.auxiliary_buffers.expert.path": str(path),
            "algorithm.sample_strategy_args.sft_dataset_name": "expert",
        },
    )
    assert config.buffer.trainer_input.auxiliary_buffers["expert"].path == str(path)
