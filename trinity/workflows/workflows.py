"""Workflows: one task -> ``repeat_times`` sampled responses -> as many scored experiences.

A workflow only talks to a ``Sampler`` (chat / generate + tokenizer), so the same class runs on
the local engine, on Tinker, or against a scripted sampler in tests. Register new ones with
``@WORKFLOWS.register("name")`` (from a plugin, see ``trinity.plugins``). Every workflow here is
natively async, so the original's ``async_*`` names are aliases of the same classes.
"""

from __future__ import annotations

import functools
from typing import Any

from trinity.registry import WORKFLOWS
from trinity.workflows.rewards import REWARD_FUNCTIONS
from trinity.workflows.types import Experience, Response, Sampler, Task

SAMPLING_KEYS = ("temperature", "top_p", "top_k", "max_tokens", "stop")

R1_SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process "
    "here </think> <answer> answer here </answer>."
)
BOXED_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
BOXED_THINK_SYSTEM_PROMPT = (
    "First think about the reasoning process inside <think> </think> tags, then give the final "
    "answer within \\boxed{}."
)


class Workflow:
    """Base class: ``run`` samples and scores; ``experience`` packs one response for training.

    ``can_repeat``: one ``run`` returns all ``repeat_times`` samples (asking the sampler for n);
    otherwise the explorer runs ``repeat_times`` instances, one episode each, every one with its
    own model (history, seed) and ``info["run"]`` set on its experiences, as the original's runner
    does. ``self.model`` is the original's name for the sampler.
    """

    can_repeat = True
    auxiliary_model_wrappers: list[Any] = []  # noqa: RUF012 - explorer.auxiliary_models, set per run

    def __init__(self, task: Task, sampler: Sampler):
        self.task = task
        self.sampler = sampler
        self.model = sampler

    @functools.cached_property
    def auxiliary_models(self) -> list[Any]:
        """``explorer.auxiliary_models`` as ``openai.AsyncOpenAI`` clients, in config order (the
        original's name; it hands async workflows async clients, and every workflow here is)."""
        return [model.get_openai_async_client() for model in self.auxiliary_model_wrappers]

    @classmethod
    def required_fields(cls, fmt: dict[str, Any]) -> dict[str, tuple[str, ...]]:
        """What every row must hold: ``{what (for the message): keys, any one of them non-null}``.

        The taskset is checked against it before any work, so a dataset whose rows lack the
        prompt fails in one line at start instead of task by task (or, worse, as the text "None").
        """
        return {}

    async def run(self) -> list[Experience]:
        raise NotImplementedError

    def sampling_args(self) -> dict[str, Any]:
        """The sampler-level keys of ``rollout_args`` (``n`` comes from ``repeat_times``)."""
        args = self.task.rollout_args
        return {k: args[k] for k in SAMPLING_KEYS if args.get(k) is not None}

    def experience(
        self,
        response: Response,
        reward_components: dict[str, float],
        *,
        prompt_text: str = "",
        response_text: str | None = None,
    ) -> Experience:
        """Tokens = prompt + response; every response token is trained on (loss mask 1)."""
        return Experience(
            tokens=list(response.prompt_tokens) + list(response.tokens),
            prompt_length=len(response.prompt_tokens),
            logprobs=list(response.logprobs),
            loss_mask=[1] * len(response.tokens),
            reward=float(sum(reward_components.values())),
            reward_components=dict(reward_components),
            task_id=self.task.task_id,
            prompt_text=prompt_text,
            response_text=response.text if response_text is None else response_text,
            truncated=response.stop_reason == "length",
            is_eval=self.task.is_eval,
        )


