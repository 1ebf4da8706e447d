"""The original's plugin interface (``trinity.compat``, imported as ``trinity.common.*``).

The plugin under test, ``tests/plugins_original/original_style.py``, is written exactly as a
Trinity-RFT 0.6 user writes one. Checked here: the compat types with no model; the plugin's
workflows run by our ``rollout`` against a fake backend (async multi-step, sync
can_repeat / can_reset in a worker thread); bad input (an unknown name, a plugin that fails to
import, a workflow that raises); two GRPO steps with the plugin on each backend.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

import pytest
import torch
import yaml
from loop_fakes import FakeSampler
from test_explorer import explorer_for
from test_rl_loop import backend_model, job_dir, trainer_records, write_config

from trinity.buffer.tasksets import TasksetReader
from trinity.cli.main import main
from trinity.common.experience import EID, Experience
from trinity.common.models.model import ModelWrapper
from trinity.common.rewards import REWARD_FUNCTIONS, RewardFn
from trinity.common.workflows import WORKFLOWS, Task, Workflow
from trinity.explorer.explorer import rollout
from trinity.explorer.sampler import PolicySampler, RolloutSettings
from trinity.monitor import read_metrics
from trinity.plugins import load_plugins
from trinity.registry import REWARD_FUNCTIONS as OUR_REWARDS
from trinity.registry import WORKFLOWS as OUR_WORKFLOWS
from trinity.workflows import types

PLUGINS = Path(__file__).parent / "plugins_original"
ARITH = {
    "name": "arith",
    "path": "builtin:arithmetic",
    "builtin_args": {"size": 8, "max_operand": 3, "operators": ["+"]},
    "format": {"prompt_key": "question", "response_key": "answer"},
    "reward_fn_args": {"bonus": 0.5},
}


@pytest.fixture(scope="module")
def plugin():
    (name,) = load_plugins([PLUGINS])
    return __import__("sys").modules[name]


def our_task(workflow: str, repeat_times: int = 2, task_id: str = "arith/0/3") -> types.Task:
    return types.Task(
        task_id=task_id,
        raw={"question": "What is 1 + 2?", "answer": "3"},
        workflow=workflow,
        repeat_times=repeat_times,
        reward_fn="digit_count_reward",
        format={"prompt_key": "question", "response_key": "answer"},
        reward_fn_args={"bonus": 0.5},
        batch_id=4,
    )


# -- the types, no model ------------------------------------------------------------------


def test_experience_single_and_multi_turn_and_conversion():
    exp = Experience(tokens=[1, 2, 3, 4], prompt_length=2, logprobs=[-0.5, -0.25], reward=1.0)
    assert exp.tokens.dtype == torch.int64 and exp.action_mask.tolist() == [True, True]
    cut = Experience(tokens=[1, 2, 3], prompt_length=2, truncate_status="prompt_truncated")
    assert cut.action_mask.tolist() == [False]
    with pytest.raises(ValueError, match="prompt_length 3 must be in"):
        Experience(tokens=[1, 2, 3], prompt_length=3)
    with pytest.raises(ValueError, match="action_mask has 1 entries"):
        Experience(tokens=[1, 2, 3], prompt_length=1, action_mask=[1])
    with pytest.raises(TypeError):
        Experience(tokens=[1, 2], prompt_length=1, chosen=[2])  # DPO pairs: not supported

    multi = Experience(
        tokens=torch.tensor([1, 2, 3, 4, 5]),
        prompt_length=2,
        logprobs=torch.tensor([-1.0, 0.0, -2.0]),
        action_mask=[1, 0, 1],
        reward=0.75,
        eid=EID(batch=4, task="t", run=2, step=1),
        metrics={"accuracy": 0.5},
        truncate_status="response_truncated",
    )
    assert multi.eid.tid == "4/t" and multi.eid.rid == "4/t/2" and multi.eid.sid == "4/t/1"
    ours = multi.to_ours(our_task("x"))
    assert ours.tokens == [1, 2, 3, 4, 5] and ours.loss_mask == [1, 0, 1]
    assert ours.logprobs == [-1.0, 0.0, -2.0] and ours.reward == 0.75 and ours.truncated
    assert ours.reward_components == {"accuracy": 0.5} and ours.task_id == "arith/0/3"
    assert ours.info == {"run": 2, "step": 1}
    back = Experience.from_ours(ours)
    assert back.action_mask.tolist() == [True, False, True] and back.reward is None
    assert back.eid.run == 2 and back.truncate_status == "response_truncated"

    with pytest.raises(ValueError, match="without a reward"):
        Experience(tokens=[1, 2], prompt_length=1, logprobs=[0.0]).to_ours(our_task("x"))
    with pytest.raises(ValueError, match="without logprobs"):
        Experience(tokens=[1, 2], prompt_length=1, reward=1.0).to_ours(our_task("x"))


def test_registries_register_into_ours(plugin):
    assert "two_turn_workflow" in OUR_WORKFLOWS and "digit_count_reward" in OUR_REWARDS
    assert WORKFLOWS.get("two_turn_workflow") is plugin.TwoTurnWorkflow
    assert plugin.TwoTurnWorkflow._name == "two_turn_workflow"
    assert OUR_WORKFLOWS.get("two_turn_workflow").original is plugin.TwoTurnWorkflow
    assert WORKFLOWS.get(None) is None
    with pytest.raises(ValueError, match="did you mean 'two_turn_workflow'"):
        WORKFLOWS.get("two_turn_workflw")

    class Other(Workflow):
        pass

    with pytest.raises(KeyError, match="already registered"):
        WORKFLOWS.register_module("two_turn_workflow", Other)
    WORKFLOWS.register_module("compat_test_other", Other)
    assert WORKFLOWS.register_module("compat_test_other", Other, force=True) is Other

    # a plugin's reward class through our function shape (what simple_workflow calls) ...
    assert OUR_REWARDS.get("digit_count_reward")("a1", "1", bonus=0.5) == {
        "digit_share": 0.5,
        "bonus": 0.5,
    }
    assert REWARD_FUNCTIONS.get("digit_count_reward") is plugin.DigitCountReward
    # ... and one of ours as the original's class
    accuracy = REWARD_FUNCTIONS.get("accuracy_reward")
    assert issubclass(accuracy, RewardFn) and accuracy._name == "accuracy_reward"
    assert accuracy()(response="<answer>3</answer>", truth="3")["accuracy"] == 1.0


def test_task_view_reads_format_and_fills_rollout_args():
    settings = RolloutSettings(max_response_tokens=12, temperature=0.7)
    task = Task.view(our_task("two_turn_workflow"), Workflow, settings)
    assert task.task_desc == "What is 1 + 2?" and task.truth == "3"
    assert task.rollout_args.temperature == 0.7 and task.rollout_args.max_tokens == 12
    assert task.rollout_args.n == 1 and task.repeat_times == 2 and task.batch_id == 4
    assert task.reward_fn(**task.reward_fn_args)(response="12") == {
        "digit_share": 1.0,
        "bonus": 0.5,
    }
    assert Task(raw_task={"prompt": "hi"}).task_desc == "hi"  # the original's default keys


# -- the model view over our sampler, against a fake backend ------------------------------


def wrapper(texts=("7",), **settings) -> ModelWrapper:
    backend = FakeSampler(list(texts))
    return ModelWrapper(PolicySampler(backend, RolloutSettings(**settings), seed=1))


def test_model_wrapper_chat_generate_logprobs():
    model = wrapper(["12", "ab"])
    exps = model.chat([{"role": "user", "content": "hi"}], n=2, temperature=0.5, logprobs=1)
    assert [e.response_text for e in exps] == ["12", "ab"]
    first = exps[0]
    assert first.prompt_length == len(first.tokens) - 2 and first.logprobs.tolist() == [-0.25] * 2
    assert first.prompt_text.endswith("<|assistant|>") and first.reward is None
    assert model.sampler.backend.requests[0][2].temperature == 0.5
    assert len(model.generate(["a", "b"], n=2)) == 4
    assert model.logprobs([5, 6, 7]).tolist() == [-1.0, -1.0]
    with pytest.raises(NotImplementedError):
        model.logprobs([5, 6], temperature=0.5)

    convo = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
    ]
    exp = model.convert_messages_to_experience(convo)
    text = exp.prompt_text + exp.response_text
    assert exp.prompt_text == "<|user|>q\n<|assistant|>"
    masked = "".join(
        t for t, m in zip(text[exp.prompt_length :], exp.action_mask, strict=True) if m
    )
    assert masked == "a1\na2\n" and len(exp.logprobs) == len(exp.action_mask)


def test_model_wrapper_history_and_the_blocking_bridge():
    model = wrapper(enable_history=True)
    clone = model.clone_with_isolated_history()
    model.chat([{"role": "user", "content": "hi"}])
    assert len(model.history) == 1 and clone.history == []
    (recorded,) = model.extract_experience_from_history()
    assert recorded.reward is None and model.history == []

    async def inside_the_loop():
        model.loop = asyncio.get_running_loop()
        with pytest.raises(RuntimeError, match="await its \\*_async variant"):
            model.chat([{"role": "user", "content": "hi"}])
        # from a worker thread, the blocking call runs on the loop and is waited for
        return await asyncio.to_thread(model.chat, [{"role": "user", "content": "hi"}], n=3)

    assert len(asyncio.run(inside_the_loop())) == 3


# -- the plugin's workflows, run by our explorer's rollout ---------------------------------


def test_async_multi_step_workflow_runs_as_ours(plugin):
    backend = FakeSampler(["4", "x2"])
    experiences = asyncio.run(
        rollout(our_task("two_turn_workflow", 3), backend, RolloutSettings(), seed=1)
    )
    assert len(experiences) == 6 and len(backend.requests) == 6  # 3 episodes x 2 turns
    assert sorted((e.info["run"], e.info["step"]) for e in experiences) == [
        (r, s) for r in range(3) for s in range(2)
    ]
    # the reward the plugin computed on the second reply, on both turns of the episode
    assert {e.reward for e in experiences} == {1.5}
    assert experiences[0].reward_components == {"digit_share": 1.0, "bonus": 0.5}


def test_sync_repeat_reset_workflow_runs_in_a_thread_and_is_reset(plugin):
    plugin.COUNTS.update(init=0, reset=0, threads=set())
    backend = FakeSampler(["4", "ab"])

    async def two_tasks():
        for task_id in ("arith/0/1", "arith/0/2"):
            yield await rollout(
                our_task("repeat_reset_workflow", 2, task_id), backend, RolloutSettings(), seed=1
            )

    async def collect():
        return [exps async for exps in two_tasks()]

    first, second = asyncio.run(collect())
    assert [len(backend.requests), backend.requests[0][1]] == [2, 2]  # one call with n = 2
    assert [e.reward for e in first] == [1.5, 0.5] and [e.info["run"] for e in first] == [0, 1]
    assert second[0].task_id == "arith/0/2"
    assert plugin.COUNTS["init"] == 1 and plugin.COUNTS["reset"] == 1
    assert threading.main_thread().name not in plugin.COUNTS["threads"]


def test_sync_single_run_workflow_runs_once_per_repeat():
    """The shape of the original's docs example: sync, not can_repeat, chat with n=1."""

    @WORKFLOWS.register_module("compat_test_single_run")
    class SingleRun(Workflow):
        def run(self):
            exps = self.model.chat([{"role": "user", "content": self.task.task_desc}], n=1)
            exps[0].reward = float(exps[0].response_text == self.task.truth)
            return exps

    backend = FakeSampler(["3"])
    experiences = asyncio.run(
        rollout(our_task("compat_test_single_run", 4), backend, RolloutSettings(), seed=1)
    )
    assert [e.reward for e in experiences] == [1.0] * 4
    assert sorted(e.info["run"] for e in experiences) == [0, 1, 2, 3]
    assert [request[1] for request in backend.requests] == [1] * 4


