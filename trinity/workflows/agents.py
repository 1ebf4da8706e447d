"""Workflows for agents: multi-turn dialogues, environments, agents written against the OpenAI API.

Each is an episode per run (``can_repeat = False``: the explorer runs ``repeat_times`` of them,
each with its own model, ``info["run"]`` on its experiences). The model records every call
(history on), and the experiences are built from the recorded token ids
(``self.model.extract_experience_from_history()``): one per turn, or, with the taskset's
``format.enable_concatenated_multi_turn``, one per conversation whose loss mask covers exactly
the sampled tokens. Every experience of an episode carries the episode's reward.

- ``MultiTurnWorkflow``: the original's base class (``process_messages_to_experience``).
- ``AgentWorkflow`` / ``agent_workflow``: any ``async def agent(task, client) -> reward`` (or a
  plain function taking a sync client) is a workflow; ``client`` is an ``openai`` client the
  policy answers. ``workflow: agent_workflow`` with ``workflow_args.agent: module:function``
  runs one without registering it.
- ``frozen_lake_workflow``, ``sudoku_workflow``: the environments of ``trinity.workflows.envs``.
- ``tool_math_workflow``: arithmetic the model should do with a ``calculator`` tool.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import inspect
import json
import re
from collections.abc import Callable
from typing import Any

from trinity.registry import WORKFLOWS
from trinity.workflows.envs import Env, FrozenLake, Sudoku, calculate
from trinity.workflows.types import Experience, Sampler, Task
from trinity.workflows.workflows import Workflow

Reward = float | dict[str, float]
OPENAI_KEYS = ("temperature", "top_p", "max_tokens", "stop")  # rollout_args an OpenAI call takes


class MultiTurnWorkflow(Workflow):
    """One episode; subclasses implement ``run`` and score through ``scored`` (or the original's
    ``process_messages_to_experience``)."""

    can_repeat = False

    def __init__(self, task: Task, sampler: Sampler):
        super().__init__(task, sampler)
        self.model.enable_history = True  # experiences come from the recorded tokens

    def scored(self, experiences: list[Experience], reward: Reward) -> list[Experience]:
        """Every experience of the episode gets its reward (a number or named components)."""
        components = dict(reward) if isinstance(reward, dict) else {"reward": float(reward)}
        for exp in experiences:
            exp.reward = float(sum(components.values()))
            exp.reward_components = dict(components)
            exp.task_id = self.task.task_id
            exp.is_eval = self.task.is_eval
        return experiences

    def process_messages_to_experience(
        self,
        messages: list[dict[str, Any]],
        reward: float,
        info: dict[str, Any] | None = None,
        truncate_status: str | None = None,
    ) -> Experience:
        """The original's call: the conversation as one experience. Its tokens are the recorded
        ones, not ``messages`` tokenized again (``messages`` only keeps the signature); reward 0
        if ``truncate_status`` is ``response_truncated``, as there."""
        self.model.concatenated = True
        experiences = self.model.extract_experience_from_history()
        if not experiences:
            raise ValueError("process_messages_to_experience: the model recorded no call")
        if truncate_status == "response_truncated":
            reward = 0.0
        (exp,) = self.scored(experiences[-1:], reward)
        exp.info.update(info or {})
        return exp


class AgentWorkflow(MultiTurnWorkflow):
    """Runs an agent function: ``agent(task, client) -> reward`` (see the module doc)."""

    agent: Callable[..., Any] | None = None

    def __init__(self, task: Task, sampler: Sampler):
        super().__init__(task, sampler)
        self.model.enable_openai_api = True

    def agent_fn(self) -> Callable[..., Any]:
        if self.agent is not None:
            return self.agent
        spec = self.task.workflow_args.get("agent")
        if not spec or ":" not in str(spec):
            raise ValueError("agent_workflow needs workflow_args.agent: 'module:function'")
        module, _, name = str(spec).partition(":")
        return getattr(importlib.import_module(module), name)

    async def run(self) -> list[Experience]:
        agent = self.agent_fn()
        if inspect.iscoroutinefunction(agent):
            reward = await agent(self.task, self.model.get_openai_async_client())
        else:
            reward = await asyncio.to_thread(agent, self.task, self.model.get_openai_client())
        return self.scored(self.model.extract_experience_from_history(), reward)


WORKFLOWS.register("agent_workflow")(AgentWorkflow)


def agent_workflow(*names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register ``agent(task, client) -> reward`` as workflow(s) ``names``."""

    def register(agent: Callable[..., Any]) -> Callable[..., Any]:
        attrs = {"agent": staticmethod(agent), "__doc__": agent.__doc__}
        WORKFLOWS.register(*names)(type(f"{agent.__name__}_workflow", (AgentWorkflow,), attrs))
        return agent

    return register


