"""The command log of one training model: its commands run in ``seq_id`` order, each once.

The SDK numbers a training client's calls (fwd/bwd, optim, save, load) from 1 and sends a call's
chunks in parallel, first chunk last, so commands can arrive out of order: an early arrival is
held until the gap before it fills, then every contiguous command is handed on in order. A
retried ``seq_id`` (the SDK retries on timeouts) gets the future of its first arrival and runs
nothing again. Request ids are ``{model_id}:{seq_id}`` in ``Futures``, which persists them, so a
retry is recognised after a graceful restart too (the service saves ``next_seq`` with the model).
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
        self, seq_id: int | None, job: Job, on_dispatch: Callable[[], None] | None = None
    ) -> Future:
        """The future of command ``seq_id``, which runs ``job`` once every earlier one was handed
        on. ``on_dispatch`` runs as the job is handed on, for bookkeeping that must follow the
        command order rather than the arrival order."""
        if seq_id is None or seq_id <= 0:  # unordered (older SDKs): after what is queued
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
        self.held[seq_id] = lambda: self._dispatch(future, job, on_dispatch)
        while self.next_seq in self.held:
            self.held.pop(self.next_seq)()
            self.next_seq += 1
        return future

    def _dispatch(self, future: Future, job: Job, on_dispatch: Callable[[], None] | None) -> None:
        if on_dispatch is not None:
            on_dispatch()
        self._run(future, job)
