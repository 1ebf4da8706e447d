"""Samplers for workflow runners that are Ray actors (see ``trinity.explorer.runners``).

A runner gets a picklable *recipe* and calls ``await recipe.sampler(index, ref)`` to get the
sampler for published weights ``ref``:

- local backend: ``RolloutModels``. Each rollout model is a ``RolloutModel`` actor holding an
  engine; all runners' sample requests go to it, and its ``EngineWorker`` decodes concurrent ones
  as one batch, exactly as in one process. Weights reach it as sampler checkpoints on disk (the
  trainer publishes with ``persist_samplers=True``): a directory path is all that crosses the
  cluster, so the checkpoint dir must be on storage every node sees.
- Tinker backend: ``TinkerSamplers``. Each runner opens its own session with the endpoint and key
  its runtime env carries (``TINKER_BASE_URL``, ``TRINITY_API_KEY``) and samples directly.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from typing import Any

from tinker import types

from trinity.backends.local import LocalRuntime, LocalSampler
from trinity.backends.tinker_sdk import TinkerSampler, TinkerSession


class RolloutModel:
    """Actor body: one engine serving every runner's sample requests.

    Restartable (Ray reruns ``__init__`` after a crash and retries the calls in flight:
    sampling is seeded, so a retry returns the same tokens); a restarted model reloads the
    weights the runners ask for, since it starts with none.
    """

    def __init__(self, model_path: str, rope: dict | None = None):
        from trinity.engine import configure_process

        configure_process()  # the actor's process is this engine's own
        self.runtime = LocalRuntime(model_path, rope=rope)
        self.current = LocalSampler(self.runtime)  # the weights loaded for the runners

    def tokenizer(self) -> Any:
        return self.runtime.tokenizer

    async def sample(
        self, ref: str | None, prompt_tokens: list[int], num_samples: int, params: Any
    ) -> types.SampleResponse:
        if ref is not None and self.current.ref is None:  # restarted since the last switch
            await self.switch(ref)
        return await LocalSampler(self.runtime, ref).sample(prompt_tokens, num_samples, params)

    async def switch(self, ref: str | None) -> None:
        await self.current.switch(ref)


class ActorSampler:
    """A runner's sampler over a ``RolloutModel`` actor (``PolicySampler`` needs only this)."""

    def __init__(self, model: Any, tokenizer: Any, ref: str | None):
        self.model = model
        self.tokenizer = tokenizer
        self.ref = ref

    def sample(self, prompt_tokens: list[int], num_samples: int, params: types.SamplingParams):
        return self.model.sample.remote(self.ref, list(prompt_tokens), num_samples, params)


class RolloutModels:
    """The rollout model actors: the driver switches their weights, runners sample from them.

    Runner ``i`` uses model ``i mod engine_num``, so ``runner_per_model`` runners share each one.
    """

    def __init__(self, models: list[Any], tokenizer: Any):
        self.models = models
        self.tokenizer = tokenizer
        self.ref: str | None = None

    async def switch(self, ref: str | None) -> None:
        await asyncio.gather(*(model.switch.remote(ref) for model in self.models))
        self.ref = ref

    async def sampler(self, index: int, ref: str | None) -> ActorSampler:
        return ActorSampler(self.models[index % len(self.models)], self.tokenizer, ref)


@dataclass
class TinkerSamplers:
    """A runner's own Tinker sampling clients; the driver's sampler deletes stale weights."""

    base_model: str
    _session: Any = field(default=None, repr=False)

    async def sampler(self, index: int, ref: str | None) -> TinkerSampler:
        if self._session is None:
            key = os.environ.get("TRINITY_API_KEY") or os.environ.get("TINKER_API_KEY")
            self._session = TinkerSession(os.environ.get("TINKER_BASE_URL"), key)
        return await TinkerSampler.create(self._session, self.base_model, ref)

    def __getstate__(self) -> dict:
        return {"base_model": self.base_model, "_session": None}  # a session stays in its process
