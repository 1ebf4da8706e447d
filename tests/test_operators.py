"""Experience operators (``data_processor.experience_pipeline.operators``): each one's effect on a
step's experiences, the config check of their names and args, and the explorer -> buffer ->
trainer path, where the trainer receives the filtered, masked batch."""

from __future__ import annotations

import asyncio
import dataclasses
import math

import pytest
import yaml
from loop_fakes import FakeLearner, FakeSampler, RecordingMonitor, explorer_for
from tinker import types

from trinity.algorithms import adam_params_fn, build_loss_plan
from trinity.buffer.operators import build_operator, build_pipeline
from trinity.buffer.tasksets import TasksetReader
from trinity.config import ConfigError, load_config
from trinity.explorer.explorer import MAX_EXTRA_BATCHES
from trinity.jobdir import JobDir
from trinity.synchronizer.synchronizer import Synchronizer
from trinity.trainer.trainer import Trainer
from trinity.workflows.types import Experience


def exp(group: str, reward: float, *, truncated=False, row=None, **extra) -> Experience:
    info = {"task_index": {"taskset_id": 0, "index": row}} if row is not None else {}
    return Experience(
        tokens=[1, 2, 3, 4, 5],
        prompt_length=2,
        logprobs=[-0.5] * 3,
        loss_mask=[1, 1, 1],
        reward=reward,
        group_id=group,
        truncated=truncated,
        info={**info, **extra.pop("info", {})},
        **extra,
    )


def run(name: str, experiences: list[Experience], **args):
    return build_operator(name, args).process(experiences)


def test_reward_filter_keeps_rewards_at_or_above_the_threshold():
    batch = [exp("a", 0.0), exp("a", 0.5), exp("b", 1.0), exp("b", -1.0)]
    kept, metrics = run("reward_filter", batch, threshold=0.5)
    assert [e.reward for e in kept] == [0.5, 1.0]
    assert metrics == {"reward_filter/filtered_count": 2.0}
    kept, _ = run("reward_filter", batch)  # default threshold 0
    assert [e.reward for e in kept] == [0.0, 0.5, 1.0]


def test_reward_std_filter_drops_uniform_groups_and_singletons():
    batch = [
        *(exp("same", 1.0) for _ in range(4)),
        *(exp("mixed", r) for r in (0.0, 1.0, 1.0, 1.0)),
        exp("alone", 0.3),
        *(exp("close", r) for r in (0.5, 0.6)),
    ]
    kept, metrics = run("reward_std_filter", batch)
    assert {e.group_id for e in kept} == {"mixed", "close"} and len(kept) == 6
    assert metrics["reward_std_filter/filtered_count"] == 5.0
    assert metrics["reward_std_filter/filtered_group_count"] == 2.0
    kept, _ = run("reward_std_filter", batch, threshold=0.1)  # pstdev(0.5, 0.6) = 0.05
    assert {e.group_id for e in kept} == {"mixed"}


def test_dapo_dynamic_sampling_keeps_groups_neither_all_correct_nor_all_wrong():
    def graded(group, accuracies):
        return [exp(group, 0.2, reward_components={"accuracy": a}) for a in accuracies]

    batch = [*graded("all", [1, 1]), *graded("none", [0, 0]), *graded("some", [0, 1])]
    kept, metrics = run("dapo_dynamic_sampling", batch)
    assert {e.group_id for e in kept} == {"some"}
    assert metrics["dapo_dynamic_sampling/kept_group_count"] == 1.0
    # without the metric the reward decides: 0.2 > 0.1 is correct, so every group is all correct
    kept, _ = run("dapo_dynamic_sampling", batch, metric_key="missing", correct_threshold=0.1)
    assert kept == []


def test_invalid_reward_filter_drops_nan_and_none():
    batch = [exp("a", 1.0), exp("a", math.nan), exp("a", math.inf), exp("a", None)]
    kept, metrics = run("invalid_reward_filter", batch)
    assert [e.reward for e in kept] == [1.0]
    assert metrics["invalid_reward_filter/filtered_count"] == 3.0


