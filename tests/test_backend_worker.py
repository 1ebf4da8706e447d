"""The engine worker: calls keep submission order, queued samples decode as one batch."""

import asyncio
import threading

from trinity.engine.worker import EngineWorker


class RecordingEngine:
    """Records what reaches the engine; ``gate`` holds the worker busy so requests queue up."""

    def __init__(self):
        self.log = []
        self.gate = threading.Event()

    def sample(self, requests):
        self.log.append(("sample", list(requests)))
        return [f"out-{r}" for r in requests]

    def slow(self, name):
        self.gate.wait(5)
        self.log.append(("call", name))
        return name


def test_queued_samples_are_batched_and_calls_keep_order():
    engine = RecordingEngine()
    worker = EngineWorker(engine)
    try:
        first = worker.call(engine.slow, "first")  # keeps the worker busy
        samples = [worker.sample(i) for i in range(5)]
        after = worker.call(engine.slow, "after")
        late = worker.sample(99)
        engine.gate.set()
        assert first.result(5) == "first" and after.result(5) == "after"
        assert [s.result(5) for s in samples] == [f"out-{i}" for i in range(5)]
        assert late.result(5) == "out-99"
        assert engine.log == [
            ("call", "first"),
            ("sample", [0, 1, 2, 3, 4]),
            ("call", "after"),
            ("sample", [99]),
        ]
    finally:
        worker.close()


def test_errors_reach_the_caller_and_futures_are_awaitable():
    engine = RecordingEngine()
    engine.gate.set()
    worker = EngineWorker(engine)

    def boom():
        raise ValueError("bad datum")

    async def main():
        assert await worker.call(engine.slow, "x") == "x"
        try:
            await worker.call(boom)
        except ValueError as exc:
            return str(exc)

    try:
        assert asyncio.run(main()) == "bad datum"
    finally:
        worker.close()