# -- bad input ---------------------------------------------------------------------------


def test_a_raising_workflow_is_logged_per_task_counted_and_the_run_goes_on(
    tmp_path, plugin, caplog
):
    reader = TasksetReader(
        ARITH,
        repeat_times=2,
        batch_size=8,
        default_workflow="raising_workflow",
        default_reward_fn="digit_count_reward",
    )
    odd = [f"arith/0/{i}" for i, row in enumerate(reader.rows) if int(row["answer"]) % 2]
    assert 0 < len(odd) < 8
    explorer, buffer, monitor, _ = explorer_for(
        tmp_path, FakeSampler(["4"]), reader, max_retry_times=0
    )
    with caplog.at_level(logging.WARNING):
        assert asyncio.run(explorer.run(0, 1)) == 1
    failed = [r.getMessage() for r in caplog.records if "odd answers" in r.getMessage()]
    assert len(failed) == len(odd)
    assert sorted(m.split()[1] for m in failed) == odd
    assert monitor.records[-1][1]["rollout/failed_task_count"] == len(odd)
    assert len(buffer.puts[0]) == (8 - len(odd)) * 2 * 2  # episodes x turns of the others


def test_unknown_workflow_name_is_one_line_with_a_suggestion(tmp_path, tiny_model_dir, capsys):
    config = write_config(
        tmp_path, tiny_model_dir, buffer=original_buffer(workflow="two_turn_workflw")
    )
    assert main(["run", "--config", str(config), "--plugin-dir", str(PLUGINS)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "did you mean 'two_turn_workflow'" in err


def test_a_plugin_that_fails_to_import_names_the_file_and_line(tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "flow.py").write_text(
        "from trinity.common.workflows import WORKFLOWS, Workflow\n\n\n"
        '@WORKFLOWS.register_module("flow")\n'
        "class Flow(Workflow):\n"
        "    pass\n\n\n"
        'WORKFLOWS.register_module("flow", Workflow)  # a second class under the same name\n'
    )
    (broken / "syntax.py").write_text("x = 1\ndef broken(:\n")
    config = tmp_path / "any.yaml"
    config.write_text("mode: both\n")
    assert main(["config", "check", str(config), "--plugin-dir", str(broken)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{broken / 'flow.py'}:9 failed to load: KeyError" in err and "\n" not in err
    (broken / "flow.py").unlink()
    assert main(["config", "check", str(config), "--plugin-dir", str(broken)]) == 2
    assert f"{broken / 'syntax.py'}:2 failed to load: SyntaxError" in capsys.readouterr().err


# -- two GRPO steps with the plugin on each backend ------------------------------------------


def original_buffer(workflow: str = "two_turn_workflow") -> dict:
    """Train on the async two-turn workflow (2 experiences per episode: train_batch_size 16);
    evaluate with the sync can_repeat one at start and after step 2."""
    return {
        "batch_size": 2,
        "train_batch_size": 16,
        "total_steps": 2,
        "explorer_input": {
            "taskset": {**ARITH, "builtin_args": {"size": 64}},
            "eval_tasksets": [{**ARITH, "name": "eval", "repeat_times": 2}],
            "default_workflow_type": workflow,
            "default_eval_workflow_type": "repeat_reset_workflow",
            "default_reward_fn_type": "digit_count_reward",
        },
    }


@pytest.mark.parametrize("backend", ["local", "tinker"])
def test_original_plugin_runs_two_grpo_steps(tmp_path, tiny_model_dir, backend):
    config = write_config(
        tmp_path,
        tiny_model_dir,
        model=backend_model(tmp_path, tiny_model_dir, backend),
        buffer=original_buffer(),
        explorer={
            "runner_per_model": 4,
            "rollout_model": {"engine_num": 1, "seed": 7},
            "eval_interval": 2,
            "eval_on_startup": True,
        },
    )
    assert yaml.safe_load(config.read_text())["buffer"]["train_batch_size"] == 16
    assert main(["run", "--config", str(config), "--plugin-dir", str(PLUGINS)]) == 0
    job = job_dir(tmp_path)
    steps = trainer_records(job)
    assert sorted(steps) == [1, 2]
    for record in steps.values():
        # what the plugin's RewardFn computed (bonus 0.5 + the digit share) reached the trainer
        assert record["rollout/bonus/mean"] == 0.5
        assert 0.5 <= record["critic/rewards/mean"] <= 1.5
        assert record["critic/rewards/mean"] == pytest.approx(record["rollout/reward/mean"])
        assert record["rollout/failed_task_count"] == 0.0
        assert record["actor/final_loss"] == pytest.approx(record["actor/final_loss"])  # not NaN
    evals = [
        r for r in read_metrics(job / "monitor" / "metrics.jsonl") if "eval/eval/bonus/mean@2" in r
    ]
    assert [r["step"] for r in evals] == [0, 2] and all(
        r["eval/eval/bonus/mean@2"] == 0.5 for r in evals
    )
