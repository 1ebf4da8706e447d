"""The trainer's own logic against a fake learner: no model, no HTTP.

What is checked here is the trainer's, not the backend's: learner calls queued before they are
awaited, one lr per step, publication and checkpoints at the configured steps, reference
logprobs fetched only when the loss plan needs them, and the run's end when the buffer runs dry.
"""

from __future__ import annotations

import asyncio

from loop_fakes import FakeLearner, FakeSampler, ListBuffer, RecordingMonitor

from trinity.algorithms import adam_params_fn, build_loss_plan
from trinity.jobdir import JobDir
from trinity.synchronizer.synchronizer import Synchronizer
from trinity.trainer.trainer import Trainer
from trinity.workflows.types import Experience


def experience(i: int, reward: float) -> Experience:
    response = [10 + i, 11, 12]
    return Experience(
        tokens=[1, 2, 3, *response],
        prompt_length=3,
        logprobs=[-0.5] * 3,
        loss_mask=[1, 1, 1],
        reward=reward,
        advantages=[reward - 0.5] * 3,
        group_id=f"g{i // 2}",
        model_version=0,
    )


def trainer_for(tmp_path, algorithm: dict, experiences: list[Experience], **kwargs) -> tuple:
    learner, monitor = FakeLearner(), RecordingMonitor()
    sync = Synchronizer(tmp_path, sync_interval=kwargs.pop("sync_interval", 1))
    trainer = Trainer(
        backend=learner,
        plan=build_loss_plan(algorithm),
        buffer=ListBuffer(experiences),
        synchronizer=sync,
        monitor=monitor,
        job_dir=tmp_path,
        train_batch_size=2,
        adam_params=adam_params_fn({"lr": 1e-3, "lr_warmup_steps": 2}, total_steps=3),
        **kwargs,
    )
    return trainer, learner, monitor, sync


def test_steps_queue_both_learner_calls_before_awaiting_and_follow_the_schedule(tmp_path):
    batch = [experience(i, float(i % 2)) for i in range(6)]
    algorithm = {"algorithm_type": "grpo", "kl_loss_fn": "none"}
    trainer, learner, monitor, sync = trainer_for(tmp_path, algorithm, batch, save_interval=2)

    assert asyncio.run(trainer.run(0, 3)) == 3
    learner_calls = [e for e in learner.events if e[1] in ("forward_backward", "optim_step")]
    assert learner_calls[:4] == [
        ("submit", "forward_backward", "ppo"),
        ("submit", "optim_step"),
        ("done", "forward_backward"),
        ("done", "optim_step"),
    ]
    assert [round(p.learning_rate, 6) for p in learner.adam] == [
        0.000505,
        0.001,
        0.001,
    ]  # warmup from min_lr_ratio 0.01
    assert sync.latest().version == 3 and sync.latest().ref.startswith("sampler://")
    assert sync.is_trainer_finished()
    # save_interval 2: step 2, and the last step (3) at the end
    saves = [e[1] for e in learner.events if e[0] == "save_state"]
    assert [s.rsplit("-", 1)[-1] for s in saves] == ["2", "3"]
    assert JobDir(tmp_path).latest_checkpoint() == (3, f"state://{saves[-1]}")
    assert monitor.steps_with("actor/pg_loss") == [1, 2, 3]
    # the datum carries the experience's advantages on its response targets, zeros on the prompt
    _, datums = learner.submitted[0]
    advantages = datums[0].loss_fn_inputs["advantages"].to_torch().tolist()
    assert len(advantages) == 5 and advantages[:2] == [0.0, 0.0] and advantages[2] < 0


def test_reference_logprobs_only_when_the_plan_needs_them(tmp_path):
    batch = [experience(i, float(i % 2)) for i in range(2)]
    ref = FakeSampler(["x"])
    calls = []
    original = ref.compute_logprobs

    async def counted(tokens):
        calls.append(tokens)
        return await original(tokens)

    ref.compute_logprobs = counted
    with_kl = {"algorithm_type": "grpo", "kl_loss_fn": "k3", "kl_loss_fn_args": {"kl_coef": 0.1}}
    trainer, learner, monitor, _ = trainer_for(tmp_path / "kl", with_kl, batch, ref_sampler=ref)
    asyncio.run(trainer.run(0, 1))
    assert len(calls) == 2 and learner.submitted[0][0] == "custom"
    assert "actor/kl_loss" in monitor.records[-1][1]

    calls.clear()
    plain = {"algorithm_type": "grpo", "kl_loss_fn": "none"}
    trainer, learner, _, _ = trainer_for(tmp_path / "plain", plain, list(batch), ref_sampler=ref)
    asyncio.run(trainer.run(0, 1))
    assert calls == [] and learner.submitted[0][0] == "ppo"


def test_a_dry_buffer_ends_the_run_with_a_checkpoint_of_the_last_step(tmp_path):
    batch = [experience(i, float(i % 2)) for i in range(4)]  # two steps' worth
    trainer, learner, _, sync = trainer_for(
        tmp_path, {"algorithm_type": "grpo", "kl_loss_fn": "none"}, batch, save_interval=5
    )
    assert asyncio.run(trainer.run(0, 10)) == 2
    assert JobDir(tmp_path).latest_checkpoint()[0] == 2
    assert sync.is_trainer_finished()


def test_resume_continues_the_step_count(tmp_path):
    batch = [experience(i, float(i % 2)) for i in range(2)]
    trainer, learner, monitor, _ = trainer_for(
        tmp_path, {"algorithm_type": "grpo", "kl_loss_fn": "none"}, batch
    )
    assert asyncio.run(trainer.run(4, 5)) == 5
    assert [step for step, _ in monitor.records] == [5]
    assert JobDir(tmp_path).latest_checkpoint()[0] == 5


def test_max_checkpoints_to_keep_frees_older_states_and_always_exports_each(tmp_path):
    batch = [experience(i, float(i % 2)) for i in range(8)]
    trainer, learner, _, _ = trainer_for(
        tmp_path,
        {"algorithm_type": "grpo", "kl_loss_fn": "none"},
        batch,
        save_interval=1,
        max_checkpoints_to_keep=2,
        save_hf_checkpoint="always",
    )
    asyncio.run(trainer.run(0, 4))
    job = JobDir(tmp_path)
    assert job.checkpointed_steps() == [3, 4]
    assert not job.step_dir(1).exists() and not job.step_dir(2).exists()
    deleted = [e[1] for e in learner.events if e[0] == "delete_state"]
    assert [ref.rsplit("-", 1)[-1] for ref in deleted] == ["1", "2"]
    exported = [e[1] for e in learner.events if e[0] == "export_adapter"]
    assert exported == [str(job.hf_adapter_dir(step)) for step in (1, 2, 3, 4)]