def test_mask_response_truncated_zeroes_the_loss_mask_of_truncated_responses():
    batch = [exp("a", 1.0, truncated=True), exp("a", 0.0)]
    kept, metrics = run("mask_response_truncated", batch)
    assert [e.loss_mask for e in kept] == [[0, 0, 0], [1, 1, 1]]
    assert metrics["mask_response_truncated/masked_count"] == 1.0


def test_reward_shaping_mapper_applies_each_rule_in_order():
    configs = [
        {"stats_key": "quality", "op_type": "ADD", "weight": 0.5},
        {"stats_key": "length_penalty", "op_type": "mul"},
        {"stats_key": "zero", "op_type": "DIV"},
    ]
    batch = [
        exp("a", 1.0, info={"quality": 2.0, "length_penalty": 0.5, "zero": 0.0}),
        exp("a", 1.0, reward_components={"quality": 1.0}),
        exp("a", 1.0),
    ]
    kept, metrics = run("reward_shaping_mapper", batch, reward_shaping_configs=configs)
    assert [e.reward for e in kept] == [1.0, 1.5, 1.0]  # (1 + 0.5*2) * 0.5; 1 + 0.5*1; untouched
    assert metrics["reward_shaping_mapper/shaped_count"] == 1.0
    with pytest.raises(ValueError, match="op_type must be one of"):
        build_operator(
            "reward_shaping_mapper",
            {"reward_shaping_configs": [{"stats_key": "q", "op_type": "POW"}]},
        )


def test_pass_rate_calculator_reports_per_task_pass_rates():
    operator = build_operator("pass_rate_calculator", {})
    batch = [
        *(exp("a", r, row=3) for r in (1.0, 0.0, 1.0, 1.0)),
        *(exp("b", 1.0, row=7) for _ in range(2)),
        *(exp("c", 0.0, row=9) for _ in range(2)),
    ]
    kept, metrics = operator.process(batch)
    assert kept == batch
    assert metrics["pass_rate_calculator/pass_rate/mean"] == pytest.approx((0.75 + 1 + 0) / 3)
    assert metrics["pass_rate_calculator/all_pass_ratio"] == pytest.approx(1 / 3)
    assert metrics["pass_rate_calculator/all_fail_ratio"] == pytest.approx(1 / 3)
    assert operator.take_pass_rates() == {3: 0.75, 7: 1.0, 9: 0.0}
    assert operator.take_pass_rates() == {}


def write_config(tmp_path, operators) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(
        "model: {model_path: demo, max_prompt_tokens: 32, max_response_tokens: 8}\n"
        f"checkpoint_root_dir: {tmp_path}\n"
        "buffer:\n  total_steps: 1\n  explorer_input:\n"
        "    taskset: {path: 'builtin:arithmetic'}\n    default_workflow_type: math_workflow\n"
        f"data_processor: {{experience_pipeline: {{operators: {operators}}}}}\n"
    )
    return str(path)


@pytest.mark.parametrize(
    ("operators", "message"),
    [
        (
            "[{name: reward_filtr}]",
            "operators[0].name: unknown experience operator 'reward_filtr'; did you mean 'reward_filter'?",
        ),
        (
            "[{name: reward_filter, args: {threshold: 1, extra: 2}}]",
            "operators[0].args: reward_filter: ",
        ),
        ("[{name: data_juicer}]", "data_juicer needs a Data-Juicer service"),
        ("[{args: {}}]", "operators[0] must be a mapping with a name"),
        (
            "[{name: reward_filter, arg: {}}]",
            "operators[0].arg: unknown key (known: name, args) (did you mean 'args'?)",
        ),
    ],
)
def test_bad_operators_fail_the_config_check(tmp_path, operators, message):
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, operators))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_valid_pipeline_loads_and_builds_in_order(tmp_path):
    config = load_config(
        write_config(
            tmp_path,
            "[{name: mask_response_truncated}, {name: reward_std_filter, args: {threshold: 0.1}}]",
        )
    )
    pipeline = build_pipeline(config.data_processor)
    assert [type(op).__name__ for op in pipeline.operators] == [
        "MaskResponseTruncated",
        "RewardStdFilter",
    ]
    assert pipeline.operators[1].threshold == 0.1


