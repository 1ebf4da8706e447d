"""The prioritized replay buffer: experiences come back by priority (model_version - decay *
use_count), within reuse limits and cool-downs, and the trainer trains on them again."""

from __future__ import annotations

import asyncio
import time

import pytest
from loop_fakes import FakeLearner, RecordingMonitor
from test_strategies import config_with, rl

from trinity.algorithms import adam_params_fn, build_loss_plan
from trinity.buffer.experience import ReplayBuffer, build_experience_buffer
from trinity.config import ConfigError
from trinity.config.schema import ReplayBufferConfig
from trinity.synchronizer.synchronizer import Synchronizer
from trinity.trainer.trainer import Trainer


def ids(batch):
    return [(e.group_id, e.info["use_count"]) for e in batch]


def test_high_priority_experiences_are_returned_again_until_fresher_ones_outrank_them():
    async def main():
        buffer = ReplayBuffer(max_read_timeout=1.0)  # linear_decay, decay 2
        await buffer.put([rl(0, 0), rl(1, 0), rl(2, 1), rl(3, 1)])
        reads = [ids(await buffer.get_batch(2)) for _ in range(3)]
        await buffer.put([rl(4, 2), rl(5, 2)])
        reads.append(ids(await buffer.get_batch(2)))
        return reads, buffer.pending()

    reads, pending = asyncio.run(main())
    assert reads == [
        [("g2", 1), ("g3", 1)],  # version 1 first
        [("g0", 1), ("g1", 1)],  # 1 - 2*1 = -1 < 0: the version-0 pair
        [("g2", 2), ("g3", 2)],  # again: -1 > 0 - 2*1
        [("g4", 1), ("g5", 1)],  # fresh version 2
    ]
    assert pending == 6  # nothing leaves a linear_decay buffer


def test_use_count_limit_and_close_end_the_reuse():
    async def main():
        buffer = build_experience_buffer(
            "queue",
            max_read_timeout=1.0,
            replay=ReplayBufferConfig(
                enable=True,
                priority_fn="linear_decay_use_count_control_randomization",
                priority_fn_args={"use_count_limit": 2},
            ),
        )
        await buffer.put([rl(0), rl(1)])
        await buffer.close()
        return [ids(await buffer.get_batch(2)) for _ in range(3)]

    assert asyncio.run(main()) == [[("g0", 1), ("g1", 1)], [("g0", 2), ("g1", 2)], []]


def test_reuse_waits_for_the_cooldown():
    async def main():
        buffer = ReplayBuffer(max_read_timeout=5.0, reuse_cooldown_time=0.3)
        await buffer.put([rl(0, 1), rl(1, 0)])
        first = ids(await buffer.get_batch(1))
        second = ids(await buffer.get_batch(1))  # g0 is cooling down: the lower one now
        started = time.monotonic()
        third = ids(await buffer.get_batch(2))
        return first, second, third, time.monotonic() - started

    first, second, third, waited = asyncio.run(main())
    assert (first, second) == ([("g0", 1)], [("g1", 1)])
    assert sorted(third) == [("g0", 2), ("g1", 2)] and waited >= 0.2


def test_a_full_buffer_keeps_the_highest_priorities():
    async def main():
        buffer = ReplayBuffer(capacity=2, max_read_timeout=1.0)
        await buffer.put([rl(0, 0), rl(1, 0), rl(2, 1), rl(3, 0)])
        await buffer.close()
        return ids(await buffer.get_batch(5))

    assert asyncio.run(main()) == [("g2", 1), ("g0", 1)]


def test_the_trainer_trains_again_on_replayed_experiences(tmp_path):
    async def main():
        buffer = ReplayBuffer(max_read_timeout=1.0)
        await buffer.put([rl(0), rl(1)])  # one batch's worth
        learner = FakeLearner()
        trainer = Trainer(
            backend=learner,
            plan=build_loss_plan({"algorithm_type": "grpo", "kl_loss_fn": "none"}),
            buffer=buffer,
            synchronizer=Synchronizer(tmp_path),
            monitor=RecordingMonitor(),
            job_dir=tmp_path,
            train_batch_size=2,
            adam_params=adam_params_fn({"lr": 1e-3}, total_steps=3),
        )
        return await trainer.run(0, 3), learner

    steps, learner = asyncio.run(main())
    assert steps == 3  # a plain queue would have ended after step 1
    trained = [[d.model_input.to_ints()[3] for d in datums] for _, datums in learner.submitted]
    assert trained == [[10, 11]] * 3


def test_replay_config_is_checked(tmp_path):
    on = {"buffer.trainer_input.experience_buffer.replay_buffer.enable": True}
    config = config_with(tmp_path, **on)
    assert config.buffer.trainer_input.experience_buffer.replay_buffer.priority_fn == "linear_decay"
    with pytest.raises(ConfigError, match="priority_fn_args.decy: unknown key"):
        config_with(
            tmp_path,
            **on,
            **{"buffer.trainer_input.experience_buffer.replay_buffer.priority_fn_args.decy": 1},
        )
    with pytest.raises(ConfigError, match="replay buffer is an in-process queue"):
        config_with(tmp_path, **on, mode="explore")