class EnvWorkflow(MultiTurnWorkflow):
    """A dialogue with an ``Env``: reply, observation, ... until done or ``max_steps``.

    workflow_args: ``max_steps``; the taskset's ``format.system_prompt`` replaces the
    environment's (a small model may need a terser one). The episode's reward is the sum of the
    step rewards. Step-wise, each turn's experience also records what GiGPO reads, under the
    original's keys: ``info["env_state_hash"]`` (a digest of the state the reply was given in)
    and ``info["step_reward"]`` (what that reply earned).
    """

    env_class: type[Env]

    @classmethod
    def required_fields(cls, fmt: dict[str, Any]) -> dict[str, tuple[str, ...]]:
        return {f"the environment's '{cls.env_class.row_key}'": (cls.env_class.row_key,)}

    async def run(self) -> list[Experience]:
        args = self.task.workflow_args
        limits = {"max_steps": int(args["max_steps"])} if "max_steps" in args else {}
        env = self.env_class(self.task.raw, **limits)
        messages = [
            {
                "role": "system",
                "content": self.task.format.get("system_prompt") or env.system_prompt,
            },
            {"role": "user", "content": env.reset()},
        ]
        turns: list[tuple[str, float]] = []  # (the state's digest, the reply's reward)
        done = False
        while not done:
            state = hashlib.sha256(f"{self.env_class.__name__}: {env.state()}".encode())
            (response,) = await self.model.chat(messages, 1, **self.sampling_args())
            observation, reward, done = env.step(response.text)
            turns.append((state.hexdigest()[:16], reward))
            messages += [
                {"role": "assistant", "content": response.text},
                {"role": "user", "content": observation},
            ]
        experiences = self.model.extract_experience_from_history()
        for exp in experiences:
            if "step" in exp.info:  # one experience per turn (not concatenated)
                exp.info["env_state_hash"], exp.info["step_reward"] = turns[exp.info["step"]]
        return self.scored(experiences, sum(reward for _, reward in turns))


@WORKFLOWS.register("frozen_lake_workflow")
class FrozenLakeWorkflow(EnvWorkflow):
    env_class = FrozenLake


@WORKFLOWS.register("sudoku_workflow")
class SudokuWorkflow(EnvWorkflow):
    env_class = Sudoku


CALCULATOR = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression (+ - * / and parentheses).",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string"}},
            "required": ["expression"],
        },
    },
}
TOOL_MATH_PROMPT = (
    "Compute the answer with the calculator tool, then reply with the final number alone in "
    "<answer></answer> tags."
)


def run_tool(call: Any) -> str:
    """A calculator call's result, or the error the model should see (a malformed call)."""
    try:
        args = json.loads(call.function.arguments or "{}")
        result = calculate(str(args["expression"]))
    except (ValueError, KeyError, TypeError) as exc:
        return f"error: {type(exc).__name__}: {exc}"
    return str(int(result) if float(result).is_integer() else result)


@agent_workflow("tool_math_workflow")
async def tool_math(task: Task, client: Any) -> dict[str, float]:
    """Arithmetic with a calculator tool: ``accuracy`` 1 for the right ``<answer>`` after at least
    one calculator call (the task is to use the tool). workflow_args: ``max_turns`` (4)."""
    question = task.raw.get((task.format or {}).get("prompt_key") or "question")
    messages: list[Any] = [
        {"role": "system", "content": TOOL_MATH_PROMPT},
        {"role": "user", "content": str(question)},
    ]
    called = False
    for _ in range(int(task.workflow_args.get("max_turns", 4))):
        completion = await client.chat.completions.create(
            model=getattr(client, "model_path", "policy"),
            messages=messages,
            tools=[CALCULATOR],
            **{k: v for k, v in task.rollout_args.items() if k in OPENAI_KEYS and v is not None},
        )
        message = completion.choices[0].message
        messages.append(message.model_dump(exclude_none=True))
        if not message.tool_calls:
            break
        called = True
        for call in message.tool_calls:
            messages.append({"role": "tool", "tool_call_id": call.id, "content": run_tool(call)})
    last = messages[-1]
    final = (last.get("content") or "") if last.get("role") == "assistant" else ""
    found = re.findall(r"<answer>\s*(-?[\d.]+)\s*</answer>", final)
    truth = str(task.raw.get((task.format or {}).get("response_key") or "answer"))
    return {"accuracy": float(called and bool(found) and found[-1] == truth)}
