"""Fake backends, buffer and monitor for the trainer and explorer unit tests (no model, no HTTP).

They implement the Protocols the loops program against (``trinity.backends.base``,
``trinity.buffer.experience.ExperienceBuffer``, ``trinity.monitor.base.Monitor``) and record what
the loops asked of them, in order, so a test can check the loop's own logic.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import torch
from tinker import types
from workflow_fakes import CharTokenizer

from trinity.algorithms import explorer_advantage_fn
from trinity.explorer.explorer import Explorer
from trinity.explorer.sampler import RolloutSettings
from trinity.synchronizer.synchronizer import Synchronizer


class FakeLearner:
    """A ``TrainerBackend``: every datum's logprobs are -0.5 per target token."""

    def __init__(self):
        self.tokenizer = CharTokenizer()
        self.events: list[tuple[str, ...]] = []
        self.submitted: list[tuple[str, list[types.Datum]]] = []
        self.adam: list[types.AdamParams] = []

    def _later(self, name: str, result: Any) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()

        def finish() -> None:
            self.events.append(("done", name))
            future.set_result(result)

        asyncio.get_running_loop().call_soon(finish)
        return future

    def _output(self, data: list[types.Datum]) -> types.ForwardBackwardOutput:
        outputs = [
            {
                "logprobs": types.TensorData.from_torch(
                    torch.full((len(d.model_input.to_ints()),), -0.5)
                )
            }
            for d in data
        ]
        return types.ForwardBackwardOutput(
            loss_fn_output_type="fake", loss_fn_outputs=outputs, metrics={"loss:sum": 1.0}
        )

    def forward_backward(self, data, loss_fn, loss_fn_config=None):
        self.events.append(("submit", "forward_backward", loss_fn))
        self.submitted.append((loss_fn, list(data)))
        return self._later("forward_backward", self._output(data))

    def forward_backward_custom(self, data, loss_fn):
        self.events.append(("submit", "forward_backward_custom"))
        self.submitted.append(("custom", list(data)))
        lps = [torch.full((len(d.model_input.to_ints()),), -0.5) for d in data]
        loss, metrics = loss_fn(data, lps)
        return self._later("forward_backward_custom", self._output(data))

    def optim_step(self, params):
        self.events.append(("submit", "optim_step"))
        self.adam.append(params)
        return self._later("optim_step", types.OptimStepResponse(metrics={"grad_norm:mean": 0.5}))

    async def save_state(self, name: str, directory: str) -> str:
        self.events.append(("save_state", name))
        return f"state://{name}"

    async def load_state(self, ref: str) -> None:
        self.events.append(("load_state", ref))

    async def delete_state(self, ref: str) -> None:
        self.events.append(("delete_state", ref))

    async def publish_sampler(self, name: str, directory: str) -> str:
        self.events.append(("publish_sampler", name))
        return f"sampler://{name}"

    async def export_adapter(self, directory: str) -> str:
        self.events.append(("export_adapter", directory))
        return directory

    async def close(self) -> None:
        pass


class FakeSampler:
    """A ``SamplerBackend`` that answers with fixed texts; logprobs -0.25 per token."""

    def __init__(self, texts: list[str]):
        self.tokenizer = CharTokenizer()
        self.texts = texts
        self.ref: str | None = None
        self.switches: list[str | None] = []
        self.requests: list[tuple[list[int], int, types.SamplingParams]] = []

    async def sample(self, prompt_tokens, num_samples, params):
        self.requests.append((list(prompt_tokens), num_samples, params))
        sequences = []
        for i in range(num_samples):
            tokens = self.tokenizer.encode(self.texts[i % len(self.texts)])
            sequences.append(
                types.SampledSequence(
                    stop_reason="stop",
                    sequence_id=str(i),
                    tokens_np=np.asarray(tokens, dtype=np.int64),
                    logprobs_np=np.full(len(tokens), -0.25, dtype=np.float32),
                )
            )
        return types.SampleResponse(sequences=sequences)

    async def compute_logprobs(self, tokens: list[int]) -> list[float | None]:
        return [None, *([-1.0] * (len(tokens) - 1))]

    async def switch(self, ref: str | None) -> None:
        self.ref = ref
        self.switches.append(ref)


class ListBuffer:
    """An ``ExperienceBuffer`` that hands out what was put, ``n`` at a time, then ``[]``."""

    def __init__(self, experiences: list | None = None):
        self.items = list(experiences or [])
        self.puts: list[list] = []
        self.closed = False

    async def put(self, experiences) -> None:
        self.puts.append(list(experiences))
        self.items.extend(experiences)

    async def get_batch(self, n: int, timeout: float | None = None) -> list:
        batch, self.items = self.items[:n], self.items[n:]
        return batch

    async def close(self) -> None:
        self.closed = True

    def pending(self) -> int:
        return len(self.items)


class RecordingMonitor:
    def __init__(self):
        self.records: list[tuple[int, dict[str, Any]]] = []

    def log(self, metrics, step: int) -> None:
        self.records.append((step, dict(metrics)))

    def close(self) -> None:
        pass

    def steps_with(self, key: str) -> list[int]:
        return [step for step, metrics in self.records if key in metrics]


def explorer_for(tmp_path, sampler, task_reader, **kwargs):
    """An explorer over fakes (GRPO advantages); returns it with its buffer, monitor, synchronizer."""
    buffer, monitor = ListBuffer(), RecordingMonitor()
    sync = kwargs.pop("synchronizer", None) or Synchronizer(tmp_path, sync_timeout=5)
    explorer = Explorer(
        sampler=sampler,
        settings=RolloutSettings(max_response_tokens=8),
        reader=task_reader,
        buffer=buffer,
        synchronizer=sync,
        monitor=monitor,
        advantage_fn=explorer_advantage_fn({"algorithm_type": "grpo"}),
        **kwargs,
    )
    return explorer, buffer, monitor, sync
