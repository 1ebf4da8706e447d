"""``CommandLog`` alone: a training model's commands run in ``seq_id`` order, each once.

No engine and no HTTP: commands are handed to a recorder that runs them at once, so the order a
test reads off ``ran`` is exactly the order the engine worker would see.
"""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest

from trinity.server.command_log import CommandLog
from trinity.server.futures import JSON, Futures, ServiceError
from trinity.server.store import Store


@pytest.fixture
def futures(tmp_path):
    store = Store(tmp_path / "server.sqlite")
    yield Futures(store, long_poll_s=0.1)
    store.close()


class Recorder:
    """Runs each handed-on job at once and records its label."""

    def __init__(self, futures: Futures):
        self.futures = futures
        self.ran: list[str] = []

    def log(self, model_id: str, next_seq: int = 1) -> CommandLog:
        return CommandLog(model_id, "alice", self.futures, self.run, next_seq)

    def run(self, future, job) -> None:
        self.futures.resolve(future, job())

    def job(self, label: str):
        def run():
            self.ran.append(label)
            return JSON, label.encode()

        return run


def submit(rec: Recorder, log: CommandLog, seq_id: int | None, label: str | None = None):
    job = rec.job(label or f"{log.model_id}#{seq_id}")
    return log.submit(seq_id, lambda: job)


def reject(log: CommandLog, seq_id: int | None) -> None:
    """Submit command ``seq_id`` whose request check fails with a 400."""

    def prepare():
        raise ServiceError(400, f"bad request {seq_id}")

    with pytest.raises(ServiceError, match=f"bad request {seq_id}"):
        log.submit(seq_id, prepare)


def result(future) -> bytes:
    return future.result.result(timeout=0)[1]


def test_in_order_commands_run_at_once(futures):
    rec = Recorder(futures)
    log = rec.log("m")
    for seq in (1, 2, 3):
        future = submit(rec, log, seq)
        assert result(future) == f"m#{seq}".encode()
    assert rec.ran == ["m#1", "m#2", "m#3"] and log.next_seq == 4 and log.held == {}


def test_early_arrivals_are_held_until_the_gap_fills(futures):
    rec = Recorder(futures)
    log = rec.log("m")
    f3, f2 = submit(rec, log, 3), submit(rec, log, 2)
    assert rec.ran == [] and set(log.held) == {2, 3}
    assert not f3.result.done() and not f2.result.done()
    submit(rec, log, 1)
    assert rec.ran == ["m#1", "m#2", "m#3"] and log.held == {} and log.next_seq == 4
    assert result(f3) == b"m#3"


def test_a_gap_holds_only_what_comes_after_it(futures):
    rec = Recorder(futures)
    log = rec.log("m")
    submit(rec, log, 1)
    submit(rec, log, 3)
    submit(rec, log, 5)
    assert rec.ran == ["m#1"] and set(log.held) == {3, 5}
    submit(rec, log, 2)
    assert rec.ran == ["m#1", "m#2", "m#3"] and set(log.held) == {5}
    submit(rec, log, 4)
    assert rec.ran == ["m#1", "m#2", "m#3", "m#4", "m#5"] and log.next_seq == 6


def test_a_retried_seq_id_gets_the_same_future_and_runs_once(futures):
    rec = Recorder(futures)
    log = rec.log("m")
    first = submit(rec, log, 1, "first")
    again = submit(rec, log, 1, "retry")
    assert again is first and result(again) == b"first"
    assert rec.ran == ["first"] and log.next_seq == 2


def test_a_duplicate_of_a_held_seq_id_is_held_once(futures):
    rec = Recorder(futures)
    log = rec.log("m")
    held = submit(rec, log, 2, "two")
    assert submit(rec, log, 2, "two again") is held and set(log.held) == {2}
    submit(rec, log, 1, "one")
    assert rec.ran == ["one", "two"] and result(held) == b"two"


def test_a_restored_log_continues_after_its_saved_seq_id(futures):
    rec = Recorder(futures)
    log = rec.log("m", next_seq=5)
    submit(rec, log, 5)
    assert rec.ran == ["m#5"]
    with pytest.raises(ServiceError, match="seq_id 4 was already used") as used:
        submit(rec, log, 4)
    assert used.value.status == 400 and rec.ran == ["m#5"] and log.next_seq == 6


def test_unordered_commands_run_at_once_and_leave_the_order_alone(futures):
    rec = Recorder(futures)
    log = rec.log("m")
    submit(rec, log, 2)
    a, b = submit(rec, log, None, "a"), submit(rec, log, 0, "b")
    assert a.request_id != b.request_id and rec.ran == ["a", "b"]
    assert set(log.held) == {2} and log.next_seq == 1


