"""Workflows end to end against a scripted sampler: prompt, sampling args, experience layout."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from workflow_fakes import ScriptedSampler

from trinity.buffer.procedural import countdown
from trinity.workflows import WORKFLOWS, Task
from trinity.workflows.workflows import BOXED_SYSTEM_PROMPT, R1_SYSTEM_PROMPT

GSM8K = [json.loads(line) for line in (Path(__file__).parent / "data/gsm8k_sample.jsonl").open()]
# prompt_type "messages" is the original's default even for question/answer rows
GSM8K_FORMAT = {"prompt_key": "question", "response_key": "answer", "prompt_type": "messages"}


def run(task: Task, sampler: ScriptedSampler):
    return asyncio.run(WORKFLOWS.get(task.workflow)(task, sampler).run())


def gsm8k_task(workflow="math_workflow", **overrides) -> Task:
    fields = dict(
        task_id="gsm8k/0/0",
        raw=GSM8K[0],  # Natalia: #### 72
        workflow=workflow,
        repeat_times=4,
        format=dict(GSM8K_FORMAT),
        rollout_args={"temperature": 0.7, "top_p": 0.9, "max_tokens": 64, "n": 99, "logprobs": 0},
    )
    fields.update(overrides)
    return Task(**fields)


def test_math_workflow_on_gsm8k():
    texts = [
        "<think>48/2 = 24, 48 + 24 = 72</think> <answer>72</answer>",
        "They sold 72 clips.",
        "<think>48 + 48 = 96</think> <answer>96</answer>",
        "<think>48/2 = 24 and then...",
    ]
    sampler = ScriptedSampler(texts)
    experiences = run(gsm8k_task(), sampler)

    (call,) = sampler.calls
    assert call["kind"] == "chat" and call["n"] == 4
    assert call["args"] == {"temperature": 0.7, "top_p": 0.9, "max_tokens": 64}
    assert call["messages"] == [
        {"role": "system", "content": R1_SYSTEM_PROMPT},
        {"role": "user", "content": GSM8K[0]["question"]},
    ]
    assert [e.reward for e in experiences] == pytest.approx([1.1, 0.9, 0.1, -0.1])
    assert experiences[0].reward_components == {"accuracy": 1.0, "format_score": 0.1}
    assert [e.truncated for e in experiences] == [False, False, False, True]
    for exp, text in zip(experiences, texts, strict=True):
        prompt = sampler.tokenizer.encode(sampler.tokenizer.apply_chat_template(call["messages"]))
        assert exp.tokens == prompt + sampler.tokenizer.encode(text)
        assert exp.prompt_length == len(prompt)
        assert exp.response_length == len(text)
        assert len(exp.logprobs) == len(exp.loss_mask) == len(text)
        assert exp.logprobs[0] == pytest.approx(-0.25)
        assert set(exp.loss_mask) == {1}
        assert exp.response_text == text
        assert R1_SYSTEM_PROMPT in exp.prompt_text and "Natalia" in exp.prompt_text
        assert exp.task_id == "gsm8k/0/0" and not exp.is_eval


def test_system_prompt_and_reward_fn_from_the_task_win():
    sampler = ScriptedSampler(["The answer is 72"])
    task = gsm8k_task(
        format={**GSM8K_FORMAT, "system_prompt": "Be brief."},
        reward_fn="accuracy_reward",
        repeat_times=2,
        is_eval=True,
    )
    experiences = run(task, sampler)
    assert sampler.calls[0]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert [e.reward_components for e in experiences] == [{"accuracy": 1.0}] * 2
    assert all(e.is_eval for e in experiences)


def test_system_prompt_key_reads_the_row():
    sampler = ScriptedSampler(["72"])
    raw = {**GSM8K[0], "sys": "Row-level system prompt."}
    task = gsm8k_task(raw=raw, format={**GSM8K_FORMAT, "system_prompt_key": "sys"}, repeat_times=1)
    run(task, sampler)
    assert sampler.calls[0]["messages"][0]["content"] == "Row-level system prompt."


def test_simple_workflow_needs_a_reward_fn():
    with pytest.raises(ValueError, match="default_reward_fn_type"):
        WORKFLOWS.get("simple_workflow")(gsm8k_task("simple_workflow"), ScriptedSampler(["1"]))


def test_simple_workflow_on_the_builtin_arithmetic_rows():
    sampler = ScriptedSampler(["10", "The answer is 10.", "11"])
    task = Task(
        task_id="arithmetic/0/0",
        raw={"question": "What is 3 + 7?", "answer": "10"},
        workflow="simple_workflow",
        reward_fn="accuracy_reward",
        repeat_times=3,
        format={
            "prompt_key": "question",
            "response_key": "answer",
            "system_prompt": "Number only.",
        },
    )
    experiences = run(task, sampler)
    assert [e.reward for e in experiences] == [1.0, 1.0, 0.0]
    assert sampler.calls[0]["messages"] == [
        {"role": "system", "content": "Number only."},
        {"role": "user", "content": "What is 3 + 7?"},
    ]
    assert sampler.calls[0]["args"] == {}


def test_reply_prefix_is_part_of_the_prompt_and_of_the_scored_text():
    sampler = ScriptedSampler(["48/2 = 24, so 72</think> <answer>72</answer>"])
    task = gsm8k_task(format={**GSM8K_FORMAT, "reply_prefix": "<think>"}, repeat_times=1)
    (exp,) = run(task, sampler)
    (call,) = sampler.calls
    assert call["kind"] == "generate"
    assert sampler.tokenizer.decode(call["prompt_tokens"]).endswith("<|assistant|><think>")
    assert exp.response_text.startswith("<think>48/2")
    assert exp.reward_components == {"accuracy": 1.0, "format_score": 0.1}
    assert exp.tokens[exp.prompt_length :] == sampler.tokenizer.encode(sampler.texts[0])


def test_a_row_holding_a_chat():
    sampler = ScriptedSampler(["4"])
    chat = [{"role": "user", "content": "2+2?"}]
    task = Task(
        task_id="t",
        raw={"message": chat, "response": "4"},
        workflow="simple_workflow",
        reward_fn="accuracy",
        format={"prompt_type": "plaintext"},
    )
    (exp,) = run(task, sampler)
    assert sampler.calls[0]["messages"] == chat and exp.reward == 1.0


def test_math_boxed_workflow():
    sampler = ScriptedSampler(["24 + 48 = 72, so \\boxed{72}", "\\boxed{96}"])
    experiences = run(gsm8k_task("math_boxed_workflow", repeat_times=2), sampler)
    assert sampler.calls[0]["messages"][0] == {"role": "system", "content": BOXED_SYSTEM_PROMPT}
    assert [e.reward_components for e in experiences] == [
        {"accuracy": 1.0, "format_score": 0.0},
        {"accuracy": 0.0, "format_score": 0.0},
    ]


def test_math_boxed_workflow_with_think_and_base_model_prompt():
    sampler = ScriptedSampler(["\\boxed{72}", "<think>24+48</think> \\boxed{72}"])
    task = gsm8k_task(
        "math_boxed_workflow", repeat_times=2, workflow_args={"with_think": True, "use_base": True}
    )
    experiences = run(task, sampler)
    (call,) = sampler.calls
    prompt = sampler.tokenizer.decode(call["prompt_tokens"])
    assert call["kind"] == "generate" and "<think>" in prompt
    assert prompt.endswith(f"User: {GSM8K[0]['question']}\nAssistant:")
    assert [e.reward for e in experiences] == pytest.approx([0.9, 1.0])


def test_countdown_workflow_on_builtin_rows():
    row = countdown(size=1, seed=3)[0]
    good = f"<think>try</think> <answer>{row['answer']}</answer>"
    sampler = ScriptedSampler([good, "<answer>1 + 1</answer>", "no idea"])
    task = Task(
        task_id="cd",
        raw=row,
        workflow="countdown_workflow",
        repeat_times=3,
        format={"prompt_key": "question"},
    )
    experiences = run(task, sampler)
    assert [e.reward for e in experiences] == pytest.approx([1.0, 0.1, 0.0])
    assert sampler.calls[0]["messages"][1]["content"] == row["question"]


def test_countdown_workflow_writes_the_question_from_nums_and_target():
    sampler = ScriptedSampler(["<answer>(6 - 2) * 3</answer>"])
    task = Task(task_id="cd", raw={"nums": [6, 2, 3], "target": 12}, workflow="countdown_workflow")
    (exp,) = run(task, sampler)
    assert "[6, 2, 3]" in sampler.calls[0]["messages"][1]["content"]
    assert exp.reward == 1.0


def test_original_workflow_names_resolve():
    for name in (
        "simple_workflow",
        "async_simple_workflow",
        "math_workflow",
        "async_math_workflow",
        "math_boxed_workflow",
        "async_math_boxed_workflow",
        "countdown_workflow",
    ):
        assert name in WORKFLOWS


def test_grpo_demo_taskset_end_to_end():
    """examples/grpo_demo.yaml's taskset -> reader -> simple_workflow + accuracy_reward."""
    from omegaconf import OmegaConf

    from trinity.buffer.tasksets import TasksetReader

    config = OmegaConf.load(Path(__file__).parents[1] / "examples/grpo_demo.yaml")
    inputs = config.buffer.explorer_input
    reader = TasksetReader(
        inputs.taskset,
        repeat_times=config.algorithm.repeat_times,
        batch_size=config.buffer.batch_size,
        total_steps=config.buffer.total_steps,
        default_workflow=inputs.default_workflow_type,
        default_reward_fn=inputs.default_reward_fn_type,
    )
    assert reader.total_steps() == 30
    for task in reader.read_batch():
        sampler = ScriptedSampler([task.raw["answer"], "no idea"])
        experiences = run(task, sampler)
        assert len(experiences) == 8
        assert [e.reward for e in experiences] == [1.0, 0.0] * 4
        assert sampler.calls[0]["messages"][0]["content"] == "Answer with the number only."