@WORKFLOWS.register("simple_workflow", "async_simple_workflow")
class SimpleWorkflow(Workflow):
    """Single turn: [system] + user(prompt) -> response, scored against ``raw[response_key]``.

    ``format`` keys honoured: prompt_key, response_key, system_prompt, system_prompt_key,
    reply_prefix (an assistant prefix the model continues; the reward sees prefix + response),
    messages_key (used when the row has no prompt_key but holds a whole chat). ``prompt_type``
    is not consulted: the original defaults it to ``messages`` even for question/answer rows.
    """

    default_system_prompt: str | None = None
    default_reward_fn: str | None = None

    def __init__(self, task: Task, sampler: Sampler):
        super().__init__(task, sampler)
        self.format = task.format or {}
        name = task.reward_fn or self.default_reward_fn
        if not name:
            raise ValueError(
                f"task {task.task_id}: {task.workflow} needs a reward function; "
                "set default_reward_fn_type on the taskset or explorer_input"
            )
        self.reward_fn = REWARD_FUNCTIONS.get(name)

    @classmethod
    def required_fields(cls, fmt: dict[str, Any]) -> dict[str, tuple[str, ...]]:
        prompt_key = fmt.get("prompt_key") or "prompt"
        return {
            f"format.prompt_key '{prompt_key}'": (prompt_key, fmt.get("messages_key") or "message"),
            f"format.response_key '{fmt.get('response_key') or 'response'}' (the reward's truth)": (
                fmt.get("response_key") or "response",
            ),
        }

    def prompt(self) -> str:
        key = self.format.get("prompt_key") or "prompt"
        if key not in self.task.raw:
            raise KeyError(f"task {self.task.task_id} has no prompt_key '{key}'")
        return str(self.task.raw[key])

    def truth(self) -> Any:
        return self.task.raw.get(self.format.get("response_key") or "response")

    def system_prompt(self) -> str | None:
        key = self.format.get("system_prompt_key")
        if key and self.task.raw.get(key):
            return str(self.task.raw[key])
        return self.format.get("system_prompt") or self.default_system_prompt

    def messages(self) -> list[dict[str, str]]:
        raw = self.task.raw
        chat = raw.get(self.format.get("messages_key") or "message")
        if isinstance(chat, list) and (self.format.get("prompt_key") or "prompt") not in raw:
            return list(chat)  # the row is already a conversation
        system = self.system_prompt()
        head = [{"role": "system", "content": system}] if system else []
        return [*head, {"role": "user", "content": self.prompt()}]

    def reward_args(self) -> dict[str, Any]:
        return dict(self.task.reward_fn_args)

    def reward(self, response_text: str) -> dict[str, float]:
        return self.reward_fn(response_text, self.truth(), **self.reward_args())

    async def sample(self) -> list[Response]:
        n, args = self.task.repeat_times, self.sampling_args()
        prefix = self.format.get("reply_prefix")
        if not prefix:
            return await self.sampler.chat(self.messages(), n, **args)
        prompt_tokens = self.chat_tokens(self.messages())
        prompt_tokens += self.sampler.tokenizer.encode(prefix, add_special_tokens=False)
        return await self.sampler.generate(prompt_tokens, n, **args)

    def chat_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        encode_chat = getattr(self.sampler, "encode_chat", None)  # honours a custom template
        if encode_chat is not None:
            return list(encode_chat(messages))
        tokenizer = self.sampler.tokenizer
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer.encode(text, add_special_tokens=False))

    async def run(self) -> list[Experience]:
        responses = await self.sample()
        if not responses:
            return []
        prompt_text = self.sampler.tokenizer.decode(responses[0].prompt_tokens)
        prefix = self.format.get("reply_prefix") or ""
        experiences = []
        for response in responses:
            text = prefix + response.text
            components = self.reward(text)
            experiences.append(
                self.experience(response, components, prompt_text=prompt_text, response_text=text)
            )
        return experiences


@WORKFLOWS.register("math_workflow", "async_math_workflow")
class MathWorkflow(SimpleWorkflow):
    """GSM8K-style math with the DeepSeek-R1 prompt; reward = math_verify accuracy + format ±0.1."""

    default_system_prompt = R1_SYSTEM_PROMPT
    default_reward_fn = "math_reward"


@WORKFLOWS.register("math_boxed_workflow", "async_math_boxed_workflow")
class MathBoxedWorkflow(SimpleWorkflow):
    """Answers in ``\\boxed{}``. workflow_args: ``with_think`` (ask for and require a think block,
    -0.1 without), ``use_base`` (plain "User:/Assistant:" text for base models, no chat template).
    """

    default_reward_fn = "math_boxed_reward"

    @property
    def with_think(self) -> bool:
        return bool(self.task.workflow_args.get("with_think", False))

    def system_prompt(self) -> str | None:
        default = BOXED_THINK_SYSTEM_PROMPT if self.with_think else BOXED_SYSTEM_PROMPT
        return super().system_prompt() or default

    def reward_args(self) -> dict[str, Any]:
        return {"with_think": self.with_think, **self.task.reward_fn_args}

    async def sample(self) -> list[Response]:
        if not self.task.workflow_args.get("use_base", False):
            return await super().sample()
        text = f"{self.system_prompt()}\n\nUser: {self.prompt()}\nAssistant:"
        text += self.format.get("reply_prefix") or ""
        prompt_tokens = list(self.sampler.tokenizer.encode(text))
        return await self.sampler.generate(
            prompt_tokens, self.task.repeat_times, **self.sampling_args()
        )


@WORKFLOWS.register("countdown_workflow")
class CountdownWorkflow(SimpleWorkflow):
    """Countdown (reach ``target`` from ``nums``, each used once) with the R1 think/answer prompt.

    Works on the built-in ``countdown`` taskset and on rows holding only ``nums`` and ``target``
    (e.g. TinyZero's data): the question is written from them when the prompt key is absent.
    """

    default_system_prompt = R1_SYSTEM_PROMPT
    default_reward_fn = "countdown_reward"

    @classmethod
    def required_fields(cls, fmt: dict[str, Any]) -> dict[str, tuple[str, ...]]:
        prompt_key = fmt.get("prompt_key") or "prompt"
        truth_key = fmt.get("response_key") or "response"
        return {
            f"format.prompt_key '{prompt_key}' (or 'nums')": (prompt_key, "nums"),
            f"format.response_key '{truth_key}' (or 'target')": (truth_key, "target"),
        }

    def prompt(self) -> str:
        raw = self.task.raw
        if (self.format.get("prompt_key") or "prompt") in raw:
            return super().prompt()
        return countdown_question(raw["nums"], raw["target"])

    def truth(self) -> Any:
        raw = self.task.raw
        if "nums" in raw and "target" in raw:
            return {"target": raw["target"], "numbers": list(raw["nums"])}
        return super().truth()


def countdown_question(nums: list[int], target: int) -> str:
    return (
        f"Using the numbers {list(nums)}, create an equation that equals {target}. You can use "
        "basic arithmetic operations (+, -, *, /) and each number must be used exactly once. "
        "Show your work in <think> </think> tags, and return the final equation in "
        "<answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>."
    )
