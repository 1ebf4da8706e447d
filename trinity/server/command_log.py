"""The command log of one training model: its commands run in ``seq_id`` order, each once.

The SDK numbers a training client's calls (fwd/bwd, optim, save, load) from 1 and sends a call's
chunks in parallel, first chunk last, so commands can arrive out of order: an early arrival is
held until the gap before it fills, then every contiguous command is handed on in order. A
retried ``seq_id`` (the SDK retries on timeouts) gets the future of its first arrival and runs
nothing again. Request ids are ``{model_id}:{seq_id}`` in ``Futures``, which persists them, so a
retry is recognised after a graceful restart too (the service saves ``next_seq`` with the model).

A command checks its request only once it has its place (``prepare``): a rejected one still uses
up its ``seq_id``, as a failed future, so the commands after it run (the SDK numbers the next
call regardless; before, they waited for the rejected one forever).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

from trinity.server.futures import Future, Futures, Result, ServiceError

Job = Callable[[], Result]


class CommandLog:
    def __init__(
        self,
        model_id: str,
        tenant: str,
        futures: Futures,
        run: Callable[[Future, Job], None],
        next_seq: int = 1,
    ):
        """``run(future, job)`` hands a command on (the service queues it on the engine worker,
        whose FIFO order then is the seq_id order)."""
        self.model_id, self.tenant, self.futures, self._run = model_id, tenant, futures, run
        self.next_seq = next_seq
        self.held: dict[int, Callable[[], None]] = {}  # seq_id -> hand it on

    def submit(
        self,
        seq_id: int | None,
        prepare: Callable[[], Job],
        on_dispatch: Callable[[], None] | None = None,
    ) -> Future:
        """The future of command ``seq_id``, whose job runs once every earlier one was handed on.

        ``prepare()`` checks the request and returns the job; an error it raises is re-raised
        (the HTTP answer) after the ``seq_id`` was used up by a failed future. ``on_dispatch``
        runs as the job is handed on, for bookkeeping that must follow the command order rather
        than the arrival order."""
        if seq_id is None or seq_id <= 0:  # unordered (older SDKs): after what is queued
            job = prepare()
            future, _ = self.futures.open(f"{self.model_id}:{uuid.uuid4().hex}", self.tenant)
            self._dispatch(future, job, on_dispatch)
            return future
        request_id = f"{self.model_id}:{seq_id}"
        if self.futures.exists(request_id):  # a retry: the same future (open checks the owner)
            return self.futures.open(request_id, self.tenant)[0]
        if seq_id < self.next_seq:
            raise ServiceError(
                400,
                f"seq_id {seq_id} was already used for model "
                f"{self.model_id!r} (next expected {self.next_seq})",
            )
        future, _ = self.futures.open(request_id, self.tenant)
        try:
            job = prepare()
        except Exception as exc:
            self.futures.reject(future, exc)
            self._hold(seq_id, lambda: None)
            raise
        self._hold(seq_id, lambda: self._dispatch(future, job, on_dispatch))
        return future

    def _hold(self, seq_id: int, hand_on: Callable[[], None]) -> None:
        """Keep ``hand_on`` for its turn, then hand on every command whose turn has come."""
        self.held[seq_id] = hand_on
        while self.next_seq in self.held:
            self.held.pop(self.next_seq)()
            self.next_seq += 1

    def _dispatch(self, future: Future, job: Job, on_dispatch: Callable[[], None] | None) -> None:
        if on_dispatch is not None:
            on_dispatch()
        self._run(future, job)
