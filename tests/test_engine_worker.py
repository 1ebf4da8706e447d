"""EngineWorker behaviour the server relies on (ordering and batching: test_backend_worker.py)."""

import threading
import time

import pytest

from trinity.engine.worker import EngineWorker


class PickyEngine:
    """Fails any batch holding a negative request, as an engine does for one bad prompt."""

    def __init__(self):
        self.batches = []

    def sample(self, requests):
        self.batches.append(list(requests))
        if any(r < 0 for r in requests):
            raise ValueError(f"bad request in {requests}")
        return [r * 10 for r in requests]


def test_one_bad_request_does_not_fail_its_batch_mates():
    engine = PickyEngine()
    worker = EngineWorker(engine)
    gate = threading.Event()
    try:
        worker.call(gate.wait, 5)
        futures = [worker.sample(r) for r in (1, -1, 2)]
        gate.set()
        assert futures[0].result(5) == 10 and futures[2].result(5) == 20
        with pytest.raises(ValueError, match="bad request"):
            futures[1].result(5)
        assert engine.batches[0] == [1, -1, 2]  # tried together first, then one by one
    finally:
        worker.close()


def test_batch_window_waits_for_samples_arriving_a_moment_apart():
    """The batch stays open while samples keep coming less than the window apart (here 0.3 s
    in all, past a fixed 0.2 s deadline) and closes after a longer gap."""
    engine = PickyEngine()
    worker = EngineWorker(engine, batch_window_s=0.2)
    try:
        futures = [worker.sample(1)]
        for r in (2, 3):
            time.sleep(0.15)  # e.g. another client's HTTP request, a moment later
            futures.append(worker.sample(r))
        time.sleep(0.5)
        futures.append(worker.sample(4))
        assert [f.result(5) for f in futures] == [10, 20, 30, 40]
        assert engine.batches == [[1, 2, 3], [4]]
        assert worker.batch_sizes == [3, 1]
    finally:
        worker.close()
