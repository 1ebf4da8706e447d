"""The policy as a workflow sees it: chat messages in, sampled responses with logprobs out."""

from __future__ import annotations

import hashlib
import itertools
import logging
from dataclasses import dataclass
from typing import Any

from tinker import types

from trinity.workflows.types import Response

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


def derive_seed(*parts: Any) -> int:
    """A stable 31-bit seed from run seed, step and task: reruns sample the same tokens."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


class PolicySampler:
    """Implements ``trinity.workflows.types.Sampler`` over a backend sampler for one task."""

    def __init__(self, backend: Any, settings: RolloutSettings, seed: int | None = None):
        self.backend = backend
        self.tokenizer = backend.tokenizer
        self.settings = settings
        self.seed = seed
        self._calls = 0

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=True,
            chat_template=self.settings.chat_template,
        )
        return self.tokenizer.encode(text, add_special_tokens=False)

    async def chat(
        self, messages: list[dict[str, str]], n: int, **sampling_args: Any
    ) -> list[Response]:
        return await self.generate(self.encode_chat(messages), n, **sampling_args)

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
        params = self._params(sampling_args)
        response = await self.backend.sample(prompt_tokens, n, params)
        return [
            Response(
                prompt_tokens=list(prompt_tokens),
                tokens=list(seq.tokens),
                logprobs=[float(x) for x in (seq.logprobs or [])],
                text=self.tokenizer.decode(seq.tokens, skip_special_tokens=True),
                stop_reason=seq.stop_reason,
            )
            for seq in response.sequences
        ]

    def _params(self, args: dict[str, Any]) -> types.SamplingParams:
        s = self.settings
        seed = None
        if self.seed is not None:
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
            stop=args.get("stop"),
        )
