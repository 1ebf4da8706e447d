"""One thread that owns the engine: calls run in submission order; queued samples are batched.

The engine is not thread-safe and a CPU has no spare cores to overlap model work anyway, so every
engine call goes through this single worker. Sample requests that queue up while the worker is busy
(many workflows sampling at once, several server tenants) are decoded together in one batch,
which is where batched decoding gets its throughput.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class EngineFuture(Generic[T]):
    """Awaitable in asyncio code and blocking via ``result()``, like the SDK's ``APIFuture``."""

    def __init__(self, future: Future):
        self._future = future

    def result(self, timeout: float | None = None) -> T:
        return self._future.result(timeout)

    async def result_async(self, timeout: float | None = None) -> T:
        return await asyncio.wait_for(asyncio.wrap_future(self._future), timeout)

    def __await__(self):
        return asyncio.wrap_future(self._future).__await__()

    def future(self) -> Future:
        return self._future


@dataclass
class _Call:
    fn: Callable[..., Any]
    args: tuple
    future: Future


@dataclass
class _Sample:
    request: Any  # trinity.engine.SampleRequest
    future: Future


class EngineWorker:
    def __init__(self, engine: Any, max_sample_batch: int = 256):
        self.engine = engine
        self.max_sample_batch = max_sample_batch
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="trinity-engine", daemon=True)
        self._thread.start()

    def call(self, fn: Callable[..., T], *args: Any) -> EngineFuture[T]:
        """Run ``fn(*args)`` on the worker after everything submitted before it."""
        job = _Call(fn, args, Future())
        self._jobs.put(job)
        return EngineFuture(job.future)

    def sample(self, request: Any) -> EngineFuture:
        """Queue one ``SampleRequest``; the result is its ``SampleResponse``."""
        job = _Sample(request, Future())
        self._jobs.put(job)
        return EngineFuture(job.future)

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()

    def _loop(self) -> None:
        pending: list = []
        while True:
            job = pending.pop(0) if pending else self._jobs.get()
            if job is None:
                return
            if isinstance(job, _Call):
                self._run(job.future, job.fn, *job.args)
                continue
            samples = [job]
            # Drain whatever else is already queued: consecutive samples join this batch; the
            # first non-sample job waits its turn so submission order still holds for calls.
            while len(samples) < self.max_sample_batch:
                try:
                    nxt = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if isinstance(nxt, _Sample):
                    samples.append(nxt)
                else:
                    pending.append(nxt)
                    break
            self._run_samples(samples)

    @staticmethod
    def _run(future: Future, fn: Callable[..., Any], *args: Any) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - delivered to the caller through the future
            future.set_exception(exc)

    def _run_samples(self, samples: list[_Sample]) -> None:
        try:
            responses = self.engine.sample([s.request for s in samples])
        except BaseException as exc:  # noqa: BLE001
            for s in samples:
                s.future.set_exception(exc)
            return
        for s, response in zip(samples, responses, strict=True):
            s.future.set_result(response)
