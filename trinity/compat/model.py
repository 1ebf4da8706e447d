"""The original's ``ModelWrapper``: its ``chat`` / ``generate`` / ``logprobs`` over our sampler.

Every call goes to the ``PolicySampler`` the explorer built for the task
(``trinity.explorer.sampler``), so the backend, seeds, prompt truncation and history are ours;
this class only reshapes arguments and results (``Response`` -> the original's ``Experience``).

The blocking variants exist because the original's ``run()`` is synchronous. The explorer runs
workflows as coroutines of one event loop, so the adapter runs a synchronous ``run()`` in a
worker thread and each blocking call here is handed to that loop and waited for. Called from a
coroutine instead (an ``is_async`` workflow calling ``chat`` rather than ``chat_async``) it would
wait on the loop it blocks: that raises at once rather than hanging.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

import torch

from trinity.compat.experience import Experience
from trinity.workflows.types import Response
from trinity.workflows.workflows import SAMPLING_KEYS

T = TypeVar("T")
SAMPLER_KEYS = (*SAMPLING_KEYS, "seed")  # the rest of vLLM's SamplingParams is ignored, as there


class ModelWrapper:
    """The rollout model as the original's workflows see it (``self.model``)."""

    def __init__(self, sampler: Any, loop: asyncio.AbstractEventLoop | None = None):
        """``sampler``: a ``PolicySampler``; ``loop``: the event loop it runs in (blocking calls
        from other threads are run there)."""
        self.sampler = sampler
        self.loop = loop

    # -- generation ------------------------------------------------------------------------

    async def chat_async(self, messages: list[dict[str, Any]], **kwargs: Any) -> list[Experience]:
        """``n`` (default 1) replies to ``messages``, each an ``Experience`` without reward."""
        n, args = self._sampling(kwargs)
        return [self._experience(r) for r in await self.sampler.chat(messages, n, **args)]

    def chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> list[Experience]:
        return self._blocking(self.chat_async(messages, **kwargs))

    async def generate_async(self, prompts: list[str], **kwargs: Any) -> list[Experience]:
        """``n`` continuations of each text prompt, flattened in prompt order."""
        n, args = self._sampling(kwargs)
        tokenizer = self.sampler.tokenizer
        batches = await asyncio.gather(
            *(self.sampler.generate(list(tokenizer.encode(p)), n, **args) for p in prompts)
        )
        return [self._experience(r) for batch in batches for r in batch]

    def generate(self, prompts: list[str], **kwargs: Any) -> list[Experience]:
        return self._blocking(self.generate_async(prompts, **kwargs))

    # -- log-probabilities -----------------------------------------------------------------

    async def logprobs_async(self, tokens: Any, temperature: float | None = None) -> torch.Tensor:
        """Logprob of each token after the first given what precedes it (``len(tokens) - 1``).

        Our backends score at temperature 1 only (``SamplerBackend.compute_logprobs`` in
        ``trinity/backends/base.py``); another temperature raises rather than returning the wrong
        distribution.
        """
        if temperature not in (None, 1.0):
            raise NotImplementedError(
                f"logprobs at temperature {temperature}: only temperature 1.0 is supported"
            )
        ids = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
        scored = await self.sampler.backend.compute_logprobs(ids)
        return torch.tensor(scored[1:], dtype=torch.float32)

    def logprobs(self, tokens: Any, temperature: float | None = None) -> torch.Tensor:
        return self._blocking(self.logprobs_async(tokens, temperature))

    async def convert_messages_to_experience_async(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        temperature: float | None = None,
    ) -> Experience:
        """A whole conversation as one experience: the assistant turns, as the chat template
        renders them, are the action mask; ``prompt_length`` is where the first one starts;
        cut at ``model.max_model_len - 1`` tokens (``response_truncated``)."""
        render = self.sampler.conversations

        def encode(upto: int, generate: bool) -> list[int]:
            return render.encode(render.render(messages[:upto], tools, generate))

        tokens = encode(len(messages), False)
        mask = [False] * len(tokens)
        for i, message in enumerate(messages):
            if message.get("role") == "assistant":
                start = len(os.path.commonprefix([encode(i, True), tokens]))
                end = len(os.path.commonprefix([encode(i + 1, False), tokens]))
                mask[start:end] = [True] * (end - start)
        if True not in mask:
            raise ValueError("convert_messages_to_experience: the messages hold no assistant turn")
        prompt_length = mask.index(True)
        limit = self.sampler.settings.max_model_len
        truncated = bool(limit) and len(tokens) > limit - 1
        if truncated:
            tokens, mask = tokens[: limit - 1], mask[: limit - 1]
        logprobs = await self.logprobs_async(tokens, temperature)
        return Experience(
            tokens=tokens,
            prompt_length=prompt_length,
            logprobs=logprobs[prompt_length - 1 :],
            action_mask=mask[prompt_length:],
            truncate_status="response_truncated" if truncated else None,
            prompt_text=self.sampler.tokenizer.decode(tokens[:prompt_length]),
            response_text=self.sampler.tokenizer.decode(tokens[prompt_length:]),
            messages=messages,
            tools=tools,
        )

    def convert_messages_to_experience(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        temperature: float | None = None,
    ) -> Experience:
        return self._blocking(
            self.convert_messages_to_experience_async(messages, tools, temperature)
        )

    # -- history and OpenAI clients --------------------------------------------------------

    @property
    def enable_history(self) -> bool:
        return self.sampler.enable_history

    @enable_history.setter
    def enable_history(self, value: bool) -> None:
        self.sampler.enable_history = value

    @property
    def history(self) -> list[Experience]:
        """Every recorded call (``explorer.rollout_model.enable_history``) since the last
        extraction, one experience per sampled reply."""
        return [self._experience(r) for r in self.sampler.history]

    def extract_experience_from_history(self, clear_history: bool = True) -> list[Experience]:
        return [
            Experience.from_ours(exp)
            for exp in self.sampler.extract_experience_from_history(clear_history)
        ]

    def get_openai_client(self) -> Any:
        return self.sampler.get_openai_client()

    def get_openai_async_client(self) -> Any:
        return self.sampler.get_openai_async_client()

    def clone_with_isolated_history(self) -> ModelWrapper:
        return ModelWrapper(self.sampler.clone_with_isolated_history(), self.loop)

    @property
    def model_path(self) -> str:
        return self.sampler.model_path

    @property
    def model_name(self) -> str:
        return self.sampler.model_path

    @property
    def api_key(self) -> str:
        return "EMPTY"  # the OpenAI clients above need none; the original's constant

    @property
    def generate_kwargs(self) -> dict[str, Any]:
        """The sampling defaults (``model.*``) an OpenAI call should pass."""
        s = self.sampler.settings
        return {
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_tokens": s.max_response_tokens,
        }

    @property
    def model_version(self) -> int:
        """Unknown inside a workflow here: 0. The explorer stamps the version of the weights it
        sampled with on every experience once the run returns (``trinity/explorer/explorer.py``),
        which is what training reads."""
        return 0

    @property
    async def model_version_async(self) -> int:
        return self.model_version

    # -- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _sampling(kwargs: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        n = int(kwargs.get("n") or 1)
        return n, {k: kwargs[k] for k in SAMPLER_KEYS if kwargs.get(k) is not None}

    def _experience(self, response: Response) -> Experience:
        prompt = list(response.prompt_tokens)
        return Experience(
            tokens=prompt + list(response.tokens),
            prompt_length=len(prompt),
            logprobs=response.logprobs,
            action_mask=[True] * len(response.tokens),
            prompt_text=self.sampler.tokenizer.decode(prompt),
            response_text=response.text,
        )

    def _blocking(self, call: Coroutine[Any, Any, T]) -> T:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            if self.loop is not None and self.loop.is_running():
                return asyncio.run_coroutine_threadsafe(call, self.loop).result()
            return asyncio.run(call)
        call.close()
        raise RuntimeError(
            "ModelWrapper: a blocking call (chat, generate, logprobs, ...) inside a coroutine "
            "would wait on the event loop it blocks; await its *_async variant instead"
        )
