"""Agent training: the rollout model as an OpenAI endpoint, history -> token-exact experiences,
agent workflows, environments and step-wise advantages.

The endpoint tests drive it with the official ``openai`` SDK, against the tiny random model on the
local engine and through the Tinker SDK against an embedded ``trinity server``. Tolerance for
"sampler logprobs == teacher-forced logprobs": 1e-3 absolute; both come from the same float32
weights, one decoding with a KV cache in a batch, the other one forward pass over the sequence.
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import openai
import pytest
import torch
from tinker import types

from trinity.algorithms import explorer_hook
from trinity.buffer.procedural import build_builtin
from trinity.explorer.explorer import rollout
from trinity.explorer.sampler import PolicySampler, RolloutSettings
from trinity.workflows.agents import tool_math
from trinity.workflows.envs import FrozenLake, Sudoku, calculate
from trinity.workflows.types import Experience, Response, Task

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Look a word up.",
            "parameters": {"type": "object", "properties": {"word": {"type": "string"}}},
        },
    }
]
AGENT = dict(
    max_response_tokens=8,
    max_model_len=1024,
    enable_history=True,
    enable_openai_api=True,
    enable_auto_tool_choice=True,
)


@pytest.fixture(scope="module")
def local_backend(tiny_model_dir):
    from trinity.backends.local import LocalRuntime, LocalSampler

    # fp32: the token-exact experience test compares sampled logprobs with teacher-forced ones at
    # 1e-3, which bf16 roundings exceed on a real model (docs/benchmarks.md)
    runtime = LocalRuntime(str(tiny_model_dir), dtype=torch.float32)
    yield LocalSampler(runtime)
    runtime.close()


@pytest.fixture(scope="module")
def tinker_backend(tiny_model_dir, tmp_path_factory):
    from trinity.backends.tinker_sdk import TinkerSampler, TinkerSession
    from trinity.server import ServerThread, build_service

    service = build_service(
        [str(tiny_model_dir)], tmp_path_factory.mktemp("srv"), {"tml-agent": "agent"}
    )
    srv = ServerThread(service).start()
    session = TinkerSession(srv.url, "tml-agent")
    yield asyncio.run(TinkerSampler.create(session, str(tiny_model_dir)))
    srv.stop()


def policy(backend, concatenated: bool = True, **settings) -> PolicySampler:
    return PolicySampler(
        backend, RolloutSettings(**{**AGENT, **settings}), seed=3, concatenated=concatenated
    )


@pytest.mark.parametrize("backend_name", ["local_backend", "tinker_backend"])
def test_openai_sdk_plain_chat_n_stop_strings_and_logprobs(request, backend_name):
    model = policy(request.getfixturevalue(backend_name))
    client = model.get_openai_client()
    messages = [{"role": "user", "content": "Say something."}]

    def create(**kw):
        return client.chat.completions.create(model=client.model_path, messages=messages, **kw)

    async def main():
        return await asyncio.to_thread(create, n=3, seed=11, logprobs=True, max_tokens=12)

    full = asyncio.run(main())
    assert len(full.choices) == 3
    recorded = model.history[-3:]
    for choice, response in zip(full.choices, recorded, strict=True):
        assert choice.token_ids == response.tokens and len(response.tokens) > 0
        assert [t.logprob for t in choice.logprobs.content] == response.logprobs
        assert full.prompt_token_ids == response.prompt_tokens
    # A stop string ends the content before it (the same seed samples the same tokens).
    text = full.choices[0].message.content
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = asyncio.run(asyncio.to_thread(create, n=1, seed=11, max_tokens=12, stop=[stop]))
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_a_three_turn_tool_episode_is_one_token_exact_experience(local_backend):
    """Masked tokens = the sampled ids, in order; their logprobs = the model's teacher-forced
    ones; and the plain re-tokenized conversation differs, so drift would be caught."""
    model = policy(local_backend)
    client = model.get_openai_async_client()
    messages: list = [{"role": "user", "content": "Look up three words."}]

    sampled = []
    original_sample = model.sample

    async def recording_sample(prompt, n, params):
        responses = await original_sample(prompt, n, params)
        sampled.extend(responses)
        return responses

    model.sample = recording_sample
    asyncio.run(_run_turns(client, messages))
    (exp,) = model.extract_experience_from_history()
    assert exp.info == {"turns": 3}
    response_tokens = exp.tokens[exp.prompt_length :]
    masked = [t for t, m in zip(response_tokens, exp.loss_mask, strict=True) if m]
    assert masked == [t for r in sampled for t in r.tokens]
    teacher = asyncio.run(local_backend.compute_logprobs(exp.tokens))[exp.prompt_length :]
    for lp, want, m in zip(exp.logprobs, teacher, exp.loss_mask, strict=True):
        if m:
            assert lp == pytest.approx(want, abs=1e-3)
    naive = model.conversations.encode(model.conversations.render(messages[:-1], TOOLS, False))
    assert naive != exp.tokens[: len(naive)] or len(naive) != len(exp.tokens)


async def _run_turns(client, messages):
    for turn in range(3):
        completion = await client.chat.completions.create(
            model=client.model_path, messages=messages, tools=TOOLS, seed=turn
        )
        messages.append(completion.choices[0].message.model_dump(exclude_none=True))
        messages.append({"role": "tool", "tool_call_id": "t", "content": f"result {turn}"})


class ScriptedBackend:
    """A ``SamplerBackend`` with the real tokenizer that 'samples' ``texts[k]`` for a prompt
    holding k tool results (so concurrent episodes get the same script)."""

    def __init__(self, tokenizer, texts: list[str]):
        self.tokenizer = tokenizer
        self.texts = list(texts)
        self.ref = None

    async def sample(self, prompt_tokens, num_samples, params):
        turn = self.tokenizer.decode(prompt_tokens).count("<|im_start|>tool")
        tokens = self.tokenizer.encode(self.texts[turn], add_special_tokens=False)
        seq = types.SampledSequence(
            stop_reason="stop",
            sequence_id="0",
            tokens_np=np.asarray(tokens, dtype=np.int64),
            logprobs_np=np.full(len(tokens), -0.5, dtype=np.float32),
        )
        return types.SampleResponse(sequences=[seq] * num_samples)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def math_task() -> Task:
    return Task(
        "t0", {"question": "What is 2 + 3?", "answer": "5"}, "tool_math_workflow", repeat_times=2
    )


def test_tool_call_round_trip_with_the_calculator_agent(tokenizer):
    call = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2 + 3"}}\n</tool_call>'
    texts = [f"{call}<|im_end|>", "<answer>5</answer><|im_end|>"]
    experiences = asyncio.run(
        rollout(math_task(), ScriptedBackend(tokenizer, texts), RolloutSettings(**AGENT), seed=0)
    )
    # step-wise by default: one experience per call, each episode's turns share its reward
    assert [(e.info["run"], e.info["step"]) for e in experiences] == [
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 1),
    ]
    assert all(e.reward == 1.0 and e.reward_components == {"accuracy": 1.0} for e in experiences)
    # the second prompt holds the tool's result after the exact tokens of the call
    first, second = experiences[0], experiences[1]
    assert second.tokens[: len(first.tokens)] == first.tokens
    assert "<|im_start|>tool\n5<|im_end|>" in tokenizer.decode(second.tokens[len(first.tokens) :])


def test_concatenated_episode_masks_the_tool_turns(tokenizer):
    call = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2 + 3"}}\n</tool_call>'
    texts = [f"{call}<|im_end|>", "<answer>5</answer><|im_end|>"]
    task = math_task()
    task.repeat_times, task.format = 1, {"enable_concatenated_multi_turn": True}
    (exp,) = asyncio.run(
        rollout(task, ScriptedBackend(tokenizer, texts), RolloutSettings(**AGENT), 0)
    )
    sampled = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    response = exp.tokens[exp.prompt_length :]
    assert [t for t, m in zip(response, exp.loss_mask, strict=True) if m] == sampled[0] + sampled[1]
    unmasked = tokenizer.decode([t for t, m in zip(response, exp.loss_mask, strict=True) if not m])
    assert unmasked == "\n<|im_start|>tool\n5<|im_end|>\n<|im_start|>assistant\n"
    assert exp.reward == 1.0


def test_a_malformed_tool_call_comes_back_as_text_and_the_episode_goes_on(tokenizer, caplog):
    texts = ['<tool_call>{"name": "calculator", "arguments": {bad</tool_call><|im_end|>']
    task = math_task()
    task.repeat_times = 1
    with caplog.at_level(logging.WARNING):
        (exp,) = asyncio.run(
            rollout(task, ScriptedBackend(tokenizer, texts), RolloutSettings(**AGENT), 0)
        )
    assert exp.reward == 0.0
    assert any("malformed tool call" in r.getMessage() for r in caplog.records)


def test_streaming_with_the_openai_sdk_joins_to_the_same_completion(local_backend):
    """``stream: true`` on a real sampler: the SDK's chunks join to the non-streamed completion
    of the same seed (content, finish reason, logprobs, token ids), in several chunks per choice,
    with the usage last when asked for."""
    model = policy(local_backend)
    client = model.get_openai_client()
    kw = dict(model=client.model_path, messages=HELLO, n=2, seed=11, logprobs=True, max_tokens=8)
    whole = client.chat.completions.create(**kw)
    chunks = list(
        client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("chatcmpl-")
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    for choice in whole.choices:
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == choice.index]
        pieces = [c.delta.content for c in mine if c.delta.content]
        assert "".join(pieces) == choice.message.content and len(pieces) > 1
        assert mine[0].delta.role == "assistant" and mine[-1].finish_reason == choice.finish_reason
        assert [t.logprob for t in mine[-1].logprobs.content] == [
            t.logprob for t in choice.logprobs.content
        ]
        assert mine[-1].model_extra["token_ids"] == choice.token_ids


def test_streamed_tool_calls_accumulate_in_the_sdks_stream_helper(tokenizer):
    call = '<tool_call>\n{"name": "lookup", "arguments": {"word": "ice"}}\n</tool_call>'
    model = policy(ScriptedBackend(tokenizer, [f"Let me see. {call}<|im_end|>"]))
    client = model.get_openai_client()
    messages = [{"role": "user", "content": "What is ice?"}]
    with client.chat.completions.stream(
        model=client.model_path, messages=messages, tools=TOOLS
    ) as stream:
        final = stream.get_final_completion()
    (choice,) = final.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me see."
    (tool_call,) = choice.message.tool_calls
    assert (tool_call.function.name, tool_call.function.arguments) == (
        "lookup",
        '{"word": "ice"}',
    )


def test_refused_requests_are_one_line_400s(tokenizer):
    model = policy(
        ScriptedBackend(tokenizer, ["x"]), enable_auto_tool_choice=False, max_model_len=40
    )
    client = model.get_openai_client()
    with pytest.raises(openai.BadRequestError, match="enable_auto_tool_choice"):
        client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], tools=TOOLS
        )
    with pytest.raises(openai.BadRequestError, match="max_model_len=40"):
        client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi " * 50}]
        )
    off = policy(ScriptedBackend(tokenizer, []), enable_openai_api=False)
    with pytest.raises(ValueError, match="enable_openai_api"):
        off.get_openai_client()


def test_an_episode_longer_than_the_context_is_skipped_with_a_reason(tokenizer, caplog):
    model = policy(ScriptedBackend(tokenizer, []), max_model_len=10)
    model.history = [Response(list(range(8)), [1, 2, 3], [-0.1] * 3, "abc")]
    with caplog.at_level(logging.WARNING):
        assert model.extract_experience_from_history() == []
    assert "longer than model.max_model_len=10" in caplog.text


def test_a_rewritten_history_splits_into_experiences_instead_of_retokenizing(caplog):
    history = [
        Response([1, 2], [3, 4], [-0.1, -0.2], ""),
        Response([1, 2, 3, 4, 5], [6], [-0.3], ""),
        Response([9, 2, 3], [7], [-0.4], ""),  # does not extend the conversation
    ]
    from trinity.explorer.history import experiences_from_history

    with caplog.at_level(logging.INFO):
        first, second = experiences_from_history(history, concatenated=True)
    assert (first.tokens, first.loss_mask, first.logprobs) == (
        [1, 2, 3, 4, 5, 6],
        [1, 1, 0, 1],
        [-0.1, -0.2, 0.0, -0.3],
    )
    assert second.tokens == [9, 2, 3, 7] and "does not extend" in caplog.text


def test_step_wise_grpo_broadcasts_the_episode_advantage_to_its_turns():
    def turns(run: int, count: int, reward: float) -> list[Experience]:
        return [
            Experience(
                [1, 2, 3], 1, [0.0, 0.0], [1, 1], reward, group_id="g", info={"run": run, "step": s}
            )
            for s in range(count)
        ]

    experiences = turns(0, 3, 1.0) + turns(1, 1, 0.0)
    explorer_hook({"algorithm_type": "multi_step_grpo"})(experiences)
    advantages = [e.advantages[0] for e in experiences]
    # each episode counts once: GRPO over (1, 0) is +-0.7071, whatever the number of turns
    assert advantages == pytest.approx([0.70710, 0.70710, 0.70710, -0.70710], abs=1e-4)
    plain = turns(0, 3, 1.0) + turns(1, 1, 0.0)
    explorer_hook({"algorithm_type": "grpo"})(plain)
    assert plain[0].advantages[0] == pytest.approx(0.5, abs=1e-4)  # per turn: 3 vs 1


def test_a_workflow_with_no_experiences_is_a_logged_skip(caplog):
    from tests.loop_fakes import FakeSampler, RecordingMonitor
    from trinity.explorer.explorer import Explorer
    from trinity.registry import WORKFLOWS
    from trinity.workflows.workflows import Workflow

    @WORKFLOWS.register("empty_test_workflow")
    class Empty(Workflow):
        async def run(self):
            return []

    explorer = Explorer(
        sampler=FakeSampler(["x"]),
        settings=RolloutSettings(),
        reader=None,
        buffer=None,
        synchronizer=None,
        monitor=RecordingMonitor(),
        advantage_fn=lambda e: {},
    )
    with caplog.at_level(logging.WARNING):
        assert asyncio.run(explorer.run_task(Task("t9", {}, "empty_test_workflow"), 1, 0)) == []
    assert "returned no experiences; skipped" in caplog.text


def test_frozen_lake_and_sudoku_episodes_step_wise_with_a_scripted_policy():
    from tests.loop_fakes import FakeSampler

    lake = {"map": ["SF", "HG"]}
    task = Task("l", lake, "frozen_lake_workflow", repeat_times=2, workflow_args={"max_steps": 3})
    experiences = asyncio.run(
        rollout(task, FakeSampler(["go right", "now down"]), RolloutSettings(), seed=0)
    )
    # FakeSampler answers 'go right' to n=1 calls: right, right (wall), right -> out of steps
    assert [(e.info["run"], e.info["step"]) for e in experiences] == [
        (r, s) for r in (0, 1) for s in range(3)
    ]
    assert all(e.reward == 0.0 for e in experiences)
    env = FrozenLake(lake)
    assert env.step("right")[1:] == (0.0, False) and env.step("down")[1:] == (1.0, True)
    assert FrozenLake(lake).step("left then down")[1:] == (0.0, True)  # the last move: a hole

    row = build_builtin("sudoku", {"size": 1, "blanks": 2})[0]
    board = Sudoku(row)
    blanks = [
        (r, c) for r, line in enumerate(row["puzzle"]) for c, ch in enumerate(line) if ch == "."
    ]
    (r, c), rest = blanks[0], blanks[1:]
    obs, reward, done = board.step(f"{r + 1} {c + 1} {row['solution'][r][c]}\n1 1 9")
    assert "Placed 1, refused 1" in obs and (reward, done) == (0.0, False)
    (r, c) = rest[0]
    assert board.step(f"{r + 1} {c + 1} {row['solution'][r][c]}")[1:] == (1.0, True)


def test_the_tasksets_system_prompt_replaces_the_environments(tokenizer):
    task = Task(
        "l",
        {"map": ["SF", "FG"]},
        "frozen_lake_workflow",
        format={"system_prompt": "One word: down or right."},
        workflow_args={"max_steps": 2},
    )
    backend = ScriptedBackend(tokenizer, ["right<|im_end|>"])
    (first, _) = asyncio.run(rollout(task, backend, RolloutSettings(**AGENT), seed=0))
    prompt = tokenizer.decode(first.tokens[: first.prompt_length])
    assert "One word: down or right." in prompt and FrozenLake.system_prompt not in prompt


def test_procedural_agent_tasksets_and_the_calculator():
    for row in build_builtin("frozen_lake", {"size": 20, "hole_prob": 0.4}):
        assert row["map"][0][0] == "S" and row["map"][-1][-1] == "G"
    for row in build_builtin("sudoku", {"size": 20}):
        board = [[int(ch) for ch in line] for line in row["solution"]]
        assert all(sorted(line) == [1, 2, 3, 4] for line in board)
        assert all(sorted(col) == [1, 2, 3, 4] for col in zip(*board, strict=True))
    assert calculate("(2 + 3) * 4 - 1 / 2") == 19.5
    with pytest.raises(ValueError):
        calculate("__import__('os')")
    assert tool_math.__name__ == "tool_math"


HELLO = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def eos_model(tiny_model_dir, local_backend, tmp_path_factory):
    """The tiny model with its EOS moved to the 4th token it samples for ``HELLO`` (seed 11), so a
    test knows where a generation must end; returns (directory, the 4 tokens)."""
    import shutil

    from transformers import AutoTokenizer

    model = policy(local_backend)
    (free,) = asyncio.run(model.chat(HELLO, 1, seed=11, max_tokens=8))
    tokens = free.tokens[:4]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tokens[-1] not in tokens[:-1] and free.stop_reason == "length"
    directory = tmp_path_factory.mktemp("eos-model")
    shutil.copytree(tiny_model_dir, directory, dirs_exist_ok=True)
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(tokens[-1])
    tokenizer.save_pretrained(directory)
    return directory, tokens


@pytest.mark.parametrize("backend_name", ["local", "tinker"])
def test_a_stop_string_keeps_eos_and_the_recorded_tokens_are_the_sampled_ones(
    eos_model, tmp_path, backend_name
):
    """``stop`` replaces EOS in Tinker's sampling; the rollout model adds it back, so the
    generation still ends at EOS (finish_reason "stop"), in ``chat`` and at the endpoint."""
    from trinity.backends.local import LocalRuntime, LocalSampler
    from trinity.backends.tinker_sdk import TinkerSampler, TinkerSession
    from trinity.server import ServerThread, build_service

    directory, sampled = eos_model
    if backend_name == "local":
        runtime = LocalRuntime(str(directory))
        backend, close = LocalSampler(runtime), runtime.close
    else:
        srv = ServerThread(build_service([str(directory)], tmp_path, {"tml-eos": "eos"})).start()
        session = TinkerSession(srv.url, "tml-eos")
        backend = asyncio.run(TinkerSampler.create(session, str(directory)))
        close = srv.stop
    try:
        model = policy(backend)
        for stop in (None, ["zzz"], "zzz", [12345]):
            (response,) = asyncio.run(model.chat(HELLO, 1, seed=11, max_tokens=8, stop=stop))
            assert (response.tokens, response.stop_reason) == (sampled, "stop"), stop
        client = model.get_openai_client()
        completion = client.chat.completions.create(
            model="m", messages=HELLO, seed=11, max_tokens=8, stop=["zzz"]
        )
        (choice,) = completion.choices
        assert choice.token_ids == sampled and choice.finish_reason == "stop"
        assert model.history[-1].tokens == sampled
        assert choice.message.content == model.tokenizer.decode(sampled[:-1])
    finally:
        close()


@pytest.mark.parametrize(
    ("parser", "reply", "reasoning", "content"),
    [
        ("qwen3", "<think>add them</think>\n\nThe answer is 5", "add them", "The answer is 5"),
        ("qwen3", "The answer is 5", None, "The answer is 5"),
        ("deepseek_r1", "add them</think>It is 5", "add them", "It is 5"),  # <think> in the prompt
        ("deepseek_r1", "still thinking", "still thinking", None),
        (None, "<think>add them</think>5", None, "<think>add them</think>5"),
    ],
)
def test_reasoning_parser_splits_the_reply(tokenizer, parser, reply, reasoning, content):
    model = policy(ScriptedBackend(tokenizer, [f"{reply}<|im_end|>"]), reasoning_parser=parser)
    completion = model.get_openai_client().chat.completions.create(
        model="m", messages=[{"role": "user", "content": "What is 2 + 3?"}]
    )
    message = completion.choices[0].message
    assert message.content == content
    assert getattr(message, "reasoning_content", None) == reasoning
    # the recorded sample is the whole reply, reasoning included
    assert tokenizer.decode(completion.choices[0].token_ids).startswith(reply)


def test_unknown_reasoning_parser_is_a_config_error(tmp_path):
    from trinity.config import ConfigError, load_config

    path = tmp_path / "run.yaml"
    path.write_text(
        "model: {model_path: demo, max_prompt_tokens: 8, max_response_tokens: 8}\n"
        f"checkpoint_root_dir: {tmp_path}\n"
        "buffer: {explorer_input: {taskset: {path: 'builtin:arithmetic'}}}\n"
        "explorer: {rollout_model: {reasoning_parser: deepseek}}\n"
    )
    with pytest.raises(ConfigError, match="explorer.rollout_model.reasoning_parser: 'deepseek'"):
        load_config(path)