def test_models_are_ordered_independently(futures):
    rec = Recorder(futures)
    a, b = rec.log("a"), rec.log("b")
    fa2 = submit(rec, a, 2)
    fb1 = submit(rec, b, 1)
    fb2 = submit(rec, b, 2)
    assert rec.ran == ["b#1", "b#2"] and fa2.request_id != fb2.request_id
    assert result(fb1) == b"b#1" and not fa2.result.done()
    submit(rec, a, 1)
    assert rec.ran == ["b#1", "b#2", "a#1", "a#2"] and a.next_seq == b.next_seq == 3


def test_another_tenant_cannot_reach_a_model_command(futures):
    rec = Recorder(futures)
    submit(rec, rec.log("m"), 1)
    intruder = CommandLog("m", "bob", futures, rec.run)
    with pytest.raises(ServiceError, match="unknown request_id") as unknown:
        submit(rec, intruder, 1)
    assert unknown.value.status == 404 and rec.ran == ["m#1"]


def test_a_rejected_command_uses_up_its_seq_id(futures):
    rec = Recorder(futures)
    log = rec.log("m")
    submit(rec, log, 1)
    reject(log, 2)
    assert log.next_seq == 3 and log.held == {}
    submit(rec, log, 3)
    assert rec.ran == ["m#1", "m#3"] and log.next_seq == 4


def test_a_rejected_command_waits_for_its_turn_then_lets_later_ones_through(futures):
    rec = Recorder(futures)
    log = rec.log("m")
    submit(rec, log, 3)
    reject(log, 2)
    assert rec.ran == [] and set(log.held) == {2, 3}
    submit(rec, log, 1)
    assert rec.ran == ["m#1", "m#3"] and log.next_seq == 4 and log.held == {}


def test_a_retried_rejected_command_finds_its_failed_future(futures):
    rec = Recorder(futures)
    log = rec.log("m")
    reject(log, 1)
    retried = submit(rec, log, 1, "retry")
    assert rec.ran == [] and json.loads(result(retried)) == {
        "error": "bad request 1",
        "category": "user",
    }
    assert retried.delivered is not None  # the 4xx answer delivered it: purged in time


def test_rejections_outside_the_order_use_up_nothing(futures):
    rec = Recorder(futures)
    log = rec.log("m", next_seq=2)
    reject(log, None)  # unordered
    with pytest.raises(ServiceError, match="already used"):
        submit(rec, log, 1)
    assert log.next_seq == 2 and log.held == {}
    submit(rec, log, 2)
    assert rec.ran == ["m#2"]


def test_a_command_held_past_the_timeout_fails_and_keeps_its_place(futures):
    rec = Recorder(futures)
    log = CommandLog("m", "alice", futures, rec.run, held_timeout_s=10.0)
    f4 = submit(rec, log, 4)
    f2 = submit(rec, log, 2)
    assert log.tenant_held["alice"] == 2
    assert log.expire(time.monotonic() + 5) == 0  # not yet
    assert log.expire(time.monotonic() + 11) == 2
    failure = json.loads(result(f4))
    assert "seq_id 4 of model 'm' waited" in failure["error"]
    assert "for seq_id 1, 3, which never arrived" in failure["error"]
    assert failure["category"] == "user" and log.tenant_held["alice"] == 0
    assert "seq_id 1, which never arrived" in json.loads(result(f2))["error"]
    # The missing commands arrive late: they run, the expired ones stay failed, order resumes.
    submit(rec, log, 1)
    submit(rec, log, 3)
    f5 = submit(rec, log, 5)
    assert rec.ran == ["m#1", "m#3", "m#5"] and result(f5) == b"m#5" and log.next_seq == 6


def test_held_commands_are_capped_per_tenant_over_its_models(futures):
    rec = Recorder(futures)
    held = Counter()
    a = CommandLog("a", "alice", futures, rec.run, max_held=2, held=held)
    b = CommandLog("b", "alice", futures, rec.run, max_held=2, held=held)
    submit(rec, a, 3)
    submit(rec, b, 2)
    with pytest.raises(ServiceError, match="2 commands of this user already wait") as refused:
        submit(rec, a, 4)
    assert refused.value.status == 429
    assert a.next_seq == 1 and 4 not in a.held  # nothing used up: the SDK retries 429
    submit(rec, b, 1)  # b's gap fills: one place frees up
    assert held["alice"] == 1
    submit(rec, a, 4)
    submit(rec, a, 1)
    submit(rec, a, 2)
    assert rec.ran == ["b#1", "b#2", "a#1", "a#2", "a#3", "a#4"] and held["alice"] == 0
