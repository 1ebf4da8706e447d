"""The local backend: the engine in this process, behind the learner / sampler shapes.

One ``EngineWorker`` thread owns the engine; the trainer's learner calls and every workflow's
sample requests go through it in submission order, and concurrent samples decode as one batch.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from tinker import types

from trinity.backends.base import CustomLoss, custom_loss_as_weights, custom_output
from trinity.engine.worker import EngineWorker


class LocalRuntime:
    """The engine and its worker thread, shared by the trainer and explorer of one process."""

    def __init__(self, model_path: str, dtype: Any = None, rope: dict | None = None):
        """``dtype``: None picks the machine's fast one (``forward.default_dtype``); ``rope``:
        the ``Engine``'s (``model.rope_scaling`` / ``model.rope_theta``)."""
        from trinity.engine import Engine

        self.engine = Engine(model_path, dtype=dtype, rope=rope)
        # Workflows submit a moment apart (each tokenizes its prompt first): without a window the
        # worker starts decoding the first alone and the rest wait for a second batch.
        self.worker = EngineWorker(self.engine, batch_window_s=0.005)
        self.tokenizer = self.engine.tokenizer

    def close(self) -> None:
        self.worker.close()


class LocalTrainer:
    def __init__(
        self, runtime: LocalRuntime, model_id: str, lora: Any | None, persist_samplers: bool = False
    ):
        """``lora``: a ``trinity.engine.LoraSpec``, or None for full fine-tuning.

        ``persist_samplers``: write published sampler weights to disk, for an explorer running
        in another process (or actor), and keep no in-memory snapshot of them here (nothing in
        this process samples them; building one cost a second per publish); in one process the
        in-memory snapshot is enough.
        """
        self.runtime = runtime
        self.persist_samplers = persist_samplers
        self.model_id = model_id
        self.tokenizer = runtime.tokenizer
        runtime.worker.call(runtime.engine.create_model, model_id, lora).result()

    def _call(self, fn, *args):
        return self.runtime.worker.call(fn, *args)

    exact_entropy = True  # the engine returns each token's entropy over the full vocabulary

    def forward_backward(self, data, loss_fn, loss_fn_config=None):
        return self._call(
            self.runtime.engine.forward_backward,
            self.model_id,
            data,
            loss_fn,
            loss_fn_config,
            False,
            True,
        )

    def forward_backward_custom(self, data: list[types.Datum], loss_fn: CustomLoss):
        engine = self.runtime.engine

        def run() -> types.ForwardBackwardOutput:
            forward = engine.forward_backward(
                self.model_id, data, "cross_entropy", None, forward_only=True, return_entropy=True
            )
            logprobs = [out["logprobs"].to_torch() for out in forward.loss_fn_outputs]
            entropy = [out["entropy"].to_torch() for out in forward.loss_fn_outputs]
            exact = getattr(loss_fn, "takes_entropy", False)  # LossPlan's: an exact entropy term
            linear, metrics, loss_sum = custom_loss_as_weights(
                data, logprobs, loss_fn, entropy if exact else None
            )
            result = engine.forward_backward(
                self.model_id, linear, "cross_entropy", None, return_entropy=True
            )
            return custom_output(result, metrics, loss_sum)

        return self._call(run)

    def optim_step(self, params: types.AdamParams):
        return self._call(self.runtime.engine.optim_step, self.model_id, params)

    async def save_state(self, name: str, directory: str) -> str:
        path = str(Path(directory) / "state")
        await self._call(self.runtime.engine.save_state, self.model_id, path, True)
        return path

    async def load_state(self, ref: str, optimizer: bool = True) -> None:
        await self._call(self.runtime.engine.load_state, self.model_id, ref, optimizer)

    async def load_adapter(self, directory: str) -> None:
        """Start from a peft adapter directory (``model.lora_configs[0].path``)."""
        await self._call(self.runtime.engine.load_adapter, self.model_id, directory)

    async def delete_state(self, ref: str) -> None:
        shutil.rmtree(ref, ignore_errors=True)

    async def publish_sampler(self, name: str, directory: str) -> str:
        """Snapshot the weights under a name that is also the directory they may be saved to."""
        engine = self.runtime.engine
        path = str(Path(directory) / "sampler")

        def snapshot_and_save() -> None:
            if self.persist_samplers:  # read from disk elsewhere: no frozen copy in this process
                engine.save_sampler(self.model_id, path)
            else:
                engine.snapshot_sampler(self.model_id, path)

        await self._call(snapshot_and_save)
        return path

    async def export_adapter(self, directory: str) -> str:
        await self._call(self.runtime.engine.export_peft, self.model_id, directory)
        return directory

    async def close(self) -> None:
        await self._call(self.runtime.engine.remove_model, self.model_id)


class LocalSampler:
    """Samples from the base model or from published sampler weights (refs are directories)."""

    def __init__(self, runtime: LocalRuntime, ref: str | None = None):
        self.runtime = runtime
        self.tokenizer = runtime.tokenizer
        self.ref = ref

    def sample(self, prompt_tokens: list[int], num_samples: int, params: types.SamplingParams):
        from trinity.engine import SampleRequest

        request = SampleRequest(
            adapter=self.ref,
            prompt_tokens=list(prompt_tokens),
            num_samples=num_samples,
            params=params,
        )
        return self.runtime.worker.sample(request)

    async def compute_logprobs(self, tokens: list[int]) -> list[float | None]:
        from trinity.engine import SampleRequest

        request = SampleRequest(
            adapter=self.ref,
            prompt_tokens=list(tokens),
            num_samples=1,
            params=types.SamplingParams(max_tokens=1),
            prompt_logprobs=True,
        )
        response = await self.runtime.worker.sample(request)
        return list(response.prompt_logprobs)

    async def switch(self, ref: str | None) -> None:
        engine = self.runtime.engine
        old, self.ref = self.ref, ref

        def load_and_release() -> None:
            reuse = old if old != ref and old is not None and engine.has_sampler(old) else None
            if ref is not None and not engine.has_sampler(ref):
                engine.load_sampler(ref, ref, reuse=reuse)
            if reuse is not None and engine.has_sampler(reuse):
                engine.drop_sampler(reuse)

        await self.runtime.worker.call(load_and_release)
