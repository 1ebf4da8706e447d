"""One thread that owns an engine: calls run in submission order; queued samples are batched.

The engine is not thread-safe and a CPU has no spare cores to overlap model work anyway, so every
call on an engine goes through its single worker (the local backend and ``trinity server`` both
use this). Sample requests that queue up while the worker is busy (many workflows sampling at
once, several server tenants) are decoded together in one ``Engine.sample`` batch, which is where
batched decoding gets its throughput. ``batch_window_s`` keeps a batch open while samples keep
arriving less than that apart: worth a few milliseconds when requests come a moment apart (over
HTTP, or from workflows that each tokenize their prompt before submitting while the worker thread
has already woken up on the first).
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
_STOP = object()


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
    def __init__(self, engine: Any, max_sample_batch: int = 256, batch_window_s: float = 0.0):
        self.engine = engine
        self.max_sample_batch = max_sample_batch
        self.batch_window_s = batch_window_s
        self.batch_sizes: list[int] = []  # the last 100 sample batches, for tests and stats
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
        """Stop after the jobs already queued."""
        self._jobs.put(_STOP)
        self._thread.join()

    def _loop(self) -> None:
        held = None  # a job taken off the queue while batching, which runs next
        while True:
            job, held = (held, None) if held is not None else (self._jobs.get(), None)
            if job is _STOP:
                return
            if isinstance(job, _Call):
                _run(job.future, job.fn, *job.args)
                continue
            samples = [job]
            # Consecutive queued samples join this batch until none has come for batch_window_s;
            # the first other job waits its turn, so submission order still holds between calls
            # and the samples around them.
            while len(samples) < self.max_sample_batch:
                try:
                    nxt = (
                        self._jobs.get(timeout=self.batch_window_s)
                        if self.batch_window_s
                        else self._jobs.get_nowait()
                    )
                except queue.Empty:
                    break
                if not isinstance(nxt, _Sample):
                    held = nxt
                    break
                samples.append(nxt)
            self._run_samples(samples)

    def _run_samples(self, samples: list[_Sample]) -> None:
        live = [s for s in samples if s.future.set_running_or_notify_cancel()]
        if not live:
            return
        self.batch_sizes = (self.batch_sizes + [len(live)])[-100:]
        try:
            responses = self.engine.sample([s.request for s in live])
        except BaseException as exc:  # noqa: BLE001 - delivered through the futures
            if len(live) == 1:
                live[0].future.set_exception(exc)
                return
            # One bad request must not fail its batch-mates (other clients): retry one by one.
            for s in live:
                try:
                    s.future.set_result(self.engine.sample([s.request])[0])
                except BaseException as one:  # noqa: BLE001
                    s.future.set_exception(one)
            return
        for s, response in zip(live, responses, strict=True):
            s.future.set_result(response)


def _run(future: Future, fn: Callable[..., Any], *args: Any) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(fn(*args))
    except BaseException as exc:  # noqa: BLE001 - delivered to the caller through the future
        future.set_exception(exc)
