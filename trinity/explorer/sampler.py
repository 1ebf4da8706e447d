"""The policy as a workflow sees it: chat messages in, sampled responses with logprobs out."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
from dataclasses import dataclass
from typing import Any

from tinker import types

from trinity.explorer.conversation import Conversations
from trinity.explorer.history import experiences_from_history
from trinity.workflows.types import Experience, Response

log = logging.getLogger(__name__)
_prompts_cut = itertools.count(1)  # in this process


@dataclass
class RolloutSettings:
    """Defaults from ``model.*``; a task's ``rollout_args`` override them per call."""

    max_prompt_tokens: int | None = None
    max_response_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    enable_prompt_truncation: bool = True
    chat_template: str | None = None
    enable_thinking: bool | None = None  # for the chat template (Qwen3-style); None: its default
    max_model_len: int | None = None
    # explorer.rollout_model.*: agent workflows (trinity.explorer.openai_api, .history)
    enable_history: bool = False
    enable_openai_api: bool = False
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None  # trinity.explorer.openai_api.REASONING_PARSERS


@dataclass
class AuxiliaryModel:
    """An ``explorer.auxiliary_models`` entry: a frozen model (a judge, a teacher) that workflows
    call through OpenAI clients (``Workflow.auxiliary_models``). Nothing it samples is trained
    on, so it keeps no history."""

    backend: Any
    settings: RolloutSettings

    def model(self, seed: int | None) -> PolicySampler:
        """A fresh rollout model over it for one workflow run."""
        settings = dataclasses.replace(self.settings, enable_history=False, enable_openai_api=True)
        return PolicySampler(self.backend, settings, seed)