class TruncatingSampler(FakeSampler):
    """Answers ``texts``; the sample whose text is ``"xxxx"`` ran out of tokens."""

    async def sample(self, prompt_tokens, num_samples, params):
        response = await super().sample(prompt_tokens, num_samples, params)
        sequences = [
            dataclasses.replace(seq, stop_reason="length")
            if self.tokenizer.decode(list(seq.tokens)) == "xxxx"
            else seq
            for seq in response.sequences
        ]
        return types.SampleResponse(sequences=sequences)


def test_the_trainer_receives_full_filtered_and_masked_batches(tmp_path):
    """Sums of two operands <= 3 answered "2", "3", "xxxx" (truncated), "9": groups of tasks whose
    sum is neither 2 nor 3 are all wrong and dropped, the truncated answers are masked, and each
    step rolls out further taskset batches until it holds 4 varied groups again (dynamic
    sampling), so the trainer gets full batches whose every untruncated answer has an advantage.
    """
    taskset = {
        "name": "arith",
        "path": "builtin:arithmetic",
        "builtin_args": {"size": 16, "max_operand": 3, "operators": ["+"]},
        "format": {"prompt_key": "question", "response_key": "answer"},
    }
    reader = TasksetReader(
        taskset,
        repeat_times=4,
        batch_size=4,
        total_epochs=3,
        default_workflow="simple_workflow",
        default_reward_fn="accuracy_reward",
    )
    answers = [str(row["answer"]) for row in reader.rows]
    assert [i for i, a in enumerate(answers) if a in ("2", "3")] == [0, 3, 5, 8, 11, 12]
    pipeline = build_pipeline(
        {
            "experience_pipeline": {
                "operators": [
                    {"name": "mask_response_truncated"},
                    {"name": "reward_std_filter"},
                ]
            }
        }
    )
    explorer, buffer, monitor, _ = explorer_for(
        tmp_path,
        TruncatingSampler(["2", "3", "xxxx", "9"]),
        reader,
        synchronizer=Synchronizer(tmp_path, sync_interval=100),
        pipeline=pipeline,
        job_dir=JobDir(tmp_path / "job"),
    )
    assert asyncio.run(explorer.run(0, 2)) == 2
    # step 1: batches [0-3] [4-7] [8-11] keep rows 0 3 | 5 | 8 11, and 4 groups fill the step
    # (row 11 is rolled out but not needed); step 2: [12-15] [0-3] [4-7] keep 12 | 0 3 | 5
    rows = [[e.info["task_index"]["index"] for e in put[::4]] for put in buffer.puts]
    assert rows == [[0, 3, 5, 8], [12, 0, 3, 5]]
    assert [len(put) for put in buffer.puts] == [16, 16]
    for put in buffer.puts:
        for e in put:
            assert e.loss_mask == [0] * len(e.loss_mask) if e.truncated else all(e.loss_mask)
    step1 = monitor.records[0][1]
    assert step1["experience_pipeline/extra_batch_count"] == 2.0
    assert step1["experience_pipeline/reward_std_filter/filtered_count"] == 4.0 * (12 - 5)
    assert step1["experience_pipeline/mask_response_truncated/masked_count"] == 12.0
    assert step1["experience_pipeline/experience_count"] == 16.0
    assert step1["rollout/reward/min"] == 0.0  # what was sampled, before the filter
    assert reader.read_batch()[0].row == 8  # the extra batches were taken from the taskset
    # a run resumed after step 1 starts where step 2 did: batch 3, rows 12-15
    assert JobDir(tmp_path / "job").taskset_batches_read(1) == 3
    assert JobDir(tmp_path / "job").taskset_batches_read(2) == 6

    learner = FakeLearner()
    trainer = Trainer(
        backend=learner,
        plan=build_loss_plan({"algorithm_type": "grpo", "kl_loss_fn": "none"}),
        buffer=buffer,
        synchronizer=Synchronizer(tmp_path / "t", sync_interval=100),
        monitor=RecordingMonitor(),
        job_dir=tmp_path / "t",
        train_batch_size=16,
        adam_params=adam_params_fn({"lr": 1e-3}, total_steps=2),
    )
    assert asyncio.run(trainer.run(0, 2)) == 2
    assert [len(batch) for _, batch in learner.submitted] == [16, 16]
    sent = [e for put in buffer.puts for e in put]
    datums = [d for _, batch in learner.submitted for d in batch]
    for datum, e in zip(datums, sent, strict=True):
        advantages = datum.loss_fn_inputs["advantages"].to_torch().tolist()
        if e.truncated:  # a masked response trains no token
            assert not any(advantages)
        else:
            assert any(advantages)  # every kept group has varied rewards: no zero advantage


def test_a_step_stops_topping_up_after_the_extra_batch_limit(tmp_path, caplog):
    """Every answer wrong: nothing survives the std filter; the step gives up after
    MAX_EXTRA_BATCHES extra batches and says so, instead of reading the taskset dry."""
    reader = TasksetReader(
        {
            "name": "arith",
            "path": "builtin:arithmetic",
            "builtin_args": {"size": 64, "max_operand": 3, "operators": ["+"]},
            "format": {"prompt_key": "question", "response_key": "answer"},
        },
        repeat_times=2,
        batch_size=2,
        default_workflow="simple_workflow",
        default_reward_fn="accuracy_reward",
    )
    explorer, buffer, monitor, _ = explorer_for(
        tmp_path,
        FakeSampler(["wrong"]),
        reader,
        synchronizer=Synchronizer(tmp_path, sync_interval=100),
        pipeline=build_pipeline(
            {"experience_pipeline": {"operators": [{"name": "reward_std_filter"}]}}
        ),
    )
    assert asyncio.run(explorer.run(0, 1)) == 1
    assert buffer.puts == [[]]
    assert monitor.records[0][1]["experience_pipeline/extra_batch_count"] == MAX_EXTRA_BATCHES
    assert reader.read_batch()[0].batch_id == 1 + MAX_EXTRA_BATCHES
    assert "kept 0 of the 4 experiences" in caplog.text


def test_trinity_run_applies_the_configured_operators(tmp_path, tiny_model_dir):
    """A real run (tiny model, local engine): ``reward_shaping_mapper`` adds 10 x the length share
    to each reward (which is the length share), so every step the trainer's rewards are 11 x the
    shares the explorer sampled (sync_offset 0: a trainer batch is one explore step's output)."""
    from test_rl_loop import job_dir, run_cli, write_config

    from trinity.monitor import read_metrics

    shaping = [{"stats_key": "length_share", "op_type": "ADD", "weight": 10.0}]
    inputs = yaml.safe_load(write_config(tmp_path, tiny_model_dir).read_text())["buffer"]
    inputs["explorer_input"]["default_reward_fn_type"] = "length_share_reward"
    config = write_config(
        tmp_path,
        tiny_model_dir,
        data_processor={
            "experience_pipeline": {
                "operators": [
                    {"name": "reward_shaping_mapper", "args": {"reward_shaping_configs": shaping}},
                    {"name": "mask_response_truncated"},
                ]
            }
        },
        buffer={**inputs, "total_steps": 2},
    )
    run_cli(config)
    records = read_metrics(job_dir(tmp_path) / "monitor" / "metrics.jsonl")
    explorer = {r["step"]: r for r in records if "rollout/length_share/max" in r}
    trainer = {r["step"]: r for r in records if "critic/rewards/max" in r}
    assert sorted(explorer) == sorted(trainer) == [1, 2]
    for step in (1, 2):
        sampled = explorer[step]
        assert sampled["rollout/length_share/min"] > 0
        for stat in ("max", "mean", "min"):
            assert trainer[step][f"critic/rewards/{stat}"] == pytest.approx(
                11 * sampled[f"rollout/length_share/{stat}"]
            )
        assert sampled["experience_pipeline/reward_shaping_mapper/shaped_count"] == 8
        masked = sampled["experience_pipeline/mask_response_truncated/masked_count"]
        assert masked == 8 * trainer[step]["response_length/clip_ratio"]