def derive_seed(*parts: Any) -> int:
    """A stable 31-bit seed from run seed, step and task: reruns sample the same tokens."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


class PolicySampler:
    """Implements ``trinity.workflows.types.Sampler`` over a backend sampler for one task."""

    def __init__(
        self,
        backend: Any,
        settings: RolloutSettings,
        seed: int | None = None,
        *,
        concatenated: bool = False,
    ):
        """``concatenated``: the task's ``format.enable_concatenated_multi_turn``, how
        ``extract_experience_from_history`` packs a conversation."""
        self.backend = backend
        self.tokenizer = backend.tokenizer
        self.settings = settings
        self.seed = seed
        self.concatenated = concatenated
        self.enable_history = settings.enable_history
        self.enable_openai_api = settings.enable_openai_api
        self.history: list[Response] = []
        self.conversations = Conversations(
            self.tokenizer, settings.chat_template, settings.enable_thinking
        )
        self._calls = 0

    @property
    def model_path(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "") or "policy")

    def encode_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        """Continues a conversation this model answered with the ids it sampled (see
        ``trinity.explorer.conversation``); renders the chat template otherwise."""
        return self.conversations.prompt_tokens(messages, tools)

    async def chat(
        self, messages: list[dict[str, str]], n: int, **sampling_args: Any
    ) -> list[Response]:
        responses = await self.generate(self.encode_chat(messages), n, **sampling_args)
        for response in responses:
            reply = {"role": "assistant", "content": response.text}
            self.conversations.remember(
                messages, None, reply, response.prompt_tokens, response.tokens
            )
        return responses

    async def generate(
        self, prompt_tokens: list[int], n: int, **sampling_args: Any
    ) -> list[Response]:
        limit = self.settings.max_prompt_tokens
        if limit and len(prompt_tokens) > limit:
            if not self.settings.enable_prompt_truncation:
                raise ValueError(
                    f"prompt has {len(prompt_tokens)} tokens > model.max_prompt_tokens={limit}"
                )
            cut = next(_prompts_cut)
            if cut & (cut - 1) == 0:  # at 1, 2, 4, 8, ...: counted, without a line per prompt
                log.warning(
                    "a prompt of %d tokens was cut to its last %d (model.max_prompt_tokens); "
                    "%d prompt(s) cut so far",
                    len(prompt_tokens),
                    limit,
                    cut,
                )
            prompt_tokens = prompt_tokens[-limit:]
        return await self.sample(prompt_tokens, n, self.sampling_params(sampling_args))

    async def sample(
        self, prompt_tokens: list[int], n: int, params: types.SamplingParams
    ) -> list[Response]:
        """The backend's samples as ``Response``s, recorded in ``history`` when it is on."""
        response = await self.backend.sample(prompt_tokens, n, params)
        responses = [
            Response(
                prompt_tokens=list(prompt_tokens),
                tokens=list(seq.tokens),
                logprobs=[float(x) for x in (seq.logprobs or [])],
                text=self.tokenizer.decode(seq.tokens, skip_special_tokens=True),
                stop_reason=seq.stop_reason,
            )
            for seq in response.sequences
        ]
        if self.enable_history:
            self.history.extend(responses)
        return responses

    async def logprobs(self, tokens: list[int], temperature: float = 1.0) -> list[float]:
        """The model's logprob of each of ``tokens[1:]`` (the original's ``logprobs_async``; a
        distillation teacher scores the student's samples with it)."""
        if temperature != 1.0:
            raise ValueError(
                f"logprobs at temperature {temperature}: only 1.0 is supported (Tinker's "
                "compute_logprobs has no temperature)"
            )
        values = await self.backend.compute_logprobs(list(tokens))
        return [float(x) for x in values[1:]]

    logprobs_async = logprobs

    def clone_with_isolated_history(self, seed: int | None = None) -> PolicySampler:
        """The same policy with its own history (one per episode of a task)."""
        clone = PolicySampler(self.backend, self.settings, seed, concatenated=self.concatenated)
        clone.enable_history, clone.enable_openai_api = self.enable_history, self.enable_openai_api
        return clone

    def extract_experience_from_history(self, clear_history: bool = True) -> list[Experience]:
        """The recorded calls as experiences (``trinity.explorer.history``), without rewards.

        A sequence longer than ``model.max_model_len`` is left out, with a logged reason: the
        trainer could not take it whole, and a cut episode no longer earned its reward.
        """
        if not self.enable_history:
            raise ValueError(
                "extract_experience_from_history needs explorer.rollout_model.enable_history: true"
            )
        experiences = experiences_from_history(
            self.history, concatenated=self.concatenated, tokenizer=self.tokenizer
        )
        if clear_history:
            self.history = []
            self.conversations.clear()
        limit = self.settings.max_model_len
        kept = [exp for exp in experiences if not limit or len(exp.tokens) <= limit]
        if len(kept) < len(experiences):
            log.warning(
                "skipped %d experience(s) longer than model.max_model_len=%d tokens (longest %d)",
                len(experiences) - len(kept),
                limit,
                max(len(exp.tokens) for exp in experiences),
            )
        return kept

    def get_openai_client(self) -> Any:
        """An ``openai.OpenAI`` client answered by this policy (``trinity.explorer.openai_api``,
        imported on first use: the SDK and the web stack cost runners seconds at start)."""
        from trinity.explorer.openai_api import openai_client

        return openai_client(self, is_async=False)

    def get_openai_async_client(self) -> Any:
        from trinity.explorer.openai_api import openai_client

        return openai_client(self, is_async=True)

    def sampling_params(self, args: dict[str, Any]) -> types.SamplingParams:
        s = self.settings
        seed = args.get("seed")
        if seed is None and self.seed is not None:
            seed = derive_seed(self.seed, self._calls)
            self._calls += 1

        def pick(key: str, default: Any) -> Any:
            value = args.get(key)
            return default if value is None else value

        return types.SamplingParams(
            max_tokens=pick("max_tokens", s.max_response_tokens),
            temperature=pick("temperature", s.temperature),
            top_p=pick("top_p", s.top_p),
            top_k=pick("top_k", s.top_k),
            seed=seed,
            stop=self.stop_with_eos(args.get("stop")),
        )

    def stop_with_eos(self, stop: Any) -> Any:
        """``stop`` plus the EOS token, so a generation still ends at the end of its turn.

        Workflows pass ``stop`` with vLLM's meaning (extra stops; the original's rollout model
        is vLLM), but a ``SamplingParams.stop`` *replaces* EOS in Tinker's sampling, here and on
        Thinking Machines' service. Tinker takes strings or ids, not both: EOS is added as the
        kind ``stop`` is. An empty ``stop`` is none, as in vLLM.
        """
        stops = [stop] if isinstance(stop, str | int) else list(stop or [])
        if not stops:
            return None
        eos_id = self.tokenizer.eos_token_id
        if eos_id is None:
            return stops
        if all(isinstance(s, int) for s in stops):
            return [*stops, eos_id]
        if not all(isinstance(s, str) and s for s in stops):
            raise ValueError(f"stop must be non-empty strings or token ids, got {stop!r}")
        return [*stops, self.tokenizer.decode([eos_id], skip_special_tokens=False)]
